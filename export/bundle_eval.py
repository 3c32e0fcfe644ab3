"""The task metrics of a bundle: `evaluate`'s scorer, computed with the bundle's ONNX graphs.

So that an exported bundle (an int8 one above all) is judged by the figures a user reads,
not only by per-step differences, every number comes from the bundle's own graph files:

- the rating from its encoder (the served StepRunner);
- the greedy decodes from its greedy step graph, through the StepRunner, as the engine runs
  them (a batch of rows, each reading and writing its own slot, stopped at <eos>);
- the perplexity from its greedy step graph with one output added: LogSoftmax of its
  vocabulary logits (what the float graph's ArgMax reads; in an int8 graph the int8 logits
  its head shortlists from), teacher forced over the reference tips.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from gruserve.runtime.bundle import STEP_GREEDY, Bundle
from gruserve.runtime.providers import SessionConfig, session_options, wanted_providers
from gruserve.runtime.runner import StepRunner

from .evaluate import BatchScores
from .quantize import vocab_logits

LOG_PROBS = "log_probs"


def with_log_probs(step: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a served greedy step graph that also outputs log_softmax(logits) [B, V]
    of its vocabulary logits (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(step)
    graph = out.graph
    logits = vocab_logits(graph)
    if logits is None:
        argmax = [n for n in graph.node if n.op_type == "ArgMax"]
        if len(argmax) != 1:
            raise ValueError(f"expected one ArgMax in the greedy step graph, found {len(argmax)}")
        logits = argmax[0].input[0]
    graph.node.append(helper.make_node("LogSoftmax", [logits], [LOG_PROBS], axis=1, name=LOG_PROBS))
    graph.output.append(
        helper.make_tensor_value_info(LOG_PROBS, TensorProto.FLOAT, ["batch", None])
    )
    return out


class BundleScorer:
    """`evaluate`'s Scorer on a bundle's graphs (see the module docstring). Rows of a batch
    use slots 0..B-1 of the runner's pool, so `max_batch` bounds the batch size."""

    def __init__(self, bundle: Bundle, *, max_batch: int, max_tokens: int,
                 config: SessionConfig | None = None) -> None:
        config = config or SessionConfig(device="cpu")
        self.bundle, self.max_tokens = bundle, max_tokens
        self.runner = StepRunner(bundle, num_slots=max_batch, config=config)
        step = with_log_probs(onnx.load(str(bundle.graphs[STEP_GREEDY].path)))
        self.session = ort.InferenceSession(
            step.SerializeToString(), session_options(config), providers=wanted_providers(config)
        )
        self.names = bundle.graphs[STEP_GREEDY].bindings
        ids = bundle.special_ids
        self.bos, self.eos, self.pad = ids["bos"], ids["eos"], ids["pad"]

    def __call__(self, users: torch.Tensor, items: torch.Tensor, seqs: torch.Tensor) -> BatchScores:
        users, items, seqs = (np.asarray(t.numpy(), dtype=np.int64) for t in (users, items, seqs))
        slots = np.arange(len(users), dtype=np.int64)
        ratings = self.runner.encode(slots, users, items)
        nll = self._nll(self.runner.read_states(slots), seqs)
        generated = greedy_decodes(
            self.runner, slots, users, items, self.bos, self.eos, self.max_tokens
        )
        return BatchScores(nll, [float(r) for r in ratings], generated)

    def _nll(self, pool: np.ndarray, seqs: np.ndarray) -> float:
        """Teacher forcing: pool (L, B, H) holds row b's state in slot b."""
        rows = np.arange(seqs.shape[0], dtype=np.int64)
        names = self.names
        total = 0.0
        for t in range(seqs.shape[1] - 1):
            target = seqs[:, t + 1]
            counted = target != self.pad
            if not counted.any():
                break
            pool, log_probs = self.session.run(
                [names["pool_out"], LOG_PROBS],
                {names["pool"]: pool, names["read_slots"]: rows, names["write_slots"]: rows,
                 names["tokens"]: seqs[:, t]},
            )
            total -= float(log_probs[rows[counted], target[counted]].astype(np.float64).sum())
        return total


def greedy_decodes(runner: StepRunner, slots, users, items, bos: int, eos: int,
                   max_tokens: int) -> list[list[int]]:
    """The served greedy loop, batched: what the engine does, without the scheduler. Ids
    without bos and without the final eos, like `model.greedy_decode`."""
    runner.encode(slots, users, items)
    tokens = np.full(len(slots), bos, dtype=np.int64)
    outputs: list[list[int]] = [[] for _ in slots]
    done = np.zeros(len(slots), dtype=bool)
    for _ in range(max_tokens):
        tokens = runner.step(slots, slots, tokens).next_tokens
        for row in np.flatnonzero(~done & (tokens != eos)):
            outputs[row].append(int(tokens[row]))
        done |= tokens == eos
        if done.all():
            break
    return outputs
