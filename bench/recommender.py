"""Recommender benchmark: rating throughput, ratings beside decoding, and the result cache.

    python bench/recommender.py            # full run (~8 minutes), bench/results/recommender.md
    python bench/recommender.py --quick    # ~2-minute smoke (same tables, shorter points)

1. chunk size, in-process (Engine.rate, no gRPC), at several --rating-chunk-size values:
   the ratings/s of big calls back to back, and the latency of one-item calls made beside
   them. Calls take turns by chunk, so a small call waits for about one chunk of a big one:
   a bigger chunk buys throughput (fewer runs) with the small calls' latency.
2. PredictRatings over gRPC at 1, 100 and 1,000 items per call: calls/s, ratings/s,
   latency. Then the same rating loop (100 items per call) while the server decodes a
   closed loop of Generate at concurrency 64, and that decode loop alone: what a rating
   waits for when the decode thread is busy (ratings run on their own thread, never behind
   a step: compare with the mean step time, which a "rate between two steps" design would
   add half of on average), and what ratings cost the decoding.
3. the result cache: a Zipf(1.1) stream of (user, item) pairs over the demo corpus's pairs
   (rank = a seeded shuffle of the distinct pairs), greedy tips. The LRU hit ratio by cache
   size, simulated on a long stream; then the stream through servers with the default
   --cache-size and with 0, side by side: measured hit ratio and tokens/s, on the embedded
   demo bundle (its decoder is so small that a request costs mostly its RPC) and on the
   reference sizes (where decoding is the cost).

"Reference sizes" is an untrained NRT (emb 300, hidden 400, vocab 20004;
bench/reference_model.py, <eos> bias -1e4: every tip is 15 tokens). Servers are
subprocesses; the harness runs in this process on the same cores. Needs the export extra
(torch, onnx).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from machine import machine_line  # bench/: scripts run from there
from reference_model import build_reference_model
from serve import free_port, launched

from gruserve.runtime.client import AsyncGruserveClient, Connection
from gruserve.runtime.config import RecommenderConfig
from gruserve.runtime.loadtest import LoadShape, LoadTestConfig, Warmup, run_loadtest

HERE = Path(__file__).resolve().parent
NUM_TOKENS = 15
ZIPF_S = 1.1
PER_CALL = (1, 100, 1000)
CHUNKS = (64, 256, 1024, 4096)
CACHE_SIZES = (256, 1024, 4096, 16384, 65536)


@dataclass(frozen=True)
class Plan:
    seconds: float  # per measured point
    chunk_pairs: int  # pairs in each big call of the chunk-size section
    stream_requests: int  # requests of the measured Zipf stream, per server
    simulated_requests: int
    rounds: int  # interleaved rounds of the side-by-side comparisons


FULL = Plan(seconds=6.0, chunk_pairs=10_000, stream_requests=8000,
            simulated_requests=1_000_000, rounds=4)
QUICK = Plan(seconds=2.0, chunk_pairs=4096, stream_requests=1200,
             simulated_requests=200_000, rounds=2)


# --- 1. chunk size, in-process --------------------------------------------------------------


@dataclass
class ChunkPoint:
    chunk: int
    pairs: int = 0  # rated by the big calls
    seconds: float = 0.0
    small_ms: list[float] = field(default_factory=list)  # latencies of the one-item calls

    @property
    def ratings_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.small_ms, q)) if self.small_ms else float("nan")


async def _chunk_round(engine, big, small, seconds: float, point: ChunkPoint) -> None:
    """Big calls back to back and, beside them, one-item calls back to back."""
    end = time.monotonic() + seconds

    async def bigs():
        while time.monotonic() < end:
            t0 = time.monotonic()
            await engine.rate(big)
            point.pairs += big.num_pairs
            point.seconds += time.monotonic() - t0

    async def smalls():
        while time.monotonic() < end:
            t0 = time.perf_counter()
            await engine.rate(small)
            point.small_ms.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(bigs(), smalls())


def bench_chunks(bundle_dir: Path, plan: Plan) -> list[ChunkPoint]:
    """Per --rating-chunk-size, in-process (Engine.rate, no gRPC): the ratings/s of big calls
    back to back, and the latency of one-item calls made beside them (a small call waits
    for one chunk of a big one: the chunk is the rating thread's time slice)."""
    from gruserve.runtime.bundle import ModelInfo, load_bundle
    from gruserve.runtime.config import SchedulerConfig
    from gruserve.runtime.core import EngineCore
    from gruserve.runtime.engine import Engine
    from gruserve.runtime.requests import RatingRequest
    from gruserve.runtime.runner import StepRunner

    bundle = load_bundle(bundle_dir)
    runner = StepRunner(bundle, num_slots=1)
    info = ModelInfo.from_bundle(bundle)
    rng = np.random.default_rng(0)

    def pairs(n: int) -> RatingRequest:
        return RatingRequest("bench", rng.integers(0, len(info.users), n),
                             rng.integers(0, len(info.items), n), np.zeros(n, bool),
                             np.zeros(n, bool))

    big, small = pairs(plan.chunk_pairs), pairs(1)

    async def run() -> list[ChunkPoint]:
        engines = {}
        for chunk in CHUNKS:
            core = EngineCore(runner, info, SchedulerConfig(num_slots=1),
                              recommender=RecommenderConfig(rating_chunk_size=chunk))
            engines[chunk] = Engine(core)
            engines[chunk].start()
        points = {chunk: ChunkPoint(chunk) for chunk in CHUNKS}
        try:
            for engine in engines.values():
                await engine.rate(big)  # warm-up: grows the scratch pool, plans the shapes
            for _ in range(plan.rounds):  # interleaved, so drift in the load hits all alike
                for chunk, engine in engines.items():
                    await _chunk_round(engine, big, small, plan.seconds / 2, points[chunk])
        finally:
            for engine in engines.values():
                engine.stop()
        return list(points.values())

    rows = asyncio.run(run())
    for p in rows:
        print(f"  chunk {p.chunk:>5}: {p.ratings_per_s:>10,.0f} ratings/s; a one-item call "
              f"beside them p50 {p.pct(50):.1f} ms, p99 {p.pct(99):.1f} ms", flush=True)
    return rows


# --- 2. PredictRatings over gRPC --------------------------------------------------------------


@dataclass
class RatingPoint:
    per_call: int
    load: str
    calls: int
    seconds: float
    latencies_ms: list[float]

    @property
    def ratings_per_s(self) -> float:
        return self.calls * self.per_call / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def rating_loop(target: str, user: str, items: list[str], seconds: float,
                      load: str) -> RatingPoint:
    """One client calling PredictRatings back to back for `seconds` (after one warm-up)."""
    async with AsyncGruserveClient(target, timeout=60) as client:
        await client.predict_ratings(user=user, items=items)
        latencies = []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            t0 = time.perf_counter()
            await client.predict_ratings(user=user, items=items)
            latencies.append((time.perf_counter() - t0) * 1e3)
        return RatingPoint(len(items), load, len(latencies), time.monotonic() - start,
                           latencies)


def _decode_config(target: str, metrics_port: int, users, items, seconds: float):
    return LoadTestConfig(
        connection=Connection(target), decoding=dict(max_tokens=NUM_TOKENS),
        shape=LoadShape(concurrency=64, duration_s=seconds, warmup=Warmup(seconds=1.0)),
        users=users, items=items, timeout_s=120.0, metrics_url=f"127.0.0.1:{metrics_port}",
    )


async def bench_ratings(target: str, metrics_port: int, users, items, plan: Plan):
    idle = []
    for per_call in PER_CALL:
        point = await rating_loop(target, users[0], items[:per_call], plan.seconds, "idle")
        idle.append(point)
        print(f"  {per_call:>5} items/call idle: {point.ratings_per_s:>10,.0f} ratings/s  "
              f"p50 {point.pct(50):.2f} ms  p99 {point.pct(99):.2f} ms", flush=True)
    alone, beside, busy = [], [], []
    for _ in range(plan.rounds):  # interleaved: decoding alone, then with ratings beside it
        alone.append(await run_loadtest(_decode_config(target, metrics_port, users, items,
                                                       plan.seconds)))
        rating, decode = await asyncio.gather(
            rating_loop(target, users[0], items[:100], plan.seconds + 1.0, "decoding c=64"),
            run_loadtest(_decode_config(target, metrics_port, users, items, plan.seconds)),
        )
        beside.append(decode)
        busy.append(rating)
    busy_rating = RatingPoint(100, busy[0].load, sum(p.calls for p in busy),
                              sum(p.seconds for p in busy),
                              [x for p in busy for x in p.latencies_ms])
    decode_alone, decode_with = Decoding.of(alone), Decoding.of(beside)
    print(f"  100 items/call while decoding: p50 {busy_rating.pct(50):.2f} ms  "
          f"p99 {busy_rating.pct(99):.2f} ms; decode {decode_alone.tokens_per_s:,.0f} tok/s "
          f"alone, {decode_with.tokens_per_s:,.0f} with ratings", flush=True)
    return idle, busy_rating, decode_alone, decode_with


@dataclass(frozen=True)
class Decoding:
    """Closed-loop rounds added up: tokens over measured time, the server's step times."""

    tokens_per_s: float
    mean_step_ms: float
    hit_ratio: float = 0.0
    latencies_ms: tuple[float, ...] = ()

    @classmethod
    def of(cls, results) -> Decoding:
        tokens = sum(r.num_tokens for r in results)
        window = sum(r.window_s for r in results)
        metrics = collections.Counter()
        for r in results:
            metrics.update(r.server_metrics or {})
        steps = metrics["gruserve_step_duration_seconds_count"]
        hits, misses = metrics["gruserve_cache_hits_total"], metrics["gruserve_cache_misses_total"]
        return cls(
            tokens_per_s=tokens / window if window else 0.0,
            mean_step_ms=1e3 * metrics["gruserve_step_duration_seconds_sum"] / steps
            if steps else 0.0,
            hit_ratio=hits / (hits + misses) if hits + misses else 0.0,
            latencies_ms=tuple(r.latency.p50_ms for r in results if r.latency),
        )


# --- 3. the result cache ----------------------------------------------------------------------


def zipf_stream(pairs: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """n draws of Zipf(1.1) over the pairs ranked by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    weights = np.arange(1, len(pairs) + 1, dtype=np.float64) ** -ZIPF_S
    ranks = rng.choice(len(pairs), size=n, p=weights / weights.sum())
    return [pairs[order[r]] for r in ranks]


def lru_hit_ratio(stream: list, size: int) -> float:
    cache: collections.OrderedDict = collections.OrderedDict()
    hits = 0
    for key in stream:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits / len(stream)


def demo_pairs() -> list[tuple[str, str]]:
    from gruserve.export.demo import DEMO_SPEC
    from gruserve.export.synthetic import make_synthetic_corpus

    corpus = make_synthetic_corpus(DEMO_SPEC)
    return sorted({(r.user, r.item) for r in corpus.reviews})


async def stream_through(target: str, metrics_port: int, stream: list):
    config = LoadTestConfig(
        connection=Connection(target), decoding=dict(max_tokens=NUM_TOKENS), pairs=stream,
        shape=LoadShape(concurrency=16, num_requests=len(stream)), timeout_s=120.0,
        metrics_url=f"127.0.0.1:{metrics_port}",
    )
    return await run_loadtest(config)


async def bench_cache(servers: dict[int, tuple[str, int]], stream: list, rounds: int):
    """The stream in `rounds` consecutive slices, each slice through every server in turn
    (the order alternating), so drift in the machine's load hits them alike; the cached
    server keeps its cache across slices, as it would across time."""
    slices = np.array_split(np.arange(len(stream)), rounds)
    results: dict[int, list] = {size: [] for size in servers}
    for n, rows in enumerate(slices):
        part = [stream[i] for i in rows]
        order = list(servers) if n % 2 == 0 else list(servers)[::-1]
        for size in order:
            target, port = servers[size]
            results[size].append(await stream_through(target, port, part))
    return {size: Decoding.of(r) for size, r in results.items()}


def on_reference_entities(stream: list, pairs: list) -> list[tuple[str, str]]:
    """The stream with the demo's k-th user (item) renamed u<k> (i<k>)."""
    users = {u: f"u{k}" for k, u in enumerate(sorted({u for u, _ in pairs}))}
    items = {i: f"i{k}" for k, i in enumerate(sorted({i for _, i in pairs}))}
    return [(users[u], items[i]) for u, i in stream]


def cache_side_by_side(model: str, bundle_dir: Path, work: Path, stream: list,
                       plan: Plan) -> dict:
    """--cache-size 0 and the default, both servers up, the stream's slices interleaved."""
    with contextlib.ExitStack() as stack:
        servers = {}
        for size in (0, RecommenderConfig().cache_size):
            name = f"{model.replace(' ', '-')}-cache-{size}"
            server, port = _serve(bundle_dir, work, name, "--cache-size", str(size))
            target, _pid = stack.enter_context(server)
            servers[size] = (target, port)
        streamed = asyncio.run(bench_cache(servers, stream, plan.rounds))
    for size, d in streamed.items():
        print(f"  {model}, cache {size:>5}: hit ratio {d.hit_ratio:.3f}  "
              f"{d.tokens_per_s:,.0f} tok/s", flush=True)
    return streamed


# --- the report -------------------------------------------------------------------------------


def report(meta, plan, chunks, ratings, simulated, streamed, num_pairs) -> str:
    idle, busy, decode_alone, decode_with = ratings
    best = max(p.ratings_per_s for p in chunks)
    default = RecommenderConfig()
    out = [
        "# Recommender benchmark: ratings, ratings beside decoding, the result cache", "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}, {meta['platform']}",
        f"- date: {meta['date']}; onnxruntime {meta['onnxruntime']}, grpcio {meta['grpcio']}",
        "- sections 1-2: untrained NRT at the reference sizes (emb 300, hidden 400, vocab "
        "20004); section 3: the demo bundle", "",
        f"## 1. Rating chunk size (in-process: calls of {plan.chunk_pairs:,} pairs back to "
        "back, one-item calls beside them)", "",
        "| --rating-chunk-size | ratings/s | vs best | one-item call p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    out += [f"| {p.chunk} | {p.ratings_per_s:,.0f} | {p.ratings_per_s / best:.2f} | "
            f"{p.pct(50):.1f} | {p.pct(99):.1f} |" for p in chunks]
    out += ["", "## 2. PredictRatings over gRPC (one client, back to back)", "",
            "| items per call | server | calls | ratings/s | p50 ms | p99 ms |",
            "|---:|---|---:|---:|---:|---:|"]
    for p in [*idle, busy]:
        out.append(f"| {p.per_call} | {p.load} | {p.calls} | {p.ratings_per_s:,.0f} | "
                   f"{p.pct(50):.2f} | {p.pct(99):.2f} |")
    out += [
        "",
        f"Decoding (Generate, closed loop c=64, greedy {NUM_TOKENS} tokens): "
        f"{decode_alone.tokens_per_s:,.0f} tokens/s alone, {decode_with.tokens_per_s:,.0f} "
        f"with the rating loop beside it ({decode_with.tokens_per_s / max(decode_alone.tokens_per_s, 1e-9):.2f}x); "  # noqa: E501
        f"mean step {decode_alone.mean_step_ms:.2f} ms alone, "
        f"{decode_with.mean_step_ms:.2f} ms with ratings.", "",
        f"## 3. Result cache: Zipf({ZIPF_S}) over the demo's {num_pairs:,} pairs", "",
        f"LRU hit ratio by size, simulated on {plan.simulated_requests:,} requests:", "",
        "| --cache-size | hit ratio |", "|---:|---:|",
    ]
    out += [f"| {s} | {h:.3f} |" for s, h in simulated]
    out += ["", f"Measured: {plan.stream_requests:,} greedy requests of one stream through each "
            f"server (closed loop c=16, in {plan.rounds} interleaved slices; the cache starts "
            "cold):", "",
            "| model | --cache-size | hit ratio | tokens/s | vs no cache | p50 ms per slice |",
            "|---|---:|---:|---:|---:|---|"]
    for model, by_size in streamed.items():
        off = by_size[0].tokens_per_s
        for size, d in by_size.items():
            p50s = ", ".join(f"{x:.1f}" for x in d.latencies_ms)
            out.append(f"| {model} | {size} | {d.hit_ratio:.3f} | {d.tokens_per_s:,.0f} | "
                       f"{d.tokens_per_s / off:.2f}x | {p50s} |")
    out += ["", f"Defaults: --rating-chunk-size {default.rating_chunk_size}, "
            f"--cache-size {default.cache_size}.", ""]
    return "\n".join(out)


def machine_meta() -> dict:
    import grpc
    import onnxruntime

    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_line(), "platform": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__,
    }


def _serve(bundle: Path, work: Path, name: str, *extra: str):
    port = free_port()
    cmd = [sys.executable, "-m", "gruserve.runtime", "--log-level", "WARNING", "serve",
           str(bundle), "--port", "0", "--device", "cpu", "--metrics-port", str(port), *extra]
    return launched(name, cmd, work / f"{name}.log"), port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2-minute smoke run")
    parser.add_argument("--out", default=str(HERE / "results" / "recommender.md"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary model dir")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    meta = machine_meta()
    work = Path(tempfile.mkdtemp(prefix="gruserve-bench-rec-"))
    try:
        print(f"building the reference model in {work} ...", flush=True)
        bundle = build_reference_model(work, 1000, 1000).bundle
        users, items = [f"u{i}" for i in range(1000)], [f"i{i}" for i in range(1000)]
        print("1. rating chunk size (in-process)", flush=True)
        chunks = bench_chunks(bundle, plan)
        print("2. PredictRatings over gRPC", flush=True)
        server, port = _serve(bundle, work, "reference", "--cache-size", "0")
        with server as (target, _pid):
            ratings = asyncio.run(bench_ratings(target, port, users, items, plan))
        print("3. result cache", flush=True)
        from gruserve.runtime.demo import demo_bundle_dir

        demo = demo_bundle_dir()
        pairs = demo_pairs()
        long_stream = zipf_stream(pairs, plan.simulated_requests, seed=1)
        simulated = [(s, lru_hit_ratio(long_stream, s)) for s in CACHE_SIZES]
        for size, ratio in simulated:
            print(f"  simulated LRU {size:>6}: hit ratio {ratio:.3f}", flush=True)
        stream = zipf_stream(pairs, plan.stream_requests, seed=2)
        streamed = {}
        # the demo model (its decoder is tiny: RPC-bound), then the same stream on the
        # reference sizes (decode-bound), the demo's users and items as u<k> and i<k>
        for model, bundle_dir, model_stream in (
            ("demo bundle", demo, stream),
            ("reference sizes", bundle, on_reference_entities(stream, pairs)),
        ):
            streamed[model] = cache_side_by_side(model, bundle_dir, work, model_stream, plan)
        text = report(meta, plan, chunks, ratings, simulated, streamed, len(pairs))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    finally:
        if not args.keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
