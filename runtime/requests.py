"""Plain dataclasses that cross the layers: what a request asks for and what it gets back.

No protobuf here: the servicer converts to and from these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidRequestError
from .sampler import SamplingParams

MAX_ABS_LENGTH_PENALTY = 10.0


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
    num_beams: int = 4
    length_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    return_logprobs: bool = False


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the engine's configuration fills it."""

    vocab_size: int
    max_tokens: int  # the ceiling for DecodingParams.max_tokens
    default_max_tokens: int
    sampling_top_k: int  # K of the sampling graph, 0 if none
    max_beams: int
    max_stop_tokens: int = 16


def validate_params(params: DecodingParams, limits: Limits) -> DecodingParams:
    """Checks every field against the limits; returns params with defaults resolved.

    Raises InvalidRequestError naming the offending field.
    """
    max_tokens = params.max_tokens or limits.default_max_tokens
    if not 0 < max_tokens <= limits.max_tokens:
        raise InvalidRequestError(
            "max_tokens", f"must be in 1..{limits.max_tokens}, got {max_tokens}"
        )
    if not 0 <= params.min_tokens <= max_tokens:
        raise InvalidRequestError(
            "min_tokens", f"must be in 0..max_tokens ({max_tokens}), got {params.min_tokens}"
        )
    if len(params.stop_token_ids) > limits.max_stop_tokens:
        raise InvalidRequestError("stop_token_ids", f"at most {limits.max_stop_tokens} ids")
    for token in params.stop_token_ids:
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequestError(
                "stop_token_ids", f"{token} is outside the vocabulary (0..{limits.vocab_size - 1})"
            )
    needs_candidates = params.strategy in (Strategy.SAMPLE, Strategy.BEAM) or params.return_logprobs
    needs_candidates = needs_candidates or params.min_tokens > 0
    if needs_candidates and limits.sampling_top_k == 0:
        raise InvalidRequestError(
            "parameters", "this bundle has no sampling graph (sampling, beam, logprobs, min_tokens)"
        )
    if params.strategy is Strategy.SAMPLE:
        try:
            params.sampling.validate(limits.sampling_top_k)
        except ValueError as exc:
            field_name = str(exc).split(" ", 1)[0].rstrip(":")
            raise InvalidRequestError(field_name, str(exc)) from None
    if params.strategy is Strategy.BEAM:
        max_beams = min(limits.max_beams, limits.sampling_top_k)
        if not 1 <= params.num_beams <= max_beams:
            raise InvalidRequestError(
                "num_beams", f"must be in 1..{max_beams}, got {params.num_beams}"
            )
        # score / length ** length_penalty: a finite but huge exponent overflows or divides
        # by zero inside the decode loop (seen killing it); sensible values lie well inside
        if not abs(params.length_penalty) <= MAX_ABS_LENGTH_PENALTY:
            raise InvalidRequestError(
                "length_penalty",
                f"must be in [-{MAX_ABS_LENGTH_PENALTY:g}, {MAX_ABS_LENGTH_PENALTY:g}], "
                f"got {params.length_penalty:g}",
            )
    return DecodingParams(
        strategy=params.strategy,
        max_tokens=max_tokens,
        min_tokens=params.min_tokens,
        sampling=params.sampling,
        num_beams=params.num_beams if params.strategy is Strategy.BEAM else 1,
        length_penalty=params.length_penalty,
        stop_token_ids=tuple(int(t) for t in params.stop_token_ids),
        return_logprobs=params.return_logprobs,
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
