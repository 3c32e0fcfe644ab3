"""Export proves itself: ORT vs PyTorch per step and token for token, verify catching broken
bundles, fp16 export, CUDA-graph readiness, and export_bundle's all-or-nothing output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the export extra; the torch-free lane skips it")
pytest.importorskip("onnx", reason="needs the export extra; the torch-free lane skips it")

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from gruserve.export import onnx_graphs as og
from gruserve.export.graph_checks import cuda_graph_blockers, cuda_placement
from gruserve.export.precision import PRECISIONS, PrecisionSpec
from gruserve.export.verify import (
    VerificationError,
    export_bundle,
    record_verify_report,
    verify_bundle,
)
from gruserve.runtime.bundle import MANIFEST, load_bundle, sha256_file
from gruserve.runtime.providers import CPU, CUDA, SessionConfig
from gruserve.runtime.runner import StepRunner

BATCHES = (1, 3, 64)


@pytest.fixture(scope="module")
def fp32_report(tiny_bundle_dir, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    return verify_bundle(tiny_bundle_dir, checkpoint, samples=200, progress=False)


@pytest.fixture
def bundle_copy(tmp_path, tiny_bundle_dir) -> Path:
    return Path(shutil.copytree(tiny_bundle_dir, tmp_path / "bundle"))


def check(report, name):
    matches = [c for c in report.checks if c.name == name]
    assert matches, f"no check named {name}: {[c.name for c in report.checks]}"
    return matches[0]


# --- fp32 parity ---------------------------------------------------------------------------


def test_fp32_bundle_passes_verification(fp32_report):
    assert fp32_report.ok, fp32_report.summary()
    assert fp32_report.first_failure is None
    assert fp32_report.provider == CPU
    json.dumps(fp32_report.to_dict())  # JSON-serialisable as it is


@pytest.mark.parametrize("batch", BATCHES)
def test_fp32_parity_of_both_graphs_at_each_batch(fp32_report, batch):
    tag = f"B={batch}"
    for name in (
        f"encoder[{tag}].rating", f"encoder[{tag}].state",
        f"step[{tag}].log_probs", f"step[{tag}].hidden",
        f"served.greedy[{tag}].hidden", f"served.greedy[{tag}].argmax_gap",
        f"served.topk[{tag}].hidden", f"served.topk[{tag}].logprobs", f"served.topk[{tag}].ids",
    ):
        c = check(fp32_report, name)
        assert c.ok and c.value is not None and c.value <= 1e-4, (name, c)
    assert check(fp32_report, f"untouched_slots[{tag}]").value == 0


def test_greedy_decodes_match_token_for_token(fp32_report):
    greedy = fp32_report.greedy
    assert greedy.num_pairs >= 200
    assert greedy.num_identical == greedy.num_pairs, greedy.first_divergence
    assert greedy.first_divergence is None


def test_served_step_matches_pytorch_directly(tiny_bundle, tiny_checkpoint):
    """Independent of verify's own bookkeeping: 3 rows, scattered slots, 4 steps."""
    model = tiny_checkpoint[0].build_model()
    runner = StepRunner(tiny_bundle, num_slots=11)
    rng = np.random.default_rng(3)
    start = rng.standard_normal((1, 11, tiny_bundle.hidden_size)).astype(np.float32)
    runner.pool.update_inplace(start)
    slots, users, items = np.array([9, 2, 5]), np.array([0, 7, 3]), np.array([4, 1, 0])
    runner.encode(slots, users, items)
    with torch.no_grad():
        _, hidden = model.encoder(torch.as_tensor(users), torch.as_tensor(items))
    tokens = np.full(3, tiny_bundle.special_ids["bos"])
    for _ in range(4):
        out = runner.step(slots, slots, tokens, want_topk=True)
        with torch.no_grad():
            log_probs, hidden = model.decoder(torch.as_tensor(tokens)[:, None], hidden)
        log_probs = log_probs[:, 0]
        pool = runner.pool.numpy()
        np.testing.assert_allclose(pool[:, slots], hidden.numpy(), atol=1e-4)
        top = torch.topk(log_probs, runner.top_k).values.numpy()
        np.testing.assert_allclose(out.topk_logprobs, top, atol=1e-4)
        np.testing.assert_array_equal(out.next_tokens, log_probs.argmax(1).numpy())
        untouched = np.setdiff1d(np.arange(11), slots)
        assert pool[:, untouched].tobytes() == start[:, untouched].tobytes()
        tokens = out.next_tokens


# --- verify catches broken bundles ------------------------------------------------------------


