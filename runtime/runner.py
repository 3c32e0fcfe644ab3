"""StepRunner: the ORT sessions of a bundle and the state pool that lives on the device.

The pool holds every slot's GRU hidden state, [L, S, H], allocated once on the device. Each
graph takes the pool and writes it back through I/O binding to the SAME buffer, so between
steps the hidden state never leaves the device; only slot and token ids go in and token ids
(plus TopK candidates when sampling) come out.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading

import numpy as np
import onnxruntime as ort

from .bundle import (
    ENCODER,
    STATE_WRITER,
    STEP_GREEDY,
    STEP_HEAD,
    STEP_TOPK,
    Bundle,
    BundleError,
    GraphSpec,
)
from .model_runner import StepOutput, split_step
from .providers import (
    CUDA,
    SessionConfig,
    check_provider,
    for_precision,
    session_options,
    wanted_providers,
)
from .step_buckets import BucketedStep

log = logging.getLogger(__name__)

_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}


__all__ = ["StepOutput", "StepRunner", "check_io"]


def _dims(shape) -> tuple:
    """Fixed dims as ints, symbolic (dynamic) ones as '?': names may differ, sizes may not."""
    return tuple(d if isinstance(d, int) else "?" for d in shape)


def check_io(session: ort.InferenceSession, spec: GraphSpec) -> None:
    """The graph's I/O must be exactly what the manifest says (names, dtypes, shapes)."""
    for kind, actual, expected in (
        ("input", session.get_inputs(), spec.inputs),
        ("output", session.get_outputs(), spec.outputs),
    ):
        got = [(a.name, a.type, _dims(a.shape)) for a in actual]
        want = [(e.name, _ORT_TYPES.get(e.dtype, e.dtype), _dims(e.shape)) for e in expected]
        if got != want:
            if len(got) != len(want):
                problem = f"the graph has {len(got)} {kind}s, the manifest lists {len(want)}"
            else:
                i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
                problem = (
                    f"{kind} {i} is {_spec_text(got[i])}, the manifest says {_spec_text(want[i])}"
                )
            raise BundleError(f"{spec.path}: graph I/O does not match the manifest: {problem}")


def _spec_text(entry: tuple) -> str:
    name, onnx_type, dims = entry
    return f"'{name}' {onnx_type} [{', '.join(map(str, dims))}]"


class _BoundGraph:
    """One session with its I/O binding; the pool input and output share one OrtValue."""

    def __init__(self, spec: GraphSpec, config: SessionConfig):
        self.spec = spec
        try:
            self.session = ort.InferenceSession(
                str(spec.path), session_options(config), providers=wanted_providers(config)
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises bare RuntimeErrors
            raise BundleError(f"{spec.path}: onnxruntime cannot load it ({exc})") from None
        self.provider = check_provider(self.session, config, spec.path.name)
        check_io(self.session, spec)
        self.names = spec.bindings
        self.binding = self.session.io_binding()

    def input_dtype(self, role: str) -> np.dtype:
        """The numpy dtype the manifest gives the input bound to `role` (e.g. the pool)."""
        name = self.names[role]
        for t in self.spec.inputs:
            if t.name == name:
                return np.dtype(t.dtype)
        raise BundleError(f"{self.spec.path}: manifest has no input '{name}' for '{role}'")

    def bind_pool(
        self, pool: ort.OrtValue, host_outputs: tuple[str, ...], *, writes: bool = True
    ) -> None:
        """Binds the pool in and (when the graph writes it) out to one buffer, once; host
        outputs are named here."""
        self.binding.bind_ortvalue_input(self.names["pool"], pool)
        if writes:
            self.binding.bind_ortvalue_output(self.names["pool_out"], pool)
        self._first_host_output = 1 if writes else 0  # the pool output comes first
        self.host_outputs = tuple(self.names[role] for role in host_outputs)
        self.num_host_outputs = len(host_outputs)

    def twin(self) -> _BoundGraph:
        """The same session with an I/O binding of its own, to bind another pool to. ORT
        sessions may run from several threads at once; one binding may not."""
        twin = copy.copy(self)
        twin.binding = self.session.io_binding()
        return twin

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs with the given host inputs; returns the host outputs in bind_pool's order."""
        b = self.binding
        for role, array in inputs.items():
            b.bind_cpu_input(self.names[role], array)
        # re-bound every run: a bound output keeps the buffer ORT allocated for it, whose
        # batch size would then be wrong for the next step
        for name in self.host_outputs:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs()  # the pool first (bound first), then the host outputs
        first = self._first_host_output
        return [outputs[first + i].numpy() for i in range(self.num_host_outputs)]


class _ScratchRater:
    """Ratings from the encoder graph without touching the slot pool: the encoder always
    writes initial states, so a rating-only run binds a scratch pool of its own, which
    grows to the largest batch it has rated. Thread-safe (one run at a time), so ratings
    may run beside the decode thread's steps."""

    def __init__(self, encoder: _BoundGraph, shape: tuple[int, int], dtype, device: str,
                 device_id: int) -> None:
        self._graph = encoder.twin()
        self._layers, self._hidden = shape
        self._dtype, self._device, self._device_id = dtype, device, device_id
        self._lock = threading.Lock()
        self._rows = 0
        self._pool = None  # kept referenced: the binding does not own it

    def rate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        rows = users.size
        with self._lock:
            if rows > self._rows:
                self._grow(max(rows, 2 * self._rows))
            (rating,) = self._graph.run(
                {"slots": np.arange(rows, dtype=np.int64), "users": users, "items": items}
            )
        return rating

    def _grow(self, rows: int) -> None:
        self._pool = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((self._layers, rows, self._hidden), dtype=self._dtype),
            self._device, self._device_id,
        )
        self._graph.bind_pool(self._pool, ("rating",))
        self._rows = rows


