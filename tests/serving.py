"""Runs a real GruServer on a real socket (port 0) in a background event-loop thread, or a
real `gruserve serve` process, and the tools the server tests share: a gate on decode steps,
a /metrics scraper, polling."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families

from gruserve.runtime.bundle import load_bundle
from gruserve.runtime.server import GruServer, ServerConfig

WAIT_S = 30.0  # the longest any test waits for a condition; reaching it is a failure


class ServerThread:
    def __init__(self, bundle_dir, *, tracer_provider=None, **config) -> None:
        config.setdefault("port", 0)
        config.setdefault("num_slots", 32)
        config.setdefault("device", "cpu")
        config.setdefault("intra_op_threads", 1)
        self.config = ServerConfig().with_overrides(**config)
        self.bundle = load_bundle(bundle_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: GruServer | None = None
        self.tracer_provider = tracer_provider

    def call(self, coro, timeout: float = 60.0):
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def create(self) -> ServerThread:
        """Builds the server (sessions, engine) without starting it."""
        if not self.thread.is_alive():
            self.thread.start()
        self.server = GruServer(self.bundle, self.config, tracer_provider=self.tracer_provider)
        return self

    def start(self) -> ServerThread:
        if self.server is None:
            self.create()
        self.call(self.server.start())
        return self

    @property
    def engine(self):
        return self.server.engine

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def metrics(self) -> dict[tuple[str, tuple], float]:
        return scrape(f"http://127.0.0.1:{self.server.metrics_port}/metrics")

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def running_server(bundle_dir, **config):
    """A started ServerThread (config: ServerConfig settings by name, or tracer_provider)."""
    server = ServerThread(bundle_dir, **config).start()
    try:
        yield server
    finally:
        server.stop()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(condition, what: str, timeout: float = WAIT_S, interval: float = 0.01):
    """Polls until condition() is truthy and returns it; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class StepGate:
    """Holds the engine's decode steps until the test lets them run.

    Replaces engine.runner.step: every call counts, waits for a permit (allow(n) gives n,
    open() lets everything through), then runs the real step.
    """

    def __init__(self, engine, *, closed: bool = True) -> None:
        self._engine = engine
        self._real = engine.runner.step
        self._cv = threading.Condition()
        self._permits = 0
        self._open = not closed
        self.num_steps = 0  # calls, the waiting one included
        self.num_waiting = 0

    def __enter__(self) -> StepGate:
        self._engine.runner.step = self._step
        return self

    def __exit__(self, *exc) -> None:
        self.open()
        self._engine.runner.step = self._real

    def _step(self, *args, **kwargs):
        with self._cv:
            self.num_steps += 1
            self.num_waiting += 1
            self._cv.notify_all()
            # longer than any wait of the test: a failing test opens the gate on its way out
            # before this gives up (which would kill the engine for the tests that follow)
            ok = self._cv.wait_for(lambda: self._open or self._permits > 0, 2 * WAIT_S)
            self.num_waiting -= 1
            if not ok:
                raise AssertionError("StepGate: the test never let this step run")
            if not self._open:
                self._permits -= 1
        return self._real(*args, **kwargs)

    def allow(self, num_steps: int = 1) -> None:
        with self._cv:
            self._permits += num_steps
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()

    def wait_blocked(self, num_steps: int = 1) -> None:
        """Waits until `num_steps` steps have been called and one of them is held."""
        with self._cv:
            ok = self._cv.wait_for(
                lambda: self.num_steps >= num_steps and self.num_waiting > 0, WAIT_S
            )
        if not ok:
            raise AssertionError(f"step {num_steps} never reached the gate")


# Slows every decode step in the child process, so that its requests are still in flight
# when a signal comes: a test double injected at interpreter start (PYTHONPATH), the
# command line itself stays exactly what an operator runs.
SITECUSTOMIZE = textwrap.dedent("""
    import os
    import time

    from gruserve.runtime import runner

    _delay = float(os.environ["GRUSERVE_TEST_STEP_DELAY_S"])
    _step = runner.StepRunner.step

    def _slow_step(self, *args, **kwargs):
        time.sleep(_delay)
        return _step(self, *args, **kwargs)

    runner.StepRunner.step = _slow_step
""")


class ServeProcess:
    """`python -m gruserve.runtime serve [BUNDLE] --port 0 ...` in a child process.

    bundle_dir None serves the default (the embedded demo). `command` replaces the
    interpreter part, e.g. [python, "-X", "importtime", "-m", "gruserve.runtime"] or the
    installed `gruserve` script. With step_delay_s, every decode step sleeps that long."""

    def __init__(self, bundle_dir, tmp_path, *args: str, step_delay_s: float = 0.0,
                 command: list[str] | None = None) -> None:
        env = dict(os.environ)
        if step_delay_s:
            (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(tmp_path), env.get("PYTHONPATH")) if p
            )
            env["GRUSERVE_TEST_STEP_DELAY_S"] = str(step_delay_s)
        command = command or [sys.executable, "-m", "gruserve.runtime"]
        bundle = [] if bundle_dir is None else [str(bundle_dir)]
        self.proc = subprocess.Popen(
            [*command, "serve", *bundle, "--port", "0", "--device", "cpu", "--threads", "1",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout.put),
                         daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append),
                         daemon=True).start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line)

    def wait_serving(self) -> str:
        """The HOST:PORT the child prints once it is SERVING."""
        while True:
            try:
                line = self.stdout.get(timeout=60)
            except queue.Empty:
                raise AssertionError("no 'serving' line:\n" + "".join(self.stderr)) from None
            match = re.match(r"gruserve: serving .* on (\S+):(\d+)$", line.strip())
            if match:
                return f"{match[1]}:{match[2]}"

    def finish(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
