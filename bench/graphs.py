"""Benchmark: what each decoder-step graph variant costs per step, side by side in one run.

    python bench/graphs.py [--reps 40] [--batches 1 64 256] [--results PATH] [--no-write]

A random-weight NRT at the reference sizes (vocab 20004, emb 300, hidden 400) is written as a
bundle to a temp dir. Then, round-robin within each repetition so that machine noise hits
every variant alike, one step of each variant is timed; the table shows the median (and the
ratio to the greedy graph) per batch size:

- greedy: StepRunner.step, slot pool bound in place, ArgMax in the graph (the served graph)
- top-k 64: StepRunner.step(want_topk=True), adds ReduceLogSumExp + TopK(64)
- no pool: the same step without the slot pool, hidden [1, B, H] in and out, ping-ponged
  between two device buffers (what a runtime without slots would run)
- PyTorch eager: one decoder step, for scale, timed in its own loop after the ORT variants
  (torch's OpenMP threads spin after each call and would slow whichever variant came next)

A second table isolates the vocabulary head on random [B, 20004] logits: ArgMax (greedy),
the previous sampling head (ReduceLogSumExp + TopK(64) + Sub) and the current one
(LogSoftmax + TopK(64)).

A third table answers whether binding the pool's input and output to one buffer avoids the
pool copy: the greedy graph with one pool bound in and out (in place) vs two pools alternated
(ping-pong, where ScatterND must first copy the whole pool), at S = 256, 1024 and 16384.
Not a test: absolute times depend on the machine and its load; the ratios are the result.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import machine_line  # bench/machine.py (scripts run from bench/)
from onnx import TensorProto, helper, numpy_helper

from gruserve.export import onnx_graphs as og
from gruserve.export.bundle_writer import write_bundle
from gruserve.export.checkpoint import Checkpoint
from gruserve.export.config import ModelConfig
from gruserve.export.model import NRT, nrt_weights
from gruserve.export.vocab import SPECIAL_TOKENS, EntityIndex, Vocabulary
from gruserve.runtime.bundle import STEP_GREEDY, load_bundle
from gruserve.runtime.providers import SessionConfig, session_options, wanted_providers
from gruserve.runtime.runner import StepRunner

RESULTS = Path(__file__).resolve().parent / "results" / "graphs.md"
REFERENCE = dict(ntoken=20004, emsize=300, hidden_size=400, num_users=1000, num_items=1000)
WARMUP = 5


def reference_checkpoint(seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    config = ModelConfig(**REFERENCE)
    words = SPECIAL_TOKENS + tuple(f"w{i}" for i in range(config.ntoken - len(SPECIAL_TOKENS)))
    return Checkpoint(
        model_config=config,
        state_dict=NRT(config).state_dict(),
        vocab=Vocabulary(words),
        users=EntityIndex([f"u{i}" for i in range(config.num_users)]),
        items=EntityIndex([f"i{i}" for i in range(config.num_items)]),
    )


class BoundStep:
    """One greedy-style step session with I/O binding, outside the runner, so the in-place
    and ping-pong pool bindings (and the pool-less graph) run through the same code."""

    def __init__(self, model_bytes_or_path, state_shape, num_buffers: int, config: SessionConfig):
        self.session = ort.InferenceSession(
            model_bytes_or_path, session_options(config), providers=wanted_providers(config)
        )
        names = [i.name for i in self.session.get_inputs()]
        self.state_in = names[0]
        self.state_out = self.session.get_outputs()[0].name
        self.ids = names[1:]
        zeros = np.zeros(state_shape, np.float32)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(zeros.copy()) for _ in range(num_buffers)]
        self.turn = 0
        self.binding = self.session.io_binding()

    def step(self, ids: list[np.ndarray]) -> np.ndarray:
        b = self.binding
        src = self.buffers[self.turn]
        dst = self.buffers[(self.turn + 1) % len(self.buffers)]
        self.turn = (self.turn + 1) % len(self.buffers)
        b.bind_ortvalue_input(self.state_in, src)
        b.bind_ortvalue_output(self.state_out, dst)
        for name, array in zip(self.ids, ids, strict=True):
            b.bind_cpu_input(name, array)
        b.bind_output(og.NEXT_TOKEN, "cpu")
        self.session.run_with_iobinding(b)
        return b.get_outputs()[1].numpy()


def time_round_robin(variants: dict, reps: int) -> dict[str, tuple[float, float]]:
    """(wall, cpu) median ms per call of each variant; every repetition runs each variant
    once. CPU time (all of this process's threads) is the steadier figure when other jobs
    share the machine; wall time is what a request waits."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(WARMUP + reps):
        shift = rep % len(names)  # rotate, so no variant always follows the same one
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            if rep >= WARMUP:
                wall[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in variants}


def graph_variants(bundle, model: NRT, batch: int, num_slots: int, config, rng) -> dict:
    runner = StepRunner(bundle, num_slots=num_slots, config=config)
    slots = rng.permutation(num_slots)[:batch].astype(np.int64)
    tokens = rng.integers(4, bundle.model_config["ntoken"], batch).astype(np.int64)
    runner.encode(slots, slots % 1000, slots % 1000)
    plain_graph = og.build_step_graph(nrt_weights(model), og.StepGraphOptions(slot_pool=False))
    plain = BoundStep(plain_graph.SerializeToString(), (1, batch, bundle.hidden_size), 2, config)
    hidden = torch.zeros(1, batch, bundle.hidden_size)
    torch_tokens = torch.as_tensor(tokens)[:, None]

    def torch_step():
        with torch.no_grad():
            model.decoder(torch_tokens, hidden)

    ort_variants = {
        "greedy": lambda: runner.step(slots, slots, tokens),
        "top-k 64": lambda: runner.step(slots, slots, tokens, want_topk=True),
        "no pool": lambda: plain.step([tokens]),
    }
    return ort_variants, {"PyTorch eager": torch_step}


def _head_session(nodes, outputs, config) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", REFERENCE["ntoken"]])],
        [
            helper.make_tensor_value_info(
                name, TensorProto.INT64 if name == "ids" else TensorProto.FLOAT, None
            )
            for name in outputs
        ],
        [numpy_helper.from_array(np.array([64], np.int64), "k"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", og.OPSET)])
    model.ir_version = og.IR_VERSION
    return ort.InferenceSession(
        model.SerializeToString(), session_options(config), providers=wanted_providers(config)
    )


def head_variants(batch: int, config, rng) -> dict:
    node = helper.make_node
    heads = {
        "ArgMax": ([node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=0)], ["ids"]),
        "ReduceLogSumExp + TopK(64)": (
            [node("ReduceLogSumExp", ["logits", "axes"], ["lse"], keepdims=1),
             node("TopK", ["logits", "k"], ["top", "ids"], axis=1),
             node("Sub", ["top", "lse"], ["logprobs"])],
            ["logprobs", "ids"],
        ),
        "LogSoftmax + TopK(64)": (
            [node("LogSoftmax", ["logits"], ["lp"], axis=1),
             node("TopK", ["lp", "k"], ["logprobs", "ids"], axis=1)],
            ["logprobs", "ids"],
        ),
    }
    logits = (rng.standard_normal((batch, REFERENCE["ntoken"])) * 3).astype(np.float32)
    variants = {}
    for name, (nodes, outputs) in heads.items():
        session = _head_session(nodes, outputs, config)
        variants[name] = lambda s=session: s.run(None, {"logits": logits})
    return variants


def pool_binding_variants(bundle, batch: int, num_slots: int, config, rng) -> dict:
    path = str(bundle.graphs[STEP_GREEDY].path)
    shape = (1, num_slots, bundle.hidden_size)
    in_place = BoundStep(path, shape, 1, config)
    ping_pong = BoundStep(path, shape, 2, config)
    slots = rng.permutation(num_slots)[:batch].astype(np.int64)
    tokens = rng.integers(4, bundle.model_config["ntoken"], batch).astype(np.int64)
    return {
        f"in place S={num_slots}": lambda: in_place.step([slots, slots, tokens]),
        f"ping-pong S={num_slots}": lambda: ping_pong.step([slots, slots, tokens]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40, help="timed repetitions (median)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--slots", type=int, default=256, help="pool size of the main table")
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[256, 1024, 16384])
    parser.add_argument("--pool-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    config = SessionConfig(device="cpu", intra_op_threads=args.threads)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    checkpoint = reference_checkpoint()
    model = checkpoint.build_model()
    with tempfile.TemporaryDirectory(prefix="gruserve-bench-") as tmp:
        bundle = load_bundle(write_bundle(checkpoint, Path(tmp) / "ref", top_k=64))
        step_rows = {}
        for batch in args.batches:
            slots = max(args.slots, batch)
            variants = graph_variants(bundle, model, batch, slots, config, rng)
            ort_variants, torch_variants = variants
            step_rows[batch] = time_round_robin(ort_variants, args.reps)
            step_rows[batch].update(time_round_robin(torch_variants, args.reps))
            print(f"B={batch}: steps done", file=sys.stderr)
        head_rows = {}
        for batch in args.batches:
            head_rows[batch] = time_round_robin(head_variants(batch, config, rng), args.reps)
            print(f"B={batch}: heads done", file=sys.stderr)
        pool_rows = {}
        for batch in args.pool_batches:
            variants = {}
            for num_slots in args.pool_sizes:
                variants.update(pool_binding_variants(bundle, batch, num_slots, config, rng))
            pool_rows[batch] = time_round_robin(variants, args.reps)
            print(f"B={batch}: pool bindings done", file=sys.stderr)
    text = render(args, argv, step_rows, head_rows, pool_rows, load_before, os.getloadavg())
    print(text)
    if not args.no_write:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text, encoding="utf-8")
        print(f"written to {args.results}", file=sys.stderr)
    return 0


def _cell(figures: tuple[float, float], digits: int) -> str:
    wall, cpu = figures
    return f"{wall:.{digits}f} / {cpu:.{digits}f}"


def _table(rows: dict, digits: int) -> list[str]:
    names = list(next(iter(rows.values())))
    lines = ["| B | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for batch, row in rows.items():
        lines.append(f"| {batch} | " + " | ".join(_cell(row[n], digits) for n in names) + " |")
    return lines


def render(args, argv, step_rows, head_rows, pool_rows, load_before, load_after) -> str:
    command = "python bench/graphs.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Decoder-step graph variants (ms per step, median: wall / CPU)",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_line()}; onnxruntime "
        f"{ort.__version__} (CPU provider, intra-op threads {args.threads or 'ORT default'}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
        f"{platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs share the machine: "
        "compare ratios within a row, not absolute times across runs)",
        f"- model: random-weight NRT, vocab {REFERENCE['ntoken']}, emb {REFERENCE['emsize']}, "
        f"hidden {REFERENCE['hidden_size']}; pool S = {args.slots} (S = B where B > S); "
        f"{args.reps} timed repetitions after {WARMUP} warm-up, variants interleaved",
        "",
    ]
    names = list(next(iter(step_rows.values())))
    extra = " | top-k / greedy (CPU) | pool cost: greedy - no pool (CPU ms) |"
    lines.append("| B | " + " | ".join(names) + extra)
    lines.append("|---" * (len(names) + 3) + "|")
    for batch, row in step_rows.items():
        cells = " | ".join(_cell(row[n], 2) for n in names)
        ratio = row["top-k 64"][1] / row["greedy"][1]
        pool_cost = row["greedy"][1] - row["no pool"][1]
        lines.append(f"| {batch} | {cells} | {ratio:.2f} | {pool_cost:+.2f} |")
    lines += [
        "",
        "## The vocabulary head alone (random logits [B, 20004])",
        "",
        *_table(head_rows, 2),
        "",
        "## Pool binding: one buffer in and out (in place) vs two alternated (ping-pong)",
        "",
        "Greedy step graph through the same bare I/O-binding loop; ping-pong makes ScatterND "
        "copy the whole pool [1, S, 400] into the other buffer every step.",
        "",
    ]
    lines += _table(pool_rows, 3)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
