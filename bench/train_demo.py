"""Benchmark: train the built-in demo model from scratch, evaluate it, record the figures.

    python bench/train_demo.py [--device cpu|cuda] [--work-dir DIR] [--results PATH]

Trains `DEMO_TRAIN` on the synthetic corpus `DEMO_SPEC` (export/demo.py), times it, evaluates
the best checkpoint on the test split, prints a markdown table and writes it, with the
command, the machine and the date, to bench/results/train_demo.md. Not a test: the timing
depends on the machine and its load; the quality figures are deterministic for one torch
build and CPU kind. The corpus's own rating standard deviation is printed next to the RMSE:
it is the RMSE of always predicting the mean rating, the bar a model has to clear.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # bench/machine.py (scripts run from bench/)
from training_report import pairs_table, write_results

from gruserve.export.checkpoint import load_checkpoint
from gruserve.export.demo import DEMO_SPEC, DEMO_TRAIN, build_demo_checkpoint
from gruserve.export.evaluate import evaluate, write_eval_outputs
from gruserve.export.synthetic import (
    RATING_NOISE,
    make_synthetic_corpus,
    synthetic_ground_truth,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train_demo.md"
# what pins the CPU kernels' code paths, hence their rounding, across machines
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def machine(train_threads: int) -> str:
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    threads = train_threads or torch.get_num_threads()
    # the kernels torch picked for this CPU: figures are reproducible between runs with the
    # same ones (docs/training.md, "Reproducibility"), not across different ones
    pinned = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_VARIABLES if os.environ.get(k))
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs (training used {threads} torch "
        f"thread(s)){gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"CPU kernels {torch.backends.cpu.get_cpu_capability()}"
        + (f" ({pinned})" if pinned else "")
    )


def oracle_rmse(corpus, split: str = "test") -> float:
    """RMSE of the best possible rating predictor: one that knows the hidden world and
    predicts E[rating] = sum_k k P(clip(round(mu + noise), 1, 5) = k) exactly."""
    truth = synthetic_ground_truth(DEMO_SPEC)

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / (RATING_NOISE * math.sqrt(2.0))))

    errors = []
    for review in corpus.split(split):
        mu = 1 + 4 / 3 * truth.quality(review.item, truth.user_aspect[review.user])
        mu += truth.user_bias[review.user]
        # round() to k for values in [k - 0.5, k + 0.5); the ends absorb the clipped tails
        expected = 1.0 + sum(1.0 - cdf(k - 0.5 - mu) for k in range(2, 6))
        errors.append(expected - review.rating)
    return float(np.sqrt(np.mean(np.square(errors))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--work-dir", type=Path, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    config = dataclasses.replace(DEMO_TRAIN, device=args.device)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gruserve-demo-") as tmp:
        work = args.work_dir or Path(tmp)
        started = time.monotonic()
        best_path = build_demo_checkpoint(work, config=config)
        train_seconds = time.monotonic() - started
        checkpoint = load_checkpoint(best_path)
        history = load_checkpoint(work / "last.pt").optimizer_state["history"]
        corpus = make_synthetic_corpus(DEMO_SPEC)
        report = evaluate(checkpoint, corpus, split="test", device=args.device)
        if args.work_dir:
            write_eval_outputs(report, work / "eval")

    load_after = os.getloadavg()[0]
    m = report.metrics
    corpus_std = float(np.std([r.rating for r in corpus.reviews]))
    epochs_run = len(history)
    seconds_per_epoch = sum(h["seconds"] for h in history) / max(epochs_run, 1)
    rows = [
        ("training time (s)", f"{train_seconds:.1f}"),
        ("epochs run (best epoch)", f"{epochs_run} ({checkpoint.epoch})"),
        ("seconds per epoch (train + validation)", f"{seconds_per_epoch:.2f}"),
        ("parameters", f"{sum(v.numel() for v in checkpoint.state_dict.values()):,}"),
        ("test reviews", f"{report.num_evaluated}"),
        ("test perplexity", f"{m['perplexity']:.3f}"),
        ("rating RMSE", f"{m['rmse']:.4f}"),
        ("rating MAE", f"{m['mae']:.4f}"),
        ("rating std, whole corpus (RMSE of predicting the mean)", f"{corpus_std:.4f}"),
        ("rating std, test split", f"{m['rating_std']:.4f}"),
        ("rating RMSE floor (oracle that knows the hidden world)", f"{oracle_rmse(corpus):.4f}"),
        ("BLEU-1 (%)", f"{m['bleu_1']:.2f}"),
        ("BLEU-4 (%)", f"{m['bleu_4']:.2f}"),
        ("ROUGE-1 F (%)", f"{m['rouge_1/f']:.2f}"),
        ("ROUGE-2 F (%)", f"{m['rouge_2/f']:.2f}"),
        ("ROUGE-L F (%)", f"{m['rouge_l/f']:.2f}"),
        ("USR", f"{m['usr']:.3f} ({m['unique_sentences']} distinct)"),
        ("FMR", f"{m['fmr']:.3f}"),
        ("FCR", f"{m['fcr']:.3f}"),
        ("DIV (lower = more diverse)", f"{m['div']:.3f}"),
    ]
    table = "\n".join(
        ["| metric | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    )
    print(table)
    if args.no_write:
        return 0

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    spec = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(DEMO_SPEC).items())
    train_cfg = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    text = f"""# Demo model: training and test figures

Command: `{command}`
Machine: {machine(config.num_threads)}
Load average (1 min) before / after: {load_before:.2f} / {load_after:.2f} (other work on the
machine slows the timing, never the quality figures)
Date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}

Corpus: `DEMO_SPEC` = SyntheticSpec({spec}).
Training: `DEMO_TRAIN` = TrainConfig({train_cfg}).
Evaluation: greedy decodes of at most {report.max_tokens} words on the test split
(`gruserve.export.evaluate`); BLEU and ROUGE in percent, USR/FMR/FCR/DIV as fractions.

{table}

The training time is wall clock (corpus generation, {epochs_run} epochs with validation,
checkpoint writes) and varies with the machine's load; the quality figures are
deterministic for one torch build and CPU kind.

{pairs_table(report)}
"""
    write_results(args.results, text)
    print(f"\nwritten to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
