"""Evaluation of a real tiny checkpoint: metric values, batching, outputs, unknown entities."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the export extra; the torch-free lane skips it")

import torch

from gruserve.export import metrics
from gruserve.export.corpus import Corpus, tokenize
from gruserve.export.evaluate import (
    PAIRS_HEADER,
    UnknownEntitiesWarning,
    evaluate,
    format_metrics,
    write_eval_outputs,
)
from gruserve.export.model import greedy_decode
from gruserve.export.train import encode_split, run_epoch


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tiny_corpus):
    checkpoint, _ = tiny_checkpoint
    return evaluate(checkpoint, tiny_corpus)


def test_metrics_are_sane_and_match_independent_computations(report, tiny_checkpoint, tiny_corpus):
    checkpoint, _ = tiny_checkpoint
    test = tiny_corpus.split("test")
    m = report.metrics
    assert report.split == "test"
    assert report.num_reviews == report.num_evaluated == len(test) == len(report.pairs)
    assert report.num_skipped == 0 and report.unknown_users == report.unknown_items == []
    assert report.max_tokens == checkpoint.model_config.max_len
    assert report.checkpoint_epoch == checkpoint.epoch

    # perplexity: the training loop's token-weighted NLL on the same split, pad ignored
    model = checkpoint.build_model()
    data = encode_split(
        test, checkpoint.vocab, checkpoint.users, checkpoint.items, checkpoint.model_config.max_len
    )
    nll, mse = run_epoch(model, data, checkpoint.vocab.pad_id, 1.0, 100, None)
    assert m["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert 1.0 < m["perplexity"] < len(checkpoint.vocab)

    # ratings: the encoder's, and a trained model beats predicting the mean
    ratings = [r.rating for r in test]
    assert m["rmse"] == pytest.approx(math.sqrt(mse), rel=1e-4)  # none outside [1, 5] here
    assert m["mae"] == pytest.approx(
        metrics.mae([p.predicted_rating for p in report.pairs], ratings, min_rating=1, max_rating=5)
    )
    assert m["rating_std"] == pytest.approx(float(np.std(ratings)))
    assert m["rmse"] < m["rating_std"]

    # text: greedy decodes of the same model, pair by pair, and the metrics on them
    users = torch.tensor([checkpoint.users.index(r.user) for r in test])
    items = torch.tensor([checkpoint.items.index(r.item) for r in test])
    vocab, max_len = checkpoint.vocab, checkpoint.model_config.max_len
    ids, _ = greedy_decode(model, users, items, vocab.bos_id, vocab.eos_id, max_len)
    hyps = [checkpoint.vocab.decode(row) for row in ids]
    assert [p.generated.split() for p in report.pairs] == hyps
    refs = [p.reference.split() for p in report.pairs]
    assert refs == [tokenize(r.text)[:15] for r in test]  # the synthetic words are all known
    assert m["bleu_1"] == metrics.bleu_score(refs, hyps, n=1)
    assert m["bleu_4"] == metrics.bleu_score(refs, hyps, n=4)
    assert m["rouge_l/f"] == metrics.rouge_scores(refs, hyps)["rouge_l/f"]
    features = {r.feature for r in tiny_corpus.reviews}
    assert m["fmr"] == metrics.feature_matching_ratio(hyps, [r.feature for r in test])
    assert m["fcr"] == metrics.feature_coverage_ratio(hyps, features)
    assert m["div"] == metrics.feature_diversity(hyps, features)
    assert m["usr"] == metrics.unique_sentence_ratio(hyps)
    for key in ("bleu_1", "bleu_4", "rouge_1/f", "rouge_2/f", "rouge_l/f"):
        assert 0.0 < m[key] <= 100.0, key
    for key in ("usr", "fmr", "fcr"):
        assert 0.0 < m[key] <= 1.0, key
    assert m["bleu_1"] > 20.0  # a trained model, not noise
    assert "perplexity" in format_metrics(report)


def test_batch_size_and_max_tokens(report, tiny_checkpoint, tiny_corpus):
    checkpoint, _ = tiny_checkpoint
    small_batches = evaluate(checkpoint, tiny_corpus, batch_size=7)
    assert small_batches.metrics["perplexity"] == pytest.approx(report.metrics["perplexity"])
    assert [p.generated for p in small_batches.pairs] == [p.generated for p in report.pairs]
    short = evaluate(checkpoint, tiny_corpus, max_tokens=2)
    assert short.max_tokens == 2
    assert all(len(p.generated.split()) <= 2 for p in short.pairs)
    assert [p.generated.split() for p in short.pairs] == [
        p.generated.split()[:2] for p in report.pairs
    ]


def test_ratings_are_clipped_to_the_rating_range(tiny_checkpoint, tiny_corpus):
    checkpoint, _ = tiny_checkpoint
    state = dict(checkpoint.state_dict)
    state["encoder.last_layer.bias"] = state["encoder.last_layer.bias"] + 100.0
    high = evaluate(dataclasses.replace(checkpoint, state_dict=state), tiny_corpus)
    assert all(p.predicted_rating > 50 for p in high.pairs)  # the raw prediction is kept
    ratings = [r.rating for r in tiny_corpus.split("test")]
    assert high.metrics["rmse"] == pytest.approx(
        math.sqrt(sum((5.0 - r) ** 2 for r in ratings) / len(ratings))
    )
    assert high.metrics["mae"] == pytest.approx(sum(5.0 - r for r in ratings) / len(ratings))


def test_write_eval_outputs(report, tmp_path):
    metrics_path, pairs_path = write_eval_outputs(report, tmp_path / "eval")
    assert metrics_path == tmp_path / "eval" / "metrics.json"
    saved = json.loads(metrics_path.read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["metrics"]["perplexity"] == report.metrics["perplexity"]
    assert "pairs" not in saved and len(report.to_dict(include_pairs=True)["pairs"]) == len(
        report.pairs
    )
    lines = pairs_path.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == PAIRS_HEADER
    assert len(lines) == 1 + len(report.pairs)
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 6 for row in rows)
    first = report.pairs[0]
    assert rows[0][:3] == [first.user, first.item, f"{first.rating:g}"]
    assert float(rows[0][3]) == pytest.approx(first.predicted_rating, abs=1e-4)
    assert rows[0][4:] == [first.reference, first.generated]


def _with_strangers(corpus: Corpus) -> Corpus:
    """The corpus plus three test reviews by an unknown user or about an unknown item."""
    template = corpus.split("test")[0]
    strangers = (
        dataclasses.replace(template, user="ghost"),
        dataclasses.replace(template, item="nowhere"),
        dataclasses.replace(template, user="ghost", item="void\titem"),
    )
    start = len(corpus.reviews)
    return dataclasses.replace(
        corpus,
        reviews=corpus.reviews + strangers,
        test=corpus.test + tuple(range(start, start + len(strangers))),
    )


def test_unknown_users_and_items_are_counted_and_skipped(report, tiny_checkpoint, tiny_corpus):
    checkpoint, _ = tiny_checkpoint
    with pytest.warns(UnknownEntitiesWarning, match="skipping 3 of"):
        mixed = evaluate(checkpoint, _with_strangers(tiny_corpus))
    assert mixed.num_reviews == report.num_reviews + 3
    assert mixed.num_evaluated == report.num_evaluated
    assert mixed.num_skipped == 3
    assert mixed.unknown_users == ["ghost"]
    assert mixed.unknown_items == ["nowhere", "void\titem"]
    assert mixed.metrics == report.metrics
    assert mixed.to_dict()["num_skipped"] == 3


def test_no_known_review_is_an_error(tiny_checkpoint, tiny_corpus):
    checkpoint, _ = tiny_checkpoint
    only_strangers = _with_strangers(tiny_corpus)
    only_strangers = dataclasses.replace(only_strangers, test=only_strangers.test[-3:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownEntitiesWarning)
        with pytest.raises(ValueError, match="none of its 3 reviews"):
            evaluate(checkpoint, only_strangers)


def test_bad_arguments(tiny_checkpoint, tiny_corpus):
    checkpoint, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="split"):
        evaluate(checkpoint, tiny_corpus, split="dev")
    with pytest.raises(ValueError, match="max_tokens"):
        evaluate(checkpoint, tiny_corpus, max_tokens=0)


def test_device_greedy_loop_matches_the_reference(tiny_checkpoint, tiny_corpus):
    """evaluate decodes off-CPU with its own loop; on CPU it must equal greedy_decode."""
    from gruserve.export.evaluate import _greedy_on_device

    checkpoint, _ = tiny_checkpoint
    model = checkpoint.build_model()
    vocab = checkpoint.vocab
    test = tiny_corpus.split("test")
    users = torch.tensor([checkpoint.users.index(r.user) for r in test])
    items = torch.tensor([checkpoint.items.index(r.item) for r in test])
    for max_tokens in (1, 3, 15):
        expected, _ = greedy_decode(model, users, items, vocab.bos_id, vocab.eos_id, max_tokens)
        got = _greedy_on_device(model, users, items, vocab.bos_id, vocab.eos_id, max_tokens)
        assert got == expected
