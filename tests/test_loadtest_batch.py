"""The harness's per-request lengths (--lengths) and its GenerateBatch mode (--batch-size):
the distributions' determinism and bounds, and runs against a real server (tiny model) that
count every item."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter

import pytest

from gruserve.runtime.cli import main
from gruserve.runtime.client import Connection
from gruserve.runtime.loadtest import (
    ItemTiming,
    LengthDistribution,
    LengthSequence,
    LoadRun,
    LoadShape,
    LoadTestConfig,
    RequestRecord,
    Warmup,
    build_result,
    run_loadtest,
)

from .serving import running_server

# --- length distributions ---------------------------------------------------------------------


def test_length_specs_parse_and_print_back():
    for text in ("fixed:15", "uniform:1:15", "geometric:0.15:15"):
        assert str(LengthDistribution.parse(text)) == text
    assert LengthDistribution.parse(" Uniform:2:4 ") == LengthDistribution("uniform", 2, 4)
    assert LengthDistribution.parse("geometric:0.5:8") == LengthDistribution("geometric", 1, 8, 0.5)


@pytest.mark.parametrize("bad", [
    "uniform:5", "fixed", "fixed:0", "uniform:9:3", "uniform:1:x", "geometric:0:15",
    "geometric:1.5:15", "geometric:0.2:0", "poisson:3", "fixed:2.5", "",
])
def test_bad_length_specs_fail_with_one_line_naming_the_flag(bad):
    with pytest.raises(ValueError) as info:
        LengthDistribution.parse(bad)
    message = str(info.value)
    assert message.startswith("--lengths") and "\n" not in message


def test_length_sequence_is_the_same_for_a_seed_in_any_order_of_access():
    dist = LengthDistribution.parse("geometric:0.15:15")
    forward = [LengthSequence(dist, seed=3)[i] for i in range(300)]
    backward = LengthSequence(dist, seed=3)
    assert [backward[i] for i in reversed(range(300))] == forward[::-1]
    assert [LengthSequence(dist, seed=4)[i] for i in range(300)] != forward
    with pytest.raises(IndexError):
        LengthSequence(dist)[-1]


@pytest.mark.parametrize("text", ["fixed:7", "uniform:1:15", "uniform:3:4", "geometric:0.15:15",
                                  "geometric:0.6:3", "geometric:1:9"])
def test_lengths_stay_in_bounds_and_follow_the_distribution(text):
    dist = LengthDistribution.parse(text)
    lengths = LengthSequence(dist, seed=0)
    n = 40_000
    draws = [lengths[i] for i in range(n)]
    assert min(draws) >= dist.low and max(draws) <= dist.high
    assert sum(draws) / n == pytest.approx(dist.mean, rel=0.02)
    counts = Counter(draws)
    for k in range(dist.low, dist.high + 1):
        if dist.kind == "fixed":
            expected = 1.0
        elif dist.kind == "uniform":
            expected = 1 / (dist.high - dist.low + 1)
        elif k < dist.high:
            expected = (1 - dist.p) ** (k - 1) * dist.p
        else:  # the cap takes all the mass above it
            expected = (1 - dist.p) ** (dist.high - 1)
        assert counts[k] / n == pytest.approx(expected, abs=0.01), k


def test_geometric_mean_is_the_capped_one():
    # E[min(G, 15)] for p = 0.15: (1 - 0.85^15) / 0.15
    assert LengthDistribution.parse("geometric:0.15:15").mean == pytest.approx(6.0843, abs=1e-4)
    assert LengthDistribution.parse("uniform:1:15").mean == 8.0


# --- GenerateBatch accounting (hand-built records) --------------------------------------------


def test_a_batch_call_counts_as_its_items_and_fails_with_all_of_them():
    def call(index, code, done_s):
        items = [ItemTiming(1.0, 0.5, 2.0 + j) for j in range(3)] if code == "OK" else []
        return RequestRecord(index, False, sent_s=0.0, done_s=done_s, code=code,
                             num_tokens=12 if code == "OK" else 0, num_items=3, items=items)

    records = [call(0, "OK", 0.1), call(1, "OK", 0.3), call(2, "INVALID_ARGUMENT", 0.2)]
    shape = LoadShape(concurrency=3, duration_s=1.0)
    result = build_result(LoadRun(records, measure_start_s=0.0), shape, batch_size=3)
    assert (result.num_sent, result.num_succeeded, result.num_failed) == (9, 6, 3)
    assert result.errors == {"INVALID_ARGUMENT": 3}
    assert result.throughput_rps == pytest.approx(6.0) and result.calls_per_s == pytest.approx(2)
    assert result.tokens_per_s == pytest.approx(24.0)
    assert (result.num_calls, result.call_latency.count, result.latency.count) == (3, 2, 6)
    assert result.latency.max_ms == pytest.approx(300.0)  # each item waits for its call
    assert result.server_total.count == 6 and result.server_total.max_ms == pytest.approx(4.0)
    assert result.metrics()["call_p50_ms"] == pytest.approx(200.0)


# --- against a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    with running_server(synthetic_bundle_dir, metrics_port=0, max_batch_requests=8) as s:
        yield s


def _run(server, shape, **kw):
    config = LoadTestConfig(
        connection=Connection(server.target), shape=shape,
        metrics_url=f"127.0.0.1:{server.server.metrics_port}", **kw,
    )
    return asyncio.run(run_loadtest(config))


def _counted(result, name: str) -> float:
    return result.server_metrics.get(name, 0)


def test_generate_batch_mode_counts_every_item(server, entities):
    users, items = entities
    dist = LengthDistribution.parse("uniform:1:6")
    shape = LoadShape(concurrency=2, num_requests=5, warmup=Warmup(), seed=11)
    result = _run(server, shape, users=users, items=items, batch_size=4, lengths=dist,
                  exact_lengths=True)
    # 5 calls of 4: requests 0..19 of the sequence, each exactly its drawn length
    expected_tokens = sum(LengthSequence(dist, seed=11)[i] for i in range(20))
    assert (result.num_calls, result.num_sent, result.num_succeeded) == (5, 20, 20)
    assert result.num_tokens == expected_tokens
    assert result.latency.count == 20 and result.call_latency.count == 5
    assert result.server_total.count == 20 and result.ttft.count == 20
    assert result.batch_size == 4 and result.lengths == "uniform:1:6"
    assert _counted(result, 'gruserve_requests_total{code="OK",rpc="GenerateBatch"}') == 5
    assert _counted(result, "gruserve_generated_tokens_total") == expected_tokens


def test_unary_and_batch_modes_send_the_same_sequence(server, entities):
    users, items = entities
    dist = LengthDistribution.parse("geometric:0.3:9")
    common = dict(users=users, items=items, lengths=dist, exact_lengths=True)
    unary = _run(server, LoadShape(concurrency=3, num_requests=12, warmup=Warmup(), seed=2),
                 **common)
    batch = _run(server, LoadShape(concurrency=1, num_requests=4, warmup=Warmup(), seed=2),
                 batch_size=3, **common)
    expected = sum(LengthSequence(dist, seed=2)[i] for i in range(12))
    assert unary.num_tokens == batch.num_tokens == expected
    assert unary.num_sent == batch.num_sent == 12


def test_a_failing_item_fails_its_whole_call_and_counts_as_all_its_items(server, entities):
    users, items = entities
    pairs = [(users[0], items[0]), ("no-such-user", items[1])]  # every call of 2 holds both
    result = _run(server, LoadShape(concurrency=1, num_requests=3, warmup=Warmup()),
                  pairs=pairs, batch_size=2, decoding=dict(max_tokens=3))
    assert result.errors == {"NOT_FOUND": 6} and result.num_succeeded == 0
    assert _counted(result, 'gruserve_requests_total{code="NOT_FOUND",rpc="GenerateBatch"}') == 3


# --- the command line -------------------------------------------------------------------------


def _cli(server, *extra) -> list[str]:
    return ["loadtest", "--target", server.target, "--requests", "3", "--warmup", "0",
            "--no-progress", *extra]


def test_cli_batch_mode_reports_items_and_calls(server, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = main(_cli(server, "--batch-size", "4", "--lengths", "fixed:3", "--exact-lengths",
                     "--concurrency", "2", "--json", str(out)))
    assert code == 0
    data = json.loads(out.read_text())
    assert (data["num_calls"], data["num_sent"], data["num_tokens"]) == (3, 12, 36)
    assert data["metrics"]["calls_per_s"] > 0 and data["metrics"]["call_p99_ms"] > 0
    report = capsys.readouterr().out
    assert "GenerateBatch, 4 requests per call" in report and "lengths fixed:3" in report
    assert "call (GenerateBatch)" in report and "end-to-end (per item)" in report


@pytest.mark.parametrize("args, message", [
    (["--lengths", "uniform:5"], "--lengths 'uniform:5': expected"),
    (["--lengths", "fixed:3", "--max-tokens", "4"], "--lengths and --max-tokens"),
    (["--lengths", "uniform:2:6", "--min-tokens", "3"], "--min-tokens 3 exceeds"),
    (["--exact-lengths"], "--exact-lengths needs --lengths"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_cli_rejects_bad_lengths_and_batch_sizes_in_one_line(server, capsys, args, message):
    assert main(_cli(server, *args)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_batch_size_over_the_server_limit_and_with_stream(server, capsys):
    assert main(_cli(server, "--batch-size", "9")) == 3  # the server allows 8
    assert "exceeds the server's max_batch_requests (8)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(_cli(server, "--batch-size", "2", "--stream"))
    assert info.value.code == 2


def test_the_generator_and_results_import_without_the_grpc_client():
    # bench/ drives Triton with them from an environment whose protobuf cannot load gruserve.v1
    code = (
        "import sys; import gruserve.runtime.loadtest as lt\n"
        "lt.LoadGenerator, lt.build_result, lt.LengthSequence\n"
        "assert 'gruserve.runtime.client' not in sys.modules, 'client imported eagerly'\n"
        "assert not any(m.startswith('gruserve.v1') for m in sys.modules), 'pb2 imported'\n"
        "lt.run_loadtest, lt.GrpcBatchCaller\n"
        "assert 'gruserve.runtime.client' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
