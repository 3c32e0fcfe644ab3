"""int8 bundles: the quantized graphs, the quality export proves and records, and serving.

The tiny model is trained for real (conftest), so its logits have real margins; its int8
bundle is exported once per module with the default tolerances and the tiny corpus."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("torch", reason="needs the export extra; the torch-free lane skips it")
pytest.importorskip("onnx", reason="needs the export extra; the torch-free lane skips it")
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from gruserve.export import quantize
from gruserve.export.bundle_eval import BundleScorer, greedy_decodes
from gruserve.export.evaluate import evaluate
from gruserve.export.model import greedy_decode
from gruserve.export.parity import verify_pairs
from gruserve.export.precision import precision_spec
from gruserve.export.verify import VerificationError, export_bundle, verify_bundle
from gruserve.export.verify_report import GreedyParity, QualityReport
from gruserve.runtime import cli
from gruserve.runtime.bundle import MANIFEST, STEP_GREEDY, STEP_TOPK, load_bundle, sha256_file
from gruserve.runtime.client import GruserveClient
from gruserve.runtime.providers import CPU, SessionConfig
from gruserve.runtime.runner import StepRunner

from .serving import running_server

SAMPLES = 120


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, tiny_checkpoint, tiny_corpus):
    out = tmp_path_factory.mktemp("int8") / "nrt8"
    return export_bundle(
        tiny_checkpoint[0], out, precision="int8", top_k=16, samples=SAMPLES,
        corpus=tiny_corpus, progress=False,
    )


@pytest.fixture(scope="module")
def int8_bundle(int8_export):
    return load_bundle(int8_export[0])


# --- export proves and records the quality ------------------------------------------------


def test_int8_export_of_a_trained_model_passes_verify(int8_export):
    out, report = int8_export
    assert report.ok, report.summary()
    assert report.precision == "int8" and report.provider == CPU
    spec = precision_spec("int8")
    greedy = report.greedy
    assert greedy.num_pairs == SAMPLES and greedy.min_agreement == spec.min_agreement == 0.99
    assert greedy.num_steps >= SAMPLES and greedy.agreement >= 0.99
    assert 0 < report.max_log_prob_error <= spec.log_prob_tolerance
    quality = report.quality
    assert quality.split == "test" and quality.num_reviews > 0 and quality.ok
    assert {m.name for m in quality.metrics} == {"perplexity", "bleu_1", "bleu_4", "fmr", "rmse"}
    # the GRU and the encoder stay float32: states and ratings are fp32's, only logits move
    checks = {c.name: c for c in report.checks}
    assert checks["served.greedy[B=64].hidden"].value < 1e-4
    assert checks["encoder[B=64].rating"].value < 1e-4
    # the head decides on float32 logits: PyTorch's best token, and top-K log-probs far
    # closer than the int8 logits over the whole vocabulary
    assert checks["served.greedy[B=64].argmax_gap"].value < 1e-4
    assert report.max_served_log_prob_error < report.max_log_prob_error / 2
    assert "int8" in report.summary() and "token agreement" in report.summary()


def test_int8_manifest_records_precision_method_tolerances_and_figures(int8_bundle, int8_export):
    manifest = int8_bundle.manifest
    assert (manifest["precision"], manifest["pool_dtype"]) == ("int8", "float32")
    assert manifest["quantization"]["method"] == quantize.METHOD
    assert manifest["quantization"]["weights"] == [quantize.VOCAB_PROJECTION]
    assert manifest["tolerance"] == {
        "log_probs": 0.5, "hidden": 1e-4, "greedy_agreement": 0.99, "metrics_relative": 0.01,
    }
    recorded = manifest["verify"]
    report = int8_export[1]
    assert recorded["ok"] and recorded["greedy"]["agreement"] == report.greedy.agreement
    assert recorded["max_log_prob_error"] == report.max_log_prob_error
    metrics = {m["name"]: m for m in recorded["quality"]["metrics"]}
    assert metrics["perplexity"]["bundle"] == report.quality.bundle_metrics["perplexity"]
    assert recorded["quality"]["reference_metrics"]["bleu_1"] == metrics["bleu_1"]["reference"]


def test_both_step_graphs_run_the_vocab_projection_on_int8_weights(int8_bundle):
    for role in (STEP_GREEDY, STEP_TOPK):
        graph = onnx.load(str(int8_bundle.graphs[role].path)).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("MatMulIntegerToFloat") == 1, role
        assert ops.count("MatMul") == 3, role  # the GRU's two and the shortlist's dot products
        weights = {t.name: t for t in graph.initializer}
        assert weights[quantize.VOCAB_PROJECTION + ".int8"].data_type == TensorProto.INT8
        assert quantize.VOCAB_PROJECTION not in weights, "no (H, V) float copy left behind"
        rows = numpy_helper.to_array(weights[quantize.VOCAB_PROJECTION + ".rows"])
        assert rows.shape == (len(int8_bundle.vocab), int8_bundle.hidden_size)
    encoder = onnx.load(str(int8_bundle.graphs["encoder"].path)).graph
    assert "MatMulIntegerToFloat" not in {n.op_type for n in encoder.node}


def _one_matmul(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
         helper.make_node("Add", ["mm", "b"], ["y"], name="add")],
        "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def test_int8_matmul_is_exact_integer_arithmetic_even_at_the_range_ends():
    """ORT's result equals numpy's exact integer product: no int16 saturation in the CPU
    kernel (codes 0..128 x weights +-127), rows with every activation at -1 or +1 included."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.5, (400, 96)).astype(np.float32)
    weight[:, 0] = 2.0  # a column of equal large weights: the worst case for pair sums
    bias = rng.normal(0, 1, 96).astype(np.float32)
    model = quantize.quantize_step_graph(_one_matmul(weight, bias), weights=("w",))
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    x = np.tanh(rng.normal(0, 2, (6, 400))).astype(np.float32)
    x[0], x[1], x[2] = 1.0, -1.0, np.tile([1.0, -1.0], 200)
    x[3] = 1.5  # outside the range: clipped, never a wrapped sum
    (got,) = session.run(None, {"x": x})
    q_w, scale_w = quantize.quantize_weight(weight)
    codes = np.rint(np.clip(x, -1, 1) * 64).astype(np.int64)  # (code - zero point)
    exact = (codes @ q_w.astype(np.int64)) * (scale_w / 64) + bias
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
    # and within the rounding bound of the float product: each weight is off by at most half
    # its column's step, each activation by at most half of 1/64
    xs = x[4:]
    bound = np.abs(xs) @ np.ones_like(weight) * (scale_w / 2) + (0.5 / 64) * np.abs(weight).sum(0)
    assert (np.abs(got[4:] - (xs @ weight + bias)) <= bound + 1e-4).all()


