"""The scheduler: admission, slots, stop conditions, aborts. Pure Python + numpy, no ORT.

Requests wait in a bounded FIFO queue and are admitted into free slots at step boundaries
(continuous batching): every step runs all live slots together, new requests join the next
step, finished ones leave at once. Per-slot state lives in numpy arrays indexed by slot, so
a step's bookkeeping is a handful of vectorized operations however many requests run; Python
loops touch only requests that finish, stream, or search beams.

One step:  plan = schedule()  ->  runner.encode / runner.step  ->  update(plan, ...)
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from .beam import BeamGroup
from .errors import QueueFullError
from .requests import FinishReason, Request, RequestOutput, Strategy
from .sampler import sample_from_candidates, uniform_from_counter

# slot modes
_FREE, _GREEDY, _SAMPLE, _BEAM_LIVE, _BEAM_IDLE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class SchedulerConfig:
    # decode slots: the most rows one step runs (a beam request takes num_beams of them)
    num_slots: int = 256
    # requests waiting for a slot before new ones are refused with QueueFullError
    max_queued: int = 1024
    # new requests encoded per step: bounds the extra latency a burst adds to running ones
    max_admit_per_step: int = 256
    # the longest request: sizes the per-slot token buffers
    max_tokens: int = 64
    max_stop_tokens: int = 16


@dataclass(frozen=True)
class EncodeBatch:
    slots: np.ndarray
    users: np.ndarray
    items: np.ndarray
    requests: list  # the requests whose ratings come back, in row order


@dataclass(frozen=True)
class StepBatch:
    read_slots: np.ndarray
    write_slots: np.ndarray
    tokens: np.ndarray
    want_topk: bool


@dataclass
class StepPlan:
    encode: EncodeBatch | None = None
    write_states: tuple[np.ndarray, np.ndarray] | None = None  # (slots, states (B, H))
    step: StepBatch | None = None
    # outputs decided without running anything (aborts)
    outputs: list[RequestOutput] = field(default_factory=list)


@dataclass
class _Running:
    request: Request
    slots: np.ndarray
    admitted_at: float
    rating: float | None = None
    first_token_at: float | None = None
    beams: BeamGroup | None = None
    emitted: int = 0  # tokens already sent to a stream


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        bos_id: int,
        eos_id: int,
        clock=time.monotonic,
    ) -> None:
        self.config = config
        self.bos_id, self.eos_id = bos_id, eos_id
        self._clock = clock
        S, T = config.num_slots, config.max_tokens
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[str, _Running] = {}
        self._free = list(range(S - 1, -1, -1))  # a stack: low slots first
        self._owner: list[_Running | None] = [None] * S
        self._mode = np.zeros(S, np.int8)
        self._token = np.zeros(S, np.int64)  # the token each slot feeds at its next step
        self._read = np.arange(S, dtype=np.int64)  # where each slot's state comes from
        self._gen = np.zeros(S, np.int64)  # tokens generated so far
        self._max = np.zeros(S, np.int64)
        self._min = np.zeros(S, np.int64)
        self._temperature = np.ones(S, np.float32)
        self._top_k = np.zeros(S, np.int32)
        self._top_p = np.ones(S, np.float32)
        self._seed = np.zeros(S, np.uint64)
        self._stream = np.zeros(S, bool)
        self._want_logprobs = np.zeros(S, bool)
        self._stop = np.full((S, config.max_stop_tokens), -1, np.int64)
        self._out_tokens = np.zeros((S, T), np.int64)
        self._out_logprobs = np.zeros((S, T), np.float32)
        self._aborts: set[str] = set()

    # --- queries -------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_active_slots(self) -> int:
        return self.config.num_slots - len(self._free)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._aborts)

    # --- requests in ---------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queues a validated request; raises QueueFullError at the bound."""
        if len(self._waiting) >= self.config.max_queued:
            raise QueueFullError(f"queue full ({self.config.max_queued} waiting)")
        if request.num_slots > self.config.num_slots:
            raise ValueError(f"{request.request_id}: needs more slots than exist")
        if request.params.max_tokens > self.config.max_tokens:
            raise ValueError(f"{request.request_id}: max_tokens over the scheduler's limit")
        self._waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Marks a request for abort; applied at the next step boundary."""
        self._aborts.add(request_id)

    # --- one step ------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._apply_aborts(plan)
        self._admit(plan)
        rows = np.flatnonzero((self._mode != _FREE) & (self._mode != _BEAM_IDLE))
        if rows.size:
            modes = self._mode[rows]
            want_topk = bool(
                (modes != _GREEDY).any()
                or self._want_logprobs[rows].any()
                or (self._gen[rows] < self._min[rows]).any()
            )
            plan.step = StepBatch(self._read[rows], rows, self._token[rows], want_topk)
        return plan

    def _apply_aborts(self, plan: StepPlan) -> None:
        if not self._aborts:
            return
        aborts, self._aborts = self._aborts, set()
        kept = collections.deque()
        for request in self._waiting:
            if request.request_id in aborts:
                plan.outputs.append(self._final_output(request, None, [], None, FinishReason.ABORTED))
            else:
                kept.append(request)
        self._waiting = kept
        for request_id in aborts:
            running = self._running.get(request_id)
            if running is not None:
                if running.beams is not None:
                    tokens = running.beams.tokens[0].tolist()  # the best live beam
                else:
                    slot = running.slots[0]
                    tokens = self._out_tokens[slot, : int(self._gen[slot])].tolist()
                plan.outputs.append(
                    self._final_output(running.request, running, tokens, None, FinishReason.ABORTED)
                )
                self._release(running)

    def _admit(self, plan: StepPlan) -> None:
        enc_slots, users, items, enc_requests = [], [], [], []
        state_slots, states = [], []
        now = self._clock()
        admitted = 0
        while self._waiting and admitted < self.config.max_admit_per_step:
            request = self._waiting[0]
            if request.num_slots > len(self._free):
                break  # FIFO: a big request is not overtaken, so it cannot starve
            self._waiting.popleft()
            admitted += 1
            slots = np.array([self._free.pop() for _ in range(request.num_slots)], np.int64)
            running = _Running(request, slots, admitted_at=now)
            self._running[request.request_id] = running
            self._init_slots(running)
            if request.hidden_state is not None:
                state_slots.append(slots[0])
                states.append(request.hidden_state)
            else:
                enc_slots.append(slots[0])
                users.append(request.user_index)
                items.append(request.item_index)
                enc_requests.append(running)
        if enc_slots:
            plan.encode = EncodeBatch(
                np.array(enc_slots, np.int64), np.array(users, np.int64),
                np.array(items, np.int64), enc_requests,
            )
        if state_slots:
            plan.write_states = (np.array(state_slots, np.int64), np.stack(states).astype(np.float32))

    def _init_slots(self, running: _Running) -> None:
        request, slots = running.request, running.slots
        p = request.params
        for slot in slots:
            self._owner[slot] = running
        self._token[slots] = self.bos_id
        self._read[slots] = slots
        self._gen[slots] = 0
        self._max[slots] = p.max_tokens
        self._min[slots] = p.min_tokens
        self._stream[slots] = request.stream
        self._want_logprobs[slots] = p.return_logprobs
        self._stop[slots] = -1
        self._stop[slots, : len(p.stop_token_ids)] = p.stop_token_ids
        if p.strategy is Strategy.BEAM:
            self._mode[slots] = _BEAM_IDLE
            self._mode[slots[0]] = _BEAM_LIVE
            running.beams = BeamGroup(
                slots=slots, num_beams=p.num_beams, length_penalty=p.length_penalty,
                eos_id=self.eos_id, stop_ids=np.array(p.stop_token_ids, np.int64),
                min_tokens=p.min_tokens, max_tokens=p.max_tokens,
            )
            return
        sample = p.strategy is Strategy.SAMPLE
        self._mode[slots] = _SAMPLE if sample else _GREEDY
        self._temperature[slots] = p.sampling.temperature if sample else 0.0
        self._top_k[slots] = p.sampling.top_k
        self._top_p[slots] = p.sampling.top_p
        self._seed[slots] = np.uint64(request.seed)

    def update(
        self,
        plan: StepPlan,
        ratings: np.ndarray | None,
        next_tokens: np.ndarray | None,
        topk_logprobs: np.ndarray | None = None,
        topk_ids: np.ndarray | None = None,
    ) -> list[RequestOutput]:
        """Applies the runner's results of `plan`; returns the outputs to deliver."""
        outputs = plan.outputs
        if plan.encode is not None and ratings is not None:
            for running, rating in zip(plan.encode.requests, ratings.tolist()):
                running.rating = rating
        if plan.step is None:
            return outputs
        now = self._clock()
        rows = plan.step.write_slots
        modes = self._mode[rows]
        beam_rows = modes == _BEAM_LIVE
        flat = ~beam_rows
        if flat.any():
            outputs.extend(
                self._advance_flat(
                    rows[flat], next_tokens[flat],
                    None if topk_logprobs is None else topk_logprobs[flat],
                    None if topk_ids is None else topk_ids[flat], now,
                )
            )
        if beam_rows.any():
            outputs.extend(self._advance_beams(rows, beam_rows, topk_logprobs, topk_ids, now))
        return outputs

    def _advance_flat(self, rows, greedy_tokens, topk_logprobs, topk_ids, now) -> list[RequestOutput]:
        gen = self._gen[rows]
        tokens = greedy_tokens.astype(np.int64)
        logprobs = None
        if topk_logprobs is not None:
            logprobs = topk_logprobs[:, 0].astype(np.float32)
            # rows that sample, or must not end yet, choose among the candidates
            early = gen < self._min[rows]
            choose = (self._mode[rows] == _SAMPLE) | early
            if choose.any():
                lp, ids = topk_logprobs[choose], topk_ids[choose]
                stop = self._stop[rows[choose]]
                banned = (ids == self.eos_id) | (ids[:, :, None] == stop[:, None, :]).any(-1)
                lp = np.where(banned & early[choose][:, None], -np.inf, lp)
                uniforms = uniform_from_counter(self._seed[rows[choose]], gen[choose])
                chosen, chosen_lp = sample_from_candidates(
                    lp, ids, self._temperature[rows[choose]], self._top_k[rows[choose]],
                    self._top_p[rows[choose]], uniforms,
                )
                tokens[choose] = chosen
                logprobs[choose] = chosen_lp
        is_eos = tokens == self.eos_id
        is_stop = (tokens[:, None] == self._stop[rows]).any(1)
        ends_by_token = is_eos | is_stop
        keep = ~ends_by_token
        kept_rows = rows[keep]
        self._out_tokens[kept_rows, gen[keep]] = tokens[keep]
        if logprobs is not None:
            self._out_logprobs[kept_rows, gen[keep]] = logprobs[keep]
        self._gen[kept_rows] += 1
        self._token[kept_rows] = tokens[keep]
        at_length = keep & (self._gen[rows] >= self._max[rows])
        finished = ends_by_token | at_length
        outputs: list[RequestOutput] = []
        for i in np.flatnonzero(finished | self._stream[rows] | (gen == 0)):
            slot = int(rows[i])
            running = self._owner[slot]
            if running.first_token_at is None:
                running.first_token_at = now
            if not (finished[i] or self._stream[slot]):
                continue
            n = int(self._gen[slot])
            if finished[i]:
                reason = (
                    FinishReason.EOS if is_eos[i]
                    else FinishReason.STOP_TOKEN if is_stop[i]
                    else FinishReason.LENGTH
                )
                outputs.append(
                    self._final_output(
                        running.request, running, self._out_tokens[slot, :n].tolist(),
                        self._out_logprobs[slot, :n].tolist(), reason, delta_from=running.emitted,
                    )
                )
                self._release(running)
            elif n > running.emitted:
                outputs.append(self._delta(running, slot, n))
        return outputs

    def _delta(self, running: _Running, slot: int, n: int) -> RequestOutput:
        start, running.emitted = running.emitted, n
        want_lp = running.request.params.return_logprobs
        return RequestOutput(
            request_id=running.request.request_id,
            new_token_ids=self._out_tokens[slot, start:n].tolist(),
            new_logprobs=self._out_logprobs[slot, start:n].tolist() if want_lp else None,
            predicted_rating=running.rating,
        )

    def _advance_beams(self, rows, beam_rows, topk_logprobs, topk_ids, now) -> list[RequestOutput]:
        outputs = []
        groups: dict[str, list[int]] = {}
        for i in np.flatnonzero(beam_rows):
            groups.setdefault(self._owner[rows[i]].request.request_id, []).append(int(i))
        for request_id, indices in groups.items():
            running = self._running[request_id]
            beams = running.beams
            if running.first_token_at is None:
                running.first_token_at = now
            # rows of a group come in slot order; the group's live beams are its first slots
            order = np.argsort(rows[indices])
            idx = np.asarray(indices)[order]
            result = beams.advance(topk_logprobs[idx], topk_ids[idx])
            if result is None:
                best = beams.best()
                outputs.append(
                    self._final_output(
                        running.request, running, best.tokens, best.logprobs, best.finish_reason
                    )
                )
                self._release(running)
                continue
            read_slots, tokens = result
            live = beams.slots[: beams.num_live]
            self._mode[beams.slots] = _BEAM_IDLE
            self._mode[live] = _BEAM_LIVE
            self._read[live] = read_slots
            self._token[live] = tokens
            self._gen[live] = beams.num_generated
        return outputs

    def _final_output(
        self, request: Request, running: _Running | None, tokens: list[int],
        logprobs: list[float] | None, reason: FinishReason, delta_from: int = 0,
    ) -> RequestOutput:
        now = self._clock()
        want_lp = request.params.return_logprobs
        lps = logprobs if (want_lp and logprobs is not None) else None
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=tokens[delta_from:],
            new_logprobs=lps[delta_from:] if lps is not None else None,
            finished=True,
            finish_reason=reason,
            predicted_rating=running.rating if running else None,
            token_ids=tokens,
            logprobs=lps,
            queue_s=(running.admitted_at - request.arrival_time) if running else None,
            first_token_s=(
                running.first_token_at - request.arrival_time
                if running and running.first_token_at is not None else None
            ),
            total_s=now - request.arrival_time,
        )

    def _release(self, running: _Running) -> None:
        slots = running.slots
        self._mode[slots] = _FREE
        self._read[slots] = slots
        for slot in slots:
            self._owner[slot] = None
        self._free.extend(int(s) for s in slots[::-1])
        del self._running[running.request.request_id]
