"""The runner contract: what the engine core asks of whatever runs the graphs.

`gruserve.runtime.runner.StepRunner` implements it with ONNX Runtime; tests and benchmarks
pass doubles. The engine layer imports only this module, so it never imports onnxruntime.
Every call is batch-shaped (arrays of slots, never one request), and slot states stay with
the runner: only slot ids and token ids cross, and ratings and TopK candidates come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class StepOutput:
    next_tokens: np.ndarray  # (B,) int64, the greedy choice
    topk_logprobs: np.ndarray | None = None  # (B, K) float32 (or (n, K), see topk_rows)
    topk_ids: np.ndarray | None = None  # (B, K) int64
    # None: the candidates (if any) are every row's; else a (B,) bool mask of the rows whose
    # candidates they are, in row order (a split step, see split_step)
    topk_rows: np.ndarray | None = None


def split_step(run, read_slots, write_slots, tokens, topk_rows) -> StepOutput:
    """One decode step run as two graph runs, `run(read, write, tokens, want_topk)`: the rows
    in `topk_rows` on the sampling graph, the others on the cheaper greedy (ArgMax) graph.
    The two row sets belong to different requests, so neither run reads a slot the other
    writes."""
    greedy = ~topk_rows
    cheap = run(read_slots[greedy], write_slots[greedy], tokens[greedy], False)
    rich = run(read_slots[topk_rows], write_slots[topk_rows], tokens[topk_rows], True)
    next_tokens = np.empty(len(tokens), np.int64)
    next_tokens[greedy] = cheap.next_tokens
    next_tokens[topk_rows] = rich.next_tokens
    return StepOutput(next_tokens, rich.topk_logprobs, rich.topk_ids, topk_rows=topk_rows)


@runtime_checkable
class ModelRunner(Protocol):
    @property
    def num_slots(self) -> int:
        """Slots in the state pool; slot ids are 0..num_slots-1."""

    @property
    def top_k(self) -> int:
        """K of the sampling step's candidates; 0 when there is no sampling graph."""

    @property
    def can_write_states(self) -> bool:
        """Whether write_states works (the bundle has a state-writer graph)."""

    @property
    def head_top_k(self) -> int:
        """K of candidates(); 0 when the runner cannot read candidates without stepping."""

    def candidates(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The TopK candidates, (B, K) log-probs and ids, of the states now in `slots`:
        no step, nothing written. For greedy rows whose ArgMax token would end them before
        min_tokens (rare), so that they need not run the TopK graph every step."""

    def encode(self, slots: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Writes each (user, item)'s initial state into its slot; returns ratings (B,)."""

    def rate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The encoder's ratings (B,) float32 of B (user, item) pairs, and nothing else: no
        slot is written. Called from a thread other than the decode thread's, and possibly
        while a step runs; the engine keeps B within its rating chunk size."""

    def write_states(self, slots: np.ndarray, states: np.ndarray) -> None:
        """Writes caller-given initial states (B, H) into slots."""

    def step(
        self,
        read_slots: np.ndarray,
        write_slots: np.ndarray,
        tokens: np.ndarray,
        want_topk: bool = False,
        topk_rows: np.ndarray | None = None,
    ) -> StepOutput:
        """One decode step for B rows: each row's state from read_slots[i], fed tokens[i],
        its new state into write_slots[i]; TopK candidates only when want_topk, and then
        only for the rows of the `topk_rows` mask when one is given (split_step does that
        for any runner)."""
