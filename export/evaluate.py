"""Evaluate a checkpoint on a corpus split with the metrics of the NRT / PETER papers.

- perplexity: teacher forcing on the seed's sequence format (`[bos] + words[:max_len] +
  [eos]`), pad positions ignored, words outside the checkpoint's vocabulary as `<unk>`;
  the NLL is summed over every target token of the split and divided once (not a mean of
  batch means);
- RMSE / MAE: the encoder's rating, clipped into the checkpoint's rating range, as PETER does;
- BLEU-1/4, ROUGE-1/2/L, USR, FMR, FCR, DIV (`export.metrics`, PETER's definitions) on greedy
  decodes of at most `max_tokens` words. As in PETER, the reference of each review is its tip
  as the model sees it: tokenized, cut to `max_len` words, out-of-vocabulary words as `<unk>`.
  FMR uses each review's own feature; FCR and DIV use the feature set of the whole corpus.

What scores a batch is a `Scorer`: by default PyTorch (`TorchScorer`, the checkpoint's own
model); `gruserve.export.bundle_eval.BundleScorer` scores with a bundle's ONNX graphs instead,
so the metrics of an exported (e.g. int8) bundle are computed the same way as fp32's.

Reviews whose user or item the checkpoint does not know (a real dataset's test split can
hold them; a checkpoint evaluated on another corpus certainly does) have no embedding, so
they are counted, reported and skipped, with a warning, instead of failing the run.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .checkpoint import Checkpoint
from .corpus import Corpus
from .model import NRT, greedy_decode
from .train import encode_split, known_reviews, resolve_device
from .vocab import Vocabulary

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PAIRS_FILE = "pairs.tsv"
PAIRS_HEADER = ("user", "item", "rating", "predicted_rating", "reference", "generated")


class UnknownEntitiesWarning(UserWarning):
    """Some reviews of the evaluated split have a user or item the checkpoint lacks."""


@dataclass(frozen=True)
class EvalPair:
    """One evaluated review: the truth, the prediction, and the feature FMR looks for."""

    user: str
    item: str
    rating: float
    predicted_rating: float
    feature: str
    reference: str
    generated: str


@dataclass
class EvalReport:
    """Metrics of one evaluation plus every (reference, generated) pair.

    `metrics` keys: perplexity, rmse, mae, bleu_1, bleu_4 (percent), rouge_1/f, rouge_1/p,
    rouge_1/r, rouge_2/..., rouge_l/... (percent), usr, fmr, fcr, div (fractions; div is None
    below two examples), unique_sentences (count), rating_std (std of the true ratings: the
    RMSE of always predicting their mean, the reference point for rmse).
    """

    split: str
    num_reviews: int  # in the split
    num_evaluated: int
    num_skipped: int  # user or item unknown to the checkpoint
    unknown_users: list[str]
    unknown_items: list[str]
    max_tokens: int
    metrics: dict[str, float | None]
    pairs: list[EvalPair] = field(repr=False)
    seconds: float = 0.0
    checkpoint_epoch: int = 0

    def to_dict(self, *, include_pairs: bool = False) -> dict[str, Any]:
        """JSON-ready. The pairs are left out unless asked for (they go to the TSV file)."""
        out: dict[str, Any] = {
            "split": self.split,
            "num_reviews": self.num_reviews,
            "num_evaluated": self.num_evaluated,
            "num_skipped": self.num_skipped,
            "unknown_users": list(self.unknown_users),
            "unknown_items": list(self.unknown_items),
            "max_tokens": self.max_tokens,
            "checkpoint_epoch": self.checkpoint_epoch,
            "seconds": self.seconds,
            "metrics": dict(self.metrics),
        }
        if include_pairs:
            out["pairs"] = [asdict(pair) for pair in self.pairs]
        return out


@dataclass
class BatchScores:
    """What a scorer returns for one batch of encoded reviews."""

    nll_sum: float  # -log p of every target token (pads excluded), summed
    ratings: list[float]  # predicted, unclipped
    generated: list[list[int]]  # greedy decodes: ids without bos and without the final eos


class Scorer(Protocol):
    def __call__(self, users: torch.Tensor, items: torch.Tensor, seqs: torch.Tensor) -> BatchScores:
        """users, items (B,); seqs (B, max_len + 2) in the seed's sequence format."""


