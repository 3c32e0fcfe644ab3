"""The committed synthetic bundle: exactly what its generator builds, and fit for wiring tests."""

from __future__ import annotations

import numpy as np
import pytest

from gruserve.runtime.bundle import MANIFEST, sha256_file
from gruserve.runtime.runner import StepRunner

from .synthetic_bundle import BUNDLE_DIR, CONFIG, INT8_BUNDLE_DIR


@pytest.mark.parametrize(("committed_dir", "precision"),
                         [(BUNDLE_DIR, "fp32"), (INT8_BUNDLE_DIR, "int8")])
def test_the_committed_bundle_is_what_the_generator_builds(tmp_path, committed_dir, precision):
    pytest.importorskip("onnx", reason="building a bundle needs onnx (the export extra)")
    from .synthetic_bundle import build_synthetic_bundle

    rebuilt = build_synthetic_bundle(tmp_path / "rebuilt", precision)
    committed = {p.name: sha256_file(p) for p in committed_dir.iterdir()}
    fresh = {p.name: sha256_file(p) for p in rebuilt.iterdir()}
    assert MANIFEST in committed
    assert fresh == committed, (
        f"{committed_dir} is stale: run `make synthetic-bundle` and commit it"
    )


def test_greedy_decodes_end_at_varied_lengths(synthetic_bundle):
    """All 120 pairs at once through the runner: <eos> neither always first nor never."""
    users, items = np.meshgrid(np.arange(CONFIG.num_users), np.arange(CONFIG.num_items))
    users, items = users.ravel(), items.ravel()
    runner = StepRunner(synthetic_bundle, num_slots=len(users))
    slots = np.arange(len(users))
    ratings = runner.encode(slots, users, items)
    eos, max_len = synthetic_bundle.special_ids["eos"], synthetic_bundle.max_len
    tokens = np.full(len(users), synthetic_bundle.special_ids["bos"])
    lengths = np.full(len(users), max_len)
    for step in range(max_len):
        tokens = runner.step(slots, slots, tokens).next_tokens
        lengths[(tokens == eos) & (lengths == max_len)] = step
    assert lengths.min() >= 1, "some pair's decode is empty"
    assert len(set(lengths.tolist())) >= 10
    assert 0 < np.count_nonzero(lengths == max_len) < len(users) // 4
    # and the pair changes the rating, not only the text
    assert len(set(np.clip(ratings, 1, 5).astype(int).tolist())) >= 2
