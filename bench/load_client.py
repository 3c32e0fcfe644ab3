"""bench/serve.py's load client: a worker process (see bench/worker.py) that drives one
server per command with gruserve's load generator and reports a LoadTestResult.

Commands (JSON lines):
  {"cmd": "setup", "users": [...], "items": [...]}          the entities requests draw from
  {"cmd": "run", "system": "gruserve"|"naive"|"triton", "api": "unary"|"stream"|"batch",
   "target": HOST:PORT, "model": Triton model name, "workload": NAME, "seed": 0,
   "concurrency": C | "rate": R, "batch_size": N, "warmup_s": S, "duration_s": S,
   "server_pids": [...], "metrics_url": URL or null, "timeout_s": S, "stagger_s": S}
      -> {"result": LoadTestResult.to_dict(), "cpu": {server, client, others},
          "server_stats": {...}}
  {"cmd": "tokens", "system": ..., "target": ..., "model": ..., "workload": ..., "seed": 0,
   "count": N}  -> {"tokens": [[...], ...]}: requests 0..N-1, one at a time

The same script runs in the main environment (gruserve and the naive server, over
gruserve.v1) and in the Triton environment (tritonclient; gruserve's gRPC client is never
imported there: its protobuf cannot load it).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import numpy as np
from cpu import CpuWindow
from worker import serve_commands
from workloads import WORKLOADS, RequestSequence

from gruserve.runtime.loadtest import OK, LoadGenerator, LoadShape, Warmup, build_result

STATE: dict = {}


# --- gruserve.v1 (gruserve and the naive server) ------------------------------------------------


class _Mix:
    """RequestMix's interface over a RequestSequence: request(i) -> GenerateRequest."""

    def __init__(self, requests: RequestSequence) -> None:
        from gruserve.runtime.client import build_request

        self.requests = requests
        self.build = build_request

    def request(self, index: int):
        spec = self.requests.spec(index)
        return self.build(user=spec.user, item=spec.item, request_id=f"b-{index}",
                          **spec.decoding())


def _gruserve_client(cmd: dict):
    from gruserve.runtime.client import AsyncGruserveClient

    return AsyncGruserveClient(cmd["target"], timeout=cmd.get("timeout_s", 120.0))


def _gruserve_caller(client, requests: RequestSequence, cmd: dict):
    from gruserve.runtime.loadtest import GrpcBatchCaller, GrpcCaller

    if cmd["api"] == "batch":
        return GrpcBatchCaller(client, _Mix(requests), batch_size=cmd["batch_size"])
    return GrpcCaller(client, _Mix(requests), stream=cmd["api"] == "stream")


# --- Triton (KServe v2 over tritonclient) -------------------------------------------------------


def _triton_inputs(spec):
    from tritonclient.grpc import InferInput

    values = (
        ("USER", "BYTES", np.array([[spec.user.encode()]], dtype=np.object_)),
        ("ITEM", "BYTES", np.array([[spec.item.encode()]], dtype=np.object_)),
        ("MAX_TOKENS", "INT32", np.array([[spec.max_tokens]], dtype=np.int32)),
        ("TEMPERATURE", "FP32", np.array([[spec.temperature]], dtype=np.float32)),
        ("TOP_K", "INT32", np.array([[spec.decoding().get("top_k", 0)]], dtype=np.int32)),
        ("TOP_P", "FP32", np.array([[spec.decoding().get("top_p", 0.0)]], dtype=np.float32)),
        ("SEED", "INT64", np.array([[spec.seed]], dtype=np.int64)),
    )
    inputs = []
    for name, dtype, array in values:
        tensor = InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _triton_tokens(result) -> list[int]:
    return result.as_numpy("TOKENS")[0][: int(result.as_numpy("NUM_TOKENS")[0][0])].tolist()


