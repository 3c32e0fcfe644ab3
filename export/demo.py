"""The built-in demo model: a small NRT trained on the synthetic corpus in about a CPU minute.

It exists so that `gruserve` can be tried end to end (train -> export -> serve) without a
dataset download, and so that the result can be checked against the corpus's ground truth:
measured on a 2-core CPU (bench/train_demo.py, bench/results/train_demo.md) it reaches, on
the test split, FMR 0.95 (the tip names the aspect the user cares about) and a rating RMSE
of 0.57 against the ratings' own standard deviation of 1.37 (the RMSE of always predicting
the mean) and an oracle's 0.42, in 32 epochs.

Every field of both specs is spelled out, so a change of a library default never changes
the demo model silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .synthetic import SyntheticSpec, make_synthetic_corpus
from .train import BEST_FILE, TrainConfig, train

log = logging.getLogger(__name__)

DEMO_SPEC = SyntheticSpec(
    seed=0,
    num_users=200,
    num_items=100,
    num_reviews=12000,
    num_aspects=8,
    noise=0.05,
    train_fraction=0.8,
    validation_fraction=0.1,
)

DEMO_TRAIN = TrainConfig(
    emsize=64,
    hidden_size=128,
    mlp_layers=4,
    max_len=15,
    vocab_size=20000,  # the corpus has ~40 words; the cap is the reference one
    batch_size=64,
    lr=3e-3,
    # the rating MLP (sigmoid layers, as in NRT) learns slower than the text; weighting it
    # up gets the RMSE down within the epoch budget without hurting the text
    rating_weight=2.0,
    clip_norm=1.0,
    max_epochs=40,
    patience=4,
    seed=0,
    device="cpu",
    # no time budget: a budget would make the demo's weights depend on the machine's load
    max_seconds=0.0,
    # one intra-op thread: at these sizes a second one gains little on an idle 2-core machine
    # and loses 5-40x on a busy one (OpenMP threads wait for each other; measured side by
    # side under load: 2.0-2.8 s per epoch with 1 thread, 14-86 s with 2)
    num_threads=1,
)


def build_demo_checkpoint(
    work_dir: str | os.PathLike[str], *, config: TrainConfig = DEMO_TRAIN
) -> Path:
    """Train the demo model from scratch under `work_dir`; returns the path of its best.pt.

    Deterministic: the corpus is generated from DEMO_SPEC and training is seeded, so the same
    torch build on the same kind of CPU gives the same weights. `config` lets a caller change
    e.g. the device (`dataclasses.replace(DEMO_TRAIN, device="cuda")`).
    """
    out = Path(work_dir)
    corpus = make_synthetic_corpus(DEMO_SPEC)
    checkpoint, history = train(corpus, config, out)
    best = next(h for h in history if h.epoch == checkpoint.epoch)
    log.info(
        "demo model: best epoch %d of %d, valid ppl %.3f, valid rating mse %.4f",
        best.epoch,
        len(history),
        best.valid_ppl,
        best.valid_rating_mse,
    )
    return out / BEST_FILE


def build_demo_bundle(
    bundle_dir: str | os.PathLike[str], *, work_dir: str | os.PathLike[str]
) -> Path:
    """Trains the demo model and exports it, verified, to `bundle_dir` (what `gruserve serve`
    without a bundle calls on first use)."""
    from .verify import export_bundle

    checkpoint_path = build_demo_checkpoint(work_dir)
    path, report = export_bundle(
        checkpoint_path, Path(bundle_dir), model_name="nrt-demo", progress=False
    )
    log.info("demo bundle written and verified against PyTorch: %s", path)
    return path
