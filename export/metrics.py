"""Evaluation metrics of the NRT / PETER line of work, on token lists.

Numbers are only comparable with published ones if they are computed the same way, so each
metric follows the code PETER (Li et al., ACL'21, github.com/lileipisces/PETER, `utils.py`)
actually runs, quirks included, and says where it departs:

- BLEU-n: PETER's `bleu_score` calls the TensorFlow NMT `compute_bleu` (not nltk's
  `corpus_bleu`): corpus-level modified n-gram precisions for orders 1..n, combined by a
  geometric mean with uniform weights 1/n, times the brevity penalty
  `exp(1 - ref_len / hyp_len)` when the hypotheses are shorter; one reference per sentence;
  `smooth=True` is Lin & Och (2004) add-one on every order. Reported in percent. It differs
  from nltk only for hypotheses shorter than n (nltk counts at least one n-gram each).
- ROUGE: PETER's `rouge.py` (the tf-seq2seq port): per sentence pair, ROUGE-n precision and
  recall over the *sets* of distinct n-grams, F = 2PR / (P + R + 1e-8); ROUGE-L from the LCS
  with Lin's F-measure using beta = P/R; each averaged over sentences, in percent.
- USR, FMR, FCR, DIV: as in PETER's `utils.py`, as fractions (not percent). DIV is the mean,
  over unordered pairs of generated sentences, of the number of features they share; it is
  computed by counting (sum over features of C(k, 2), k = sentences that mention it) instead
  of PETER's O(n^2) pair loop: the same number.
- RMSE / MAE: optionally clip predictions into the rating range first, as PETER does.

Why hand-written instead of nltk / rouge-score: neither computes what PETER reports (nltk
differs in BLEU's short-sentence counting and has no ROUGE; rouge-score counts n-gram
multiplicities and uses the harmonic F for ROUGE-L), and each is a dependency for ~100 lines.

Empty inputs raise `ValueError`: a mean over nothing is a bug upstream, not a zero.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

Tokens = Sequence[str]


def rmse(
    pred: Sequence[float],
    true: Sequence[float],
    *,
    min_rating: float | None = None,
    max_rating: float | None = None,
) -> float:
    """Root mean squared error; predictions are clipped to [min_rating, max_rating] if given."""
    error = _rating_errors(pred, true, min_rating, max_rating)
    return float(np.sqrt(np.mean(error**2)))


def mae(
    pred: Sequence[float],
    true: Sequence[float],
    *,
    min_rating: float | None = None,
    max_rating: float | None = None,
) -> float:
    """Mean absolute error; predictions are clipped to [min_rating, max_rating] if given."""
    error = _rating_errors(pred, true, min_rating, max_rating)
    return float(np.mean(np.abs(error)))


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood per token), the NLL summed in nats over num_tokens."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return math.exp(total_nll / num_tokens)


def bleu_score(
    references: list[list[str]], hypotheses: list[list[str]], n: int = 4, smooth: bool = False
) -> float:
    """Corpus BLEU-n in percent, as PETER reports it (see the module docstring)."""
    _check_pairs(references, hypotheses)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    matches = [0] * n
    possible = [0] * n
    ref_length = hyp_length = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_length += len(ref)
        hyp_length += len(hyp)
        overlap = _ngram_counts(hyp, n) & _ngram_counts(ref, n)
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for order in range(1, n + 1):
            possible[order - 1] += max(len(hyp) - order + 1, 0)

    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible, strict=True)]
    else:
        precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible, strict=True)]
    if min(precisions) <= 0 or hyp_length == 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / n)
    brevity = 1.0 if hyp_length >= ref_length else math.exp(1.0 - ref_length / hyp_length)
    return 100.0 * geo_mean * brevity


def rouge_scores(references: list[list[str]], hypotheses: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L f, p, r in percent, averaged over sentence pairs (PETER's `rouge`).

    Keys: `rouge_1/f`, `rouge_1/p`, `rouge_1/r`, the same for `rouge_2` and `rouge_l`.
    """
    _check_pairs(references, hypotheses)
    per_pair = {
        "rouge_1": [_rouge_n(ref, hyp, 1) for ref, hyp in zip(references, hypotheses, strict=True)],
        "rouge_2": [_rouge_n(ref, hyp, 2) for ref, hyp in zip(references, hypotheses, strict=True)],
        "rouge_l": [_rouge_l(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True)],
    }
    scores: dict[str, float] = {}
    for name, triples in per_pair.items():
        for key, values in zip(("f", "p", "r"), zip(*triples, strict=True), strict=True):
            scores[f"{name}/{key}"] = 100.0 * sum(values) / len(values)
    return scores


