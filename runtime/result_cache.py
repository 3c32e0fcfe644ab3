"""The result cache: answers to deterministic requests, replayed instead of decoded again.

A serving policy over the engine, not part of it: the scheduler decodes whatever it is
given, and the protocol front ends ask `Served.lookup` before submitting and tell
`Served.remember` what came back. Greedy, beam-search and seeded-sampling requests are pure
functions of (bundle, conditioning, parameters) (sampling draws from a counter-based RNG
keyed by the seed, the same alone or in any batch), so an answer computed once is the
answer. Unseeded sampling draws a fresh seed per request and is never cached.

The key holds the bundle's version, and `invalidate(version)` (called when a reload swaps
bundles) drops every entry and refuses late answers of any other version, so a reload can
never serve the previous model's text. The LRU is bounded in entries and in (estimated)
bytes; the estimate counts what an entry holds (tokens, log-probs, key), not Python's exact
object overhead.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from .requests import FinishReason, Request, RequestOutput, Strategy

# per-entry bookkeeping beyond the payload: the OrderedDict node, the key and answer tuples.
# Measured with tracemalloc on 20,000 15-token answers: 611 B each (771 B with log-probs);
# this estimate gives 632 (752)
ENTRY_OVERHEAD_BYTES = 512
_BYTES_PER_VALUE = 8  # a token id or a log-prob, as a Python int/float in a tuple


@dataclass(frozen=True)
class CachedAnswer:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: FinishReason
    predicted_rating: float | None


@dataclass
class CacheStats:
    """Totals since start (plain ints, read by the metrics exporter at scrape time)."""

    hits: int = 0
    misses: int = 0  # cacheable requests not found (unseeded sampling is neither)
    evictions: int = 0  # entries dropped to stay within the bounds (not invalidations)
    entries: int = 0
    bytes: int = 0


def cache_key(version: str, request: Request) -> tuple | None:
    """The request's key, or None when its answer is not a function of the request
    (unseeded sampling) and so must never be cached."""
    p = request.params
    if p.strategy is Strategy.SAMPLE and p.sampling.seed is None:
        return None
    if request.hidden_state is not None:
        conditioning = ("state", request.hidden_state.tobytes())
    else:
        conditioning = ("pair", request.user_index, request.item_index)
    # what a strategy does not read stays out of its key (a greedy request's temperature
    # must not split its entries)
    sampling = p.sampling if p.strategy is Strategy.SAMPLE else None
    length_penalty = p.length_penalty if p.strategy is Strategy.BEAM else None
    return (
        version, conditioning, p.strategy, p.max_tokens, p.min_tokens, sampling, p.num_beams,
        length_penalty, p.stop_token_ids, p.return_logprobs,
    )


def _size_of(key: tuple, answer: CachedAnswer) -> int:
    values = len(answer.token_ids) + len(answer.logprobs or ())
    state = len(key[1][1]) if key[1][0] == "state" else 0
    return ENTRY_OVERHEAD_BYTES + _BYTES_PER_VALUE * values + state


class ResultCache:
    """LRU of finished answers, bounded in entries and bytes; thread-safe."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries <= 0:
            raise ValueError("a result cache needs max_entries > 0 (0 means no cache)")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: collections.OrderedDict[tuple, tuple[CachedAnswer, int]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._version: str | None = None  # None: any version (until the first invalidate)

    def lookup(self, version: str, request: Request) -> RequestOutput | None:
        """A final output replaying the cached answer, or None (a miss, or uncacheable).
        Its timing is the lookup's own: accepted -> answered, no queue."""
        started = time.monotonic()
        key = cache_key(version, request)
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
        answer = entry[0]
        tokens = list(answer.token_ids)
        logprobs = None if answer.logprobs is None else list(answer.logprobs)
        elapsed = time.monotonic() - started
        return RequestOutput(
            request_id=request.client_id or request.request_id,
            new_token_ids=tokens, new_logprobs=logprobs, finished=True,
            finish_reason=answer.finish_reason, predicted_rating=answer.predicted_rating,
            token_ids=list(tokens), logprobs=None if logprobs is None else list(logprobs),
            queue_s=0.0, first_token_s=elapsed, total_s=elapsed,
        )

    def store(self, version: str, request: Request, output: RequestOutput) -> None:
        """Keeps a finished answer (an aborted one never). Answers of a version other than
        the current one (a request that finished on the engine a reload replaced) are
        dropped."""
        if not output.finished or output.finish_reason is FinishReason.ABORTED:
            return
        key = cache_key(version, request)
        if key is None:
            return
        answer = CachedAnswer(
            token_ids=tuple(output.token_ids or ()),
            logprobs=None if output.logprobs is None else tuple(output.logprobs),
            finish_reason=output.finish_reason,
            predicted_rating=output.predicted_rating,
        )
        size = _size_of(key, answer)
        if size > self.max_bytes:
            return
        with self._lock:
            if self._version is not None and version != self._version:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self.stats.bytes -= old[1]
            self._entries[key] = (answer, size)
            self.stats.bytes += size
            while len(self._entries) > self.max_entries or self.stats.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.stats.bytes -= dropped
                self.stats.evictions += 1
            self.stats.entries = len(self._entries)

    def invalidate(self, version: str) -> None:
        """Forgets every answer; from now on keeps only answers of `version`."""
        with self._lock:
            self._entries.clear()
            self._version = version
            self.stats.entries = self.stats.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
