"""Split steps vs one TopK step: the measurement behind --split-min-greedy-rows.

    python bench/split.py              # builds the reference-size model in a temporary dir
    python bench/split.py BUNDLE       # or measures a bundle you have

StepRunner.step on slots 0..B-1: the whole step on the TopK graph, the same step split (the
first rows greedy on the ArgMax graph, the rest on the TopK graph), and all rows on the
ArgMax graph; medians of interleaved windows. Prints a markdown table (recorded in
bench/results/split.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line

CASES = ((16, 8), (64, 32), (64, 56), (128, 64), (256, 128), (256, 224))  # (rows, greedy)


def _ms(fn, seconds: float = 1.5) -> float:
    for _ in range(2):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def _case(runner, bundle, rows: int, greedy: int, rounds: int) -> tuple[float, float, float]:
    """Median ms of (whole step on TopK, split step, whole step on ArgMax)."""
    slots = np.arange(rows)
    runner.encode(slots, slots % len(bundle.users), slots % len(bundle.items))
    tokens = np.full(rows, bundle.special_ids["bos"])
    topk_rows = np.arange(rows) >= greedy
    variants = (
        lambda: runner.step(slots, slots, tokens, want_topk=True),
        lambda: runner.step(slots, slots, tokens, want_topk=True, topk_rows=topk_rows),
        lambda: runner.step(slots, slots, tokens),
    )
    runs = [[_ms(v) for v in variants] for _ in range(rounds)]
    return tuple(float(np.median([r[i] for r in runs])) for i in range(3))


def measure(bundle_dir: Path, rounds: int = 3) -> str:
    from gruserve.runtime.bundle import load_bundle
    from gruserve.runtime.config import SessionConfig
    from gruserve.runtime.runner import StepRunner

    bundle = load_bundle(bundle_dir)
    runner = StepRunner(bundle, num_slots=256, config=SessionConfig(device="cpu"))
    lines = [
        f"- machine: {machine_line()}",
        "",
        "| batch | greedy rows | whole step on the TopK graph | split | all rows on ArgMax |",
        "|---:|---:|---:|---:|---:|",
    ]
    for rows, greedy in CASES:
        whole, split, argmax = _case(runner, bundle, rows, greedy, rounds)
        lines.append(
            f"| {rows} | {greedy} | {whole:.2f} ms | {split:.2f} ms ({split / whole:.2f}x) | "
            f"{argmax:.2f} ms ({argmax / whole:.2f}x) |"
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1:
        print(measure(Path(sys.argv[1])))
        return 0
    from reference_model import build_reference_model

    with tempfile.TemporaryDirectory(prefix="gruserve-split-") as tmp:
        print(measure(build_reference_model(Path(tmp)).bundle))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
