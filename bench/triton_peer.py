"""gruserve's peer in bench/serve.py: the bundle served by Triton (PyTriton) with its dynamic
batcher, the bound Python function decoding each batch step by step in ONNX Runtime.

    .venv-triton/bin/python bench/triton_peer.py BUNDLE --grpc-port 8001 --http-port 8000 \\
        --metrics-port 8002
    -> prints "triton: serving BUNDLE on 127.0.0.1:8001" once both models are ready

Two models, each with --instances model instances (default 1: on 2 cores a second one splits
the same cores between two ORT sessions; the knob is there to measure that), each instance
with its own StepRunner (gruserve's ORT sessions with I/O binding and the device-resident
state pool, max_batch_size slots):

  nrt_plain     the batch runs until its longest member is done, every row every step
  nrt_compact   finished rows are dropped each step

See bench/decode_loop.py for the loops. Inputs per request: USER, ITEM (BYTES external ids,
mapped through the bundle's entities as gruserve does), MAX_TOKENS (INT32), TEMPERATURE,
TOP_P (FP32; 0 = greedy / off), TOP_K (INT32; 0 = all), SEED (INT64); outputs TOKENS (INT64,
-1 padded to the batch's longest), NUM_TOKENS (INT32), RATING (FP32). No text: the client
gets ids (less work than gruserve's responses, which carry the text too).

Runs in the Triton environment (`make bench-env`), whose protobuf cannot load gruserve's
generated code: it imports only gruserve's runner, bundle and sampler. PyTriton's Python
backend stub loads libpython from the library path, and the system's libpython 3.11 may not
be the interpreter's (here: pyenv 3.11.7 against Debian's): the model then fails to load with
"'_thread.RLock' object has no attribute '_recursion_count'". So this script puts its own
interpreter's library directory first on LD_LIBRARY_PATH before Triton starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
import threading

import numpy as np


def _own_libpython_first() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and (not paths or paths[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


def make_infer(runner, bos: int, eos: int, users: dict, items: dict, compact: bool):
    from decode_loop import RowParams, decode_static
    from pytriton.decorators import batch

    def lookup(table: dict, ids: np.ndarray) -> np.ndarray:
        # an unknown id fails the whole batch (Triton returns the error to its requests)
        return np.array([table[x] for x in ids.ravel()], dtype=np.int64)

    @batch
    def infer(USER, ITEM, MAX_TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED):  # noqa: N803
        params = RowParams(
            users=lookup(users, USER), items=lookup(items, ITEM),
            lengths=MAX_TOKENS.ravel().astype(np.int64),
            temperature=TEMPERATURE.ravel().astype(np.float32),
            top_k=TOP_K.ravel().astype(np.int32),
            top_p=np.where(TOP_P.ravel() > 0, TOP_P.ravel(), 1.0).astype(np.float32),
            seeds=SEED.ravel().astype(np.int64),
        )
        result = decode_static(runner, bos, eos, params, compact=compact)
        return {
            "TOKENS": result.tokens,
            "NUM_TOKENS": result.num_tokens.astype(np.int32)[:, None],
            "RATING": result.ratings.astype(np.float32)[:, None],
        }

    return infer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--threads", type=int, default=0,
                        help="ORT intra-op threads per model (0 = one per core)")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="Triton's max_batch_size = each runner's slots (default 256, "
                        "gruserve's slot count)")
    parser.add_argument("--instances", type=int, default=1,
                        help="model instances per model, each with --threads ORT threads "
                        "(default 1)")
    parser.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="dynamic batcher: how long a request may wait for more to batch "
                        "with (default 0: batch whatever queued while the model was busy)")
    args = parser.parse_args(argv)
    _own_libpython_first()
    logging.basicConfig(level=logging.WARNING)

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from gruserve.runtime.bundle import load_bundle
    from gruserve.runtime.providers import SessionConfig
    from gruserve.runtime.runner import StepRunner

    bundle = load_bundle(args.bundle)
    users = {u.encode(): i for i, u in enumerate(bundle.users)}
    items = {v.encode(): i for i, v in enumerate(bundle.items)}
    session = SessionConfig(device="cpu", intra_op_threads=args.threads or os.cpu_count() or 1)
    inputs = [
        Tensor(name="USER", dtype=np.bytes_, shape=(1,)),
        Tensor(name="ITEM", dtype=np.bytes_, shape=(1,)),
        Tensor(name="MAX_TOKENS", dtype=np.int32, shape=(1,)),
        Tensor(name="TEMPERATURE", dtype=np.float32, shape=(1,)),
        Tensor(name="TOP_K", dtype=np.int32, shape=(1,)),
        Tensor(name="TOP_P", dtype=np.float32, shape=(1,)),
        Tensor(name="SEED", dtype=np.int64, shape=(1,)),
    ]
    outputs = [
        Tensor(name="TOKENS", dtype=np.int64, shape=(-1,)),
        Tensor(name="NUM_TOKENS", dtype=np.int32, shape=(1,)),
        Tensor(name="RATING", dtype=np.float32, shape=(1,)),
    ]
    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port, log_verbose=0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config) as triton:
        bos, eos = bundle.special_ids["bos"], bundle.special_ids["eos"]
        for name, compact in (("nrt_plain", False), ("nrt_compact", True)):
            # a list of callables: one model instance each, as PyTriton spells it
            instances = [
                make_infer(StepRunner(bundle, num_slots=args.max_batch_size, config=session),
                           bos, eos, users, items, compact)
                for _ in range(args.instances)
            ]
            triton.bind(
                model_name=name,
                infer_func=instances,
                inputs=inputs, outputs=outputs,
                config=ModelConfig(
                    max_batch_size=args.max_batch_size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
                ),
                strict=True,
            )
        triton.run()
        print(f"triton: serving {args.bundle} on 127.0.0.1:{args.grpc_port}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