class TorchScorer:
    """Scores with the checkpoint's PyTorch model (the fp32 reference)."""

    def __init__(self, model: NRT, vocab: Vocabulary, max_tokens: int, device: torch.device):
        self.model, self.vocab, self.max_tokens, self.device = model, vocab, max_tokens, device

    @torch.no_grad()
    def __call__(self, users: torch.Tensor, items: torch.Tensor, seqs: torch.Tensor) -> BatchScores:
        vocab = self.vocab
        user, item, seq = (t.to(self.device) for t in (users, items, seqs))
        rating, log_probs = self.model(user, item, seq[:, :-1])
        target = seq[:, 1:]
        nll = F.nll_loss(
            log_probs.reshape(-1, log_probs.size(-1)),
            target.reshape(-1),
            ignore_index=vocab.pad_id,
            reduction="sum",
        ).item()
        generated = _greedy(self.model, user, item, vocab.bos_id, vocab.eos_id, self.max_tokens)
        return BatchScores(nll, rating.cpu().tolist(), generated)


def evaluate(
    checkpoint: Checkpoint,
    corpus: Corpus,
    *,
    split: str = "test",
    batch_size: int = 256,
    max_tokens: int | None = None,
    device: str = "cpu",
    scorer: Scorer | None = None,
) -> EvalReport:
    """Evaluate `checkpoint` on `corpus.split(split)`; max_tokens defaults to its max_len.
    `scorer` (default: the checkpoint's PyTorch model on `device`) computes the figures."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    config = checkpoint.model_config
    max_tokens = config.max_len if max_tokens is None else max_tokens
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    started = time.monotonic()
    reviews = corpus.split(split)
    known, unknown = known_reviews(reviews, checkpoint.users, checkpoint.items)
    unknown_users = sorted({r.user for r in unknown if r.user not in checkpoint.users})
    unknown_items = sorted({r.item for r in unknown if r.item not in checkpoint.items})
    if unknown:
        message = (
            f"{split}: skipping {len(unknown)} of {len(reviews)} reviews whose user or item the "
            f"checkpoint does not know ({len(unknown_users)} unknown users, "
            f"{len(unknown_items)} unknown items)"
        )
        log.warning(message)
        warnings.warn(message, UnknownEntitiesWarning, stacklevel=2)
    if not known:
        raise ValueError(
            f"{split}: none of its {len(reviews)} reviews has a user and item the checkpoint "
            f"knows; is this the corpus the model was trained on?"
        )

    vocab = checkpoint.vocab
    if scorer is None:
        torch_device = resolve_device(device)
        model = checkpoint.build_model().to(torch_device)
        scorer = TorchScorer(model, vocab, max_tokens, torch_device)
    data = encode_split(known, vocab, checkpoint.users, checkpoint.items, config.max_len)

    total_nll = 0.0
    num_tokens = 0
    predicted: list[float] = []
    generated_ids: list[list[int]] = []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        scores = scorer(data.users[rows], data.items[rows], data.seqs[rows])
        total_nll += scores.nll_sum
        num_tokens += int((data.seqs[rows, 1:] != vocab.pad_id).sum())
        predicted.extend(scores.ratings)
        generated_ids.extend(scores.generated)

    references = [_reference_tokens(row.tolist(), vocab) for row in data.seqs]
    hypotheses = [vocab.decode(ids) for ids in generated_ids]
    truth = [r.rating for r in known]
    feature_set = {r.feature for r in corpus.reviews}
    rouge = metrics.rouge_scores(references, hypotheses)
    clip = {"min_rating": config.min_rating, "max_rating": config.max_rating}
    values: dict[str, float | None] = {
        "perplexity": metrics.perplexity(total_nll, num_tokens),
        "rmse": metrics.rmse(predicted, truth, **clip),
        "mae": metrics.mae(predicted, truth, **clip),
        "rating_std": float(np.std(truth)),
        "bleu_1": metrics.bleu_score(references, hypotheses, n=1),
        "bleu_4": metrics.bleu_score(references, hypotheses, n=4),
        **rouge,
        "usr": metrics.unique_sentence_ratio(hypotheses),
        "unique_sentences": len({tuple(h) for h in hypotheses}),
        "fmr": metrics.feature_matching_ratio(hypotheses, [r.feature for r in known]),
        "fcr": metrics.feature_coverage_ratio(hypotheses, feature_set),
        "div": metrics.feature_diversity(hypotheses, feature_set) if len(known) >= 2 else None,
    }
    pairs = [
        EvalPair(
            user=review.user,
            item=review.item,
            rating=review.rating,
            predicted_rating=float(pred),
            feature=review.feature,
            reference=" ".join(ref),
            generated=" ".join(hyp),
        )
        for review, pred, ref, hyp in zip(known, predicted, references, hypotheses, strict=True)
    ]
    return EvalReport(
        split=split,
        num_reviews=len(reviews),
        num_evaluated=len(known),
        num_skipped=len(unknown),
        unknown_users=unknown_users,
        unknown_items=unknown_items,
        max_tokens=max_tokens,
        metrics=values,
        pairs=pairs,
        seconds=time.monotonic() - started,
        checkpoint_epoch=checkpoint.epoch,
    )


def write_eval_outputs(report: EvalReport, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write `metrics.json` (report.to_dict()) and `pairs.tsv` under out_dir; returns both.

    The TSV has a header row (user, item, rating, predicted_rating, reference, generated);
    tabs and newlines inside a field are replaced by spaces, so every line is one review.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n")
    pairs_path = out / PAIRS_FILE
    lines = ["\t".join(PAIRS_HEADER)]
    for pair in report.pairs:
        fields = (
            pair.user,
            pair.item,
            _number(pair.rating),
            f"{pair.predicted_rating:.4f}",
            pair.reference,
            pair.generated,
        )
        lines.append("\t".join(_tsv_field(value) for value in fields))
    pairs_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return metrics_path, pairs_path


def format_metrics(report: EvalReport) -> str:
    """A short human summary, one metric group per line (for the CLI)."""
    m = report.metrics
    div = "n/a" if m["div"] is None else f"{m['div']:.3f}"
    lines = [
        f"{report.split}: {report.num_evaluated} reviews evaluated"
        + (f", {report.num_skipped} skipped (unknown user/item)" if report.num_skipped else ""),
        f"perplexity {m['perplexity']:.3f}",
        f"rating  RMSE {m['rmse']:.4f}  MAE {m['mae']:.4f}  (rating std {m['rating_std']:.4f})",
        f"BLEU-1 {m['bleu_1']:.2f}  BLEU-4 {m['bleu_4']:.2f}",
        f"ROUGE-1 F {m['rouge_1/f']:.2f}  ROUGE-2 F {m['rouge_2/f']:.2f}  "
        f"ROUGE-L F {m['rouge_l/f']:.2f}",
        f"USR {m['usr']:.3f}  FMR {m['fmr']:.3f}  FCR {m['fcr']:.3f}  DIV {div}",
    ]
    return "\n".join(lines)


def _greedy(
    model: NRT, user: torch.Tensor, item: torch.Tensor, bos: int, eos: int, max_tokens: int
) -> list[list[int]]:
    """Batched greedy decodes. On CPU this is `model.greedy_decode`, the project's reference;
    that function builds its start tokens on the CPU, so on another device the same loop runs
    in `_greedy_on_device` (equal output; tests compare the two on CPU)."""
    if user.device.type == "cpu":
        ids, _ = greedy_decode(model, user, item, bos, eos, max_tokens)
        return ids
    return _greedy_on_device(model, user, item, bos, eos, max_tokens)


@torch.no_grad()
def _greedy_on_device(
    model: NRT, user: torch.Tensor, item: torch.Tensor, bos: int, eos: int, max_tokens: int
) -> list[list[int]]:
    model.eval()
    _, hidden = model.encoder(user, item)
    token = torch.full((user.size(0), 1), bos, dtype=torch.int64, device=user.device)
    finished = torch.zeros(user.size(0), dtype=torch.bool, device=user.device)
    steps = []
    for _ in range(max_tokens):
        log_probs, hidden = model.decoder(token, hidden)
        token = log_probs[:, -1].argmax(dim=-1, keepdim=True)
        steps.append(token.squeeze(1))
        finished |= token.squeeze(1) == eos
        if bool(finished.all()):
            break
    outputs = []
    for row in torch.stack(steps, dim=1).cpu().tolist():
        outputs.append(row[: row.index(eos)] if eos in row else row)
    return outputs


def _reference_tokens(seq: list[int], vocab: Vocabulary) -> list[str]:
    """The words of an encoded [bos] + words + [eos] + pads row, up to its eos."""
    words = seq[1:]
    if vocab.eos_id in words:
        words = words[: words.index(vocab.eos_id)]
    return vocab.decode(words)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _tsv_field(value: str) -> str:
    return " ".join(str(value).split()) if any(c in value for c in "\t\n\r") else value
