"""Batched, per-request reproducible token sampling over the step graph's top-K candidates.

Each decode step the sampling variant of the step graph returns, for the whole batch,
``topk_logprobs [B, K] float32`` (log-softmax values of the K most probable tokens, sorted
descending) and ``topk_ids [B, K] int64``. Requests sharing a batch carry different decoding
parameters, and a request's output must not depend on what else is in the batch or on which
row it occupies. Therefore:

* every operation here is row-wise and vectorized over the batch (no Python loop over rows,
  no cross-row reduction), and
* randomness does not come from a shared, stateful RNG but from a counter-based generator:
  the uniform for a request at a step is a pure function of ``(request seed, counter)``
  (the counter is the request's own step index, e.g. the number of tokens it has generated).

Pure numpy: no ORT, torch or protobuf.

Distribution actually sampled (documented approximation): only the K candidates the graph
returns exist here. The probability mass of the vocabulary tail beyond K is dropped, and the
kept candidates are renormalized. With top_k <= K or a top_p nucleus inside the top K this is
exact; with top_k = 0 ("all") and top_p = 1 it is the distribution truncated to the top K.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequestError

__all__ = [
    "GREEDY_TEMPERATURE",
    "SamplingParams",
    "ending_tokens",
    "sample_from_candidates",
    "suppress_token",
    "uniform_from_counter",
]

#: Temperatures at or below this are treated as greedy decoding.
GREEDY_TEMPERATURE = 1e-6

_UINT64_MAX = (1 << 64) - 1

# splitmix64 constants (Steele, Lea, Flood: "Fast splittable pseudorandom number generators",
# OOPSLA 2014; the finalizer is Stafford's "Mix13" variant of the MurmurHash3 fmix64).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # odd, 2^64 / golden ratio
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TWO_POW_M53 = 2.0**-53


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijection on uint64 with full avalanche. Wraps mod 2^64."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _as_uint64(values: np.ndarray | int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype.kind == "u":
        return arr.astype(np.uint64)
    if arr.dtype.kind == "i":
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"{name} must be non-negative")
        return arr.astype(np.uint64)
    if arr.dtype == object:  # Python ints beyond int64 (e.g. a list of uint64 seeds)
        try:
            return np.array([int(v) for v in arr.ravel()], dtype=np.uint64).reshape(arr.shape)
        except (OverflowError, TypeError, ValueError) as exc:
            raise ValueError(f"{name} must hold integers in [0, 2**64)") from exc
    raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")


def uniform_from_counter(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1) with 53 random bits, one per row.

    ``seeds`` (uint64, shape (B,)) and ``counters`` (int64 or uint64, non-negative, shape
    (B,); broadcasting is allowed) -> float64 (B,). The value is a pure function of the pair
    ``(seed, counter)``: it does not depend on the batch size, the row position or any state.

    Construction (all arithmetic in uint64, wrapping modulo 2^64)::

        key = mix64(seed + GAMMA)                      # splitmix64's first output for `seed`
        x   = mix64(key + (counter + 1) * GAMMA)       # splitmix64 stream keyed by `key`
        u   = (x >> 11) * 2**-53                       # top 53 bits -> exact float64 in [0, 1)

    ``mix64`` is the splitmix64 finalizer (a bijection), ``GAMMA`` the odd golden-ratio
    increment. For a fixed seed, counters 0, 1, 2, ... give exactly the splitmix64 sequence
    seeded with ``key``, which passes BigCrush. Hashing the seed first decorrelates nearby
    seeds (with raw seeds, seed s at counter c + 1 would equal seed s + GAMMA at counter c);
    two seeds' streams overlap only if their keys differ by a small multiple of GAMMA,
    which for random keys has probability ~ (counters used) / 2^64.
    """
    s = _as_uint64(seeds, "seeds")
    c = _as_uint64(counters, "counters")
    with np.errstate(over="ignore"):  # wraparound is intended (arrays don't warn; scalars do)
        key = _mix64(s + _GAMMA)
        x = _mix64(key + (c + np.uint64(1)) * _GAMMA)
    return (x >> _S11).astype(np.float64) * _TWO_POW_M53


