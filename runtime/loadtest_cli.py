"""`gruserve loadtest`: the harness on the command line (see docs/loadtest.md).

Exit status: 0 the run passed; 1 a --fail-if condition held; 2 bad arguments (including a
--fail-if that does not parse); 3 the run could not take place (server unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .cli_args import add_connection_args, add_decoding_args, connection_from_args
from .loadtest import (
    METRICS,
    LengthDistribution,
    LoadShape,
    LoadTestConfig,
    LoadTestError,
    LoadTestResult,
    ProgressSnapshot,
    Summary,
    Warmup,
    check_thresholds,
    parse_thresholds,
    read_entities,
    read_pairs,
    run_loadtest,
)

EXIT_THRESHOLD = 1
EXIT_CANNOT_RUN = 3

_EPILOG = """\
examples:
  gruserve loadtest --target 127.0.0.1:50051 --concurrency 64 --duration 30
  gruserve loadtest --rate 200 --burst 4 --duration 60 --warmup 5s --stream \\
      --entities bundles/nrt --metrics-url 127.0.0.1:9100 --json run.json
  gruserve loadtest --rate 100 --requests 2000 --fail-if "p99_ms>250,error_rate>0"
  gruserve loadtest --concurrency 4 --batch-size 16 --lengths geometric:0.15:15 \
      --entities bundles/nrt

