"""The benchmarks' model: an untrained NRT at the reference sizes (vocab 20004, emb 300,
hidden 400, 15 words), written as a checkpoint and a bundle.

An untrained model may emit <eos> at any step, which would make a request shorter on one
side of a comparison than on the other. So the decoder's output bias of <eos> is set to -1e4
before export: no system ever picks <eos> (greedy or sampled: it is never among the top-K
candidates), and every request generates exactly its max_tokens, on the cheap greedy graph
where it decodes greedily. Needs the export extra (torch, onnx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REFERENCE = dict(ntoken=20004, emsize=300, hidden_size=400, max_len=15)
TOP_K = 64  # candidates the sampling graph returns


@dataclass(frozen=True)
class ReferenceModel:
    model: object  # the torch NRT, in eval mode
    checkpoint: Path
    bundle: Path


def build_reference_model(
    out_dir: Path, num_users: int = 2000, num_items: int = 2000, seed: int = 0
) -> ReferenceModel:
    import torch

    from gruserve.export.bundle_writer import write_bundle
    from gruserve.export.checkpoint import Checkpoint, save_checkpoint
    from gruserve.export.config import ModelConfig
    from gruserve.export.model import NRT
    from gruserve.export.vocab import SPECIAL_TOKENS, EntityIndex, Vocabulary

    torch.manual_seed(seed)
    config = ModelConfig(num_users=num_users, num_items=num_items, **REFERENCE)
    vocab = Vocabulary(SPECIAL_TOKENS + tuple(f"w{i}" for i in range(config.ntoken - 4)))
    model = NRT(config).eval()
    with torch.no_grad():
        model.decoder.linear.bias[vocab.eos_id] = -1e4  # see the module docstring
    checkpoint = Checkpoint(
        model_config=config,
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        vocab=vocab,
        users=EntityIndex(tuple(f"u{i}" for i in range(num_users))),
        items=EntityIndex(tuple(f"i{i}" for i in range(num_items))),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, out_dir / "nrt.pt")
    bundle = write_bundle(checkpoint, out_dir / "bundle", top_k=TOP_K)
    return ReferenceModel(model, out_dir / "nrt.pt", bundle)