def _tamper_initializer(bundle_dir: Path, graph_file: str, name: str, scale: float) -> None:
    """Changes one weight and fixes the manifest's hash, so only numerics can tell."""
    path = bundle_dir / graph_file
    model = onnx.load(str(path))
    (init,) = [t for t in model.graph.initializer if t.name == name]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, name))
    onnx.save_model(model, str(path))
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    for entry in manifest["graphs"].values():
        if entry["file"] == graph_file:
            entry["sha256"] = sha256_file(path)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))


def test_verify_catches_a_tampered_weight(bundle_copy, tiny_checkpoint):
    _tamper_initializer(bundle_copy, "decoder_step.onnx", "gru.weight_hh_t", 1.01)
    load_bundle(bundle_copy)  # integrity holds: the hash was fixed up
    assert verify_bundle(bundle_copy, progress=False).ok, "without weights nothing can tell"
    report = verify_bundle(bundle_copy, tiny_checkpoint[0], samples=64, progress=False)
    assert not report.ok
    assert report.first_failure.startswith("served.greedy[B=1].hidden"), report.first_failure
    assert check(report, "step[B=1].log_probs").ok  # the in-memory graph is the checkpoint's
    assert "FAIL" in report.summary()


def test_verify_catches_a_tampered_output_layer_in_the_sampling_graph(bundle_copy, tiny_checkpoint):
    _tamper_initializer(bundle_copy, "decoder_step_topk.onnx", "decoder.linear.weight_t", 1.05)
    report = verify_bundle(bundle_copy, tiny_checkpoint[0], samples=0, progress=False)
    assert not report.ok
    assert not check(report, "served.topk[B=1].logprobs").ok
    assert check(report, "served.greedy[B=1].hidden").ok


def test_verify_names_the_first_greedy_divergence(bundle_copy, tiny_checkpoint):
    """A bias that makes token 7 win everywhere: the state is untouched, the tokens are not."""
    path = bundle_copy / "decoder_step.onnx"
    model = onnx.load(str(path))
    (bias,) = [t for t in model.graph.initializer if t.name == "decoder.linear.bias"]
    values = numpy_helper.to_array(bias).copy()
    values[7] += 100.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save_model(model, str(path))
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["graphs"]["decoder_step"]["sha256"] = sha256_file(path)
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))

    report = verify_bundle(bundle_copy, tiny_checkpoint[0], samples=32, progress=False)
    assert check(report, "served.greedy[B=3].hidden").ok
    assert not check(report, "served.greedy[B=3].argmax_gap").ok
    greedy = report.greedy
    assert (greedy.num_pairs, greedy.num_identical, greedy.num_failed) == (32, 0, 32)
    first = greedy.first_divergence
    assert (first["pair"], first["position"], first["got"]) == (0, 0, 7)
    assert first["expected"] != 7 and first["margin"] > 1
    assert first["user"] in load_bundle(bundle_copy).users


def test_pool_watch_catches_a_write_outside_the_listed_slots(tiny_bundle):
    from gruserve.export.parity import PoolWatch
    from gruserve.export.verify_report import Checks

    checks = Checks()
    runner = StepRunner(tiny_bundle, num_slots=6)
    watch = PoolWatch(runner, np.random.default_rng(0), checks, "untouched")
    runner.write_states(np.array([2, 4]), np.zeros((2, tiny_bundle.hidden_size), np.float32))
    watch.after(np.array([2, 4]), "listed")
    assert checks.results["untouched"].ok
    runner.write_states(np.array([3]), np.ones((1, tiny_bundle.hidden_size), np.float32))
    watch.after(np.array([2]), "slot 3 not listed")
    result = checks.results["untouched"]
    assert not result.ok and result.value == tiny_bundle.hidden_size
    assert result.detail.startswith("slot 3 not listed")


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("missing", "decoder_step.onnx: missing"),
        ("hash", "decoder_step.onnx: sha256 mismatch"),
        ("version", "unknown format_version 9"),
        ("io", "output 1 is 'next_token' tensor(int64) [?], the manifest says 'best_token'"),
    ],
)
def test_verify_reports_broken_bundles_without_raising(bundle_copy, breakage, expected):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    if breakage == "missing":
        (bundle_copy / "decoder_step.onnx").unlink()
    elif breakage == "hash":
        with open(bundle_copy / "decoder_step.onnx", "ab") as f:
            f.write(b"\0")
    elif breakage == "version":
        manifest["format_version"] = 9
    else:
        manifest["graphs"]["decoder_step"]["outputs"][1]["name"] = "best_token"
        manifest["graphs"]["decoder_step"]["bindings"]["next_token"] = "best_token"
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    report = verify_bundle(bundle_copy, progress=False)
    assert not report.ok
    assert expected in report.first_failure, report.first_failure
    assert "Traceback" not in report.summary()


