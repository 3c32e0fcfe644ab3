"""`gruserve` command line: serve, generate, info (runtime) and train, export, verify,
evaluate (the export extra). Runtime commands never import torch."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from .bundle import BundleError
from .providers import DEVICES, DeviceError

log = logging.getLogger("gruserve")


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", default="127.0.0.1:50051",
                   help="server HOST:PORT (default %(default)s)")
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
    from .client import Connection

    return Connection(
        target=args.target, root_ca=args.tls_ca, client_cert=args.tls_cert,
        client_key=args.tls_key, server_name=args.tls_server_name, tls=args.tls,
        token=load_token(args.token_file, args.token_env),
    )


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--stop-ids", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="comma-separated token ids that end the text")
    g.add_argument("--logprobs", action="store_true", help="return per-token log-probs")


def _cmd_serve(args: argparse.Namespace) -> int:
    from .auth import load_token
    from .server import ServerConfig, serve_forever

    bundle = args.bundle
    if bundle is None:
        from .demo import ensure_demo_bundle

        bundle = ensure_demo_bundle()
    config = ServerConfig(
        host=args.host, port=args.port, device=args.device, num_slots=args.num_slots,
        max_queued=args.max_queued, max_tokens=args.max_tokens_limit,
        max_batch_requests=args.max_batch_requests, intra_op_threads=args.threads,
        cuda_graphs=args.cuda_graphs, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token=load_token(args.auth_token_file, args.auth_token_env), grace_s=args.grace,
    )
    return asyncio.run(serve_forever(bundle, config))


def _parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .client import GruserveClient

    hidden = None
    if args.hidden_state:
        hidden = _parse_floats(args.hidden_state, "--hidden-state")
    elif not (args.user and args.item):
        raise SystemExit("gruserve generate: give --user and --item, or --hidden-state")
    request = dict(
        user=args.user, item=args.item, hidden_state=hidden, request_id=args.request_id,
        strategy=args.strategy, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        stop_token_ids=args.stop_ids, return_logprobs=args.logprobs,
    )
    try:
        with GruserveClient(connection_from_args(args), timeout=args.timeout) as client:
            if args.stream:
                return _print_stream(client.stream(**request), as_json=args.json)
            reply = client.generate(**request)
    except grpc.RpcError as exc:
        print(f"gruserve generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(reply), indent=2))
        return 0
    if reply.HasField("predicted_rating"):
        print(f"rating: {reply.predicted_rating:.2f}")
    print(f"tip:    {reply.text}")
    if reply.token_logprobs:
        print("logprobs: " + " ".join(f"{x:.3f}" for x in reply.token_logprobs))
    print(_summary(len(reply.token_ids), reply.finish_reason, reply.timing))
    return 0


def _print_stream(chunks, *, as_json: bool) -> int:
    """Prints chunks as they come (text, or one JSON object per line)."""
    from google.protobuf.json_format import MessageToDict

    num_tokens, logprobs, last = 0, [], None
    for chunk in chunks:
        last = chunk
        if as_json:
            print(json.dumps(MessageToDict(chunk)), flush=True)
            continue
        if chunk.HasField("predicted_rating"):
            print(f"rating: {chunk.predicted_rating:.2f}", flush=True)
            print("tip:    ", end="")
        print(chunk.text, end="", flush=True)
        num_tokens += len(chunk.token_ids)
        logprobs.extend(chunk.token_logprobs)
    if not as_json:
        print()
        if logprobs:
            print("logprobs: " + " ".join(f"{x:.3f}" for x in logprobs))
        if last is not None:
            print(_summary(num_tokens, last.finish_reason, last.timing))
    return 0


def _summary(num_tokens: int, finish_reason: int, timing) -> str:
    return (
        f"({num_tokens} tokens, finished by {_finish_name(finish_reason)}, "
        f"first token after {timing.ttft_ms:.1f} ms, {timing.total_ms:.1f} ms in the server)"
    )


def _finish_name(value: int) -> str:
    from gruserve.v1 import gruserve_pb2 as pb

    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _cmd_info(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .client import GruserveClient

    try:
        with GruserveClient(connection_from_args(args), timeout=args.timeout) as client:
            info = client.model_info()
            status = client.health()
    except grpc.RpcError as exc:
        print(f"gruserve info: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    fields = MessageToDict(info, always_print_fields_with_no_presence=True)
    print(json.dumps({"health": status, **fields}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gruserve",
        description="Train, export and serve GRU text decoders (NRT review tips) with ONNX "
        "Runtime.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve", help="serve a model bundle over gRPC",
        description="Serve a bundle over gRPC (health, reflection, optional TLS/auth/metrics). "
        "Without BUNDLE, serves the built-in demo model, training it on first use.",
    )
    p.add_argument("bundle", nargs="?", help="bundle directory (default: the built-in demo bundle)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default %(default)s: this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051,
                   help="gRPC port (default %(default)s; 0 = any free one, printed at start)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA if it works, else CPU (logged); cuda: fail if unavailable")
    p.add_argument("--num-slots", type=int, default=256,
                   help="decode slots = most rows per step (default %(default)s)")
    p.add_argument("--max-queued", type=int, default=1024,
                   help="waiting requests before RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=64,
                   help="largest max_tokens a request may ask (default %(default)s)")
    p.add_argument("--max-batch-requests", type=int, default=64,
                   help="most requests in one GenerateBatch call (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = one per core)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture decode steps as CUDA graphs, one per batch-size bucket "
                   "(CUDA only; off by default until measured on your GPU)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="metrics bind address (default %(default)s)")
    p.add_argument("--tls-cert", help="server certificate (PEM); enables TLS with --tls-key")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to (mTLS)")
    p.add_argument("--auth-token-file",
                   help="require 'authorization: Bearer <token>', the token read from this file")
    p.add_argument("--auth-token-env", help="...or from this environment variable")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM (default %(default)s)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("generate", help="ask a server for a tip",
                       description="Call Generate (or GenerateStream with --stream) on a server.")
    p.add_argument("--user", help="user external id")
    p.add_argument("--item", help="item external id")
    p.add_argument("--hidden-state",
                   help="comma-separated raw initial hidden state instead of user/item")
    p.add_argument("--request-id", default="", help="id echoed back and logged")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--json", action="store_true", help="print the raw response as JSON")
    _add_decoding_args(p)
    _add_connection_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("info", help="show a server's model info and health")
    _add_connection_args(p)
    p.set_defaults(func=_cmd_info)

    from gruserve.export.cli import add_export_commands

    add_export_commands(sub)
    from .loadtest_cli import add_loadtest_command

    add_loadtest_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (BundleError, DeviceError, ValueError, OSError) as exc:
        # operator errors: one clear line, no stack trace
        print(f"gruserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
