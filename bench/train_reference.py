"""Benchmark: train the reference-size NRT (vocab 20004, emb 300, hidden 400) on the synthetic
reference corpus, evaluate it, keep the checkpoint for the other benchmarks.

    python bench/train_reference.py          # ~15 min on 2 quiet cores; results/train_reference.md
    python bench/train_reference.py --quick  # a tiny model on 2,000 reviews, to check the script

Writes, under --work-dir (default ~/.cache/gruserve/reference, outside git):

- corpus/   REFERENCE_SPEC (export/synthetic.py) in the NLG4RS format: what `gruserve train`,
            `export --data` and `evaluate --data` read;
- train/    best.pt and last.pt of the run (`bench/int8.py` takes train/best.pt);
- eval/     metrics.json and pairs.tsv of the test split.

The run is bounded by epochs (default 2) rather than by time: with a time budget the
weights would depend on the machine's load. One epoch is ~190 batches of 128 reviews at
~2.5 s each on 2 quiet cores (the vocabulary projection dominates: 20004 x 400 per token),
so two epochs with validation take ~15 minutes. Not a test: the timing depends on the
machine; the quality figures are deterministic for one torch build and CPU kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from machine import cpu_model  # bench/machine.py (scripts run from bench/)
from training_report import pairs_table, write_results

from gruserve.export.checkpoint import load_checkpoint
from gruserve.export.corpus import load_training_corpus
from gruserve.export.evaluate import evaluate, format_metrics, write_eval_outputs
from gruserve.export.synthetic import REFERENCE_SPEC, write_synthetic_corpus
from gruserve.export.train import BEST_FILE, LAST_FILE, TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "train_reference.md"
WORK_DIR = Path.home() / ".cache" / "gruserve" / "reference"

REFERENCE_TRAIN = TrainConfig(
    emsize=300,
    hidden_size=400,
    mlp_layers=4,
    max_len=15,
    vocab_size=20000,
    batch_size=128,
    lr=2e-3,
    rating_weight=2.0,
    clip_norm=1.0,
    max_epochs=2,
    patience=2,
    seed=0,
    device="cpu",
    max_seconds=0.0,
    # the matmuls are large enough for two threads to pay on an idle 2-core machine
    num_threads=2,
)
# --quick: the same script end to end in well under a minute
QUICK_SPEC = dataclasses.replace(
    REFERENCE_SPEC, num_users=200, num_items=150, num_reviews=2000, num_filler_words=2000
)
QUICK_TRAIN = dataclasses.replace(REFERENCE_TRAIN, emsize=32, hidden_size=48, max_epochs=1)


def machine(threads: int) -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs (training used {threads} torch "
        f"thread(s)); Python {platform.python_version()}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help=f"default {WORK_DIR}")
    parser.add_argument("--epochs", type=int, help=f"default {REFERENCE_TRAIN.max_epochs}")
    parser.add_argument("--reviews", type=int,
                        help=f"reviews in the corpus (default {REFERENCE_SPEC.num_reviews})")
    parser.add_argument("--threads", type=int, help=f"default {REFERENCE_TRAIN.num_threads}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and corpus: checks the script, records nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    spec, config = (QUICK_SPEC, QUICK_TRAIN) if args.quick else (REFERENCE_SPEC, REFERENCE_TRAIN)
    if args.reviews:
        spec = dataclasses.replace(spec, num_reviews=args.reviews)
    overrides = {"device": args.device}
    if args.epochs:
        overrides["max_epochs"] = args.epochs
    if args.threads is not None:
        overrides["num_threads"] = args.threads
    config = dataclasses.replace(config, **overrides)
    work = args.work_dir / "quick" if args.quick else args.work_dir

    load_before = os.getloadavg()[0]
    started = time.monotonic()
    write_synthetic_corpus(work / "corpus", spec)
    corpus = load_training_corpus(work / "corpus")
    train(corpus, config, work / "train")
    train_seconds = time.monotonic() - started
    checkpoint = load_checkpoint(work / "train" / BEST_FILE)
    history = load_checkpoint(work / "train" / LAST_FILE).optimizer_state["history"]
    report = evaluate(checkpoint, corpus, split="test", device=args.device)
    write_eval_outputs(report, work / "eval")
    load_after = os.getloadavg()[0]

    m = report.metrics
    epochs_run = len(history)
    rows = [
        ("training time (s)", f"{train_seconds:.0f}"),
        ("epochs run (best epoch)", f"{epochs_run} ({checkpoint.epoch})"),
        ("seconds per epoch (train + validation)",
         f"{sum(h['seconds'] for h in history) / max(epochs_run, 1):.0f}"),
        ("vocabulary (ntoken)", f"{checkpoint.model_config.ntoken}"),
        ("parameters", f"{sum(v.numel() for v in checkpoint.state_dict.values()):,}"),
        ("valid perplexity per epoch", ", ".join(f"{h['valid_ppl']:.2f}" for h in history)),
        ("test reviews", f"{report.num_evaluated}"),
        ("test perplexity", f"{m['perplexity']:.3f}"),
        ("rating RMSE (rating std)", f"{m['rmse']:.4f} ({m['rating_std']:.4f})"),
        ("BLEU-1 / BLEU-4 (%)", f"{m['bleu_1']:.2f} / {m['bleu_4']:.2f}"),
        ("ROUGE-L F (%)", f"{m['rouge_l/f']:.2f}"),
        ("USR / FMR / FCR", f"{m['usr']:.3f} / {m['fmr']:.3f} / {m['fcr']:.3f}"),
    ]
    table = "\n".join(
        ["| metric | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    )
    print(format_metrics(report), file=sys.stderr)
    print(table)
    print(f"\ncheckpoint: {work / 'train' / BEST_FILE}\ncorpus: {work / 'corpus'}", file=sys.stderr)
    if args.no_write or args.quick:
        return 0

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    spec_text = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(spec).items())
    train_text = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    text = f"""# Reference-size model: training and test figures

Command: `{command}`
Machine: {machine(config.num_threads or torch.get_num_threads())}
Load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}
Date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}

Corpus: SyntheticSpec({spec_text}).
Training: TrainConfig({train_text}).
Evaluation: greedy decodes of at most {report.max_tokens} words on the test split.

{table}

{pairs_table(report)}
"""
    write_results(args.results, text)
    print(f"written to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
