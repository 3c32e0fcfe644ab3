"""The export side of the `gruserve` CLI: train, export, verify, evaluate.

Only argparse at import time: the runtime's CLI registers these commands without torch, and
each handler imports the heavy modules when it runs, with a clear message if they are missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_EXTRA_HINT = "this command needs the export extra: pip install 'gruserve[export]'"


def _need_export_extra():
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"gruserve: {_EXTRA_HINT} ({exc})") from None


def _cmd_train(args: argparse.Namespace) -> int:
    _need_export_extra()
    import dataclasses

    from .checkpoint import load_checkpoint
    from .corpus import load_training_corpus
    from .demo import DEMO_TRAIN
    from .train import TrainConfig, train

    corpus = load_training_corpus(args.data, index_dir=args.index_dir, seed=args.corpus_seed)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    resume = load_checkpoint(Path(args.resume)) if args.resume else None
    # a resumed run keeps the settings it was started with unless told otherwise
    base = TrainConfig.from_dict(resume.train_config) if resume else DEMO_TRAIN
    config = dataclasses.replace(base, **overrides)
    best, history = train(corpus, config, Path(args.out), resume=resume)
    print(f"best checkpoint: {Path(args.out) / 'best.pt'} (epoch {best.epoch})")
    if history:
        last = history[-1]
        print(
            f"last epoch {last.epoch}: valid ppl {last.valid_ppl:.3f}, "
            f"rating mse {last.valid_rating_mse:.4f}"
        )
    return 0


def _quality_corpus(args: argparse.Namespace):
    """The corpus whose test split measures the task metrics, if --data was given."""
    if not args.data:
        return None
    from .corpus import load_training_corpus

    return load_training_corpus(args.data, index_dir=args.index_dir, seed=args.corpus_seed)


def _cmd_export(args: argparse.Namespace) -> int:
    _need_export_extra()
    from .verify import VerificationError, export_bundle

    tolerance = {
        "log_probs": args.max_log_prob_error,
        "greedy_agreement": args.min_agreement,
        "metrics_relative": args.max_metric_change,
    }
    try:
        path, report = export_bundle(
            Path(args.checkpoint), Path(args.out), top_k=args.top_k, precision=args.precision,
            samples=args.samples, device=args.device, keep_failed=args.keep_failed,
            corpus=_quality_corpus(args), tolerance=tolerance,
        )
    except VerificationError as exc:
        print(exc.report.summary())
        print(f"gruserve export: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"bundle written: {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    _need_export_extra()
    from .verify import record_verify_report, verify_bundle

    if args.data and not args.checkpoint:
        print("gruserve verify: --data needs --checkpoint (the fp32 reference)", file=sys.stderr)
        return 2
    report = verify_bundle(
        Path(args.bundle), Path(args.checkpoint) if args.checkpoint else None,
        samples=args.samples, device=args.device, corpus=_quality_corpus(args),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    if args.record:
        if not (report.ok and args.checkpoint):
            print("gruserve verify: --record needs --checkpoint and a passing report",
                  file=sys.stderr)
            return 1
        record_verify_report(Path(args.bundle), report)
        print(f"report recorded in {Path(args.bundle) / 'manifest.json'}")
    return 0 if report.ok else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _need_export_extra()
    from .checkpoint import load_checkpoint
    from .corpus import load_training_corpus
    from .evaluate import evaluate, format_metrics, write_eval_outputs

    checkpoint = load_checkpoint(Path(args.checkpoint))
    corpus = load_training_corpus(args.data, index_dir=args.index_dir, seed=args.corpus_seed)
    report = evaluate(
        checkpoint, corpus, split=args.split, batch_size=args.batch_size,
        max_tokens=args.max_tokens, device=args.device,
    )
    if args.out:
        write_eval_outputs(report, Path(args.out))
        print(f"metrics and pairs written to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict()["metrics"], indent=2))
    else:
        print(format_metrics(report))
    return 0


def torch_device(text: str) -> str:
    """argparse type of a torch device name (checked against the machine when used)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)")
    return text


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "synthetic",
                   why: str = "") -> None:
    p.add_argument("--data", default=default,
                   help="'synthetic' (built-in corpus) or an NLG4RS directory with "
                   f"reviews.pickle{why}")
    p.add_argument("--index-dir",
                   help="directory with train/validation/test.index (default: found under --data)")
    p.add_argument("--corpus-seed", type=int, default=0, help="seed of the synthetic corpus")


