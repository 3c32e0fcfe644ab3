"""Replicas as separate `gruserve serve` processes on loopback: a round-robin client spreads
its calls over all of them, and when one is SIGKILLed during a closed-loop load test, no
request fails (the retry policy sends the ones it had elsewhere) and the others take over."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest

from gruserve.runtime.cli import main
from gruserve.runtime.client import GruserveClient

from .serving import ServeProcess, scrape, wait_for

NUM_REPLICAS = 3


class Replica:
    """A `gruserve serve` process with its metrics endpoint."""

    def __init__(self, bundle_dir, tmp_path, *, step_delay_s: float = 0.0) -> None:
        self.child = ServeProcess(bundle_dir, tmp_path, "--num-slots", "16", "--metrics-port",
                                  "0", step_delay_s=step_delay_s)
        self.target = self.child.wait_serving()
        self.metrics_url = wait_for(self._metrics_url, "the metrics line")

    def _metrics_url(self) -> str | None:
        for line in self.child.stderr:
            match = re.search(r"metrics on (http://\S+/metrics)", line)
            if match:
                return match[1]
        return None

    def num_ok(self, rpc: str = "Generate") -> float:
        samples = scrape(self.metrics_url)
        return samples.get(("gruserve_requests_total", (("code", "OK"), ("rpc", rpc))), 0.0)

    def num_running(self) -> float:
        return scrape(self.metrics_url)[("gruserve_running_requests", ())]

    def close(self) -> None:
        if self.child.proc.poll() is None:
            self.child.proc.send_signal(signal.SIGTERM)
            self.child.finish()


def _start(bundle_dir, tmp_path, stack: ExitStack, **kwargs) -> list[Replica]:
    replicas = []
    for _ in range(NUM_REPLICAS):
        replica = Replica(bundle_dir, tmp_path, **kwargs)
        stack.callback(replica.close)
        replicas.append(replica)
    return replicas


@pytest.fixture(scope="module")
def pair(synthetic_bundle):
    return {"user": synthetic_bundle.users[0], "item": synthetic_bundle.items[0]}


@pytest.fixture(scope="module")
def replicas(synthetic_bundle_dir, tmp_path_factory):
    with ExitStack() as stack:
        yield _start(synthetic_bundle_dir, tmp_path_factory.mktemp("replicas"), stack)


def test_round_robin_spreads_300_requests_over_three_replicas(replicas, pair):
    before = [r.num_ok() for r in replicas]
    with GruserveClient([r.target for r in replicas]) as client:
        for _ in range(300):
            client.generate(**pair, max_tokens=4)
    shares = [(r.num_ok() - b) / 300 for r, b in zip(replicas, before, strict=True)]
    assert sum(shares) == pytest.approx(1.0)
    assert all(0.20 <= share <= 0.45 for share in shares), shares


def _dead_target() -> str:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_generate_and_info_take_several_targets_and_skip_a_dead_one(replicas, pair, capsys):
    targets = ["--target", _dead_target(), "--target", ",".join(r.target for r in replicas)]
    before = sum(r.num_ok() for r in replicas)
    for _ in range(3):
        assert main(["generate", "--user", pair["user"], "--item", pair["item"], *targets]) == 0
        assert "tip:" in capsys.readouterr().out
    assert sum(r.num_ok() for r in replicas) == before + 3
    assert main(["info", *targets]) == 0
    assert json.loads(capsys.readouterr().out)["health"] == "SERVING"


def test_sigkill_of_a_replica_during_a_closed_loop_run_fails_no_request(
    synthetic_bundle_dir, tmp_path, pair
):
    with ExitStack() as stack:
        # 10 ms steps, 20 tokens per request: every replica always has calls in flight
        victim, *survivors = _start(synthetic_bundle_dir, tmp_path, stack, step_delay_s=0.01)
        loadtest = subprocess.Popen(
            [sys.executable, "-m", "gruserve.runtime", "loadtest",
             *[arg for r in (victim, *survivors) for arg in ("--target", r.target)],
             "--concurrency", "12", "--duration", "5", "--warmup", "0", "--entities",
             str(synthetic_bundle_dir), "--max-tokens", "20", "--min-tokens", "20",
             "--timeout", "20", "--json", "-", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        stack.callback(lambda: loadtest.poll() is None and loadtest.kill())
        wait_for(lambda: victim.num_ok() >= 10, "the load to reach every replica")
        # it has calls in flight when it dies. Polled, not read once: the gauge is set after
        # each step, and lockstep clients (all 20 tokens) can leave it at 0 between waves
        wait_for(lambda: victim.num_running() >= 1, "calls in flight on the victim")
        at_kill = [r.num_ok() for r in survivors]
        victim.child.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = loadtest.communicate(timeout=60)
        assert loadtest.returncode == 0, err
        result = json.loads(out)
        assert time.monotonic() - killed_at >= 1.0  # the run went on well past the kill
        assert result["num_failed"] == 0, result["errors"]
        assert result["errors"] == {}
        assert result["num_succeeded"] >= 50
        # the survivors took the load: each answered many calls after the kill
        grown = [r.num_ok() - b for r, b in zip(survivors, at_kill, strict=True)]
        assert all(n >= 10 for n in grown), grown

