"""Proves a bundle computes what PyTorch computes, and records the proof in its manifest.

Without a checkpoint: the bundle's integrity (files, hashes, manifest), CUDA-graph readiness
of every graph, and that ORT runs every graph on dummy inputs with the manifest's shapes
(through a plain session and through the runner's I/O binding).

With the checkpoint it was exported from, also, at each batch size (1, 3, 64 by default):

- encoder: rating and initial state vs PyTorch, written into scattered slots;
- a few steps deep (the reference's greedy tokens fed back to both sides):
  - log-probs of a verification-only step graph (built in memory, `with_log_probs`),
  - the served greedy graph's pool rows and next token (read and write slots differ),
  - the served sampling graph's top-K log-probs vs torch.topk, its ids, its pool rows;
- every slot a call did not write keeps its exact bits;
- greedy decodes of `samples` (user, item) pairs, PyTorch `greedy_decode` vs the served step
  graph through the runner, token for token, with the first divergence named.

With a corpus too: the task metrics of the bundle's graphs (bundle_eval.py) beside PyTorch
fp32's on its test split: perplexity, BLEU-1/4, FMR, rating RMSE (and the rest, recorded).
An int8 export needs one: its quality is judged by these and by the token agreement.

A shape mismatch stops the comparison (fatal); a tolerance miss is recorded with the worst
value and where it first happened. Tolerances are the bundle's (its manifest's "tolerance",
written at export; the precision's defaults in precision.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from gruserve.runtime.bundle import (
    MANIFEST,
    STEP_GREEDY,
    STEP_TOPK,
    Bundle,
    BundleError,
    load_bundle,
)
from gruserve.runtime.providers import (
    CUDA,
    DeviceError,
    SessionConfig,
    for_precision,
    session_options,
    wanted_providers,
)
from gruserve.runtime.runner import StepRunner, check_io

from .bundle_eval import BundleScorer
from .bundle_writer import write_bundle, write_manifest
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .corpus import Corpus
from .evaluate import evaluate
from .graph_checks import cuda_graph_blockers, cuda_placement
from .parity import GREEDY_CHUNK, NUM_STEPS, PoolWatch, VerifyGraph, greedy_parity, parity_at
from .precision import PrecisionSpec, precision_spec
from .verify_report import (
    CheckResult,
    Checks,
    Fatal,
    GreedyParity,
    QualityReport,
    VerificationError,
    VerifyReport,
)

__all__ = [
    "CheckResult", "GreedyParity", "VerificationError", "VerifyReport",
    "export_bundle", "record_verify_report", "verify_bundle",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- no checkpoint


def _dummy_inputs(specs, batch: int, num_slots: int, rng: np.random.Generator) -> dict:
    """Inputs with the manifest's shapes: symbolic 'num_slots' -> num_slots, others -> batch.
    Ids are zeros (valid for every id input), floats are random."""
    inputs = {}
    for t in specs:
        shape = [
            d if isinstance(d, int) else (num_slots if d == "num_slots" else batch)
            for d in t.shape
        ]
        if t.dtype == "int64":
            inputs[t.name] = np.zeros(shape, dtype=np.int64)
        else:
            inputs[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return inputs


def _dims_match(shape: tuple, spec_shape: tuple, batch: int, num_slots: int) -> bool:
    if len(shape) != len(spec_shape):
        return False
    sizes = {"num_slots": num_slots, "batch": batch}
    return all(
        got == (want if isinstance(want, int) else sizes.get(want, got))
        for got, want in zip(shape, spec_shape, strict=True)
    )


def _dummy_runs(bundle: Bundle, config: SessionConfig, checks: Checks) -> None:
    """Every graph of the manifest, through a plain session: I/O as listed, runs, shapes."""
    rng = np.random.default_rng(0)
    batch, num_slots = 3, 5
    for role, spec in bundle.graphs.items():
        name = f"dummy_run[{role}]"
        try:
            session = ort.InferenceSession(
                str(spec.path), session_options(config), providers=wanted_providers(config)
            )
            check_io(session, spec)
            outputs = session.run(None, _dummy_inputs(spec.inputs, batch, num_slots, rng))
        except Exception as exc:  # noqa: BLE001 - report, never a stack trace
            detail = _one_line(exc)
            checks.fail(name, detail if spec.path.name in detail else f"{spec.path.name}: {detail}")
            continue
        for array, out in zip(outputs, spec.outputs, strict=True):
            if not _dims_match(array.shape, out.shape, batch, num_slots):
                checks.fail(name, f"{spec.path.name}: output '{out.name}' has shape "
                            f"{array.shape}, manifest {list(out.shape)}")
        checks.passed(name, f"B={batch}, S={num_slots}")


def _structure(bundle: Bundle, checks: Checks) -> None:
    for role, spec in bundle.graphs.items():
        problems = cuda_graph_blockers(spec.path)
        name = f"cuda_graph_ready[{role}]"
        if problems:
            checks.fail(name, f"{spec.path.name}: {'; '.join(problems[:3])}")
        else:
            checks.passed(name)


def _runner_smoke(bundle: Bundle, config: SessionConfig, checks: Checks) -> str:
    """The runner's binding path on dummy ids: output shapes, untouched slots. Returns the
    provider the runner got."""
    runner = StepRunner(bundle, num_slots=7, config=config)
    rng = np.random.default_rng(1)
    watch = PoolWatch(runner, rng, checks, "runner.untouched_slots")
    slots, ids = np.array([5, 2]), np.zeros(2, dtype=np.int64)
    rating = runner.encode(slots, ids, ids)
    watch.after(slots, "encode")
    checks.shape("runner.shapes", rating.shape, (2,), "encode rating")
    if runner.can_write_states:
        states = rng.standard_normal((2, bundle.hidden_size)).astype(np.float32)
        runner.write_states(slots, states)
        pool = watch.after(slots, "write_states")
        exact = np.count_nonzero(pool[0, slots] != states.astype(runner.pool_dtype))
        checks.value("state_writer.exact", exact, 0, "write_states")
    out = runner.step(slots, np.array([6, 0]), ids)
    watch.after(np.array([6, 0]), "greedy step")
    checks.shape("runner.shapes", out.next_tokens.shape, (2,), "next_token")
    if runner.top_k:
        out = runner.step(slots, slots, ids, want_topk=True)
        watch.after(slots, "top-k step")
        checks.shape("runner.shapes", out.topk_logprobs.shape, (2, runner.top_k), "topk_logprobs")
        checks.shape("runner.shapes", out.topk_ids.shape, (2, runner.top_k), "topk_ids")
    if runner.provider == CUDA:
        _placement(bundle, checks)
    return runner.provider


def _placement(bundle: Bundle, checks: Checks) -> None:
    rng = np.random.default_rng(2)
    for role in (STEP_GREEDY, STEP_TOPK):
        if role in bundle.graphs:
            spec = bundle.graphs[role]
            report = cuda_placement(spec.path, _dummy_inputs(spec.inputs, 3, 5, rng))
            if report.ok:
                checks.passed(f"cuda_placement[{role}]", report.describe())
            else:
                checks.fail(f"cuda_placement[{role}]", report.describe())


# ----------------------------------------------------------------------------- with checkpoint


def _match_checkpoint(bundle: Bundle, checkpoint: Checkpoint, checks: Checks) -> None:
    if bundle.model_config != checkpoint.model_config.to_dict():
        checks.fail("checkpoint_match", "bundle's model_config differs from the checkpoint's")
    elif list(bundle.vocab) != list(checkpoint.vocab.words):
        checks.fail("checkpoint_match", "bundle's vocabulary differs from the checkpoint's")
    else:
        checks.passed("checkpoint_match")
    if not checks.results["checkpoint_match"].ok:
        raise Fatal("checkpoint_match")


# ---------------------------------------------------------------------------------- driver


def verify_bundle(
    bundle_dir: str | Path,
    checkpoint: Checkpoint | str | Path | None = None,
    *,
    samples: int = 200,
    device: str = "cpu",
    batch_sizes: tuple[int, ...] = (1, 3, 64),
    num_steps: int = NUM_STEPS,
    seed: int = 0,
    progress: bool = True,
    corpus: Corpus | None = None,
) -> VerifyReport:
    """Verifies a bundle (see the module docstring). Never raises for a bad bundle: the
    report says what failed (report.ok, report.first_failure, report.summary()). `corpus`
    (with a checkpoint) adds the task metrics on its test split."""
    started = time.perf_counter()
    report = VerifyReport(
        bundle=str(bundle_dir), precision="?", device=device,
        with_checkpoint=checkpoint is not None,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    checks = Checks()
    try:
        _verify(report, checks, Path(bundle_dir), checkpoint, samples, device, batch_sizes,
                num_steps, seed, progress, corpus)
    except Fatal:
        pass
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check with its reason
        log.debug("verify crashed", exc_info=True)
        checks.fail("verify", _one_line(exc))
    report.checks = list(checks.results.values())
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _verify(report, checks, bundle_dir, checkpoint, samples, device, batch_sizes, num_steps,
            seed, progress, corpus) -> None:
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        checks.fail("integrity", str(exc))
        raise Fatal("integrity") from None
    checks.passed("integrity", f"{len(bundle.graphs)} graphs, hashes match")
    spec = PrecisionSpec.from_manifest(bundle.precision, bundle.manifest.get("tolerance"))
    report.precision, report.tolerance = spec.name, spec.tolerance_dict()
    # int8 runs on the CPU provider only: cuda is a failed check, auto means cpu
    config = for_precision(bundle.precision, SessionConfig(device=device))
    _structure(bundle, checks)
    _dummy_runs(bundle, config, checks)
    report.provider = _runner_smoke(bundle, config, checks)
    if spec.name == "fp16" and report.provider != CUDA:
        report.notes.append(
            f"fp16 verified on {report.provider}: ORT's CPU provider computes the float16 ops "
            "it has no kernel for in float32; verify again with device='cuda' on the target GPU"
        )
    if checkpoint is None:
        return
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(Path(checkpoint))
    report.torch_version = torch.__version__
    _match_checkpoint(bundle, checkpoint, checks)
    model = checkpoint.build_model()
    rng = np.random.default_rng(seed)
    runner = StepRunner(bundle, num_slots=4 * max(max(batch_sizes), GREEDY_CHUNK) + 3,
                        config=config)
    vgraph = VerifyGraph(model, spec.name, config)
    for batch in tqdm(batch_sizes, desc="step parity", unit="batch size", disable=not progress):
        parity_at(batch, model, runner, vgraph, spec, checks, rng, num_steps)
    if samples > 0:
        report.greedy = greedy_parity(bundle, model, runner, spec, samples, seed, progress)
    if corpus is not None:
        report.quality = quality(bundle, checkpoint, corpus, spec, config)
    elif spec.quantized:
        report.notes.append(
            f"{spec.name}: task metrics not measured; give the corpus the model was trained on "
            "(--data) to compare them with fp32's"
        )


def quality(bundle: Bundle, checkpoint: Checkpoint, corpus: Corpus, spec: PrecisionSpec,
            config: SessionConfig, split: str = "test", batch_size: int = 256) -> QualityReport:
    """The bundle's task metrics beside the checkpoint's (PyTorch fp32) on one split."""
    max_tokens = bundle.max_len
    reference = evaluate(checkpoint, corpus, split=split, batch_size=batch_size)
    scorer = BundleScorer(bundle, max_batch=batch_size, max_tokens=max_tokens, config=config)
    served = evaluate(checkpoint, corpus, split=split, batch_size=batch_size, scorer=scorer)
    return QualityReport.compare(
        split, served.num_evaluated, reference.metrics, served.metrics, spec.max_metric_change
    )


def _one_line(exc: BaseException) -> str:
    """Our own errors already read as one line naming the file; others get their type."""
    text = " ".join(str(exc).split())[:400]
    if isinstance(exc, (BundleError, DeviceError, CheckpointError)):
        return text
    return f"{type(exc).__name__}: {text}"


def record_verify_report(bundle_dir: str | Path, report: VerifyReport) -> None:
    """Stores the report as manifest["verify"]. Only manifest.json changes, and it is not
    hashed, so the bundle stays intact (checked by loading it again)."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    manifest["verify"] = report.to_dict()
    write_manifest(manifest, bundle_dir)
    load_bundle(bundle_dir)


