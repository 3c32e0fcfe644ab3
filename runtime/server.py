"""The gRPC server: engine + servicer + health + reflection, TLS and auth, and a lifecycle.

Health is NOT_SERVING until the model is loaded and warmed up, then SERVING. On SIGTERM or
SIGINT (the Kubernetes sequence): health turns NOT_SERVING for good while the server keeps
serving for the shutdown delay (load balancers take the endpoint out meanwhile); then it
stops accepting (new calls get UNAVAILABLE at once), gives the RPCs it accepted the grace
period to finish, ends what is left with UNAVAILABLE (retryable), and exits 0 within
delay + grace. A second signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import signal
import tempfile
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from gruserve import __version__
from gruserve.inference import grpc_service_pb2 as oip_pb
from gruserve.inference import grpc_service_pb2_grpc as oip_pb_grpc
from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc

from .auth import BearerTokenInterceptor
from .bundle import Bundle, ModelInfo, load_bundle
from .config import ConfigError, ServerConfig
from .core import EngineCore
from .drain import DrainGate
from .engine import Engine
from .errors import EngineDeadError
from .metrics import ServiceMetrics
from .model_host import ModelHost, Served
from .oip_servicer import SERVICE_NAME as OIP_SERVICE_NAME
from .oip_servicer import InferenceServicer, RefusedMethods
from .reflection import enable_reflection
from .requests import DecodingParams
from .result_cache import ResultCache
from .runner import StepRunner
from .servicer import SERVICE_NAME, GeneratorServicer, MalformedRequestInterceptor
from .telemetry import RpcTelemetry
from .tls import server_credentials
from .tracing import Tracer, make_provider

log = logging.getLogger(__name__)

# the protocols served on the one port: health reports each of them (and "")
SERVICES = (SERVICE_NAME, OIP_SERVICE_NAME)
# the services whose calls the drain admits, waits for and refuses (health and reflection
# stay open until grpc's own stop)
DRAINED = (
    pb.DESCRIPTOR.services_by_name["Generator"],
    oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
)

__all__ = ["GruServer", "ServerConfig", "build_engine", "format_address", "serve_forever"]


def build_engine(bundle: Bundle, config: ServerConfig) -> Engine:
    """The engine for a bundle: ORT runner -> core -> threaded engine (not started)."""
    recommender = config.recommender
    info = ModelInfo.from_bundle(bundle)
    if recommender.unknown_entities == "fallback" and not info.has_fallbacks:
        raise ConfigError(
            "--unknown-entities",
            f"fallback needs fallback embeddings, and bundle {bundle.path} has none (export "
            "it again with this gruserve, or serve it with --unknown-entities error)",
        )
    runner = StepRunner(bundle, num_slots=config.scheduler.num_slots, config=config.session)
    return Engine(EngineCore(runner, info, config.scheduler, recommender=recommender))


def build_cache(config: ServerConfig) -> ResultCache | None:
    recommender = config.recommender
    if recommender.cache_size == 0:
        return None
    return ResultCache(recommender.cache_size, recommender.cache_max_bytes)


def _grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    max_bytes = config.service.max_message_bytes
    transport = config.transport
    age = []
    if transport.max_connection_age_s > 0:
        age = [
            ("grpc.max_connection_age_ms", max(1, round(transport.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms",
             round(transport.max_connection_age_grace_s * 1000)),
        ]
    return age + [
        # a bigger request is refused with RESOURCE_EXHAUSTED before it is parsed
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        # the server pings idle connections every 60 s (dead peers are dropped after 20 s
        # more) so NATs and load balancers keep them; clients may ping every 10 s at most,
        # even between calls, before the server answers GOAWAY (too_many_pings)
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # connections idle for 30 minutes are closed gracefully
        ("grpc.max_connection_idle_ms", 30 * 60_000),
        # grpc's default SO_REUSEPORT lets a second server bind the same port and silently
        # take half the traffic; a port in use must be a startup error instead
        ("grpc.so_reuseport", 0),
    ]


def _reflection_pool(*files) -> descriptor_pool.DescriptorPool:
    """One pool holding every served file (and its imports) for reflection: the Open
    Inference Protocol's lives in a pool of its own (see the Makefile's proto target)."""
    pool, added = descriptor_pool.DescriptorPool(), set()

    def add(file) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def format_address(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# The end of the grace period kept for closing down, so that the process exits within
# delay + grace: at most a quarter for the barrier's last refusals, a quarter for the RPCs
# cut short to answer, CORE_STOP_GRACE_S for the core's stop, then the decode threads and
# the metrics endpoint (one 50 ms poll). ~10 ms when nothing is cut short (2-core machine).
TEARDOWN_RESERVE_S = 0.25
CORE_STOP_GRACE_S = 0.05


async def _within(aw, timeout: float, interrupted: asyncio.Event | None = None) -> bool:
    """Awaits `aw` for at most `timeout` seconds, and not past `interrupted` being set;
    True if it finished in time (it is cancelled otherwise)."""
    work = asyncio.ensure_future(aw)
    waiters = {work}
    if interrupted is not None:
        waiters.add(asyncio.ensure_future(interrupted.wait()))
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return work.done() and not work.cancelled()


class GruServer:
    """One serving process: call start(), then wait() or stop()."""

    def __init__(
        self, bundle: Bundle, config: ServerConfig | None = None, *, tracer_provider=None
    ) -> None:
        """`tracer_provider`: where RPC spans go (an OpenTelemetry TracerProvider); default:
        the one --trace-exporter builds, else the global one."""
        self.config = config = config or ServerConfig()
        # checked before any session is built: a bad certificate is a quick, clear error
        self._credentials = server_credentials(config.transport)
        self.metrics = ServiceMetrics()
        self._own_provider = None
        if tracer_provider is None:
            tracer_provider = self._own_provider = make_provider(config.service.trace_exporter)
        self.telemetry = RpcTelemetry(
            self.metrics, Tracer(tracer_provider), access=config.service.access_log
        )
        self.cache = build_cache(config)
        if self.cache is not None:
            self.metrics.watch_cache(self.cache)
        self.host = ModelHost(self._served(bundle))
        self.health = health.aio.HealthServicer()
        self._serving = False  # health is SERVING (the Open Inference Protocol's ServerReady)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._watchdog: asyncio.Task | None = None
        self._retiring: set[Engine] = set()  # replaced by a reload, finishing their requests
        self._reload_lock = asyncio.Lock()
        self._gate: DrainGate | None = None
        self._barrier_dir: str | None = None  # holds the Unix socket of the drain barrier

    def _served(self, bundle: Bundle) -> Served:
        engine = build_engine(bundle, self.config)
        engine.observers.append(self.metrics.observe_step)
        return Served(bundle, engine, provider=engine.runner.provider, cache=self.cache)

    @property
    def bundle(self) -> Bundle:
        return self.host.current.bundle

    @property
    def engine(self) -> Engine:
        """The engine new requests go to."""
        return self.host.current.engine

    @property
    def provider(self) -> str:
        return self.host.current.provider

    async def start(self) -> int:
        """Binds, starts the engine, warms up, then reports SERVING; returns the bound port."""
        config, transport = self.config, self.config.transport
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        server = self._grpc_server()
        self.port = self._bind(server)
        barrier_address = self._add_barrier_port(server)
        self.engine.start()
        try:
            await server.start()
            self._server = server
            if barrier_address is not None:
                await self._gate.connect_barrier(barrier_address)
            if transport.metrics_port is not None:
                self.metrics_port = self.metrics.serve_http(
                    transport.metrics_port, transport.metrics_host
                )
            if config.lifecycle.warmup:
                await _warm_up(self.engine)
        except BaseException:
            await server.stop(None)
            await asyncio.to_thread(self.engine.stop)
            self.metrics.close()
            self._remove_barrier_dir()
            raise
        # what start-up made (sessions' metadata, vocabulary, entity maps, protobuf
        # descriptors) lives as long as the process: out of the collector's reach, a full
        # collection under load scans only what requests allocate
        gc.collect()
        gc.freeze()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.metrics.set_model(self.bundle.name, self.bundle.version)
        self.metrics.set_capacity(
            num_slots=config.scheduler.num_slots, max_queued=config.scheduler.max_queued
        )
        self._watchdog = asyncio.create_task(self._watch_engine())
        log.info(
            "gruserve %s serving %s (bundle %s) on %s (provider %s, %d slots, %s%s%s)",
            __version__, self.bundle.name, self.bundle.version,
            format_address(transport.host, self.port), self.provider, config.scheduler.num_slots,
            "TLS" if self._credentials else "plaintext",
            ", mutual TLS" if transport.tls_client_ca else "",
            ", token auth" if transport.auth_token else "",
        )
        if self.metrics_port is not None:
            log.info(
                "metrics on http://%s/metrics",
                format_address(transport.metrics_host, self.metrics_port),
            )
        return self.port

    def _grpc_server(self) -> grpc.aio.Server:
        """The gRPC server with its interceptors and every service (nothing bound yet)."""
        config, transport = self.config, self.config.transport
        # outermost first: the drain gate decides in the order grpc hands out the calls;
        # then refuse the unauthenticated before parsing anything
        self._gate = DrainGate(DRAINED, on_refused=self.telemetry.refused)
        interceptors: list[grpc.aio.ServerInterceptor] = [self._gate]
        if transport.auth_token:
            interceptors.append(
                BearerTokenInterceptor(transport.auth_token, on_denied=self.telemetry.denied)
            )
        interceptors.append(MalformedRequestInterceptor(self.telemetry, SERVICES))
        server = grpc.aio.server(interceptors=interceptors, options=_grpc_options(config))
        pb_grpc.add_GeneratorServicer_to_server(
            GeneratorServicer(
                self.host, self.telemetry, self._engine_died, service=config.service
            ),
            server,
        )
        oip_pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(
                self.host, self.telemetry, self._engine_died, service=config.service,
                is_ready=lambda: self._serving,
            ),
            server,
        )
        server.add_generic_rpc_handlers((RefusedMethods(self.telemetry),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(
            (*SERVICES, health.SERVICE_NAME), server,
            _reflection_pool(
                pb.DESCRIPTOR, oip_pb.DESCRIPTOR, health_pb2.DESCRIPTOR,
                reflection_pb2.DESCRIPTOR,
            ),
        )
        return server

    def _bind(self, server: grpc.aio.Server) -> int:
        """Binds the configured address (TLS when configured); returns the port."""
        transport = self.config.transport
        address = format_address(transport.host, transport.port)
        try:
            if self._credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
            raise OSError(f"cannot bind {address}: {exc}") from None
        if not port:
            raise OSError(f"cannot bind {address}")
        return port

    async def reload(self, bundle_path: str | Path | None = None) -> bool:
        """Loads and checks the bundle directory again beside the running one; if it
        changed, new requests go to a new engine once it is warmed up, while in-flight ones
        finish on the old, which is then stopped. A bundle that fails to load, build or warm
        up is refused with one log line and the old one keeps serving. Returns whether the
        served bundle changed."""
        path = Path(bundle_path or self.bundle.path)
        async with self._reload_lock:
            current = self.host.current
            try:
                bundle = await asyncio.to_thread(load_bundle, path)
                if bundle.version == current.version:
                    log.info("reload: %s unchanged (bundle %s)", path, bundle.version)
                    return False
                served = await asyncio.to_thread(self._served, bundle)
                served.engine.start()
                try:
                    if self.config.lifecycle.warmup:
                        await _warm_up(served.engine)
                except BaseException:
                    await asyncio.to_thread(served.engine.stop)
                    raise
            except Exception as exc:  # noqa: BLE001 - a bad bundle must not stop serving
                log.error(
                    "reload refused, still serving bundle %s: %s", current.version,
                    _one_line(exc),
                )
                return False
            old = self.host.swap(served)
            self.metrics.set_model(bundle.name, bundle.version)
            log.info("reloaded %s: bundle %s -> %s", path, old.version, bundle.version)
            self._retiring.add(old.engine)
            asyncio.create_task(self._retire(old.engine))
            return True

    async def _retire(self, engine: Engine) -> None:
        """Stops a replaced engine once its in-flight requests are done (or shutdown
        stops it first): two engines exist only while the old one drains."""
        while engine.num_in_flight and engine in self._retiring:
            await asyncio.sleep(0.02)
        if engine in self._retiring:
            self._retiring.discard(engine)
            await asyncio.to_thread(engine.stop)
            log.debug("replaced engine stopped")

    async def _watch_engine(self) -> None:
        while self.engine.healthy:
            await asyncio.sleep(0.5)
        engine = self.engine
        log.error("engine stopped serving (%s): health NOT_SERVING", engine.error)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status) -> None:
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def _engine_died(self) -> None:
        """A servicer found the engine dead: NOT_SERVING until a reload replaces it."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _add_barrier_port(self, server: grpc.aio.Server) -> str | None:
        """A private Unix socket for the drain barrier (see drain.py); returns its target.
        Plaintext and without client certificates, but in a directory (0700) that only the
        server's own user can enter, who can read its keys anyway; the token still holds."""
        self._barrier_dir = tempfile.mkdtemp(prefix="gruserve-")
        address = f"unix:{self._barrier_dir}/drain.sock"
        try:
            if server.add_insecure_port(address):
                return address
        except RuntimeError:
            pass
        # the drain still works, only without serving the calls the core held back
        log.warning("cannot bind %s: the drain will have no barrier", address)
        self._remove_barrier_dir()
        return None

    def _remove_barrier_dir(self) -> None:
        if self._barrier_dir is not None:
            shutil.rmtree(self._barrier_dir, ignore_errors=True)
            self._barrier_dir = None

    async def stop(
        self,
        grace: float | None = None,
        *,
        shutdown_delay: float | None = None,
        interrupted: asyncio.Event | None = None,
    ) -> bool:
        """The drain: health NOT_SERVING and serve as usual for `shutdown_delay` seconds;
        stop accepting (later calls: UNAVAILABLE; without a delay, health turns NOT_SERVING
        then, so that whoever reacts to it is refused); give the accepted RPCs until `grace`
        seconds later, less the end kept for closing down; end what is left with
        UNAVAILABLE; close. Done within delay + grace (grace >= 2 * TEARDOWN_RESERVE_S
        leaves room for all of it). Once `interrupted` is set, what is left of it happens
        at once. True if no RPC was cut short."""
        lifecycle = self.config.lifecycle
        grace = max(lifecycle.grace_s if grace is None else grace, 0.0)
        delay = lifecycle.shutdown_delay_s if shutdown_delay is None else shutdown_delay
        delay = max(delay, 0.0)
        loop = asyncio.get_running_loop()
        end = loop.time() + delay + grace
        if self._watchdog is not None:
            self._watchdog.cancel()
        if delay or self._server is None:
            await self._not_serving()
        drained = True
        server, self._server = self._server, None
        if server is not None:
            deadline = end - min(TEARDOWN_RESERVE_S, grace / 2)
            drained = await self._drain(server, delay, deadline, interrupted)
        # the decode threads are idle by now, or end after their step (daemon threads: the
        # wait is bounded); the metrics endpoint stops polling in the meantime
        engines, self._retiring = [self.engine, *self._retiring], set()
        await asyncio.gather(
            *(asyncio.to_thread(e.stop, max(end - loop.time(), 0.0)) for e in engines),
            asyncio.to_thread(self.metrics.close),
        )
        self._remove_barrier_dir()
        if self._own_provider is not None:
            # flushes the spans still queued for export, in what is left of the time
            await _within(
                asyncio.to_thread(self._own_provider.shutdown),
                max(end - loop.time(), CORE_STOP_GRACE_S),
            )
        log.info("stopped")
        return drained

    async def _drain(
        self,
        server: grpc.aio.Server,
        delay: float,
        deadline: float,
        interrupted: asyncio.Event | None,
    ) -> bool:
        gate, loop = self._gate, asyncio.get_running_loop()
        # serving as usual while load balancers take the endpoint out
        await _within(asyncio.sleep(delay), delay, interrupted)
        # the stop of accepting (drain.py)
        closing = asyncio.ensure_future(self._stop_accepting())
        if not await _within(asyncio.shield(closing), deadline - loop.time(), interrupted):
            # out of time: the calls still ahead of the barrier are refused as they come
            # (UNAVAILABLE), where the core's stop would end them CANCELLED
            gate.refuse_all()
            await _within(closing, TEARDOWN_RESERVE_S / 4)
        await self._not_serving()
        # every call the transport had accepted is admitted now: the core may stop taking
        # calls (GOAWAY) without losing one; the RPCs under way go on
        core_stop = asyncio.ensure_future(
            server.stop(max(deadline - loop.time(), 0.0) + TEARDOWN_RESERVE_S / 2)
        )
        drained = await _within(gate.wait_idle(), deadline - loop.time(), interrupted)
        if not drained:
            self._cut_short(gate.num_active, interrupted is not None and interrupted.is_set())
            # each RPC still running answers UNAVAILABLE now, in a few loop turns
            await _within(gate.wait_idle(), TEARDOWN_RESERVE_S / 4)
        # nothing of ours runs any more: a shorter grace ends the core's stop sooner
        # (health and reflection streams), leaving a moment for the refusals under way
        await server.stop(CORE_STOP_GRACE_S)
        await core_stop
        return drained

    async def _stop_accepting(self) -> None:
        await self._gate.close()
        await self._not_serving()
        await self._gate.flush()

    async def _not_serving(self) -> None:
        # NOT_SERVING for good: a late watchdog or servicer cannot turn it back
        self._serving = False
        await self.health.enter_graceful_shutdown()

    def _cut_short(self, num_running: int, interrupted: bool) -> None:
        if num_running:
            log.warning(
                "%s: %d RPCs still running end with UNAVAILABLE",
                "drain interrupted" if interrupted else "grace period over", num_running,
            )
        error = EngineDeadError("the server shut down before this request finished; retry it")
        # the engine a reload replaced may still be finishing requests too
        for engine in (self.engine, *self._retiring):
            engine.stop(timeout=0)  # no more steps, and no new requests
            engine.fail_unfinished(error)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def _warm_up(engine: Engine) -> None:
    """A real request through every graph (encoder, greedy and top-k steps, state writer)
    before an engine takes traffic, so the first client does not pay for it."""
    info = engine.info
    user, item = next(iter(info.users)), next(iter(info.items))
    short = DecodingParams(max_tokens=2)
    requests = [engine.make_request("warmup-greedy", short, user_id=user, item_id=item)]
    if engine.limits.sampling_top_k:
        topk = DecodingParams(max_tokens=2, return_logprobs=True)
        requests.append(engine.make_request("warmup-topk", topk, user_id=user, item_id=item))
    if engine.runner.can_write_states:
        zeros = np.zeros(info.num_layers * info.hidden_size, np.float32)
        try:
            requests.append(engine.make_request("warmup-state", short, hidden_state=zeros))
        except Exception:  # noqa: BLE001 - an optional graph must not block serving
            log.warning("raw hidden-state requests fail on this bundle", exc_info=True)
    for request in requests:  # one at a time: max_queued may be 1
        await engine.submit(request).result()
    log.debug("warm-up done")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


