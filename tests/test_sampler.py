"""Tests for gruserve.runtime.sampler (pure numpy, fast)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from gruserve.runtime.sampler import (
    GREEDY_TEMPERATURE,
    SamplingParams,
    sample_from_candidates,
    suppress_token,
    uniform_from_counter,
)

VOCAB = 500
K = 16
EOS = 2


def make_candidates(batch: int, seed: int = 0, k: int = K, scale: float = 2.0):
    """What the step graph returns: top-K of a vocab-sized log-softmax, sorted descending."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, VOCAB)) * scale
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k].astype(np.int64)
    lps = np.take_along_axis(logp, ids, axis=1).astype(np.float32)
    return lps, ids


def params(batch, temperature=1.0, top_k=0, top_p=1.0):
    return (
        np.full(batch, temperature, dtype=np.float32),
        np.full(batch, top_k, dtype=np.int32),
        np.full(batch, top_p, dtype=np.float32),
    )


# --- reference implementations (straightforward, per row, pure Python) ---------------------

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def ref_mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def ref_uniform(seed: int, counter: int) -> float:
    key = ref_mix64((seed + _GAMMA) & _M64)
    x = ref_mix64((key + (counter + 1) * _GAMMA) & _M64)
    return (x >> 11) / 2.0**53


def ref_distribution(lp_row, id_row, temperature, top_k, top_p) -> dict[int, float]:
    """Sampling distribution over token ids for one row, from first principles."""
    cands = [(float(lp), int(i)) for lp, i in zip(lp_row, id_row, strict=True) if math.isfinite(lp)]
    cands.sort(key=lambda c: -c[0])
    if top_k > 0:
        cands = cands[:top_k]
    weights = [math.exp(lp / temperature) for lp, _ in cands]
    total = sum(weights)
    probs = [w / total for w in weights]
    kept, cum = [], 0.0
    for p, (_, tok) in zip(probs, cands, strict=True):
        kept.append((tok, p))
        cum += p
        if cum >= top_p:
            break
    total = sum(p for _, p in kept)
    return {tok: p / total for tok, p in kept}


# --- uniform_from_counter -------------------------------------------------------------------


def test_uniform_matches_reference_splitmix64():
    seeds = np.array([0, 1, 42, 2**63, 2**64 - 1, 123456789], dtype=np.uint64)
    counters = np.array([0, 1, 7, 2**40, 5, 2**63 - 1], dtype=np.int64)
    got = uniform_from_counter(seeds, counters)
    want = [ref_uniform(int(s), int(c)) for s, c in zip(seeds, counters, strict=True)]
    assert got.dtype == np.float64 and got.shape == (6,)
    assert got.tolist() == want


def test_uniform_range_53_bits_and_no_overflow_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wraparound must not warn, arrays or scalars
        u = uniform_from_counter(
            np.full(100_000, 7, dtype=np.uint64), np.arange(100_000, dtype=np.uint64)
        )
        scalar = uniform_from_counter(np.uint64(2**64 - 1), np.int64(3))
    assert float(scalar) == ref_uniform(2**64 - 1, 3)
    assert (u >= 0.0).all() and (u < 1.0).all()
    scaled = u * 2.0**53
    assert np.array_equal(scaled, np.floor(scaled))  # exactly k / 2^53
    assert (scaled.astype(np.int64) & 1).any()  # the lowest of the 53 bits is used
    assert len(np.unique(u)) == len(u)


@pytest.mark.parametrize(
    "seeds,counters",
    [
        (np.full(100_000, 2024, dtype=np.uint64), np.arange(100_000)),  # one stream
        (np.arange(100_000, dtype=np.uint64), np.zeros(100_000, dtype=np.int64)),  # across seeds
    ],
)
def test_uniform_roughly_uniform(seeds, counters):
    u = uniform_from_counter(seeds, counters)
    n, buckets = len(u), 100
    assert abs(u.mean() - 0.5) < 0.005  # sd of the mean ~ 0.0009
    assert abs(u.var() - 1 / 12) < 0.002
    counts = np.bincount((u * buckets).astype(np.int64), minlength=buckets)
    expected = n / buckets
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 200  # 99 dof: mean 99, sd ~14; a broken generator is far beyond
    # consecutive draws are not correlated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02


