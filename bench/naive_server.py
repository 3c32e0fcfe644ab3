"""The baseline for bench/serve.py: the gruserve.v1 API served the way research code decodes.

PyTorch eager, one request at a time (a lock around a batch-1 decode), no batching, no ONNX.
It implements Generate and GetModelInfo of the same proto, so the same harness drives it.
Greedy, or sampling (temperature, top_k, top_p, seed) over the full vocabulary with torch's
own RNG: a sampled request picks other tokens than gruserve's, but as many of them.

    python bench/naive_server.py CHECKPOINT.pt --port 0
    -> prints "naive: serving CHECKPOINT.pt on 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import torch

from gruserve.export.checkpoint import load_checkpoint
from gruserve.export.model import NRT
from gruserve.v1 import gruserve_pb2 as pb
from gruserve.v1 import gruserve_pb2_grpc as pb_grpc


def sample_token(scores: torch.Tensor, p: pb.DecodingParameters, rng: torch.Generator):
    """One token from (1, V) log-probs: temperature, then top_k, then the top_p nucleus."""
    logits = scores / (p.temperature or 1.0)
    if p.top_k:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < p.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=rng)  # (1, 1)


@torch.no_grad()
def decode_one(
    model: NRT, hidden: torch.Tensor, bos: int, eos: int, max_tokens: int,
    params: pb.DecodingParameters,
) -> tuple[list[int], float]:
    """export.model.greedy_decode at batch 1 (or sampling), plus <eos> suppressed before
    min_tokens.

    Returns the tokens and the seconds to the first one."""
    start = time.perf_counter()
    first_s = 0.0
    sample = params.strategy == pb.DECODING_STRATEGY_SAMPLE
    rng = torch.Generator().manual_seed(params.seed) if sample else None
    token = torch.full((1, 1), bos, dtype=torch.int64)
    out: list[int] = []
    for step in range(max_tokens):
        log_probs, hidden = model.decoder(token, hidden)  # (1, 1, V)
        scores = log_probs[:, -1]  # (1, V)
        if step < params.min_tokens:
            scores[:, eos] = float("-inf")
        if sample:
            token = sample_token(scores, params, rng)
        else:
            token = scores.argmax(dim=-1, keepdim=True)  # (1, 1)
        if step == 0:
            first_s = time.perf_counter() - start
        tok = int(token.item())
        if tok == eos:
            break
        out.append(tok)
    return out, first_s


class NaiveServicer(pb_grpc.GeneratorServicer):
    def __init__(self, checkpoint_path: str) -> None:
        ckpt = load_checkpoint(checkpoint_path)
        self.model = ckpt.build_model()
        self.config = ckpt.model_config
        self.vocab = ckpt.vocab
        self.users, self.items = ckpt.users, ckpt.items
        self.lock = threading.Lock()  # one request at a time, as a research script would

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        accepted = time.perf_counter()
        p = request.parameters
        max_tokens = p.max_tokens or self.config.max_len
        which = request.WhichOneof("conditioning")
        user = item = None
        if which == "user_item":
            user = self.users.get(request.user_item.user_id)
            item = self.items.get(request.user_item.item_id)
            if user is None or item is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown user or item")
        elif which != "hidden_state":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set user_item or hidden_state")
        if p.strategy == pb.DECODING_STRATEGY_BEAM:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the naive server has no beam search")
        with self.lock:
            admitted = time.perf_counter()
            rating = None
            with torch.no_grad():
                if user is not None:
                    ratings, hidden = self.model.encoder(torch.tensor([user]), torch.tensor([item]))
                    rating = float(ratings[0])
                else:
                    hidden = torch.tensor(list(request.hidden_state.values)).view(1, 1, -1)
            tokens, first_s = decode_one(
                self.model, hidden, self.vocab.bos_id, self.vocab.eos_id, max_tokens, p
            )
        done = time.perf_counter()
        reply = pb.GenerateResponse(
            request_id=request.request_id, token_ids=tokens,
            text=" ".join(self.vocab.decode(tokens)),
            finish_reason=pb.FINISH_REASON_LENGTH if len(tokens) == max_tokens
            else pb.FINISH_REASON_EOS,
            timing=pb.Timing(
                queue_ms=(admitted - accepted) * 1e3,
                ttft_ms=(admitted - accepted + first_s) * 1e3,
                total_ms=(done - accepted) * 1e3,
            ),
        )
        if rating is not None:
            reply.predicted_rating = rating
        return reply

    def GetModelInfo(self, request, context):
        c, v = self.config, self.vocab
        return pb.GetModelInfoResponse(
            model_name="nrt-naive", vocab_size=len(v), embedding_size=c.emsize,
            hidden_size=c.hidden_size, num_layers=c.num_layers, num_users=len(self.users),
            num_items=len(self.items), min_rating=c.min_rating, max_rating=c.max_rating,
            bos_id=v.bos_id, eos_id=v.eos_id, pad_id=v.pad_id, unk_id=v.unk_id,
            default_max_tokens=c.max_len, provider="pytorch-eager", max_slots=1,
            precision="fp32",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--workers", type=int, default=1,
        help="gRPC handler threads (default 1: more threads only contend for the lock and the GIL)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    servicer = NaiveServicer(args.checkpoint)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers))
    pb_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"naive: serving {args.checkpoint} on {args.host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
