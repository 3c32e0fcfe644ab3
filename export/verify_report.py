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
    # token agreement, teacher forced: the steps of PyTorch's greedy decodes (their <eos>
    # included) at which the served graph, fed PyTorch's tokens, picks PyTorch's next token
    num_steps: int = 0
    num_steps_agreeing: int = 0
    # the least agreement that passes (the precision's; 0 = not gated)
    min_agreement: float = 0.0
    # the pairs decoded are parity.verify_pairs(num_users, num_items, num_pairs, seed)
    seed: int = 0

    @property
    def agreement(self) -> float:
        return self.num_steps_agreeing / self.num_steps if self.num_steps else 0.0

    @property
    def ok(self) -> bool:
        return self.num_failed == 0 and self.num_pairs > 0 and self.agreement >= self.min_agreement


# the task metrics an export is judged by, and whether lower is better
GATED_METRICS: dict[str, bool] = {
    "perplexity": True, "bleu_1": False, "bleu_4": False, "fmr": False, "rmse": True,
}


@dataclass
class MetricComparison:
    name: str
    reference: float  # PyTorch fp32 (the checkpoint)
    bundle: float  # the bundle's graphs
    # relative change, positive = worse (None: the reference is 0 and the bundle is not)
    change: float | None
    ok: bool


