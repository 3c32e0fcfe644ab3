"""The verification report: per-check figures, greedy parity, the verdict; JSON-ready."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch


@dataclass
class CheckResult:
    name: str
    ok: bool = True
    # the worst figure seen (max abs difference, or a count for exact checks)
    value: float | None = None
    tolerance: float | None = None
    # where it first failed, or what was checked
    detail: str = ""


@dataclass
class GreedyParity:
    num_pairs: int = 0
    num_identical: int = 0
    # divergences where PyTorch's own top-2 margin is within the precision's tie margin
    num_near_ties: int = 0
    num_failed: int = 0
    max_tokens: int = 0
    tie_margin: float = 0.0
    # the first divergence that fails (else the first near-tie): {"pair", "user", "item",
    # "position", "expected", "got", "margin", "near_tie"}; user and item are external ids
    first_divergence: dict | None = None

    @property
    def ok(self) -> bool:
        return self.num_failed == 0 and self.num_pairs > 0


@dataclass
class VerifyReport:
    bundle: str
    precision: str
    device: str
    provider: str = ""
    with_checkpoint: bool = False
    tolerance: dict = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    greedy: GreedyParity | None = None
    onnxruntime_version: str = ort.__version__
    torch_version: str | None = None
    # caveats a reader must see, e.g. fp16 verified on the CPU provider
    notes: list[str] = field(default_factory=list)
    created_at: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        greedy_ok = self.greedy is None or self.greedy.ok
        return bool(self.checks) and all(c.ok for c in self.checks) and greedy_ok

    @property
    def first_failure(self) -> str | None:
        for c in self.checks:
            if not c.ok:
                return f"{c.name}: {c.detail}"
        if self.greedy is not None and not self.greedy.ok:
            d = self.greedy.first_divergence
            if d is None:
                return "greedy: no pair decoded"
            return (
                f"greedy: pair {d['pair']} (user {d['user']}, item {d['item']}) diverges at "
                f"position {d['position']}: expected token {d['expected']}, got {d['got']} "
                f"(PyTorch margin {d['margin']:.3g} > {self.greedy.tie_margin:.3g})"
            )
        return None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["first_failure"] = self.first_failure
        if self.greedy is not None:
            data["greedy"]["ok"] = self.greedy.ok
        return data

    def summary(self) -> str:
        """A table for the CLI: one line per check, then greedy parity and the verdict."""
        lines = [f"verify {self.bundle} ({self.precision}, {self.provider or self.device})"]
        for c in self.checks:
            figure = "" if c.value is None else f"{c.value:.3g} (tol {c.tolerance:.3g})"
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<34} {figure:<24} {c.detail}")
        if self.greedy is not None:
            g = self.greedy
            lines.append(
                f"  {'ok  ' if g.ok else 'FAIL'} greedy parity: {g.num_identical}/{g.num_pairs} "
                f"identical, {g.num_near_ties} near-ties, {g.num_failed} divergences"
            )
        lines += [f"  note: {n}" for n in self.notes]
        verdict = "PASS" if self.ok else f"FAIL: {self.first_failure}"
        lines.append(f"{verdict} ({self.seconds:.1f} s)")
        return "\n".join(lines)


class VerificationError(Exception):
    """A bundle failed verification; `report` holds every figure."""

    def __init__(self, message: str, report: VerifyReport) -> None:
        super().__init__(message)
        self.report = report


class Fatal(Exception):
    """Stops a phase: what follows would compare the wrong things."""


class Checks:
    """Keeps one result per check name: the worst value, and where it first failed."""

    def __init__(self) -> None:
        self.results: dict[str, CheckResult] = {}

    def _get(self, name: str, tolerance: float | None) -> CheckResult:
        if name not in self.results:
            self.results[name] = CheckResult(name, tolerance=tolerance)
        return self.results[name]

    def value(self, name: str, value: float, tolerance: float, where: str) -> None:
        r = self._get(name, tolerance)
        r.tolerance = tolerance if r.tolerance is None else r.tolerance
        if r.value is None or not value <= r.value:  # NaN sticks as the worst value
            r.value = float(value)
        if not value <= tolerance and r.ok:
            r.ok, r.detail = False, f"{where}: {value:.3g} > {tolerance:.3g}"

    def passed(self, name: str, detail: str = "") -> None:
        r = self._get(name, None)
        if r.ok and detail:
            r.detail = detail

    def fail(self, name: str, detail: str) -> None:
        r = self._get(name, None)
        if r.ok:
            r.ok, r.detail = False, detail

    def shape(self, name: str, got: tuple, want: tuple, where: str) -> None:
        if tuple(got) != tuple(want):
            self.fail(name, f"{where}: shape {tuple(got)}, expected {tuple(want)}")
            raise Fatal(name)
        self.passed(name)

    def diff(self, name: str, got, want, tolerance: float, where: str) -> None:
        """Max abs difference; a shape mismatch is fatal."""
        got = np.asarray(got)
        want = want.detach().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
        if got.shape != want.shape:
            self.fail(name, f"{where}: shape {got.shape}, expected {want.shape}")
            raise Fatal(name)
        if got.size == 0:
            self.value(name, 0.0, tolerance, where)
            return
        delta = np.abs(got.astype(np.float64) - want.astype(np.float64))
        self.value(name, float(np.max(delta)), tolerance, where)
