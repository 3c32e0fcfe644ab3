"""Export precisions: which dtype each part of a graph runs in, and how closely it must match.

fp32 is the reference: every tensor float32, ORT must agree with PyTorch to 1e-4.

fp16 is for the CUDA provider (tensor cores, half the weight and pool memory). It is applied
only where it is safe:

- step graph: embeddings, GRU weights and gates, the state pool and the output projection run
  in float16; the logits are Cast to float32 BEFORE ArgMax / LogSoftmax / TopK, so the
  softmax normaliser (a sum over 20k exponentials) and the reported log-probs are float32.
- encoder: stays float32 end to end and only its final state is Cast into the fp16 pool. The
  rating is clamped and truncated to a one-hot class; a half-precision rating near an integer
  boundary would flip the class and with it the whole initial state. The encoder runs once
  per request, so fp32 there costs nothing measurable.
- host-facing tensors (ids, rating, top-k log-probs, caller-given states) are float32/int64
  in both precisions: the runtime's API does not change, only the pool's dtype does (read
  from the manifest).

Tolerances (max abs difference against PyTorch float32, on log-probs and on hidden states,
a few steps deep): fp32 1e-4. fp16 5e-2 on log-probs and 1e-2 on hidden states: a float16
hidden value in [-1, 1] carries a rounding error of up to 2.4e-4 per step and the GRU
compounds it; logits of magnitude ~10 have a float16 ulp of ~8e-3, so a log-prob can move by
a few 1e-2. A greedy divergence is accepted only where PyTorch's own top-2 margin at that
position is within 2x the log-prob tolerance (the largest gap two tolerance-bounded errors can
close), i.e. a genuine near-tie; fp32 bundles of a trained model show none at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import TensorProto


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    # dtype of the weights, activations and pool inside the step graph
    np_dtype: type
    onnx_dtype: int
    # max abs difference against PyTorch float32 that verification accepts
    log_prob_tolerance: float
    hidden_tolerance: float
    # weights quantized by gruserve.export.quantize (a CPU-only format)
    quantized: bool = False
    # the least greedy token agreement with PyTorch fp32 (0: every divergence must be a
    # near-tie instead, see greedy_tie_margin)
    min_agreement: float = 0.0
    # the most a task metric may worsen relative to fp32 on the test split (None: not gated)
    max_metric_change: float | None = None

    @property
    def dtype_name(self) -> str:
        return np.dtype(self.np_dtype).name

    @property
    def greedy_tie_margin(self) -> float:
        """A greedy divergence within this top-2 margin is a rounding near-tie, not a bug."""
        return 2 * self.log_prob_tolerance

    def tolerance_dict(self) -> dict:
        out = {"log_probs": self.log_prob_tolerance, "hidden": self.hidden_tolerance}
        if self.quantized:
            out.update(greedy_agreement=self.min_agreement, metrics_relative=self.max_metric_change)
        return out

    def with_tolerance(
        self, *, log_probs: float | None = None, greedy_agreement: float | None = None,
        metrics_relative: float | None = None,
    ) -> PrecisionSpec:
        """This precision with some tolerances overridden (as given to export)."""
        spec = self
        if log_probs is not None:
            if not log_probs >= 0:
                raise ValueError(f"the log-prob tolerance must be >= 0, got {log_probs}")
            spec = replace(spec, log_prob_tolerance=float(log_probs))
        if greedy_agreement is not None:
            if not 0.0 <= greedy_agreement <= 1.0:
                raise ValueError(f"greedy agreement must be in [0, 1], got {greedy_agreement}")
            spec = replace(spec, min_agreement=float(greedy_agreement))
        if metrics_relative is not None:
            if not metrics_relative >= 0:
                raise ValueError(f"the metric tolerance must be >= 0, got {metrics_relative}")
            spec = replace(spec, max_metric_change=float(metrics_relative))
        return spec

    @classmethod
    def from_manifest(cls, precision: str, tolerance: dict | None) -> PrecisionSpec:
        """The precision with the tolerances a bundle was exported with (its manifest's)."""
        spec = precision_spec(precision)
        if not tolerance:
            return spec
        return spec.with_tolerance(
            log_probs=tolerance.get("log_probs"),
            greedy_agreement=tolerance.get("greedy_agreement"),
            metrics_relative=tolerance.get("metrics_relative"),
        )


PRECISIONS: dict[str, PrecisionSpec] = {
    "fp32": PrecisionSpec("fp32", np.float32, TensorProto.FLOAT, 1e-4, 1e-4),
    "fp16": PrecisionSpec("fp16", np.float16, TensorProto.FLOAT16, 5e-2, 1e-2),
    "int8": PrecisionSpec(
        "int8", np.float32, TensorProto.FLOAT, 0.5, 1e-4,
        quantized=True, min_agreement=0.99, max_metric_change=0.01,
    ),
}


def precision_spec(name: str) -> PrecisionSpec:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}"
        ) from None
