"""Bundle integrity: every way a bundle can be broken is refused with one line that names the
file and the problem (BundleError), never a KeyError or a stack trace."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gruserve.runtime.bundle import MANIFEST, BundleError, load_bundle, sha256_file
from gruserve.runtime.runner import StepRunner


@pytest.fixture
def bundle_copy(tmp_path, synthetic_bundle_dir) -> Path:
    """A private copy of the synthetic bundle, free to break."""
    return Path(shutil.copytree(synthetic_bundle_dir, tmp_path / "bundle"))


def read_manifest(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / MANIFEST).read_text())


def write_manifest(bundle_dir: Path, manifest: dict) -> None:
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))


def refused(bundle_dir: Path, *parts: str) -> str:
    """load_bundle must raise a one-line BundleError containing every part."""
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


def test_the_tiny_bundle_loads_and_describes_itself(tiny_bundle):
    assert tiny_bundle.precision == "fp32"
    assert tiny_bundle.pool_dtype == "float32"
    assert tiny_bundle.manifest["pool_dtype"] == "float32"
    assert tiny_bundle.manifest["tolerance"] == {"log_probs": 1e-4, "hidden": 1e-4}
    assert set(tiny_bundle.graphs) == {
        "encoder", "decoder_step", "decoder_step_topk", "decoder_head", "state_writer",
    }
    assert not list(tiny_bundle.path.glob("*.data")), "weights must live inside the graphs"


@pytest.mark.parametrize(
    "name", ["decoder_step.onnx", "encoder.onnx", "vocab.json", "entities.json"]
)
def test_missing_file(bundle_copy, name):
    (bundle_copy / name).unlink()
    refused(bundle_copy, name, "missing")


def test_a_bundle_without_a_head_graph_still_serves_min_tokens(bundle_copy):
    """Bundles exported before the head graph existed: greedy requests with min_tokens then
    take the TopK graph, as they always did, and decode the same tokens."""
    from gruserve.runtime.bundle import ModelInfo
    from gruserve.runtime.config import SchedulerConfig
    from gruserve.runtime.core import EngineCore
    from gruserve.runtime.requests import DecodingParams

    def decode(bundle) -> tuple[list[list[int]], int, list[bool]]:
        runner = StepRunner(bundle, num_slots=8)
        core = EngineCore(runner, ModelInfo.from_bundle(bundle), SchedulerConfig(num_slots=8))
        for i, user in enumerate(bundle.users[:6]):
            core.add(core.requests.build(f"r{i}", DecodingParams(min_tokens=5, max_tokens=9),
                                         user_id=user, item_id=bundle.items[i]))
        outputs, wants = [], []
        while core.has_work():
            result = core.step()
            outputs += [o for o in result.outputs if o.finished]
            if result.plan.step is not None:
                wants.append(result.plan.step.want_topk)
        outputs.sort(key=lambda o: o.request_id)
        return [o.token_ids for o in outputs], runner.head_top_k, wants

    with_head, k, wants = decode(load_bundle(bundle_copy))
    assert k > 0 and not any(wants)  # the ArgMax graph every step
    manifest = read_manifest(bundle_copy)
    del manifest["graphs"]["decoder_head"]
    write_manifest(bundle_copy, manifest)
    (bundle_copy / "decoder_head.onnx").unlink()
    without, k, wants = decode(load_bundle(bundle_copy))
    assert k == 0 and all(wants[:5])  # TopK while <eos> must be suppressed
    assert without == with_head
    assert all(len(tokens) >= 5 for tokens in without)


@pytest.mark.parametrize(
    "name", ["decoder_step_topk.onnx", "decoder_head.onnx", "state_writer.onnx", "entities.json"]
)
def test_wrong_hash(bundle_copy, name):
    with open(bundle_copy / name, "ab") as f:
        f.write(b" ")
    refused(bundle_copy, name, "sha256 mismatch")


def test_missing_bundle_directory(tmp_path):
    refused(tmp_path / "nope", "nope", "not found")


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_unknown_format_version(bundle_copy, version):
    manifest = read_manifest(bundle_copy)
    manifest["format_version"] = version
    write_manifest(bundle_copy, manifest)
    refused(bundle_copy, MANIFEST, "unknown format_version")


@pytest.mark.parametrize(
    "garbage", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"format": "other"}']
)
def test_manifest_garbage(bundle_copy, garbage):
    (bundle_copy / MANIFEST).write_bytes(garbage)
    refused(bundle_copy, MANIFEST)


DROP = object()  # marks a field to delete


def _edit(manifest: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        last = int(last)
    if value is DROP:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("graphs", DROP), ("files", DROP), ("special_ids", DROP), ("model_config", DROP),
        ("graphs.decoder_step", DROP), ("graphs.encoder.sha256", DROP),
        ("graphs.decoder_step.inputs", DROP), ("graphs.decoder_step.bindings", DROP),
        ("graphs.decoder_step.bindings.pool", DROP), ("files.vocab", DROP),
        ("model_config.ntoken", DROP), ("model_config.hidden_size", DROP),
        ("special_ids.eos", DROP),
        ("graphs", []), ("graphs.encoder", "encoder.onnx"), ("files.vocab.file", 7),
        ("special_ids.bos", "x"), ("special_ids.eos", 10_000),
        ("model_config.hidden_size", "32"), ("graphs.decoder_step.inputs", [{"name": 1}]),
        ("graphs.decoder_step.bindings.tokens", "no_such_input"),
        ("graphs.decoder_step.inputs.0.dtype", "complex64"),
        ("precision", "int4"), ("precision", "fp16"),
        ("graphs.decoder_step_topk.attributes.top_k", 8),
        ("graphs.decoder_step_topk.attributes.top_k", "16"),
        ("graphs.decoder_step_topk.attributes", DROP),
    ],
    ids=lambda v: "drop" if v is DROP else str(v),
)
def test_missing_or_bad_fields(bundle_copy, path, value):
    manifest = read_manifest(bundle_copy)
    _edit(manifest, path, value)
    write_manifest(bundle_copy, manifest)
    refused(bundle_copy, MANIFEST)


@pytest.mark.parametrize(
    "name", ["../decoder_step.onnx", "/tmp/decoder_step.onnx", "sub/x.onnx", "..", ""]
)
def test_graph_file_outside_the_bundle_is_refused(bundle_copy, name):
    # a real file with the right hash waits outside: only the name check can refuse it
    outside = bundle_copy.parent / "decoder_step.onnx"
    shutil.copy(bundle_copy / "decoder_step.onnx", outside)
    manifest = read_manifest(bundle_copy)
    manifest["graphs"]["decoder_step"]["file"] = name
    write_manifest(bundle_copy, manifest)
    refused(bundle_copy, "not a plain name inside the bundle")


def test_symlink_leading_outside_is_refused(bundle_copy):
    outside = bundle_copy.parent / "elsewhere.onnx"
    shutil.move(bundle_copy / "decoder_step.onnx", outside)
    os.symlink(outside, bundle_copy / "decoder_step.onnx")
    refused(bundle_copy, "decoder_step.onnx", "outside the bundle")


def test_graphs_disagreeing_on_the_pool_dtype(bundle_copy):
    manifest = read_manifest(bundle_copy)
    manifest["graphs"]["encoder"]["inputs"][0]["dtype"] = "float16"
    write_manifest(bundle_copy, manifest)
    refused(bundle_copy, "pool's dtype")


def test_vocabulary_size_must_match_ntoken(bundle_copy):
    vocab = json.loads((bundle_copy / "vocab.json").read_text())
    (bundle_copy / "vocab.json").write_text(json.dumps(vocab[:-1]))
    manifest = read_manifest(bundle_copy)
    manifest["files"]["vocab"]["sha256"] = sha256_file(bundle_copy / "vocab.json")
    write_manifest(bundle_copy, manifest)
    refused(bundle_copy, "vocab.json", "ntoken")


# --- graph I/O against the manifest: the manifest is consistent, the graph is not ----------


def _runner_refuses(bundle_dir: Path, *parts: str) -> None:
    bundle = load_bundle(bundle_dir)  # the manifest itself is fine
    with pytest.raises(BundleError) as info:
        StepRunner(bundle, num_slots=4)
    message = str(info.value)
    assert "\n" not in message.strip()
    for part in parts:
        assert part in message, message


def test_graph_input_renamed_in_the_manifest(bundle_copy):
    manifest = read_manifest(bundle_copy)
    step = manifest["graphs"]["decoder_step"]
    step["inputs"][3]["name"] = "words"
    step["bindings"]["tokens"] = "words"
    write_manifest(bundle_copy, manifest)
    _runner_refuses(bundle_copy, "decoder_step.onnx", "input 3 is 'tokens'", "says 'words'")


def test_graph_output_dtype_differs_from_the_manifest(bundle_copy):
    manifest = read_manifest(bundle_copy)
    manifest["graphs"]["decoder_step_topk"]["outputs"][2]["dtype"] = "float16"
    write_manifest(bundle_copy, manifest)
    _runner_refuses(bundle_copy, "decoder_step_topk.onnx", "output 2", "tensor(float16)")


def test_graph_fixed_dim_differs_from_the_manifest(bundle_copy):
    manifest = read_manifest(bundle_copy)
    for graph in manifest["graphs"].values():
        graph["inputs"][0]["shape"][2] += 1  # the pool's hidden size
    write_manifest(bundle_copy, manifest)
    _runner_refuses(bundle_copy, "encoder.onnx", "[1, ?, 32], the manifest says", "[1, ?, 33]")


def test_graph_file_that_is_not_onnx(bundle_copy):
    (bundle_copy / "decoder_step.onnx").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    manifest = read_manifest(bundle_copy)
    manifest["graphs"]["decoder_step"]["sha256"] = sha256_file(bundle_copy / "decoder_step.onnx")
    write_manifest(bundle_copy, manifest)
    _runner_refuses(bundle_copy, "decoder_step.onnx", "onnxruntime cannot load it")