def test_uniform_independent_of_batch_position():
    rng = np.random.default_rng(1)
    seeds = rng.integers(0, 2**63, size=64, dtype=np.uint64)
    counters = rng.integers(0, 1000, size=64)
    base = uniform_from_counter(seeds, counters)
    perm = rng.permutation(64)
    assert np.array_equal(uniform_from_counter(seeds[perm], counters[perm]), base[perm])
    for i in (0, 17, 63):
        alone = uniform_from_counter(seeds[i : i + 1], counters[i : i + 1])
        assert alone[0] == base[i]
    doubled = uniform_from_counter(np.tile(seeds, 2), np.tile(counters, 2))
    assert np.array_equal(doubled, np.tile(base, 2))


def test_uniform_differs_across_seeds_and_counters():
    a = uniform_from_counter(np.full(1000, 5, dtype=np.uint64), np.arange(1000))
    b = uniform_from_counter(np.full(1000, 6, dtype=np.uint64), np.arange(1000))
    assert not np.isclose(a, b).any()
    # seed s at counter c+1 vs seed s+GAMMA at counter c: decorrelated by hashing the seed
    c = uniform_from_counter(np.full(999, (5 + _GAMMA) & _M64, dtype=np.uint64), np.arange(999))
    assert not np.isclose(a[1:], c).any()


def test_uniform_rejects_negative_and_non_integer_inputs():
    with pytest.raises(ValueError, match="counters"):
        uniform_from_counter(np.array([1], dtype=np.uint64), np.array([-1]))
    with pytest.raises(ValueError, match="seeds"):
        uniform_from_counter(np.array([-3]), np.array([0]))
    with pytest.raises(ValueError, match="seeds"):
        uniform_from_counter(np.array([0.5]), np.array([0]))


# --- sample_from_candidates -----------------------------------------------------------------


def test_greedy_at_tiny_temperature():
    lps, ids = make_candidates(32)
    for t in (1e-7, GREEDY_TEMPERATURE, 0.0):
        temp, top_k, top_p = params(32, temperature=t)
        for u in (0.0, 0.3, 0.999999):
            tok, lp = sample_from_candidates(lps, ids, temp, top_k, top_p, np.full(32, u))
            assert np.array_equal(tok, ids[:, 0])
            assert np.array_equal(lp, lps[:, 0])
    # just above the greedy threshold the tempered distribution is already a point mass
    temp, top_k, top_p = params(32, temperature=1e-4)
    tok, _ = sample_from_candidates(lps, ids, temp, top_k, top_p, np.full(32, 0.999))
    assert np.array_equal(tok, ids[:, 0])


def test_top_k_one_is_argmax():
    lps, ids = make_candidates(16, scale=0.3)  # flat: sampling would usually not pick col 0
    temp, top_k, top_p = params(16, temperature=5.0, top_k=1)
    for u in np.linspace(0, 1, 50, endpoint=False):
        tok, _ = sample_from_candidates(lps, ids, temp, top_k, top_p, np.full(16, u))
        assert np.array_equal(tok, ids[:, 0])
    # sanity: without top_k the same inputs do pick other columns
    temp, top_k, top_p = params(16, temperature=5.0)
    tok, _ = sample_from_candidates(lps, ids, temp, top_k, top_p, np.full(16, 0.9))
    assert not np.array_equal(tok, ids[:, 0])


def test_tiny_top_p_is_argmax():
    lps, ids = make_candidates(16, scale=0.3)
    temp, top_k, top_p = params(16, temperature=2.0, top_p=1e-6)
    for u in np.linspace(0, 1, 50, endpoint=False):
        tok, _ = sample_from_candidates(lps, ids, temp, top_k, top_p, np.full(16, u))
        assert np.array_equal(tok, ids[:, 0])


