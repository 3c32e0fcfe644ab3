"""Model and training configuration: every dimension lives here, nothing is a constant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of an NRT model. Stored in checkpoints and bundles, so loading needs no flags."""

    num_users: int
    num_items: int
    ntoken: int
    emsize: int = 300
    hidden_size: int = 400
    # hidden layers of the rating MLP (NRT's default is 4)
    mlp_layers: int = 4
    min_rating: float = 1.0
    max_rating: float = 5.0
    # words per tip: sequences are [bos] + words[:max_len] + [eos], padded to max_len + 2
    max_len: int = 15
    # the seed's decoder is a single-layer GRU; the state pool still carries the layer axis
    num_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "ntoken", "emsize", "hidden_size", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_layers != 1:
            raise ValueError(
                "ModelConfig.num_layers: only the seed's single-layer GRU is supported"
            )
        if self.max_rating < self.min_rating:
            raise ValueError("ModelConfig: max_rating must be >= min_rating")

    @property
    def num_rating_classes(self) -> int:
        """Width of the rating one-hot fed to the hidden-state encoder."""
        return int(self.max_rating - self.min_rating + 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**data)
