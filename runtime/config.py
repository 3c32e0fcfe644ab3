"""The serving configuration: the one place where every default lives.

`ServerConfig` nests one frozen section per layer (ORT sessions, the scheduler, the service's
limits, the transport, the process lifecycle). Each field is declared with `setting(...)`,
which gives its default, its help text and its bounds once; `gruserve serve`'s flags and the
`GRUSERVE_*` environment variables are derived from these declarations (see `cli_config`),
so adding a setting is one field here and nothing else.

Naming: a field `num_slots` is the flag `--num-slots` (unless the declaration names another
flag) and the environment variable `GRUSERVE_` + the flag upper-cased (`GRUSERVE_NUM_SLOTS`).
Field names are unique across sections, so `ServerConfig.with_overrides(num_slots=32)` needs
no section name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
ENV_PREFIX = "GRUSERVE_"
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
TRACE_EXPORTERS = ("none", "otlp", "console")


class ConfigError(ValueError):
    """A setting out of range: `flag` names it (as the command line spells it)."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


@dataclass(frozen=True)
class Setting:
    help: str
    flag: str | None = None  # default: --<field name with dashes>
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    # False: programmatic only (a secret resolved elsewhere, a test switch): no flag, no env
    cli: bool = True
    metavar: str | None = None


def setting(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(help, **kwargs)})


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["setting"].flag or "--" + f.name.replace("_", "-")


