"""Serving benchmark: gruserve against what its users would otherwise run, side by side.

    make bench-env                  # once: the Triton environment, .venv-triton (see below)
    python bench/serve.py           # the full run: ~25-30 minutes on 2 cores (estimate printed)
    python bench/serve.py --quick   # ~3 minutes: 2 workloads, c = 1 and 64, short points
                                    # (writes bench/results/serve-quick.*, never committed)
    python bench/serve.py --systems gruserve-unary,triton-compact --workloads uniform-greedy \\
        --concurrency 64            # any part of the grid
    python bench/serve.py --list    # systems, workloads, the plan and its time, then exit

Writes bench/results/serve.json (one row per system, workload, load and concurrency) and
bench/results/serve.md (the tables), and prints the machine: CPU model and the ISA flags
that decide ORT's speed (avx512f, avx512_vnni, avx_vnni, amx).

Systems (every server a process of its own, started once; clients in processes of their own):

  naive            bench/naive_server.py: PyTorch eager, one request at a time
  triton-plain     Triton (PyTriton) + dynamic batcher, the bound Python function decoding
                   its batch in ORT until the longest member is done (bench/triton_peer.py)
  triton-compact   the same, dropping finished rows each step
  gruserve-unary   gruserve, Generate
  gruserve-stream  gruserve, GenerateStream
  gruserve-batch   gruserve, GenerateBatch with up to --batch-size requests per call
                   (concurrency C: C requests in flight, as min(C, N)-request calls)
  raw              the raw ORT step loop, continuous batching with no server (bench/raw_loop.py)

All decode the same bundle with gruserve's StepRunner (ORT, I/O binding, state pool), except
naive (torch). Workloads are in bench/workloads.py: request i is the same for every system.

Each workload is measured closed loop at each concurrency (1, 16, 64, 256), the systems
interleaved point by point (system A at c=1, B at c=1, ..., A at c=16, ...) so that a drift
in the machine's load hits them alike; then open loop (Poisson arrivals, latency from the
scheduled time) at --open-fraction (80%) of each system's best closed-loop request rate.
--rounds R repeats the whole grid and reports medians. tokens/s counts the tokens of the
requests completed inside the measured window (useful tokens: no padding, no finished rows).
Closed-loop workers (and the raw loop's rows) start spread over the first half of the
warm-up: started together, fixed-length requests stay in lockstep cohorts, and a short
window would count whole cohorts (+-25% at c=64 in 4 s).

The Triton environment: tritonclient pins protobuf < 7 and gruserve's generated code needs
>= 7.35, so the Triton server and its client run in a second virtual environment (the `bench`
dependency group of pyproject.toml, plus gruserve itself without its dependencies, for the
StepRunner). `--triton-python` points elsewhere; without it, leave the Triton systems out.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from machine import isa_flags, machine_line
from reference_model import REFERENCE, build_reference_model
from serve_report import aggregate, render
from worker import Worker, WorkerError
from workloads import WORKLOADS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARITY_COUNT = 8


@dataclass(frozen=True)
class System:
    name: str
    server: str  # naive | triton | gruserve | raw
    api: str  # unary | stream | batch
    model: str | None = None  # Triton's model name
    open_loop: bool = True


SYSTEMS = {s.name: s for s in (
    System("naive", "naive", "unary"),
    System("triton-plain", "triton", "unary", "nrt_plain"),
    System("triton-compact", "triton", "unary", "nrt_compact"),
    System("gruserve-unary", "gruserve", "unary"),
    System("gruserve-stream", "gruserve", "stream"),
    System("gruserve-batch", "gruserve", "batch"),
    System("raw", "raw", "unary", open_loop=False),  # no server: nothing to send arrivals to
)}


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    duration_s: float
    concurrencies: tuple[int, ...]
    workloads: tuple[str, ...]
    open_fraction: float | None  # of the best closed-loop request rate; None: no open loop
    rounds: int = 1


FULL = Plan(1.5, 4.0, (1, 16, 64, 256), tuple(WORKLOADS), 0.8)
QUICK = Plan(0.5, 2.0, (1, 64), ("uniform-greedy", "geometric-mixed"), 0.8)
# per point, beyond warm-up and window: the drain (the last requests in flight) and the
# client's setup, measured in --quick runs on the 2-core machine
POINT_OVERHEAD_S = 1.3


def estimate_s(plan: Plan, systems: list[System]) -> float:
    closed = len(plan.concurrencies) * len(systems)
    opened = sum(s.open_loop for s in systems) if plan.open_fraction else 0
    points = plan.rounds * len(plan.workloads) * (closed + opened)
    return points * (plan.warmup_s + plan.duration_s + POINT_OVERHEAD_S) + 90  # + start-up


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(name: str, cmd: list[str], log_path: Path, env: dict | None = None,
             timeout_s: float = 300.0):
    """Starts a server that prints '...serving ... on HOST:PORT' when ready; yields
    (HOST:PORT, pid); SIGTERM (then SIGKILL after 30 s) on the way out."""
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:  # keeps reading: a server's chatty stdout never fills the pipe
        for line in proc.stdout:
            lines.put(line)
            log.write(line)
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
            match = re.search(r"serving .* on (\S+:\d+)\s*$", line)
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


@dataclass(frozen=True)
class Server:
    address: str
    pid: int
    metrics_url: str | None = None


def start_servers(stack, servers: set[str], model, work: Path, args) -> dict[str, Server]:
    py, threads = sys.executable, str(args.threads)
    out: dict[str, Server] = {}
    if "naive" in servers:
        cmd = [py, str(HERE / "naive_server.py"), str(model.checkpoint), "--port", "0",
               "--threads", threads]
        out["naive"] = Server(*stack.enter_context(launched("naive", cmd, work / "naive.log")))
    if "gruserve" in servers:
        port = free_port()
        cmd = [py, "-m", "gruserve.runtime", "--log-level", "WARNING", "serve", str(model.bundle),
               "--port", "0", "--device", "cpu", "--threads", threads, "--num-slots", "256",
               "--grace", "2", "--metrics-port", str(port),
               # the engine is measured: repeated pairs must be decoded, not replayed
               "--cache-size", "0"]
        address, pid = stack.enter_context(launched("gruserve", cmd, work / "gruserve.log"))
        out["gruserve"] = Server(address, pid, f"http://127.0.0.1:{port}/metrics")
    if "triton" in servers:
        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        cmd = [args.triton_python, str(HERE / "triton_peer.py"), str(model.bundle),
               "--grpc-port", str(grpc_port), "--http-port", str(http_port),
               "--metrics-port", str(metrics_port), "--threads", threads,
               "--max-queue-delay-us", str(args.triton_queue_delay_us),
               "--instances", str(args.triton_instances)]
        address, pid = stack.enter_context(launched("triton", cmd, work / "triton.log"))
        out["triton"] = Server(address, pid, f"http://127.0.0.1:{metrics_port}/metrics")
    return out


def start_workers(stack, servers: set[str], model, work: Path, args) -> dict[str, Worker]:
    from gruserve.runtime.loadtest import read_entities

    users, items = read_entities(model.bundle)
    wanted = {"main": servers & {"naive", "gruserve"}, "triton": servers & {"triton"},
              "raw": servers & {"raw"}}
    out = {}
    for name, needed in wanted.items():
        if not needed:
            continue
        script = HERE / ("raw_loop.py" if name == "raw" else "load_client.py")
        python = args.triton_python if name == "triton" else sys.executable
        worker = Worker(f"{name} worker", [python, str(script)], work / f"{name}-worker.log")
        stack.callback(worker.close)
        if name == "raw":
            worker.ask({"cmd": "setup", "bundle": str(model.bundle), "threads": args.threads})
        else:
            worker.ask({"cmd": "setup", "users": users, "items": items})
        out[name] = worker
    return out


# --- points ------------------------------------------------------------------------------------


@dataclass
class Context:
    plan: Plan
    servers: dict[str, Server]
    workers: dict[str, Worker]
    args: argparse.Namespace

    def worker_for(self, system: System) -> Worker:
        if system.server == "raw":
            return self.workers["raw"]
        return self.workers["triton" if system.server == "triton" else "main"]


def _command(ctx: Context, system: System, workload: str, concurrency: int | None,
             rate: float | None) -> dict:
    plan, args = ctx.plan, ctx.args
    cmd = {"cmd": "run", "system": system.server, "api": system.api, "workload": workload,
           "seed": args.seed, "warmup_s": plan.warmup_s, "duration_s": plan.duration_s,
           "timeout_s": args.timeout}
    if system.server != "raw":
        server = ctx.servers[system.server]
        cmd.update(target=server.address, server_pids=[server.pid], model=system.model,
                   metrics_url=server.metrics_url)
    if system.api == "batch":
        cmd["batch_size"] = min(args.batch_size, concurrency or args.batch_size)
    if concurrency is not None:  # C requests in flight; GenerateBatch: C / N calls of N
        cmd["concurrency"] = max(1, concurrency // cmd.get("batch_size", 1))
        cmd["stagger_s"] = plan.warmup_s / 2  # see load_client.Staggered
    else:
        cmd["rate"] = rate / cmd.get("batch_size", 1)
    return cmd


def run_point(ctx: Context, system: System, workload: str, round_index: int, *,
              concurrency: int | None = None, rate: float | None = None,
              fraction: float | None = None) -> dict:
    point = {"system": system.name, "server": system.server, "api": system.api,
             "workload": workload, "load": "closed" if concurrency else "open",
             "concurrency": concurrency, "offered_rps": rate, "fraction": fraction,
             "round": round_index}
    cmd = _command(ctx, system, workload, concurrency, rate)
    limit = ctx.plan.warmup_s + ctx.plan.duration_s + ctx.args.timeout + 60
    try:
        reply = ctx.worker_for(system).ask(cmd, timeout_s=limit)
    except WorkerError as exc:
        point["error"] = str(exc)
        print(f"  {system.name:<16} {workload:<17} FAILED: {exc}", flush=True)
        return point
    point.update(_figures(reply))
    print_point(point)
    return point


def _figures(reply: dict) -> dict:
    r = reply["result"]
    m = r["metrics"]
    return {
        "tokens_per_s": r["tokens_per_s"], "rps": r["throughput_rps"],
        "num_sent": r["num_sent"], "num_failed": r["num_failed"], "errors": r["errors"],
        "p50_ms": m["p50_ms"], "p90_ms": m["p90_ms"], "p99_ms": m["p99_ms"],
        "ttft_p50_ms": m["ttft_p50_ms"], "ttft_p99_ms": m["ttft_p99_ms"],
        "ttft_source": r["ttft_source"] if m["ttft_p50_ms"] is not None else None,
        "server_total_p50_ms": m["server_p50_ms"], "call_p50_ms": m["call_p50_ms"],
        "batch_size": r["batch_size"], "scheduled_rps": r["scheduled_rps"],
        "server_cpu_cores": reply["cpu"]["server"], "client_cpu_cores": reply["cpu"]["client"],
        "others_cpu_cores": reply["cpu"].get("others"), **reply["server_stats"],
    }


def _ms(value) -> str:
    return "     -" if value is None else f"{value:6.1f}"


def print_point(p: dict) -> None:
    load = f"c={p['concurrency']}" if p["load"] == "closed" else f"{p['offered_rps']:.0f}/s"
    print(f"  {p['system']:<16} {p['workload']:<17} {load:<8} {p['tokens_per_s']:8.0f} tok/s"
          f"  p50 {_ms(p['p50_ms'])}  p99 {_ms(p['p99_ms'])} ms  ttft p50 {_ms(p['ttft_p50_ms'])}"
          f"  cpu {p['server_cpu_cores']:.2f}/{p['client_cpu_cores']:.2f}"
          f"  err {p['num_failed']}", flush=True)


def bench_all(ctx: Context, systems: list[System]) -> list[dict]:
    points = []
    for round_index in range(ctx.plan.rounds):
        for workload in ctx.plan.workloads:
            print(f"# round {round_index}, {workload}: {WORKLOADS[workload].describe()}",
                  flush=True)
            closed = []
            for c in ctx.plan.concurrencies:
                for system in systems:
                    closed.append(run_point(ctx, system, workload, round_index, concurrency=c))
            points += closed
            if ctx.plan.open_fraction is None:
                continue
            for system in systems:
                best = max((p.get("rps", 0.0) for p in closed if p["system"] == system.name),
                           default=0.0)
                if system.open_loop and best > 0:
                    points.append(run_point(
                        ctx, system, workload, round_index, rate=best * ctx.plan.open_fraction,
                        fraction=ctx.plan.open_fraction,
                    ))
    return points


# --- same model, same tokens -------------------------------------------------------------------


def parity(ctx: Context, systems: list[System]) -> dict[str, str]:
    """Requests 0..7 of 'uniform-mixed' (greedy and sampled ones) from every server, against
    gruserve: the Triton peers share gruserve's sampler and must match every request; naive
    samples with torch's RNG, so only its greedy requests can match. Lengths must all be
    the requested ones (the <eos> bias)."""
    from workloads import RequestSequence

    from gruserve.runtime.loadtest import read_entities

    users, items = read_entities(ctx.args.bundle)
    specs = [RequestSequence(WORKLOADS["uniform-mixed"], users, items, ctx.args.seed).spec(i)
             for i in range(PARITY_COUNT)]
    tokens = {}
    for system in systems:  # every server once; gruserve's three APIs decode alike
        name = "gruserve" if system.server == "gruserve" else system.name
        if system.server == "raw" or name in tokens:
            continue
        server = ctx.servers[system.server]
        cmd = {"cmd": "tokens", "system": system.server, "target": server.address,
               "model": system.model, "workload": "uniform-mixed", "seed": ctx.args.seed,
               "count": PARITY_COUNT}
        tokens[name] = ctx.worker_for(system).ask(cmd, timeout_s=300)["tokens"]
    out = {}
    for name, got in tokens.items():
        lengths_ok = sum(len(t) == s.max_tokens for t, s in zip(got, specs, strict=True))
        text = f"lengths {lengths_ok}/{len(specs)} as requested"
        reference = tokens.get("gruserve")
        if reference is not None and name != "gruserve":
            pairs = [(a, b) for a, b, s in zip(got, reference, specs, strict=True)
                     if name != "naive" or not s.sample]
            same = sum(a == b for a, b in pairs)
            kind = "greedy requests" if name == "naive" else "requests (greedy and sampled)"
            text += f"; same tokens as gruserve on {same}/{len(pairs)} {kind}"
        out[name] = text
    return out


# --- the run -----------------------------------------------------------------------------------


def _versions(args, servers: set[str]) -> dict[str, str]:
    import grpc
    import onnxruntime
    import torch

    out = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
           "torch": torch.__version__, "grpcio": grpc.__version__}
    if "triton" in servers:
        code = ("import importlib.metadata as m; print(m.version('nvidia-pytriton'), "
                "m.version('tritonclient'))")
        text = subprocess.run([args.triton_python, "-c", code], capture_output=True,
                              text=True, check=True).stdout.split()
        out["nvidia-pytriton"], out["tritonclient"] = text
    return out


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan, list[System]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="systems: " + ", ".join(SYSTEMS)
        + "; workloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true",
                        help="a short check: 2 workloads, c = 1 and 64, 0.5 + 2 s points")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--workloads", help="comma-separated subset (default: the plan's)")
    parser.add_argument("--concurrency", help="comma-separated, e.g. 1,64 (default: the plan's)")
    parser.add_argument("--rounds", type=int, help="repeat the grid; medians are reported")
    parser.add_argument("--warmup", type=float, help="seconds per point, excluded")
    parser.add_argument("--duration", type=float, help="measured seconds per point")
    parser.add_argument("--open-fraction", type=float,
                        help="open-loop rate as a fraction of the best closed-loop rate "
                        "(default 0.8; 0: no open loop)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="gruserve-batch: most requests per GenerateBatch call (default 16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="every server's ORT intra-op / torch threads (0 = one per core)")
    parser.add_argument("--triton-python", default=str(ROOT / ".venv-triton" / "bin" / "python"),
                        help="the Triton environment's interpreter (default .venv-triton)")
    parser.add_argument("--triton-queue-delay-us", type=int, default=0,
                        help="Triton dynamic batcher's max_queue_delay_microseconds (default 0)")
    parser.add_argument("--triton-instances", type=int, default=1,
                        help="Triton model instances per model (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, s")
    parser.add_argument("--num-entities", type=int, default=2000, help="users and items each")
    parser.add_argument("--json-out", help="default bench/results/serve.json "
                        "(--quick: serve-quick.json, so a check never replaces a recorded run)")
    parser.add_argument("--md-out", help="default bench/results/serve.md (--quick: serve-quick.md)")
    parser.add_argument("--keep", action="store_true", help="keep the model and the logs")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    stem = "serve-quick" if args.quick else "serve"
    args.json_out = args.json_out or str(HERE / "results" / f"{stem}.json")
    args.md_out = args.md_out or str(HERE / "results" / f"{stem}.md")
    try:
        systems = [SYSTEMS[s] for s in _names(args.systems)]
        changes = {}
        if args.workloads:
            changes["workloads"] = tuple(_check(_names(args.workloads), WORKLOADS, "--workloads"))
        if args.concurrency:
            changes["concurrencies"] = tuple(int(c) for c in _names(args.concurrency))
            if min(changes["concurrencies"]) < 1 or max(changes["concurrencies"]) > 256:
                raise ValueError("--concurrency: each in 1..256 (256 slots everywhere)")
    except KeyError as exc:
        parser.error(f"--systems: unknown system {exc}; known: {', '.join(SYSTEMS)}")
    except ValueError as exc:
        parser.error(str(exc))
    for name, field, check in (("rounds", "rounds", lambda v: v >= 1),
                               ("warmup", "warmup_s", lambda v: v >= 0),
                               ("duration", "duration_s", lambda v: v > 0)):
        value = getattr(args, name)
        if value is not None:
            if not check(value):
                parser.error(f"--{name}: out of range")
            changes[field] = value
    if args.open_fraction is not None:
        if not 0 <= args.open_fraction <= 2:
            parser.error("--open-fraction: in 0..2")
        changes["open_fraction"] = args.open_fraction or None
    if args.batch_size < 1 or args.triton_instances < 1:
        parser.error("--batch-size and --triton-instances: must be >= 1")
    if any(s.server == "triton" for s in systems) and not args.list and not Path(
        args.triton_python
    ).exists():
        parser.error(f"the Triton systems need the Triton environment ({args.triton_python} is "
                     "missing): run `make bench-env`, pass --triton-python, or leave "
                     "triton-plain,triton-compact out of --systems")
    return args, replace(plan, **changes), systems


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _check(names: list[str], known: dict, flag: str) -> list[str]:
    for name in names:
        if name not in known:
            raise ValueError(f"{flag}: unknown {name!r}; known: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args, plan, systems = parse_args(argv)
    print(f"machine: {machine_line()}", flush=True)
    print(f"plan: {len(plan.workloads)} workloads x concurrency {plan.concurrencies} x "
          f"{len(systems)} systems, {plan.warmup_s:g} + {plan.duration_s:g} s points, "
          f"open loop at {plan.open_fraction or 0:.0%}, {plan.rounds} round(s): about "
          f"{estimate_s(plan, systems) / 60:.0f} minutes", flush=True)
    if args.list:
        for w in plan.workloads:
            print(f"  {w:<17} {WORKLOADS[w].describe()}")
        return 0
    servers = {s.server for s in systems}
    work = Path(tempfile.mkdtemp(prefix="gruserve-serve-bench-"))
    started = time.monotonic()
    try:
        print(f"building the reference model in {work} ...", flush=True)
        model = build_reference_model(work / "model", args.num_entities, args.num_entities)
        args.bundle = model.bundle
        with contextlib.ExitStack() as stack:
            ctx = Context(plan, start_servers(stack, servers, model, work, args),
                          start_workers(stack, servers, model, work, args), args)
            checks = parity(ctx, systems)
            for name, text in checks.items():
                print(f"  parity {name}: {text}", flush=True)
            points = bench_all(ctx, systems)
        meta = {
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)]
                                            + (argv if argv is not None else sys.argv[1:])),
            "machine": machine_line(), "isa": isa_flags(), "cores": os.cpu_count(),
            "platform": f"{platform.system()} {platform.release()}",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": _versions(args, servers), "model": REFERENCE,
            "plan": {**plan.__dict__, "batch_size": args.batch_size,
                     "triton_queue_delay_us": args.triton_queue_delay_us,
                     "triton_instances": args.triton_instances,
                     "threads": args.threads or os.cpu_count()},
            "workloads": {w: WORKLOADS[w].describe() for w in plan.workloads},
            "parity": checks, "wall_s": round(time.monotonic() - started),
        }
        rows = aggregate(points)
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(
            json.dumps({"meta": meta, "rows": rows, "points": points}, indent=1) + "\n")
        report = render(meta, rows)
        Path(args.md_out).write_text(report)
        print(report)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
