"""NRTWeights: the numpy weights the graph builders take (numpy only; the torch side skips)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gruserve.export.config import ModelConfig
from gruserve.export.weights import Linear, NRTWeights

CONFIG = ModelConfig(num_users=5, num_items=4, ntoken=12, emsize=6, hidden_size=8, mlp_layers=2)


def test_synthetic_weights_repeat_per_seed_and_differ_across_seeds():
    a, b = NRTWeights.synthetic(CONFIG, seed=3), NRTWeights.synthetic(CONFIG, seed=3)
    c = NRTWeights.synthetic(CONFIG, seed=4)
    for f in dataclasses.fields(NRTWeights):
        if f.name in ("config", "layers"):
            continue
        x, y, z = (getattr(w, f.name) for w in (a, b, c))
        if isinstance(x, Linear):
            x, y, z = x.weight, y.weight, z.weight
        assert x.dtype == np.float32, f.name
        assert x.tobytes() == y.tobytes(), f.name
        assert x.tobytes() != z.tobytes(), f.name
    assert len(a.layers) == CONFIG.mlp_layers


def test_eos_bias_moves_only_that_output_bias():
    plain = NRTWeights.synthetic(CONFIG, seed=1)
    biased = NRTWeights.synthetic(CONFIG, seed=1, eos_id=1, eos_bias=2.5)
    delta = biased.output.bias - plain.output.bias
    assert delta[1] == pytest.approx(2.5)
    assert np.count_nonzero(delta) == 1
    assert biased.output.weight.tobytes() == plain.output.weight.tobytes()


def test_arrays_are_read_only_copies():
    source = np.zeros((CONFIG.num_users, CONFIG.emsize))
    weights = dataclasses.replace(NRTWeights.synthetic(CONFIG, seed=0), user_embeddings=source)
    source[0, 0] = 1.0
    assert weights.user_embeddings[0, 0] == 0.0
    with pytest.raises(ValueError):
        weights.user_embeddings[0, 0] = 2.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("word_embeddings", np.zeros((11, 6)), "word_embeddings: shape (11, 6), expected (12, 6)"),
        ("output", Linear(np.zeros((12, 8)), np.zeros(3)), "output.bias: shape (3,)"),
        ("layers", (), "layers: 0 layers, config has 2"),
        ("gru_weight_hh", np.zeros((24, 6)), "gru_weight_hh: shape (24, 6), expected (24, 8)"),
    ],
)
def test_a_wrong_shape_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(NRTWeights.synthetic(CONFIG, seed=0), **{field: value})


def test_nrt_weights_are_the_modules_parameters():
    torch = pytest.importorskip("torch", reason="the torch side needs the export extra")
    from gruserve.export.model import NRT, nrt_weights

    torch.manual_seed(0)
    model = NRT(CONFIG)
    weights = nrt_weights(model)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    pairs = {
        "encoder.user_embeddings.weight": weights.user_embeddings,
        "encoder.item_embeddings.weight": weights.item_embeddings,
        "encoder.first_layer.weight": weights.first_layer.weight,
        "encoder.layers.1.bias": weights.layers[1].bias,
        "encoder.last_layer.weight": weights.last_layer.weight,
        "encoder.hidden_encoder.bias": weights.hidden_encoder.bias,
        "decoder.word_embeddings.weight": weights.word_embeddings,
        "decoder.gru.weight_ih_l0": weights.gru_weight_ih,
        "decoder.gru.weight_hh_l0": weights.gru_weight_hh,
        "decoder.gru.bias_ih_l0": weights.gru_bias_ih,
        "decoder.gru.bias_hh_l0": weights.gru_bias_hh,
        "decoder.linear.weight": weights.output.weight,
        "decoder.linear.bias": weights.output.bias,
    }
    for name, array in pairs.items():
        assert array.tobytes() == state[name].tobytes(), name
