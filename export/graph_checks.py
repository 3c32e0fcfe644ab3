"""CUDA-graph readiness of the served graphs.

ORT can capture a session as a CUDA graph (`enable_cuda_graph`) only when every run launches
the same kernels on the same buffers: no control flow, no shape decided by host data, and
every node on the CUDA provider (a CPU node means a device->host copy mid-graph). Two checks:

- `cuda_graph_blockers(model)`: structural, needs no GPU, run by `verify` on every graph.
  It flags If/Loop/Scan (anywhere, subgraphs included), ops whose output shape depends on
  data (NonZero, Unique, ...), and any graph input that reaches a shape-like operand
  (Reshape/Expand/Tile shape, Slice bounds, TopK's K, an RNN's sequence_lens, ...) through
  any chain of nodes. The ids inputs (slots, tokens) are data: they feed Gather / ScatterND
  indices only, which is allowed.
- `cuda_placement(path, ...)`: on a CUDA session, confirms every executed node ran on the
  CUDA provider. It uses ORT's profiler, not the session option
  "session.disable_cpu_ep_fallback": the option only makes session creation fail with a
  generic message, while the profile lists each kernel with the provider that actually ran
  it, so a failure can name the node. The profile reflects ORT's real partitioning after its
  own optimisations (fused nodes, CPU-preferred shape nodes, inserted Memcpy nodes).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
# output shape depends on the values, not the shapes, of the inputs
DATA_DEPENDENT_SHAPE = frozenset(
    {"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit"}
)
# op -> operand positions that are read on the host as a shape, size, axis list or count
SHAPE_OPERANDS: Mapping[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4), "TopK": (1,), "Range": (0, 1, 2), "OneHot": (1,),
    "Pad": (1, 3), "Resize": (1, 2, 3), "Upsample": (1,), "Split": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "CenterCropPad": (1,),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
    "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
    "GRU": (4,), "LSTM": (4,), "RNN": (4,),  # sequence_lens
}
# their outputs describe a tensor's shape, never its values: host data stops there
SHAPE_ONLY = frozenset({"Shape", "Size"})


def _walk(graph: onnx.GraphProto):
    """Every node of the graph and of its subgraphs (If branches, Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _walk(sub)


def cuda_graph_blockers(model: onnx.ModelProto | str | Path) -> list[str]:
    """What would stop CUDA-graph capture of this graph; empty when it is ready."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    problems = []
    for node in _walk(graph):
        if node.op_type in CONTROL_FLOW:
            problems.append(f"node '{node.name}' is {node.op_type} (control flow)")
        elif node.op_type in DATA_DEPENDENT_SHAPE:
            problems.append(f"node '{node.name}' is {node.op_type} (output shape depends on data)")

    initializers = {t.name for t in graph.initializer}
    # tensors whose values derive from a graph input (host data), propagated in graph order
    from_host = {i.name: i.name for i in graph.input if i.name not in initializers}
    for node in graph.node:  # topologically sorted, as the ONNX checker requires
        if node.op_type in SHAPE_ONLY:
            continue
        for position in SHAPE_OPERANDS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in from_host:
                source = from_host[node.input[position]]
                problems.append(
                    f"node '{node.name}' ({node.op_type}) takes operand {position} "
                    f"from host input '{source}' (a shape decided on the host)"
                )
        sources = [from_host[i] for i in node.input if i in from_host]
        if sources:
            for out in node.output:
                from_host[out] = sources[0]
    return problems


@dataclass
class PlacementReport:
    provider: str
    # node name -> provider, for every kernel the profile saw
    nodes: dict[str, str] = field(default_factory=dict)

    @property
    def elsewhere(self) -> dict[str, str]:
        return {n: p for n, p in self.nodes.items() if p != self.provider}

    @property
    def ok(self) -> bool:
        return bool(self.nodes) and not self.elsewhere

    def describe(self) -> str:
        if not self.nodes:
            return "the profile recorded no node (nothing ran?)"
        if self.ok:
            return f"all {len(self.nodes)} nodes ran on {self.provider}"
        shown = ", ".join(f"{n} on {p}" for n, p in sorted(self.elsewhere.items())[:8])
        return f"{len(self.elsewhere)} of {len(self.nodes)} nodes not on {self.provider}: {shown}"


def cuda_placement(
    path: str | Path,
    inputs: Mapping[str, np.ndarray],
    providers: list | None = None,
    expected: str = "CUDAExecutionProvider",
) -> PlacementReport:
    """Runs the graph once with profiling on and reports where each node ran.

    `providers` defaults to CUDA then CPU (what the runtime asks for), so a node ORT had to
    leave on the CPU shows up as such instead of failing session creation."""
    import onnxruntime as ort

    providers = providers or [expected, "CPUExecutionProvider"]
    with tempfile.TemporaryDirectory(prefix="gruserve-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "placement")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=providers)
        session.run(None, dict(inputs))
        profile = Path(session.end_profiling())
        events = json.loads(profile.read_text(encoding="utf-8"))
    report = PlacementReport(provider=expected)
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args:
            name = str(event.get("name", "")).removesuffix("_kernel_time")
            name = name.removesuffix("_fence_before").removesuffix("_fence_after")
            report.nodes[name] = str(args["provider"])
    return report