def test_top_k_restricts_support():
    lps, ids = make_candidates(8, scale=0.3)
    temp, top_k, top_p = params(8, temperature=3.0, top_k=4)
    u = np.linspace(0, 1, 400, endpoint=False)
    for row in range(8):
        tok, _ = sample_from_candidates(
            np.repeat(lps[row : row + 1], 400, 0),
            np.repeat(ids[row : row + 1], 400, 0),
            temp[:1].repeat(400),
            top_k[:1].repeat(400),
            top_p[:1].repeat(400),
            u,
        )
        assert set(tok.tolist()) == set(ids[row, :4].tolist())


ROW_PARAMS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.5, 5, 1.0),
    (1.0, 0, 0.8),
    (2.0, 8, 0.6),
    (0.5, 3, 0.95),
    (1.0, 100, 1.0),  # top_k above K: all candidates
]


def _expand(lps, ids, row_params, n):
    """Replicate each row n times with its params: one big batch call covers every draw."""
    b = len(row_params)
    temp = np.repeat(np.array([p[0] for p in row_params], dtype=np.float32), n)
    top_k = np.repeat(np.array([p[1] for p in row_params], dtype=np.int32), n)
    top_p = np.repeat(np.array([p[2] for p in row_params], dtype=np.float32), n)
    return np.repeat(lps[:b], n, 0), np.repeat(ids[:b], n, 0), temp, top_k, top_p


def _check_frequencies(tok, lps, ids, row_params, n, tol):
    for r, (t, k, p) in enumerate(row_params):
        want = ref_distribution(lps[r], ids[r], t, k, np.float32(p))
        chosen = tok[r * n : (r + 1) * n]
        assert set(chosen.tolist()) <= set(want), f"row {r}: token outside the kept set"
        for token, prob in want.items():
            freq = float(np.mean(chosen == token))
            assert abs(freq - prob) <= tol(prob), (r, token, freq, prob)


def test_inverse_cdf_on_a_uniform_grid_is_exact():
    """With u on a regular grid, the counts equal n * prob up to one grid cell per token."""
    lps, ids = make_candidates(len(ROW_PARAMS), seed=3, scale=0.8)
    n = 4000
    lp_b, id_b, temp, top_k, top_p = _expand(lps, ids, ROW_PARAMS, n)
    u = np.tile((np.arange(n) + 0.5) / n, len(ROW_PARAMS))
    tok, _ = sample_from_candidates(lp_b, id_b, temp, top_k, top_p, u)
    _check_frequencies(tok, lps, ids, ROW_PARAMS, n, tol=lambda p: 1.5 / n)


def test_empirical_frequencies_match_reference_distribution():
    lps, ids = make_candidates(len(ROW_PARAMS), seed=4, scale=0.8)
    n = 20_000
    lp_b, id_b, temp, top_k, top_p = _expand(lps, ids, ROW_PARAMS, n)
    seeds = np.repeat(np.arange(len(ROW_PARAMS), dtype=np.uint64) + 99, n)
    counters = np.tile(np.arange(n), len(ROW_PARAMS))
    u = uniform_from_counter(seeds, counters)
    tok, _ = sample_from_candidates(lp_b, id_b, temp, top_k, top_p, u)
    # 5 standard deviations of a binomial proportion, plus a small floor
    _check_frequencies(
        tok, lps, ids, ROW_PARAMS, n, tol=lambda p: 5 * math.sqrt(p * (1 - p) / n) + 1e-3
    )


def _mixed_batch(b=24, seed=5):
    rng = np.random.default_rng(seed)
    lps, ids = make_candidates(b, seed=seed, scale=0.8)
    temp = rng.choice([1e-7, 0.5, 1.0, 1.7], size=b).astype(np.float32)
    top_k = rng.choice([0, 1, 3, 10], size=b).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5], size=b).astype(np.float32)
    u = uniform_from_counter(rng.integers(0, 2**63, size=b, dtype=np.uint64), np.arange(b))
    return lps, ids, temp, top_k, top_p, u