async def serve_forever(bundle_path: str | Path, config: ServerConfig) -> int:
    """Runs until SIGTERM/SIGINT, then drains (GruServer.stop); returns the process exit
    code: 0 after the drain, or 128 + the signal's number when a second signal ended the
    drain at once (130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by it).
    SIGHUP reloads the bundle directory (GruServer.reload).

    Prints one line, `gruserve: serving BUNDLE on HOST:PORT`, once health is SERVING: with
    --port 0 it is how a supervisor (or a test) learns the port.
    """
    bundle = load_bundle(bundle_path)
    server = GruServer(bundle, config)
    stop, interrupted = asyncio.Event(), asyncio.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []
    reloads: set[asyncio.Task] = set()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            stop.set()
        elif not interrupted.is_set():
            log.warning("%s received during the drain: stopping at once", sig.name)
            interrupted.set()

    def on_hangup() -> None:
        if not started.is_set() or stop.is_set():
            log.warning("SIGHUP ignored: the server is %s", "stopping" if stop.is_set()
                        else "still starting")
            return
        log.info("SIGHUP received: reloading %s", bundle.path)
        task = asyncio.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # installed before start(): a SIGTERM during warm-up also ends in a clean stop, and a
    # SIGHUP then is logged instead of killing the process (its default action)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await server.start()
        print(
            f"gruserve: serving {bundle.path} on "
            f"{format_address(config.transport.host, server.port)}",
            flush=True,
        )
        started.set()
        await stop.wait()
        lifecycle = config.lifecycle
        log.info(
            "%s received: draining (health NOT_SERVING, shutdown delay %.1fs, grace %.1fs)",
            received[0].name, lifecycle.shutdown_delay_s, lifecycle.grace_s,
        )
        await server.stop(interrupted=interrupted)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 128 + received[1] if interrupted.is_set() else 0
