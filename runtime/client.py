"""A small Python client for gruserve (sync and asyncio), used by `gruserve generate` and
the load-test harness.

    with GruserveClient("127.0.0.1:50051") as client:
        reply = client.generate(user="u1", item="i7", max_tokens=15)
        print(reply.predicted_rating, reply.text)

    async with AsyncGruserveClient("127.0.0.1:50051") as client:
        async for chunk in client.stream(user="u1", item="i7", strategy="sample", seed=3):
            print(chunk.text, end="")

    with GruserveClient("127.0.0.1:50051") as client:  # rank, then explain the best
        for ranked in client.rank_and_explain("u1", candidate_items, top=5):
            print(ranked.item_id, ranked.rating, ranked.explanation.text)

A target may name several replicas (`"10.0.0.5:50051,10.0.0.6:50051"`, or
`"dns:///gruserve-headless:50051"` for a Kubernetes headless Service): calls are spread
round-robin, and an idempotent call (greedy, beam, seeded sampling) that meets UNAVAILABLE
is retried on another replica (see balancing.py).

Errors arrive as grpc.RpcError (sync) / grpc.aio.AioRpcError (async) with .code() and
.details(); see docs/api.md for what each status code means.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc

from .balancing import channel_target, is_idempotent, join_targets, service_config

STRATEGIES = {
    "greedy": pb.DECODING_STRATEGY_GREEDY,
    "sample": pb.DECODING_STRATEGY_SAMPLE,
    "beam": pb.DECODING_STRATEGY_BEAM,
}


@dataclass(frozen=True)
class Connection:
    """Where and how to connect.

    `target`: HOST:PORT, several of them separated by commas, or a gRPC target URI such as
    dns:///NAME:PORT (see balancing.py). TLS when `tls` is set (system CAs) or a CA or
    client certificate is given; mutual TLS with client_cert + client_key;
    `authorization: Bearer <token>` on every call if token.
    """

    target: str
    root_ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    token: str | None = None
    # override the TLS server name (e.g. a certificate made for "localhost")
    server_name: str | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("mutual TLS needs both a client certificate and its key")

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.root_ca or self.client_cert)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_ca),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def options(self, *, retry: bool = True) -> list:
        """Channel options; `retry`: the service config retries UNAVAILABLE."""
        where = channel_target(self.target)
        opts = [
            ("grpc.service_config", service_config(retry=retry, health_check=where.balanced)),
            ("grpc.max_receive_message_length", 16 << 20),
            # a ping every 60 s on a busy connection finds a dead server; the server allows
            # one every 10 s, so this never earns a GOAWAY (too_many_pings)
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if where.authority:
            opts.append(("grpc.default_authority", where.authority))
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def channel(self, *, retry: bool = True) -> grpc.Channel:
        target, options = channel_target(self.target).target, self.options(retry=retry)
        if self.secure:
            return grpc.secure_channel(target, self.credentials(), options=options)
        return grpc.insecure_channel(target, options=options)

    def aio_channel(self, *, retry: bool = True) -> grpc.aio.Channel:
        target, options = channel_target(self.target).target, self.options(retry=retry)
        if self.secure:
            return grpc.aio.secure_channel(target, self.credentials(), options=options)
        return grpc.aio.insecure_channel(target, options=options)

    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def build_request(
    *,
    user: str | None = None,
    item: str | None = None,
    hidden_state: Sequence[float] | None = None,
    request_id: str = "",
    strategy: str = "greedy",
    max_tokens: int = 0,
    min_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    num_beams: int = 0,
    length_penalty: float | None = None,
    stop_token_ids: Sequence[int] = (),
    return_logprobs: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest from plain arguments; zeros mean the server's defaults."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    params = pb.DecodingParameters(
        strategy=STRATEGIES[strategy], max_tokens=max_tokens, min_tokens=min_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
        stop_token_ids=list(stop_token_ids), return_logprobs=return_logprobs,
    )
    if seed is not None:
        params.seed = seed
    if length_penalty is not None:
        params.length_penalty = length_penalty
    request = pb.GenerateRequest(request_id=request_id, parameters=params)
    if hidden_state is not None:
        request.hidden_state.values.extend(hidden_state)
    else:
        request.user_item.user_id = user or ""
        request.user_item.item_id = item or ""
    return request


def as_request(request: pb.GenerateRequest | Mapping[str, Any]) -> pb.GenerateRequest:
    """A GenerateRequest, or build_request's keyword arguments as a dict."""
    if isinstance(request, pb.GenerateRequest):
        return request
    return build_request(**request)


