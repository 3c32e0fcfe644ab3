"""The scheduler: admission, stop conditions, aborts. Pure Python + numpy, no ORT.

Requests wait in a bounded FIFO queue and are admitted into free slots at step boundaries
(continuous batching): every step runs all live slots together, new requests join the next
step, finished ones leave at once. Per-slot state lives in the SlotTable's numpy arrays, so
a step's bookkeeping is a handful of vectorized operations however many requests run; Python
loops touch only requests that are admitted, finish, stream, or search beams.

One step (EngineCore.step):  plan = schedule()  ->  the runner  ->  update(plan, ...)
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from .beam import BeamGroup
from .config import SchedulerConfig
from .errors import InvalidRequestError, QueueFullError
from .model_runner import StepOutput
from .requests import FinishReason, Request, RequestOutput, Strategy
from .sampler import ending_tokens, sample_from_candidates, suppress_token, uniform_from_counter
from .slot_table import BEAM_IDLE, BEAM_LIVE, GREEDY, SAMPLE, SlotTable

__all__ = ["EncodeBatch", "Scheduler", "SchedulerConfig", "StepBatch", "StepPlan"]


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
    # when only some rows want candidates and enough others do not: those rows (a mask) run
    # the sampling graph and the rest the greedy one (SchedulerConfig.split_min_greedy_rows)
    topk_rows: np.ndarray | None = None


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
        candidates=None,
    ) -> None:
        """`candidates(slots) -> (log-probs, ids)`, when the runner can read the TopK
        candidates of states without stepping (ModelRunner.candidates): then greedy requests
        with min_tokens left run the ArgMax graph too, and only a token that would end one
        early is replaced by its best candidate that does not."""
        self.config = config
        self.bos_id, self.eos_id = bos_id, eos_id
        self._clock = clock
        self._candidates = candidates
        self.slots = SlotTable(config.num_slots, config.max_tokens, config.max_stop_tokens)
        self._waiting: collections.deque[Request] = collections.deque()
        self._known: dict[str, Request] = {}  # waiting or running, by id
        self._running: dict[str, _Running] = {}
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
        return self.slots.num_free

    @property
    def num_active_slots(self) -> int:
        return self.slots.num_active

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
        """Queues a request; raises QueueFullError at the bound.

        Requests are validated by the RequestBuilder; what is refused here is what this
        scheduler could never hold: more slots than the batch limit (it would block the
        FIFO queue forever) or more tokens or stop ids than its buffers have room for.
        """
        config = self.config
        if request.request_id in self._known:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already queued")
        if request.num_slots > config.batch_limit:
            raise InvalidRequestError(
                "num_beams", f"needs {request.num_slots} slots, the limit is {config.batch_limit}"
            )
        if request.params.max_tokens > config.max_tokens:
            raise InvalidRequestError("max_tokens", f"over the limit {config.max_tokens}")
        if len(request.params.stop_token_ids) > config.max_stop_tokens:
            raise InvalidRequestError("stop_token_ids", f"at most {config.max_stop_tokens}")
        if len(self._waiting) >= config.max_queued:
            raise QueueFullError(f"queue full ({config.max_queued} waiting)")
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
        t = self.slots
        rows = t.live_rows()
        if rows.size:
            needs = (t.mode[rows] != GREEDY) | t.wants_logprobs[rows]
            if self._candidates is None:  # <eos> suppressed among the TopK candidates
                needs |= t.num_generated[rows] < t.min_tokens[rows]
            num_needs = int(np.count_nonzero(needs))
            split = self.config.split_min_greedy_rows
            topk_rows = None
            if 0 < num_needs and split and rows.size - num_needs >= split:
                topk_rows = needs
            plan.step = StepBatch(
                t.read_slot[rows], rows, t.next_token[rows], num_needs > 0, topk_rows
            )
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
        t = self.slots
        for request_id in aborts:
            running = self._running.get(request_id)
            if running is None:
                continue
            if running.beams is not None:  # the best live beam so far
                tokens = running.beams.tokens[0].tolist()
                logprobs = running.beams.logprobs[0].tolist()
            else:
                slot = running.slots[0]
                n = int(t.num_generated[slot])
                tokens = t.out_tokens[slot, :n].tolist()
                logprobs = t.out_logprobs[slot, :n].tolist()
            plan.outputs.append(
                self._output(running.request, running, tokens, logprobs, FinishReason.ABORTED)
            )
            self._release([running])

    def _admit(self, plan: StepPlan) -> None:
        """FIFO admission: a request that does not fit blocks those behind it, so a big
        (beam) request is never overtaken and cannot starve."""
        now = self._clock()
        t = self.slots
        limit = self.config.batch_limit
        flat_slots: list[int] = []
        flat_requests: list[Request] = []
        enc_slots, users, items, enc_ids = [], [], [], []
        state_slots, states = [], []
        admitted = 0
        while self._waiting and admitted < self.config.max_admit_per_step:
            request = self._waiting[0]
            need = request.num_slots
            if need > t.num_free or t.num_active + need > limit:
                break
            self._waiting.popleft()
            admitted += 1
            running = _Running(request, np.empty(0, np.int64), admitted_at=now)
            running.slots = slots = t.take(need, running)
            self._running[request.request_id] = running
            if request.params.strategy is Strategy.BEAM:
                t.start_beams(slots, request, self.bos_id)
                p = request.params
                running.beams = BeamGroup(
                    slots=slots, num_beams=p.num_beams, length_penalty=p.length_penalty,
                    eos_id=self.eos_id, stop_ids=np.array(p.stop_token_ids, np.int64),
                    min_tokens=p.min_tokens, max_tokens=p.max_tokens,
                )
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
            t.start_flat(np.array(flat_slots, np.int64), flat_requests, self.bos_id)
        if enc_slots:
            plan.encode = EncodeBatch(
                np.array(enc_slots, np.int64), np.array(users, np.int64),
                np.array(items, np.int64), tuple(enc_ids),
            )
        if state_slots:
            plan.write_states = (
                np.array(state_slots, np.int64), np.stack(states).astype(np.float32, copy=False)
            )

    def update(
        self, plan: StepPlan, ratings: np.ndarray | None, out: StepOutput | None
    ) -> list[RequestOutput]:
        """Applies the runner's results of `plan`; returns the outputs to deliver: final
        outputs of finished requests, and new tokens of streaming ones."""
        outputs = plan.outputs
        self.num_tokens_last_step = 0
        if plan.encode is not None and ratings is not None:
            self.slots.rating[plan.encode.slots] = ratings
        if plan.step is None:
            return outputs
        if out is None:
            raise ValueError("a planned step needs the runner's output")
        now = self._clock()
        rows = plan.step.write_slots
        t = out.topk_rows
        if t is None:
            outputs.extend(
                self._advance(rows, out.next_tokens, out.topk_logprobs, out.topk_ids, now)
            )
        else:  # a split step: greedy rows first, then those with candidates
            outputs.extend(self._advance(rows[~t], out.next_tokens[~t], None, None, now))
            outputs.extend(
                self._advance(rows[t], out.next_tokens[t], out.topk_logprobs, out.topk_ids, now)
            )
        return outputs

    def _advance(self, rows, next_tokens, topk_logprobs, topk_ids, now) -> list[RequestOutput]:
        """Applies one graph run's results to its rows (flat requests and beams)."""
        beam = self.slots.mode[rows] == BEAM_LIVE
        if not beam.any():
            return self._advance_flat(rows, next_tokens, topk_logprobs, topk_ids, now)
        if topk_logprobs is None or topk_ids is None:
            raise ValueError("beam rows need the TopK candidates")
        outputs = []
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
        t = self.slots
        early = gen < t.min_tokens[rows]
        choose = early | (t.mode[rows] == SAMPLE)
        if not choose.any():
            return
        idx = np.flatnonzero(choose)
        r = rows[idx]
        lp, ids = topk_logprobs[idx], topk_ids[idx]
        early = early[idx]
        if early.any():
            stop = t.stop_ids[r] if t.has_stop_ids[r].any() else None
            lp = suppress_token(lp, ids, self.eos_id, early, stop)
        uniforms = uniform_from_counter(t.seed[r], gen[idx])
        chosen, chosen_lp = sample_from_candidates(
            lp, ids, t.temperature[r], t.top_k[r], t.top_p[r], uniforms
        )
        tokens[idx] = chosen
        logprobs[idx] = chosen_lp

    def _keep_going(self, rows, gen, tokens) -> None:
        """Greedy rows that ran the ArgMax graph with min_tokens left: where its token would
        end one early, take the best candidate of the new state that does not (read from the
        pool without stepping, for those rows only)."""
        t = self.slots
        early = gen < t.min_tokens[rows]
        if not early.any():
            return
        stop = t.stop_ids[rows] if t.has_stop_ids[rows].any() else None
        idx = np.flatnonzero(early & ending_tokens(tokens, self.eos_id, stop))
        if not idx.size:
            return
        r = rows[idx]  # the write slots: the new states are there
        logprobs, ids = self._candidates(r)
        allowed = suppress_token(
            logprobs, ids, self.eos_id, np.ones(idx.size, bool),
            None if stop is None else t.stop_ids[r],
        )
        chosen, _ = sample_from_candidates(allowed, ids, 0.0, 0, 1.0, np.zeros(idx.size))
        tokens[idx] = chosen

    def _advance_flat(self, rows, next_tokens, topk_logprobs, topk_ids, now) -> list[RequestOutput]:
        t = self.slots
        gen = t.num_generated[rows]
        first = gen == 0
        if first.any():
            t.first_token_at[rows[first]] = now
        tokens = np.array(next_tokens, dtype=np.int64)  # a copy: sampled rows overwrite it
        logprobs = None
        if topk_logprobs is not None:
            logprobs = topk_logprobs[:, 0].astype(np.float32)
            self._choose(rows, gen, tokens, logprobs, topk_logprobs, topk_ids)
        elif self._candidates is not None:
            self._keep_going(rows, gen, tokens)
        is_stop = None
        has_stop = t.has_stop_ids[rows]
        if has_stop.any():
            # -1 pads the stop lists and is no token: ending_tokens then tests stop ids only
            is_stop = has_stop & ending_tokens(tokens, -1, t.stop_ids[rows])
            ends = is_stop | (tokens == self.eos_id)
        else:
            ends = tokens == self.eos_id
        if ends.any():  # the ending token is not part of the output
            keep = ~ends
            kept_rows, kept_gen, kept_tokens = rows[keep], gen[keep], tokens[keep]
            kept_logprobs = None if logprobs is None else logprobs[keep]
            new_gen = gen + keep
        else:
            kept_rows, kept_gen, kept_tokens, kept_logprobs = rows, gen, tokens, logprobs
            new_gen = gen + 1
        t.out_tokens[kept_rows, kept_gen] = kept_tokens
        if kept_logprobs is not None:
            t.out_logprobs[kept_rows, kept_gen] = kept_logprobs
        t.num_generated[kept_rows] = kept_gen + 1
        t.next_token[kept_rows] = kept_tokens
        self.num_tokens_last_step += int(kept_rows.size)
        finished = ends | (new_gen >= t.max_tokens[rows])
        report = finished | t.streams[rows]
        if not report.any():
            return []
        outputs: list[RequestOutput] = []
        done: list[_Running] = []
        for i in np.flatnonzero(report).tolist():
            slot = int(rows[i])
            running = t.owner[slot]
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
                        running.request, running, t.out_tokens[slot, :n].tolist(),
                        t.out_logprobs[slot, :n].tolist() if want_lp else [], reason,
                    )
                )
                done.append(running)
            elif n > running.emitted:
                outputs.append(self._delta(running, slot, n))
        if done:
            self._release(done)
        return outputs

    def _delta(self, running: _Running, slot: int, n: int) -> RequestOutput:
        t = self.slots
        start, running.emitted = running.emitted, n
        want_lp = running.request.params.return_logprobs
        return RequestOutput(
            request_id=running.request.request_id,
            new_token_ids=t.out_tokens[slot, start:n].tolist(),
            new_logprobs=t.out_logprobs[slot, start:n].tolist() if want_lp else None,
            predicted_rating=self._rating_of(running),
        )

    def _advance_beams(self, rows, topk_logprobs, topk_ids, now) -> list[RequestOutput]:
        t = self.slots
        groups: dict[str, list[int]] = {}
        for i, slot in enumerate(rows.tolist()):
            groups.setdefault(t.owner[slot].request.request_id, []).append(i)
        outputs = []
        for request_id, indices in groups.items():
            running = self._running[request_id]
            beams = running.beams
            idx = np.asarray(indices)
            idx = idx[np.argsort(t.beam_index[rows[idx]])]  # beam order
            if beams.num_generated == 0:
                t.first_token_at[beams.slots[0]] = now
            result = beams.advance(topk_logprobs[idx], topk_ids[idx])
            self.num_tokens_last_step += int(idx.size)
            if result is None:
                best = beams.best()
                outputs.append(
                    self._output(
                        running.request, running, best.tokens, best.logprobs, best.finish_reason
                    )
                )
                self._release([running])
                continue
            read_slots, tokens = result
            live = beams.live_slots
            t.mode[beams.slots] = BEAM_IDLE
            t.mode[live] = BEAM_LIVE
            t.read_slot[live] = read_slots
            t.next_token[live] = tokens
            t.num_generated[live] = beams.num_generated
        return outputs

    def _rating_of(self, running: _Running | None) -> float | None:
        if running is None:
            return None
        rating = float(self.slots.rating[running.slots[0]])
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
            first = float(self.slots.first_token_at[running.slots[0]])
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

    def _release(self, finished: list[_Running]) -> None:
        """Frees the requests' slots at once: the next schedule() can admit into them."""
        for running in finished:
            del self._running[running.request.request_id]
            del self._known[running.request.request_id]
        slots = (
            finished[0].slots if len(finished) == 1
            else np.concatenate([r.slots for r in finished])
        )
        self.slots.release(slots)