def env_of(flag: str) -> str:
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def _check_bounds(section: Any) -> None:
    """Every declared bound of a section, checked with one line naming the flag."""
    for f in dataclasses.fields(section):
        spec: Setting = f.metadata["setting"]
        value = getattr(section, f.name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every bound
            raise ConfigError(flag_of(f), f"must be a finite number, got {value}")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(
                flag_of(f), f"must be one of {', '.join(spec.choices)}, got {value!r}"
            )
        if spec.minimum is not None and value < spec.minimum:
            raise ConfigError(flag_of(f), f"must be >= {spec.minimum:g}, got {value:g}")
        if spec.maximum is not None and value > spec.maximum:
            raise ConfigError(flag_of(f), f"must be <= {spec.maximum:g}, got {value:g}")


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime sessions and the device they run on."""

    device: str = setting(
        "auto", "auto: CUDA if it works, else CPU (logged); cuda: fail if unavailable",
        choices=DEVICES,
    )
    device_id: int = setting(0, "CUDA device ordinal", minimum=0)
    # 0 lets ORT pick (one per physical core); the sessions run one after another in the
    # decode thread, so they share the cores rather than multiply threads
    intra_op_threads: int = setting(
        0, "ORT intra-op threads (0 = one per core)", flag="--threads", minimum=0
    )
    cuda_graphs: bool = setting(
        False, "capture decode steps as CUDA graphs, one per batch-size bucket (CUDA only; "
        "off by default until measured on your GPU)",
    )

    def __post_init__(self) -> None:
        _check_bounds(self)


@dataclass(frozen=True)
class SchedulerConfig:
    """The persistent batch: slots, the queue and the per-request ceilings they size."""

    # a beam request takes num_beams slots
    num_slots: int = setting(
        256, "decode slots in the device state pool = most rows per step", minimum=1
    )
    max_batch_size: int = setting(
        0, "slots in use at once, i.e. the most rows one step runs (0 = --num-slots)",
        minimum=0,
    )
    max_queued: int = setting(
        1024, "requests waiting for a slot before RESOURCE_EXHAUSTED", minimum=1
    )
    # bounds the extra latency a burst of arrivals adds to the requests already running
    max_admit_per_step: int = setting(256, "new requests encoded per step", minimum=1)
    # sizes the per-slot token buffers
    max_tokens: int = setting(
        64, "largest max_tokens a request may ask", flag="--max-tokens-limit", minimum=1
    )
    max_stop_tokens: int = setting(16, "most stop_token_ids one request may give", minimum=0)
    max_beams: int = setting(8, "largest num_beams a beam request may ask", minimum=1)
    # Greedy rows can run the ArgMax graph apart from rows that need TopK candidates
    # (sampling, beams, log-probs, min_tokens not reached) in a second graph run. TopK costs
    # ~10% of a step, but on CPU every run reads all the weights again: measured on 2 cores
    # at the reference size (bench/results/split.md), a split step took 1.51x the whole-step
    # TopK at 16 rows (8 greedy), 1.23x at 64 (32 greedy), 1.00x at 256 (128 greedy) and
    # 0.95x at 256 (224 greedy). So only a batch of mostly greedy rows is split by default.
    split_min_greedy_rows: int = setting(
        192, "greedy rows that run the cheap ArgMax graph apart from rows needing TopK "
        "candidates in the same step (fewer: the whole step runs the TopK graph; 0 = never)",
        minimum=0,
    )
    def __post_init__(self) -> None:
        _check_bounds(self)
        if self.max_batch_size > self.num_slots:
            raise ConfigError(
                "--max-batch-size",
                f"must be at most --num-slots ({self.num_slots}), got {self.max_batch_size}",
            )

    @property
    def batch_limit(self) -> int:
        return self.max_batch_size or self.num_slots


@dataclass(frozen=True)
class ServiceConfig:
    """The gRPC service itself: limits beyond what one request may ask, access log, traces."""

    max_batch_requests: int = setting(
        64, "most requests in one GenerateBatch call (and rows, i.e. generations, in one "
        "Open Inference Protocol request)", minimum=1,
    )
    # a request is a few ids; a batch of 64 with raw states stays far below the default
    max_message_bytes: int = setting(
        4 * MiB, "largest request or response message in bytes (bigger: RESOURCE_EXHAUSTED)",
        minimum=1024,
    )
    access_log: bool = setting(
        True, "one INFO line per RPC: method, status, duration, tokens, request id, peer"
    )
    trace_exporter: str = setting(
        "none", "where RPC spans go (needs the otel extra): otlp (OTEL_EXPORTER_OTLP_* say "
        "where), console, or none (the global tracer provider, if something set one)",
        choices=TRACE_EXPORTERS,
    )

    # a stream message costs the server (and its client) CPU whatever it carries: after the
    # first chunk (never held), tokens are gathered for up to this long, or until enough
    # wait. Measured at c=64 on 2 cores (reference model, steps of 15-40 ms): streaming gave
    # 0.61x unary's tokens/s with 20 ms, 0.77x with 100, 0.79x with 250; 100 ms keeps a
    # stream at 10 updates a second or more
    stream_hold_ms: float = setting(
        100.0, "after a stream's first chunk, hold later chunks up to this many ms to send "
        "more tokens per message (0: a message per decode step)", minimum=0, maximum=10_000,
    )
    stream_chunk_tokens: int = setting(
        8, "send a held stream chunk at once when this many tokens wait", minimum=1
    )

    def __post_init__(self) -> None:
        _check_bounds(self)


UNKNOWN_ENTITIES = ("error", "fallback")


@dataclass(frozen=True)
class RecommenderConfig:
    """The recommender's side: ratings for ranking, unknown ids, the result cache."""

    max_rating_pairs: int = setting(
        10_000, "most (user, item) pairs one PredictRatings call may rate", minimum=1
    )
    # one encoder run per chunk, and concurrent calls take turns by chunk: the chunk is how
    # long a small call may wait behind a big one. bench/recommender.py --quick, 2 CPU cores,
    # reference sizes, chunks of 64/256/1,024/4,096: 38k/41k/42k/28k ratings/s, and a
    # one-item call beside a stream of big calls waits 1.6/5.3/16/86 ms at p50 (a loaded
    # run: the same order, 2-5x slower). 256 is within 2% of the best throughput for a
    # third of 1,024's wait, and gives a GPU 4x more rows per run than 64
    rating_chunk_size: int = setting(
        256, "most pairs one encoder run rates (a bigger call runs in chunks, taking turns "
        "with other calls)", minimum=1,
    )
    unknown_entities: str = setting(
        "error", "an unknown user or item id: error (NOT_FOUND) or fallback (the bundle's "
        "fallback embedding, flagged in the response)", choices=UNKNOWN_ENTITIES,
    )
    # bench/recommender.py, Zipf(1.1) over the demo's 12,000 pairs: LRU hit ratio 0.896 at
    # 4,096 entries, 0.949 (all the stream can give) at 16,384, i.e. half the misses for
    # ~9 MB more (an entry is ~0.6-0.8 KB for a 15-token tip)
    cache_size: int = setting(
        16384, "answers of deterministic requests (greedy, beam, seeded sampling) kept for "
        "replay (0 = no cache)", minimum=0,
    )
    cache_max_bytes: int = setting(
        64 * MiB, "memory bound of the result cache in bytes (estimated per answer)",
        minimum=4096,
    )

    def __post_init__(self) -> None:
        _check_bounds(self)


@dataclass(frozen=True)
class TransportConfig:
    """Where the server listens and who may talk to it."""

    host: str = setting(
        "127.0.0.1", "bind address (127.0.0.1: this machine only; 0.0.0.0 for all)"
    )
    port: int = setting(
        50051, "gRPC port (0 = any free one, printed at start)", minimum=0, maximum=65535
    )
    tls_cert: str | None = setting(None, "server certificate (PEM); enables TLS with --tls-key")
    tls_key: str | None = setting(None, "server private key (PEM)")
    tls_client_ca: str | None = setting(
        None, "CA (PEM) that client certificates must chain to (mutual TLS)"
    )
    auth_token_file: str | None = setting(
        None, "require 'authorization: Bearer <token>', the token read from this file"
    )
    auth_token_env: str | None = setting(
        None, "...or from the environment variable of this name"
    )
    # the resolved token (from the file or variable above, or given by code); None: no auth
    auth_token: str | None = setting(None, "bearer token", cli=False)
    metrics_port: int | None = setting(
        None, "serve Prometheus /metrics on this port (0 = any free one; unset: no endpoint)",
        minimum=0, maximum=65535,
    )
    metrics_host: str = setting("127.0.0.1", "metrics bind address")
    # long-lived client channels re-resolve (a headless Service) only when a connection
    # closes: an age makes them find replicas added since. The grace covers the client's
    # default 30 s deadline, so no call is cut by the age.
    max_connection_age_s: float = setting(
        120.0, "close client connections after about this many seconds (grpc adds +-10%% "
        "jitter), so long-lived clients re-resolve and spread onto replicas added since; "
        "0 = never", flag="--max-connection-age", minimum=0, metavar="SECONDS",
    )
    max_connection_age_grace_s: float = setting(
        30.0, "seconds calls in flight on a connection closed for its age get to finish",
        flag="--max-connection-age-grace", minimum=0, metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        _check_bounds(self)
        if self.tls_client_ca and not (self.tls_cert and self.tls_key):
            raise ConfigError("--tls-client-ca", "needs --tls-cert and --tls-key")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert", "TLS needs both --tls-cert and --tls-key")
        if self.auth_token_file and self.auth_token_env:
            raise ConfigError(
                "--auth-token-file",
                "give the token in a file or an environment variable (--auth-token-env), "
                "not both",
            )


@dataclass(frozen=True)
class LifecycleConfig:
    """Start-up and shutdown."""

    grace_s: float = setting(
        10.0, "on SIGTERM/SIGINT, seconds the accepted requests get to finish once the "
        "server stops accepting; what is left then ends UNAVAILABLE", flag="--grace",
        minimum=0, metavar="SECONDS",
    )
    # Kubernetes removes a terminating pod's endpoint while it already runs the SIGTERM:
    # the delay covers that, so that no call arrives after the stop of accepting
    shutdown_delay_s: float = setting(
        0.0, "on SIGTERM/SIGINT, seconds to keep serving with health NOT_SERVING before the "
        "stop of accepting, while load balancers remove the endpoint; the process exits "
        "within delay + grace", flag="--shutdown-delay", minimum=0, metavar="SECONDS",
    )
    # a real request through every graph before SERVING, so the first client does not pay
    warmup: bool = setting(True, "run one request through every graph before SERVING")

    def __post_init__(self) -> None:
        _check_bounds(self)


@dataclass(frozen=True)
class LoggingConfig:
    """Logging, which every command takes.

    Not a section of ServerConfig: it configures the process before any command runs, and
    `gruserve train` logs as much as `gruserve serve`."""

    log_level: str = setting("INFO", "least severe level logged", choices=LOG_LEVELS)
    log_format: str = setting(
        "text", "text: one readable line per record; json: one JSON object per line "
        "(time, level, logger, message, and request_id, method, status, duration_ms, "
        "tokens, peer where they apply)",
        choices=LOG_FORMATS,
    )

    def __post_init__(self) -> None:
        _check_bounds(self)


_SECTIONS = {
    "session": SessionConfig,
    "scheduler": SchedulerConfig,
    "service": ServiceConfig,
    "recommender": RecommenderConfig,
    "transport": TransportConfig,
    "lifecycle": LifecycleConfig,
}


@dataclass(frozen=True)
class ServerConfig:
    session: SessionConfig = field(default_factory=SessionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)

    def with_overrides(self, **values: Any) -> ServerConfig:
        """A copy with fields replaced by name, whatever section holds them."""
        changes: dict[str, dict[str, Any]] = {}
        owners = section_of_field()
        for name, value in values.items():
            if name not in owners:
                raise TypeError(f"ServerConfig has no setting {name!r}")
            changes.setdefault(owners[name], {})[name] = value
        return dataclasses.replace(
            self,
            **{
                section: dataclasses.replace(getattr(self, section), **fields)
                for section, fields in changes.items()
            },
        )


@functools.cache
def section_of_field() -> dict[str, str]:
    """field name -> the ServerConfig section that holds it."""
    owners: dict[str, str] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"setting {f.name} declared twice"
            owners[f.name] = section
    return owners


def sections() -> dict[str, type]:
    return dict(_SECTIONS)


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The field's value type, with `X | None` unwrapped to X."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
