"""The decode loops bench/serve.py's peers run over gruserve's own StepRunner (the same ORT
sessions, I/O binding and device-resident state pool as gruserve) and its sampler, so that
they differ from gruserve only in how they batch:

- decode_static: what the Triton peers' bound function does with the batch Triton's dynamic
  batcher hands it: encode every row, then step until the batch is done. `compact=False`
  steps every row until the longest is done (the plain loop); `compact=True` steps only the
  rows still running (finished rows dropped each step: the careful loop).
- the raw loop (bench/raw_loop.py) refills a finished row's slot at the next step, with no
  server around it: the ceiling continuous batching approaches.

A step runs the greedy (ArgMax) graph unless one of its rows samples, as gruserve does;
greedy rows then take the graph's ArgMax, sampled rows draw from its top-K candidates with
gruserve's counter-based RNG keyed by (request seed, tokens so far): a request's tokens do
not depend on its batch, so every system that uses this sampler picks the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gruserve.runtime.sampler import (
    GREEDY_TEMPERATURE,
    sample_from_candidates,
    uniform_from_counter,
)


@dataclass
class RowParams:
    """Per-row request parameters, arrays of shape (B,)."""

    users: np.ndarray  # int64 entity indexes
    items: np.ndarray
    lengths: np.ndarray  # int64 max_tokens
    temperature: np.ndarray  # float32; <= GREEDY_TEMPERATURE: greedy
    top_k: np.ndarray  # int32; 0: all candidates
    top_p: np.ndarray  # float32; 1.0: off
    seeds: np.ndarray  # int64 >= 0

    @property
    def sampled(self) -> np.ndarray:
        return self.temperature > GREEDY_TEMPERATURE


def step_tokens(runner, slots: np.ndarray, tokens: np.ndarray, params: RowParams,
                rows: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """One step for the given rows (slot = row): their next tokens."""
    sampled = params.sampled[rows]
    out = runner.step(slots[rows], slots[rows], tokens[rows], want_topk=bool(sampled.any()))
    if out.topk_ids is None:
        return out.next_tokens
    chosen = out.next_tokens.copy()
    idx = np.flatnonzero(sampled)
    r = rows[idx]
    chosen[idx], _ = sample_from_candidates(
        out.topk_logprobs[idx], out.topk_ids[idx], params.temperature[r], params.top_k[r],
        params.top_p[r], uniform_from_counter(params.seeds[r], counters[idx]),
    )
    return chosen


@dataclass
class StaticResult:
    tokens: np.ndarray  # (B, max length) int64, -1 after each row's end
    num_tokens: np.ndarray  # (B,) int64
    ratings: np.ndarray  # (B,) float32
    num_steps: int
    num_rows_stepped: int  # rows summed over steps: the work done


def decode_static(runner, bos: int, eos: int, params: RowParams, compact: bool) -> StaticResult:
    """Encodes the batch into slots 0..B-1 and decodes it to its end (see the module doc)."""
    batch = len(params.users)
    slots = np.arange(batch, dtype=np.int64)
    ratings = runner.encode(slots, params.users, params.items)
    max_len = int(params.lengths.max())
    out = np.full((batch, max_len), -1, dtype=np.int64)
    num = np.zeros(batch, dtype=np.int64)
    alive = params.lengths > 0
    tokens = np.full(batch, bos, dtype=np.int64)
    steps = rows_stepped = 0
    while alive.any():
        rows = np.flatnonzero(alive) if compact else slots
        nxt = step_tokens(runner, slots, tokens, params, rows, num[rows])
        steps += 1
        rows_stepped += len(rows)
        tokens[rows] = nxt
        live = alive[rows]  # the plain loop also steps finished rows; their tokens are unused
        r, t = rows[live], nxt[live]
        ended = t == eos
        kept = r[~ended]
        out[kept, num[kept]] = t[~ended]
        num[kept] += 1
        alive[r[ended]] = False
        alive[kept[num[kept] >= params.lengths[kept]]] = False
    return StaticResult(out, num, ratings, steps, rows_stepped)
