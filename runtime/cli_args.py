"""Command-line options shared by the client-side commands (generate, info, loadtest)."""

from __future__ import annotations

import argparse

DEFAULT_TARGET = "127.0.0.1:50051"


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", action="append", metavar="TARGET",
                   help=f"server HOST:PORT (default {DEFAULT_TARGET}); repeat it or separate "
                   "with commas for several replicas, or give a gRPC URI such as "
                   "dns:///NAME:PORT: calls are spread round-robin and idempotent ones "
                   "retried on another replica when one is UNAVAILABLE")
    g.add_argument("--tls", action="store_true",
                   help="use TLS, verifying the server against the system's CAs")
    g.add_argument("--tls-ca", help="CA certificate (PEM) to verify the server; enables TLS")
    g.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    g.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", help="expected server name in its certificate")
    g.add_argument("--token-file", help="file holding the bearer token")
    g.add_argument("--token-env", help="environment variable holding the bearer token")
    g.add_argument("--timeout", type=float, default=30.0,
                   help="RPC deadline in seconds (default %(default)s)")


def connection_from_args(args: argparse.Namespace):
    from .auth import load_token
    from .balancing import join_targets
    from .client import Connection

    return Connection(
        target=join_targets(args.target or [DEFAULT_TARGET]), root_ca=args.tls_ca,
        client_cert=args.tls_cert, client_key=args.tls_key, server_name=args.tls_server_name,
        tls=args.tls,
        token=load_token(args.token_file, args.token_env),
    )


def token_ids(text: str) -> list[int]:
    """argparse type of a comma-separated id list: its error names the bad item."""
    ids = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            ids.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a comma-separated list of token ids: {item!r} in {text!r}"
            ) from None
    return ids


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="greedy")
    g.add_argument("--max-tokens", type=int, default=0, help="0 = the model's default length")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="sampling; 0 = 1.0")
    g.add_argument("--top-k", type=int, default=0, help="sampling; 0 = all exported candidates")
    g.add_argument("--top-p", type=float, default=0.0, help="sampling; 0 = 1.0 (off)")
    g.add_argument("--seed", type=int, help="sampling seed: same request + seed -> same text")
    g.add_argument("--num-beams", type=int, default=0, help="beam search; 0 = 4")
    g.add_argument("--length-penalty", type=float, help="beam search; default 1.0")
    g.add_argument("--stop-ids", type=token_ids, default=[], metavar="ID,ID,...",
                   help="comma-separated token ids that end the text")
    g.add_argument("--logprobs", action="store_true", help="return per-token log-probs")
