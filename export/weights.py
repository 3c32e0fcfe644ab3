"""An NRT's weights as numpy arrays: what the ONNX graph builders take.

The builders need the numbers, not the module, so a bundle can be built with numpy and onnx
alone: from a trained model (`gruserve.export.model.nrt_weights`, where torch lives) or from
random numbers (`NRTWeights.synthetic`, for wiring tests that need a bundle but no training).
Shapes follow torch's conventions (a linear layer's weight is (out, in)); every array is
float32, read-only, and checked against the config on construction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .config import ModelConfig


def _frozen(array) -> np.ndarray:
    out = np.array(array, dtype=np.float32, order="C", copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class Linear:
    """y = x @ weight.T + bias; weight (out, in), bias (out,)."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _frozen(self.weight))
        object.__setattr__(self, "bias", _frozen(self.bias))

    def check(self, name: str, num_in: int, num_out: int) -> None:
        _check_shape(f"{name}.weight", self.weight, (num_out, num_in))
        _check_shape(f"{name}.bias", self.bias, (num_out,))


@dataclass(frozen=True)
class NRTWeights:
    config: ModelConfig
    # encoder: embeddings (U, E) and (I, E), the rating MLP, and the initial-state layer
    user_embeddings: np.ndarray
    item_embeddings: np.ndarray
    first_layer: Linear  # (2E -> H)
    layers: tuple[Linear, ...]  # mlp_layers x (H -> H)
    last_layer: Linear  # (H -> 1)
    hidden_encoder: Linear  # (2E + R -> H)
    # decoder: word embeddings (V, E), the GRU (gate order r, z, n, as torch.nn.GRU), output
    word_embeddings: np.ndarray
    gru_weight_ih: np.ndarray  # (3H, E)
    gru_weight_hh: np.ndarray  # (3H, H)
    gru_bias_ih: np.ndarray  # (3H,)
    gru_bias_hh: np.ndarray  # (3H,)
    output: Linear  # (H -> V)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif f.name != "config" and not isinstance(value, (Linear, tuple)):
                object.__setattr__(self, f.name, _frozen(value))
        self._check()

    def _check(self) -> None:
        c = self.config
        E, H, V, R = c.emsize, c.hidden_size, c.ntoken, c.num_rating_classes
        _check_shape("user_embeddings", self.user_embeddings, (c.num_users, E))
        _check_shape("item_embeddings", self.item_embeddings, (c.num_items, E))
        self.first_layer.check("first_layer", 2 * E, H)
        if len(self.layers) != c.mlp_layers:
            raise ValueError(
                f"NRTWeights.layers: {len(self.layers)} layers, config has {c.mlp_layers}"
            )
        for index, layer in enumerate(self.layers):
            layer.check(f"layers.{index}", H, H)
        self.last_layer.check("last_layer", H, 1)
        self.hidden_encoder.check("hidden_encoder", 2 * E + R, H)
        _check_shape("word_embeddings", self.word_embeddings, (V, E))
        _check_shape("gru_weight_ih", self.gru_weight_ih, (3 * H, E))
        _check_shape("gru_weight_hh", self.gru_weight_hh, (3 * H, H))
        _check_shape("gru_bias_ih", self.gru_bias_ih, (3 * H,))
        _check_shape("gru_bias_hh", self.gru_bias_hh, (3 * H,))
        self.output.check("output", H, V)

    def fallback_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The (user, item) embeddings an unknown user / item is conditioned on: the mean of
        the trained rows. An unknown entity is, for all the model knows, a random known one;
        the mean is the point closest to them on average (squared distance), and it lies
        where the rating MLP and the state encoder were trained, unlike a zero vector."""
        return self.user_embeddings.mean(axis=0), self.item_embeddings.mean(axis=0)

    @classmethod
    def synthetic(
        cls, config: ModelConfig, seed: int, *, eos_id: int | None = None, eos_bias: float = 0.0
    ) -> NRTWeights:
        """Random weights drawn from `numpy.random.default_rng(seed)`.

        Linear layers and the GRU use torch's default ranges (U(+-1/sqrt(fan_in))); the
        embeddings are N(0, 1) (nn.Embedding's default), the output projection U(-1, 1) and
        the rating layer U(-2, 2) centred on the middle of the rating range: larger than a
        fresh NRT's, so that the (user, item) pair visibly changes the rating and the decode.
        `eos_bias` is added to the output bias of token `eos_id`: it sets how soon greedy
        decodes stop (a model that always or never emits <eos> first tests little)."""
        rng = np.random.default_rng(seed)
        c = config
        E, H, V, R = c.emsize, c.hidden_size, c.ntoken, c.num_rating_classes

        def uniform(bound: float, *shape: int) -> np.ndarray:
            return rng.uniform(-bound, bound, shape)

        def linear(num_in: int, num_out: int) -> Linear:
            bound = 1.0 / np.sqrt(num_in)
            return Linear(uniform(bound, num_out, num_in), uniform(bound, num_out))

        user_embeddings = rng.standard_normal((c.num_users, E))
        item_embeddings = rng.standard_normal((c.num_items, E))
        first_layer = linear(2 * E, H)
        layers = tuple(linear(H, H) for _ in range(c.mlp_layers))
        # the sigmoid activations it reads sit around 0.5: the bias puts their mean rating mid-range
        rating_weight = uniform(2.0, 1, H)
        rating_bias = (c.min_rating + c.max_rating) / 2 - 0.5 * rating_weight.sum()
        last_layer = Linear(rating_weight, [rating_bias])
        hidden_encoder = linear(2 * E + R, H)
        word_embeddings = rng.standard_normal((V, E))
        gru_bound = 1.0 / np.sqrt(H)
        gru = [uniform(gru_bound, *shape) for shape in ((3 * H, E), (3 * H, H), (3 * H,), (3 * H,))]
        output_bias = np.zeros(V)
        if eos_id is not None:
            output_bias[eos_id] = eos_bias
        return cls(
            config=config,
            user_embeddings=user_embeddings,
            item_embeddings=item_embeddings,
            first_layer=first_layer,
            layers=layers,
            last_layer=last_layer,
            hidden_encoder=hidden_encoder,
            word_embeddings=word_embeddings,
            gru_weight_ih=gru[0],
            gru_weight_hh=gru[1],
            gru_bias_ih=gru[2],
            gru_bias_hh=gru[3],
            output=Linear(uniform(1.0, V, H), output_bias),
        )


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"NRTWeights.{name}: shape {array.shape}, expected {shape}")