def export_bundle(
    checkpoint_path: str | Path | Checkpoint,
    out_dir: str | Path,
    *,
    top_k: int = 64,
    precision: str = "fp32",
    samples: int = 200,
    device: str = "cpu",
    model_name: str = "nrt",
    batch_sizes: tuple[int, ...] = (1, 3, 64),
    keep_failed: bool = False,
    progress: bool = True,
    corpus: Corpus | None = None,
    tolerance: dict | None = None,
):
    """write_bundle + verify_bundle + the report recorded in the manifest.

    `tolerance` overrides the precision's defaults (keys of PrecisionSpec.with_tolerance:
    log_probs, greedy_agreement, metrics_relative); the manifest records what was used.
    `corpus` adds the task metrics of its test split; int8 requires it.

    The bundle is written and verified beside out_dir and only moved into place when it
    passes, so out_dir never holds an unverified bundle (a previous bundle there is replaced
    only by a verified one). On failure raises VerificationError (message: the first
    failure; .report: every figure) and removes the bundle, or with keep_failed moves it to
    `<out_dir>.failed` with the failing report in its manifest.

    Returns (out_dir, report)."""
    # a bad name or tolerance fails before any work
    spec = precision_spec(precision).with_tolerance(**(tolerance or {}))
    if spec.quantized and corpus is None:
        raise ValueError(
            f"precision {precision}: the export must measure the task metrics it keeps; give "
            "the corpus the model was trained on (--data)"
        )
    checkpoint = (
        checkpoint_path if isinstance(checkpoint_path, Checkpoint)
        else load_checkpoint(Path(checkpoint_path))
    )
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.verifying")
    log.info("writing %s bundle to %s", precision, staging)
    write_bundle(checkpoint, staging, top_k=top_k, model_name=model_name, precision=precision)
    try:
        _record_tolerance(staging, spec)
        report = verify_bundle(
            staging, checkpoint, samples=samples, device=device, batch_sizes=batch_sizes,
            progress=progress, corpus=corpus,
        )
        report.bundle = str(out_dir)
        record_verify_report(staging, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if report.ok:
        _move_into_place(staging, out_dir)
        return out_dir, report
    where = "removed"
    if keep_failed:
        failed = out_dir.with_name(out_dir.name + ".failed")
        _move_into_place(staging, failed)
        where = f"kept at {failed}"
    else:
        shutil.rmtree(staging, ignore_errors=True)
    raise VerificationError(
        f"{out_dir}: verification failed ({where}): {report.first_failure}", report
    )


def _record_tolerance(bundle_dir: Path, spec: PrecisionSpec) -> None:
    """The tolerances export was given, in the manifest (not hashed) where verify reads them."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    manifest["tolerance"] = spec.tolerance_dict()
    write_manifest(manifest, bundle_dir)


def _move_into_place(src: Path, dst: Path) -> None:
    """Replaces dst by src; the old dst is renamed aside first, so a crash leaves one whole
    bundle at either name, never a half-deleted one."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.replace(old)
    src.replace(dst)
    shutil.rmtree(old, ignore_errors=True)