class TritonCaller:
    """One infer call per request, as a Triton user writes it (the dynamic batcher batches)."""

    def __init__(self, client, model: str, requests: RequestSequence, timeout_s: float):
        self.client, self.model, self.requests, self.timeout_s = client, model, requests, timeout_s

    async def __call__(self, record) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            result = await self.client.infer(
                self.model, _triton_inputs(self.requests.spec(record.index)),
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            record.code = str(exc.status() or "UNKNOWN").rsplit(".", 1)[-1]
            return
        record.num_tokens = int(result.as_numpy("NUM_TOKENS")[0][0])
        record.code = OK


def _triton_client(cmd: dict):
    from tritonclient.grpc.aio import InferenceServerClient

    return InferenceServerClient(cmd["target"])


class Staggered:
    """Closed loop: worker k's first request waits stagger_s * k / C (a warm-up request, so
    the wait is in no figure). Workers that start together stay in lockstep at a fixed
    length (a continuous batcher admits and finishes them at the same steps), and a short
    window then counts whole cohorts: +-1 cohort is +-25% in a 4 s window at c=64."""

    def __init__(self, caller, concurrency: int, stagger_s: float) -> None:
        self.caller, self.concurrency, self.stagger_s = caller, concurrency, stagger_s

    async def __call__(self, record) -> None:
        if record.index < self.concurrency:
            await asyncio.sleep(self.stagger_s * record.index / self.concurrency)
        await self.caller(record)


# --- server-side counters -----------------------------------------------------------------------

_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+(\S+)$')


def _scrape(url: str | None, model: str | None) -> dict[str, float]:
    """gruserve_step_batch_size_{sum,count} or Triton's nv_inference_{count,exec_count} (for
    `model`): what rows per step / requests per batch come from."""
    if not url:
        return {}
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback
        text = reply.read().decode()
    wanted = {"gruserve_step_batch_size_sum", "gruserve_step_batch_size_count",
              "nv_inference_count", "nv_inference_exec_count"}
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in wanted:
            values[name] = float(rest)
        elif (m := _SAMPLE.match(line)) and m.group(1) in wanted:
            if model is None or f'model="{model}"' in m.group(2):
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def _server_stats(before: dict, after: dict) -> dict:
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    stats = {}
    if delta.get("gruserve_step_batch_size_count"):
        stats["rows_per_step"] = (delta["gruserve_step_batch_size_sum"]
                                  / delta["gruserve_step_batch_size_count"])
    if delta.get("nv_inference_exec_count"):
        stats["requests_per_batch"] = (delta["nv_inference_count"]
                                       / delta["nv_inference_exec_count"])
    return stats


# --- commands -----------------------------------------------------------------------------------


def _requests(cmd: dict) -> RequestSequence:
    return RequestSequence(WORKLOADS[cmd["workload"]], STATE["users"], STATE["items"],
                           seed=cmd.get("seed", 0))


def _shape(cmd: dict) -> LoadShape:
    return LoadShape(
        concurrency=cmd.get("concurrency"), rate=cmd.get("rate"),
        duration_s=cmd["duration_s"], warmup=Warmup(seconds=cmd["warmup_s"]),
        seed=cmd.get("seed", 0),
    )


async def _run(cmd: dict) -> dict:
    requests, shape = _requests(cmd), _shape(cmd)
    triton = cmd["system"] == "triton"
    client = _triton_client(cmd) if triton else _gruserve_client(cmd)
    try:
        if triton:
            caller = TritonCaller(client, cmd["model"], requests, cmd.get("timeout_s", 120.0))
        else:
            caller = _gruserve_caller(client, requests, cmd)
        if shape.concurrency and cmd.get("stagger_s"):
            caller = Staggered(caller, shape.concurrency, cmd["stagger_s"])
        url, model = cmd.get("metrics_url"), cmd.get("model")
        before = _scrape(url, model)
        started = time.monotonic()
        with CpuWindow(cmd.get("server_pids", [])) as cpu:
            run = await LoadGenerator(shape, caller).run()
        wall = time.monotonic() - started
        stats = _server_stats(before, _scrape(url, model))
    finally:
        await client.close()
    result = build_result(
        run, shape, target=cmd["target"], stream=cmd["api"] == "stream",
        batch_size=cmd.get("batch_size") if cmd["api"] == "batch" else None,
        mix=cmd["workload"], lengths=str(requests.workload.lengths),
        harness_cpu_cores=cpu.usage["client"],
    )
    return {"result": result.to_dict(), "cpu": cpu.usage, "server_stats": stats,
            "wall_s": wall}


async def _tokens(cmd: dict) -> dict:
    requests = _requests(cmd)
    specs = [requests.spec(i) for i in range(cmd["count"])]
    if cmd["system"] == "triton":
        client = _triton_client(cmd)
        try:
            out = [_triton_tokens(await client.infer(cmd["model"], _triton_inputs(s)))
                   for s in specs]
        finally:
            await client.close()
        return {"tokens": out}
    mix = _Mix(requests)
    async with _gruserve_client(cmd) as client:
        replies = [await client.generate_request(mix.request(s.index)) for s in specs]
    return {"tokens": [list(r.token_ids) for r in replies]}


def handle(cmd: dict) -> dict:
    if cmd["cmd"] == "setup":
        STATE["users"], STATE["items"] = cmd["users"], cmd["items"]
        return {"ok": True}
    if cmd["cmd"] == "run":
        return asyncio.run(_run(cmd))
    if cmd["cmd"] == "tokens":
        return asyncio.run(_tokens(cmd))
    raise ValueError(f"unknown command {cmd['cmd']!r}")


if __name__ == "__main__":
    serve_commands(handle)
