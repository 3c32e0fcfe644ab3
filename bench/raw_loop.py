"""bench/serve.py's ceiling: the raw ORT step loop, continuous batching with nothing around it.

A worker process (see bench/worker.py). For a point at concurrency C it keeps C rows busy:
each row decodes one request of the workload's sequence (request i is the same as every
other system's request i) and, the step after it ends, the next request is encoded into
that row's slot. No gRPC, no asyncio, no scheduler: gruserve's StepRunner and sampler only
(bench/decode_loop.py), so the gap between this and gruserve at the same concurrency is what
the serving path costs. Latency is from a request's admission to its last token; its "TTFT"
to its first; the figures go through the harness's build_result like every other system's.

Commands: {"cmd": "setup", "bundle": DIR, "threads": N, "num_slots": 256} and {"cmd": "run",
"workload": NAME, "seed": 0, "concurrency": C, "warmup_s": S, "duration_s": S,
"stagger_s": S}.
"""

from __future__ import annotations

import os
import time

import numpy as np
from cpu import CpuWindow
from decode_loop import RowParams, step_tokens
from worker import serve_commands
from workloads import WORKLOADS, RequestSequence

from gruserve.runtime.loadtest import OK, LoadRun, LoadShape, RequestRecord, Warmup, build_result

STATE: dict = {}


class ContinuousLoop:
    """C rows kept full from a RequestSequence until `end_s`, then drained."""

    def __init__(self, runner, bos: int, eos: int, requests: RequestSequence, user_index: dict,
                 item_index: dict, concurrency: int) -> None:
        self.runner, self.bos, self.eos = runner, bos, eos
        self.requests, self.user_index, self.item_index = requests, user_index, item_index
        b = concurrency
        self.slots = np.arange(b, dtype=np.int64)
        self.params = RowParams(
            users=np.zeros(b, np.int64), items=np.zeros(b, np.int64),
            lengths=np.zeros(b, np.int64), temperature=np.zeros(b, np.float32),
            top_k=np.zeros(b, np.int32), top_p=np.ones(b, np.float32),
            seeds=np.zeros(b, np.int64),
        )
        self.tokens = np.full(b, bos, np.int64)
        self.generated = np.zeros(b, np.int64)
        self.row_record: list[RequestRecord | None] = [None] * b
        self.records: list[RequestRecord] = []

    def admit(self, rows: np.ndarray, now: float, warmup: bool) -> None:
        p = self.params
        for r in rows:
            spec = self.requests.spec(len(self.records))
            decoding = spec.decoding()
            p.users[r], p.items[r] = self.user_index[spec.user], self.item_index[spec.item]
            p.lengths[r] = spec.max_tokens
            p.temperature[r] = spec.temperature
            p.top_k[r] = decoding.get("top_k", 0)
            p.top_p[r] = decoding.get("top_p", 1.0)
            p.seeds[r] = spec.seed
            record = RequestRecord(spec.index, warmup, sent_s=now)
            self.records.append(record)
            self.row_record[r] = record
        self.runner.encode(self.slots[rows], p.users[rows], p.items[rows])
        self.tokens[rows] = self.bos
        self.generated[rows] = 0

    def run(self, measure_start_s: float, end_s: float, max_requests: int | None = None,
            stagger_s: float = 0.0) -> None:
        """Admits requests until end_s (or max_requests of them), then drains the rows. Row r
        starts stagger_s * r / C after the first, as the load clients' workers do: rows that
        start together would finish together forever at a fixed length (lockstep cohorts)."""
        start = time.monotonic()
        due = start + stagger_s * np.arange(len(self.slots)) / len(self.slots)
        waiting = np.ones(len(self.slots), dtype=bool)  # not started yet
        active = np.zeros(len(self.slots), dtype=bool)
        while True:
            now = time.monotonic()
            starting = np.flatnonzero(waiting & (due <= now))
            if len(starting):
                self.admit(starting, now, warmup=now < measure_start_s)
                waiting[starting], active[starting] = False, True
            if not active.any():
                if not waiting.any():
                    return
                time.sleep(max(0.0, due[waiting].min() - now))
                continue
            self._step(np.flatnonzero(active), active, measure_start_s, end_s, max_requests)

    def _step(self, rows, active, measure_start_s, end_s, max_requests) -> None:
        nxt = step_tokens(self.runner, self.slots, self.tokens, self.params, rows,
                          self.generated[rows])
        now = time.monotonic()
        self.tokens[rows] = nxt
        for r in rows[self.generated[rows] == 0]:
            self.row_record[r].chunk_s.append(now)  # its first token
        ended = nxt == self.eos
        self.generated[rows] += ~ended
        done = rows[ended | (self.generated[rows] >= self.params.lengths[rows])]
        for r in done:
            record = self.row_record[r]
            record.done_s, record.num_tokens, record.code = now, int(self.generated[r]), OK
        room = len(done) if max_requests is None else max_requests - len(self.records)
        refill = done[:max(0, room)] if now < end_s else done[:0]
        if len(refill):
            self.admit(refill, now, warmup=now < measure_start_s)
        active[done[len(refill):]] = False


def _setup(cmd: dict) -> dict:
    from gruserve.runtime.bundle import load_bundle
    from gruserve.runtime.providers import SessionConfig
    from gruserve.runtime.runner import StepRunner

    bundle = load_bundle(cmd["bundle"])
    threads = cmd.get("threads") or os.cpu_count() or 1
    STATE.update(
        runner=StepRunner(bundle, num_slots=cmd.get("num_slots", 256),
                          config=SessionConfig(device="cpu", intra_op_threads=threads)),
        bos=bundle.special_ids["bos"], eos=bundle.special_ids["eos"],
        users=list(bundle.users), items=list(bundle.items),
        user_index={u: i for i, u in enumerate(bundle.users)},
        item_index={v: i for i, v in enumerate(bundle.items)},
    )
    return {"ok": True}


def _run(cmd: dict) -> dict:
    requests = RequestSequence(WORKLOADS[cmd["workload"]], STATE["users"], STATE["items"],
                               seed=cmd.get("seed", 0))
    loop = ContinuousLoop(STATE["runner"], STATE["bos"], STATE["eos"], requests,
                          STATE["user_index"], STATE["item_index"], cmd["concurrency"])
    shape = LoadShape(concurrency=cmd["concurrency"], duration_s=cmd["duration_s"],
                      warmup=Warmup(seconds=cmd["warmup_s"]))
    started = time.monotonic()
    measure_start = started + cmd["warmup_s"]
    with CpuWindow([]) as cpu:
        loop.run(measure_start, measure_start + cmd["duration_s"],
                 stagger_s=cmd.get("stagger_s", 0.0))
    wall = time.monotonic() - started
    result = build_result(LoadRun(loop.records, measure_start), shape, target="in-process",
                          stream=True, mix=cmd["workload"], lengths=str(requests.workload.lengths))
    result.stream, result.ttft_source = False, "in-process"
    usage = {"server": cpu.usage["client"], "client": 0.0}
    if "others" in cpu.usage:
        usage["others"] = cpu.usage["others"]
    return {"result": result.to_dict(), "cpu": usage, "server_stats": {}, "wall_s": wall}


def handle(cmd: dict) -> dict:
    if cmd["cmd"] == "setup":
        return _setup(cmd)
    if cmd["cmd"] == "run":
        return _run(cmd)
    raise ValueError(f"unknown command {cmd['cmd']!r}")


if __name__ == "__main__":
    serve_commands(handle)
