"""Beam search over the step graph's TopK candidates, for one request at a time.

Beams occupy slots. A beam that continues from another beam's state reads that beam's slot
and writes its own (the step graph takes read and write slots apart), so reordering beams
never copies a hidden state. Semantics follow the common "early stopping" beam search: a
hypothesis ends at <eos> or a stop token (that token not included, its log-prob counted);
the search ends when num_beams hypotheses have ended, or at max_tokens, when the live beams
are ended too. Scores are sum(logprob) / length ** length_penalty. With one beam this is
exactly greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .requests import FinishReason


@dataclass
class Hypothesis:
    score: float
    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass
class BeamGroup:
    """Live beams of one request: rows are beams, in the order of `slots`."""

    slots: np.ndarray  # (num_beams,) the request's slots; beam j writes slots[j]
    num_beams: int
    length_penalty: float
    eos_id: int
    stop_ids: np.ndarray  # (n,) int64
    min_tokens: int
    max_tokens: int
    num_live: int = 1  # 1 until the first step expands the single initial state
    scores: np.ndarray = field(default_factory=lambda: np.zeros(1))  # (num_live,)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.float32))
    finished: list[Hypothesis] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return int(self.tokens.shape[1])

    def _normalized(self, score: float, length: int) -> float:
        return score / max(length, 1) ** self.length_penalty

    def advance(self, topk_logprobs: np.ndarray, topk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Takes this step's candidates of the live beams (num_live, K).

        Returns (read_slots, next_tokens) for the next step's live beams, or None when the
        search is over (then `best()` holds the answer).
        """
        logprobs = topk_logprobs.astype(np.float64)
        terminal = (topk_ids == self.eos_id) | np.isin(topk_ids, self.stop_ids)
        if self.num_generated < self.min_tokens:
            logprobs = np.where(terminal, -np.inf, logprobs)
        total = self.scores[:, None] + logprobs  # (num_live, K)
        flat = total.ravel()
        # the best 2 * num_beams candidates always hold num_beams non-terminal ones, since a
        # beam has at most one <eos> and few stop ids among its K candidates
        count = min(flat.size, 2 * self.num_beams + len(self.stop_ids))
        order = np.argsort(-flat, kind="stable")[:count]
        length = self.num_generated
        parents, next_tokens, next_scores, next_lps = [], [], [], []
        for index in order:
            score = flat[index]
            if not np.isfinite(score):
                break
            parent, column = divmod(int(index), topk_ids.shape[1])
            token = int(topk_ids[parent, column])
            lp = float(topk_logprobs[parent, column])
            if terminal[parent, column]:
                if len(self.finished) < self.num_beams:
                    reason = FinishReason.EOS if token == self.eos_id else FinishReason.STOP_TOKEN
                    self.finished.append(
                        Hypothesis(
                            self._normalized(float(score), length),
                            self.tokens[parent].tolist(),
                            self.logprobs[parent].tolist(),
                            reason,
                        )
                    )
                continue
            parents.append(parent)
            next_tokens.append(token)
            next_scores.append(score)
            next_lps.append(lp)
            if len(parents) == self.num_beams:
                break
        if len(self.finished) >= self.num_beams or not parents:
            return None
        parent_idx = np.asarray(parents)
        self.tokens = np.concatenate([self.tokens[parent_idx], np.asarray(next_tokens)[:, None]], 1)
        self.logprobs = np.concatenate(
            [self.logprobs[parent_idx], np.asarray(next_lps, np.float32)[:, None]], 1
        )
        self.scores = np.asarray(next_scores)
        read_slots = self.slots[:self.num_live][parent_idx]
        self.num_live = len(parents)
        if self.num_generated >= self.max_tokens:
            for j in range(self.num_live):
                self.finished.append(
                    Hypothesis(
                        self._normalized(float(self.scores[j]), self.num_generated),
                        self.tokens[j].tolist(),
                        self.logprobs[j].tolist(),
                        FinishReason.LENGTH,
                    )
                )
            return None
        return read_slots, np.asarray(next_tokens, np.int64)

    def best(self) -> Hypothesis:
        # max() keeps the first of equal scores: the earlier-finished hypothesis wins ties
        return max(self.finished, key=lambda h: h.score)
