"""Weights -> bundle: the ONNX graphs, vocabulary, entity maps and a manifest that hashes
and describes every file. The runtime reads names and shapes from the manifest only.

Needs numpy and onnx, not torch: `write_bundle_from_weights` takes `NRTWeights` (trained or
synthetic); `write_bundle` is the same for a trained checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnxruntime as ort
from onnx import TensorProto

from gruserve.runtime.bundle import (
    BUNDLE_FORMAT,
    ENCODER,
    FORMAT_VERSION,
    MANIFEST,
    STATE_WRITER,
    STEP_GREEDY,
    STEP_HEAD,
    STEP_TOPK,
    sha256_file,
)

from . import onnx_graphs as og
from . import quantize
from .precision import precision_spec
from .vocab import EntityIndex, Vocabulary
from .weights import NRTWeights

if TYPE_CHECKING:  # torch lives there; building from weights never needs it
    from .checkpoint import Checkpoint

log = logging.getLogger(__name__)

FALLBACK_METHOD = "mean of the trained embeddings"

_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.FLOAT16: "float16"}

# role-level names the runtime binds, per graph role
_BINDINGS = {
    ENCODER: {
        "pool": og.POOL, "pool_out": og.POOL_OUT, "slots": og.SLOTS,
        "users": og.USERS, "items": og.ITEMS, "rating": og.RATING,
    },
    STEP_GREEDY: {
        "pool": og.POOL, "pool_out": og.POOL_OUT, "read_slots": og.READ_SLOTS,
        "write_slots": og.WRITE_SLOTS, "tokens": og.TOKENS, "next_token": og.NEXT_TOKEN,
    },
    STATE_WRITER: {
        "pool": og.POOL, "pool_out": og.POOL_OUT, "slots": og.SLOTS, "states": og.STATES,
    },
}
_BINDINGS[STEP_TOPK] = {
    **_BINDINGS[STEP_GREEDY], "topk_logprobs": og.TOPK_LOGPROBS, "topk_ids": og.TOPK_IDS,
}
_BINDINGS[STEP_HEAD] = {
    "pool": og.POOL, "slots": og.SLOTS, "topk_logprobs": og.TOPK_LOGPROBS,
    "topk_ids": og.TOPK_IDS,
}


def _tensor_specs(values) -> list[dict]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        specs.append({"name": v.name, "dtype": _DTYPES[t.elem_type], "shape": shape})
    return specs


def _write_graph(model: onnx.ModelProto, path: Path) -> dict:
    """Checks, shape-infers and saves one graph (weights inside: no external data file)."""
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    if model.ByteSize() >= 2**31 - 1:
        raise ValueError(f"{path.name}: graph exceeds protobuf's 2 GB single-file limit")
    onnx.save_model(model, str(path), save_as_external_data=False)
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "inputs": _tensor_specs(model.graph.input),
        "outputs": _tensor_specs(model.graph.output),
    }


def _write_json(data, path: Path) -> dict:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return {"file": path.name, "sha256": sha256_file(path)}


def write_bundle(
    checkpoint: Checkpoint,
    out_dir: Path,
    *,
    top_k: int = 64,
    model_name: str = "nrt",
    precision: str = "fp32",
) -> Path:
    """Writes a trained checkpoint's bundle into out_dir (replaced atomically). Verification
    is separate (`gruserve.export.verify`) and its report is added to the manifest by
    `export_bundle`.

    precision "fp16" halves the step graph's weights and the state pool, "int8" quantizes the
    step graphs' vocabulary projection for the CPU provider (see precision.py)."""
    return write_bundle_from_weights(
        checkpoint.weights(), checkpoint.vocab, checkpoint.users, checkpoint.items, out_dir,
        top_k=top_k, model_name=model_name, precision=precision,
        training={"epoch": checkpoint.epoch, "best_valid_loss": checkpoint.best_valid_loss},
    )


def write_bundle_from_weights(
    weights: NRTWeights,
    vocab: Vocabulary,
    users: EntityIndex,
    items: EntityIndex,
    out_dir: Path,
    *,
    top_k: int = 64,
    model_name: str = "nrt",
    precision: str = "fp32",
    training: dict | None = None,
    created_at: str | None = None,
) -> Path:
    """Writes the bundle of `weights` into out_dir (replaced atomically). `training` is
    recorded as the manifest's "training" entry; `created_at` (ISO 8601, default now) lets a
    generator write the same bytes every time."""
    spec = precision_spec(precision)
    cfg = weights.config
    if (len(vocab), len(users), len(items)) != (cfg.ntoken, cfg.num_users, cfg.num_items):
        raise ValueError(
            f"vocabulary/users/items have {len(vocab)}/{len(users)}/{len(items)} entries, "
            f"the weights {cfg.ntoken}/{cfg.num_users}/{cfg.num_items}"
        )
    top_k = min(top_k, len(vocab))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        graphs = {
            ENCODER: (og.build_encoder_graph(weights, precision), {}),
            STEP_GREEDY: (
                og.build_step_graph(weights, og.StepGraphOptions(precision=precision)), {}
            ),
            STATE_WRITER: (og.build_state_writer_graph(cfg, precision), {}),
        }
        if top_k > 0:
            graphs[STEP_TOPK] = (
                og.build_step_graph(
                    weights, og.StepGraphOptions(top_k=top_k, precision=precision)
                ),
                {"top_k": top_k},
            )
            graphs[STEP_HEAD] = (og.build_head_graph(weights, top_k, precision), {"top_k": top_k})
        manifest_graphs = {}
        for role, (graph, attributes) in graphs.items():
            entry = _write_graph(graph, staging / f"{role}.onnx")
            entry["bindings"] = _BINDINGS[role]
            entry["attributes"] = attributes
            manifest_graphs[role] = entry
        files = {
            "vocab": _write_json(list(vocab.words), staging / "vocab.json"),
            "entities": _write_json(
                {"users": list(users.ids), "items": list(items.ids)},
                staging / "entities.json",
            ),
        }
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": model_name,
            "created_at": created_at
            or datetime.now(UTC).isoformat(timespec="seconds"),
            "model_config": cfg.to_dict(),
            "special_ids": {
                "bos": vocab.bos_id, "eos": vocab.eos_id, "pad": vocab.pad_id, "unk": vocab.unk_id,
            },
            "precision": spec.name,
            "pool_dtype": spec.dtype_name,
            # what `verify` must reach for this precision; its report lands in "verify"
            "tolerance": spec.tolerance_dict(),
            # int8: what was quantized and how (float precisions have no entry)
            **({"quantization": quantize.describe()} if spec.quantized else {}),
            "opset": og.OPSET,
            "ir_version": og.IR_VERSION,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": ort.__version__,
            "graphs": manifest_graphs,
            "files": files,
            # the encoder's embedding rows for unknown ids (weights.fallback_embeddings)
            "fallback_entities": {
                "user": cfg.num_users, "item": cfg.num_items, "method": FALLBACK_METHOD,
            },
            "training": training or {},
            "verify": None,
        }
        write_manifest(manifest, staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.replace(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def write_manifest(manifest: dict, bundle_dir: Path) -> None:
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(bundle_dir / MANIFEST)
