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
from .requests import DecodingParams, Limits, RatingRequest, Request, Strategy

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
    """Validates and resolves requests for one engine (its limits, its model's entities).

    With `fallback`, an unknown user or item id resolves to the bundle's fallback embedding
    row (and the request says so) instead of raising NotFoundError.
    """

    def __init__(
        self, info: ModelInfo, limits: Limits, *, can_write_states: bool, fallback: bool = False
    ) -> None:
        if fallback and not info.has_fallbacks:
            raise ValueError(f"model {info.name} has no fallback embeddings")
        self.info = info
        self.limits = limits
        self.can_write_states = can_write_states
        self.fallback = fallback
        self._serial = itertools.count(1)
        self._sides = {
            "user": (info.users, info.fallback_user), "item": (info.items, info.fallback_item),
        }

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
            request.user_index, request.user_fallback = self._entity(
                "user", user_id, "user_item.user_id"
            )
            request.item_index, request.item_fallback = self._entity(
                "item", item_id, "user_item.item_id"
            )
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

    def build_ratings(
        self,
        request_id: str,
        *,
        user_id: str | None = None,
        item_ids: list[str] | tuple[str, ...] = (),
        pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
        top_k: int = 0,
    ) -> RatingRequest:
        """One user and its candidate items, or (user, item) pairs, as a validated
        RatingRequest; raises InvalidRequestError / NotFoundError naming the field."""
        check_id("request_id", request_id, MAX_REQUEST_ID_LEN)
        if pairs and (user_id or item_ids):
            raise InvalidRequestError("pairs", "give user_id with item_ids, or pairs, not both")
        field, count = ("pairs", len(pairs)) if pairs else ("item_ids", len(item_ids))
        limit = self.limits.max_rating_pairs
        if not 0 < count <= limit:
            raise InvalidRequestError(field, f"needs 1..{limit} pairs, got {count}")
        if top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0, got {top_k}")
        if pairs:
            rows = [
                self._entity(side, external_id, f"pairs[{i}].{side}_id")
                for i, pair in enumerate(pairs)
                for side, external_id in zip(("user", "item"), pair, strict=True)
            ]
            users, items = rows[0::2], rows[1::2]
        else:
            users = [self._entity("user", user_id, "user_id")] * count
            items = [
                self._entity("item", item, f"item_ids[{i}]") for i, item in enumerate(item_ids)
            ]
        user_rows, user_fallback = zip(*users, strict=True)
        item_rows, item_fallback = zip(*items, strict=True)
        return RatingRequest(
            request_id=request_id or secrets.token_hex(8),
            users=np.array(user_rows, np.int64), items=np.array(item_rows, np.int64),
            user_fallback=np.array(user_fallback, bool),
            item_fallback=np.array(item_fallback, bool),
            top_k=int(top_k),
        )

    def _entity(self, side: str, external_id: str | None, field: str) -> tuple[int, bool]:
        """(embedding row, whether it is the fallback row) of a user or item id."""
        if not external_id:
            raise InvalidRequestError(field, "required")
        check_id(field, external_id, MAX_ENTITY_ID_LEN)
        known, fallback_row = self._sides[side]
        found = known.get(external_id)
        if found is not None:
            return found, False
        if self.fallback:
            return fallback_row, True
        raise NotFoundError(field, f"unknown {side}_id {external_id!r}")
