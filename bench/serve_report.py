"""bench/serve.py's report: points (one per round) -> rows (medians over rounds) -> markdown."""

from __future__ import annotations

import statistics
from collections import defaultdict

# figures a row reports as the median over rounds
FIGURES = ("tokens_per_s", "rps", "p50_ms", "p90_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms",
           "server_total_p50_ms", "call_p50_ms", "scheduled_rps", "offered_rps",
           "server_cpu_cores", "client_cpu_cores", "others_cpu_cores", "rows_per_step",
           "requests_per_batch")
VARIABLE = ("uniform-greedy", "geometric-greedy")


def _key(p: dict) -> tuple:
    return (p["system"], p["workload"], p["load"], p["concurrency"], p["fraction"])


def aggregate(points: list[dict]) -> list[dict]:
    """One row per system, workload, load and concurrency (open loop: fraction)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[_key(p)].append(p)
    rows = []
    for group in groups.values():
        ok = [p for p in group if "error" not in p]
        first = group[0]
        row = {k: first[k] for k in ("system", "server", "api", "workload", "load",
                                     "concurrency", "fraction")}
        if not ok:
            row["error"] = first["error"]
            rows.append(row)
            continue
        for name in FIGURES:
            values = [p[name] for p in ok if p.get(name) is not None]
            row[name] = statistics.median(values) if values else None
        row["ttft_source"] = ok[0].get("ttft_source")
        row["batch_size"] = ok[0].get("batch_size")
        row["num_sent"] = sum(p["num_sent"] for p in ok)
        row["num_failed"] = sum(p["num_failed"] for p in ok)
        errors: dict[str, int] = defaultdict(int)
        for p in ok:
            for code, n in p["errors"].items():
                errors[code] += n
        row["errors"] = dict(errors)
        row["rounds_tokens_per_s"] = [round(p["tokens_per_s"], 1) for p in ok]
        rows.append(row)
    return rows


def find(rows: list[dict], system: str, workload: str, concurrency: int) -> dict | None:
    for r in rows:
        if (r["system"], r["workload"], r["load"], r["concurrency"]) == (
            system, workload, "closed", concurrency
        ) and "error" not in r:
            return r
    return None


def _num(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b.get("tokens_per_s"):
        return None
    return a["tokens_per_s"] / b["tokens_per_s"]


def _vs(row: dict | None, gruserve: dict | None) -> str:
    if row is None:
        return "-"
    r = _ratio(gruserve, row)
    return f"{row['tokens_per_s']:,.0f}" + (f" ({r:.2f}x)" if r else "")


def headline(rows: list[dict]) -> list[str]:
    """gruserve (unary) against each other system, workload by workload, closed loop."""
    out = [
        "| workload | c | gruserve unary | triton plain (gruserve / it) | triton compacting "
        "| naive | raw ORT loop | stream / unary | batch / unary |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["workload"], r["concurrency"]) for r in rows if r["load"] == "closed"},
                  key=lambda k: (_order(k[0]), k[1]))
    for workload, c in keys:
        g = find(rows, "gruserve-unary", workload, c)

        def sys_row(name, w=workload, cc=c):
            return find(rows, name, w, cc)

        stream = _ratio(sys_row("gruserve-stream"), g)
        batch = _ratio(sys_row("gruserve-batch"), g)
        raw = sys_row("raw")
        raw_text = "-" if raw is None else (
            f"{raw['tokens_per_s']:,.0f}"
            + (f" (gruserve {_ratio(g, raw):.2f}x of it)" if g else "")
        )
        out.append(
            f"| {workload} | {c} | {_num(g and g['tokens_per_s'], ',.0f')} | "
            f"{_vs(sys_row('triton-plain'), g)} | {_vs(sys_row('triton-compact'), g)} | "
            f"{_vs(sys_row('naive'), g)} | {raw_text} | "
            f"{_num(stream, '.2f')} | {_num(batch, '.2f')} |"
        )
    return out


def _order(workload: str) -> int:
    from workloads import WORKLOADS

    names = list(WORKLOADS)
    return names.index(workload) if workload in names else len(names)


def goals(rows: list[dict]) -> list[str]:
    """Issue 19's goals, each with its measured figure (benchmarks, not tests)."""
    out = ["| goal | target | measured | verdict |", "|---|---|---|---|"]

    def add(goal, target, measured, ok):
        out.append(f"| {goal} | {target} | {measured} | {'met' if ok else 'NOT MET'} |")

    for workload in VARIABLE:
        for c, target in ((64, 1.5), (1, 1.2)):
            g = find(rows, "gruserve-unary", workload, c)
            t = find(rows, "triton-compact", workload, c)
            r = _ratio(g, t)
            if r is None:
                continue
            measured = f"{g['tokens_per_s']:,.0f} / {t['tokens_per_s']:,.0f} = {r:.2f}x"
            ok = r >= target
            if c == 64:
                measured += f"; p99 {_num(g['p99_ms'])} vs {_num(t['p99_ms'])} ms"
                ok = ok and (g["p99_ms"] or 0) <= (t["p99_ms"] or 0)
            add(f"{workload}, c={c}: gruserve vs Triton compacting", f">= {target}x"
                + (", p99 no higher" if c == 64 else ""), measured, ok)
    for workload in ("fixed15-greedy", *VARIABLE):
        g, raw = find(rows, "gruserve-unary", workload, 64), find(rows, "raw", workload, 64)
        if (r := _ratio(g, raw)) is not None:
            add(f"{workload}, c=64: gruserve unary vs the raw step loop", ">= 0.85x",
                f"{r:.2f}x", r >= 0.85)
        one = find(rows, "gruserve-unary", workload, 1)
        if one and one.get("server_total_p50_ms") is not None and one.get("p50_ms") is not None:
            gap = one["p50_ms"] - one["server_total_p50_ms"]
            add(f"{workload}, c=1: p50 vs the engine's own time (server total_ms p50)",
                "<= +1 ms", f"{one['p50_ms']:.2f} - {one['server_total_p50_ms']:.2f} = "
                f"{gap:+.2f} ms", gap <= 1.0)
        s = find(rows, "gruserve-stream", workload, 64)
        if (r := _ratio(s, g)) is not None:
            add(f"{workload}, c=64: streaming vs unary tokens/s", ">= 0.9x",
                f"{r:.2f}x; stream TTFT p50 {_num(s['ttft_p50_ms'])} ms", r >= 0.9)
    return out


