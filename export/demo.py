"""The demo model: a small NRT trained on the synthetic corpus in about a CPU minute.

It exists so that `gruserve` can be tried without a dataset download or a training run (its
bundle ships inside the package: gruserve.runtime.demo), and so that the result can be
checked against the corpus's ground truth:
measured on a 2-core CPU (bench/train_demo.py, bench/results/train_demo.md) it reaches, on
the test split, FMR 0.95 (the tip names the aspect the user cares about) and a rating RMSE
of 0.57 against the ratings' own standard deviation of 1.37 (the RMSE of always predicting
the mean) and an oracle's 0.42, in 32 epochs.

Every field of both specs is spelled out, so a change of a library default never changes
the demo model silently. `python -m gruserve.export.demo` (make demo-bundle) retrains it and
rewrites the shipped checkpoint and bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from gruserve.runtime.demo import DEMO_MODEL_DIR

from .checkpoint import load_checkpoint, save_checkpoint
from .synthetic import SyntheticSpec, make_synthetic_corpus
from .train import BEST_FILE, TrainConfig, train

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "nrt-demo"
CHECKPOINT_FILE = "checkpoint.pt"
# the checkpoint the shipped bundle was exported from (in the repository, not in the wheel)
DEMO_CHECKPOINT = DEMO_MODEL_DIR / CHECKPOINT_FILE

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


def export_demo_bundle(checkpoint_path: Path, bundle_dir: Path):
    """The demo's export settings (those of `gruserve export`, named "nrt-demo"): the shipped
    bundle and the test that checks it both come from here. Returns (path, VerifyReport)."""
    from .verify import export_bundle

    return export_bundle(checkpoint_path, bundle_dir, model_name=DEMO_MODEL_NAME, progress=False)


def rebuild_demo_model(out_dir: Path = DEMO_MODEL_DIR, *, work_dir: Path) -> Path:
    """Trains the demo model from scratch and writes what the package ships: out_dir/
    checkpoint.pt (the best epoch's weights, without the optimizer state only resuming
    needs) and out_dir/bundle (exported from it and verified against PyTorch)."""
    best = build_demo_checkpoint(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_FILE
    save_checkpoint(dataclasses.replace(load_checkpoint(best), optimizer_state=None),
                    checkpoint_path)
    path, report = export_demo_bundle(checkpoint_path, out_dir / "bundle")
    log.info("demo bundle written and verified against PyTorch: %s", path)
    print(report.summary())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gruserve.export.demo",
        description="Retrain the demo model (DEMO_SPEC, DEMO_TRAIN) and re-export the bundle "
        "gruserve serve embeds. Deterministic: on one machine and torch build, the same bytes.",
    )
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR,
                        help="where checkpoint.pt and bundle/ go (default %(default)s)")
    parser.add_argument("--work-dir", type=Path,
                        help="training directory (default: a temporary one, removed after)")
    parser.add_argument("--export-only", action="store_true",
                        help="re-export and verify the bundle from the shipped checkpoint, "
                        "without retraining (after a change of the bundle format)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.export_only:
        path, report = export_demo_bundle(args.out / CHECKPOINT_FILE, args.out / "bundle")
        print(report.summary())
        return 0 if report.ok else 1
    if args.work_dir is not None:
        rebuild_demo_model(args.out, work_dir=args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="gruserve-demo-") as work:
            rebuild_demo_model(args.out, work_dir=Path(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
