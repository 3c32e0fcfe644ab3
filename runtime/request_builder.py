"""From what a client asked for to a validated engine Request: the one validation layer.

Every check of a request's fields happens here, against `Limits`; errors carry the field
in the API's terms (`parameters.top_p`, `user_item.user_id`, `hidden_state`) and the reason,
as attributes. Protocol front ends (gruserve.v1, the Open Inference Protocol) only convert.
"""

from __future__ import annotations

import itertools
import secrets

import numpy as np

from .bundle import ModelInfo
from .errors import InvalidRequestError, NotFoundError
from .requests import DecodingParams, Limits, Request, Strategy

MAX_ABS_LENGTH_PENALTY = 10.0
DEFAULT_NUM_BEAMS = 4  # what num_beams 0 means (capped at Limits.max_beams)
# ids go into logs and error details: bounded and printable (no forged log lines)
MAX_REQUEST_ID_LEN = 128
MAX_ENTITY_ID_LEN = 256
# Every state of a GRU started inside [-1, 1] stays there (the new state mixes the old one
# with a tanh), and the encoder's states are tanh outputs: a raw state outside it is no
# state the model has ever seen, and huge ones overflow the step into NaN log-probs
MAX_ABS_STATE_VALUE = 1.0


def check_id(field: str, value: str, max_len: int) -> None:
    """An id that goes into logs and error details: at most max_len printable characters."""
    if len(value) > max_len:
        raise InvalidRequestError(field, f"at most {max_len} characters, got {len(value)}")
    if not value.isprintable():
        raise InvalidRequestError(field, "control or other non-printable characters")


def validate_params(params: DecodingParams, limits: Limits) -> DecodingParams:
    """Checks every field against the limits, whatever the strategy (a greedy request with
    top_p 1.5 is as wrong as a sampling one); returns params with defaults resolved.

    Raises InvalidRequestError naming the offending field (DecodingParams' own names).
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
    params.sampling.validate(limits.sampling_top_k)
    num_beams = params.num_beams
    if num_beams or params.strategy is Strategy.BEAM:
        num_beams = num_beams or min(DEFAULT_NUM_BEAMS, limits.max_beams)
        if not 1 <= num_beams <= limits.max_beams:
            raise InvalidRequestError(
                "num_beams", f"must be in 1..{limits.max_beams}, got {num_beams}"
            )
    # score / length ** length_penalty: a finite but huge exponent overflows or divides by
    # zero inside the decode loop (seen killing it); sensible values lie well inside. The
    # check also refuses NaN
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
        num_beams=num_beams if params.strategy is Strategy.BEAM else 1,
        length_penalty=params.length_penalty,
        stop_token_ids=tuple(int(t) for t in params.stop_token_ids),
        return_logprobs=params.return_logprobs,
    )


class RequestBuilder:
    """Validates and resolves requests for one engine (its limits, its model's entities)."""

    def __init__(self, info: ModelInfo, limits: Limits, *, can_write_states: bool) -> None:
        self.info = info
        self.limits = limits
        self.can_write_states = can_write_states
        self._serial = itertools.count(1)

    def build(
        self,
        request_id: str,
        params: DecodingParams,
        *,
        user_id: str | None = None,
        item_id: str | None = None,
        hidden_state: np.ndarray | None = None,
        stream: bool = False,
    ) -> Request:
        """A validated Request; raises InvalidRequestError / NotFoundError naming the field."""
        check_id("request_id", request_id, MAX_REQUEST_ID_LEN)
        try:
            params = validate_params(params, self.limits)
        except InvalidRequestError as exc:
            raise exc.with_prefix("parameters.") from None
        client_id = request_id or secrets.token_hex(8)
        # requests are keyed by the engine, not the client: two clients reusing an id (or a
        # retry racing its original) must not collide
        request = Request(
            request_id=f"{client_id}#{next(self._serial)}", client_id=client_id,
            params=params, stream=stream,
        )
        if hidden_state is not None:
            request.hidden_state = self._state(hidden_state)
        else:
            request.user_index = self._entity("user", user_id, self.info.users)
            request.item_index = self._entity("item", item_id, self.info.items)
        if params.strategy is Strategy.SAMPLE:
            seed = params.sampling.seed
            request.seed = secrets.randbits(63) if seed is None else int(seed)
        return request

    def _state(self, hidden_state: np.ndarray) -> np.ndarray:
        info = self.info
        expected = info.num_layers * info.hidden_size
        state = np.asarray(hidden_state, dtype=np.float32).reshape(-1)
        if state.size != expected:
            raise InvalidRequestError(
                "hidden_state",
                f"needs {expected} values (num_layers * hidden_size), got {state.size}",
            )
        if not (np.abs(state) <= MAX_ABS_STATE_VALUE).all():  # NaN fails this too
            raise InvalidRequestError(
                "hidden_state",
                f"values must lie in [-{MAX_ABS_STATE_VALUE:g}, {MAX_ABS_STATE_VALUE:g}], "
                "the range of the GRU's states",
            )
        if not self.can_write_states:
            raise InvalidRequestError("hidden_state", "this bundle cannot take raw states")
        return state.reshape(info.hidden_size)

    @staticmethod
    def _entity(kind: str, external_id: str | None, index: dict[str, int]) -> int:
        field = f"user_item.{kind}_id"
        if not external_id:
            raise InvalidRequestError(field, "required")
        check_id(field, external_id, MAX_ENTITY_ID_LEN)
        found = index.get(external_id)
        if found is None:
            raise NotFoundError(field, f"unknown {kind}_id {external_id!r}")
        return found
