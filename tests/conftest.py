"""Shared fixtures: the two bundles the suite runs on (tests/README.md says which for what).

- `synthetic_bundle_dir` / `synthetic_bundle`: random weights, committed under tests/data/
  (tests/synthetic_bundle.py builds it). Needs neither torch nor onnx: for wiring.
- `tiny_bundle_dir` / `tiny_bundle` / `tiny_checkpoint`: a tiny NRT trained for real on the
  synthetic corpus, once per run (a few seconds). Needs torch and onnx (the export extra;
  skipped, visibly, without them): for numerics, parity with PyTorch, export and training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY_SPEC = dict(seed=7, num_users=60, num_items=50, num_reviews=2400)
TINY_TRAIN = dict(
    emsize=16, hidden_size=32, mlp_layers=2, max_len=15, batch_size=64, lr=1e-2,
    max_epochs=4, patience=2, seed=0, num_threads=1,
)


@pytest.fixture(scope="session")
def synthetic_bundle_dir(tmp_path_factory) -> Path:
    """A copy of the committed synthetic bundle (a copy, so no test can alter the original)."""
    from .synthetic_bundle import BUNDLE_DIR

    return Path(shutil.copytree(BUNDLE_DIR, tmp_path_factory.mktemp("bundles") / "synthetic"))


@pytest.fixture(scope="session")
def synthetic_int8_bundle_dir(tmp_path_factory) -> Path:
    """A copy of the committed int8 export of the same random weights (CPU-only format)."""
    from .synthetic_bundle import INT8_BUNDLE_DIR

    return Path(shutil.copytree(INT8_BUNDLE_DIR, tmp_path_factory.mktemp("bundles") / "int8"))


@pytest.fixture(scope="session")
def synthetic_bundle(synthetic_bundle_dir):
    from gruserve.runtime.bundle import load_bundle

    return load_bundle(synthetic_bundle_dir)


@pytest.fixture(scope="session")
def tiny_corpus():
    from gruserve.export.synthetic import SyntheticSpec, make_synthetic_corpus

    return make_synthetic_corpus(SyntheticSpec(**TINY_SPEC))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_corpus):
    """(Checkpoint, path of best.pt) of a tiny NRT trained on the synthetic corpus."""
    pytest.importorskip("torch", reason="the trained tiny model needs the export extra")
    from gruserve.export.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_train")
    checkpoint, _ = train(tiny_corpus, TrainConfig(**TINY_TRAIN), out)
    return checkpoint, out / "best.pt"


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    """An exported fp32 bundle of the tiny model (greedy, sampling K=16, state writer)."""
    pytest.importorskip("onnx", reason="exporting the tiny model needs the export extra")
    from gruserve.export.bundle_writer import write_bundle

    checkpoint, _ = tiny_checkpoint
    return write_bundle(checkpoint, tmp_path_factory.mktemp("bundles") / "tiny", top_k=16)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir):
    from gruserve.runtime.bundle import load_bundle

    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="session")
def entities(synthetic_bundle_dir):
    """(users, items): the synthetic bundle's external ids."""
    data = json.loads((synthetic_bundle_dir / "entities.json").read_text())
    return data["users"], data["items"]


@pytest.fixture(scope="module")
def client(server):
    """A gruserve.v1 client of the module's own `server` fixture (a ServerThread)."""
    from gruserve.runtime.client import GruserveClient

    with GruserveClient(server.target, timeout=30) as c:
        yield c
