"""The workloads of bench/serve.py: request i of a workload is the same for every system.

A workload is a length distribution and a share of sampled requests. Request i's (user,
item), length (its max_tokens: with the reference model's <eos> bias every system generates
exactly that many tokens), and whether it samples are the i-th draws of RNGs seeded by the
workload seed, so every system, in every mode, gets the same sequence of requests in the
same order. Sampled requests carry their own seed (the request index), so the systems that
share gruserve's counter-based sampler (gruserve, the raw loop, the Triton peers) even pick
the same tokens.

    fixed15-greedy      L = 15 for all: the control (no length variance to exploit)
    uniform-greedy      L uniform in 1..15 (mean 8)
    geometric-greedy    L geometric, p = 0.15, capped at 15 (mean 6.08; many short, a few long)
    *-mixed             the same lengths, half of the requests sampled
                        (temperature 0.8, top_k 40, top_p 0.95), half greedy

Importable without gruserve's gRPC client (the Triton environment cannot load it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gruserve.runtime.loadtest import LengthDistribution, LengthSequence

SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95)


@dataclass(frozen=True)
class Workload:
    name: str
    lengths: LengthDistribution
    sample_share: float  # of the requests, sampled with SAMPLING; the rest greedy

    def describe(self) -> str:
        mix = (
            "greedy" if not self.sample_share
            else f"{self.sample_share:.0%} sampled (temperature {SAMPLING['temperature']}, "
            f"top_k {SAMPLING['top_k']}, top_p {SAMPLING['top_p']}), the rest greedy"
        )
        return f"lengths {self.lengths} (mean {self.lengths.mean:.2f}), {mix}"


def _workloads() -> dict[str, Workload]:
    out = {}
    for short, spec in (("fixed15", "fixed:15"), ("uniform", "uniform:1:15"),
                        ("geometric", "geometric:0.15:15")):
        for mix, share in (("greedy", 0.0), ("mixed", 0.5)):
            name = f"{short}-{mix}"
            out[name] = Workload(name, LengthDistribution.parse(spec), share)
    return out


WORKLOADS = _workloads()


@dataclass(frozen=True)
class RequestSpec:
    """One request, as plain values every client can send."""

    index: int
    user: str
    item: str
    max_tokens: int
    sample: bool
    seed: int  # the sampling seed (the index): same request, same text

    def decoding(self) -> dict:
        """gruserve's build_request keyword arguments for the decoding."""
        if not self.sample:
            return dict(strategy="greedy", max_tokens=self.max_tokens)
        return dict(strategy="sample", max_tokens=self.max_tokens, seed=self.seed, **SAMPLING)

    @property
    def temperature(self) -> float:
        return SAMPLING["temperature"] if self.sample else 0.0


class RequestSequence:
    """spec(i): request i of a workload over the given entities (drawn on demand, kept)."""

    def __init__(self, workload: Workload, users, items, seed: int = 0) -> None:
        self.workload = workload
        self.users, self.items = list(users), list(items)
        self._lengths = LengthSequence(workload.lengths, seed)
        # string seeds: independent streams, none moves when another is reseeded
        self._pairs = random.Random(f"bench-pairs-{seed}")
        self._mix = random.Random(f"bench-mix-{seed}")
        self._drawn: list[RequestSpec] = []

    def spec(self, index: int) -> RequestSpec:
        while len(self._drawn) <= index:
            i = len(self._drawn)
            # every stream advances once per request, whatever the workload, so two workloads
            # that differ only in their mix ask for the same pairs and lengths
            user = self.users[int(self._pairs.random() * len(self.users))]
            item = self.items[int(self._pairs.random() * len(self.items))]
            sample = self._mix.random() < self.workload.sample_share
            self._drawn.append(RequestSpec(i, user, item, self._lengths[i], sample, i))
        return self._drawn[index]
