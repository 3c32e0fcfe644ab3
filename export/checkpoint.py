"""Self-describing checkpoints: weights + model config + vocabulary + entity maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .model import NRT, nrt_weights
from .vocab import EntityIndex, Vocabulary
from .weights import NRTWeights

CHECKPOINT_FORMAT = "gruserve-checkpoint/1"


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    vocab: Vocabulary
    users: EntityIndex
    items: EntityIndex
    epoch: int = 0
    best_valid_loss: float = float("inf")
    train_config: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None

    def build_model(self) -> NRT:
        model = NRT(self.model_config)
        model.load_state_dict(self.state_dict)
        model.eval()
        return model

    def weights(self) -> NRTWeights:
        """The weights as numpy arrays, for the ONNX graph builders."""
        return nrt_weights(self.build_model())


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": checkpoint.model_config.to_dict(),
        "state_dict": checkpoint.state_dict,
        "vocab": list(checkpoint.vocab.words),
        "users": list(checkpoint.users.ids),
        "items": list(checkpoint.items.ids),
        "epoch": checkpoint.epoch,
        "best_valid_loss": checkpoint.best_valid_loss,
        "train_config": checkpoint.train_config,
        "optimizer_state": checkpoint.optimizer_state,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # weights_only: a checkpoint is data, never code
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return Checkpoint(
        model_config=ModelConfig.from_dict(payload["model_config"]),
        state_dict=payload["state_dict"],
        vocab=Vocabulary(payload["vocab"]),
        users=EntityIndex(payload["users"]),
        items=EntityIndex(payload["items"]),
        epoch=int(payload["epoch"]),
        best_valid_loss=float(payload["best_valid_loss"]),
        train_config=dict(payload.get("train_config") or {}),
        optimizer_state=payload.get("optimizer_state"),
    )
