"""The scheduler, driven through the engine core's step by a fake runner: no ORT, no model,
hand-built candidates."""

from __future__ import annotations

import numpy as np
import pytest

from gruserve.runtime.beam import BeamGroup
from gruserve.runtime.bundle import ModelInfo
from gruserve.runtime.config import SchedulerConfig
from gruserve.runtime.core import EngineCore
from gruserve.runtime.errors import InvalidRequestError, QueueFullError
from gruserve.runtime.model_runner import ModelRunner, StepOutput, split_step
from gruserve.runtime.request_builder import validate_params
from gruserve.runtime.requests import DecodingParams, FinishReason, Limits, Request, Strategy
from gruserve.runtime.sampler import SamplingParams

BOS, EOS = 0, 1
K = 4
STOP = 50
LIMITS = Limits(
    vocab_size=400, max_tokens=32, default_max_tokens=16, sampling_top_k=K, max_beams=4
)
INFO = ModelInfo(
    name="fake", vocab=tuple(f"w{i}" for i in range(LIMITS.vocab_size)), users={}, items={},
    bos_id=BOS, eos_id=EOS, pad_id=2, unk_id=3, hidden_size=8, num_layers=1,
    model_config={"max_len": LIMITS.default_max_tokens},
)


def scripted_lm(scripts: dict[int, list[int]]):
    """Candidates by (user, position): the user's scripted token first (then <eos> when the
    script ends), then alternatives 100 + position, ...; log-probs -0.1, -2, -3, -4."""

    def lm(prefix):
        user, pos = prefix[0], len(prefix) - 2
        script = scripts[user]
        token = script[pos] if pos < len(script) else EOS
        ids = [token, 100 + pos, 200 + pos, EOS if token != EOS else 300 + pos]
        return np.array([-0.1, -2.0, -3.0, -4.0], np.float32), np.array(ids, np.int64)

    return lm


def hashed_lm(prefix):
    """A deterministic pseudo-model over 40 tokens: top-K of a random log-softmax."""
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    logits = rng.normal(size=40) * 2.0
    logits[BOS] = -np.inf
    logp = logits - np.logaddexp.reduce(logits[1:])
    ids = np.argsort(-logp, kind="stable")[:K]
    return logp[ids].astype(np.float32), ids.astype(np.int64)


class FakeRunner:
    """A model double with a device-like pool: a slot holds its prefix (user, bos, t1, ...).

    step() reads every row's state from read_slots before writing any write_slot, as the
    step graph does, and returns TopK candidates only when asked, like the real runner.
    With `head`, candidates() reads them for states in the pool (the head graph), and
    every call is recorded in `reads`.
    """

    top_k = K
    can_write_states = False

    def __init__(self, num_slots: int, lm, head: bool = True) -> None:
        self.num_slots = num_slots
        self.lm = lm
        self.head_top_k = K if head else 0
        self.pool: list[tuple | None] = [None] * num_slots
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []
        self.reads: list[np.ndarray] = []

    def candidates(self, slots):
        assert self.head_top_k, "candidates() of a runner without a head"
        self.reads.append(slots.copy())
        lps, ids = zip(*(self.lm(self.pool[s]) for s in slots.tolist()), strict=True)
        return np.stack(lps), np.stack(ids)

    def encode(self, slots, users, items):
        for slot, user in zip(slots.tolist(), users.tolist(), strict=True):
            self.pool[slot] = (user,)
        return self.rate(users, items)

    def rate(self, users, items):
        return users.astype(np.float32) + 0.5  # the "rating"; no slot is written

    def step(self, read_slots, write_slots, tokens, want_topk=False, topk_rows=None):
        if topk_rows is not None:
            return split_step(self._run, read_slots, write_slots, tokens, topk_rows)
        return self._run(read_slots, write_slots, tokens, want_topk)

    def _run(self, read_slots, write_slots, tokens, want_topk) -> StepOutput:
        self.steps.append((read_slots.copy(), write_slots.copy(), tokens.copy(), want_topk))
        states = [self.pool[r] + (int(t),) for r, t in zip(read_slots, tokens, strict=True)]
        for slot, state in zip(write_slots.tolist(), states, strict=True):
            self.pool[slot] = state
        lps, ids = zip(*(self.lm(s) for s in states), strict=True)
        lps, ids = np.stack(lps), np.stack(ids)
        if want_topk:
            return StepOutput(ids[:, 0].copy(), lps, ids)
        return StepOutput(ids[:, 0].copy())

    def write_states(self, slots, states):
        raise AssertionError("no test here conditions on raw states")


