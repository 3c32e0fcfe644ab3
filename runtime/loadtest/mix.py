"""The request mix (what each request is conditioned on) and the gRPC caller."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from ..client import AsyncGruserveClient, build_request
from .lengths import LengthDistribution, LengthSequence
from .stats import OK, ItemTiming, RequestRecord

# --- request mix and the gRPC caller -----------------------------------------------------------


class RequestMix:
    """The conditioning of request i: (user, item) pairs from a file (cycled in file order),
    pairs drawn uniformly from entity lists (seeded), or random raw hidden states; and, with
    `lengths`, its max_tokens: the i-th draw of the distribution (also its min_tokens when
    `exact_lengths`, so that no request stops early at <eos>)."""

    NUM_STATES = 64  # distinct random states, reused round-robin

    def __init__(
        self,
        decoding: dict,
        *,
        pairs: Sequence[tuple[str, str]] | None = None,
        users: Sequence[str] | None = None,
        items: Sequence[str] | None = None,
        state_size: int | None = None,
        seed: int = 0,
        id_prefix: str = "lt",
        lengths: LengthDistribution | None = None,
        exact_lengths: bool = False,
    ) -> None:
        self.decoding = dict(decoding)
        self.id_prefix = id_prefix
        self.lengths = LengthSequence(lengths, seed) if lengths is not None else None
        self.exact_lengths = exact_lengths
        if exact_lengths and lengths is None:
            raise ValueError("exact lengths need a length distribution")
        rng = random.Random(seed)
        if pairs:
            self.kind = "pairs"
            self._pairs = list(pairs)
        elif users and items:
            self.kind = "entities"
            self._pairs = [(rng.choice(users), rng.choice(items)) for _ in range(4096)]
        elif state_size:
            self.kind = "hidden_state"
            self._states = [
                [rng.uniform(-1.0, 1.0) for _ in range(state_size)] for _ in range(self.NUM_STATES)
            ]
        else:
            raise ValueError("a request mix needs pairs, users and items, or a state size")
        build_request(**self.decoding)  # fail now, not per request, on a bad parameter

    def request(self, index: int):
        rid = f"{self.id_prefix}-{index}"
        decoding = self.decoding
        if self.lengths is not None:
            length = self.lengths[index]
            decoding = {**decoding, "max_tokens": length}
            if self.exact_lengths:
                decoding["min_tokens"] = length
        if self.kind == "hidden_state":
            state = self._states[index % len(self._states)]
            return build_request(hidden_state=state, request_id=rid, **decoding)
        user, item = self._pairs[index % len(self._pairs)]
        return build_request(user=user, item=item, request_id=rid, **decoding)


class GrpcCaller:
    """Sends one request with the async client and records what came back."""

    def __init__(self, client: AsyncGruserveClient, mix: RequestMix, *, stream: bool) -> None:
        self.client = client
        self.mix = mix
        self.stream = stream

    async def __call__(self, record: RequestRecord) -> None:
        request = self.mix.request(record.index)
        try:
            if self.stream:
                async for chunk in self.client.stream_request(request):
                    record.chunk_s.append(time.monotonic())
                    record.num_tokens += len(chunk.token_ids)
                    if chunk.HasField("timing"):
                        _take_timing(record, chunk.timing)
            else:
                reply = await self.client.generate_request(request)
                record.num_tokens = len(reply.token_ids)
                _take_timing(record, reply.timing)
            record.code = OK
        except grpc.aio.AioRpcError as exc:
            record.code = exc.code().name


class GrpcBatchCaller:
    """Sends one GenerateBatch call of `batch_size` requests: call k carries requests
    k * batch_size ... k * batch_size + batch_size - 1 of the mix (the same sequence the unary
    caller sends one by one), and records every item's tokens and server timing."""

    def __init__(self, client: AsyncGruserveClient, mix, *, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.client = client
        self.mix = mix
        self.batch_size = batch_size

    async def __call__(self, record: RequestRecord) -> None:
        first = record.index * self.batch_size
        requests = [self.mix.request(first + j) for j in range(self.batch_size)]
        record.num_items = self.batch_size
        try:
            reply = await self.client.generate_batch(requests)
        except grpc.aio.AioRpcError as exc:
            record.code = exc.code().name
            return
        record.num_tokens = sum(len(r.token_ids) for r in reply.responses)
        record.items = [
            ItemTiming(r.timing.ttft_ms, r.timing.queue_ms, r.timing.total_ms)
            for r in reply.responses
        ]
        record.code = OK


def _take_timing(record: RequestRecord, timing) -> None:
    record.server_ttft_ms = timing.ttft_ms
    record.server_queue_ms = timing.queue_ms
    record.server_total_ms = timing.total_ms


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """`user,item` per line (comma, tab or spaces); blank lines, '#' comments and a
    `user,item` header are skipped."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in re.split(r"[,\t ]+", line) if p.strip()]
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'user,item', got {line!r}")
        if number == 1 and [p.lower() for p in parts] == ["user", "item"]:
            continue
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"{path}: no user,item pairs")
    return pairs


def read_entities(path: str | Path) -> tuple[list[str], list[str]]:
    """(users, items) from a bundle directory (via its manifest) or an entities.json."""
    path = Path(path)
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        path = path / manifest["files"]["entities"]["file"]
    data = json.loads(path.read_text(encoding="utf-8"))
    users, items = [str(u) for u in data["users"]], [str(i) for i in data["items"]]
    if not users or not items:
        raise ValueError(f"{path}: no users or no items")
    return users, items
