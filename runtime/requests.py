"""Plain dataclasses that cross the layers: what a request asks for and what it gets back.

No protobuf here: the servicer converts to and from these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from .config import RecommenderConfig, SchedulerConfig
from .sampler import SamplingParams


class Strategy(enum.Enum):
    GREEDY = "greedy"
    SAMPLE = "sample"
    BEAM = "beam"


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP_TOKEN = "stop_token"
    ABORTED = "aborted"


@dataclass(frozen=True)
class DecodingParams:
    strategy: Strategy = Strategy.GREEDY
    # tokens to generate at most, <eos> excluded; 0 = the model's max_len
    max_tokens: int = 0
    # <eos> and stop tokens are suppressed until this many tokens exist
    min_tokens: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_beams: int = 0  # 0: the default (request_builder.DEFAULT_NUM_BEAMS)
    length_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    return_logprobs: bool = False


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Computed once, by `Limits.of`, from the scheduler's
    configuration and what the bundle can do; validation and GetModelInfo both read it."""

    vocab_size: int
    max_tokens: int  # the ceiling for DecodingParams.max_tokens
    default_max_tokens: int
    sampling_top_k: int  # K of the sampling graph, 0 if none
    # the effective ceiling for num_beams: a beam takes a slot, and its candidates come
    # from the TopK graph, so it is also bounded by the batch limit and by K
    max_beams: int
    max_stop_tokens: int = 16
    # pairs one PredictRatings call may rate, and one encoder run rates
    max_rating_pairs: int = RecommenderConfig.max_rating_pairs
    rating_chunk_size: int = RecommenderConfig.rating_chunk_size

    @classmethod
    def of(
        cls, config: SchedulerConfig, *, vocab_size: int, model_max_len: int, sampling_top_k: int,
        recommender: RecommenderConfig | None = None,
    ) -> Limits:
        recommender = recommender or RecommenderConfig()
        return cls(
            vocab_size=vocab_size,
            max_tokens=config.max_tokens,
            default_max_tokens=min(model_max_len, config.max_tokens),
            sampling_top_k=sampling_top_k,
            max_beams=min(config.max_beams, config.batch_limit, sampling_top_k),
            max_stop_tokens=config.max_stop_tokens,
            max_rating_pairs=recommender.max_rating_pairs,
            rating_chunk_size=recommender.rating_chunk_size,
        )


@dataclass
class Request:
    """One request as the engine sees it: conditioning resolved to indices or a raw state."""

    # the engine's own unique key (the scheduler's dictionary key); clients may reuse ids
    request_id: str
    params: DecodingParams
    # the id the client chose (or one generated for it), echoed in the response and logs
    client_id: str = ""
    user_index: int = -1
    item_index: int = -1
    hidden_state: np.ndarray | None = None  # (H,) float32 when conditioning on a raw state
    # the user's (item's) id was unknown and its index is the bundle's fallback row
    user_fallback: bool = False
    item_fallback: bool = False
    # whether the caller wants tokens as they come (streaming) or only the result
    stream: bool = False
    # a resolved seed for sampling (random when the caller gave none, so it can be logged)
    seed: int = 0
    arrival_time: float = 0.0

    @property
    def num_slots(self) -> int:
        return self.params.num_beams if self.params.strategy is Strategy.BEAM else 1


@dataclass
class RequestOutput:
    """A delta of a request: new tokens, and on the last one the finish reason and totals."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    predicted_rating: float | None = None
    # set on the last output: all tokens and the timing
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    queue_s: float | None = None
    first_token_s: float | None = None
    total_s: float | None = None


@dataclass(frozen=True)
class RatingRequest:
    """PredictRatings as the engine sees it: N pairs resolved to embedding rows."""

    request_id: str
    users: np.ndarray  # (N,) int64 user rows
    items: np.ndarray  # (N,) int64 item rows
    # (N,) bool: the id was unknown and the row is the bundle's fallback embedding
    user_fallback: np.ndarray
    item_fallback: np.ndarray
    top_k: int = 0  # > 0: only the top_k pairs by rating, best first; 0: all, in order

    @property
    def num_pairs(self) -> int:
        return int(self.users.size)


@dataclass(frozen=True)
class RatingOutput:
    """The ratings of a RatingRequest: all pairs in request order, or its top_k best."""

    request_id: str
    ratings: np.ndarray  # (M,) float32
    indices: np.ndarray  # (M,) int64: each rating's position in the request
    num_runs: int  # encoder runs (chunks) it took
    queue_s: float  # accepted -> its first encoder run started
    total_s: float  # accepted -> rated