def test_quantized_weights_round_per_column():
    w = np.array([[0.5, -3.0, 0.0], [-0.25, 1.5, 0.0]], dtype=np.float32)
    q, scale = quantize.quantize_weight(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    np.testing.assert_allclose(scale, [0.5 / 127, 3.0 / 127, 1.0])
    assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7


def test_the_head_picks_the_exact_best_of_its_int8_shortlist(int8_bundle, tiny_checkpoint):
    """Greedy: the float32 ArgMax among the int8 top 4. Sampling: the int8 top K, ordered
    and spaced by float32 logits. Recomputed here in numpy from the checkpoint's weights."""
    state = tiny_checkpoint[0].state_dict
    weight = state["decoder.linear.weight"].numpy().T  # (H, V)
    bias = state["decoder.linear.bias"].numpy()
    runner = StepRunner(int8_bundle, num_slots=64, config=SessionConfig(device="cpu"))
    rng = np.random.default_rng(5)
    slots, rows = np.arange(64), np.arange(64)[:, None]
    runner.encode(slots, rng.integers(0, 60, 64), rng.integers(0, 50, 64))
    before = runner.read_states(slots).copy()
    tokens = rng.integers(4, len(int8_bundle.vocab), 64)
    greedy = runner.step(slots, slots, tokens).next_tokens
    hidden = runner.read_states(slots)[0].astype(np.float64)  # the state the head read
    q, scale = quantize.quantize_weight(weight)
    int8_logits = (np.rint(np.clip(hidden, -1, 1) * 64) @ q) * (scale / 64) + bias
    exact = hidden @ weight + bias
    shortlist = np.argsort(-int8_logits, axis=1, kind="stable")
    best = shortlist[:, :4][rows[:, 0], np.argmax(exact[rows, shortlist[:, :4]], axis=1)]
    np.testing.assert_array_equal(greedy, best)
    runner.write_states(slots, before[0])
    sampled = runner.step(slots, slots, tokens, want_topk=True)
    k = runner.top_k
    assert [set(r) for r in sampled.topk_ids] == [set(r) for r in shortlist[:, :k]]
    spacing = sampled.topk_logprobs - sampled.topk_logprobs[:, :1]
    np.testing.assert_allclose(spacing, exact[rows, sampled.topk_ids]
                               - exact[rows, sampled.topk_ids[:, :1]], atol=1e-4)
    assert (np.diff(sampled.topk_logprobs, axis=1) <= 0).all()
    np.testing.assert_array_equal(sampled.next_tokens, sampled.topk_ids[:, 0])


def test_an_int8_row_gets_the_same_bits_alone_and_inside_any_batch(int8_bundle):
    """The fixed activation scale makes rows independent (dynamic quantization would not)."""
    runner = StepRunner(int8_bundle, num_slots=70, config=SessionConfig(device="cpu"))
    rng = np.random.default_rng(3)
    slots = np.arange(64)
    runner.encode(slots, rng.integers(0, 60, 64), rng.integers(0, 50, 64))
    tokens = rng.integers(4, len(int8_bundle.vocab), 64)
    states = runner.read_states(slots).copy()
    batch = runner.step(slots, slots, tokens, want_topk=True)
    for row in (0, 17, 63):
        runner.write_states(np.array([row]), states[0, [row]])
        alone = runner.step(np.array([row]), np.array([row]), tokens[[row]], want_topk=True)
        assert alone.next_tokens[0] == batch.next_tokens[row]
        np.testing.assert_array_equal(alone.topk_logprobs[0], batch.topk_logprobs[row])


# --- tolerances fail the export and keep the old bundle -----------------------------------


def test_a_too_strict_tolerance_fails_the_export_and_keeps_the_old_bundle(
    tmp_path, tiny_checkpoint, tiny_corpus, tiny_bundle_dir
):
    out = Path(shutil.copytree(tiny_bundle_dir, tmp_path / "nrt"))
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    with pytest.raises(VerificationError) as info:
        export_bundle(
            tiny_checkpoint[0], out, precision="int8", samples=16, corpus=tiny_corpus,
            tolerance={"log_probs": 1e-6}, progress=False,
        )
    assert "log_probs" in str(info.value) and "> 1e-06" in str(info.value)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert load_bundle(out).precision == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nrt"], "no staging left behind"


def test_the_cli_export_fails_on_a_too_strict_tolerance(tmp_path, tiny_checkpoint, capsys):
    from gruserve.export.synthetic import SyntheticSpec, write_synthetic_corpus

    from .conftest import TINY_SPEC

    write_synthetic_corpus(tmp_path / "corpus", SyntheticSpec(**TINY_SPEC))
    args = ["export", str(tiny_checkpoint[1]), "--out", str(tmp_path / "b"), "--precision",
            "int8", "--samples", "16", "--data", str(tmp_path / "corpus")]
    assert cli.main([*args, "--max-log-prob-error", "1e-6"]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "token agreement" in printed and "task metrics on test" in printed
    assert load_bundle(tmp_path / "b").precision == "int8"


def test_int8_export_needs_the_corpus(tmp_path, tiny_checkpoint, capsys):
    args = ["export", str(tiny_checkpoint[1]), "--out", str(tmp_path / "b"), "--precision", "int8"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--data" in err and "int8" in err
    assert not (tmp_path / "b").exists()


def test_agreement_and_metric_gates():
    low = GreedyParity(num_pairs=10, num_identical=9, num_steps=100, num_steps_agreeing=98,
                       min_agreement=0.99, first_divergence={
                           "pair": 3, "user": "u1", "item": "i2", "position": 4,
                           "expected": 7, "got": 8, "margin": 0.01, "near_tie": True})
    assert not low.ok and low.agreement == 0.98
    low.min_agreement = 0.98
    assert low.ok
    reference = {"perplexity": 10.0, "bleu_1": 50.0, "bleu_4": 0.0, "fmr": 0.5, "rmse": 1.0}
    better = {"perplexity": 9.0, "bleu_1": 60.0, "bleu_4": 1.0, "fmr": 0.5, "rmse": 1.0}
    assert QualityReport.compare("test", 9, reference, better, 0.01).ok  # better never fails
    worse = {**reference, "perplexity": 10.2, "bleu_4": 0.0}
    report = QualityReport.compare("test", 9, reference, worse, 0.01)
    assert not report.ok and "perplexity" in report.first_failure
    assert QualityReport.compare("test", 9, reference, worse, 0.05).ok
    assert QualityReport.compare("test", 9, reference, worse, None).ok  # reported only


# --- the quality figures are the bundle's -------------------------------------------------


def test_bundle_metrics_of_an_fp32_bundle_equal_pytorchs(tiny_bundle, tiny_checkpoint, tiny_corpus):
    """The ORT scorer computes what the PyTorch one does (so int8's figures mean the same)."""
    checkpoint = tiny_checkpoint[0]
    reference = evaluate(checkpoint, tiny_corpus, batch_size=64)
    scorer = BundleScorer(tiny_bundle, max_batch=64, max_tokens=tiny_bundle.max_len)
    served = evaluate(checkpoint, tiny_corpus, batch_size=64, scorer=scorer)
    assert served.metrics["perplexity"] == pytest.approx(reference.metrics["perplexity"], 1e-5)
    assert served.metrics["rmse"] == pytest.approx(reference.metrics["rmse"], 1e-5)
    assert [p.generated for p in served.pairs] == [p.generated for p in reference.pairs]


def test_verify_reads_the_tolerances_the_bundle_was_exported_with(
    tmp_path, int8_bundle, tiny_checkpoint
):
    copy = Path(shutil.copytree(int8_bundle.path, tmp_path / "b"))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["tolerance"]["greedy_agreement"] = 1.0
    (copy / MANIFEST).write_text(json.dumps(manifest))
    report = verify_bundle(copy, tiny_checkpoint[0], samples=16, progress=False)
    assert report.greedy.min_agreement == 1.0
    assert report.ok == (report.greedy.agreement == 1.0)
    assert any("task metrics not measured" in note for note in report.notes)


# --- serving ---------------------------------------------------------------------------------


def test_an_int8_bundle_serves_what_its_verify_report_says(int8_bundle, tiny_checkpoint):
    """Served tokens equal the bundle's own graphs' decodes, and against PyTorch they agree
    exactly as often as the recorded report says, with the same first divergence."""
    greedy = int8_bundle.manifest["verify"]["greedy"]
    users, items = verify_pairs(len(int8_bundle.users), len(int8_bundle.items),
                                greedy["num_pairs"], greedy["seed"])
    runner = StepRunner(int8_bundle, num_slots=len(users), config=SessionConfig(device="cpu"))
    own = greedy_decodes(runner, np.arange(len(users)), users, items,
                         int8_bundle.special_ids["bos"], int8_bundle.special_ids["eos"],
                         int8_bundle.max_len)
    model = tiny_checkpoint[0].build_model()
    expected, _ = greedy_decode(model, torch.as_tensor(users), torch.as_tensor(items),
                                int8_bundle.special_ids["bos"], int8_bundle.special_ids["eos"],
                                int8_bundle.max_len)
    with running_server(int8_bundle.path) as server, GruserveClient(server.target) as client:
        assert client.model_info().precision == "int8"
        with ThreadPoolExecutor(16) as pool:  # concurrent: rows share steps in the engine
            served = list(pool.map(
                lambda k: list(client.generate(user=int8_bundle.users[users[k]],
                                               item=int8_bundle.items[items[k]]).token_ids),
                range(len(users)),
            ))
    assert served == own
    identical = [k for k in range(len(users)) if served[k] == expected[k]]
    assert len(identical) == greedy["num_identical"]
    first = greedy["first_divergence"]
    if first is not None:
        assert first["pair"] == min(set(range(len(users))) - set(identical))


def test_an_int8_bundle_refuses_raw_states_outside_its_range(int8_bundle):
    inside = np.tanh(np.linspace(-3, 3, int8_bundle.hidden_size)).tolist()
    outside = [*inside[:-1], 1.5]
    with running_server(int8_bundle.path) as server, GruserveClient(server.target) as client:
        assert len(client.generate(hidden_state=inside, max_tokens=4).token_ids) <= 4
        with pytest.raises(grpc.RpcError) as info:
            client.generate(hidden_state=outside, max_tokens=4)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden_state" in info.value.details() and "[-1, 1]" in info.value.details()
