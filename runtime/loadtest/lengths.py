"""Per-request output lengths drawn from a stated distribution (`gruserve loadtest --lengths`).

Real traffic does not ask for one fixed length: a batch whose rows finish at different steps
is exactly what separates continuous batching from a batcher that runs every row to the
longest. The distributions, as `--lengths` spells them:

    fixed:L             every request L tokens
    uniform:LO:HI       each length equally likely in LO..HI (both included)
    geometric:P:CAP     L = 1, 2, ... with P(L = k) = (1 - P)^(k - 1) * P (the number of tries
                        to the first success), capped: every draw above CAP becomes CAP

Request i always gets the i-th draw of an RNG seeded from the load seed, so the same seed
gives every run, and every system compared, the same sequence of lengths.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

FLAG = "--lengths"
_SYNTAX = "fixed:L, uniform:LO:HI or geometric:P:CAP"


@dataclass(frozen=True)
class LengthDistribution:
    """One of fixed / uniform / geometric (see the module docstring); lengths are >= 1."""

    kind: str
    low: int  # fixed: the length; uniform: the smallest; geometric: 1
    high: int  # fixed: the length; uniform: the largest; geometric: the cap
    p: float = 0.0  # geometric: the success probability in (0, 1]

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "geometric"):
            raise ValueError(f"{FLAG}: unknown distribution {self.kind!r}; use {_SYNTAX}")
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"{FLAG} {self}: lengths must be >= 1 and LO <= HI")
        if self.kind == "geometric" and not 0.0 < self.p <= 1.0:
            raise ValueError(f"{FLAG} {self}: P must be in (0, 1]")

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        """'fixed:15', 'uniform:1:15', 'geometric:0.15:15'; ValueError names the flag."""
        kind, *fields = text.strip().lower().split(":")
        arity = {"fixed": 1, "uniform": 2, "geometric": 2}
        if kind not in arity or len(fields) != arity[kind]:
            raise ValueError(f"{FLAG} {text!r}: expected {_SYNTAX}")
        try:
            if kind == "fixed":
                return cls("fixed", int(fields[0]), int(fields[0]))
            if kind == "uniform":
                return cls("uniform", int(fields[0]), int(fields[1]))
            return cls("geometric", 1, int(fields[1]), float(fields[0]))
        except ValueError as exc:
            if str(exc).startswith(FLAG):
                raise
            raise ValueError(
                f"{FLAG} {text!r}: expected {_SYNTAX} (whole-number lengths)"
            ) from None

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.low}"
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"geometric:{self.p:g}:{self.high}"

    def draw(self, u: float) -> int:
        """The length for a uniform u in [0, 1) (inverse CDF, so one u gives one length)."""
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return self.low + min(int(u * (self.high - self.low + 1)), self.high - self.low)
        if self.p >= 1.0:
            return 1
        tries = 1 + int(math.floor(math.log1p(-u) / math.log1p(-self.p)))
        return min(tries, self.high)

    @property
    def mean(self) -> float:
        """The exact mean length (tokens per request when nothing stops early)."""
        if self.kind == "fixed":
            return float(self.low)
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        q = 1.0 - self.p  # E[min(G, cap)] = sum_{k=0}^{cap-1} q^k
        return float(self.high) if q == 1.0 else (1.0 - q**self.high) / self.p


class LengthSequence:
    """lengths[i]: request i's length, the i-th draw of an RNG seeded by `seed` (drawn on
    demand, kept, so any index gives the same answer in any order)."""

    def __init__(self, distribution: LengthDistribution, seed: int = 0) -> None:
        self.distribution = distribution
        # a string seed of its own: the lengths do not move when the pairs' RNG is reseeded
        self._rng = random.Random(f"gruserve-lengths-{seed}")
        self._drawn: list[int] = []

    def __getitem__(self, index: int) -> int:
        if index < 0:
            raise IndexError("request indexes start at 0")
        while len(self._drawn) <= index:
            self._drawn.append(self.distribution.draw(self._rng.random()))
        return self._drawn[index]