def add_export_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train an NRT model (export extra)",
        description="Train NRT with teacher forcing: NLL (pad ignored) + weighted rating MSE, "
        "Adam, early stopping on the validation split. Writes best.pt and last.pt to --out.",
    )
    _add_data_args(p)
    p.add_argument("--out", required=True, help="output directory for checkpoints")
    p.add_argument("--resume", help="continue from a checkpoint (e.g. OUT/last.pt)")
    g = p.add_argument_group(
        "model and training (defaults: the demo configuration; on --resume, the run's own)"
    )
    g.add_argument("--emsize", type=int)
    g.add_argument("--hidden-size", dest="hidden_size", type=int)
    g.add_argument("--mlp-layers", dest="mlp_layers", type=int)
    g.add_argument("--max-len", dest="max_len", type=int, help="words per tip (default 15)")
    g.add_argument("--vocab-size", dest="vocab_size", type=int,
                   help="most frequent words kept (default 20000)")
    g.add_argument("--batch-size", dest="batch_size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--rating-weight", dest="rating_weight", type=float,
                   help="weight of the rating MSE")
    g.add_argument("--max-epochs", dest="max_epochs", type=int)
    g.add_argument("--patience", type=int,
                   help="epochs without validation improvement before stopping")
    g.add_argument("--seed", type=int)
    g.add_argument("--clip-norm", dest="clip_norm", type=float, help="gradient clipping (0 = off)")
    g.add_argument("--device", type=torch_device, metavar="cpu|cuda|cuda:N",
                   help="where to train (default cpu); CUDA asked for but absent is an error")
    g.add_argument("--threads", dest="num_threads", type=int,
                   help="torch CPU threads (0 = torch's default)")
    g.add_argument("--max-seconds", dest="max_seconds", type=float,
                   help="wall-clock budget (0 = none)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "export", help="export a checkpoint to a verified bundle (export extra)",
        description="Write encoder/decoder-step ONNX graphs, vocabulary and entities with a "
        "hashed manifest, then verify ORT against PyTorch before declaring success.",
    )
    p.add_argument("checkpoint", help="checkpoint file (e.g. OUT/best.pt)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--top-k", type=int, default=64, help="sampling candidates K (0 = greedy only)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp16 is for the CUDA provider; int8 for the CPU provider (needs --data)")
    p.add_argument("--samples", type=int, default=200,
                   help="(user, item) pairs decoded in verification")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="ORT device to verify on")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep a bundle that fails verification at OUT.failed for inspection")
    g = p.add_argument_group(
        "quality kept", "the tolerances verification holds the bundle to; defaults are the "
        "precision's (gruserve.export.precision). The export fails, leaving any bundle at "
        "--out as it was, when one is missed.",
    )
    _add_data_args(g, default=None, why=": the corpus the model was trained on, whose test "
                   "split gives the task metrics beside fp32's (required with int8)")
    g.add_argument("--max-log-prob-error", type=float, metavar="X",
                   help="max |log-prob - PyTorch's| at any step (fp32 1e-4, fp16 0.05, int8 0.5)")
    g.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="least greedy token agreement with PyTorch fp32, teacher forced over "
                   "--samples pairs (int8 0.99; fp32/fp16: every divergence a near-tie)")
    g.add_argument("--max-metric-change", type=float, metavar="FRACTION",
                   help="most perplexity, BLEU-1/4, FMR or rating RMSE may worsen vs fp32, "
                   "relative (int8 0.01; fp32/fp16: reported only)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "verify", help="check a bundle (integrity; parity with a checkpoint) (export extra)",
        description="Without --checkpoint: integrity and that ORT runs every graph. With it: "
        "per-step ORT vs PyTorch at batch 1, 3, 64 and greedy decodes token for token. "
        "Exits non-zero on any mismatch.",
    )
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--checkpoint", help="the checkpoint the bundle was exported from")
    p.add_argument("--samples", type=int, default=200, help="(user, item) pairs to decode")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_data_args(p, default=None, why=" (with --checkpoint): adds the task metrics of its "
                   "test split beside fp32's")
    p.add_argument("--record", action="store_true",
                   help="write a passing report into the bundle's manifest")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "evaluate", help="metrics of a checkpoint on a test split (export extra)",
        description="Perplexity, RMSE/MAE, BLEU-1/4, ROUGE-1/2/L, USR, FMR, FCR, DIV.",
    )
    p.add_argument("checkpoint")
    _add_data_args(p)
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-tokens", type=int, help="generated words per tip (default: max_len)")
    p.add_argument("--device", type=torch_device, default="cpu", metavar="cpu|cuda|cuda:N")
    p.add_argument("--out", help="directory for metrics.json and the reference/generated pairs")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=_cmd_evaluate)
