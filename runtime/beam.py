"""Beam search over the step graph's TopK candidates, for one request at a time.

Beams occupy slots. A beam that continues from another beam's state reads that beam's slot
and writes its own (the step graph takes read and write slots apart), so reordering beams
never copies a hidden state on the host.

Semantics follow Hugging Face's beam search with ``early_stopping=True``:

* each step, the candidates of all live beams are ranked by their summed log-prob;
* a terminal candidate (<eos> or a stop id) ranked among the best ``num_beams`` ends a
  hypothesis (the terminal token is not part of its tokens; its log-prob is part of its
  score); terminal candidates ranked lower are dropped;
* the best ``num_beams`` non-terminal candidates are the next live beams;
* the search ends when ``num_beams`` hypotheses have ended, or at ``max_tokens``, where the
  live beams end too (finish reason LENGTH). Only the best ``num_beams`` hypotheses are kept.

A hypothesis scores ``sum(logprob) / length ** length_penalty`` where ``length`` counts the
scored tokens (the terminal one included). With one beam this is exactly greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .requests import FinishReason
from .sampler import ending_tokens, suppress_token


@dataclass
class Hypothesis:
    score: float  # length-normalized
    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass
class BeamGroup:
    """Live beams of one request: row j of `tokens` is beam j, which writes `slots[j]`."""

    slots: np.ndarray  # (num_beams,) the request's slots
    num_beams: int
    length_penalty: float
    eos_id: int
    stop_ids: np.ndarray  # (n,) int64
    min_tokens: int
    max_tokens: int
    num_live: int = 1  # 1 until the first step expands the single initial state
    scores: np.ndarray = field(default_factory=lambda: np.zeros(1))  # (num_live,) float64
    tokens: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.float32))
    finished: list[Hypothesis] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def live_slots(self) -> np.ndarray:
        return self.slots[: self.num_live]

    def _normalized(self, score: float, length: int) -> float:
        return score / max(length, 1) ** self.length_penalty

    def _add_finished(self, hypothesis: Hypothesis) -> None:
        """Keeps the best num_beams hypotheses; on equal scores the earlier one stays."""
        self.finished.append(hypothesis)
        if len(self.finished) > self.num_beams:
            worst = min(range(len(self.finished)), key=lambda i: (self.finished[i].score, -i))
            del self.finished[worst]

    def advance(
        self, topk_logprobs: np.ndarray, topk_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Takes this step's candidates of the live beams, (num_live, K) each, in beam order.

        Returns (read_slots, next_tokens) for the next step's live beams (beam j reads
        read_slots[j] and writes slots[j]), or None when the search is over; `best()` then
        holds the answer.
        """
        num_live, k = topk_ids.shape
        if num_live != self.num_live:
            raise ValueError(f"expected candidates of {self.num_live} beams, got {num_live}")
        length = self.num_generated
        logprobs = topk_logprobs.astype(np.float64)
        terminal = ending_tokens(topk_ids, self.eos_id, self.stop_ids)
        if length < self.min_tokens:
            logprobs = suppress_token(
                logprobs, topk_ids, self.eos_id, np.ones(num_live, bool), self.stop_ids
            )
        flat = (self.scores[:, None] + logprobs).ravel()  # (num_live * K,)
        order = np.argsort(-flat, kind="stable")  # ties: lower beam, then lower column
        terminal_flat = terminal.ravel()
        chosen: list[int] = []
        for rank, index in enumerate(order.tolist()):
            score = float(flat[index])
            if score == -np.inf or score != score:  # -inf (suppressed) or NaN: never chosen
                break
            if terminal_flat[index]:
                if rank < self.num_beams:
                    parent = index // k
                    token = int(topk_ids.flat[index])
                    self._add_finished(
                        Hypothesis(
                            self._normalized(score, length + 1),
                            self.tokens[parent].tolist(),
                            self.logprobs[parent].tolist(),
                            FinishReason.EOS if token == self.eos_id else FinishReason.STOP_TOKEN,
                        )
                    )
                continue
            chosen.append(index)
            if len(chosen) == self.num_beams:
                break
        if len(self.finished) >= self.num_beams:
            return None
        if not chosen:  # every candidate was suppressed or terminal: end with what exists
            if not self.finished:
                self._finish_live(length)
            return None
        chosen_idx = np.asarray(chosen)
        parents = chosen_idx // k
        next_tokens = topk_ids.ravel()[chosen_idx].astype(np.int64)
        read_slots = self.live_slots[parents]
        self.tokens = np.concatenate([self.tokens[parents], next_tokens[:, None]], axis=1)
        self.logprobs = np.concatenate(
            [self.logprobs[parents], topk_logprobs.ravel()[chosen_idx].astype(np.float32)[:, None]],
            axis=1,
        )
        self.scores = flat[chosen_idx]
        self.num_live = len(chosen)
        if self.num_generated >= self.max_tokens:
            self._finish_live(self.num_generated)
            return None
        return read_slots, next_tokens

    def _finish_live(self, length: int) -> None:
        for j in range(self.num_live):
            self._add_finished(
                Hypothesis(
                    self._normalized(float(self.scores[j]), length),
                    self.tokens[j].tolist(),
                    self.logprobs[j].tolist(),
                    FinishReason.LENGTH,
                )
            )

    def best(self) -> Hypothesis:
        """The best ended hypothesis; on equal scores the one that ended first."""
        best = self.finished[0]
        for hypothesis in self.finished[1:]:
            if hypothesis.score > best.score:
                best = hypothesis
        return best