def test_row_result_independent_of_other_rows():
    lps, ids, temp, top_k, top_p, u = _mixed_batch()
    b = len(u)
    tok, lp = sample_from_candidates(lps, ids, temp, top_k, top_p, u)
    perm = np.random.default_rng(0).permutation(b)
    tok_p, lp_p = sample_from_candidates(
        lps[perm], ids[perm], temp[perm], top_k[perm], top_p[perm], u[perm]
    )
    assert np.array_equal(tok_p, tok[perm]) and np.array_equal(lp_p, lp[perm])
    dup = np.concatenate([np.arange(b), np.arange(b)[::-1]])
    tok_d, _ = sample_from_candidates(lps[dup], ids[dup], temp[dup], top_k[dup], top_p[dup], u[dup])
    assert np.array_equal(tok_d, tok[dup])
    for i in range(b):
        s = slice(i, i + 1)
        tok_1, lp_1 = sample_from_candidates(lps[s], ids[s], temp[s], top_k[s], top_p[s], u[s])
        assert tok_1[0] == tok[i] and lp_1[0] == lp[i]


def test_same_seed_and_counter_give_same_token():
    lps, ids = make_candidates(1, seed=6, scale=0.5)
    temp, top_k, top_p = params(1, temperature=1.3)

    def decode(seed, steps=40):
        out = []
        for step in range(steps):
            u = uniform_from_counter(np.array([seed], dtype=np.uint64), np.array([step]))
            tok, _ = sample_from_candidates(lps, ids, temp, top_k, top_p, u)
            out.append(int(tok[0]))
        return out

    assert decode(11) == decode(11)
    assert decode(11) != decode(12)
    # the same (seed, counter) placed at another batch row in a bigger batch
    big_lps, big_ids = make_candidates(5, seed=7, scale=0.5)
    big_lps[3], big_ids[3] = lps[0], ids[0]
    seeds = np.array([1, 2, 3, 11, 4], dtype=np.uint64)
    bt, bk, bp = params(5, temperature=1.3)
    seq = decode(11, steps=10)
    for step in range(10):
        u = uniform_from_counter(seeds, np.full(5, step))
        tok, _ = sample_from_candidates(big_lps, big_ids, bt, bk, bp, u)
        assert tok[3] == seq[step]


def test_suppressed_token_never_chosen():
    lps, ids = make_candidates(6, seed=8, scale=0.5)
    ids[:, 0] = EOS  # <eos> is the most likely token in every row
    ids[:, 1:] = np.where(ids[:, 1:] == EOS, VOCAB + 1, ids[:, 1:])
    rows = np.array([True, True, True, True, False, False])
    before = lps.copy()
    masked = suppress_token(lps, ids, EOS, rows)
    assert np.array_equal(lps, before)  # input untouched
    assert np.isneginf(masked[:4, 0]).all() and np.isfinite(masked[4:]).all()
    assert masked.dtype == lps.dtype

    temp = np.array([1e-7, 1.0, 1.0, 2.0, 1e-7, 1.0], dtype=np.float32)
    top_k = np.array([0, 1, 0, 3, 0, 1], dtype=np.int32)
    top_p = np.array([1.0, 1.0, 1e-6, 0.9, 1.0, 1.0], dtype=np.float32)
    for u in np.linspace(0, 1, 200, endpoint=False):
        tok, lp = sample_from_candidates(masked, ids, temp, top_k, top_p, np.full(6, u))
        assert (tok[:4] != EOS).all()
        assert (tok[4:] == EOS).all()  # unsuppressed greedy / top_k=1 rows still pick it
        assert np.isfinite(lp).all()
    # greedy, top_k=1 and tiny top_p skip to the best allowed candidate (column 1)
    tok, _ = sample_from_candidates(masked, ids, temp, top_k, top_p, np.full(6, 0.99))
    assert np.array_equal(tok[:3], ids[:3, 1])


