"""The persistent batch: one row per decode slot, as numpy arrays indexed by slot.

A slot holds one sequence (a request, or one beam of a beam request) for its whole life:
what it feeds next, where its state is read from, how far it has got, its decoding
parameters and its output so far. Rows are written when a request is admitted and reset
when it is released; a step's bookkeeping is then a few vectorized operations over the rows
it ran, however many requests share it. The scheduling policy lives in the scheduler; this
class only keeps the rows, the free list and who owns each slot.
"""

from __future__ import annotations

import numpy as np

from .requests import Request, Strategy

# what a slot is doing
FREE, GREEDY, SAMPLE, BEAM_LIVE, BEAM_IDLE = 0, 1, 2, 3, 4


class SlotTable:
    def __init__(self, num_slots: int, max_tokens: int, max_stop_tokens: int) -> None:
        S, T = num_slots, max_tokens
        self.num_slots = num_slots
        self._free = list(range(S - 1, -1, -1))  # a stack: low slots first
        self.owner: list[object | None] = [None] * S  # the scheduler's record of the request
        self.mode = np.zeros(S, np.int8)
        self.next_token = np.zeros(S, np.int64)  # the token the slot feeds at its next step
        self.read_slot = np.arange(S, dtype=np.int64)  # where its state comes from (beams)
        self.num_generated = np.zeros(S, np.int64)
        self.max_tokens = np.zeros(S, np.int64)
        self.min_tokens = np.zeros(S, np.int64)
        # sampling parameters; greedy rows keep temperature 0 (they choose among the TopK
        # candidates only while <eos> is suppressed, i.e. before min_tokens)
        self.temperature = np.zeros(S, np.float32)
        self.top_k = np.zeros(S, np.int32)
        self.top_p = np.ones(S, np.float32)
        self.seed = np.zeros(S, np.uint64)
        self.streams = np.zeros(S, bool)
        self.wants_logprobs = np.zeros(S, bool)
        self.has_stop_ids = np.zeros(S, bool)
        self.stop_ids = np.full((S, max(max_stop_tokens, 1)), -1, np.int64)  # -1: no id
        self.rating = np.full(S, np.nan)  # NaN: a raw-state request has none
        self.first_token_at = np.full(S, np.nan)
        self.beam_index = np.zeros(S, np.int64)  # a beam slot's position in its group
        self.out_tokens = np.zeros((S, T), np.int64)
        self.out_logprobs = np.zeros((S, T), np.float32)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_active(self) -> int:
        return self.num_slots - len(self._free)

    def live_rows(self) -> np.ndarray:
        """The slots the next step runs: flat requests and live beams."""
        mode = self.mode
        return np.flatnonzero((mode == GREEDY) | (mode == SAMPLE) | (mode == BEAM_LIVE))

    def take(self, num: int, owner: object) -> np.ndarray:
        """Takes `num` free slots (sorted) for `owner`; the caller checked they exist."""
        if num == 1:
            slots = np.array((self._free.pop(),), np.int64)
        else:
            slots = np.sort(np.array([self._free.pop() for _ in range(num)], np.int64))
        for slot in slots.tolist():
            self.owner[slot] = owner
        return slots

    def start(self, slots: np.ndarray, requests: list[Request], bos_id: int) -> None:
        """Writes the rows of newly admitted sequences (one slot each, or a beam group's
        slots with its request repeated): everything but mode and sampling parameters."""
        params = [r.params for r in requests]
        self.next_token[slots] = bos_id
        self.read_slot[slots] = slots
        self.num_generated[slots] = 0
        self.max_tokens[slots] = [p.max_tokens for p in params]
        self.min_tokens[slots] = [p.min_tokens for p in params]
        self.streams[slots] = [r.stream for r in requests]
        self.wants_logprobs[slots] = [p.return_logprobs for p in params]
        self.rating[slots] = np.nan
        self.first_token_at[slots] = np.nan
        self.stop_ids[slots] = -1
        has_stop = [bool(p.stop_token_ids) for p in params]
        self.has_stop_ids[slots] = has_stop
        if any(has_stop):
            for slot, p in zip(slots.tolist(), params, strict=True):
                self.stop_ids[slot, : len(p.stop_token_ids)] = p.stop_token_ids

    def start_flat(self, slots: np.ndarray, requests: list[Request], bos_id: int) -> None:
        """Rows of greedy and sampling requests, one slot each."""
        self.start(slots, requests, bos_id)
        sample = [r.params.strategy is Strategy.SAMPLE for r in requests]
        self.mode[slots] = np.where(sample, SAMPLE, GREEDY)
        self.temperature[slots] = 0.0
        self.top_k[slots] = 0
        self.top_p[slots] = 1.0
        self.seed[slots] = 0
        if any(sample):
            for slot, r, s in zip(slots.tolist(), requests, sample, strict=True):
                if s:
                    sp = r.params.sampling
                    self.temperature[slot] = sp.temperature
                    self.top_k[slot] = sp.top_k
                    self.top_p[slot] = sp.top_p
                    self.seed[slot] = np.uint64(r.seed)

    def start_beams(self, slots: np.ndarray, request: Request, bos_id: int) -> None:
        """Rows of a beam group: beam 0 runs first, the others wait for the first step."""
        self.start(slots, [request] * len(slots), bos_id)
        self.streams[slots] = False  # beams deliver their final result only
        self.mode[slots] = BEAM_IDLE
        self.mode[slots[0]] = BEAM_LIVE
        self.beam_index[slots] = np.arange(len(slots))

    def release(self, slots: np.ndarray) -> None:
        """Frees slots at once (the next schedule can admit into them) and resets the rows
        whose stale values a step could read."""
        for slot in slots.tolist():
            self.owner[slot] = None
        self._free.extend(slots[::-1].tolist())
        self.mode[slots] = FREE
        self.read_slot[slots] = slots
        self.streams[slots] = False
        self.wants_logprobs[slots] = False
        self.has_stop_ids[slots] = False
        self.min_tokens[slots] = 0
