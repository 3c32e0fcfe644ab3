"""The whole path: tiny model trained for real -> exported bundle -> gRPC server on a real
socket -> Generate returns exactly what PyTorch greedy decoding gives."""

from __future__ import annotations

import grpc
import pytest

pytest.importorskip("torch", reason="needs the export extra; the torch-free lane skips it")

import torch

from gruserve.export.model import greedy_decode
from gruserve.runtime.client import GruserveClient

from .serving import running_server


@pytest.fixture(scope="module")
def server(tiny_bundle_dir):
    with running_server(tiny_bundle_dir) as s:
        yield s


def test_generate_matches_pytorch_greedy(server, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    model = checkpoint.build_model()
    users = list(checkpoint.users.ids)[:12]
    items = list(checkpoint.items.ids)[:12]
    expected, ratings = greedy_decode(
        model,
        torch.tensor([checkpoint.users.index(u) for u in users]),
        torch.tensor([checkpoint.items.index(i) for i in items]),
        checkpoint.vocab.bos_id, checkpoint.vocab.eos_id, checkpoint.model_config.max_len,
    )
    with GruserveClient(server.target) as client:
        rows = zip(users, items, expected, ratings.tolist(), strict=True)
        for user, item, tokens, rating in rows:
            reply = client.generate(user=user, item=item)
            assert list(reply.token_ids) == tokens
            assert reply.text == " ".join(checkpoint.vocab.decode(tokens))
            assert reply.predicted_rating == pytest.approx(rating, abs=1e-4)


def test_unknown_user_is_not_found_and_server_keeps_serving(server, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    user, item = checkpoint.users.ids[0], checkpoint.items.ids[0]
    with GruserveClient(server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(user="no-such-user", item=item)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-user" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.generate(user=user, item="no-such-item")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.generate(user=user, item=item).finish_reason != 0
        assert client.health() == "SERVING"


def test_model_info_describes_the_bundle(server, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    with GruserveClient(server.target) as client:
        info = client.model_info()
    assert info.vocab_size == len(checkpoint.vocab)
    assert info.hidden_size == checkpoint.model_config.hidden_size
    assert info.num_users == len(checkpoint.users)
    assert info.eos_id == checkpoint.vocab.eos_id
    assert info.provider == "CPUExecutionProvider"
    assert info.default_max_tokens == checkpoint.model_config.max_len
