"""StepRunner against PyTorch, on every device this machine has (CUDA skips visibly)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the export extra; the torch-free lane skips it")

import torch

from gruserve.runtime.bundle import BundleError
from gruserve.runtime.providers import CUDA, DeviceError, SessionConfig
from gruserve.runtime.runner import StepRunner


@functools.cache
def cuda_works(bundle_dir) -> bool:
    """True only if a CUDA session really runs (onnxruntime-gpu lists CUDA even without one)."""
    from gruserve.runtime.bundle import load_bundle

    try:
        bundle = load_bundle(bundle_dir)
        runner = StepRunner(bundle, num_slots=2, config=SessionConfig(device="cuda"))
    except (DeviceError, BundleError):
        return False
    return runner.provider == CUDA


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, tiny_bundle_dir):
    if request.param == "cuda" and not cuda_works(str(tiny_bundle_dir)):
        pytest.skip("no working CUDAExecutionProvider on this machine")
    return request.param


def _runner(bundle, device, num_slots=16):
    return StepRunner(bundle, num_slots=num_slots, config=SessionConfig(device=device))


def test_pool_lives_on_the_selected_device(tiny_bundle, device):
    runner = _runner(tiny_bundle, device)
    assert runner.pool.device_name() == ("cuda" if device == "cuda" else "cpu")
    assert runner.provider == (CUDA if device == "cuda" else "CPUExecutionProvider")


def test_encode_and_steps_match_pytorch(tiny_bundle, tiny_checkpoint, device):
    checkpoint, _ = tiny_checkpoint
    model = checkpoint.build_model()
    runner = _runner(tiny_bundle, device)
    users, items = np.array([0, 5, 9]), np.array([3, 1, 7])
    slots = np.array([11, 2, 6])
    ratings = runner.encode(slots, users, items)
    with torch.no_grad():
        ref_rating, hidden = model.encoder(torch.tensor(users), torch.tensor(items))
    np.testing.assert_allclose(ratings, ref_rating.numpy(), atol=1e-5)
    np.testing.assert_allclose(runner.read_states(slots)[0], hidden[0].numpy(), atol=1e-5)
    tokens = np.full(3, checkpoint.vocab.bos_id)
    for _ in range(5):
        out = runner.step(slots, slots, tokens, want_topk=True)
        with torch.no_grad():
            log_probs, hidden = model.decoder(torch.tensor(tokens)[:, None], hidden)
        ref_top = torch.topk(log_probs[:, 0], k=out.topk_ids.shape[1])
        np.testing.assert_array_equal(out.next_tokens, log_probs[:, 0].argmax(-1).numpy())
        np.testing.assert_allclose(out.topk_logprobs, ref_top.values.numpy(), atol=1e-4)
        np.testing.assert_allclose(runner.read_states(slots)[0], hidden[0].numpy(), atol=1e-5)
        tokens = out.next_tokens


def test_untouched_slots_stay_bit_exact(tiny_bundle, device):
    runner = _runner(tiny_bundle, device)
    everyone = np.arange(16)
    runner.encode(everyone, everyone % 7, everyone % 5)
    before = runner.read_states(everyone).copy()
    stepped = np.array([1, 4, 9])
    runner.step(stepped, stepped, np.array([4, 5, 6]))
    after = runner.read_states(everyone)
    others = np.setdiff1d(everyone, stepped)
    np.testing.assert_array_equal(after[:, others], before[:, others])
    assert not np.allclose(after[:, stepped], before[:, stepped])


def test_reading_one_slot_and_writing_another_moves_state_without_copies(tiny_bundle, device):
    """Beam reorder: rows may read a parent's slot (even the same one twice) and each writes
    its own slot; reads see the state from before the step."""
    runner = _runner(tiny_bundle, device)
    runner.encode(np.array([0, 1]), np.array([2, 3]), np.array([4, 5]))
    start = runner.read_states(np.array([0, 1])).copy()
    tokens = np.array([7, 7, 8])
    # rows: slot 0 -> slot 1, slot 0 -> slot 2, slot 1 -> slot 0 (a swap with a fork)
    runner.step(np.array([0, 0, 1]), np.array([1, 2, 0]), tokens)
    moved = runner.read_states(np.array([1, 2, 0])).copy()

    reference = _runner(tiny_bundle, device)
    reference.encode(np.array([0, 1]), np.array([2, 3]), np.array([4, 5]))
    np.testing.assert_array_equal(reference.read_states(np.array([0, 1])), start)
    # same computation without any aliasing: each row reads and writes its own slot
    reference.encode(np.array([5]), np.array([2]), np.array([4]))  # slot 5 = state of slot 0
    reference.step(np.array([0, 5, 1]), np.array([0, 5, 1]), tokens)
    expected = reference.read_states(np.array([0, 5, 1]))
    np.testing.assert_allclose(moved, expected, atol=1e-6)


def test_device_cuda_without_cuda_is_a_clear_startup_error(tiny_bundle, tiny_bundle_dir):
    if cuda_works(str(tiny_bundle_dir)):
        pytest.skip("this machine has CUDA: the error path cannot be exercised")
    with pytest.raises(DeviceError, match="cuda"):
        _runner(tiny_bundle, "cuda")


@pytest.mark.gpu
def test_cuda_graph_capture_gives_the_uncaptured_results(tiny_bundle, tiny_bundle_dir):
    if not cuda_works(str(tiny_bundle_dir)):
        pytest.skip("no working CUDAExecutionProvider on this machine")
    plain = _runner(tiny_bundle, "cuda")
    captured = StepRunner(
        tiny_bundle, num_slots=16, config=SessionConfig(device="cuda", cuda_graphs=True)
    )
    slots = np.array([3, 8, 12])
    for runner in (plain, captured):
        runner.encode(slots, np.array([1, 2, 3]), np.array([4, 5, 6]))
    tokens = np.array([4, 5, 6])
    for _ in range(4):  # the first runs of a graph id warm up, later ones replay the capture
        a = plain.step(slots, slots, tokens, want_topk=True)
        b = captured.step(slots, slots, tokens, want_topk=True)
        np.testing.assert_array_equal(a.next_tokens, b.next_tokens)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
        tokens = a.next_tokens
