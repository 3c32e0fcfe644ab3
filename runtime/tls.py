"""TLS server credentials from the configured PEM files, each checked first.

grpc reads the files only when the port is bound and then says no more than "cannot bind";
Python's ssl module parses them the same way (OpenSSL) and says which one is wrong, so
every file is loaded there first and a bad one is a ConfigError naming its flag and path.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from .config import ConfigError, TransportConfig


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc.strerror or exc}") from None


def _check_certificates(flag: str, path: str, what: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ConfigError(flag, f"{path} holds no valid PEM {what}") from None


def _check_key(cert: str, key: str) -> None:
    try:
        # a password callback that gives none: an encrypted key fails instead of prompting
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                "--tls-key", f"{key} is not the key of the certificate {cert}"
            ) from None
        raise ConfigError(
            "--tls-key", f"{key} holds no valid PEM private key (an encrypted key is not "
            "supported: decrypt it, e.g. with openssl pkey)",
        ) from None


def server_credentials(config: TransportConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured files (the config checked they come in pairs);
    raises ConfigError naming the flag and the file that is unreadable or invalid."""
    if not config.tls_cert:
        return None
    cert = _read("--tls-cert", config.tls_cert)
    key = _read("--tls-key", config.tls_key)
    _check_certificates("--tls-cert", config.tls_cert, "certificate")
    _check_key(config.tls_cert, config.tls_key)
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read("--tls-client-ca", config.tls_client_ca)
        _check_certificates("--tls-client-ca", config.tls_client_ca, "CA certificate")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