def test_verify_refuses_a_checkpoint_of_another_model(tiny_bundle_dir, tiny_checkpoint):
    checkpoint = tiny_checkpoint[0]
    other = type(checkpoint)(**{**checkpoint.__dict__})
    other.model_config = type(checkpoint.model_config)(
        **{**checkpoint.model_config.to_dict(), "hidden_size": 8}
    )
    report = verify_bundle(tiny_bundle_dir, other, progress=False)
    assert not report.ok
    assert report.first_failure.startswith("checkpoint_match")


def test_recording_the_report_keeps_the_bundle_intact(bundle_copy, fp32_report):
    hashes = {p.name: sha256_file(p) for p in bundle_copy.iterdir() if p.name != MANIFEST}
    record_verify_report(bundle_copy, fp32_report)
    bundle = load_bundle(bundle_copy)
    assert bundle.manifest["verify"]["ok"] is True
    assert bundle.manifest["verify"]["greedy"]["num_pairs"] >= 200
    assert {p.name: sha256_file(p) for p in bundle_copy.iterdir() if p.name != MANIFEST} == hashes


# --- export_bundle ------------------------------------------------------------------------


def test_export_bundle_writes_a_verified_bundle(tmp_path, tiny_checkpoint):
    _, checkpoint_path = tiny_checkpoint
    out, report = export_bundle(
        checkpoint_path, tmp_path / "nrt", top_k=8, samples=64, progress=False
    )
    assert report.ok and out == tmp_path / "nrt"
    manifest = load_bundle(out).manifest
    assert manifest["verify"]["ok"] is True and manifest["verify"]["bundle"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nrt"], "no staging left behind"


@pytest.fixture
def impossible_fp32_tolerance(monkeypatch):
    """Zero tolerance: ORT and PyTorch round differently, so verification must fail."""
    strict = PrecisionSpec("fp32", np.float32, TensorProto.FLOAT, 0.0, 0.0)
    monkeypatch.setitem(PRECISIONS, "fp32", strict)


def test_failed_verification_leaves_no_bundle(tmp_path, tiny_checkpoint, impossible_fp32_tolerance):
    with pytest.raises(VerificationError) as info:
        export_bundle(tiny_checkpoint[0], tmp_path / "nrt", samples=8, progress=False)
    assert "verification failed" in str(info.value)
    assert not info.value.report.ok
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_keeps_the_previous_bundle(
    tmp_path, tiny_checkpoint, tiny_bundle_dir, impossible_fp32_tolerance
):
    out = Path(shutil.copytree(tiny_bundle_dir, tmp_path / "nrt"))
    before = sha256_file(out / MANIFEST)
    with pytest.raises(VerificationError):
        export_bundle(tiny_checkpoint[0], out, samples=8, keep_failed=True, progress=False)
    assert sha256_file(out / MANIFEST) == before
    failed = load_bundle(tmp_path / "nrt.failed")
    assert failed.manifest["verify"]["ok"] is False


# --- fp16 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("fp16") / "nrt16"
    try:
        return export_bundle(
            tiny_checkpoint[0], out, precision="fp16", top_k=16, samples=200, progress=False
        )
    except VerificationError as exc:
        if "onnxruntime cannot load it" in str(exc) or "NOT_IMPLEMENTED" in str(exc):
            pytest.skip(f"this onnxruntime's CPU provider cannot run the fp16 graphs: {exc}")
        raise


def test_fp16_export_matches_within_its_tolerance(fp16_export):
    out, report = fp16_export
    assert report.ok, report.summary()
    assert report.precision == "fp16"
    assert report.tolerance == {"log_probs": 5e-2, "hidden": 1e-2}
    assert any("fp16 verified on CPUExecutionProvider" in n for n in report.notes)
    greedy = report.greedy
    assert greedy.num_identical + greedy.num_near_ties == greedy.num_pairs >= 200
    manifest = load_bundle(out).manifest
    assert (manifest["precision"], manifest["pool_dtype"]) == ("fp16", "float16")
    assert manifest["tolerance"] == report.tolerance and manifest["verify"]["ok"]


def test_fp16_graphs_keep_the_vocabulary_head_in_fp32(fp16_export):
    out, _ = fp16_export
    heads = {"decoder_step.onnx": "ArgMax", "decoder_step_topk.onnx": "LogSoftmax"}
    for graph_file, head in heads.items():
        step = onnx.load(str(out / graph_file))
        weights = {t.name: t.data_type for t in step.graph.initializer}
        assert weights["gru.weight_hh_t"] == TensorProto.FLOAT16
        assert weights["decoder.linear.weight_t"] == TensorProto.FLOAT16
        producers = {o: n for n in step.graph.node for o in n.output}
        (node,) = [n for n in step.graph.node if n.op_type == head]
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    encoder = onnx.load(str(out / "encoder.onnx"))
    assert {t.data_type for t in encoder.graph.initializer if t.name.startswith("encoder.")} == {
        TensorProto.FLOAT
    }


def test_fp16_runner_allocates_a_float16_pool(fp16_export):
    out, _ = fp16_export
    runner = StepRunner(load_bundle(out), num_slots=4)
    assert runner.pool_dtype == np.float16
    assert runner.pool.numpy().dtype == np.float16
    runner.write_states(np.array([1]), np.full((1, runner.bundle.hidden_size), 0.5, np.float32))
    assert runner.read_states(np.array([1])).dtype == np.float16


# --- CUDA-graph readiness -----------------------------------------------------------------


def test_served_graphs_are_cuda_graph_ready(tiny_bundle, fp32_report):
    for spec in tiny_bundle.graphs.values():
        assert cuda_graph_blockers(spec.path) == [], spec.path
        assert check(fp32_report, f"cuda_graph_ready[{spec.role}]").ok


def _graph(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", og.OPSET)])


def _loop_graph():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["x_in", "x_in"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [2])],
    )
    return _graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="unrolled_decode", body=body)],
        [helper.make_tensor_value_info("trips", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )


def test_a_graph_with_a_loop_is_not_cuda_graph_ready():
    model = _loop_graph()
    onnx.checker.check_model(model)
    problems = cuda_graph_blockers(model)
    assert any("unrolled_decode" in p and "Loop" in p for p in problems), problems


def test_a_shape_from_the_host_is_not_cuda_graph_ready():
    model = _graph(
        [helper.make_node("Cast", ["new_shape"], ["shape64"], to=TensorProto.INT64),
         helper.make_node("Reshape", ["x", "shape64"], ["y"], name="reshape_by_host")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("new_shape", TensorProto.INT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    problems = cuda_graph_blockers(model)
    assert len(problems) == 1 and "reshape_by_host" in problems[0] and "new_shape" in problems[0]


def test_a_shape_read_from_a_tensor_is_fine():
    model = _graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Reshape", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    assert cuda_graph_blockers(model) == []


def test_placement_profile_names_nodes_off_the_expected_provider(tiny_bundle):
    spec = tiny_bundle.graphs["decoder_step"]
    feeds = {
        og.POOL: np.zeros((1, 4, tiny_bundle.hidden_size), np.float32),
        og.READ_SLOTS: np.array([0, 1]), og.WRITE_SLOTS: np.array([2, 3]),
        og.TOKENS: np.array([0, 1]),
    }
    on_cpu = cuda_placement(spec.path, feeds, providers=[CPU], expected=CPU)
    assert on_cpu.ok and len(on_cpu.nodes) > 10
    not_cuda = cuda_placement(spec.path, feeds, providers=[CPU], expected=CUDA)
    assert not not_cuda.ok and not_cuda.elsewhere["next_token"] == CPU
    assert f"{len(on_cpu.nodes)} of {len(on_cpu.nodes)} nodes not on {CUDA}" in not_cuda.describe()


# --- GPU (skipped visibly without a working CUDA provider) ---------------------------------


@pytest.fixture(scope="module")
def cuda_or_skip(tiny_bundle):
    try:
        runner = StepRunner(tiny_bundle, num_slots=2, config=SessionConfig(device="cuda"))
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable CUDA here
        pytest.skip(f"CUDAExecutionProvider cannot create a session here: {exc}")
    if runner.provider != CUDA:
        pytest.skip(f"CUDA session fell back to {runner.provider}")


@pytest.mark.gpu
def test_gpu_fp32_bundle_verifies_on_cuda_with_every_node_on_cuda(
    cuda_or_skip, tiny_bundle_dir, tiny_checkpoint
):
    report = verify_bundle(tiny_bundle_dir, tiny_checkpoint[0], device="cuda", progress=False)
    assert report.provider == CUDA
    assert check(report, "cuda_placement[decoder_step]").ok, report.summary()
    assert report.ok, report.summary()


@pytest.mark.gpu
def test_gpu_fp16_bundle_verifies_on_cuda(cuda_or_skip, tmp_path, tiny_checkpoint):
    out, report = export_bundle(
        tiny_checkpoint[0], tmp_path / "nrt16", precision="fp16", device="cuda", progress=False
    )
    assert report.provider == CUDA and report.ok and not report.notes, report.summary()
