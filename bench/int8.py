"""Benchmark: int8 beside fp32 on the CPU provider, side by side in one run (not a test).

    python bench/int8.py            # ~8 minutes on 2 cores; writes bench/results/int8.md
    python bench/int8.py --quick    # short windows, one round, 64 pairs: checks the script

Four parts, one machine, one thread count:

1. variants: the reference-size greedy step graph quantized each way the choice was made
   among, ms per step at B = 1, 16, 64, 256 (pool of 256 slots; variants interleaved
   within each repetition, medians). With a trained checkpoint also each variant's quality
   against PyTorch fp32 along PyTorch's greedy decodes of --samples pairs (teacher forced):
   token agreement, max |log-prob error|, and how far a row's log-probs move when it runs
   alone instead of inside a batch of 64 (batch dependence; 0 means batch-invariant).
2. engine: fp32 and int8 bundles of one untrained reference-size NRT (<eos> bias -1e4, so
   every request is exactly 15 greedy tokens on both sides; bench/engine.py does the same),
   the Engine at 256 concurrent closed-loop clients and at 1 (its request latency), the raw
   step loop at batch 256 and 1 for scale; fp32 and int8 alternate within each round and
   the ratios are medians of the per-round ratios. Goals: int8 >= 1.6x fp32 tokens/s at 256,
   concurrency-1 latency <= 0.5x fp32's.
2b. server: the same two bundles behind `gruserve serve` (one process each, both up at
   once), `gruserve loadtest` in its own process at concurrency 64 and 1 against each in
   turn, alternating by round: tokens/s, p50 and p99 over real gRPC.
3. reference model (needs --checkpoint and --data, by default what bench/train_reference.py
   keeps in ~/.cache/gruserve/reference): `export_bundle(precision="int8")` as the CLI runs
   it, with its verify report: token agreement, max log-prob error, and the test split's
   perplexity, BLEU-1/4, FMR, RMSE of the int8 bundle beside PyTorch fp32's.

Without a trained checkpoint, parts 1 and 2 run on a random model (the agreement of an
untrained model is no quality figure: its top two logits are near-ties) and part 3 is left
out. The MatMulNBits rows need onnx-ir, which ORT's quantizer imports and nothing else in
gruserve does (`.venv/bin/pip install onnx-ir`); without it they are listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from engine import NUM_ITEMS, NUM_USERS, NUM_WORDS, bench_engine, bench_raw  # bench/engine.py
from machine import machine_line  # bench/machine.py (scripts run from bench/)
from reference_model import build_reference_model

from gruserve.export import onnx_graphs as og
from gruserve.export import quantize
from gruserve.export.bundle_eval import with_log_probs
from gruserve.export.checkpoint import load_checkpoint
from gruserve.export.model import NRT, greedy_decode, nrt_weights
from gruserve.export.parity import verify_pairs
from gruserve.runtime.providers import SessionConfig, session_options

RESULTS = Path(__file__).resolve().parent / "results" / "int8.md"
REFERENCE = Path.home() / ".cache" / "gruserve" / "reference"
BATCHES = (1, 16, 64, 256)
NUM_SLOTS = 256
ALL_MATMULS = (quantize.VOCAB_PROJECTION, "gru.weight_ih_t", quantize.GRU_HIDDEN)


# --- part 1: the variants ---------------------------------------------------------------------


def _ort_dynamic(graph: onnx.ModelProto, reduce_range: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.onnx"
        quantize_dynamic(graph, path, op_types_to_quantize=["MatMul"], per_channel=True,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8)
        return onnx.load(str(path))


def _nbits(graph: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(graph)
    q = MatMulNBitsQuantizer(copy, bits=bits, block_size=32, is_symmetric=True,
                             accuracy_level=4)
    q.process()
    return q.model.model


VARIANTS = {
    "fp32": lambda g: g,
    "int8 gruserve: vocab projection, fp32 rescoring (chosen)": quantize.quantize_step_graph,
    "int8 gruserve: vocab projection, int8 ArgMax": lambda g: quantize.quantize_step_graph(
        g, rescore=0),
    "int8 gruserve: vocab + GRU hidden": lambda g: quantize.quantize_step_graph(
        g, (quantize.VOCAB_PROJECTION, quantize.GRU_HIDDEN)),
    "ORT quantize_dynamic per-channel, all MatMuls": lambda g: _ort_dynamic(g, False),
    "ORT quantize_dynamic per-channel reduce_range": lambda g: _ort_dynamic(g, True),
    "MatMulNBits 8-bit, accuracy_level 4": lambda g: _nbits(g, 8),
    "MatMulNBits 4-bit, accuracy_level 4": lambda g: _nbits(g, 4),
}


def build_variants(model: NRT, config: SessionConfig) -> tuple[dict, list[str]]:
    """name -> session of the greedy step graph with a log-prob output; and what was skipped."""
    base = og.build_step_graph(nrt_weights(model), og.StepGraphOptions())
    sessions, skipped = {}, []
    for name, make in VARIANTS.items():
        try:
            graph = with_log_probs(make(base))
        except ImportError as exc:
            skipped.append(f"{name}: {exc} (pip install onnx-ir)")
            continue
        sessions[name] = ort.InferenceSession(
            graph.SerializeToString(), session_options(config), providers=["CPUExecutionProvider"]
        )
    return sessions, skipped


def _feeds(pool: np.ndarray, tokens: np.ndarray) -> dict:
    rows = np.arange(len(tokens), dtype=np.int64)
    return {og.POOL: pool, og.READ_SLOTS: rows, og.WRITE_SLOTS: rows, og.TOKENS: tokens}


def time_variants(sessions: dict, hidden: int, vocab: int, reps: int) -> dict:
    """{(name, B): median ms per step}; variants interleaved within each repetition."""
    rng = np.random.default_rng(0)
    out = {}
    for batch in BATCHES:
        pool = np.tanh(rng.standard_normal((1, max(batch, NUM_SLOTS), hidden))).astype(np.float32)
        rows = np.arange(batch, dtype=np.int64)
        feeds = {og.POOL: pool, og.READ_SLOTS: rows, og.WRITE_SLOTS: rows,
                 og.TOKENS: rng.integers(4, vocab, batch)}
        times = {name: [] for name in sessions}
        for rep in range(reps + 3):
            for name, session in sessions.items():
                t0 = time.perf_counter()
                session.run([og.NEXT_TOKEN], feeds)
                if rep >= 3:  # warm-up
                    times[name].append(time.perf_counter() - t0)
        for name, values in times.items():
            out[(name, batch)] = 1e3 * float(np.median(values))
    return out


@torch.no_grad()
def variant_quality(sessions: dict, model: NRT, samples: int) -> dict:
    """{name: (token agreement, max |log-prob error|, batch dependence)} along PyTorch's
    greedy decodes (teacher forced) of the verify pairs."""
    from gruserve.export.vocab import SPECIAL_TOKENS, Vocabulary

    cfg, specials = model.config, Vocabulary(SPECIAL_TOKENS)
    bos, eos = specials.bos_id, specials.eos_id
    users, items = verify_pairs(cfg.num_users, cfg.num_items, samples, seed=0)
    stats = {name: [0, 0, 0.0, 0.0] for name in sessions}
    for start in range(0, samples, 64):
        u, i = torch.as_tensor(users[start:start + 64]), torch.as_tensor(items[start:start + 64])
        expected, _ = greedy_decode(model, u, i, bos, eos, cfg.max_len)
        targets = [w + [eos] if len(w) < cfg.max_len else w for w in expected]
        _, hidden = model.encoder(u, i)
        tokens = np.full(len(u), bos, dtype=np.int64)
        pools = {name: hidden.numpy().copy() for name in sessions}
        for t in range(max(len(x) for x in targets)):
            active = np.array([len(x) > t for x in targets])
            want = np.array([x[t] if len(x) > t else eos for x in targets], dtype=np.int64)
            log_probs, hidden = model.decoder(torch.as_tensor(tokens)[:, None], hidden)
            reference = log_probs[:, 0].numpy()
            for name, session in sessions.items():
                before = pools[name]
                pools[name], nxt, lp = session.run(
                    [og.POOL_OUT, og.NEXT_TOKEN, "log_probs"], _feeds(before, tokens)
                )
                s = stats[name]
                s[0] += int(active.sum())
                s[1] += int((nxt[active] == want[active]).sum())
                s[2] = max(s[2], float(np.abs(lp[active] - reference[active]).max()))
                if start == 0 and t == 0:  # the same rows alone: does a row depend on its batch?
                    for row in (0, len(u) // 2):
                        (alone,) = session.run(
                            ["log_probs"], _feeds(before[:, [row]], tokens[[row]])
                        )
                        s[3] = max(s[3], float(np.abs(alone[0] - lp[row]).max()))
            tokens = want
    return {name: (s[1] / s[0], s[2], s[3]) for name, s in stats.items()}


def variants_section(model: NRT, trained: bool, config: SessionConfig, reps: int,
                     samples: int) -> str:
    sessions, skipped = build_variants(model, config)
    cfg = model.config
    times = time_variants(sessions, cfg.hidden_size, cfg.ntoken, reps)
    quality = variant_quality(sessions, model, samples) if trained else {}
    head = "| variant | " + " | ".join(f"B={b} ms (vs fp32)" for b in BATCHES)
    head += " | token agreement | max log-prob error | batch dependence |" if quality else " |"
    lines = [head, "|---" * (len(BATCHES) + 1 + (3 if quality else 0)) + "|"]
    for name in sessions:
        cells = [f"{times[(name, b)]:.2f} ({times[(name, b)] / times[('fp32', b)]:.2f}x)"
                 for b in BATCHES]
        if quality:
            agree, err, batch_dep = quality[name]
            cells += [f"{100 * agree:.2f}%", f"{err:.3g}", f"{batch_dep:.3g}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"\nskipped: {s}" for s in skipped]
    return "\n".join(lines)


# --- part 2: the engine ---------------------------------------------------------------------


def engine_section(tmp: Path, config: SessionConfig, rounds: int, seconds: float) -> tuple:
    from gruserve.export.bundle_writer import write_bundle
    from gruserve.runtime.bundle import ModelInfo, load_bundle
    from gruserve.runtime.runner import StepRunner

    ref = build_reference_model(tmp / "nrt-ref", NUM_USERS, NUM_ITEMS)
    fp32_dir = ref.bundle
    int8_dir = write_bundle(load_checkpoint(ref.checkpoint), tmp / "nrt-ref-int8", top_k=64,
                            precision="int8")
    runners, infos = {}, {}
    for name, path in (("fp32", fp32_dir), ("int8", int8_dir)):
        bundle = load_bundle(path)
        runners[name] = StepRunner(bundle, num_slots=NUM_SLOTS, config=config)
        infos[name] = ModelInfo.from_bundle(bundle)
    bos = infos["fp32"].bos_id
    rows: dict[tuple, list] = {}
    for r in range(rounds):
        for concurrency in (NUM_SLOTS, 1):
            for name in ("fp32", "int8"):
                window = seconds * (0.5 if concurrency == 1 else 1)
                raw = bench_raw(runners[name], bos, concurrency, window)
                row = bench_engine(runners[name], infos[name], concurrency, 0.7, window)
                rows.setdefault((name, concurrency, "raw"), []).append(raw.tokens_per_s)
                rows.setdefault((name, concurrency, "engine"), []).append(row.tokens_per_s)
                print(f"# round {r} {name} c={concurrency}: raw {raw.tokens_per_s:,.0f}, "
                      f"engine {row.tokens_per_s:,.0f} tokens/s", flush=True)
    lines = ["| run | concurrency | fp32 tokens/s | int8 tokens/s | int8 / fp32 (median of rounds) "
             "| request latency fp32 -> int8 (15 tokens) | goal |", "|---|---|---|---|---|---|---|"]
    goals = {}
    for what in ("engine", "raw"):
        for concurrency in (NUM_SLOTS, 1):
            fp32, int8 = rows[("fp32", concurrency, what)], rows[("int8", concurrency, what)]
            ratio = float(np.median([b / a for a, b in zip(fp32, int8, strict=True)]))
            latency = ""
            goal = "-"
            if what == "engine":
                goals[concurrency] = ratio
                goal = ">= 1.6x" if concurrency > 1 else "latency <= 0.5x (tokens/s >= 2x)"
            if concurrency == 1:
                latency = (f"{1e3 * NUM_WORDS / np.median(fp32):.1f} -> "
                           f"{1e3 * NUM_WORDS / np.median(int8):.1f} ms ({1 / ratio:.2f}x)")
            label = "engine, closed-loop clients" if what == "engine" else "raw ORT step loop"
            lines.append(f"| {label} | {concurrency} | {np.median(fp32):,.0f} | "
                         f"{np.median(int8):,.0f} | **{ratio:.2f}x** | {latency} | {goal} |")
    return "\n".join(lines), goals, {"fp32": fp32_dir, "int8": int8_dir}


# --- part 2b: the same two bundles behind gruserve serve, over gRPC ------------------------


def server_section(tmp: Path, bundles: dict[str, Path], threads: int, rounds: int,
                   seconds: float) -> str:
    """Both bundles served at once (an idle server costs nothing), `gruserve loadtest` in its
    own process against each in turn, the order alternating by round."""
    import json
    import subprocess

    from serve import launched  # bench/serve.py

    figures: dict[tuple, list] = {}
    with contextlib.ExitStack() as stack:
        targets = {}
        for name, path in bundles.items():
            cmd = [sys.executable, "-m", "gruserve.runtime", "--log-level", "WARNING", "serve",
                   str(path), "--port", "0", "--device", "cpu", "--threads", str(threads),
                   "--num-slots", str(NUM_SLOTS), "--cache-size", "0", "--grace", "2"]
            targets[name], _pid = stack.enter_context(
                launched(f"gruserve {name}", cmd, tmp / f"server-{name}.log"))
        for r in range(rounds):
            for concurrency in (64, 1):
                for name in (("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")):
                    out = subprocess.run(
                        [sys.executable, "-m", "gruserve.runtime", "loadtest", "--target",
                         targets[name], "--concurrency", str(concurrency), "--duration",
                         str(seconds), "--warmup", "1", "--entities", str(bundles[name]),
                         "--max-tokens", str(NUM_WORDS), "--json", "-", "--no-progress"],
                        capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        raise RuntimeError(f"loadtest {name} c={concurrency}: {out.stderr}")
                    m = json.loads(out.stdout)["metrics"]
                    if m["failed"]:
                        raise RuntimeError(f"{name} c={concurrency}: {m['failed']} failed")
                    figures.setdefault((name, concurrency), []).append(m)
                    print(f"# server round {r} {name} c={concurrency}: "
                          f"{m['tokens_per_s']:,.0f} tokens/s, p50 {m['p50_ms']:.1f} ms",
                          flush=True)
    lines = ["| concurrency | fp32 tokens/s | int8 tokens/s | int8 / fp32 (median of rounds) "
             "| p50 fp32 -> int8 | p99 fp32 -> int8 |", "|---:|---:|---:|---:|---:|---:|"]
    for concurrency in (64, 1):
        fp32, int8 = figures[("fp32", concurrency)], figures[("int8", concurrency)]
        ratio = float(np.median([b["tokens_per_s"] / a["tokens_per_s"]
                                 for a, b in zip(fp32, int8, strict=True)]))

        def med(rows: list, key: str) -> float:
            return float(np.median([row[key] for row in rows]))

        lines.append(
            f"| {concurrency} | {med(fp32, 'tokens_per_s'):,.0f} | {med(int8, 'tokens_per_s'):,.0f}"
            f" | **{ratio:.2f}x** | {med(fp32, 'p50_ms'):.1f} -> {med(int8, 'p50_ms'):.1f} ms"
            f" | {med(fp32, 'p99_ms'):.1f} -> {med(int8, 'p99_ms'):.1f} ms |")
    return "\n".join(lines)


# --- part 3: the reference model's export ----------------------------------------------------


def reference_section(checkpoint_path: Path, data: Path, tmp: Path, samples: int) -> str:
    from gruserve.export.corpus import load_training_corpus
    from gruserve.export.verify import VerificationError, export_bundle

    corpus = load_training_corpus(data)
    started = time.perf_counter()
    try:
        _, report = export_bundle(checkpoint_path, tmp / "ref-int8", precision="int8",
                                  samples=samples, corpus=corpus, progress=False)
        verdict = "PASS"
    except VerificationError as exc:
        report, verdict = exc.report, f"FAIL: {exc.report.first_failure}"
    seconds = time.perf_counter() - started
    g, q = report.greedy, report.quality
    lines = [
        f"`gruserve export {checkpoint_path} --precision int8 --data {data} --samples {samples}`"
        f" with the default tolerances: **{verdict}** ({seconds:.0f} s)",
        "",
        f"- greedy token agreement with PyTorch fp32 (teacher forced): "
        f"**{100 * g.agreement:.2f}%** ({g.num_steps_agreeing}/{g.num_steps} steps); "
        f"identical decodes {g.num_identical}/{g.num_pairs}",
        f"- max |log-prob error|: {report.max_log_prob_error:.3g}",
        f"- first divergence: {g.first_divergence}",
        "",
        f"| metric ({q.split} split, {q.num_reviews} reviews) | PyTorch fp32 | int8 bundle "
        "| change (+ = worse) |",
        "|---|---|---|---|",
    ]
    for m in q.metrics:
        change = "n/a" if m.change is None else f"{100 * m.change:+.2f}%"
        lines.append(f"| {m.name} | {m.reference:.4f} | {m.bundle:.4f} | {change} |")
    for name in ("rouge_l/f", "usr", "fcr"):
        lines.append(f"| {name} (not gated) | {q.reference_metrics[name]:.4f} | "
                     f"{q.bundle_metrics[name]:.4f} | |")
    return "\n".join(lines)


# --- driver -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE / "train" / "best.pt",
                        help="a trained reference-size checkpoint (default: what "
                        "bench/train_reference.py keeps; a random model if missing)")
    parser.add_argument("--data", type=Path, default=REFERENCE / "corpus",
                        help="its corpus (for part 3)")
    parser.add_argument("--threads", type=int, default=0, help="ORT threads (0: one per core)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="window per engine row")
    parser.add_argument("--reps", type=int, default=40, help="timed steps per variant and B")
    parser.add_argument("--samples", type=int, default=500, help="pairs for the quality figures")
    parser.add_argument("--parts", default="variants,engine,server,reference",
                        help="parts to run, comma-separated (default all; server needs engine)")
    parser.add_argument("--quick", action="store_true", help="1 round, short windows, 64 pairs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.reps, args.samples = 1, 0.3, 5, 64
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic warns at the root logger

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    config = SessionConfig(device="cpu", intra_op_threads=threads)
    trained = args.checkpoint.is_file()
    if trained:
        model = load_checkpoint(args.checkpoint).build_model()
    else:
        torch.manual_seed(0)
        from gruserve.export.config import ModelConfig

        model = NRT(ModelConfig(ntoken=20004, emsize=300, hidden_size=400, num_users=1000,
                                num_items=1000)).eval()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    parts, goals, wanted = [], {}, set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="gruserve-int8-") as tmp:
        if "variants" in wanted:
            parts.append(("1. The variants (greedy step graph, CPU provider)",
                          variants_section(model, trained, config, args.reps, args.samples)))
            print(parts[-1][1], flush=True)
        if "engine" in wanted:
            engine_text, goals, bundles = engine_section(Path(tmp), config, args.rounds,
                                                         args.seconds)
            parts.append(("2. Engine, fp32 vs int8 (untrained reference-size NRT, 15 tokens "
                          "each)", engine_text))
            print(engine_text, flush=True)
            if "server" in wanted:
                server_text = server_section(Path(tmp), bundles, threads, args.rounds,
                                             max(2.0, 4 * args.seconds))
                parts.append(("2b. Server, fp32 vs int8 (the same bundles over gRPC, "
                              "`gruserve loadtest` in its own process)", server_text))
                print(server_text, flush=True)
        if "reference" in wanted and trained and (args.data / "reviews.pickle").is_file():
            parts.append(("3. The trained reference model exported to int8",
                          reference_section(args.checkpoint, args.data, Path(tmp), args.samples)))
            print(parts[-1][1], flush=True)
    model_note = (f"trained checkpoint {args.checkpoint}" if trained
                  else "random reference-size NRT (no trained checkpoint found)")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    text = "\n".join([
        "# int8 beside fp32 (bench/int8.py)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_line()}; ORT threads {threads}",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; load "
        f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"{time.perf_counter() - started:.0f} s",
        f"- python {platform.python_version()}, onnxruntime {ort.__version__}, torch "
        f"{torch.__version__}; part 1 model: {model_note}",
        (f"- goals: engine at 256 int8/fp32 {goals[NUM_SLOTS]:.2f}x (>= 1.6x); concurrency-1 "
         f"latency int8/fp32 {1 / goals[1]:.2f}x (<= 0.5x)") if goals else "- engine not run",
        "",
        *[f"## {title}\n\n{body}\n" for title, body in parts],
    ])
    print(f"\n{text}")
    if not (args.no_write or args.quick):
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