--fail-if metrics:
""" + "\n".join(f"  {name:<22} {text}" for name, text in METRICS.items())


def add_loadtest_command(subparsers) -> None:
    p = subparsers.add_parser(
        "loadtest", help="apply load to a server and report throughput and latency",
        description="Closed loop (--concurrency) or open loop (--rate, Poisson arrivals) load "
        "against a gruserve server; prints a table, optionally JSON, and sets the exit status "
        "from --fail-if. Open-loop latency counts from each request's scheduled send time.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("load")
    loop = g.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int,
                      help="closed loop: requests in flight (default 1 without --rate)")
    loop.add_argument("--rate", type=float, help="open loop: mean requests per second")
    g.add_argument("--burst", type=float, default=1.0,
                   help="open loop: squared coefficient of variation of the gaps between "
                   "arrivals (gamma); 1 = Poisson (default), >1 bursty, 0 = evenly spaced")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float,
                        help="measured seconds after the warm-up (default 10)")
    length.add_argument("--requests", type=int, help="measured requests after the warm-up")
    g.add_argument("--warmup", default="1s",
                   help="excluded from the figures: seconds ('2s', '500ms') or a request count "
                   "('100'); default %(default)s")
    g.add_argument("--max-in-flight", type=int, default=4096,
                   help="open loop: cap on requests in flight; sends past it wait and the wait "
                   "shows as send lag and in the latency (default %(default)s)")
    g.add_argument("--load-seed", type=int, default=0,
                   help="seed of the arrival times and the request mix (default %(default)s)")

    g = p.add_argument_group("requests")
    api = g.add_mutually_exclusive_group()
    api.add_argument("--stream", action="store_true",
                     help="call GenerateStream instead of Generate")
    api.add_argument("--batch-size", type=int, metavar="N",
                     help="call GenerateBatch with N requests per call; --concurrency, --rate, "
                     "--requests and a warm-up count then count calls, the figures count "
                     "requests (each with its call's latency) and the call_* figures the calls")
    g.add_argument("--lengths", metavar="DIST",
                   help="per-request max_tokens drawn from DIST, seeded by --load-seed: "
                   "fixed:L, uniform:LO:HI (both included) or geometric:P:CAP (P(L=k) = "
                   "(1-P)^(k-1) P, draws above CAP become CAP); instead of --max-tokens")
    g.add_argument("--exact-lengths", action="store_true",
                   help="with --lengths: also set min_tokens to each length, so that no request "
                   "stops early at <eos> (those steps then run the sampling graph)")
    mix = g.add_mutually_exclusive_group()
    mix.add_argument("--pairs", help="file of 'user,item' lines, sent in file order, cycled")
    mix.add_argument("--entities",
                     help="bundle directory or entities.json: uniform random (user, item) pairs; "
                     "without --pairs or --entities, random raw hidden states are sent")
    add_decoding_args(p)
    add_connection_args(p)

    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="write the full result as JSON ('-': stdout)")
    g.add_argument("--fail-if", metavar="CONDITIONS",
                   help="comma-separated METRIC OP NUMBER, e.g. 'p99_ms>50,error_rate>0': "
                   "exit 1 if any holds (metrics listed below)")
    g.add_argument("--metrics-url",
                   help="server's Prometheus endpoint (URL or HOST:PORT): report the change of "
                   "its gruserve_* counters over the run")
    progress = g.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="live progress line on stderr (default: only on a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_loadtest)


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    """Raises ValueError (or OSError for unreadable files) on bad arguments."""
    if args.rate is None and args.burst != 1.0:
        raise ValueError("--burst applies to the open loop (--rate)")
    closed = args.rate is None
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 10.0
    shape = LoadShape(
        concurrency=(1 if args.concurrency is None else args.concurrency) if closed else None,
        rate=args.rate, burst=args.burst, duration_s=duration, num_requests=args.requests,
        warmup=Warmup.parse(args.warmup), max_in_flight=args.max_in_flight, seed=args.load_seed,
    )
    lengths = LengthDistribution.parse(args.lengths) if args.lengths else None
    if lengths is not None and args.max_tokens:
        raise ValueError("--lengths and --max-tokens both set the length: give one")
    if lengths is not None and args.min_tokens > lengths.low:
        raise ValueError(
            f"--min-tokens {args.min_tokens} exceeds the shortest length of --lengths {lengths}"
        )
    if args.exact_lengths and lengths is None:
        raise ValueError("--exact-lengths needs --lengths")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    pairs = users = items = None
    if args.pairs:
        pairs = read_pairs(args.pairs)
    elif args.entities:
        try:
            users, items = read_entities(args.entities)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{args.entities}: not a bundle or entities.json ({exc})") from None
    decoding = dict(
        strategy=args.strategy, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        stop_token_ids=args.stop_ids, return_logprobs=args.logprobs,
    )
    return LoadTestConfig(
        connection=connection_from_args(args), shape=shape, stream=args.stream,
        decoding=decoding, pairs=pairs, users=users, items=items, timeout_s=args.timeout,
        metrics_url=args.metrics_url, batch_size=args.batch_size, lengths=lengths,
        exact_lengths=args.exact_lengths,
    )


def _cmd_loadtest(args: argparse.Namespace) -> int:
    thresholds = parse_thresholds(args.fail_if) if args.fail_if else []
    config = config_from_args(args)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        result = asyncio.run(run_loadtest(config, ProgressLine(sys.stderr) if show else None))
    except LoadTestError as exc:
        print(f"gruserve loadtest: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.json == "-":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    failures = check_thresholds(result, thresholds)
    for message in failures:
        print(f"gruserve loadtest: FAIL {message}", file=sys.stderr)
    return EXIT_THRESHOLD if failures else 0


class ProgressLine:
    """One line rewritten in place on a terminal; plain lines elsewhere."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, p: ProgressSnapshot) -> None:
        p50 = f"{p.recent_p50_ms:7.1f} ms" if p.recent_p50_ms is not None else "      - ms"
        line = (
            f"[{p.elapsed_s:6.1f}s {p.phase:<9}] sent {p.num_sent:>7} ok {p.num_ok:>7} "
            f"failed {p.num_failed:>5} in flight {p.num_in_flight:>5} | "
            f"{p.recent_rps:8.1f} req/s {p.recent_tokens_per_s:9.0f} tok/s p50 {p50}"
        )
        if self.tty:
            end = "\n" if p.phase == "done" else ""
            self.stream.write("\r\x1b[2K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _row(name: str, s: Summary | None) -> str:
    if s is None:
        return f"{name:<22}{'-':>8}"
    return (
        f"{name:<22}{s.count:>8} {s.mean_ms:>9.2f} {s.p50_ms:>9.2f} {s.p90_ms:>9.2f} "
        f"{s.p99_ms:>9.2f} {s.max_ms:>9.2f}"
    )


def format_report(r: LoadTestResult) -> str:
    model = r.model
    load = (
        f"closed loop, concurrency {r.concurrency}" if r.mode == "closed"
        else f"open loop, {r.offered_rps:g} req/s offered"
        + (f" (burst {r.burst:g})" if r.burst != 1.0 else " (Poisson)")
    )
    api = "streaming" if r.stream else "unary"
    if r.batch_size:
        api = f"GenerateBatch, {r.batch_size} requests per call"
    lines = [
        f"gruserve loadtest {r.target} - {model.get('name', '?')} on "
        f"{model.get('provider', '?')}, {model.get('max_slots', '?')} slots",
        f"load        {load}, {api}, mix {r.mix}"
        + (f", lengths {r.lengths}" if r.lengths else ""),
        f"window      {r.window_s:.2f} s measured; {r.num_warmup} warm-up requests excluded"
        + (f"; harness CPU {r.harness_cpu_cores:.2f} cores" if r.harness_cpu_cores else ""),
        f"requests    {r.num_sent} sent, {r.num_succeeded} ok, {r.num_failed} failed "
        f"(error rate {r.error_rate:.3%})",
        f"throughput  {r.throughput_rps:.1f} req/s, {r.tokens_per_s:.0f} tokens/s"
        + (f" ({r.num_tokens / r.num_succeeded:.1f} tokens/request)" if r.num_succeeded else ""),
    ]
    if r.batch_size:
        lines.append(f"calls       {r.num_calls} sent, {r.calls_per_s or 0:.1f} calls/s")
    if r.mode == "open":
        lines.append(
            f"rate        offered {r.offered_rps:.1f}, scheduled {r.scheduled_rps or 0:.1f}, "
            f"achieved {r.throughput_rps:.1f} req/s (of scheduled: {r.rate_ratio:.2f})"
            + (f"; {r.num_in_flight_waits} sends waited for --max-in-flight"
               if r.num_in_flight_waits else "")
        )
    lines += [
        "",
        f"{'latency (ms)':<22}{'count':>8} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}",
        _row("end-to-end" + (" (per item)" if r.batch_size else ""), r.latency),
        _row(f"ttft ({r.ttft_source})", r.ttft),
    ]
    if r.stream:
        lines.append(_row("inter-token (stream)", r.itl))
    if r.batch_size:
        lines.append(_row("call (GenerateBatch)", r.call_latency))
    lines += [_row("server total", r.server_total), _row("server queue", r.server_queue)]
    if r.mode == "open":
        lines.append(_row("send lag", r.send_lag))
    if r.errors:
        lines += ["", "errors      " + ", ".join(f"{k} {v}" for k, v in r.errors.items())]
    if r.server_metrics is not None:
        lines += ["", "server metrics (change over the run, warm-up included)"]
        lines += [f"  {k:<60} {v:+g}" for k, v in r.server_metrics.items()]
        lines += _derived(r.server_metrics)
    return "\n".join(lines)


def _derived(deltas: dict[str, float]) -> list[str]:
    out = []
    steps = deltas.get("gruserve_step_batch_size_count")
    if steps:
        rows = deltas.get("gruserve_step_batch_size_sum", 0.0)
        out.append(f"  -> {steps:.0f} decode steps, mean {rows / steps:.1f} rows per step")
    steps = deltas.get("gruserve_step_duration_seconds_count")
    if steps:
        seconds = deltas.get("gruserve_step_duration_seconds_sum", 0.0)
        out.append(f"  -> mean step {seconds / steps * 1e3:.2f} ms")
    return out
