"""Prometheus scrape: the server's gruserve_* counters before and after a run."""

from __future__ import annotations

import urllib.request

# --- Prometheus scrape -------------------------------------------------------------------------


def metrics_url(text: str) -> str:
    """'HOST:PORT' -> 'http://HOST:PORT/metrics'; full URLs pass through."""
    return text if "://" in text else f"http://{text}/metrics"


def scrape_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """The gruserve_* counters (and histogram _count/_sum) of a /metrics page, keyed
    `name{label="value",...}`. Gauges and buckets are left out: only deltas are reported."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url(url), timeout=timeout_s) as reply:  # noqa: S310
        text = reply.read().decode("utf-8")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("gruserve_"):
            continue
        for s in family.samples:
            counter = family.type == "counter" and s.name.endswith("_total")
            histogram = family.type in ("histogram", "summary") and s.name.endswith(
                ("_count", "_sum")
            )
            if counter or histogram:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in sorted(after) if after[k] != before.get(k)}