class StepRunner:
    """Runs encoder and step graphs against a device-resident slot pool: the ModelRunner
    (gruserve.runtime.model_runner) of ONNX Runtime.

    Batch-shaped everywhere: every call takes arrays of slots, never one request.
    """

    def __init__(
        self, bundle: Bundle, *, num_slots: int, config: SessionConfig | None = None
    ) -> None:
        config = for_precision(bundle.precision, config or SessionConfig())
        if num_slots <= 0:
            raise ValueError("num_slots must be positive")
        self.bundle = bundle
        self.num_slots = num_slots
        self.config = config
        # only the step graphs are captured: the encoder and the state writer run with
        # host inputs of varying batch, which a CUDA graph cannot replay
        uncaptured = dataclasses.replace(config, cuda_graphs=False)
        self._encoder = _BoundGraph(bundle.graphs[ENCODER], uncaptured)
        self.provider = self._encoder.provider
        self._greedy = _BoundGraph(bundle.graphs[STEP_GREEDY], config)
        self._topk = (
            _BoundGraph(bundle.graphs[STEP_TOPK], config) if STEP_TOPK in bundle.graphs else None
        )
        self._writer = (
            _BoundGraph(bundle.graphs[STATE_WRITER], uncaptured)
            if STATE_WRITER in bundle.graphs
            else None
        )
        self._head = (
            _BoundGraph(bundle.graphs[STEP_HEAD], uncaptured)
            if STEP_HEAD in bundle.graphs
            else None
        )
        device = "cuda" if self.provider == CUDA else "cpu"
        # bucketed steps pad with rows that read and write one extra, never-owned slot
        pool_rows = num_slots + 1 if config.cuda_graphs else num_slots
        shape = [bundle.num_layers, pool_rows, bundle.hidden_size]
        # the pool's dtype is the step graph's (float16 in an fp16 bundle); every graph that
        # binds the pool must agree, or binding one buffer to all of them is wrong
        self.pool_dtype = self._greedy.input_dtype("pool")
        for graph in (self._encoder, self._topk, self._writer, self._head):
            if graph is not None and graph.input_dtype("pool") != self.pool_dtype:
                raise BundleError(
                    f"{graph.spec.path}: pool dtype {graph.input_dtype('pool')} differs from "
                    f"the step graph's {self.pool_dtype}"
                )
        # zeros, not uninitialized memory: a slot is always written before it is read, but a
        # bug would then show up as zeros rather than as garbage
        self.pool = ort.OrtValue.ortvalue_from_numpy(
            np.zeros(shape, dtype=self.pool_dtype), device, config.device_id
        )
        self._encoder.bind_pool(self.pool, ("rating",))
        self._rater = _ScratchRater(
            self._encoder, (bundle.num_layers, bundle.hidden_size), self.pool_dtype, device,
            config.device_id,
        )
        self._greedy.bind_pool(self.pool, ("next_token",))
        if self._topk is not None:
            self._topk.bind_pool(self.pool, ("next_token", "topk_logprobs", "topk_ids"))
        if self._writer is not None:
            self._writer.bind_pool(self.pool, ())
        if self._head is not None:
            self._head.bind_pool(self.pool, ("topk_logprobs", "topk_ids"), writes=False)
        self._bucketed_greedy = self._bucketed_topk = None
        if config.cuda_graphs:
            self._bucketed_greedy = self._bucketed(self._greedy, device, top_k=0)
            if self._topk is not None:
                self._bucketed_topk = self._bucketed(self._topk, device, top_k=self.top_k)
        if config.cuda_graphs and self.provider != CUDA:
            log.warning("cuda_graphs on %s: steps are padded to buckets, nothing is captured",
                        self.provider)
        log.info(
            "runner ready: provider %s, %d slots, hidden %d, sampling K=%d",
            self.provider, num_slots, bundle.hidden_size, self.top_k,
        )

    def _bucketed(self, graph: _BoundGraph, device: str, top_k: int) -> BucketedStep:
        outputs = [("next_token", (), np.int64)]
        if top_k:
            outputs += [("topk_logprobs", (top_k,), np.float32), ("topk_ids", (top_k,), np.int64)]
        return BucketedStep(
            graph.session, graph.names, self.pool,
            scratch_slot=self.num_slots, max_rows=self.num_slots, outputs=tuple(outputs),
            device=device, device_id=self.config.device_id, capture=self.provider == CUDA,
        )

    @property
    def top_k(self) -> int:
        return self.bundle.sampling_top_k if self._topk is not None else 0

    @property
    def can_write_states(self) -> bool:
        return self._writer is not None

    @property
    def head_top_k(self) -> int:
        return self.bundle.head_top_k if self._head is not None else 0

    def candidates(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The TopK candidates (log-probs (B, K) float32, ids (B, K) int64) of the states in
        `slots`, without stepping or writing anything."""
        if self._head is None:
            raise BundleError(f"{self.bundle.path}: bundle has no {STEP_HEAD} graph")
        logprobs, ids = self._head.run({"slots": _i64(slots)})
        return logprobs, ids

    def encode(self, slots: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Writes each pair's initial state into its slot; returns the ratings (B,) float32."""
        (rating,) = self._encoder.run(
            {"slots": _i64(slots), "users": _i64(users), "items": _i64(items)}
        )
        return rating

    def rate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The ratings (B,) float32 of B pairs; writes no slot (a scratch pool takes the
        states), so it may run from another thread while the decode thread steps."""
        if users.size == 0:
            return np.zeros(0, np.float32)
        return self._rater.rate(_i64(users), _i64(items))

    def write_states(self, slots: np.ndarray, states: np.ndarray) -> None:
        """Writes caller-given initial states (B, H) into slots."""
        if self._writer is None:
            raise BundleError(f"{self.bundle.path}: bundle has no state_writer graph")
        dtype = self._writer.input_dtype("states")
        states = np.ascontiguousarray(states, dtype=dtype)
        self._writer.run({"slots": _i64(slots), "states": states})

    def step(
        self,
        read_slots: np.ndarray,
        write_slots: np.ndarray,
        tokens: np.ndarray,
        want_topk: bool = False,
        topk_rows: np.ndarray | None = None,
    ) -> StepOutput:
        """One decode step for B rows: state from read_slots, new state into write_slots;
        with `topk_rows`, only those rows run the sampling graph (see split_step)."""
        if topk_rows is not None:
            return split_step(self._run_step, read_slots, write_slots, tokens, topk_rows)
        return self._run_step(read_slots, write_slots, tokens, want_topk)

    def _run_step(self, read_slots, write_slots, tokens, want_topk: bool) -> StepOutput:
        inputs = {
            "read_slots": _i64(read_slots),
            "write_slots": _i64(write_slots),
            "tokens": _i64(tokens),
        }
        if want_topk:
            if self._topk is None:
                raise BundleError(f"{self.bundle.path}: bundle has no sampling graph")
            nxt, logprobs, ids = (self._bucketed_topk or self._topk).run(inputs)
            return StepOutput(nxt, logprobs, ids)
        (nxt,) = (self._bucketed_greedy or self._greedy).run(inputs)
        return StepOutput(nxt)

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        """Copies slots' states to the host (L, B, H) in the pool's dtype: for tests and
        debugging, never per step."""
        return self.pool.numpy()[:, _i64(slots)]


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)