def _cores(r: dict) -> str:
    text = f"{_num(r.get('server_cpu_cores'), '.2f')} / {_num(r.get('client_cpu_cores'), '.2f')}"
    return text + f" / {_num(r.get('others_cpu_cores'), '.2f')}"


def _batching(r: dict) -> str:
    if r.get("rows_per_step") is not None:
        return f"{r['rows_per_step']:.1f} rows/step"
    if r.get("requests_per_batch") is not None:
        return f"{r['requests_per_batch']:.1f} req/batch"
    return "-"


def detail(rows: list[dict], workload: str) -> list[str]:
    out = [
        "| system | load | tokens/s | req/s | p50 ms | p99 ms | TTFT p50 | TTFT p99 "
        "| cores: server / client / others | batching | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["workload"] != workload:
            continue
        load = (f"c={r['concurrency']}" if r["load"] == "closed"
                else f"open {r.get('offered_rps') or 0:.0f}/s ({r['fraction']:.0%})")
        if "error" in r:
            out.append(f"| {r['system']} | {load} | failed: {r['error']} |" + " |" * 8)
            continue
        ttft = "" if r.get("ttft_source") in (None, "client") else f" ({r['ttft_source']})"
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        out.append(
            f"| {r['system']} | {load} | {r['tokens_per_s']:,.0f} | {r['rps']:.1f} | "
            f"{_num(r['p50_ms'])} | {_num(r['p99_ms'])} | {_num(r['ttft_p50_ms'])}{ttft} | "
            f"{_num(r['ttft_p99_ms'])} | {_cores(r)} | {_batching(r)} | {errors} |"
        )
    return out


def render(meta: dict, rows: list[dict]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    plan = meta["plan"]
    others = [r["others_cpu_cores"] for r in rows if r.get("others_cpu_cores") is not None]
    m = meta["model"]
    out = [
        "# Serving benchmark: gruserve, Triton (PyTriton) peers, naive PyTorch, raw ORT loop",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}; {meta['platform']}",
        f"- date: {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min",
        f"- software: {versions}",
        f"- model: untrained NRT, vocab {m['ntoken']}, emb {m['emsize']}, hidden "
        f"{m['hidden_size']}; <eos> bias -1e4, so every request generates exactly its "
        "max_tokens",
        f"- points: {plan['warmup_s']:g} s warm-up (excluded) + {plan['duration_s']:g} s "
        f"measured, {plan['rounds']} round(s) (medians), systems interleaved point by point; "
        f"GenerateBatch up to {plan['batch_size']} per call; Triton max_queue_delay "
        f"{plan['triton_queue_delay_us']} us, {plan['triton_instances']} instance(s) per model; "
        f"{plan['threads']} ORT/torch threads per server (per Triton instance)",
        "- tokens/s: useful tokens of the requests completed in the window; latency: end to "
        "end at the client (open loop: from the scheduled time); TTFT: at the client when "
        "streaming, else as the server reports it (unary Triton: none)",
        "- cores: the server's process tree / the client process / everything else on the "
        "machine during the point"
        + (f" (others: {min(others):.2f} to {max(others):.2f})" if others else ""),
        "",
        "Workloads:",
        "",
        *[f"- `{w}`: {text}" for w, text in meta["workloads"].items()],
        "",
        "Same model, same tokens (requests 0..7 of uniform-mixed, against gruserve):",
        "",
        *[f"- {name}: {text}" for name, text in meta["parity"].items()],
        "",
        "## Useful tokens/s, closed loop (ratios: gruserve unary / the other)",
        "",
        *headline(rows),
        "",
        "## Goals (issue 19)",
        "",
        *goals(rows),
        "",
    ]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    for w in sorted(workloads, key=_order):
        out += [f"## {w}", "", *detail(rows, w), ""]
    return "\n".join(out)