@dataclass
class QualityReport:
    """Task metrics of the bundle beside PyTorch fp32's on one split of the corpus."""

    split: str
    num_reviews: int
    # the most a metric may worsen, relative (None: reported, not gated)
    max_change: float | None
    metrics: list[MetricComparison] = field(default_factory=list)
    # every metric of both evaluations (evaluate's keys), for the record
    reference_metrics: dict = field(default_factory=dict)
    bundle_metrics: dict = field(default_factory=dict)

    @classmethod
    def compare(cls, split: str, num_reviews: int, reference: dict, bundle: dict,
                max_change: float | None) -> QualityReport:
        report = cls(split, num_reviews, max_change, reference_metrics=dict(reference),
                     bundle_metrics=dict(bundle))
        for name, lower_is_better in GATED_METRICS.items():
            a, b = float(reference[name]), float(bundle[name])
            worse = b - a if lower_is_better else a - b
            change = worse / abs(a) if a != 0 else (0.0 if worse == 0 else None)
            ok = max_change is None or worse <= max_change * abs(a)
            report.metrics.append(MetricComparison(name, a, b, change, ok))
        return report

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.metrics)

    @property
    def first_failure(self) -> str | None:
        for m in self.metrics:
            if not m.ok:
                change = "n/a" if m.change is None else f"{100 * m.change:.2f}%"
                return (f"quality: {self.split} {m.name} {m.bundle:.4g} vs fp32 {m.reference:.4g} "
                        f"({change} worse > {100 * self.max_change:.2f}%)")
        return None


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
    # task metrics beside fp32's (verify given a corpus; required by an int8 export)
    quality: QualityReport | None = None
    onnxruntime_version: str = ort.__version__
    torch_version: str | None = None
    # caveats a reader must see, e.g. fp16 verified on the CPU provider
    notes: list[str] = field(default_factory=list)
    created_at: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        greedy_ok = self.greedy is None or self.greedy.ok
        quality_ok = self.quality is None or self.quality.ok
        return bool(self.checks) and all(c.ok for c in self.checks) and greedy_ok and quality_ok

    @property
    def max_log_prob_error(self) -> float | None:
        """The largest log-prob difference from PyTorch over every step compared: the whole
        vocabulary's (the verification graph) and the served top-K's."""
        return self._max_value((".log_probs", ".logprobs"))

    @property
    def max_served_log_prob_error(self) -> float | None:
        """The same for the served sampling graph's top-K log-probs alone."""
        return self._max_value((".logprobs",))

    def _max_value(self, suffixes: tuple[str, ...]) -> float | None:
        values = [c.value for c in self.checks
                  if c.value is not None and c.name.endswith(suffixes)]
        return max(values) if values else None

    @property
    def first_failure(self) -> str | None:
        for c in self.checks:
            if not c.ok:
                return f"{c.name}: {c.detail}"
        if self.greedy is not None and not self.greedy.ok:
            g = self.greedy
            d = g.first_divergence
            if d is None:
                return "greedy: no pair decoded"
            if g.num_failed == 0:
                return (
                    f"greedy: token agreement {100 * g.agreement:.2f}% < "
                    f"{100 * g.min_agreement:.2f}% ({g.num_steps_agreeing}/{g.num_steps} steps); "
                    f"first divergence: pair {d['pair']} (user {d['user']}, item {d['item']}) "
                    f"at position {d['position']}: expected token {d['expected']}, got "
                    f"{d['got']} (PyTorch margin {d['margin']:.3g})"
                )
            return (
                f"greedy: pair {d['pair']} (user {d['user']}, item {d['item']}) diverges at "
                f"position {d['position']}: expected token {d['expected']}, got {d['got']} "
                f"(PyTorch margin {d['margin']:.3g} > {self.greedy.tie_margin:.3g})"
            )
        if self.quality is not None and not self.quality.ok:
            return self.quality.first_failure
        return None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["first_failure"] = self.first_failure
        data["max_log_prob_error"] = self.max_log_prob_error
        data["max_served_log_prob_error"] = self.max_served_log_prob_error
        if self.greedy is not None:
            data["greedy"].update(ok=self.greedy.ok, agreement=self.greedy.agreement)
        if self.quality is not None:
            data["quality"]["ok"] = self.quality.ok
        return data

    def summary(self) -> str:
        """A table for the CLI: one line per check, then greedy parity and the verdict."""
        lines = [f"verify {self.bundle} ({self.precision}, {self.provider or self.device})"]
        for c in self.checks:
            figure = "" if c.value is None else f"{c.value:.3g} (tol {c.tolerance:.3g})"
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<34} {figure:<24} {c.detail}")
        if self.max_log_prob_error is not None:
            served = self.max_served_log_prob_error
            lines.append(
                f"  max |log-prob error| vs PyTorch: {self.max_log_prob_error:.3g} "
                f"(tol {self.tolerance.get('log_probs', float('nan')):.3g})"
                + ("" if served is None else f"; served top-K log-probs {served:.3g}")
            )
        if self.greedy is not None:
            g = self.greedy
            gate = f" (min {100 * g.min_agreement:.2f}%)" if g.min_agreement else ""
            lines.append(
                f"  {'ok  ' if g.ok else 'FAIL'} greedy parity: {g.num_identical}/{g.num_pairs} "
                f"identical, {g.num_near_ties} near-ties, {g.num_failed} divergences; token "
                f"agreement {100 * g.agreement:.2f}% ({g.num_steps_agreeing}/{g.num_steps}){gate}"
            )
            d = g.first_divergence
            if d is not None:
                lines.append(
                    f"       first divergence: pair {d['pair']} (user {d['user']}, item "
                    f"{d['item']}) at position {d['position']}: PyTorch {d['expected']}, "
                    f"served {d['got']}, PyTorch margin {d['margin']:.3g}"
                )
        if self.quality is not None:
            q = self.quality
            gate = "reported" if q.max_change is None else f"tol {100 * q.max_change:.2f}% worse"
            lines.append(f"  {'ok  ' if q.ok else 'FAIL'} task metrics on {q.split} "
                         f"({q.num_reviews} reviews; {gate}):  fp32 -> {self.precision}")
            for m in q.metrics:
                change = "n/a" if m.change is None else f"{100 * m.change:+.2f}%"
                lines.append(f"       {'ok  ' if m.ok else 'FAIL'} {m.name:<11} "
                             f"{m.reference:>10.4f} -> {m.bundle:<10.4f} ({change}, + = worse)")
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
