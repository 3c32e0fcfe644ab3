"""int8 decoder-step graphs for ONNX Runtime's CPU provider: a rewrite of a float step graph.

What is quantized: the MatMuls whose weight initializer is named in `weights`, by default
only the vocabulary projection (hidden -> 20,004 logits), ~90% of a step's multiply-adds at
the reference sizes. The encoder, the embeddings, the GRU, the softmax/ArgMax/TopK heads and
the state pool stay float32, so the hidden state a bundle carries from step to step is the
fp32 one and only the choice among the logits can differ.

The scheme (`METHOD`), and why it beats the library's quantizers here
(bench/int8.py measures them side by side; bench/results/int8.md):

- activations: uint8 with a FIXED scale of 1/64 and zero point 64: the exact range [-1, 1]
  in 128 steps (error <= 0.0078), codes 0..128. No calibration is needed because the input
  of these MatMuls is a GRU hidden state, and h' = (1 - z) * n + z * h with n = tanh(.)
  stays in [-1, 1] whenever h does (the encoder's initial state is a tanh too; the runtime
  refuses a caller's raw state outside it, runtime/request_builder.py). A Clip to
  [-1, 1] in front guards the kernel against anything else. A fixed scale makes a row's
  logits independent of the other rows of its batch: the integer products are exact, so a
  request decodes the same tokens alone and inside any batch, as with fp32. ORT's dynamic
  quantization (`quantize_dynamic`) takes one scale from the min/max of the whole batch
  tensor instead, so a request's tokens would depend on its neighbours.
- weights: int8 in [-127, 127], symmetric, one scale per output column (per channel).
- why codes 0..128 and not 0..255: on x86 without AVX-VNNI (AVX2 only, as on the project's
  machine) ORT's u8 x s8 kernel adds pairs of products in int16 (vpmaddubsw), which
  saturates unless 2 * max(a) * max(|w|) <= 32767: 2 * 128 * 127 fits, 2 * 255 * 127 does
  not (a wrong sum, not a rounding). Of the two ways to fit, halving the activation codes
  costs less than halving the weight codes (ORT's `reduce_range`): on the demo model the
  logit error is 0.022 rms against 0.034 with 7-bit weights (8/8 bits, were it safe: 0.019).
- op: com.microsoft MatMulIntegerToFloat (QuantizeLinear in front), which applies both
  scales and the bias in the GEMM's output pass. The standard-op spelling (MatMulInteger +
  Cast + Mul + Add) is not fused by ORT and makes three more passes over [B, V].
- the head decides on exact logits (`rescore`): the int8 logits only shortlist. Greedy
  takes the int8 top RESCORE_CANDIDATES (4) and the ArgMax of their float32 logits (their
  weight rows gathered from a float32 copy, one dot product each); the sampling graph keeps
  its int8 top-K candidates but reports and orders them by float32 log-probs. A greedy token
  then differs from fp32's only if fp32's best word is not among int8's best four, which
  needs an error several times the int8 logit error. Cost: TopK(4) instead of ArgMax and
  B x (4 or K) dot products of length H, against B x V for the projection; the price is the
  float32 copy of the weights in the file (V x H x 4 bytes: 32 MB at the reference sizes).

MatMulNBits (8- or 4-bit, accuracy_level 4) quantizes activations per row too, but on AVX2 it
is slower than the fp32 step at batch >= 16; see the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

METHOD = "int8-static-activation-u8-0..128-weight-s8-per-channel"
VOCAB_PROJECTION = "decoder.linear.weight_t"
GRU_HIDDEN = "gru.weight_hh_t"
DEFAULT_WEIGHTS: tuple[str, ...] = (VOCAB_PROJECTION,)
# the inputs of the quantized MatMuls lie in [-1, 1] (see the module docstring)
ACTIVATION_RANGE = (-1.0, 1.0)
ACTIVATION_SCALE = np.float32(1.0 / 64.0)  # codes 0..128: no int16 saturation on AVX2
ACTIVATION_ZERO_POINT = np.uint8(64)
WEIGHT_QMAX = 127
# the greedy head re-ranks this many int8 candidates on float32 logits (see the docstring)
RESCORE_CANDIDATES = 4
MS_DOMAIN = "com.microsoft"


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float32 -> (int8 (K, N) in [-127, 127], float32 scale (N,)):
    symmetric, one scale per output column; an all-zero column gets scale 1."""
    peak = np.abs(weight).max(axis=0)
    scale = np.where(peak > 0, peak / WEIGHT_QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    return q, scale


def quantize_step_graph(
    model: onnx.ModelProto, weights: Sequence[str] = DEFAULT_WEIGHTS,
    rescore: int = RESCORE_CANDIDATES,
) -> onnx.ModelProto:
    """A copy of `model` where each MatMul(x, W) (+ Add(bias)) with W named in `weights`
    runs as QuantizeLinear(x) -> MatMulIntegerToFloat, and (rescore > 0, the vocabulary
    projection quantized) the head decides on float32 logits of its int8 shortlist. Raises
    ValueError when a named weight is not the constant right operand of exactly one MatMul."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # first node name -> its replacement
    dropped: set[str] = set()
    for name in weights:
        matmuls = [
            n for n in consumers.get(name, []) if n.op_type == "MatMul" and n.input[1] == name
        ]
        if name not in inits or len(matmuls) != 1:
            raise ValueError(f"quantize: {name!r} is not the weight of exactly one MatMul")
        matmul = matmuls[0]
        # fold a following Add of a constant bias into the op (its output keeps its name)
        after = consumers.get(matmul.output[0], [])
        bias_add = after[0] if len(after) == 1 and after[0].op_type == "Add" else None
        bias = None
        if bias_add is not None:
            other = [i for i in bias_add.input if i != matmul.output[0]]
            bias = other[0] if len(other) == 1 and other[0] in inits else None
        if bias is None:
            bias_add = None
        output = bias_add.output[0] if bias_add is not None else matmul.output[0]
        replaced[matmul.name] = _int8_matmul(graph, matmul, inits[name], bias, output)
        if bias_add is not None:
            dropped.add(bias_add.name)
        if name == VOCAB_PROJECTION and rescore > 0:
            head = _Rescorer(graph, inits[name], bias, hidden=matmul.input[0], logits=output)
            replaced.update(head.rewrite(consumers.get(output, []), consumers, rescore))
    nodes = []
    for node in graph.node:
        if node.name in replaced:
            nodes.extend(replaced[node.name])
        elif node.name not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    if not any(op.domain == MS_DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def _int8_matmul(graph, matmul, weight_init, bias: str | None, output: str) -> list:
    base = matmul.name
    q, scale = quantize_weight(numpy_helper.to_array(weight_init).astype(np.float32))
    graph.initializer.extend([
        numpy_helper.from_array(q, f"{weight_init.name}.int8"),
        numpy_helper.from_array(scale, f"{weight_init.name}.scale"),
        numpy_helper.from_array(np.array(ACTIVATION_SCALE), f"{base}.input_scale"),
        numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT), f"{base}.input_zero_point"),
        numpy_helper.from_array(np.array(ACTIVATION_RANGE[0], np.float32), f"{base}.input_min"),
        numpy_helper.from_array(np.array(ACTIVATION_RANGE[1], np.float32), f"{base}.input_max"),
    ])
    clipped = helper.make_node(
        "Clip", [matmul.input[0], f"{base}.input_min", f"{base}.input_max"],
        [f"{base}.input_clipped"], name=f"{base}.clip",
    )
    x_q = f"{base}.input_uint8"
    quantize = helper.make_node(
        "QuantizeLinear",
        [f"{base}.input_clipped", f"{base}.input_scale", f"{base}.input_zero_point"],
        [x_q], name=f"{base}.quantize",
    )
    # inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point (none: symmetric), bias
    inputs = [x_q, f"{weight_init.name}.int8", f"{base}.input_scale",
              f"{weight_init.name}.scale", f"{base}.input_zero_point", "", bias or ""]
    while inputs[-1] == "":
        inputs.pop()
    gemm = helper.make_node(
        "MatMulIntegerToFloat", inputs, [output], name=f"{base}.int8", domain=MS_DOMAIN
    )
    return [clipped, quantize, gemm]


class _Rescorer:
    """Rewrites the head that reads the int8 logits so that it decides on exact ones: the
    greedy ArgMax becomes TopK(rescore) of the int8 logits, then the ArgMax of those
    candidates' float32 logits; the sampling TopK(K) keeps its K candidates but reports, and
    orders them by, their log-probs from float32 logits (the normaliser is the int8 one with
    the candidates' terms replaced by their exact ones)."""

    def __init__(self, graph, weight_init, bias: str | None, hidden: str, logits: str) -> None:
        self.graph, self.hidden, self.logits, self.bias = graph, hidden, logits, bias
        self.nodes: list[onnx.NodeProto] = []
        # (V, H): a candidate's weights are one row to gather
        weight = numpy_helper.to_array(weight_init).astype(np.float32)
        self.weight_rows = f"{weight_init.name}.rows"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T),
                                                         self.weight_rows))
        graph.initializer.extend([
            numpy_helper.from_array(np.array([1], np.int64), "rescore.axis_1"),
            numpy_helper.from_array(np.array([2], np.int64), "rescore.axis_2"),
        ])

    def _op(self, op: str, inputs: list[str], name: str, num_outputs: int = 1, **attrs):
        outputs = [name] if num_outputs == 1 else [f"{name}.{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0] if num_outputs == 1 else outputs

    def _exact(self, ids: str, tag: str) -> str:
        """float32 logits (B, R) of candidate ids (B, R): weight rows . hidden + bias."""
        rows = self._op("Gather", [self.weight_rows, ids], f"{tag}.weights", axis=0)  # (B,R,H)
        column = self._op("Unsqueeze", [self.hidden, "rescore.axis_2"], f"{tag}.hidden")
        dots = self._op("MatMul", [rows, column], f"{tag}.dots")  # (B, R, 1)
        exact = self._op("Squeeze", [dots, "rescore.axis_2"], f"{tag}.logits_no_bias")
        if self.bias is None:
            return exact
        bias = self._op("Gather", [self.bias, ids], f"{tag}.bias", axis=0)
        return self._op("Add", [exact, bias], f"{tag}.logits")

    def rewrite(self, readers, consumers, rescore: int) -> dict[str, list]:
        """{name of a head node: the nodes that replace it}."""
        out = {}
        for node in readers:
            self.nodes = []
            if node.op_type == "ArgMax":
                self._greedy(node, rescore)
            elif node.op_type == "LogSoftmax":
                topk = [n for n in consumers.get(node.output[0], []) if n.op_type == "TopK"]
                if not topk:
                    continue
                node = topk[0]
                self._sampling(node)
            else:
                continue
            out[node.name] = self.nodes
        return out

    def _greedy(self, argmax, rescore: int) -> None:
        k = f"{argmax.name}.rescore_k"
        self.graph.initializer.append(numpy_helper.from_array(np.array([rescore], np.int64), k))
        _, ids = self._op("TopK", [self.logits, k], "greedy.shortlist", num_outputs=2, axis=1)
        exact = self._exact(ids, "greedy")
        best = self._op("ArgMax", [exact], "greedy.best", axis=1, keepdims=1)  # (B, 1)
        picked = self._op("GatherElements", [ids, best], "greedy.picked", axis=1)
        self.nodes.append(helper.make_node(
            "Squeeze", [picked, "rescore.axis_1"], [argmax.output[0]], name=argmax.name))

    def _sampling(self, topk) -> None:
        values, ids = self._op("TopK", [*topk.input], "sampling.shortlist", num_outputs=2,
                               axis=1)
        int8_logits = self._op("GatherElements", [self.logits, ids], "sampling.int8_logits",
                               axis=1)
        correction = self._op("Sub", [self._exact(ids, "sampling"), int8_logits],
                              "sampling.correction")
        patched = self._op("Add", [values, correction], "sampling.patched")  # (B, K)
        # the normaliser with the candidates' exact logits in place of their int8 ones:
        # log(1 + sum_k (p_k exact - p_k int8)), both under the int8 normaliser
        moved = self._op("Sub", [self._op("Exp", [patched], "sampling.p_exact"),
                                 self._op("Exp", [values], "sampling.p_int8")], "sampling.moved")
        total = self._op("ReduceSum", [moved, "rescore.axis_1"], "sampling.moved_sum",
                         keepdims=1)
        one = "rescore.one"
        self.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        shift = self._op("Log", [self._op("Add", [total, one], "sampling.mass")],
                         "sampling.shift")
        log_probs = self._op("Sub", [patched, shift], "sampling.log_probs")
        order = f"{topk.name}.order"
        self.nodes.append(helper.make_node(
            "TopK", [log_probs, topk.input[1]], [topk.output[0], order], name=topk.name, axis=1))
        self._op("GatherElements", [ids, order], "sampling.ids", axis=1)
        self.nodes[-1].output[:] = [topk.output[1]]


def vocab_logits(graph: onnx.GraphProto) -> str | None:
    """The [B, V] logits of an int8 step graph (None in a float graph)."""
    for node in graph.node:
        if node.op_type == "MatMulIntegerToFloat" and node.input[1] == f"{VOCAB_PROJECTION}.int8":
            return node.output[0]
    return None


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def describe(weights: Sequence[str] = DEFAULT_WEIGHTS) -> dict:
    """The manifest's "quantization" entry: what was quantized and how."""
    return {
        "method": METHOD,
        "op": f"{MS_DOMAIN}.MatMulIntegerToFloat",
        "provider": "CPUExecutionProvider",
        "weights": list(weights),
        "weight": {"dtype": "int8", "range": [-WEIGHT_QMAX, WEIGHT_QMAX], "symmetric": True,
                   "granularity": "per_channel"},
        "activation": {
            "dtype": "uint8", "range": list(ACTIVATION_RANGE), "codes": [0, 128],
            "scale": float(ACTIVATION_SCALE), "zero_point": int(ACTIVATION_ZERO_POINT),
        },
        "float32": ["encoder", "embeddings", "gru" if GRU_HIDDEN not in weights else "gru_input",
                    "softmax_argmax_topk", "state_pool"],
    }
