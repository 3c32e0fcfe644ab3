"""Engine throughput at the reference sizes, side by side in one run (a benchmark, not a test).

    python bench/engine.py               # ~2.5 minutes on 2 cores; writes bench/results/engine.md
    python bench/engine.py --spinning off  # only the default session options

What runs, on one machine, one after another, with the same thread count:

(a) raw   the ORT step graph alone: StepRunner.step on fixed slots 0..B-1 at batch B, each
          step's next tokens fed back, nothing else (the ceiling the engine can approach);
(b) engine  Engine with C concurrent closed-loop clients in this process's event loop: each
          submits a 15-word greedy request, awaits the result, submits the next. Tokens/s
          counts tokens generated in the measured window (engine.stats), after a warm-up;
          the encoder runs, admissions, stop checks and asyncio delivery are all included;
(c) torch   PyTorch eager, one request at a time: export.model.greedy_decode at batch 1
          (encoder + 15 steps), torch.set_num_threads(ORT's thread count).

The model is an untrained NRT at the reference sizes (vocab 20004, emsize 300, hidden 400),
exported with gruserve.export.bundle_writer.write_bundle. An untrained model may emit <eos>
at any step, which would make requests shorter on one side than the other. To keep the work
identical everywhere, the decoder's output bias of <eos> is set to -1e4 before export: no
side ever picks <eos>, every request yields exactly 15 tokens, and all of them use the cheap
greedy (ArgMax) graph. (Forcing the length with min_tokens=max_tokens=15 instead would make
the engine use the TopK graph, 15-20% slower per step, against a raw ArgMax loop.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from machine import machine_line  # bench/machine.py (scripts run from bench/)
from reference_model import build_reference_model

BATCHES = (1, 64, 256)
# engine rows: the three sizes, and more clients than slots (a queue that never empties)
CLIENTS = (*BATCHES, 288)
NUM_WORDS = 15
NUM_USERS, NUM_ITEMS = 2000, 2000


@dataclass
class Row:
    what: str
    size: int
    tokens_per_s: float
    ms_per_step: float | None = None
    mean_batch: float | None = None
    note: str = ""
    cpu_tokens_per_s: float = 0.0  # tokens per CPU-second of this process (all threads)


def build_bundle(out_dir: Path, seed: int = 0):
    """An untrained reference-size NRT written as a bundle; returns (model, bundle dir)."""
    ref = build_reference_model(out_dir / "nrt-ref", NUM_USERS, NUM_ITEMS, seed)
    return ref.model, ref.bundle


@contextlib.contextmanager
def step_spinning(enabled: bool):
    """Sessions of the step graphs built inside get allow_spinning=1 (bench-only patch)."""
    from gruserve.runtime import runner as runner_mod
    from gruserve.runtime.bundle import STEP_GREEDY, STEP_TOPK

    if not enabled:
        yield
        return
    original_init, original_options = runner_mod._BoundGraph.__init__, runner_mod.session_options
    role = threading.local()

    def init(self, spec, config):
        role.value = spec.role
        try:
            original_init(self, spec, config)
        finally:
            role.value = None

    def options(config):
        opts = original_options(config)
        if getattr(role, "value", None) in (STEP_GREEDY, STEP_TOPK):
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        return opts

    runner_mod._BoundGraph.__init__, runner_mod.session_options = init, options
    try:
        yield
    finally:
        runner_mod._BoundGraph.__init__ = original_init
        runner_mod.session_options = original_options


def bench_raw(runner, bos: int, batch: int, seconds: float) -> Row:
    slots = np.arange(batch, dtype=np.int64)
    users = slots % NUM_USERS
    runner.encode(slots, users, users % NUM_ITEMS)
    tokens = np.full(batch, bos, np.int64)
    for _ in range(3):  # warm-up
        tokens = runner.step(slots, slots, tokens).next_tokens
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        tokens = runner.step(slots, slots, tokens).next_tokens
        steps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and steps >= 10:
            break
    cpu = max(time.process_time() - c0, 1e-9)
    return Row("raw ORT step loop", batch, batch * steps / elapsed, 1e3 * elapsed / steps, batch,
               cpu_tokens_per_s=batch * steps / cpu)


async def _engine_run(runner, info, concurrency: int, warmup_s: float, seconds: float):
    from gruserve.runtime.config import SchedulerConfig
    from gruserve.runtime.core import EngineCore
    from gruserve.runtime.engine import Engine
    from gruserve.runtime.requests import DecodingParams

    engine = Engine(EngineCore(
        runner, info,
        SchedulerConfig(num_slots=runner.num_slots, max_tokens=NUM_WORDS, max_queued=4096),
    ))
    engine.start()
    params = DecodingParams(max_tokens=NUM_WORDS)
    users, items = list(info.users), list(info.items)
    stop = asyncio.Event()
    short = [0]

    # staggered starts, one group of clients per step: requests of equal length admitted
    # together would otherwise finish together forever (lockstep cohorts), unlike real
    # traffic. One task watches the step count (hundreds of polling clients would hog the
    # GIL that the decode thread needs).
    gates = [asyncio.Event() for _ in range(NUM_WORDS)]
    gates[0].set()

    async def release_groups() -> None:
        base = engine.stats.num_steps
        for group in range(1, NUM_WORDS):
            while engine.stats.num_steps < base + group:
                await asyncio.sleep(0.001)
            gates[group].set()

    async def client(k: int) -> None:
        await gates[k % NUM_WORDS].wait()
        i = k
        while not stop.is_set():
            request = engine.make_request(
                "", params, user_id=users[i % len(users)], item_id=items[(7 * i) % len(items)]
            )
            output = await engine.submit(request).result()
            short[0] += len(output.token_ids) != NUM_WORDS
            i += concurrency

    tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
    tasks.append(asyncio.create_task(release_groups()))
    try:
        await asyncio.sleep(warmup_s)
        s0, t0, c0 = _snapshot(engine.stats), time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        s1, t1, c1 = _snapshot(engine.stats), time.perf_counter(), time.process_time()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        engine.stop()
    if not engine.stats.num_requests_finished or engine.error is not None:
        raise RuntimeError(f"engine failed: {engine.error}")
    elapsed = t1 - t0
    steps = s1["num_steps"] - s0["num_steps"]
    tokens = s1["num_tokens"] - s0["num_tokens"]
    rows = s1["num_rows"] - s0["num_rows"]
    ttft_n = s1["num_ttft"] - s0["num_ttft"]
    ttft = (s1["ttft_seconds_total"] - s0["ttft_seconds_total"]) / max(ttft_n, 1)
    note = f"mean TTFT {1e3 * ttft:.1f} ms"
    if short[0]:
        note += f"; {short[0]} requests shorter than {NUM_WORDS} tokens"
    return Row(
        "engine, closed-loop clients", concurrency, tokens / elapsed,
        1e3 * elapsed / max(steps, 1), rows / max(steps, 1), note,
        cpu_tokens_per_s=tokens / max(c1 - c0, 1e-9),
    )


def _snapshot(stats) -> dict:
    return dict(vars(stats))


def bench_engine(runner, info, concurrency: int, warmup_s: float, seconds: float) -> Row:
    return asyncio.run(_engine_run(runner, info, concurrency, warmup_s, seconds))


def bench_torch(model, bos: int, eos: int, threads: int, seconds: float) -> Row:
    import torch

    from gruserve.export.model import greedy_decode

    torch.set_num_threads(threads)
    model.eval()

    def one(i: int) -> int:
        user = torch.tensor([i % NUM_USERS])
        item = torch.tensor([(7 * i) % NUM_ITEMS])
        out, _ = greedy_decode(model, user, item, bos, eos, NUM_WORDS)
        return len(out[0])

    for i in range(2):
        one(i)
    tokens, n, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    while True:
        tokens += one(n)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 5:
            break
    return Row("PyTorch eager, one request at a time", 1, tokens / elapsed,
               1e3 * elapsed / (n * NUM_WORDS), 1, f"{n} requests",
               cpu_tokens_per_s=tokens / max(time.process_time() - c0, 1e-9))


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _ratio(values: list[float], baselines: list[float]) -> float:
    """The median of the per-round ratios (rounds with a zero baseline are left out)."""
    ratios = [v / b for v, b in zip(values, baselines, strict=True) if b > 0]
    return _median(ratios) if ratios else float("nan")


@dataclass
class EngineRun:
    row: Row
    base: float  # raw tokens/s around it: geometric mean of the raw runs just before and after
    base_cpu: float
    torch: float  # PyTorch eager tokens/s of the same round
    torch_cpu: float


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in values)


def table(raw: dict, runs: dict, torch_rows: list[Row], variant: bool) -> tuple[str, tuple]:
    """Medians over rounds; ratios are medians of per-round ratios against raw runs measured
    right before and right after each engine run, so drifts in the machine's load cancel."""
    lines = [
        "| run | batch / clients | tokens/s | tokens per CPU-s | ms/step | mean batch "
        "| vs raw (wall) | vs raw (CPU) | vs PyTorch eager (wall) | tokens/s by round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    torch_tps = [r.tokens_per_s for r in torch_rows]
    for size in BATCHES:
        rows: list[Row] = raw[(variant, size)]
        tps = [r.tokens_per_s for r in rows]
        lines.append(
            f"| {rows[0].what} | {size} | {_median(tps):,.0f} | "
            f"{_median([r.cpu_tokens_per_s for r in rows]):,.0f} | "
            f"{_median([r.ms_per_step for r in rows]):.2f} | {size:.1f} | 1.00x | 1.00x | "
            f"{_median(tps) / _median(torch_tps):.1f}x | {_fmt(tps)} |"
        )
    goals = (0.0, 0.0, 0.0, 0.0)
    for clients in CLIENTS:
        group: list[EngineRun] = runs[(variant, clients)]
        rows = [g.row for g in group]
        tps = [r.tokens_per_s for r in rows]
        vs_raw = _median([g.row.tokens_per_s / g.base for g in group])
        vs_raw_cpu = _median([g.row.cpu_tokens_per_s / g.base_cpu for g in group])
        vs_torch = _median([g.row.tokens_per_s / g.torch for g in group])
        if clients == max(BATCHES):
            vs_torch_cpu = _median([g.row.cpu_tokens_per_s / g.torch_cpu for g in group])
            goals = (vs_raw, vs_raw_cpu, vs_torch, vs_torch_cpu)
        label = rows[0].what
        if clients > max(BATCHES):
            label += f" ({clients} clients on {max(BATCHES)} slots: a queue that never empties)"
        lines.append(
            f"| {label} | {clients} | {_median(tps):,.0f} | "
            f"{_median([r.cpu_tokens_per_s for r in rows]):,.0f} | "
            f"{_median([r.ms_per_step for r in rows]):.2f} | "
            f"{_median([r.mean_batch for r in rows]):.1f} | {vs_raw:.2f}x | {vs_raw_cpu:.2f}x | "
            f"{vs_torch:.1f}x | {_fmt(tps)} |"
        )
    lines.append(
        f"| PyTorch eager, one request at a time | 1 | {_median(torch_tps):,.0f} | "
        f"{_median([r.cpu_tokens_per_s for r in torch_rows]):,.0f} | "
        f"{1e3 / _median(torch_tps):.2f} | 1.0 | - | - | 1.0x | {_fmt(torch_tps)} |"
    )
    return "\n".join(lines), goals


def spinning_table(raw: dict, runs: dict) -> str:
    """allow_spinning=1 against =0, paired per round (the two were measured back to back)."""
    lines = [
        "| size | raw loop, wall | raw loop, tokens per CPU-s | engine, wall "
        "| engine, tokens per CPU-s |",
        "|---|---|---|---|---|",
    ]
    for size in CLIENTS:
        cells = []
        if size in BATCHES:
            on, off = raw[(True, size)][::2], raw[(False, size)][::2]  # the "before" runs
            cells.append(_ratio([r.tokens_per_s for r in on], [r.tokens_per_s for r in off]))
            cells.append(
                _ratio([r.cpu_tokens_per_s for r in on], [r.cpu_tokens_per_s for r in off])
            )
        on_e = [g.row for g in runs[(True, size)]]
        off_e = [g.row for g in runs[(False, size)]]
        cells.append(_ratio([r.tokens_per_s for r in on_e], [r.tokens_per_s for r in off_e]))
        cells.append(
            _ratio([r.cpu_tokens_per_s for r in on_e], [r.cpu_tokens_per_s for r in off_e])
        )
        text = [f"{c:.2f}x" for c in cells]
        if size not in BATCHES:
            text = ["-", "-", *text]
        lines.append(f"| {size} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0,
                        help="ORT intra-op threads and torch threads (0: one per core)")
    parser.add_argument("--seconds", type=float, default=1.0, help="measured window per row")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of every row; the table shows medians")
    parser.add_argument("--spinning", choices=("off", "on", "both"), default="both",
                        help="ORT allow_spinning for the step graph sessions")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from gruserve.runtime.bundle import ModelInfo, load_bundle
    from gruserve.runtime.providers import SessionConfig
    from gruserve.runtime.runner import StepRunner

    threads = args.threads or os.cpu_count() or 1
    started = time.perf_counter()
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.spinning]
    raw: dict[tuple, list[Row]] = {}
    runs: dict[tuple, list[EngineRun]] = {}
    torch_rows: list[Row] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gruserve-bench-") as tmp:
        t = time.perf_counter()
        model, bundle_dir = build_bundle(Path(tmp))
        print(f"# bundle exported in {time.perf_counter() - t:.1f} s", flush=True)
        bundle = load_bundle(bundle_dir)
        info = ModelInfo.from_bundle(bundle)
        bos, eos = info.bos_id, info.eos_id
        config = SessionConfig(device="cpu", intra_op_threads=threads)
        runners = {}
        for spinning in variants:  # one runner (sessions + pool) per variant, built once
            with step_spinning(spinning):
                runners[spinning] = StepRunner(bundle, num_slots=max(BATCHES), config=config)
        for round_index in range(args.rounds):
            torch_row = bench_torch(model, bos, eos, threads, args.seconds)
            torch_rows.append(torch_row)
            print(f"# round {round_index} {torch_row}", flush=True)
            for clients in CLIENTS:
                size = min(clients, max(BATCHES))
                seconds = args.seconds * (0.5 if clients == 1 else 1)
                for spinning, runner in runners.items():
                    before = bench_raw(runner, bos, size, seconds)
                    row = bench_engine(runner, info, clients, warmup_s=0.7, seconds=seconds)
                    after = bench_raw(runner, bos, size, seconds)
                    if clients in BATCHES:
                        raw.setdefault((spinning, size), []).extend([before, after])
                    runs.setdefault((spinning, clients), []).append(EngineRun(
                        row,
                        (before.tokens_per_s * after.tokens_per_s) ** 0.5,
                        (before.cpu_tokens_per_s * after.cpu_tokens_per_s) ** 0.5,
                        torch_row.tokens_per_s,
                        torch_row.cpu_tokens_per_s,
                    ))
                    print(f"# round {round_index} spinning={spinning} raw "
                          f"{before.tokens_per_s:,.0f} / {after.tokens_per_s:,.0f} tokens/s; "
                          f"{row}", flush=True)

    command = "python bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "# Engine throughput (bench/engine.py)",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_line()}; ORT and torch threads: "
        f"{threads}",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- python {platform.python_version()}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, torch {__import__('torch').__version__}, "
        f"numpy {np.__version__}",
        "- model: untrained NRT, vocab 20004, emsize 300, hidden 400; 15 greedy words per "
        "request (<eos> bias -1e4 so that every side generates exactly 15 tokens); "
        "state pool of 256 slots",
        f"- {args.rounds} rounds; each round: PyTorch, then per size and session variant: "
        f"raw, engine, raw again; {args.seconds:g} s windows (half at size 1); engine rows "
        "after a 0.7 s warm-up",
        f"- load average (1 min) at start {load_before[0]:.1f}, at end {os.getloadavg()[0]:.1f}"
        " (other work on the machine makes wall-clock rows noisy: see the per-round figures; "
        "tokens per CPU-second of this process is the contention-robust view)",
        "",
        "Columns: tokens/s and ms/step are medians over rounds; ratios are medians of the "
        "per-round ratios (each engine run against the geometric mean of the raw runs of the "
        "same size just before and just after it). A closed-loop client idles for one step "
        "per request (its result arrives while the next step runs; it rejoins at the one "
        "after), so with as many "
        "clients as slots the engine can reach at most 15/16 = 0.94x of a raw loop; the "
        "288-client row keeps the slots full and shows the engine's own overhead.",
        "",
    ]
    goals = {}
    for spinning in variants:
        text, goals[spinning] = table(raw, runs, torch_rows, spinning)
        parts += [f"## step sessions allow_spinning={'1' if spinning else '0'}", "", text, ""]
    if len(variants) == 2:
        wins = [
            size for size in CLIENTS
            if _ratio([g.row.tokens_per_s for g in runs[(True, size)]],
                      [g.row.tokens_per_s for g in runs[(False, size)]]) > 1.05
        ]
        parts += [
            "## allow_spinning=1 for the step sessions, relative to 0 (paired per round)",
            "",
            spinning_table(raw, runs),
            "",
            "Engine sizes where spinning is more than 5% faster on the wall clock: "
            f"{', '.join(map(str, wins)) if wins else 'none'}. Spinning always costs more CPU "
            "per token: on 2 cores the spinning worker competes with the decode thread's "
            "Python, the event loop and anything else on the machine.",
            "",
        ]
    summary = [
        "## Summary (engine at 256 concurrent requests)",
        "",
        "| step sessions | vs raw ORT loop at batch 256, wall (goal >= 0.85x) | same, per "
        "CPU-s | vs PyTorch eager one at a time, wall (goal >= 25x) | same, per CPU-s |",
        "|---|---|---|---|---|",
    ]
    for spinning, (vs_raw, vs_raw_cpu, vs_torch, vs_torch_cpu) in goals.items():
        summary.append(
            f"| allow_spinning={'1' if spinning else '0'}{'' if spinning else ' (default)'} "
            f"| **{vs_raw:.2f}x** | {vs_raw_cpu:.2f}x | **{vs_torch:.1f}x** | "
            f"{vs_torch_cpu:.1f}x |"
        )
    report = "\n".join(parts + summary) + "\n"
    print(f"# total {time.perf_counter() - started:.0f} s\n")
    print(report)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