class Driven:
    """The engine core under test: scheduler queries and requests go to its scheduler, and
    step() below runs the core's own step."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def __getattr__(self, name):
        return getattr(self.core.scheduler, name)


def make(num_slots=4, lm=None, clock=None, head=True, **config):
    cfg = SchedulerConfig(num_slots=num_slots, max_tokens=LIMITS.max_tokens, **config)
    runner = FakeRunner(num_slots, lm or hashed_lm, head=head)
    kwargs = {} if clock is None else {"clock": clock}
    return Driven(EngineCore(runner, INFO, cfg, **kwargs)), runner


def req(request_id, user=0, stream=False, seed=0, arrival=0.0, **params) -> Request:
    return Request(
        request_id=request_id, params=validate_params(DecodingParams(**params), LIMITS),
        user_index=user, item_index=0, stream=stream, seed=seed, arrival_time=arrival,
    )


def step(sched: Driven, runner: FakeRunner):
    result = sched.core.step()
    return result.plan, result.outputs


def run(sched, runner, max_steps=500, check=None):
    """Steps until no work is left; returns every output in order."""
    outputs = []
    for _ in range(max_steps):
        if not sched.has_work():
            return outputs
        plan, outs = step(sched, runner)
        if check is not None:
            check(plan)
        outputs.extend(outs)
    raise AssertionError(f"no end after {max_steps} steps")


def finals(outputs):
    return {o.request_id: o for o in outputs if o.finished}


def alone(request, lm=hashed_lm, head=True):
    sched, runner = make(lm=lm, head=head)
    sched.add(request)
    return finals(run(sched, runner))[request.request_id]


def test_the_fake_runner_satisfies_the_runner_protocol():
    assert isinstance(FakeRunner(2, hashed_lm), ModelRunner)
    assert isinstance(FakeRunner(2, hashed_lm, head=False), ModelRunner)
    assert not isinstance(object(), ModelRunner)


# --- admission and capacity ---------------------------------------------------------------


def test_admission_is_fifo_into_free_slots():
    scripts = {u: [5] * (2 + u) for u in range(6)}  # user u ends after 2 + u tokens
    sched, runner = make(num_slots=2, lm=scripted_lm(scripts))
    for u in (3, 0, 4, 1, 5, 2):
        sched.add(req(f"r{u}", user=u))
    admitted = []
    run(sched, runner, check=lambda p: p.encode and admitted.extend(p.encode.request_ids))
    assert admitted == ["r3", "r0", "r4", "r1", "r5", "r2"]


def test_finished_request_frees_its_slot_for_the_next_schedule():
    sched, runner = make(num_slots=1, lm=scripted_lm({0: [5], 1: [6, 7]}))
    sched.add(req("a", user=0))
    sched.add(req("b", user=1))
    plan, outs = step(sched, runner)  # a: 5
    assert plan.encode.request_ids == ("a",) and outs == []
    plan, outs = step(sched, runner)  # a: <eos> -> finished, slot free at once
    assert [o.request_id for o in outs] == ["a"]
    assert sched.num_free_slots == 1
    plan, _ = step(sched, runner)
    assert plan.encode.request_ids == ("b",)
    assert plan.encode.slots.tolist() == [0]


def test_never_more_active_slots_than_num_slots_and_beams_take_num_beams():
    sched, runner = make(num_slots=6)
    strategies = [
        dict(), dict(strategy=Strategy.BEAM, num_beams=3),
        dict(strategy=Strategy.SAMPLE, sampling=SamplingParams(seed=1)),
        dict(strategy=Strategy.BEAM, num_beams=4), dict(max_tokens=20, min_tokens=20),
    ]
    requests = [req(f"r{i}", user=i, **strategies[i % len(strategies)]) for i in range(25)]
    for r in requests:
        sched.add(r)
    seen = {"max_rows": 0}

    def check(plan):
        assert sched.num_active_slots <= 6
        if plan.step is not None:
            assert plan.step.write_slots.size <= 6
            assert len(set(plan.step.write_slots.tolist())) == plan.step.write_slots.size
            seen["max_rows"] = max(seen["max_rows"], plan.step.write_slots.size)
        for r in requests:
            slots = sched.running_slots(r.request_id)
            assert slots is None or slots.size == r.num_slots

    outputs = run(sched, runner, check=check)
    assert len(finals(outputs)) == 25
    assert seen["max_rows"] == 6
    assert sched.num_free_slots == 6


def test_a_big_request_is_not_overtaken():
    sched, runner = make(num_slots=4, lm=scripted_lm({0: [5] * 5, 1: [6], 2: [7]}))
    sched.add(req("long", user=0))
    step(sched, runner)
    sched.add(req("beam", user=1, strategy=Strategy.BEAM, num_beams=4))
    sched.add(req("small", user=2))
    order = []
    run(sched, runner, check=lambda p: p.encode and order.extend(p.encode.request_ids))
    # the beam waits for all 4 slots; "small" fits earlier but waits behind it
    assert order == ["beam", "small"]


def test_max_batch_size_limits_the_slots_in_use():
    sched, runner = make(num_slots=8, max_batch_size=3)
    for i in range(7):
        sched.add(req(f"r{i}", user=i))

    def check(plan):
        assert sched.num_active_slots <= 3
        assert plan.step is None or plan.step.write_slots.size <= 3

    assert len(finals(run(sched, runner, check=check))) == 7


def test_max_admit_per_step_spreads_a_burst():
    sched, runner = make(num_slots=8, max_admit_per_step=3)
    for i in range(8):
        sched.add(req(f"r{i}", user=i, max_tokens=10, min_tokens=10))
    sizes = [step(sched, runner)[0].encode.slots.size for _ in range(2)]
    assert sizes == [3, 3]


# --- queue bound and request checks --------------------------------------------------------


def test_queue_bound_raises_queue_full():
    sched, runner = make(num_slots=1, max_queued=2)
    sched.add(req("a"))
    sched.add(req("b"))
    with pytest.raises(QueueFullError):
        sched.add(req("c"))
    step(sched, runner)  # "a" leaves the queue for the slot
    sched.add(req("c"))
    assert sched.num_waiting == 2


def test_duplicate_ids_and_oversized_requests_are_refused():
    sched, _ = make(num_slots=2)
    sched.add(req("a"))
    with pytest.raises(InvalidRequestError):
        sched.add(req("a"))
    with pytest.raises(InvalidRequestError):
        sched.add(req("big", strategy=Strategy.BEAM, num_beams=3))


# --- aborts --------------------------------------------------------------------------------


def test_abort_waiting_request():
    sched, runner = make(num_slots=1)
    sched.add(req("running", max_tokens=10, min_tokens=10))
    step(sched, runner)
    sched.add(req("waiting"))
    sched.abort("waiting")
    plan, outs = step(sched, runner)
    out = finals(outs)["waiting"]
    assert out.finish_reason is FinishReason.ABORTED and out.token_ids == []
    assert plan.encode is None and sched.num_waiting == 0
    assert "waiting" not in finals(run(sched, runner))


def test_abort_running_request_frees_its_slot_at_the_next_schedule():
    sched, runner = make(num_slots=2, lm=scripted_lm({0: [5] * 20, 1: [6] * 20, 2: [7, 8]}))
    sched.add(req("victim", user=0, max_tokens=20))
    sched.add(req("other", user=1, max_tokens=20))
    for _ in range(3):
        step(sched, runner)
    victim_slot = int(sched.running_slots("victim")[0])
    sched.add(req("next", user=2))
    sched.abort("victim")
    plan, outs = step(sched, runner)
    out = finals(outs)["victim"]
    assert out.finish_reason is FinishReason.ABORTED
    assert out.token_ids == [5, 5, 5]  # what it had, nothing more
    # the freed slot is reused in the same schedule; the victim no longer steps
    assert plan.encode.request_ids == ("next",)
    assert plan.encode.slots.tolist() == [victim_slot]
    assert sched.running_slots("victim") is None
    rest = finals(run(sched, runner))
    assert rest["next"].token_ids == [7, 8]
    assert rest["other"].token_ids == [6] * 20
    sched.abort("victim")  # already gone: ignored
    assert not sched.has_work()


def test_abort_beam_request_frees_all_its_slots():
    sched, runner = make(num_slots=4)
    sched.add(req("beam", strategy=Strategy.BEAM, num_beams=4, max_tokens=20, min_tokens=20))
    for _ in range(3):
        step(sched, runner)
    assert sched.num_free_slots == 0
    sched.abort("beam")
    plan, outs = step(sched, runner)
    assert finals(outs)["beam"].finish_reason is FinishReason.ABORTED
    assert len(finals(outs)["beam"].token_ids) == 3
    assert sched.num_free_slots == 4 and plan.step is None


# --- stop conditions -----------------------------------------------------------------------


def test_eos_ends_a_request_and_is_not_included():
    out = alone(req("a", user=0), lm=scripted_lm({0: [5, 6, 7]}))
    assert out.token_ids == [5, 6, 7] and out.finish_reason is FinishReason.EOS


def test_max_tokens_ends_with_length():
    out = alone(req("a", user=0, max_tokens=3), lm=scripted_lm({0: [5] * 10}))
    assert out.token_ids == [5, 5, 5] and out.finish_reason is FinishReason.LENGTH


def test_stop_token_ends_a_request_and_is_not_included():
    lm = scripted_lm({0: [5, 6, STOP, 7]})
    out = alone(req("a", user=0, stop_token_ids=(STOP, 99)), lm=lm)
    assert out.token_ids == [5, 6] and out.finish_reason is FinishReason.STOP_TOKEN
    # without the stop id the same model goes on
    assert alone(req("b", user=0), lm=lm).token_ids == [5, 6, STOP, 7]


@pytest.mark.parametrize("strategy", [Strategy.GREEDY, Strategy.SAMPLE])
def test_min_tokens_suppresses_eos_and_stop_ids(strategy):
    # the script wants to stop at position 1 (stop id) and 2 (eos); min_tokens=4 forbids it
    lm = scripted_lm({0: [5, STOP, EOS, EOS, EOS, EOS]})
    sampling = SamplingParams(temperature=1e-7)  # greedy through the sampling path
    out = alone(
        req("a", user=0, min_tokens=4, stop_token_ids=(STOP,), strategy=strategy,
            sampling=sampling),
        lm=lm,
    )
    # suppressed positions take the best remaining candidate (100 + position)
    assert out.token_ids == [5, 101, 102, 103]
    assert out.finish_reason is FinishReason.EOS


@pytest.mark.parametrize("head", [True, False], ids=["head-graph", "no-head-graph"])
def test_greedy_traffic_uses_the_cheap_graph(head):
    sched, runner = make(num_slots=4, head=head)
    sched.add(req("g1"))
    sched.add(req("g2", max_tokens=5))
    run(sched, runner)
    assert not any(want for *_, want in runner.steps)
    needs_candidates = [dict(return_logprobs=True), dict(strategy=Strategy.SAMPLE)]
    # with a head graph, min_tokens keeps greedy rows on the cheap graph; without, the step
    # needs TopK candidates to suppress <eos> in
    (needs_candidates if not head else []).append(dict(min_tokens=2))
    for params in needs_candidates:
        sched, runner = make(num_slots=4, head=head)
        sched.add(req("g"))
        sched.add(req("x", **params))
        run(sched, runner)
        assert runner.steps[0][3], params
    if head:
        sched, runner = make(num_slots=4)
        sched.add(req("g"))
        sched.add(req("x", min_tokens=2))
        run(sched, runner)
        assert not any(want for *_, want in runner.steps)


@pytest.mark.parametrize("strategy", [Strategy.GREEDY, Strategy.SAMPLE])
def test_min_tokens_gives_the_same_tokens_on_the_greedy_graph_as_on_topk(strategy):
    """Greedy rows with min_tokens run the ArgMax graph and read candidates only where its
    token would end them early; the tokens are those of the TopK path, for every request of
    a mixed batch (sampled rows run TopK either way)."""
    lm = scripted_lm({u: [5 + u, STOP, EOS, 9, EOS] for u in range(6)})
    mix = [req(f"r{u}", user=u, min_tokens=u % 4, stop_token_ids=(STOP,), max_tokens=8,
               strategy=strategy if u % 2 else Strategy.GREEDY, seed=u)
           for u in range(6)]
    outs = {}
    for head in (True, False):
        sched, runner = make(num_slots=6, lm=lm, head=head)
        for r in mix:
            sched.add(r)
        outs[head] = finals(run(sched, runner))
        if head and strategy is Strategy.GREEDY:
            assert not any(want for *_, want in runner.steps)  # never the TopK graph
            assert runner.reads  # some early row's ArgMax token had to be replaced
    for rid, out in outs[False].items():
        assert outs[True][rid].token_ids == out.token_ids, rid
        assert outs[True][rid].finish_reason is out.finish_reason, rid
    assert outs[True]["r3"].token_ids[:3] == [8, 101, 102]  # STOP and <eos> were suppressed


def test_greedy_rows_run_apart_when_enough_share_a_step_with_rows_needing_candidates():
    def mix():
        return [req(f"g{i}", user=i, max_tokens=12) for i in range(5)] + [
            req("m", user=7, min_tokens=6, stop_token_ids=(7, 9), max_tokens=12),
            req("s", user=8, strategy=Strategy.SAMPLE, seed=3, max_tokens=12),
            req("b", user=9, strategy=Strategy.BEAM, num_beams=2, max_tokens=12),
        ]

    results = {}
    for split in (0, 3):
        sched, runner = make(num_slots=10, split_min_greedy_rows=split)
        for r in mix():
            sched.add(r)
        results[split] = finals(run(sched, runner))
        runs = [(r.size, want) for r, _w, _t, want in runner.steps]
        if split:
            # each step of the busy phase: the 6 greedy rows (min_tokens or not) on the cheap
            # graph, then the sampled row and the beam
            assert runs[0] == (6, False) and runs[1][1] is True and runs[1][0] >= 2
            assert sum(n for n, want in runs if not want) >= 5 * 5
        else:
            assert all(want for _, want in runs[:6])  # one graph: candidates for every row
    for rid, out in results[0].items():
        assert results[3][rid].token_ids == out.token_ids, rid
        assert results[3][rid].finish_reason is out.finish_reason, rid
    # the min_tokens row still never ended early, whichever graph its neighbours ran
    assert len(results[3]["m"].token_ids) >= 6


def test_a_split_needs_enough_greedy_rows():
    sched, runner = make(num_slots=4, split_min_greedy_rows=3)
    sched.add(req("g1"))
    sched.add(req("g2"))
    sched.add(req("s", strategy=Strategy.SAMPLE, seed=1))
    step(sched, runner)
    assert [want for *_, want in runner.steps] == [True]  # 2 greedy rows: not worth a split


def test_logprobs_follow_the_tokens():
    out = alone(req("a", user=0, return_logprobs=True), lm=scripted_lm({0: [5, 6]}))
    assert out.token_ids == [5, 6]
    assert out.logprobs == pytest.approx([-0.1, -0.1])
    assert alone(req("b", user=0), lm=scripted_lm({0: [5, 6]})).logprobs is None


# --- streaming, timing, ratings ------------------------------------------------------------


def test_streaming_deltas_add_up_and_unary_requests_get_one_output():
    sched, runner = make(num_slots=4)
    sched.add(req("s1", user=1, stream=True, return_logprobs=True, min_tokens=3))
    sched.add(req("s2", user=2, stream=True, strategy=Strategy.SAMPLE, seed=3, min_tokens=3))
    sched.add(req("u", user=3))
    sched.add(req("s3", user=4, stream=True, max_tokens=12, min_tokens=12))
    outputs = []
    for _ in range(4):
        outputs += step(sched, runner)[1]
    sched.abort("s3")  # a stream that is aborted still adds up
    outputs += run(sched, runner)
    by_id: dict[str, list] = {}
    for o in outputs:
        by_id.setdefault(o.request_id, []).append(o)
    assert len(by_id["u"]) == 1 and by_id["u"][0].finished
    for rid in ("s1", "s2", "s3"):
        outs = by_id[rid]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert len(outs) > 1
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
    lps = [x for o in by_id["s1"] for x in o.new_logprobs]
    assert lps == pytest.approx(by_id["s1"][-1].logprobs)
    assert by_id["s3"][-1].finish_reason is FinishReason.ABORTED


def test_timing_and_rating():
    now = [10.0]
    sched, runner = make(num_slots=1, clock=lambda: now[0], lm=scripted_lm({3: [5, 6]}))
    sched.add(req("a", user=3, arrival=9.0))
    now[0] = 11.0
    step(sched, runner)  # admitted at 11, first token at 11
    now[0] = 12.0
    step(sched, runner)
    now[0] = 13.0
    out = finals(step(sched, runner)[1])["a"]
    assert out.queue_s == pytest.approx(2.0)
    assert out.first_token_s == pytest.approx(2.0)
    assert out.total_s == pytest.approx(4.0)
    assert out.predicted_rating == pytest.approx(3.5)


# --- sampling and beams inside a busy batch ------------------------------------------------


def busy_mix():
    mix = []
    for i in range(16):
        kind = i % 4
        if kind == 0:
            mix.append(req(f"g{i}", user=i))
        elif kind == 1:
            mix.append(req(f"s{i}", user=i, strategy=Strategy.SAMPLE, seed=1000 + i,
                           sampling=SamplingParams(temperature=1.3, top_k=3, top_p=0.9)))
        elif kind == 2:
            mix.append(req(f"b{i}", user=i, strategy=Strategy.BEAM, num_beams=3,
                           length_penalty=0.7))
        else:
            mix.append(req(f"m{i}", user=i, min_tokens=6, stop_token_ids=(7, 9)))
    return mix


def test_every_request_is_the_same_alone_and_in_a_staggered_busy_batch():
    mix = busy_mix()
    expected = {r.request_id: alone(r) for r in mix}
    sched, runner = make(num_slots=7)
    outputs = []
    for i, r in enumerate(mix):  # arrivals staggered: one new request every other step
        sched.add(r)
        outputs += step(sched, runner)[1]
        if i % 2:
            outputs += step(sched, runner)[1]
    outputs += run(sched, runner)
    got = finals(outputs)
    assert any(p[0].size > 1 for p in runner.steps)
    for rid, out in expected.items():
        assert got[rid].token_ids == out.token_ids, rid
        assert got[rid].finish_reason is out.finish_reason, rid


def test_seeds_decide_the_sample():
    base = dict(user=5, strategy=Strategy.SAMPLE, max_tokens=12, min_tokens=12)
    a = alone(req("a", seed=1, **base)).token_ids
    assert alone(req("a2", seed=1, **base)).token_ids == a
    assert alone(req("b", seed=2, **base)).token_ids != a


def test_beam_through_the_scheduler_matches_the_beam_group_and_reorders_slots():
    params = dict(strategy=Strategy.BEAM, num_beams=3, max_tokens=8, length_penalty=1.0)
    for user in range(8):
        out = alone(req("b", user=user, **params))
        # the same search driven directly, with prefixes tracked in Python
        g = BeamGroup(slots=np.arange(3), num_beams=3, length_penalty=1.0, eos_id=EOS,
                      stop_ids=np.zeros(0, np.int64), min_tokens=0, max_tokens=8)
        prefixes = [(user, BOS)]
        while True:
            lps, ids = zip(*(hashed_lm(p) for p in prefixes), strict=True)
            result = g.advance(np.stack(lps), np.stack(ids))
            if result is None:
                break
            reads, tokens = result
            prefixes = [prefixes[int(r)] + (int(t),) for r, t in zip(reads, tokens, strict=True)]
        assert out.token_ids == g.best().tokens
        assert out.finish_reason is g.best().finish_reason
    # the fake pool only gets these right if rows read their parents' slots
    sched, runner = make(num_slots=3)
    sched.add(req("b", user=3, **params))
    run(sched, runner)
    assert any((r != w).any() for r, w, *_ in runner.steps)
