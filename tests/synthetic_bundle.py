"""The synthetic bundle: a tiny NRT with random weights, for the tests that check wiring.

Built from `NRTWeights.synthetic` with numpy and onnx only (no torch, no training), and
committed under tests/data/ so that the torch-free lane, which has no onnx either, can serve
it; `synthetic-bundle-int8` beside it is the same weights exported at int8.
test_synthetic_bundle.py rebuilds both and fails if a committed copy differs by one byte.

Regenerate after changing anything here or in the graph builders:

    make synthetic-bundle        # = .venv/bin/python -m tests.synthetic_bundle

What it is not: a model whose numbers mean anything. Tests that compare against PyTorch,
check export, or need text that makes sense use the trained tiny model (`tiny_bundle_dir`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gruserve.export.config import ModelConfig
from gruserve.export.vocab import SPECIAL_TOKENS, EntityIndex, Vocabulary
from gruserve.export.weights import NRTWeights

BUNDLE_DIR = Path(__file__).parent / "data" / "synthetic-bundle"
INT8_BUNDLE_DIR = BUNDLE_DIR.with_name("synthetic-bundle-int8")
# SEED and EOS_BIAS were picked (by a search over both) so that greedy decodes of the
# 12 x 10 (user, item) pairs end after 1 to 15 words, every length present, 15 pairs at the
# 15-word limit and none empty: an <eos> that came always first or never would test little.
# test_synthetic_bundle.py checks this still holds.
SEED = 167
WORDS = (
    "the", "a", "and", "very", "not", "bit", "food", "room", "staff", "service", "price",
    "location", "bed", "breakfast", "view", "was", "is", "great", "good", "clean", "friendly",
    "slow", "quiet", "noisy", "small", "comfortable", "tasty", "helpful",
)
USERS = tuple(f"u{n:02d}" for n in range(12))
ITEMS = tuple(f"i{n:02d}" for n in range(10))
CONFIG = ModelConfig(
    num_users=len(USERS), num_items=len(ITEMS), ntoken=len(SPECIAL_TOKENS) + len(WORDS),
    emsize=8, hidden_size=32, mlp_layers=1, max_len=15,
)
# added to <eos>'s output bias
EOS_BIAS = 0.6
TOP_K = 16
# a fixed creation time: the generator's output must not depend on when it ran
CREATED_AT = "2000-01-01T00:00:00+00:00"


def synthetic_weights() -> NRTWeights:
    vocab = Vocabulary((*SPECIAL_TOKENS, *WORDS))
    return NRTWeights.synthetic(CONFIG, SEED, eos_id=vocab.eos_id, eos_bias=EOS_BIAS)


def build_synthetic_bundle(out_dir: Path = BUNDLE_DIR, precision: str = "fp32") -> Path:
    # imported here: the torch-free lane imports this module for BUNDLE_DIR and has no onnx
    from gruserve.export.bundle_writer import write_bundle_from_weights

    return write_bundle_from_weights(
        synthetic_weights(), Vocabulary((*SPECIAL_TOKENS, *WORDS)), EntityIndex(USERS),
        EntityIndex(ITEMS), out_dir, top_k=TOP_K, model_name="synthetic",
        training={"synthetic_seed": SEED, "eos_bias": EOS_BIAS}, created_at=CREATED_AT,
        precision=precision,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path,
                        help=f"bundle directory (default: {BUNDLE_DIR} and {INT8_BUNDLE_DIR})")
    parser.add_argument("--precision", default="fp32", help="with OUT: fp32 or int8")
    args = parser.parse_args(argv)
    if args.out:
        print(build_synthetic_bundle(args.out, args.precision))
        return 0
    print(build_synthetic_bundle(BUNDLE_DIR))
    print(build_synthetic_bundle(INT8_BUNDLE_DIR, "int8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