def ending_tokens(
    token_ids: np.ndarray, eos_id: int | np.ndarray, stop_ids: np.ndarray | None = None
) -> np.ndarray:
    """Which of `token_ids` would end a text: `eos_id`, or one of the stop ids.

    ``token_ids`` is (B,) (the chosen tokens) or (B, K) (candidates). ``stop_ids`` is None,
    (M,) (the same for every row) or (B, M) (per row, padded with -1, which no token is).
    Returns a bool array shaped like ``token_ids``. The one definition of "an ending token",
    for stop checks, <eos>/stop suppression and beam search alike.
    """
    ids = np.asarray(token_ids)
    ends = ids == eos_id
    if stop_ids is None:
        return ends
    stop = np.asarray(stop_ids)
    if not stop.size:
        return ends
    if stop.ndim == 1:
        return ends | np.isin(ids, stop)
    if stop.shape[0] != ids.shape[0]:
        raise ValueError(f"stop_ids must have {ids.shape[0]} rows, got {stop.shape}")
    if ids.ndim == 1:
        return ends | (ids[:, None] == stop).any(axis=1)
    return ends | (ids[:, :, None] == stop[:, None, :]).any(axis=2)


def suppress_token(
    topk_logprobs: np.ndarray,
    topk_ids: np.ndarray,
    token_id: int,
    rows: np.ndarray,
    stop_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Return a copy of ``topk_logprobs`` with ``token_id`` (and the rows' ``stop_ids``, see
    :func:`ending_tokens`) set to -inf in the selected rows.

    ``rows`` is a bool mask of shape (B,). This is how <eos> and stop ids are forbidden
    before a request reaches its ``min_tokens``. The input is not modified. A suppressed
    candidate is removed before top-k is applied (top_k counts the remaining candidates),
    like a -inf logit.
    """
    lp = np.asarray(topk_logprobs)
    ids = np.asarray(topk_ids)
    mask_rows = np.asarray(rows, dtype=bool)
    if lp.ndim != 2 or ids.shape != lp.shape:
        raise ValueError(
            f"topk_logprobs and topk_ids must both be [B, K], got {lp.shape} and {ids.shape}"
        )
    if mask_rows.shape != (lp.shape[0],):
        raise ValueError(f"rows must have shape ({lp.shape[0]},), got {mask_rows.shape}")
    banned = mask_rows[:, None] & ending_tokens(ids, token_id, stop_ids)
    return np.where(banned, np.asarray(-np.inf, lp.dtype), lp)


def _row_param(value: np.ndarray, batch: int, name: str, dtype: type) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = np.broadcast_to(arr, (batch,))
    if arr.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {arr.shape}")
    return arr


def sample_from_candidates(
    topk_logprobs: np.ndarray,
    topk_ids: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniforms: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose one token per row from the step graph's top-K candidates, vectorized over rows.

    Args:
        topk_logprobs: [B, K] float, model log-probabilities of the candidates, sorted
            descending (the TopK output). Entries may be -inf (see :func:`suppress_token`);
            the finite entries must still be in descending order. Non-finite entries (-inf,
            NaN) are never chosen.
        topk_ids: [B, K] int64, the candidates' token ids.
        temperature: [B] float32 (> 0). ``<= GREEDY_TEMPERATURE`` means greedy: the best
            allowed candidate (column 0 unless it was suppressed).
        top_k: [B] int32. 0 (or >= K) keeps all K candidates; otherwise the best ``top_k``
            allowed (finite) candidates.
        top_p: [B] float32 in (0, 1]. 1.0 disables the nucleus. Otherwise keeps the smallest
            prefix of the kept candidates whose renormalized tempered probability reaches
            ``top_p`` (always at least the first).
        uniforms: [B] float64 in [0, 1), e.g. from :func:`uniform_from_counter`.

    Per row: scale the log-probs by 1/temperature, drop non-finite entries and those beyond
    top_k, softmax over what is kept (the tail beyond K is dropped, i.e. renormalized away),
    apply the nucleus, renormalize, and pick by inverse CDF with the row's uniform.
    Scalars are accepted for the per-row parameters and broadcast.

    If every candidate of a row is non-finite (all suppressed), column 0 is returned, with
    its raw (-inf) log-prob: there is nothing valid to choose, and the caller decides.

    Returns:
        (token ids int64 [B], logprob float32 [B]) where logprob is the chosen candidate's
        raw ``topk_logprobs`` value, i.e. under the model distribution, not the tempered or
        truncated one.
    """
    lp_in = np.asarray(topk_logprobs)
    ids = np.asarray(topk_ids)
    if lp_in.ndim != 2 or ids.shape != lp_in.shape:
        raise ValueError(
            f"topk_logprobs and topk_ids must both be [B, K], got {lp_in.shape} and {ids.shape}"
        )
    batch, k_cap = lp_in.shape
    if k_cap == 0:
        raise ValueError("topk_logprobs must have at least one candidate column (K >= 1)")
    temp = _row_param(temperature, batch, "temperature", np.float64)
    k_req = _row_param(top_k, batch, "top_k", np.int64)
    p_req = _row_param(top_p, batch, "top_p", np.float64)
    u = _row_param(uniforms, batch, "uniforms", np.float64)
    if np.isnan(temp).any():
        raise ValueError("temperature must not be NaN")
    if np.isnan(p_req).any():
        raise ValueError("top_p must not be NaN")

    lp = lp_in.astype(np.float64, copy=False)
    valid = np.isfinite(lp)  # [B, K]; -inf (suppressed) and NaN are never chosen
    any_valid = valid.any(axis=1)

    # Greedy: best valid candidate (first on ties); column 0 when the row has none.
    greedy_col = np.argmax(np.where(valid, lp, -np.inf), axis=1)

    is_greedy = temp <= GREEDY_TEMPERATURE
    rows = np.arange(batch)
    if is_greedy.all():  # fast path, same result as the general one below
        col = np.where(any_valid, greedy_col, 0)
        return ids[rows, col].astype(np.int64), lp_in[rows, col].astype(np.float32)

    # top_k over the valid candidates: keep the first k_eff of them in column order.
    k_eff = np.where((k_req <= 0) | (k_req > k_cap), k_cap, k_req)
    rank = np.cumsum(valid, axis=1)  # 1-based rank among valid candidates
    keep = valid & (rank <= k_eff[:, None])

    # Tempered softmax over the kept candidates (greedy rows use t = 1; their result is
    # overwritten below, this only keeps the arithmetic finite).
    t = np.where(is_greedy, 1.0, temp)
    scaled = np.where(keep, lp / t[:, None], -np.inf)
    row_max = scaled.max(axis=1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    probs = np.exp(scaled - row_max)  # exactly 0 where not kept; the max entry is 1
    probs /= np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)

    # Nucleus: keep a candidate when the mass strictly before it is < top_p. Candidates are in
    # descending order, so this is the smallest prefix reaching top_p; the first kept
    # candidate always survives (mass before it is 0 < top_p). top_p >= 1 is off, so rounding
    # in the cumulative sum cannot drop a tail candidate.
    mass_before = np.cumsum(probs, axis=1) - probs
    in_nucleus = (mass_before < p_req[:, None]) | (p_req[:, None] >= 1.0)
    probs = np.where(in_nucleus, probs, 0.0)

    # Inverse CDF: first column whose cumulative mass exceeds u * total. That column always
    # has positive probability. If rounding puts u * total at or above the total, fall back
    # to the last column with positive probability.
    cdf = np.cumsum(probs, axis=1)
    target = u * cdf[:, -1]
    col = np.sum(cdf <= target[:, None], axis=1)
    last_pos = k_cap - 1 - np.argmax(probs[:, ::-1] > 0.0, axis=1)
    col = np.where(col >= k_cap, last_pos, col)

    col = np.where(is_greedy, greedy_col, col)
    col = np.where(any_valid, col, 0)

    chosen_ids = ids[rows, col].astype(np.int64, copy=False)
    chosen_lp = lp_in[rows, col].astype(np.float32, copy=False)
    return chosen_ids, chosen_lp


@dataclass(frozen=True)
class SamplingParams:
    """A request's decoding parameters (plain dataclass, no protobuf).

    temperature: > 0; values <= ``GREEDY_TEMPERATURE`` decode greedily.
    top_k: 0 = all K candidates the step graph returns, otherwise 1..max_k.
    top_p: nucleus mass in (0, 1]; 1.0 = off.
    seed: uint64 seed for the request's counter-based RNG; None lets the request layer pick
        one (pick it at admission and record it, so the request can be replayed).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def validate(self, max_k: int) -> None:
        """Raise InvalidRequestError (a ValueError) naming the offending field. ``max_k`` is
        the graph's K."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise InvalidRequestError("temperature", f"must be a number, got {t!r}")
        if not math.isfinite(float(t)) or float(t) <= 0.0:
            raise InvalidRequestError("temperature", f"must be finite and > 0, got {t!r}")

        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise InvalidRequestError("top_k", f"must be an integer, got {k!r}")
        if k < 0 or k > max_k:
            raise InvalidRequestError("top_k", f"must be in [0, {max_k}] (0 = all), got {k!r}")

        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise InvalidRequestError("top_p", f"must be a number, got {p!r}")
        if not (0.0 < float(p) <= 1.0):  # also rejects NaN
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {p!r}")

        s = self.seed
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise InvalidRequestError("seed", f"must be an integer or None, got {s!r}")
            if not 0 <= int(s) <= _UINT64_MAX:
                raise InvalidRequestError("seed", f"must be in [0, 2**64), got {s!r}")