def test_suppressed_token_mid_list_and_nan_never_chosen():
    lps, ids = make_candidates(1, seed=9, scale=0.2)
    target = int(ids[0, 3])
    masked = suppress_token(lps, ids, target, np.array([True]))
    masked[0, 5] = np.nan
    temp, top_k, top_p = params(1, temperature=3.0)
    seen = set()
    for u in np.linspace(0, 1, 2000, endpoint=False):
        tok, _ = sample_from_candidates(masked, ids, temp, top_k, top_p, np.array([u]))
        seen.add(int(tok[0]))
    assert target not in seen and int(ids[0, 5]) not in seen
    assert seen == set(ids[0].tolist()) - {target, int(ids[0, 5])}


def test_all_candidates_suppressed_picks_column_zero():
    lps, ids = make_candidates(3)
    masked = np.full_like(lps, -np.inf)
    masked[2] = lps[2]
    temp = np.array([1.0, 1e-7, 1.0], dtype=np.float32)
    tok, lp = sample_from_candidates(
        masked, ids, temp, np.zeros(3, np.int32), np.ones(3, np.float32), np.full(3, 0.7)
    )
    assert tok[0] == ids[0, 0] and tok[1] == ids[1, 0]
    assert np.isneginf(lp[:2]).all() and np.isfinite(lp[2])


def test_chosen_logprob_is_model_logprob():
    lps, ids, temp, top_k, top_p = (
        *make_candidates(64, seed=10, scale=0.5),
        *params(64, temperature=2.5, top_p=0.9),
    )
    u = uniform_from_counter(np.arange(64, dtype=np.uint64), np.zeros(64, np.int64))
    tok, lp = sample_from_candidates(lps, ids, temp, top_k, top_p, u)
    assert tok.dtype == np.int64 and lp.dtype == np.float32
    assert not np.array_equal(tok, ids[:, 0])  # some rows did not pick column 0
    for r in range(64):
        col = int(np.flatnonzero(ids[r] == tok[r])[0])
        assert lp[r] == lps[r, col]  # raw value, not tempered or renormalized


def test_extreme_uniforms_stay_in_kept_set():
    lps, ids = make_candidates(4, scale=0.3)
    temp, top_k, top_p = params(4, temperature=1.0, top_k=5, top_p=0.7)
    for u in (0.0, np.nextafter(1.0, 0.0)):
        tok, _ = sample_from_candidates(lps, ids, temp, top_k, top_p, np.full(4, u))
        for r in range(4):
            assert tok[r] in ref_distribution(lps[r], ids[r], 1.0, 5, np.float32(0.7))


def test_shape_errors():
    lps, ids = make_candidates(4)
    temp, top_k, top_p = params(4)
    with pytest.raises(ValueError, match="topk_ids"):
        sample_from_candidates(lps, ids[:, :3], temp, top_k, top_p, np.zeros(4))
    with pytest.raises(ValueError, match="top_p"):
        sample_from_candidates(lps, ids, temp, top_k, top_p[:3], np.zeros(4))
    with pytest.raises(ValueError, match="rows"):
        suppress_token(lps, ids, EOS, np.ones(3, bool))


# --- SamplingParams -------------------------------------------------------------------------


def test_sampling_params_defaults_valid_and_frozen():
    p = SamplingParams()
    p.validate(max_k=64)
    SamplingParams(temperature=1e-9, top_k=64, top_p=1.0, seed=2**64 - 1).validate(64)
    SamplingParams(top_p=1e-9, seed=0).validate(64)
    assert SamplingParams(temperature=1e-7).is_greedy and not p.is_greedy
    with pytest.raises(AttributeError):
        p.temperature = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 65}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_sampling_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs).validate(max_k=64)
