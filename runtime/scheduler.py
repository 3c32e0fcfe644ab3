"""The scheduler: admission, slots, stop conditions, aborts. Pure Python + numpy, no ORT.

Requests wait in a bounded FIFO queue and are admitted into free slots at step boundaries
(continuous batching): every step runs all live slots together, new requests join the next
step, finished ones leave at once. Per-slot state lives in numpy arrays indexed by slot, so
a step's bookkeeping is a handful of vectorized operations however many requests run; Python
loops touch only requests that are admitted, finish, stream, or search beams.

One step:  plan = schedule()  ->  runner.encode / write_states / step  ->  update(plan, ...)
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from .beam import BeamGroup
from .errors import InvalidRequestError, QueueFullError
from .requests import FinishReason, Request, RequestOutput, Strategy
from .sampler import sample_from_candidates, uniform_from_counter

# slot modes
_FREE, _GREEDY, _SAMPLE, _BEAM_LIVE, _BEAM_IDLE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class SchedulerConfig:
    # decode slots in the device state pool (a beam request takes num_beams of them)
    num_slots: int = 256
    # slots in use at once, i.e. the most rows one step runs; 0 = num_slots
    max_batch_size: int = 0
    # requests waiting for a slot before new ones are refused with QueueFullError
    max_queued: int = 1024
    # new requests encoded per step: bounds the extra latency a burst adds to running ones
    max_admit_per_step: int = 256
    # the longest request: sizes the per-slot token buffers
    max_tokens: int = 64
    max_stop_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_queued", "max_admit_per_step", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive")
        if not 0 <= self.max_batch_size <= self.num_slots:
            raise ValueError("SchedulerConfig.max_batch_size must be in 0..num_slots")
        if self.max_stop_tokens < 0:
            raise ValueError("SchedulerConfig.max_stop_tokens must be >= 0")

    @property
    def batch_limit(self) -> int:
        return self.max_batch_size or self.num_slots


@dataclass(frozen=True)
class EncodeBatch:
    slots: np.ndarray  # (B,) int64
    users: np.ndarray  # (B,) int64
    items: np.ndarray  # (B,) int64
    request_ids: tuple[str, ...]  # row order


@dataclass(frozen=True)
class StepBatch:
    read_slots: np.ndarray  # (B,) where each row's state comes from
    write_slots: np.ndarray  # (B,) where it goes; differs from read_slots for reordered beams
    tokens: np.ndarray  # (B,) the token each row feeds
    want_topk: bool  # some row samples, searches beams, wants log-probs or suppresses <eos>


@dataclass
class StepPlan:
    encode: EncodeBatch | None = None
    write_states: tuple[np.ndarray, np.ndarray] | None = None  # (slots (B,), states (B, H))
    step: StepBatch | None = None
    # outputs decided without running anything (aborts)
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def num_admitted(self) -> int:
        encoded = 0 if self.encode is None else int(self.encode.slots.size)
        written = 0 if self.write_states is None else int(self.write_states[0].size)
        return encoded + written


@dataclass
class _Running:
    request: Request
    slots: np.ndarray  # sorted; slots[0] is the request's own row (beam 0 for beams)
    admitted_at: float
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
        self._known: dict[str, Request] = {}  # waiting or running, by id
        self._running: dict[str, _Running] = {}
        self._free = list(range(S - 1, -1, -1))  # a stack: low slots first
        self._owner: list[_Running | None] = [None] * S
        self._mode = np.zeros(S, np.int8)
        self._token = np.zeros(S, np.int64)  # the token each slot feeds at its next step
        self._read = np.arange(S, dtype=np.int64)  # where each slot's state comes from
        self._gen = np.zeros(S, np.int64)  # tokens generated so far
        self._max = np.zeros(S, np.int64)
        self._min = np.zeros(S, np.int64)
        self._temperature = np.zeros(S, np.float32)
        self._top_k = np.zeros(S, np.int32)
        self._top_p = np.ones(S, np.float32)
        self._seed = np.zeros(S, np.uint64)
        self._stream = np.zeros(S, bool)
        self._want_logprobs = np.zeros(S, bool)
        self._has_stop = np.zeros(S, bool)
        self._stop = np.full((S, max(config.max_stop_tokens, 1)), -1, np.int64)
        self._rating = np.full(S, np.nan)
        self._first_token_at = np.full(S, np.nan)
        self._beam_index = np.zeros(S, np.int64)  # a beam slot's position in its group
        self._out_tokens = np.zeros((S, T), np.int64)
        self._out_logprobs = np.zeros((S, T), np.float32)
        self._aborts: set[str] = set()
        self.num_tokens_last_step = 0  # tokens appended by the last update (stats)

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

    def get_request(self, request_id: str) -> Request | None:
        """The waiting or running request with this id, None if there is none."""
        return self._known.get(request_id)

    def running_slots(self, request_id: str) -> np.ndarray | None:
        """The slots a running request holds (a copy), None if it is not running."""
        running = self._running.get(request_id)
        return None if running is None else running.slots.copy()

    # --- requests in ---------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queues a validated request; raises QueueFullError at the bound."""
        if request.request_id in self._known:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already queued")
        if request.num_slots > self.config.batch_limit:
            raise InvalidRequestError(
                "num_beams",
                f"needs {request.num_slots} slots, the limit is {self.config.batch_limit}",
            )
        if request.params.max_tokens > self.config.max_tokens:
            raise InvalidRequestError("max_tokens", f"over the limit {self.config.max_tokens}")
        if len(request.params.stop_token_ids) > self.config.max_stop_tokens:
            raise InvalidRequestError("stop_token_ids", f"at most {self.config.max_stop_tokens}")
        if len(self._waiting) >= self.config.max_queued:
            raise QueueFullError(f"queue full ({self.config.max_queued} waiting)")
        self._waiting.append(request)
        self._known[request.request_id] = request

    def abort(self, request_id: str) -> None:
        """Marks a waiting or running request for abort, applied at the next schedule();
        unknown (e.g. already finished) ids are ignored."""
        if request_id in self._known:
            self._aborts.add(request_id)

    # --- one step ------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Applies aborts, admits waiting requests into free slots, and plans the step."""
        plan = StepPlan()
        if self._aborts:
            self._apply_aborts(plan)
        if self._waiting:
            self._admit(plan)
        mode = self._mode
        rows = np.flatnonzero((mode == _GREEDY) | (mode == _SAMPLE) | (mode == _BEAM_LIVE))
        if rows.size:
            want_topk = bool(
                (mode[rows] != _GREEDY).any()
                or self._want_logprobs[rows].any()
                or (self._gen[rows] < self._min[rows]).any()
            )
            plan.step = StepBatch(self._read[rows], rows, self._token[rows], want_topk)
        return plan

    def _apply_aborts(self, plan: StepPlan) -> None:
        aborts, self._aborts = self._aborts, set()
        if any(r.request_id in aborts for r in self._waiting):
            kept: collections.deque[Request] = collections.deque()
            for request in self._waiting:
                if request.request_id in aborts:
                    del self._known[request.request_id]
                    plan.outputs.append(self._output(request, None, [], [], FinishReason.ABORTED))
                else:
                    kept.append(request)
            self._waiting = kept
        for request_id in aborts:
            running = self._running.get(request_id)
            if running is None:
                continue
            if running.beams is not None:  # the best live beam so far
                tokens = running.beams.tokens[0].tolist()
                logprobs = running.beams.logprobs[0].tolist()
            else:
                slot, n = running.slots[0], int(self._gen[running.slots[0]])
                tokens = self._out_tokens[slot, :n].tolist()
                logprobs = self._out_logprobs[slot, :n].tolist()
            plan.outputs.append(
                self._output(running.request, running, tokens, logprobs, FinishReason.ABORTED)
            )
            self._release(running)

    def _admit(self, plan: StepPlan) -> None:
        """FIFO admission: a request that does not fit blocks those behind it, so a big
        (beam) request is never overtaken and cannot starve."""
        now = self._clock()
        limit = self.config.batch_limit
        flat_slots: list[int] = []
        flat_requests: list[Request] = []
        enc_slots, users, items, enc_ids = [], [], [], []
        state_slots, states = [], []
        admitted = 0
        while self._waiting and admitted < self.config.max_admit_per_step:
            request = self._waiting[0]
            need = request.num_slots
            if need > len(self._free) or self.num_active_slots + need > limit:
                break
            self._waiting.popleft()
            admitted += 1
            if need == 1:
                slots = np.array((self._free.pop(),), np.int64)
            else:
                slots = np.sort(np.array([self._free.pop() for _ in range(need)], np.int64))
            running = _Running(request, slots, admitted_at=now)
            self._running[request.request_id] = running
            for slot in slots.tolist():
                self._owner[slot] = running
            if request.params.strategy is Strategy.BEAM:
                self._init_beam(running)
            else:
                flat_slots.append(int(slots[0]))
                flat_requests.append(request)
            if request.hidden_state is not None:
                state_slots.append(int(slots[0]))
                states.append(request.hidden_state)
            else:
                enc_slots.append(int(slots[0]))
                users.append(request.user_index)
                items.append(request.item_index)
                enc_ids.append(request.request_id)
        if flat_requests:
            self._init_flat(np.array(flat_slots, np.int64), flat_requests)
        if enc_slots:
            plan.encode = EncodeBatch(
                np.array(enc_slots, np.int64), np.array(users, np.int64),
                np.array(items, np.int64), tuple(enc_ids),
            )
        if state_slots:
            plan.write_states = (
                np.array(state_slots, np.int64), np.stack(states).astype(np.float32, copy=False)
            )

    def _init_common(self, slots: np.ndarray, requests: list[Request]) -> None:
        params = [r.params for r in requests]
        self._token[slots] = self.bos_id
        self._read[slots] = slots
        self._gen[slots] = 0
        self._max[slots] = [p.max_tokens for p in params]
        self._min[slots] = [p.min_tokens for p in params]
        self._stream[slots] = [r.stream for r in requests]
        self._want_logprobs[slots] = [p.return_logprobs for p in params]
        self._rating[slots] = np.nan
        self._first_token_at[slots] = np.nan
        self._stop[slots] = -1
        has_stop = [bool(p.stop_token_ids) for p in params]
        self._has_stop[slots] = has_stop
        if any(has_stop):
            for slot, p in zip(slots.tolist(), params, strict=True):
                self._stop[slot, : len(p.stop_token_ids)] = p.stop_token_ids

    def _init_flat(self, slots: np.ndarray, requests: list[Request]) -> None:
        self._init_common(slots, requests)
        sample = [r.params.strategy is Strategy.SAMPLE for r in requests]
        self._mode[slots] = np.where(sample, _SAMPLE, _GREEDY)
        # greedy rows choose with temperature 0 when <eos> is suppressed (min_tokens)
        self._temperature[slots] = 0.0
        self._top_k[slots] = 0
        self._top_p[slots] = 1.0
        self._seed[slots] = 0
        if any(sample):
            for slot, r, s in zip(slots.tolist(), requests, sample, strict=True):
                if s:
                    sp = r.params.sampling
                    self._temperature[slot] = sp.temperature
                    self._top_k[slot] = sp.top_k
                    self._top_p[slot] = sp.top_p
                    self._seed[slot] = np.uint64(r.seed)

    def _init_beam(self, running: _Running) -> None:
        request, slots = running.request, running.slots
        p = request.params
        self._init_common(slots, [request] * len(slots))
        self._stream[slots] = False  # beams deliver their final result only
        self._mode[slots] = _BEAM_IDLE
        self._mode[slots[0]] = _BEAM_LIVE
        self._beam_index[slots] = np.arange(len(slots))
        running.beams = BeamGroup(
            slots=slots, num_beams=p.num_beams, length_penalty=p.length_penalty,
            eos_id=self.eos_id, stop_ids=np.array(p.stop_token_ids, np.int64),
            min_tokens=p.min_tokens, max_tokens=p.max_tokens,
        )

    def update(
        self,
        plan: StepPlan,
        ratings: np.ndarray | None,
        next_tokens: np.ndarray | None,
        topk_logprobs: np.ndarray | None = None,
        topk_ids: np.ndarray | None = None,
    ) -> list[RequestOutput]:
        """Applies the runner's results of `plan`; returns the outputs to deliver: final
        outputs of finished requests, and new tokens of streaming ones."""
        outputs = plan.outputs
        self.num_tokens_last_step = 0
        if plan.encode is not None and ratings is not None:
            self._rating[plan.encode.slots] = ratings
        if plan.step is None:
            return outputs
        if next_tokens is None:
            raise ValueError("a planned step needs its next_tokens")
        now = self._clock()
        rows = plan.step.write_slots
        beam = self._mode[rows] == _BEAM_LIVE
        if not beam.any():
            outputs.extend(self._advance_flat(rows, next_tokens, topk_logprobs, topk_ids, now))
            return outputs
        if topk_logprobs is None or topk_ids is None:
            raise ValueError("beam rows need the TopK candidates")
        flat = ~beam
        if flat.any():
            outputs.extend(
                self._advance_flat(
                    rows[flat], next_tokens[flat], topk_logprobs[flat], topk_ids[flat], now
                )
            )
        outputs.extend(
            self._advance_beams(rows[beam], topk_logprobs[beam], topk_ids[beam], now)
        )
        return outputs

    def _choose(self, rows, gen, tokens, logprobs, topk_logprobs, topk_ids) -> None:
        """Rows that sample, or must not end yet, choose among the TopK candidates."""
        early = gen < self._min[rows]
        choose = early | (self._mode[rows] == _SAMPLE)
        if not choose.any():
            return
        idx = np.flatnonzero(choose)
        r = rows[idx]
        lp, ids = topk_logprobs[idx], topk_ids[idx]
        early = early[idx]
        if early.any():
            banned = ids == self.eos_id
            stop_rows = early & self._has_stop[r]
            if stop_rows.any():
                stop = self._stop[r[stop_rows]]  # (n, max_stop)
                banned[stop_rows] |= (ids[stop_rows][:, :, None] == stop[:, None, :]).any(-1)
            lp = np.where(banned & early[:, None], -np.inf, lp)
        uniforms = uniform_from_counter(self._seed[r], gen[idx])
        chosen, chosen_lp = sample_from_candidates(
            lp, ids, self._temperature[r], self._top_k[r], self._top_p[r], uniforms
        )
        tokens[idx] = chosen
        logprobs[idx] = chosen_lp

    def _advance_flat(self, rows, next_tokens, topk_logprobs, topk_ids, now) -> list[RequestOutput]:
        gen = self._gen[rows]
        first = gen == 0
        if first.any():
            self._first_token_at[rows[first]] = now
        tokens = np.array(next_tokens, dtype=np.int64)  # a copy: sampled rows overwrite it
        logprobs = None
        if topk_logprobs is not None:
            logprobs = topk_logprobs[:, 0].astype(np.float32)
            self._choose(rows, gen, tokens, logprobs, topk_logprobs, topk_ids)
        ends = tokens == self.eos_id
        is_stop = None
        has_stop = self._has_stop[rows]
        if has_stop.any():
            is_stop = has_stop & (tokens[:, None] == self._stop[rows]).any(1)
            ends = ends | is_stop
        if ends.any():  # the ending token is not part of the output
            keep = ~ends
            kept_rows, kept_gen, kept_tokens = rows[keep], gen[keep], tokens[keep]
            kept_logprobs = None if logprobs is None else logprobs[keep]
            new_gen = gen + keep
        else:
            kept_rows, kept_gen, kept_tokens, kept_logprobs = rows, gen, tokens, logprobs
            new_gen = gen + 1
        self._out_tokens[kept_rows, kept_gen] = kept_tokens
        if kept_logprobs is not None:
            self._out_logprobs[kept_rows, kept_gen] = kept_logprobs
        self._gen[kept_rows] = kept_gen + 1
        self._token[kept_rows] = kept_tokens
        self.num_tokens_last_step += int(kept_rows.size)
        finished = ends | (new_gen >= self._max[rows])
        report = finished | self._stream[rows]
        if not report.any():
            return []
        outputs: list[RequestOutput] = []
        done: list[_Running] = []
        for i in np.flatnonzero(report).tolist():
            slot = int(rows[i])
            running = self._owner[slot]
            n = int(new_gen[i])
            if finished[i]:
                if not ends[i]:
                    reason = FinishReason.LENGTH
                elif is_stop is not None and is_stop[i]:
                    reason = FinishReason.STOP_TOKEN
                else:
                    reason = FinishReason.EOS
                want_lp = running.request.params.return_logprobs
                outputs.append(
                    self._output(
                        running.request, running, self._out_tokens[slot, :n].tolist(),
                        self._out_logprobs[slot, :n].tolist() if want_lp else [], reason,
                    )
                )
                done.append(running)
            elif n > running.emitted:
                outputs.append(self._delta(running, slot, n))
        if done:
            self._release_all(done)
        return outputs

    def _delta(self, running: _Running, slot: int, n: int) -> RequestOutput:
        start, running.emitted = running.emitted, n
        want_lp = running.request.params.return_logprobs
        return RequestOutput(
            request_id=running.request.request_id,
            new_token_ids=self._out_tokens[slot, start:n].tolist(),
            new_logprobs=self._out_logprobs[slot, start:n].tolist() if want_lp else None,
            predicted_rating=self._rating_of(running),
        )

    def _advance_beams(self, rows, topk_logprobs, topk_ids, now) -> list[RequestOutput]:
        groups: dict[str, list[int]] = {}
        for i, slot in enumerate(rows.tolist()):
            groups.setdefault(self._owner[slot].request.request_id, []).append(i)
        outputs = []
        for request_id, indices in groups.items():
            running = self._running[request_id]
            beams = running.beams
            idx = np.asarray(indices)
            idx = idx[np.argsort(self._beam_index[rows[idx]])]  # beam order
            if beams.num_generated == 0:
                self._first_token_at[beams.slots[0]] = now
            result = beams.advance(topk_logprobs[idx], topk_ids[idx])
            self.num_tokens_last_step += int(idx.size)
            if result is None:
                best = beams.best()
                outputs.append(
                    self._output(
                        running.request, running, best.tokens, best.logprobs, best.finish_reason
                    )
                )
                self._release(running)
                continue
            read_slots, tokens = result
            live = beams.live_slots
            self._mode[beams.slots] = _BEAM_IDLE
            self._mode[live] = _BEAM_LIVE
            self._read[live] = read_slots
            self._token[live] = tokens
            self._gen[live] = beams.num_generated
        return outputs

    def _rating_of(self, running: _Running | None) -> float | None:
        if running is None:
            return None
        rating = float(self._rating[running.slots[0]])
        return None if rating != rating else rating  # NaN: raw-state request, no rating

    def _output(
        self, request: Request, running: _Running | None, tokens: list[int],
        logprobs: list[float], reason: FinishReason,
    ) -> RequestOutput:
        """The final output; its new_token_ids are what a stream has not been sent yet."""
        now = self._clock()
        lps = logprobs if request.params.return_logprobs else None
        start = running.emitted if running is not None else 0
        first_token_s = None
        if running is not None:
            first = float(self._first_token_at[running.slots[0]])
            if first == first:
                first_token_s = first - request.arrival_time
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=tokens[start:],
            new_logprobs=lps[start:] if lps is not None else None,
            finished=True,
            finish_reason=reason,
            predicted_rating=self._rating_of(running),
            token_ids=tokens,
            logprobs=lps,
            queue_s=(running.admitted_at - request.arrival_time) if running else None,
            first_token_s=first_token_s,
            total_s=now - request.arrival_time,
        )

    def _release(self, running: _Running) -> None:
        self._release_all([running])

    def _release_all(self, finished: list[_Running]) -> None:
        """Frees the requests' slots at once: the next schedule() can admit into them."""
        for running in finished:
            for slot in running.slots.tolist():
                self._owner[slot] = None
            self._free.extend(running.slots[::-1].tolist())
            del self._running[running.request.request_id]
            del self._known[running.request.request_id]
        slots = (
            finished[0].slots if len(finished) == 1
            else np.concatenate([r.slots for r in finished])
        )
        self._mode[slots] = _FREE
        self._read[slots] = slots
        self._stream[slots] = False
        self._want_logprobs[slots] = False
        self._has_stop[slots] = False
        self._min[slots] = 0
