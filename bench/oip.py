"""The Open Inference Protocol's cost: ModelInfer beside gruserve.v1 Generate, one server,
one run (a benchmark, not a test).

    python bench/oip.py            # ~2.5 minutes; writes bench/results/oip.md
    python bench/oip.py --quick    # ~1-minute smoke; prints the table, writes nothing

One gruserve server (a subprocess, continuous batching, 256 slots) serves both protocols on
one port. Each round runs a closed loop of C = 64 concurrent requests for a few seconds,
from a client process of its own (so the client's CPU is not the benchmark's): gruserve.v1
Generate through gruserve's asyncio client, then ModelInfer through Triton's own asyncio
client (tritonclient.grpc.aio, building its InferInput tensors per request as a user's code
does). Rounds alternate the protocols (v1, oip, oip, v1, ...) so that a drift in the
machine's background load hits both alike; the figure is the ratio of their median
tokens/s, and each round's server CPU is reported beside it.

The model is the untrained reference-size NRT that bench/serve.py builds (vocab 20004,
emb 300, hidden 400), its <eos> bias at -1e4: every request is exactly 15 greedy tokens, on
either protocol. Needs the export extra (torch, onnx) and the dev extra (tritonclient).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cpu import tree_seconds  # bench/cpu.py (scripts run from bench/)
from machine import machine_line  # bench/machine.py

HERE = Path(__file__).resolve().parent
NUM_TOKENS = 15
PROTOCOLS = ("v1", "oip")


@dataclass(frozen=True)
class Plan:
    rounds: int  # per protocol
    warmup_s: float
    duration_s: float


FULL = Plan(rounds=5, warmup_s=2.0, duration_s=8.0)
QUICK = Plan(rounds=2, warmup_s=1.0, duration_s=3.0)


# --- the client process ----------------------------------------------------------------------


async def _v1_client(target: str):
    from gruserve.runtime.client import AsyncGruserveClient

    client = AsyncGruserveClient(target, timeout=120)

    async def one(user: str, item: str) -> int:
        reply = await client.generate(user=user, item=item, max_tokens=NUM_TOKENS)
        return len(reply.token_ids)

    return client, one


async def _oip_client(target: str, model: str):
    import numpy as np
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(target)

    async def one(user: str, item: str) -> int:
        inputs = []
        for name, value in (("USER_ID", user), ("ITEM_ID", item)):
            tensor = triton.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
            inputs.append(tensor)
        result = await client.infer(
            model, inputs, parameters={"max_tokens": NUM_TOKENS}, client_timeout=120
        )
        return int(result.as_numpy("LENGTHS").sum())

    return client, one


async def closed_loop(args) -> dict:
    """C workers, each sending its next request when its last one is answered; counts what
    completes inside the measured window (after the warm-up)."""
    users, items = json.loads(Path(args.entities).read_text())
    if args.protocol == "v1":
        client, one = await _v1_client(args.target)
    else:
        client, one = await _oip_client(args.target, args.model)
    rng = random.Random(args.seed)
    start, cpu_start = time.monotonic(), time.process_time()
    begin, end = start + args.warmup_s, start + args.warmup_s + args.duration_s
    latencies: list[float] = []
    totals = {"tokens": 0, "requests": 0, "errors": 0, "all_tokens": 0}

    async def worker() -> None:
        while time.monotonic() < end:
            user, item = rng.choice(users), rng.choice(items)
            sent = time.monotonic()
            try:
                tokens = await one(user, item)
            except Exception:  # noqa: BLE001 - counted; a benchmark keeps going
                totals["errors"] += 1
                continue
            done = time.monotonic()
            totals["all_tokens"] += tokens
            if begin <= sent and done <= end:
                totals["tokens"] += tokens
                totals["requests"] += 1
                latencies.append(done - sent)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    await client.close()
    latencies.sort()
    return {
        **totals,
        # the client shares the server's cores: its own CPU (tritonclient's or ours) per
        # second of the whole run, warm-up included
        "client_cores": (time.process_time() - cpu_start) / (time.monotonic() - start),
        "tokens_per_s": totals["tokens"] / args.duration_s,
        "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="oip.py client")
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--entities", required=True, help="JSON [users, items]")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(closed_loop(args))), flush=True)
    return 0


# --- the driver -------------------------------------------------------------------------------


def parity(target: str, model: str, users, items) -> str:
    """Whether both protocols give the same tokens for the same pairs."""
    import numpy as np
    import tritonclient.grpc as triton

    from gruserve.runtime.client import GruserveClient

    pairs = list(zip(users[:8], items[:8], strict=True))
    with GruserveClient(target) as native, triton.InferenceServerClient(target) as client:
        expected = [
            list(native.generate(user=u, item=i, max_tokens=NUM_TOKENS).token_ids)
            for u, i in pairs
        ]
        inputs = []
        for name, values in (("USER_ID", users[:8]), ("ITEM_ID", items[:8])):
            tensor = triton.InferInput(name, [len(values)], "BYTES")
            tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
            inputs.append(tensor)
        result = client.infer(model, inputs, parameters={"max_tokens": NUM_TOKENS})
        tokens, lengths = result.as_numpy("TOKEN_IDS"), result.as_numpy("LENGTHS")
        got = [tokens[k, : lengths[k]].tolist() for k in range(len(pairs))]
    agree = sum(a == b for a, b in zip(expected, got, strict=True))
    return f"{agree}/{len(pairs)}"


def run_round(protocol: str, target: str, model: str, entities: Path, server_pid: int,
              plan: Plan, args, seed: int) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "client", "--protocol", protocol,
        "--target", target, "--model", model, "--entities", str(entities),
        "--concurrency", str(args.concurrency), "--warmup-s", str(plan.warmup_s),
        "--duration-s", str(plan.duration_s), "--seed", str(seed),
    ]
    cpu_s, wall = tree_seconds([server_pid]), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - wall
    if out.returncode != 0:
        raise RuntimeError(f"{protocol} client failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    server_s = tree_seconds([server_pid]) - cpu_s
    result.update(protocol=protocol, server_cores=server_s / wall,
                  # tokens of the whole client run (warm-up too) per server CPU-second
                  tokens_per_server_cpu_s=result["all_tokens"] / server_s if server_s else None)
    print(
        f"  {protocol:<4} {result['tokens_per_s']:8.0f} tok/s  p50 {result['p50_ms'] or 0:7.1f} "
        f"ms  p99 {result['p99_ms'] or 0:7.1f} ms  errors {result['errors']}  server "
        f"{result['server_cores']:.2f} cores, client {result['client_cores']:.2f}", flush=True,
    )
    return result


def render(results: list[dict], plan: Plan, meta: dict) -> str:
    def median(protocol: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["protocol"] == protocol)

    v1, oip = median("v1", "tokens_per_s"), median("oip", "tokens_per_s")
    ratio = oip / v1 if v1 else float("nan")
    cpu_ratio = median("oip", "tokens_per_server_cpu_s") / median("v1", "tokens_per_server_cpu_s")
    out = [
        "# The Open Inference Protocol vs gruserve.v1, one server",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}; {meta['platform']}",
        f"- date: {meta['date']}",
        f"- software: Python {meta['python']}, onnxruntime {meta['onnxruntime']}, grpcio "
        f"{meta['grpcio']}, tritonclient {meta['tritonclient']}",
        "- model: untrained NRT, vocab 20004, emb 300, hidden 400; greedy, "
        f"{NUM_TOKENS} tokens per request (<eos> bias -1e4)",
        f"- closed loop, concurrency {meta['concurrency']}, one client process per round on "
        f"the same machine; {plan.rounds} rounds per protocol, alternating; each "
        f"{plan.warmup_s:g} s warm-up (excluded) + {plan.duration_s:g} s measured",
        f"- same tokens on both protocols for {meta['parity']} sampled pairs",
        "",
        "| round | protocol | tokens/s | p50 ms | p99 ms | errors | server cores | client cores "
        "| tokens per server CPU-s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in enumerate(results):
        out.append(
            f"| {k // 2 + 1} | {r['protocol']} | {r['tokens_per_s']:.0f} | "
            f"{r['p50_ms'] or 0:.1f} | {r['p99_ms'] or 0:.1f} | {r['errors']} | "
            f"{r['server_cores']:.2f} | {r['client_cores']:.2f} | "
            f"{r['tokens_per_server_cpu_s'] or 0:.0f} |"
        )
    verdict = "met" if ratio >= 0.9 else "MISSED"
    out += [
        "",
        f"ModelInfer / Generate tokens/s at c={meta['concurrency']} (medians): "
        f"{oip:.0f} / {v1:.0f} = **{ratio:.2f}** (goal >= 0.90: {verdict}); per server "
        f"CPU-second: {cpu_ratio:.2f}; client cores (medians) {median('oip', 'client_cores'):.2f}"
        f" (tritonclient) vs {median('v1', 'client_cores'):.2f} (gruserve's client).",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run")
    parser.add_argument("--out", help="write the report here (default: bench/results/oip.md "
                        "for a full run, nowhere for --quick)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="gruserve --device (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads")
    parser.add_argument("--num-entities", type=int, default=1000, help="users and items each")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out_path = args.out or (None if args.quick else str(HERE / "results" / "oip.md"))

    import grpc
    import onnxruntime
    from reference_model import build_reference_model
    from serve import launched  # bench/serve.py

    from gruserve.runtime.bundle import load_bundle
    from gruserve.runtime.loadtest import read_entities

    meta = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + argv),
        "machine": machine_line(),
        "platform": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__, "concurrency": args.concurrency,
    }
    from importlib.metadata import version

    meta["tritonclient"] = version("tritonclient")
    work = Path(tempfile.mkdtemp(prefix="gruserve-oip-bench-"))
    try:
        print(f"building the reference model in {work} ...", flush=True)
        bundle = build_reference_model(work, args.num_entities, args.num_entities).bundle
        users, items = read_entities(bundle)
        entities = work / "entities.json"
        entities.write_text(json.dumps([users, items]))
        model = load_bundle(bundle).name
        cmd = [sys.executable, "-m", "gruserve.runtime", "--log-level", "WARNING", "serve",
               str(bundle), "--port", "0", "--device", args.device, "--threads",
               str(args.threads), "--num-slots", "256", "--grace", "2",
               # both protocols decode: a replayed answer would measure the cache instead
               "--cache-size", "0"]
        results = []
        with launched("gruserve", cmd, work / "server.log") as (target, pid):
            meta["parity"] = parity(target, model, users, items)
            print(f"serving {model} on {target}; parity {meta['parity']}", flush=True)
            for k in range(plan.rounds):
                order = PROTOCOLS if k % 2 == 0 else PROTOCOLS[::-1]
                for protocol in order:
                    results.append(
                        run_round(protocol, target, model, entities, pid, plan, args, seed=k)
                    )
        report = render(results, plan, meta)
        print(report)
        if out_path:
            Path(out_path).write_text(report)
            print(f"wrote {out_path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