def build_ratings_request(
    *,
    user: str | None = None,
    items: Sequence[str] = (),
    pairs: Sequence[tuple[str, str]] = (),
    top_k: int = 0,
    request_id: str = "",
) -> pb.PredictRatingsRequest:
    """A PredictRatingsRequest: one user and its candidate items, or (user, item) pairs."""
    return pb.PredictRatingsRequest(
        request_id=request_id, user_id=user or "", item_ids=list(items),
        pairs=[pb.UserItem(user_id=u, item_id=i) for u, i in pairs], top_k=top_k,
    )


@dataclass(frozen=True)
class RankedItem:
    """One of the top items for a user: its predicted rating and its explanation."""

    item_id: str
    rating: float
    explanation: pb.GenerateResponse
    user_fallback: bool = False  # the user (item) was unknown: rated on the fallback
    item_fallback: bool = False


def _top_requests(user: str, ratings: pb.PredictRatingsResponse, decoding: dict) -> list:
    return [build_request(user=user, item=item, **decoding) for item in ratings.item_ids]


def _ranked(ratings: pb.PredictRatingsResponse, explanations: list) -> list[RankedItem]:
    n = len(ratings.item_ids)
    # the fallback flags are sent only when some pair used a fallback
    user_fallback = list(ratings.user_fallback) or [False] * n
    item_fallback = list(ratings.item_fallback) or [False] * n
    return [
        RankedItem(ratings.item_ids[i], ratings.ratings[i], explanations[i],
                   user_fallback=user_fallback[i], item_fallback=item_fallback[i])
        for i in range(n)
    ]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _status_name(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def as_connection(target: str | Sequence[str] | Connection) -> Connection:
    """A Connection from one target, several (joined), or a Connection."""
    if isinstance(target, Connection):
        return target
    return Connection(target if isinstance(target, str) else join_targets(list(target)))


class _StubChoice:
    """The channels of both clients (blocking, asyncio: `_open` says which kind).

    `stub` retries UNAVAILABLE; a call that must not be sent twice (sampling without a
    seed: a second attempt may have been computed and its answer lost) goes through a
    second channel that never retries, opened on first use."""

    connection: Connection
    stub: pb_grpc.GeneratorStub
    _once_channel = None
    _once_stub: pb_grpc.GeneratorStub | None = None

    def __init__(
        self, target: str | Sequence[str] | Connection, timeout: float | None = 30.0
    ) -> None:
        self.connection = as_connection(target)
        self.channel = self._open(retry=True)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def _open(self, *, retry: bool):
        raise NotImplementedError

    def _stub_for(self, *requests: pb.GenerateRequest) -> pb_grpc.GeneratorStub:
        if all(is_idempotent(r) for r in requests):
            return self.stub
        if self._once_stub is None:
            self._once_channel = self._open(retry=False)
            self._once_stub = pb_grpc.GeneratorStub(self._once_channel)
        return self._once_stub


class GruserveClient(_StubChoice):
    """Blocking client. Methods take build_request's keyword arguments."""

    def _open(self, *, retry: bool) -> grpc.Channel:
        return self.connection.channel(retry=retry)

    def __enter__(self) -> GruserveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()
        if self._once_channel is not None:
            self._once_channel.close()

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.connection.metadata()}

    def generate(self, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        """Generate; kwargs are build_request's."""
        return self.generate_request(build_request(**kwargs), timeout)

    def generate_request(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> pb.GenerateResponse:
        return self._stub_for(request).Generate(request, **self._kw(timeout))

    def stream(self, timeout: float | None = None, **kwargs) -> Iterator[pb.GenerateStreamResponse]:
        """GenerateStream; iterate the result for chunks, call .cancel() on it to stop."""
        return self.stream_request(build_request(**kwargs), timeout)

    def stream_request(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> Iterator[pb.GenerateStreamResponse]:
        return self._stub_for(request).GenerateStream(request, **self._kw(timeout))

    def generate_batch(
        self,
        requests: Sequence[pb.GenerateRequest | Mapping[str, Any]],
        timeout: float | None = None,
    ) -> pb.GenerateBatchResponse:
        """GenerateBatch; each item a GenerateRequest or a dict of build_request's kwargs."""
        batch = pb.GenerateBatchRequest(requests=[as_request(r) for r in requests])
        return self._stub_for(*batch.requests).GenerateBatch(batch, **self._kw(timeout))

    def predict_ratings(self, timeout: float | None = None, **kwargs) -> pb.PredictRatingsResponse:
        """PredictRatings; kwargs are build_ratings_request's (user + items, or pairs)."""
        return self.stub.PredictRatings(build_ratings_request(**kwargs), **self._kw(timeout))

    def rank_and_explain(
        self, user: str, items: Sequence[str], top: int = 5, timeout: float | None = None,
        **decoding,
    ) -> list[RankedItem]:
        """Rates the candidate items for the user, keeps the `top` best and explains them
        with GenerateBatch (in calls of the server's max_batch_requests); best first.
        `decoding` takes build_request's decoding arguments (strategy, max_tokens, ...)."""
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        ratings = self.predict_ratings(user=user, items=items, top_k=top, timeout=timeout)
        requests = _top_requests(user, ratings, decoding)
        limit = self.model_info(timeout).max_batch_requests or len(requests)
        explanations = [
            response
            for chunk in _chunks(requests, limit)
            for response in self.generate_batch(chunk, timeout).responses
        ]
        return _ranked(ratings, explanations)

    def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... (health needs no token)."""
        reply = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return _status_name(reply)

    def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Blocks until health is SERVING; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(service, timeout=max(0.1, deadline - time.monotonic())) == "SERVING":
                    return
            except grpc.RpcError:
                pass  # not up yet
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.connection.target} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)


class AsyncGruserveClient(_StubChoice):
    """asyncio client with the same methods; create and use it inside a running loop."""

    def _open(self, *, retry: bool) -> grpc.aio.Channel:
        return self.connection.aio_channel(retry=retry)

    async def __aenter__(self) -> AsyncGruserveClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()
        if self._once_channel is not None:
            await self._once_channel.close()

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.connection.metadata()}

    async def generate(self, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return await self.generate_request(build_request(**kwargs), timeout)

    async def generate_request(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> pb.GenerateResponse:
        return await self._stub_for(request).Generate(request, **self._kw(timeout))

    def stream(
        self, timeout: float | None = None, **kwargs
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """`async for` over the result; call .cancel() on it to stop."""
        return self.stream_request(build_request(**kwargs), timeout)

    def stream_request(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._stub_for(request).GenerateStream(request, **self._kw(timeout))

    async def generate_batch(
        self,
        requests: Sequence[pb.GenerateRequest | Mapping[str, Any]],
        timeout: float | None = None,
    ) -> pb.GenerateBatchResponse:
        batch = pb.GenerateBatchRequest(requests=[as_request(r) for r in requests])
        return await self._stub_for(*batch.requests).GenerateBatch(batch, **self._kw(timeout))

    async def predict_ratings(
        self, timeout: float | None = None, **kwargs
    ) -> pb.PredictRatingsResponse:
        return await self.stub.PredictRatings(
            build_ratings_request(**kwargs), **self._kw(timeout)
        )

    async def rank_and_explain(
        self, user: str, items: Sequence[str], top: int = 5, timeout: float | None = None,
        **decoding,
    ) -> list[RankedItem]:
        """As GruserveClient.rank_and_explain; the GenerateBatch calls run concurrently."""
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        ratings = await self.predict_ratings(user=user, items=items, top_k=top, timeout=timeout)
        requests = _top_requests(user, ratings, decoding)
        limit = (await self.model_info(timeout)).max_batch_requests or len(requests)
        batches = await asyncio.gather(
            *(self.generate_batch(chunk, timeout) for chunk in _chunks(requests, limit))
        )
        return _ranked(ratings, [r for batch in batches for r in batch.responses])

    async def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        reply = await self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return _status_name(reply)

    async def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                remaining = max(0.1, deadline - time.monotonic())
                if await self.health(service, timeout=remaining) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.connection.target} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.1)
