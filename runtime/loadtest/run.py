"""The whole run: connect, check the server, apply the load, build the result."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from ..client import AsyncGruserveClient, Connection
from .generator import LoadGenerator, ProgressSnapshot
from .lengths import LengthDistribution
from .mix import GrpcBatchCaller, GrpcCaller, RequestMix
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
    # GenerateBatch with this many requests per call (the shape then counts calls)
    batch_size: int | None = None
    lengths: LengthDistribution | None = None  # per-request max_tokens
    exact_lengths: bool = False  # ... and min_tokens, so that nothing stops early

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.batch_size is not None and self.stream:
            raise ValueError("--batch-size (GenerateBatch) and --stream exclude each other")
        if self.exact_lengths and self.lengths is None:
            raise ValueError("--exact-lengths needs --lengths")


async def run_loadtest(
    config: LoadTestConfig, progress: Callable[[ProgressSnapshot], None] | None = None
) -> LoadTestResult:
    """Connects, checks the server answers GetModelInfo, applies the load, builds the result."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    target = config.connection.target
    async with AsyncGruserveClient(config.connection, timeout=config.timeout_s) as client:
        try:
            info = await client.model_info(timeout=min(config.timeout_s, 10.0))
        except grpc.aio.AioRpcError as exc:
            raise LoadTestError(
                f"{target}: GetModelInfo failed: {exc.code().name}: {exc.details()}"
            ) from None
        if config.batch_size and config.batch_size > info.max_batch_requests:
            raise LoadTestError(
                f"--batch-size {config.batch_size} exceeds the server's max_batch_requests "
                f"({info.max_batch_requests})"
            )
        mix = RequestMix(
            config.decoding, pairs=config.pairs, users=config.users, items=config.items,
            state_size=info.num_layers * info.hidden_size or info.hidden_size,
            seed=config.shape.seed, lengths=config.lengths, exact_lengths=config.exact_lengths,
        )
        before = await _scrape(config.metrics_url)
        if config.batch_size:
            caller = GrpcBatchCaller(client, mix, batch_size=config.batch_size)
        else:
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
        batch_size=config.batch_size, lengths=str(config.lengths or ""),
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
