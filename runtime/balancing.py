"""Client-side load balancing and failover: what a target names, and the gRPC service config.

A target is one of
- `HOST:PORT`: grpc's DNS resolver; every address the name resolves to gets traffic;
- several `HOST:PORT` separated by commas: resolved once, here, into one `ipv4:`/`ipv6:`
  address list (grpc Python has no resolver for a list of names, and cannot take one
  written in Python);
- a gRPC target URI, passed through as it is: `dns:///NAME:PORT` (a Kubernetes headless
  Service: grpc re-resolves it when a connection closes, so replicas that come and go are
  found), `ipv4:A:P,B:P`, `ipv6:[A]:P,[B]:P`, `unix:PATH`.

Every channel balances with `round_robin`. A list or a URI also skips replicas whose health
says NOT_SERVING (grpc watches each one's grpc.health.v1 status), so a draining replica stops
getting new calls before it stops accepting them; a single HOST:PORT talks to its server
whatever it says, as `gruserve info` must. The retrying channel also retries UNAVAILABLE:
grpc retries a call only until it is committed (its first response headers arrived), so a
unary call is retried on another replica when the one that had it dies, and a stream only
before its first message.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass

from gruserve.v1 import gruserve_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # gruserve.v1.Generator
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")

# Up to 5 attempts (grpc's ceiling) over ~1.5 s of backoff: long enough for a killed
# replica's connection to be marked down, so the next attempt goes elsewhere.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# A failed attempt spends a token, a success earns 0.1; below half of maxTokens retries
# stop, so a fleet that is down is not hammered by retries. 100 lets the ~50 calls in flight
# on a replica that dies all be retried.
RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 0.1}


def service_config(*, retry: bool, health_check: bool) -> str:
    """The channel's service config (JSON)."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    if retry:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE}, {"service": "grpc.health.v1.Health"}],
            "retryPolicy": RETRY_POLICY,
        }]
        config["retryThrottling"] = RETRY_THROTTLING
    return json.dumps(config)


def is_idempotent(request: pb.GenerateRequest) -> bool:
    """Whether sending the request again gives the same answer: greedy and beam search
    always; sampling only with a seed."""
    params = request.parameters
    return params.strategy != pb.DECODING_STRATEGY_SAMPLE or params.HasField("seed")


@dataclass(frozen=True)
class ChannelTarget:
    """What to hand grpc: the target; the authority (TLS name, :authority) to use instead
    of grpc's default for it (None: grpc's); whether it names several replicas."""

    target: str
    authority: str | None = None
    balanced: bool = False


def join_targets(targets: list[str] | tuple[str, ...]) -> str:
    """One target string from several (each may itself list several, comma-separated)."""
    if len(targets) > 1 and any(t.strip().startswith(_URI_SCHEMES) for t in targets):
        raise ValueError("--target: a gRPC target URI (dns:///..., ipv4:...) must be the only one")
    return ",".join(targets)


def channel_target(target: str) -> ChannelTarget:
    """The grpc target for a client's --target (see the module docstring)."""
    target = target.strip()
    if target.startswith(_URI_SCHEMES):
        return ChannelTarget(target, balanced=target.startswith(("dns:", "xds:")) or "," in target)
    parts = [p.strip() for p in target.split(",") if p.strip()]
    if not parts:
        raise ValueError("--target: empty")
    if len(parts) == 1:
        return ChannelTarget(parts[0])
    endpoints = [_split_host_port(p) for p in parts]
    addresses = [a for host, port in endpoints for a in _resolve(host, port)]
    families = {ipaddress.ip_address(host).version for host, _ in addresses}
    if len(families) > 1:
        raise ValueError(
            f"--target {target}: the addresses must be all IPv4 or all IPv6 "
            "(one grpc address list takes one family)"
        )
    if families == {4}:
        uri = "ipv4:" + ",".join(f"{h}:{p}" for h, p in dict.fromkeys(addresses))
    else:
        uri = "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in dict.fromkeys(addresses))
    # grpc would take the address list itself as the authority: name the first target
    # instead, so TLS verifies the server against a name its certificate can carry
    host, port = endpoints[0]
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ChannelTarget(uri, authority=authority, balanced=True)


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--target {text}: expected HOST:PORT")
    return host, int(port)


def _resolve(host: str, port: int) -> list[tuple[str, int]]:
    """IP literals as they are; a name to its IPv4 addresses (IPv6 when it has none)."""
    try:
        ipaddress.ip_address(host)
        return [(host, port)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--target {host}:{port}: cannot resolve {host}: {exc}") from None
    v4 = [(i[4][0], port) for i in infos if i[0] == socket.AF_INET]
    return v4 or [(i[4][0].split("%")[0], port) for i in infos if i[0] == socket.AF_INET6]
