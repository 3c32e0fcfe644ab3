"""Serving benchmark: gruserve against a naive PyTorch-eager server, side by side in one run.

    python bench/serve.py            # full run (~6-10 minutes), writes bench/results/serve.md
    python bench/serve.py --quick    # ~2-minute smoke (same table, fewer and shorter points)

Three servers, one at a time, each a subprocess on this machine, each driven by the load-test
harness (gruserve.runtime.loadtest) running in THIS process. The harness shares the CPU with
the server: on a 2-core machine its cost is part of every figure.

  naive       bench/naive_server.py: PyTorch eager, one request at a time (batch-1 greedy
              decode under a lock), the way the research code decodes
  gruserve-1  gruserve with batching off (--num-slots 1)
  gruserve    gruserve with continuous batching (--num-slots 256)

Each server gets a closed loop at concurrency 1, 16, 64, 256, then an open-loop (Poisson)
sweep at fractions of its saturating rate (its best closed-loop throughput). The model is an
untrained NRT at the reference sizes (vocab 20004, emb 300, hidden 400, 15 words) written to a
temporary directory, with the decoder's <eos> output bias set to -1e4 (as bench/engine.py
does): no server ever picks <eos>, so every request yields exactly max_tokens = 15 tokens on
the cheap greedy graph. `--min-tokens` forces the length with min_tokens instead, which puts
every step on the TopK graph. Needs the export extra (torch, onnx).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from machine import cpu_model  # bench/machine.py (scripts run from bench/)

from gruserve.runtime.client import Connection, GruserveClient
from gruserve.runtime.loadtest import (
    LoadShape,
    LoadTestConfig,
    LoadTestResult,
    Warmup,
    read_entities,
    run_loadtest,
)

HERE = Path(__file__).resolve().parent
REFERENCE = dict(ntoken=20004, emsize=300, hidden_size=400, max_len=15)
NUM_TOKENS = 15
PARITY_PAIRS = 8


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    duration_s: float
    concurrencies: tuple[int, ...]
    rate_fractions: tuple[float, ...]  # of the saturating rate


FULL = Plan(2.0, 8.0, (1, 16, 64, 256), (0.5, 0.8, 1.0, 1.2))
QUICK = Plan(1.0, 3.0, (1, 64), (0.8,))


@dataclass
class Point:
    server: str
    result: LoadTestResult
    fraction: float | None = None  # open loop: offered rate / saturating rate
    cpu: dict[str, float] | None = None  # cores: server, harness, others (see CpuMeter)

    @property
    def load(self) -> str:
        r = self.result
        if r.mode == "closed":
            return f"c={r.concurrency}"
        return f"{r.offered_rps:.1f}/s ({self.fraction:.0%})"


# --- the model -----------------------------------------------------------------------------


def build_reference_model(out: Path, num_users: int, num_items: int, seed: int = 0):
    """An untrained NRT at the reference sizes: (checkpoint path, bundle dir)."""
    import torch

    from gruserve.export.bundle_writer import write_bundle
    from gruserve.export.checkpoint import Checkpoint, save_checkpoint
    from gruserve.export.config import ModelConfig
    from gruserve.export.model import NRT
    from gruserve.export.vocab import SPECIAL_TOKENS, EntityIndex, Vocabulary

    torch.manual_seed(seed)
    config = ModelConfig(num_users=num_users, num_items=num_items, **REFERENCE)
    words = SPECIAL_TOKENS + tuple(f"w{i}" for i in range(config.ntoken - len(SPECIAL_TOKENS)))
    vocab = Vocabulary(words)
    model = NRT(config)
    with torch.no_grad():
        model.decoder.linear.bias[vocab.eos_id] = -1e4  # see the module docstring
    checkpoint = Checkpoint(
        model_config=config,
        state_dict=model.state_dict(),
        vocab=vocab,
        users=EntityIndex([f"u{i}" for i in range(num_users)]),
        items=EntityIndex([f"i{i}" for i in range(num_items)]),
    )
    save_checkpoint(checkpoint, out / "nrt.pt")
    return out / "nrt.pt", write_bundle(checkpoint, out / "bundle")


# --- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(name: str, cmd: list[str], log_path: Path, timeout_s: float = 300.0):
    """Starts a server that prints '... on HOST:PORT' when ready; yields (HOST:PORT, pid)."""
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    target = None
    try:
        while target is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            match = re.search(r" on (\S+:\d+)\s*$", line)
            target = match.group(1) if match else None
        if target is None:
            raise RuntimeError(f"{name} did not start; see {log_path}")
        yield target, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def server_commands(ckpt: Path, bundle: Path, args) -> dict[str, tuple[list[str], int | None]]:
    """name -> (command, metrics port or None)."""
    py = sys.executable
    common = ["--port", "0", "--device", args.device, "--threads", str(args.threads),
              "--grace", "2"]
    commands: dict[str, tuple[list[str], int | None]] = {
        "naive": ([py, str(HERE / "naive_server.py"), str(ckpt), "--port", "0",
                   "--threads", str(args.threads)], None),
    }
    for name, slots in (("gruserve-1", 1), ("gruserve", 256)):
        port = free_port()
        commands[name] = (
            [py, "-m", "gruserve.runtime", "--log-level", "WARNING", "serve", str(bundle),
             *common, "--num-slots", str(slots), "--metrics-port", str(port)],
            port,
        )
    return commands


# --- CPU accounting: who used the cores during a point ------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _proc_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


class CpuMeter:
    """Cores used during a point by the server, by this process (the harness), and by
    everything else on the machine (other users' jobs: noise the figures carry)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> CpuMeter:
        self.usage: dict[str, float] | None = None
        self._start = (time.monotonic(), _busy_ticks(), _proc_ticks(self.server_pid),
                       sum(os.times()[:2]))
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, server0, self0 = self._start
        busy1 = _busy_ticks()
        if busy0 is None or busy1 is None:
            return
        wall = time.monotonic() - wall0
        server = (_proc_ticks(self.server_pid) - server0) / _TICK / wall
        harness = (sum(os.times()[:2]) - self0) / wall
        machine = (busy1[0] - busy0[0]) / _TICK / wall
        self.usage = {"server": server, "harness": harness,
                      "others": max(machine - server - harness, 0.0)}


# --- driving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    pid: int
    metrics_port: int | None


def run_point(target: Target, shape: LoadShape, fraction, users, items, args) -> Point:
    config = LoadTestConfig(
        connection=Connection(target.address), shape=shape, users=users, items=items,
        decoding=dict(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS if args.min_tokens else 0),
        timeout_s=args.timeout,
        metrics_url=f"127.0.0.1:{target.metrics_port}" if target.metrics_port else None,
    )
    with CpuMeter(target.pid) as meter:
        result = asyncio.run(run_loadtest(config))
    point = Point(target.name, result, fraction, meter.usage)
    print_point(point)
    return point


def sample_tokens(target: str, users, items) -> list[list[int]]:
    with GruserveClient(target) as client:
        return [
            list(client.generate(user=u, item=i, max_tokens=NUM_TOKENS).token_ids)
            for u, i in zip(users[:PARITY_PAIRS], items[:PARITY_PAIRS], strict=True)
        ]


def print_point(p: Point) -> None:
    r = p.result
    lat = r.latency
    print(
        f"  {p.server:<11} {p.load:<16} {r.throughput_rps:8.1f} req/s {r.tokens_per_s:8.0f} tok/s"
        f"  p50 {lat.p50_ms if lat else float('nan'):8.1f} ms  p99 "
        f"{lat.p99_ms if lat else float('nan'):8.1f} ms  errors {r.num_failed}  cpu {_cpu(p)}",
        flush=True,
    )


def bench_all(targets: list[Target], plan: Plan, users, items, args) -> list[Point]:
    """Every point, the servers interleaved (naive, gruserve-1, gruserve at c=1, then at
    c=16, ...) so that a slow drift in the machine's background load hits all of them alike."""
    points = []
    warmup = Warmup(seconds=plan.warmup_s)
    for c in plan.concurrencies:
        for target in targets:
            shape = LoadShape(concurrency=c, duration_s=plan.duration_s, warmup=warmup)
            points.append(run_point(target, shape, None, users, items, args))
    saturation = {
        t.name: max(p.result.throughput_rps for p in points if p.server == t.name)
        for t in targets
    }
    for fraction in plan.rate_fractions:
        for target in targets:
            rate = saturation[target.name] * fraction
            shape = LoadShape(rate=rate, duration_s=plan.duration_s, warmup=warmup)
            points.append(run_point(target, shape, fraction, users, items, args))
    return points


# --- the report ----------------------------------------------------------------------------


def _closed(points, server, c) -> Point | None:
    for p in points:
        if p.server == server and p.result.mode == "closed" and p.result.concurrency == c:
            return p
    return None


def _rows_per_step(r: LoadTestResult) -> str:
    m = r.server_metrics or {}
    steps = m.get("gruserve_step_batch_size_count")
    return f"{m.get('gruserve_step_batch_size_sum', 0) / steps:.1f}" if steps else "-"


def _cpu(p: Point) -> str:
    c = p.cpu
    return "-" if c is None else f"{c['server']:.2f} / {c['harness']:.2f} / {c['others']:.2f}"


def _per_core(p: Point | None) -> float | None:
    """tokens/s per core the server actually got: steadier than raw tokens/s when other
    processes take a varying share of the machine."""
    if p is None or not p.cpu or p.cpu["server"] < 0.05:
        return None
    return p.result.tokens_per_s / p.cpu["server"]


def _others(*points: Point) -> str:
    values = [p.cpu["others"] for p in points if p.cpu]
    return f"; other processes used {', '.join(f'{v:.2f}' for v in values)} cores" if values else ""


def _interference(points: list[Point]) -> str:
    values = [p.cpu["others"] for p in points if p.cpu]
    if not values:
        return ""
    return (
        f"; in this run other processes used {min(values):.2f} to {max(values):.2f} cores "
        f"(mean {sum(values) / len(values):.2f}) of the {os.cpu_count()}"
    )


def _ms(s, attr: str) -> str:
    return "-" if s is None else f"{getattr(s, attr):.1f}"


def goals(points: list[Point]) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) rows."""
    rows = []
    naive, fast = _closed(points, "naive", 64), _closed(points, "gruserve", 64)
    if naive and fast and naive.result.tokens_per_s:
        a, b = fast.result.tokens_per_s, naive.result.tokens_per_s
        fa, fb = _per_core(fast), _per_core(naive)
        per_core = f" (per server core: {fa / fb:.1f}x)" if fa and fb else ""
        rows.append((
            "gruserve tokens/s at concurrency 64 vs naive", ">= 25x",
            f"{a:.0f} / {b:.0f} = {a / b:.1f}x{per_core}{_others(fast, naive)}",
            "met" if a / b >= 25 else "MISSED",
        ))
    for server in ("gruserve", "gruserve-1"):
        one = _closed(points, server, 1)
        r = one.result if one else None
        if r and r.latency and r.server_total:
            gap = r.latency.p50_ms - r.server_total.p50_ms
            rows.append((
                f"{server}: p50 latency at concurrency 1 vs the engine's own time "
                "(server-reported total_ms p50)", "<= +2 ms",
                f"{r.latency.p50_ms:.2f} - {r.server_total.p50_ms:.2f} = {gap:+.2f} ms"
                f"{_others(one)}",
                "met" if gap <= 2.0 else "MISSED",
            ))
    for p in points:
        r = p.result
        if p.server == "gruserve" and p.fraction == 0.8 and r.latency:
            ratio = r.latency.p99_ms / r.latency.p50_ms
            kept_up = r.throughput_rps / (r.scheduled_rps or r.offered_rps)
            # past saturation everything queues and p99/p50 shrinks again: only a point the
            # server kept up with (achieved ~ offered) says anything about tail latency
            ok = ratio <= 3.0 and r.num_failed == 0 and kept_up >= 0.95
            rows.append((
                "gruserve open loop at 80% of its saturating rate",
                "p99 <= 3x p50, 0 errors (and achieved >= 95% of the scheduled arrivals)",
                f"p50 {r.latency.p50_ms:.1f} ms, p99 {r.latency.p99_ms:.1f} ms "
                f"({ratio:.2f}x), {r.num_failed} errors, achieved {kept_up:.0%} of scheduled"
                f"{_others(p)}",
                "met" if ok else "MISSED",
            ))
    return rows


def render(points: list[Point], plan: Plan, meta: dict) -> str:
    order = list(dict.fromkeys(p.server for p in points))
    points = sorted(points, key=lambda p: order.index(p.server))  # stable: keeps load order
    out = [
        "# Serving benchmark: gruserve vs a naive PyTorch-eager server",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['cpu']} ({meta['cores']} cores), {meta['platform']}",
        f"- date: {meta['date']}",
        f"- software: Python {meta['python']}, torch {meta['torch']}, "
        f"onnxruntime {meta['onnxruntime']}, grpcio {meta['grpcio']}",
        f"- model: untrained NRT, vocab {REFERENCE['ntoken']}, emb {REFERENCE['emsize']}, "
        f"hidden {REFERENCE['hidden_size']}; greedy, {NUM_TOKENS} tokens per request "
        f"({meta['lengths']}); (user, item) pairs drawn uniformly from the bundle's entities",
        f"- each point: {plan.warmup_s:g} s warm-up (excluded), {plan.duration_s:g} s measured; "
        "unary Generate; latency is end to end at the client, from the scheduled send time in "
        "open loop",
        "- the servers run as subprocesses, all started first and measured in turn, point by "
        f"point (interleaved); device `{meta['device']}`; the harness runs in the benchmark "
        "process on the SAME cores, so its CPU (gRPC client, asyncio) is taken from the server's",
        f"- same model, same tokens: naive and gruserve agree on {meta['parity']} sampled pairs",
        "- cpu = cores used during the point by the server / the harness / every other process "
        "on the machine (from /proc; other people's jobs on a shared machine are noise that the "
        "figures carry)" + _interference(points),
        "",
        "## Closed loop",
        "",
        "| server | concurrency | req/s | tokens/s | p50 ms | p99 ms | errors | rows/step "
        "| tokens/s vs naive | tokens/s per server core (vs naive) | cpu |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        r = p.result
        if r.mode != "closed":
            continue
        naive = _closed(points, "naive", r.concurrency)
        naive_tps = naive.result.tokens_per_s if naive else 0.0
        vs = f"{r.tokens_per_s / naive_tps:.1f}x" if naive_tps else "-"
        mine, theirs = _per_core(p), _per_core(naive)
        core = "-" if mine is None else f"{mine:.0f}"
        if mine and theirs:
            core += f" ({mine / theirs:.1f}x)"
        out.append(
            f"| {p.server} | {r.concurrency} | {r.throughput_rps:.1f} | {r.tokens_per_s:.0f} | "
            f"{_ms(r.latency, 'p50_ms')} | {_ms(r.latency, 'p99_ms')} | {r.num_failed} | "
            f"{_rows_per_step(r)} | {vs} | {core} | {_cpu(p)} |"
        )
    out += [
        "",
        "## Open loop (Poisson arrivals; rates are fractions of each server's best closed-loop "
        "throughput)",
        "",
        "| server | offered req/s | scheduled req/s | achieved req/s | tokens/s | p50 ms "
        "| p99 ms | p99/p50 | errors | rows/step | cpu |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        r = p.result
        if r.mode != "open":
            continue
        ratio = f"{r.latency.p99_ms / r.latency.p50_ms:.2f}" if r.latency else "-"
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        out.append(
            f"| {p.server} | {r.offered_rps:.1f} ({p.fraction:.0%}) | {r.scheduled_rps or 0:.1f} | "
            f"{r.throughput_rps:.1f} | "
            f"{r.tokens_per_s:.0f} | {_ms(r.latency, 'p50_ms')} | {_ms(r.latency, 'p99_ms')} | "
            f"{ratio} | {errors} | {_rows_per_step(r)} | {_cpu(p)} |"
        )
    out += ["", "## Goals", "", "| goal | target | measured | verdict |", "|---|---|---|---|"]
    out += [f"| {g} | {t} | {m} | {v} |" for g, t, m, v in goals(points)]
    out.append("")
    return "\n".join(out)


def machine_meta(args) -> dict:
    import grpc
    import onnxruntime
    import torch

    cpu = cpu_model()
    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "cpu": cpu, "cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__,
        "device": args.device,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2-minute smoke run")
    parser.add_argument("--out", default=str(HERE / "results" / "serve.md"))
    parser.add_argument("--json", help="also write every result as JSON here")
    parser.add_argument("--device", default="cpu", help="gruserve --device (default cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="server threads: ORT intra-op / torch (0 = one per core)")
    parser.add_argument("--servers", default="naive,gruserve-1,gruserve",
                        help="comma-separated subset to run")
    parser.add_argument("--num-entities", type=int, default=1000, help="users and items each")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-RPC deadline, s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model dir")
    parser.add_argument("--min-tokens", action="store_true",
                        help="also send min_tokens = max_tokens (every step then runs the TopK "
                        "graph); by default the model's <eos> bias alone fixes the length")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    meta = machine_meta(args)
    meta["lengths"] = (
        f"min_tokens = max_tokens = {NUM_TOKENS}" if args.min_tokens
        else f"max_tokens = {NUM_TOKENS}, <eos> bias -1e4 (no early stop)"
    )
    work = Path(tempfile.mkdtemp(prefix="gruserve-bench-"))
    started = time.monotonic()
    try:
        print(f"building the reference model in {work} ...", flush=True)
        ckpt, bundle = build_reference_model(work, args.num_entities, args.num_entities)
        users, items = read_entities(bundle)
        commands = server_commands(ckpt, bundle, args)
        samples, targets = {}, []
        with contextlib.ExitStack() as stack:
            # all servers up at once (an idle one costs ~nothing), then interleaved points
            for name in args.servers.split(","):
                cmd, metrics_port = commands[name]
                print(f"{name}: {' '.join(cmd[1:])}", flush=True)
                address, pid = stack.enter_context(launched(name, cmd, work / f"{name}.log"))
                samples[name] = sample_tokens(address, users, items)
                targets.append(Target(name, address, pid, metrics_port))
            points = bench_all(targets, plan, users, items, args)
        naive, fast = samples.get("naive", []), samples.get("gruserve", [])
        agree = [a == b for a, b in zip(naive, fast, strict=False)]
        meta["parity"] = f"{sum(agree)}/{len(agree)}" if agree else "(not compared)"
        report = render(points, plan, meta)
        report += f"\nWall time of this run: {time.monotonic() - started:.0f} s.\n"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        if args.json:
            data = [{"server": p.server, "fraction": p.fraction, "cpu_cores": p.cpu,
                     **p.result.to_dict()} for p in points]
            Path(args.json).write_text(json.dumps({"meta": meta, "points": data}, indent=2))
        print(report)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
