"""The load-test harness: statistics, arrival schedule, accounting, thresholds, and runs
against a real in-process server (tiny model). No wall-clock performance assertions beyond
loose rate tolerances."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time

import pytest

from gruserve.runtime.cli import main
from gruserve.runtime.client import Connection
from gruserve.runtime.loadtest import (
    METRICS,
    LoadGenerator,
    LoadRun,
    LoadShape,
    LoadTestConfig,
    RequestRecord,
    Summary,
    Warmup,
    arrival_times,
    build_result,
    parse_thresholds,
    percentile,
    read_pairs,
    run_loadtest,
)

from .serving import running_server

# --- units ----------------------------------------------------------------------------------


def test_percentiles_of_a_known_distribution():
    values = [float(v) for v in range(1, 101)]
    random.Random(3).shuffle(values)
    s = Summary.of(values)
    assert (s.count, s.min_ms, s.max_ms) == (100, 1.0, 100.0)
    assert s.mean_ms == pytest.approx(50.5)
    # linear interpolation between closest ranks, as numpy.percentile does by default
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([0.0, 10.0], 25) == pytest.approx(2.5)
    assert Summary.of([]) is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_poisson_arrivals_match_the_rate_and_burst_keeps_the_mean():
    rate, horizon = 200.0, 50.0
    times = arrival_times(rate, horizon_s=horizon, seed=1)
    assert len(times) / horizon == pytest.approx(rate, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise([0.0] + times)]
    cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
    assert cv2 == pytest.approx(1.0, rel=0.1)  # exponential gaps

    bursty = arrival_times(rate, horizon_s=horizon, seed=1, burst=4.0)
    assert len(bursty) / horizon == pytest.approx(rate, rel=0.1)
    gaps = [b - a for a, b in itertools.pairwise([0.0] + bursty)]
    cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2
    assert cv2 == pytest.approx(4.0, rel=0.25)

    even = arrival_times(rate, count=5, burst=0.0)
    assert even == pytest.approx([0.005, 0.010, 0.015, 0.020, 0.025])
    assert arrival_times(rate, count=100, seed=9) == arrival_times(rate, count=100, seed=9)


def test_warmup_parses_seconds_or_requests():
    assert Warmup.parse("2s") == Warmup(seconds=2.0)
    assert Warmup.parse("250ms") == Warmup(seconds=0.25)
    assert Warmup.parse("40") == Warmup(requests=40)
    assert Warmup.parse("0") == Warmup()
    for bad in ("x", "-1", "2h", "-3s"):
        with pytest.raises(ValueError):
            Warmup.parse(bad)


def test_load_shape_rejects_contradictions():
    with pytest.raises(ValueError):
        LoadShape(concurrency=2, rate=5.0, duration_s=1.0)
    with pytest.raises(ValueError):
        LoadShape(concurrency=2)
    with pytest.raises(ValueError):
        LoadShape(rate=0.0, num_requests=3)
    with pytest.raises(ValueError):
        LoadShape(rate=5.0, burst=-1.0, num_requests=3)


def test_thresholds_parse_and_fail_on_unknown_names():
    parsed = parse_thresholds(" p99_ms > 50, error_rate>0 ,rps<=1e3")
    assert [str(t) for t in parsed] == ["p99_ms>50", "error_rate>0", "rps<=1000"]
    for bad in ("p99>5", "p99_ms>>5", "p99_ms>", "p99_ms 5", ",", "latency=3"):
        with pytest.raises(ValueError):
            parse_thresholds(bad)
    assert {"p99_ms", "ttft_p99_ms", "itl_p99_ms", "error_rate", "tokens_per_s"} <= set(METRICS)


# --- the generator with a fake server ---------------------------------------------------------


def _fake_server(service_s: float, tokens: int = 3, fail_every: int = 0):
    calls = []

    async def call(record: RequestRecord) -> None:
        calls.append(record.index)
        await asyncio.sleep(service_s)
        if fail_every and record.index % fail_every == 0:
            record.code = "NOT_FOUND"
            return
        record.code = "OK"
        record.num_tokens = tokens

    return call, calls


def test_closed_loop_sends_warmup_then_exactly_the_measured_requests():
    call, calls = _fake_server(0.002, fail_every=5)
    shape = LoadShape(concurrency=4, num_requests=40, warmup=Warmup(requests=8))
    run = asyncio.run(LoadGenerator(shape, call).run())
    result = build_result(run, shape)
    assert len(calls) == 48
    assert result.num_warmup == 8
    assert result.num_sent == 40
    assert result.num_sent == result.num_succeeded + sum(result.errors.values())
    # indexes 8..47 are measured; every fifth (10, 15, ... 45) fails
    assert result.errors == {"NOT_FOUND": 8}
    assert result.num_tokens == 32 * 3
    assert result.latency.count == 32 and result.latency.min_ms >= 2.0


def test_timed_warmup_does_not_eat_from_the_request_count():
    call, calls = _fake_server(0.005)
    shape = LoadShape(concurrency=2, num_requests=10, warmup=Warmup(seconds=0.05))
    result = build_result(asyncio.run(LoadGenerator(shape, call).run()), shape)
    assert result.num_sent == 10
    assert result.num_warmup >= 10  # 2 workers x 50 ms / 5 ms
    assert len(calls) == result.num_sent + result.num_warmup


def test_throughput_counts_completions_inside_the_window_whichever_phase_sent_them():
    # window [10, 12]: the server spends it finishing 20 warm-up requests (one every 0.1 s);
    # the 20 measured ones, sent during the window, finish at 13..15
    warm = [RequestRecord(i, True, sent_s=0.0, done_s=10.1 + i / 10, code="OK", num_tokens=2)
            for i in range(20)]
    measured = [RequestRecord(20 + i, False, sent_s=10 + i / 10, done_s=13 + i / 10, code="OK",
                              num_tokens=2) for i in range(20)]
    shape = LoadShape(concurrency=20, duration_s=2.0, warmup=Warmup(seconds=10))
    result = build_result(LoadRun(warm + measured, measure_start_s=10.0), shape)
    assert result.window_s == pytest.approx(2.0)
    assert result.throughput_rps == pytest.approx(10.0)  # not 20 / (15 - 10) = 4
    assert result.tokens_per_s == pytest.approx(20.0)
    assert (result.num_sent, result.num_warmup, result.num_tokens) == (20, 20, 40)
    assert result.latency.p50_ms == pytest.approx(3000.0)


def test_closed_loop_throughput_obeys_littles_law_when_latency_exceeds_the_window():
    # a server that serves one request at a time: 40 in flight wait ~40 service times each,
    # twice the measured window; throughput must still be about concurrency / latency
    # (counting only requests sent in the window gives a third of it)
    lock = asyncio.Lock()

    async def serial(record: RequestRecord) -> None:
        async with lock:
            await asyncio.sleep(0.01)
        record.code, record.num_tokens = "OK", 1

    shape = LoadShape(concurrency=40, duration_s=0.2, warmup=Warmup(seconds=0.1))
    result = build_result(asyncio.run(LoadGenerator(shape, serial).run()), shape)
    assert result.latency.mean_ms > 1.5 * 200  # latency exceeds the 200 ms window
    littles_law_rps = 40 / (result.latency.mean_ms / 1e3)
    # loose: the window and the measured requests' service are different stretches of time
    assert result.throughput_rps == pytest.approx(littles_law_rps, rel=0.5)


def test_open_loop_latency_counts_from_the_scheduled_time():
    # 100 arrivals/s, but the harness may hold one request at a time and each takes 20 ms:
    # the sends fall behind schedule; a harness timing from the send would report 20 ms
    call, _ = _fake_server(0.020)
    shape = LoadShape(rate=100.0, burst=0.0, num_requests=30, max_in_flight=1)
    result = build_result(asyncio.run(LoadGenerator(shape, call).run()), shape)
    assert result.num_sent == 30 and result.num_in_flight_waits > 0
    assert result.send_lag.max_ms > 100  # the last ones are ~290 ms late
    assert result.latency.max_ms > result.send_lag.max_ms + 15
    assert result.latency.p50_ms > 100
    assert result.scheduled_rps == pytest.approx(100.0, rel=0.05)
    assert result.throughput_rps < 60  # at most 50/s served, and reported as such
    assert result.metrics()["rate_ratio"] < 0.6


# --- against a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    # no result cache: the harness's repeated pairs must reach the engine to be counted
    with running_server(synthetic_bundle_dir, metrics_port=0, cache_size=0) as s:
        yield s


def _config(server, shape, **kw) -> LoadTestConfig:
    kw.setdefault("decoding", dict(max_tokens=5, min_tokens=5))
    return LoadTestConfig(
        connection=Connection(server.target), shape=shape,
        metrics_url=f"127.0.0.1:{server.server.metrics_port}", **kw,
    )


def _requests_counted(result, rpc: str, code: str) -> float:
    return result.server_metrics.get(f'gruserve_requests_total{{code="{code}",rpc="{rpc}"}}', 0)


def test_counts_add_up_and_failures_are_counted_by_status(server, entities):
    users, items = entities
    pairs = [(users[0], items[0]), ("no-such-user", items[1]), (users[2], items[2]),
             (users[3], "no-such-item")]
    shape = LoadShape(concurrency=4, num_requests=40, warmup=Warmup())
    result = asyncio.run(run_loadtest(_config(server, shape, pairs=pairs)))
    assert result.num_sent == 40 == result.num_succeeded + sum(result.errors.values())
    assert result.errors == {"NOT_FOUND": 20}
    assert result.num_failed == 20 and result.error_rate == 0.5
    assert result.num_tokens == 20 * 5
    assert result.ttft_source == "server" and result.ttft.count == 20
    # the server saw the same thing
    assert _requests_counted(result, "Generate", "NOT_FOUND") == 20
    assert _requests_counted(result, "Generate", "OK") == 20
    assert result.server_metrics["gruserve_generated_tokens_total"] == 100


def test_warmup_requests_reach_the_server_but_not_the_figures(server, entities):
    users, items = entities
    shape = LoadShape(concurrency=2, num_requests=10, warmup=Warmup(requests=6))
    result = asyncio.run(run_loadtest(_config(server, shape, users=users, items=items)))
    assert result.mix == "entities"
    assert (result.num_sent, result.num_warmup, result.num_succeeded) == (10, 6, 10)
    assert result.latency.count == 10
    assert _requests_counted(result, "Generate", "OK") == 16


def test_streaming_reports_ttft_and_inter_token_gaps(server, entities):
    users, items = entities
    shape = LoadShape(concurrency=3, num_requests=12, warmup=Warmup())
    # slow steps: tokens then arrive one message each, instead of being coalesced into one
    # chunk when a busy machine delays the client (which leaves no gap to measure)
    runner = server.engine.runner
    real_step = runner.step

    def slow_step(*args, **kwargs):
        time.sleep(0.02)
        return real_step(*args, **kwargs)

    runner.step = slow_step
    try:
        result = asyncio.run(
            run_loadtest(_config(server, shape, stream=True, users=users, items=items))
        )
    finally:
        runner.step = real_step
    assert result.num_succeeded == 12 and result.num_tokens == 12 * 5
    assert result.ttft_source == "client" and result.ttft.count == 12
    assert result.itl is not None and result.itl.count >= 12
    assert result.ttft.p50_ms <= result.latency.p50_ms
    assert result.server_total.count == 12  # the last message carries the timing
    assert _requests_counted(result, "GenerateStream", "OK") == 12


def test_open_loop_reports_offered_scheduled_and_achieved_rates(server):
    shape = LoadShape(rate=40.0, duration_s=1.5, warmup=Warmup(seconds=0.25), seed=5)
    result = asyncio.run(run_loadtest(_config(server, shape)))  # random hidden states
    assert result.mix == "hidden_state" and result.mode == "open"
    assert result.num_failed == 0
    assert result.offered_rps == 40.0
    # a Poisson count over 1.5 s is noisy; the exact check of the schedule is the unit test
    assert result.scheduled_rps == pytest.approx(40.0, rel=0.4)
    assert result.scheduled_rps == pytest.approx(result.num_sent / 1.5)
    assert result.throughput_rps == pytest.approx(result.scheduled_rps, rel=0.5)
    assert result.send_lag.count == result.num_sent
    assert result.num_warmup > 0
    assert _requests_counted(result, "Generate", "OK") == result.num_sent + result.num_warmup


# --- the command line -------------------------------------------------------------------------


def _cli(server, *extra) -> list[str]:
    return ["loadtest", "--target", server.target, "--requests", "6", "--warmup", "0",
            "--max-tokens", "4", "--no-progress", *extra]


def test_cli_writes_json_and_passes_its_thresholds(server, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = main(_cli(server, "--concurrency", "2", "--json", str(out),
                     "--fail-if", "error_rate>0,p99_ms>60000"))
    assert code == 0
    data = json.loads(out.read_text())
    assert data["num_sent"] == 6 and data["metrics"]["error_rate"] == 0
    assert set(METRICS) <= set(data["metrics"])
    assert "end-to-end" in capsys.readouterr().out


def test_cli_threshold_breach_sets_exit_code_1(server, tmp_path, synthetic_bundle_dir, capsys):
    pairs = tmp_path / "pairs.csv"
    users, items = json.loads((synthetic_bundle_dir / "entities.json").read_text()).values()
    pairs.write_text(f"user,item\n{users[0]},{items[0]}\n# bad one:\nghost,{items[1]}\n")
    assert read_pairs(pairs) == [(users[0], items[0]), ("ghost", items[1])]
    assert main(_cli(server, "--pairs", str(pairs), "--fail-if", "error_rate>0")) == 1
    assert "FAIL error_rate>0: error_rate = 0.5" in capsys.readouterr().err
    # a metric with no value in this run (unary has no inter-token gaps) fails, never passes
    assert main(_cli(server, "--fail-if", "itl_p99_ms>1e9")) == 1


def test_cli_bad_fail_if_and_unreachable_server(server, capsys):
    assert main(_cli(server, "--fail-if", "p99>5")) == 2
    assert "unknown metric 'p99'" in capsys.readouterr().err
    assert main(_cli(server, "--fail-if", "p99_ms>>5")) == 2
    assert main(_cli(server, "--burst", "3")) == 2  # --burst without --rate
    unreachable = ["loadtest", "--target", "127.0.0.1:1", "--requests", "1", "--timeout", "2",
                   "--no-progress"]
    assert main(unreachable) == 3
    assert "GetModelInfo failed: UNAVAILABLE" in capsys.readouterr().err