def unique_sentence_ratio(hypotheses: Sequence[Tokens]) -> float:
    """USR: distinct generated sentences / generated sentences (exact token-sequence match)."""
    _check_nonempty(hypotheses, "hypotheses")
    return len({tuple(hyp) for hyp in hypotheses}) / len(hypotheses)


def feature_matching_ratio(hypotheses: Sequence[Tokens], features: Sequence[str]) -> float:
    """FMR: fraction of generated sentences containing their own ground-truth feature."""
    _check_pairs(features, hypotheses)
    matched = sum(feature in hyp for hyp, feature in zip(hypotheses, features, strict=True))
    return matched / len(hypotheses)


def feature_coverage_ratio(hypotheses: Sequence[Tokens], all_features: Iterable[str]) -> float:
    """FCR: distinct features mentioned anywhere in the generated text / distinct features."""
    _check_nonempty(hypotheses, "hypotheses")
    features = set(all_features)
    _check_nonempty(features, "all_features")
    mentioned = set().union(*(_features_in(hyp, features) for hyp in hypotheses))
    return len(mentioned) / len(features)


def feature_diversity(hypotheses: Sequence[Tokens], all_features: Iterable[str]) -> float:
    """DIV: mean over unordered sentence pairs of |features(a) & features(b)|. Lower is more
    diverse. A feature mentioned by k sentences is shared by C(k, 2) pairs, hence the count."""
    num = len(hypotheses)
    if num < 2:
        raise ValueError(f"feature_diversity needs at least 2 hypotheses, got {num}")
    features = set(all_features)
    mentions: Counter[str] = Counter()
    for hyp in hypotheses:
        mentions.update(_features_in(hyp, features))
    shared_pairs = sum(k * (k - 1) // 2 for k in mentions.values())
    return shared_pairs / (num * (num - 1) / 2)


def _rating_errors(
    pred: Sequence[float],
    true: Sequence[float],
    min_rating: float | None,
    max_rating: float | None,
) -> np.ndarray:
    predicted = np.asarray(pred, dtype=np.float64)
    actual = np.asarray(true, dtype=np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 1:
        raise ValueError(
            f"pred and true must be 1-D of one length: {predicted.shape} vs {actual.shape}"
        )
    _check_nonempty(predicted, "pred")
    if min_rating is not None or max_rating is not None:
        predicted = np.clip(predicted, min_rating, max_rating)
    return predicted - actual


def _ngram_counts(tokens: Tokens, max_order: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            counts[tuple(tokens[i : i + order])] += 1
    return counts


def _ngram_set(tokens: Tokens, order: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1)}


def _rouge_n(ref: Tokens, hyp: Tokens, order: int) -> tuple[float, float, float]:
    ref_ngrams = _ngram_set(ref, order)
    hyp_ngrams = _ngram_set(hyp, order)
    overlap = len(ref_ngrams & hyp_ngrams)
    precision = overlap / len(hyp_ngrams) if hyp_ngrams else 0.0
    recall = overlap / len(ref_ngrams) if ref_ngrams else 0.0
    f_score = 2.0 * precision * recall / (precision + recall + 1e-8)
    return f_score, precision, recall


def _rouge_l(ref: Tokens, hyp: Tokens) -> tuple[float, float, float]:
    if not ref or not hyp:
        return 0.0, 0.0, 0.0
    lcs = _lcs_length(ref, hyp)
    recall = lcs / len(ref)
    precision = lcs / len(hyp)
    # Lin (2004) with beta = P/R, as in PETER; not the harmonic mean unless P == R.
    beta = precision / (recall + 1e-12)
    numerator = (1 + beta**2) * recall * precision
    denominator = recall + beta**2 * precision
    return numerator / (denominator + 1e-12), precision, recall


def _lcs_length(a: Tokens, b: Tokens) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _features_in(tokens: Tokens, features: set[str]) -> set[str]:
    return features.intersection(tokens)


def _check_pairs(references: Sequence[object], hypotheses: Sequence[object]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(
            f"got {len(references)} references but {len(hypotheses)} hypotheses; they pair up"
        )
    _check_nonempty(hypotheses, "hypotheses")


def _check_nonempty(values: Sequence[object] | set[str] | np.ndarray, name: str) -> None:
    if len(values) == 0:
        raise ValueError(f"{name} is empty")
