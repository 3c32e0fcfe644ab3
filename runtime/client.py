"""A small Python client for gruserve (sync and asyncio), used by `gruserve generate` and
the load-test harness.

    with GruserveClient("127.0.0.1:50051") as client:
        reply = client.generate(user="u1", item="i7", max_tokens=15)
        print(reply.predicted_rating, reply.text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc

STRATEGIES = {
    "greedy": pb.DECODING_STRATEGY_GREEDY,
    "sample": pb.DECODING_STRATEGY_SAMPLE,
    "beam": pb.DECODING_STRATEGY_BEAM,
}


@dataclass(frozen=True)
class Connection:
    """Where and how to connect: TLS when a CA (or client cert) is given, token if set."""

    target: str
    root_ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    token: str | None = None
    # override the TLS server name (e.g. a certificate made for "localhost")
    server_name: str | None = None

    @property
    def secure(self) -> bool:
        return bool(self.root_ca or self.client_cert)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_ca),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def options(self) -> list:
        opts = [("grpc.max_receive_message_length", 16 << 20)]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

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


class GruserveClient:
    """Blocking client. Methods take build_request's keyword arguments."""

    def __init__(self, target: str | Connection, timeout: float | None = 30.0) -> None:
        self.connection = target if isinstance(target, Connection) else Connection(target)
        c = self.connection
        self.channel = (
            grpc.secure_channel(c.target, c.credentials(), options=c.options())
            if c.secure
            else grpc.insecure_channel(c.target, options=c.options())
        )
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> GruserveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.connection.metadata()}

    def generate(self, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(**kwargs), **self._kw(timeout))

    def stream(self, timeout: float | None = None, **kwargs) -> Iterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(build_request(**kwargs), **self._kw(timeout))

    def generate_batch(
        self, requests: Sequence[pb.GenerateRequest], timeout: float | None = None
    ) -> pb.GenerateBatchResponse:
        return self.stub.GenerateBatch(
            pb.GenerateBatchRequest(requests=list(requests)), **self._kw(timeout)
        )

    def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        reply = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class AsyncGruserveClient:
    """asyncio client with the same methods; create and use it inside a running loop."""

    def __init__(self, target: str | Connection, timeout: float | None = 30.0) -> None:
        self.connection = target if isinstance(target, Connection) else Connection(target)
        c = self.connection
        self.channel = (
            grpc.aio.secure_channel(c.target, c.credentials(), options=c.options())
            if c.secure
            else grpc.aio.insecure_channel(c.target, options=c.options())
        )
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncGruserveClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.connection.metadata()}

    async def generate(self, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return await self.stub.Generate(build_request(**kwargs), **self._kw(timeout))

    async def generate_request(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> pb.GenerateResponse:
        return await self.stub.Generate(request, **self._kw(timeout))

    def stream_request(
        self, request: pb.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(request, **self._kw(timeout))

    def stream(self, timeout: float | None = None, **kwargs) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self.stub.GenerateStream(build_request(**kwargs), **self._kw(timeout))

    async def generate_batch(
        self, requests: Sequence[pb.GenerateRequest], timeout: float | None = None
    ) -> pb.GenerateBatchResponse:
        return await self.stub.GenerateBatch(
            pb.GenerateBatchRequest(requests=list(requests)), **self._kw(timeout)
        )

    async def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        reply = await self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
