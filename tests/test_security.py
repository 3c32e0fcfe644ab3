"""TLS, mutual TLS and bearer-token auth accept the right client and refuse the wrong one;
the server binds to loopback unless told otherwise. Certificates are made here, with the
openssl command line, for this run only."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gruserve.runtime import cli
from gruserve.runtime.auth import load_token
from gruserve.runtime.cli_config import config_from_args
from gruserve.runtime.client import Connection, GruserveClient, build_request
from gruserve.runtime.config import ConfigError, TransportConfig
from gruserve.runtime.server import ServerConfig
from gruserve.runtime.tls import server_credentials

from .serving import ServerThread, running_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

TOKEN = "s3cret-token-for-tests"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d,
    )


def _make_leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """ca (trusted) signs server + client; rogue-ca signs rogue-client."""
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "server", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
               "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _make_leaf(d, "client", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogue-client", "rogue-ca",
               "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return d


@pytest.fixture(scope="module")
def pair(synthetic_bundle):
    return {"user": synthetic_bundle.users[0], "item": synthetic_bundle.items[0]}


def _refused(connection: Connection, pair, code=grpc.StatusCode.UNAVAILABLE) -> str:
    with GruserveClient(connection, timeout=5) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(**pair)
    assert info.value.code() == code
    return info.value.details()


# --- TLS ------------------------------------------------------------------------------------


def test_tls_accepts_a_client_trusting_the_ca_and_refuses_others(synthetic_bundle_dir, certs, pair):
    tls = dict(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    with running_server(synthetic_bundle_dir, **tls) as server:
        port = server.server.port
        good = Connection(f"127.0.0.1:{port}", root_ca=str(certs / "ca.pem"))
        with GruserveClient(good) as client:
            assert client.generate(**pair).token_ids
            assert [c for c in client.stream(**pair)]
            assert client.health() == "SERVING"
        # the certificate names localhost: that name works too
        by_name = Connection(
            f"127.0.0.1:{port}", root_ca=str(certs / "ca.pem"), server_name="localhost"
        )
        with GruserveClient(by_name) as client:
            assert client.generate(**pair).token_ids
        # a client that trusts another CA, and one that speaks plaintext, get nothing
        _refused(Connection(f"127.0.0.1:{port}", root_ca=str(certs / "rogue-ca.pem")), pair)
        _refused(Connection(f"127.0.0.1:{port}"), pair)


def test_tls_over_several_replicas_checks_the_first_targets_name(synthetic_bundle_dir, certs, pair):
    tls = dict(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
               metrics_port=0)
    with running_server(synthetic_bundle_dir, **tls) as a, \
            running_server(synthetic_bundle_dir, **tls) as b:
        # the certificate names localhost: the address list is verified against that name
        targets = f"localhost:{a.server.port},localhost:{b.server.port}"
        with GruserveClient(Connection(targets, root_ca=str(certs / "ca.pem"))) as client:
            for _ in range(10):
                assert client.generate(**pair, max_tokens=2).token_ids
        for replica in (a, b):
            assert replica.metrics()[
                ("gruserve_requests_total", (("code", "OK"), ("rpc", "Generate")))
            ] >= 2


def test_mutual_tls_requires_a_client_certificate_from_the_ca(synthetic_bundle_dir, certs, pair):
    mtls = dict(
        tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )
    with running_server(synthetic_bundle_dir, **mtls) as server:
        target = f"127.0.0.1:{server.server.port}"
        ca = str(certs / "ca.pem")
        good = Connection(
            target, root_ca=ca, client_cert=str(certs / "client.pem"),
            client_key=str(certs / "client.key"),
        )
        with GruserveClient(good) as client:
            assert client.generate(**pair).token_ids
            assert client.health() == "SERVING"
        _refused(Connection(target, root_ca=ca), pair)  # no client certificate
        rogue = Connection(
            target, root_ca=ca, client_cert=str(certs / "rogue-client.pem"),
            client_key=str(certs / "rogue-client.key"),
        )
        _refused(rogue, pair)  # a certificate, but not from the trusted CA


def test_tls_configuration_errors_are_startup_errors(synthetic_bundle_dir, certs):
    for config in (
        dict(tls_cert=str(certs / "server.pem")),  # no key
        dict(tls_key=str(certs / "server.key")),  # no certificate
        dict(tls_client_ca=str(certs / "ca.pem")),  # mTLS without TLS
    ):
        # refused as the configuration is built, before any socket or session exists
        with pytest.raises(ValueError, match="--tls"):
            ServerThread(synthetic_bundle_dir, **config)
    with pytest.raises(ValueError, match="client certificate"):
        Connection("x:1", client_cert=str(certs / "client.pem"))


# --- bearer token ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(synthetic_bundle_dir):
    with running_server(synthetic_bundle_dir, auth_token=TOKEN, metrics_port=0) as server:
        yield server


def test_token_auth_accepts_the_token(token_server, pair):
    with GruserveClient(Connection(token_server.target, token=TOKEN)) as client:
        assert client.generate(**pair).token_ids
        assert [c for c in client.stream(**pair)]
        assert client.generate_batch([pair, pair]).responses
        assert client.model_info().vocab_size > 0


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1], "Bearer"])
def test_token_auth_refuses_a_missing_or_wrong_token(token_server, pair, token):
    before = token_server.metrics().get(
        ("gruserve_requests_total", (("code", "UNAUTHENTICATED"), ("rpc", "Generate"))), 0
    )
    with GruserveClient(Connection(token_server.target, token=token or None)) as client:
        calls = (
            lambda: client.generate(**pair),
            lambda: list(client.stream(**pair)),
            lambda: client.generate_batch([pair]),
            lambda: client.model_info(),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # probes need no secret
        assert client.health() == "SERVING"
    after = token_server.metrics()[
        ("gruserve_requests_total", (("code", "UNAUTHENTICATED"), ("rpc", "Generate")))
    ]
    assert after == before + 1


def test_token_auth_covers_reflection(token_server):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(token_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.ServerReflectionInfo(
            iter([request]), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),)
        ))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "gruserve.v1.Generator" in names


def test_load_token(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text("  abc123  \nsecond line ignored\n")
    assert load_token(str(path), None) == "abc123"
    monkeypatch.setenv("GRUSERVE_TEST_TOKEN", " xyz \n")
    assert load_token(None, "GRUSERVE_TEST_TOKEN") == "xyz"
    assert load_token(None, None) is None
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_token(str(path), None)
    monkeypatch.setenv("GRUSERVE_TEST_TOKEN", "")
    with pytest.raises(ValueError, match="GRUSERVE_TEST_TOKEN"):
        load_token(None, "GRUSERVE_TEST_TOKEN")
    with pytest.raises(ValueError, match="not both"):
        load_token(str(path), "GRUSERVE_TEST_TOKEN")


def test_cli_speaks_mutual_tls_and_token(synthetic_bundle_dir, certs, pair, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = dict(
        tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"), auth_token=TOKEN,
    )
    with running_server(synthetic_bundle_dir, **config) as server:
        base = [
            "generate", "--user", pair["user"], "--item", pair["item"],
            "--target", f"127.0.0.1:{server.server.port}", "--tls-ca", str(certs / "ca.pem"),
            "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key"),
        ]
        assert cli.main([*base, "--token-file", str(token_file)]) == 0
        assert "tip:" in capsys.readouterr().out
        assert cli.main(base) == 1  # the right certificate but no token
        assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- where the server listens ---------------------------------------------------------------


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_binds_loopback_unless_told_otherwise(synthetic_bundle_dir):
    assert ServerConfig().transport.host == "127.0.0.1"
    assert ServerConfig().transport.metrics_host == "127.0.0.1"
    transport = config_from_args(cli.build_parser().parse_args(["serve"]), environ={}).transport
    assert (transport.host, transport.metrics_host) == ("127.0.0.1", "127.0.0.1")
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with running_server(synthetic_bundle_dir, metrics_port=0) as server:
        for port in (server.server.port, server.server.metrics_port):
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize("header", [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer   {TOKEN}"])
def test_the_bearer_scheme_is_case_insensitive(token_server, pair, header):
    """RFC 7235: auth schemes are case-insensitive (and the token may follow several
    spaces)."""
    with GruserveClient(token_server.target) as client:
        request = build_request(**pair)
        reply = client.stub.Generate(request, timeout=10, metadata=(("authorization", header),))
        assert reply.token_ids


@pytest.mark.parametrize("header", [f"Basic {TOKEN}", f"bearer{TOKEN}", "bearer wrong", TOKEN])
def test_other_schemes_and_wrong_tokens_stay_refused(token_server, pair, header):
    with GruserveClient(token_server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Generate(
                build_request(**pair), timeout=10, metadata=(("authorization", header),)
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _transport(certs: Path, **files: str) -> TransportConfig:
    paths = dict(tls_cert="server.pem", tls_key="server.key") | files
    return TransportConfig(**{k: str(certs / v) for k, v in paths.items()})


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (dict(tls_cert="garbage.pem"), "--tls-cert: {d}/garbage.pem holds no valid PEM cert"),
        (dict(tls_cert="server.key"), "--tls-cert: {d}/server.key holds no valid PEM cert"),
        (dict(tls_key="garbage.pem"), "--tls-key: {d}/garbage.pem holds no valid PEM private"),
        (dict(tls_key="client.key"),
         "--tls-key: {d}/client.key is not the key of the certificate {d}/server.pem"),
        (dict(tls_key="missing.key"), "--tls-key: cannot read {d}/missing.key: No such file"),
        (dict(tls_client_ca="garbage.pem"),
         "--tls-client-ca: {d}/garbage.pem holds no valid PEM CA certificate"),
    ],
)
def test_a_bad_certificate_or_key_is_named_with_its_file(certs, files, message):
    (certs / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(ConfigError) as info:
        server_credentials(_transport(certs, **files))
    assert str(info.value).startswith(message.format(d=certs)), str(info.value)


def test_serve_reports_a_bad_key_in_one_line(synthetic_bundle_dir, certs, capsys):
    argv = ["serve", str(synthetic_bundle_dir), "--port", "0", "--device", "cpu", "--no-warmup",
            "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "client.key")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "client.key is not the key of the certificate" in err
    assert "cannot bind" not in err


def test_a_busy_metrics_port_names_the_address(synthetic_bundle_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerThread(synthetic_bundle_dir, metrics_port=port, warmup=False).create()
        try:
            with pytest.raises(OSError) as info:
                server.call(server.server.start())
        finally:
            server.stop()
    message = str(info.value)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in message
    assert "--metrics-port" in message and "in use" in message
