"""The served ONNX graphs, built node by node from an NRT's weights (numpy arrays).

Why by hand and not torch.onnx.export: the production step graph is not the training
graph. It reads and writes a slot pool of hidden states that stays on the device, runs ArgMax
(and TopK) in the graph so the host never sees a vocab-sized tensor, and must stay free of
If/Loop/Scan and host-side shape inputs so ORT can capture it as a CUDA graph. Writing it
with onnx.helper keeps every node deliberate; `verify` proves it computes what PyTorch does.
The builders take `NRTWeights`, never a torch module: building a bundle needs numpy and onnx.

The GRU cell follows torch.nn.GRU (gate order r, z, n; the reset gate applied after the
hidden projection, i.e. ONNX's linear_before_reset=1):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import ModelConfig
from .precision import precision_spec
from .quantize import quantize_step_graph
from .weights import Linear, NRTWeights

OPSET = 18
# IR 9 is what opset 18 shipped with; older runtimes refuse newer IR versions
IR_VERSION = 9

# I/O names of the served graphs (recorded in the manifest; the runtime reads them there)
POOL, POOL_OUT = "state_pool", "state_pool_out"
READ_SLOTS, WRITE_SLOTS, TOKENS = "read_slots", "write_slots", "tokens"
NEXT_TOKEN, TOPK_LOGPROBS, TOPK_IDS = "next_token", "topk_logprobs", "topk_ids"
LOG_PROBS = "log_probs"  # verification-only output, never in a served graph
HIDDEN, HIDDEN_OUT = "hidden", "hidden_out"  # the benchmark-only step without a pool
SLOTS, USERS, ITEMS, RATING, STATES = "slots", "users", "items", "rating", "states"


@dataclass(frozen=True)
class StepGraphOptions:
    # K > 0 adds the sampling outputs (TopK log-probs and ids); 0 builds the greedy graph
    top_k: int = 0
    # adds the full [B, V] log-prob output: for `verify` only, never served
    with_log_probs: bool = False
    # "fp32", "fp16" or "int8" (see precision.py: what runs in which precision and why)
    precision: str = "fp32"
    # False: (hidden [L, B, H], tokens) -> (hidden_out, ...) with no slot pool. Only for
    # bench/graphs.py, which measures what the pool's Gather + ScatterND cost.
    slot_pool: bool = True


class _GraphBuilder:
    """Collects nodes and initializers; names are unique by construction."""

    def __init__(self, float_dtype: type = np.float32) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        # dtype of the weights (and so of everything computed from them)
        self.float_dtype = float_dtype

    def const(self, name: str, array: np.ndarray) -> str:
        # np.ascontiguousarray would turn a 0-d scalar into shape (1,)
        array = np.array(array, order="C", copy=True)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, array: np.ndarray, transpose: bool = False) -> str:
        array = array.T if transpose else array
        return self.const(name, array.astype(self.float_dtype))

    def op(self, op_type: str, inputs: list[str], num_outputs: int = 1, name: str = "", **attrs):
        self._count += 1
        base = name or f"{op_type.lower()}_{self._count}"
        outputs = [base] if num_outputs == 1 else [f"{base}_{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=base, **attrs))
        return outputs[0] if num_outputs == 1 else outputs

    def linear(self, x: str, layer: Linear, name: str) -> str:
        """y = x @ W^T + b as MatMul + Add (ORT fuses them; fp16 and CUDA graphs handle both)."""
        w = self.weight(f"{name}.weight_t", layer.weight, transpose=True)
        b = self.weight(f"{name}.bias", layer.bias)
        return self.op("Add", [self.op("MatMul", [x, w]), b], name=name)

    def model(self, graph_name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="gruserve",
        )
        model.ir_version = IR_VERSION
        return model


def _pool_value_info(
    name: str, num_layers: int, hidden: int, elem_type: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, [num_layers, "num_slots", hidden])


def _batch_ids(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch"])


def _scatter_into_pool(g: _GraphBuilder, pool: str, slots: str, states: str) -> str:
    """pool[0, slots[b], :] = states[b] for a single-layer pool [1, S, H]; states (B, H)."""
    zeros = g.op("Mul", [slots, g.const("zero_i64", np.array(0, dtype=np.int64))])
    pairs = g.op(
        "Concat",
        [g.op("Unsqueeze", [zeros, "axis_1"]), g.op("Unsqueeze", [slots, "axis_1"])],
        axis=1,
    )  # (B, 2): (layer, slot)
    indices = g.op("Unsqueeze", [pairs, "axis_0"])  # (1, B, 2)
    updates = g.op("Unsqueeze", [states, "axis_0"])  # (1, B, H)
    # the runtime binds the pool's input and output to one buffer: ScatterND then skips
    # its copy and writes only the B rows (all Gathers ran before, by data dependence)
    return g.op("ScatterND", [pool, indices, updates], name=POOL_OUT)


def _axes_consts(g: _GraphBuilder) -> None:
    g.const("axis_0", np.array([0], dtype=np.int64))
    g.const("axis_1", np.array([1], dtype=np.int64))


def build_step_graph(
    weights: NRTWeights, options: StepGraphOptions = StepGraphOptions()
) -> onnx.ModelProto:
    """One decode step for a batch of slots: (pool, read_slots, write_slots, tokens) ->
    (pool', next_token[, topk_logprobs, topk_ids]).

    read_slots and write_slots differ only in beam search, where a beam continues from its
    parent's state: reading the parent's slot and writing its own reorders beams for free.
    """
    cfg = weights.config
    H, V = cfg.hidden_size, cfg.ntoken
    if options.top_k > V:
        raise ValueError(f"top_k={options.top_k} exceeds the vocabulary ({V})")
    precision = precision_spec(options.precision)
    g = _GraphBuilder(precision.np_dtype)
    _axes_consts(g)
    state_type = precision.onnx_dtype

    if options.slot_pool:
        h_all = g.op("Gather", [POOL, READ_SLOTS], axis=1)  # (1, B, H)
    else:
        h_all = HIDDEN  # (1, B, H)
    h = g.op("Squeeze", [h_all, "axis_0"])  # (B, H)
    emb = g.weight("decoder.word_embeddings.weight", weights.word_embeddings)
    x = g.op("Gather", [emb, TOKENS], axis=0)  # (B, E)

    w_ih = g.weight("gru.weight_ih_t", weights.gru_weight_ih, transpose=True)  # (E, 3H)
    w_hh = g.weight("gru.weight_hh_t", weights.gru_weight_hh, transpose=True)  # (H, 3H)
    gi = g.op("Add", [g.op("MatMul", [x, w_ih]), g.weight("gru.bias_ih", weights.gru_bias_ih)])
    gh = g.op("Add", [g.op("MatMul", [h, w_hh]), g.weight("gru.bias_hh", weights.gru_bias_hh)])
    split = g.const("gate_split", np.array([H, H, H], dtype=np.int64))
    i_r, i_z, i_n = g.op("Split", [gi, split], num_outputs=3, axis=1)
    h_r, h_z, h_n = g.op("Split", [gh, split], num_outputs=3, axis=1)
    r = g.op("Sigmoid", [g.op("Add", [i_r, h_r])])
    z = g.op("Sigmoid", [g.op("Add", [i_z, h_z])])
    n = g.op("Tanh", [g.op("Add", [i_n, g.op("Mul", [r, h_n])])])
    h_new = g.op("Add", [n, g.op("Mul", [z, g.op("Sub", [h, n])])])  # (1-z)*n + z*h, (B, H)

    logits = g.linear(h_new, weights.output, "decoder.linear")  # (B, V)
    if precision.onnx_dtype != TensorProto.FLOAT:
        # ArgMax, LogSoftmax (a sum over the whole vocabulary) and TopK run in float32
        logits = g.op("Cast", [logits], name="logits_fp32", to=TensorProto.FLOAT)
    if options.slot_pool:
        state_out = _scatter_into_pool(g, POOL, WRITE_SLOTS, h_new)
        state_info = _pool_value_info(state_out, cfg.num_layers, H, state_type)
    else:
        state_out = g.op("Unsqueeze", [h_new, "axis_0"], name=HIDDEN_OUT)  # (1, B, H)
        state_info = helper.make_tensor_value_info(
            HIDDEN_OUT, state_type, [cfg.num_layers, "batch", H]
        )
    outputs = [state_info, helper.make_tensor_value_info(NEXT_TOKEN, TensorProto.INT64, ["batch"])]
    log_probs = None
    if options.top_k or options.with_log_probs:
        # LogSoftmax rather than logits - ReduceLogSumExp(logits): the same numbers, but ORT's
        # CPU LogSoftmax is vectorised and its generic reduction is not (~15x slower at
        # V = 20004, which made TopK(64) cost 60-90% per step; bench/results/graphs.md)
        log_probs = g.op("LogSoftmax", [logits], axis=1)  # (B, V)
    if options.top_k:
        k_dim = options.top_k
        k = g.const("top_k", np.array([k_dim], dtype=np.int64))
        g.op("TopK", [log_probs, k], num_outputs=2, name="topk", axis=1)
        g.nodes[-1].output[:] = [TOPK_LOGPROBS, TOPK_IDS]  # (B, K) each, sorted descending
        # TopK breaks ties toward the lower index, as ArgMax does: its first id is the greedy
        # token, so the sampling graph needs no second pass over the vocabulary
        first = g.const("first_candidate", np.array(0, dtype=np.int64))
        g.op("Gather", [TOPK_IDS, first], name=NEXT_TOKEN, axis=1)  # (B,)
        outputs += [
            helper.make_tensor_value_info(TOPK_LOGPROBS, TensorProto.FLOAT, ["batch", k_dim]),
            helper.make_tensor_value_info(TOPK_IDS, TensorProto.INT64, ["batch", k_dim]),
        ]
    else:
        # argmax(logits) == argmax(log_softmax(logits)): greedy skips the softmax entirely
        g.op("ArgMax", [logits], name=NEXT_TOKEN, axis=1, keepdims=0)
    if options.with_log_probs:
        g.op("Identity", [log_probs], name=LOG_PROBS)
        outputs.append(helper.make_tensor_value_info(LOG_PROBS, TensorProto.FLOAT, ["batch", V]))

    if options.slot_pool:
        inputs = [
            _pool_value_info(POOL, cfg.num_layers, H, state_type),
            _batch_ids(READ_SLOTS),
            _batch_ids(WRITE_SLOTS),
            _batch_ids(TOKENS),
        ]
    else:
        inputs = [
            helper.make_tensor_value_info(HIDDEN, state_type, [cfg.num_layers, "batch", H]),
            _batch_ids(TOKENS),
        ]
    step = g.model("gruserve_decoder_step", inputs, outputs)
    # int8: the float graph with its vocabulary projection rewritten (quantize.py)
    return quantize_step_graph(step) if precision.quantized else step


def build_head_graph(weights: NRTWeights, top_k: int, precision: str = "fp32") -> onnx.ModelProto:
    """(pool, slots) -> (topk_logprobs, topk_ids): the TopK candidates of the states already
    in those slots, without stepping; the pool is an input only, never written.

    What lets a greedy request with min_tokens left stay on the cheap ArgMax step: only when
    that step's token would end it early does the runtime read the candidates of the new
    state here, and takes the best one that does not end it. Float32 logits in every
    precision (the int8 step's shortlist is not needed on this rare path)."""
    cfg = weights.config
    if not 0 < top_k <= cfg.ntoken:
        raise ValueError(f"top_k={top_k} must be in 1..{cfg.ntoken}")
    spec = precision_spec(precision)
    g = _GraphBuilder(spec.np_dtype)
    _axes_consts(g)
    h_all = g.op("Gather", [POOL, SLOTS], axis=1)  # (1, B, H)
    h = g.op("Squeeze", [h_all, "axis_0"])  # (B, H)
    logits = g.linear(h, weights.output, "decoder.linear")  # (B, V)
    if spec.onnx_dtype != TensorProto.FLOAT:
        logits = g.op("Cast", [logits], name="logits_fp32", to=TensorProto.FLOAT)
    log_probs = g.op("LogSoftmax", [logits], axis=1)
    k = g.const("top_k", np.array([top_k], dtype=np.int64))
    g.op("TopK", [log_probs, k], num_outputs=2, name="topk", axis=1)
    g.nodes[-1].output[:] = [TOPK_LOGPROBS, TOPK_IDS]
    inputs = [
        _pool_value_info(POOL, cfg.num_layers, cfg.hidden_size, spec.onnx_dtype),
        _batch_ids(SLOTS),
    ]
    outputs = [
        helper.make_tensor_value_info(TOPK_LOGPROBS, TensorProto.FLOAT, ["batch", top_k]),
        helper.make_tensor_value_info(TOPK_IDS, TensorProto.INT64, ["batch", top_k]),
    ]
    return g.model("gruserve_decoder_head", inputs, outputs)


def _to_pool_dtype(g: _GraphBuilder, states: str, pool_type: int) -> str:
    if pool_type == TensorProto.FLOAT:
        return states
    return g.op("Cast", [states], to=pool_type)


def build_encoder_graph(weights: NRTWeights, precision: str = "fp32") -> onnx.ModelProto:
    """(pool, slots, users, items) -> (pool', rating): each request's initial state lands in
    its slot on the device; only the rating (B floats) comes back to the host.

    float32 in every precision (the rating's class boundary is not safe in half precision);
    only the state is Cast to the pool's dtype."""
    cfg = weights.config
    pool_type = precision_spec(precision).onnx_dtype
    g = _GraphBuilder()
    _axes_consts(g)
    # one extra row per table, after the known entities' rows: the fallback embedding that
    # serve --unknown-entities fallback conditions unknown ids on (manifest fallback_entities)
    user_fallback, item_fallback = weights.fallback_embeddings()
    user_table = g.weight(
        "encoder.user_embeddings.weight", np.vstack([weights.user_embeddings, user_fallback])
    )
    item_table = g.weight(
        "encoder.item_embeddings.weight", np.vstack([weights.item_embeddings, item_fallback])
    )
    u = g.op("Gather", [user_table, USERS], axis=0)  # (B, E)
    i = g.op("Gather", [item_table, ITEMS], axis=0)  # (B, E)
    ui = g.op("Concat", [u, i], axis=1)  # (B, 2E)
    hidden = g.op("Sigmoid", [g.linear(ui, weights.first_layer, "encoder.first_layer")])
    for index, layer in enumerate(weights.layers):
        hidden = g.op("Sigmoid", [g.linear(hidden, layer, f"encoder.layers.{index}")])
    rating_2d = g.linear(hidden, weights.last_layer, "encoder.last_layer")  # (B, 1)
    g.op("Squeeze", [rating_2d, "axis_1"], name=RATING)  # (B,)

    min_r = g.const("min_rating", np.array(cfg.min_rating, dtype=np.float32))
    max_r = g.const("max_rating", np.array(cfg.max_rating, dtype=np.float32))
    clamped = g.op("Clip", [rating_2d, min_r, max_r])
    # float -> int64 truncates toward zero like torch's .to(int64); clamped values are >= min_r
    rating_class = g.op("Cast", [clamped], to=TensorProto.INT64)  # (B, 1)
    first = int(cfg.min_rating)
    classes = g.const(
        "rating_classes",
        np.arange(first, first + cfg.num_rating_classes, dtype=np.int64)[None, :],
    )  # (1, R)
    one_hot = g.op("Cast", [g.op("Equal", [rating_class, classes])], to=TensorProto.FLOAT)  # (B, R)
    features = g.op("Concat", [u, i, one_hot], axis=1)
    state = g.op("Tanh", [g.linear(features, weights.hidden_encoder, "encoder.hidden_encoder")])
    pool_out = _scatter_into_pool(g, POOL, SLOTS, _to_pool_dtype(g, state, pool_type))

    inputs = [
        _pool_value_info(POOL, cfg.num_layers, cfg.hidden_size, pool_type),
        _batch_ids(SLOTS),
        _batch_ids(USERS),
        _batch_ids(ITEMS),
    ]
    outputs = [
        _pool_value_info(pool_out, cfg.num_layers, cfg.hidden_size, pool_type),
        helper.make_tensor_value_info(RATING, TensorProto.FLOAT, ["batch"]),
    ]
    return g.model("gruserve_encoder", inputs, outputs)


def build_state_writer_graph(config: ModelConfig, precision: str = "fp32") -> onnx.ModelProto:
    """(pool, slots, states (B, L*H) float32) -> pool': conditioning on a caller's raw hidden
    state. The states stay float32 on the host side in every precision (no weights: the
    graph only needs the sizes)."""
    cfg = config
    pool_type = precision_spec(precision).onnx_dtype
    g = _GraphBuilder()
    _axes_consts(g)
    pool_out = _scatter_into_pool(g, POOL, SLOTS, _to_pool_dtype(g, STATES, pool_type))
    inputs = [
        _pool_value_info(POOL, cfg.num_layers, cfg.hidden_size, pool_type),
        _batch_ids(SLOTS),
        helper.make_tensor_value_info(STATES, TensorProto.FLOAT, ["batch", cfg.hidden_size]),
    ]
    outputs = [_pool_value_info(pool_out, cfg.num_layers, cfg.hidden_size, pool_type)]
    return g.model("gruserve_state_writer", inputs, outputs)
