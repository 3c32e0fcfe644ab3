"""The whole run: connect, check the server, apply the load, build the result."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc

from ..client import AsyncGruserveClient, Connection
from .generator import LoadGenerator, ProgressSnapshot
from .mix import GrpcCaller, RequestMix
from .result import LoadTestResult, build_result
from .scrape import metric_deltas, scrape_metrics
from .shape import LoadShape

log = logging.getLogger(__name__)


class LoadTestError(RuntimeError):
    """The run could not take place (server unreachable, nothing measured)."""


# --- the whole run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTestConfig:
    connection: Connection
    shape: LoadShape
    stream: bool = False
    decoding: dict = field(default_factory=dict)  # build_request keyword arguments
    pairs: Sequence[tuple[str, str]] | None = None
    users: Sequence[str] | None = None
    items: Sequence[str] | None = None
    timeout_s: float = 30.0  # per-RPC deadline
    metrics_url: str | None = None


async def run_loadtest(
    config: LoadTestConfig, progress: Callable[[ProgressSnapshot], None] | None = None
) -> LoadTestResult:
    """Connects, checks the server answers GetModelInfo, applies the load, builds the result."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    target = config.connection.target
    async with AsyncGruserveClient(config.connection, timeout=config.timeout_s) as client:
        try:
            info = await client.model_info(timeout=min(config.timeout_s, 10.0))
        except grpc.aio.AioRpcError as exc:
            raise LoadTestError(
                f"{target}: GetModelInfo failed: {exc.code().name}: {exc.details()}"
            ) from None
        mix = RequestMix(
            config.decoding, pairs=config.pairs, users=config.users, items=config.items,
            state_size=info.num_layers * info.hidden_size or info.hidden_size,
            seed=config.shape.seed,
        )
        before = await _scrape(config.metrics_url)
        caller = GrpcCaller(client, mix, stream=config.stream)
        cpu0, wall0 = time.process_time(), time.monotonic()
        run = await LoadGenerator(config.shape, caller).run(progress)
        harness_cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        after = await _scrape(config.metrics_url)
    if not run.measured:
        raise LoadTestError("no request was measured (the warm-up took the whole run?)")
    deltas = metric_deltas(before, after) if before is not None and after is not None else None
    return build_result(
        run, config.shape, target=target, stream=config.stream, mix=mix.kind,
        decoding=dict(config.decoding), server_metrics=deltas, started_at=started_at,
        harness_cpu_cores=harness_cpu,
        model={
            "name": info.model_name, "provider": info.provider, "max_slots": info.max_slots,
            "vocab_size": info.vocab_size, "hidden_size": info.hidden_size,
        },
    )


async def _scrape(url: str | None) -> dict[str, float] | None:
    if not url:
        return None
    try:
        return await asyncio.to_thread(scrape_metrics, url)
    except (OSError, ValueError) as exc:
        log.warning("metrics scrape of %s failed: %s", url, exc)
        return None
