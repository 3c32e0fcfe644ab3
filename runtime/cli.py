"""`gruserve` command line: serve, generate, rank, info (runtime) and train, export, verify,
evaluate (the export extra). Runtime commands never import torch."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from typing import NoReturn

from gruserve import __version__

from . import logs
from .bundle import BundleError
from .cli_args import add_connection_args, add_decoding_args, connection_from_args
from .cli_config import (
    PRECEDENCE_NOTE,
    add_config_arguments,
    add_logging_arguments,
    config_from_args,
    logging_from_args,
)
from .config import ConfigError
from .providers import DeviceError

log = logging.getLogger("gruserve")


def _cmd_serve(args: argparse.Namespace) -> int:
    global _drained
    from .auth import load_token
    from .server import serve_forever

    config = config_from_args(args)
    transport = config.transport
    token = load_token(transport.auth_token_file, transport.auth_token_env)
    if token is not None:
        config = dataclasses.replace(
            config, transport=dataclasses.replace(transport, auth_token=token)
        )
    bundle = args.bundle
    if bundle is None:
        from .demo import demo_bundle_dir

        bundle = demo_bundle_dir()
    code = asyncio.run(serve_forever(bundle, config))
    _drained = True
    return code


def _parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _decoding(args: argparse.Namespace) -> dict:
    """build_request's decoding arguments from add_decoding_args' flags."""
    return dict(
        strategy=args.strategy, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        stop_token_ids=args.stop_ids, return_logprobs=args.logprobs,
    )


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
        **_decoding(args),
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


def _read_item_ids(path: str) -> list[str]:
    """One item id per line ('-': stdin); blank lines and # comments are skipped."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise OSError(f"--items {path}: {exc.strerror or exc}") from None
    ids = [line.strip() for line in lines]
    ids = [i for i in ids if i and not i.startswith("#")]
    if not ids:
        raise ValueError(f"--items {path}: no item ids in it (one per line)")
    return ids


def _cmd_rank(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .client import GruserveClient

    items = _read_item_ids(args.items)
    try:
        with GruserveClient(connection_from_args(args), timeout=args.timeout) as client:
            ranked = client.rank_and_explain(args.user, items, top=args.top, **_decoding(args))
    except grpc.RpcError as exc:
        print(f"gruserve rank: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([
            {"rank": n, "item_id": r.item_id, "rating": r.rating,
             "user_fallback": r.user_fallback, "item_fallback": r.item_fallback,
             "explanation": MessageToDict(r.explanation)}
            for n, r in enumerate(ranked, 1)
        ], indent=2))
        return 0
    print(f"user {args.user}: the top {len(ranked)} of {len(items)} candidate items")
    if ranked and ranked[0].user_fallback:
        print("(unknown user: rated and explained on the fallback embedding)")
    width = max(len(r.item_id) for r in ranked)
    for n, r in enumerate(ranked, 1):
        notes = [w for w, on in (("unknown item", r.item_fallback),
                                 ("cached", r.explanation.cached)) if on]
        suffix = f"  ({', '.join(notes)})" if notes else ""
        print(f"{n:>3}. {r.item_id:<{width}}  {r.rating:5.2f}  {r.explanation.text}{suffix}")
    return 0


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gruserve",
        description="Train, export and serve GRU text decoders (NRT review tips) with ONNX "
        "Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"gruserve {__version__}")
    # before the command (gruserve --log-level DEBUG serve) or after it (each command has
    # the same options, below)
    add_logging_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve", help="serve a model bundle over gRPC",
        description="Serve a bundle over gRPC (health, reflection, optional TLS/auth/metrics). "
        "Without BUNDLE, serves the demo model embedded in the package (users u0000..u0199, "
        "items i0000..i0099).",
        epilog=PRECEDENCE_NOTE,
    )
    p.add_argument("bundle", nargs="?", help="bundle directory (default: the embedded demo model)")
    add_config_arguments(p)
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
    add_decoding_args(p)
    add_connection_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "rank", help="rank candidate items for a user and explain the best",
        description="Rate every candidate item for a user (PredictRatings), keep the --top "
        "best and explain them with a tip each (GenerateBatch). Prints them best first.",
    )
    p.add_argument("--user", required=True, help="user external id")
    p.add_argument("--items", required=True, metavar="FILE",
                   help="candidate item ids, one per line ('-' reads stdin; # comments)")
    p.add_argument("--top", type=_positive_int, default=5,
                   help="how many of the best to explain (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_decoding_args(p)
    add_connection_args(p)
    p.set_defaults(func=_cmd_rank)

    p = sub.add_parser("info", help="show a server's model info and health")
    add_connection_args(p)
    p.set_defaults(func=_cmd_info)

    from gruserve.export.cli import add_export_commands

    add_export_commands(sub)
    from .loadtest_cli import add_loadtest_command

    add_loadtest_command(sub)
    for command in sub.choices.values():
        add_logging_arguments(command)
    return parser


# set once `gruserve serve` has drained and closed everything: the program then ends at once
_drained = False


def run() -> NoReturn:
    """The `gruserve` program (console script, `python -m gruserve.runtime`): main(), then
    the exit. After a drain it skips the interpreter's teardown, module by module (0.2-0.4 s
    on the 2-core machine), which would push the exit past delay + grace, where a supervisor
    sends SIGKILL; there is nothing left to clean up but the logs, flushed here."""
    code = main()
    if _drained:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(logging_from_args(args))
        return int(args.func(args) or 0)
    except (BundleError, ConfigError, DeviceError, ValueError, OSError) as exc:
        # operator errors: one clear line, no stack trace
        print(f"gruserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    run()
