"""An int8 bundle is served like any other, with the runtime alone (no torch, no onnx): the
committed int8 export of the synthetic bundle. Its numbers mean nothing; its plumbing does.
(The quality an int8 export keeps is proven on a trained model in test_int8.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gruserve.runtime import cli
from gruserve.runtime.bundle import load_bundle
from gruserve.runtime.client import GruserveClient
from gruserve.runtime.providers import CPU, DeviceError, SessionConfig
from gruserve.runtime.runner import StepRunner

from .serving import running_server


@pytest.fixture(scope="module")
def int8_bundle(synthetic_int8_bundle_dir):
    return load_bundle(synthetic_int8_bundle_dir)


def _own_decodes(bundle, users, items) -> list[list[int]]:
    """The bundle's own graphs, all pairs in one batch, stopped at <eos>."""
    runner = StepRunner(bundle, num_slots=len(users), config=SessionConfig(device="cpu"))
    slots = np.arange(len(users))
    runner.encode(slots, users, items)
    eos = bundle.special_ids["eos"]
    tokens = np.full(len(users), bundle.special_ids["bos"])
    out, done = [[] for _ in slots], np.zeros(len(users), dtype=bool)
    for _ in range(bundle.max_len):
        tokens = runner.step(slots, slots, tokens).next_tokens
        for row in np.flatnonzero(~done & (tokens != eos)):
            out[row].append(int(tokens[row]))
        done |= tokens == eos
    return out


def test_int8_bundle_loads_with_a_float32_pool(int8_bundle):
    assert (int8_bundle.precision, int8_bundle.pool_dtype) == ("int8", "float32")
    assert int8_bundle.manifest["quantization"]["provider"] == CPU


def test_served_int8_tokens_are_its_own_graphs_in_any_batch(int8_bundle):
    """Concurrent requests share steps in varying batches; each one's tokens are what the
    bundle's graphs give it in one batch of all pairs (int8 rows are batch-invariant)."""
    users, items = np.meshgrid(np.arange(len(int8_bundle.users)), np.arange(len(int8_bundle.items)))
    users, items = users.ravel(), items.ravel()
    own = _own_decodes(int8_bundle, users, items)
    with running_server(int8_bundle.path) as server, GruserveClient(server.target) as client:
        info = client.model_info()
        assert info.precision == "int8"
        with ThreadPoolExecutor(12) as pool:
            served = list(pool.map(
                lambda k: list(client.generate(user=int8_bundle.users[users[k]],
                                               item=int8_bundle.items[items[k]]).token_ids),
                range(len(users)),
            ))
        sampled = client.generate(user=int8_bundle.users[0], item=int8_bundle.items[0],
                                  strategy="sample", temperature=1.0, seed=3, max_tokens=6)
    assert served == own
    assert 1 <= len(sampled.token_ids) <= 6


def test_int8_runs_on_the_cpu_provider_and_refuses_cuda(int8_bundle, capsys):
    runner = StepRunner(int8_bundle, num_slots=4, config=SessionConfig(device="auto"))
    assert runner.provider == CPU
    with pytest.raises(DeviceError, match="int8, a CPU-only format"):
        StepRunner(int8_bundle, num_slots=4, config=SessionConfig(device="cuda"))
    capsys.readouterr()
    assert cli.main(["serve", str(int8_bundle.path), "--device", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("gruserve serve: error: --device cuda: this bundle is int8")
