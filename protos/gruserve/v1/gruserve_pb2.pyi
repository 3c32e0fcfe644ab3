from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodingStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECODING_STRATEGY_UNSPECIFIED: _ClassVar[DecodingStrategy]
    DECODING_STRATEGY_GREEDY: _ClassVar[DecodingStrategy]
    DECODING_STRATEGY_SAMPLE: _ClassVar[DecodingStrategy]
    DECODING_STRATEGY_BEAM: _ClassVar[DecodingStrategy]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_TOKEN: _ClassVar[FinishReason]
DECODING_STRATEGY_UNSPECIFIED: DecodingStrategy
DECODING_STRATEGY_GREEDY: DecodingStrategy
DECODING_STRATEGY_SAMPLE: DecodingStrategy
DECODING_STRATEGY_BEAM: DecodingStrategy
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_TOKEN: FinishReason

class UserItem(_message.Message):
    __slots__ = ("user_id", "item_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ...) -> None: ...

class HiddenState(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class DecodingParameters(_message.Message):
    __slots__ = ("strategy", "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "seed", "num_beams", "length_penalty", "stop_token_ids", "return_logprobs")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    strategy: DecodingStrategy
    max_tokens: int
    min_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    num_beams: int
    length_penalty: float
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    return_logprobs: bool
    def __init__(self, strategy: _Optional[_Union[DecodingStrategy, str]] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., num_beams: _Optional[int] = ..., length_penalty: _Optional[float] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "user_item", "hidden_state", "parameters")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ITEM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_item: UserItem
    hidden_state: HiddenState
    parameters: DecodingParameters
    def __init__(self, request_id: _Optional[str] = ..., user_item: _Optional[_Union[UserItem, _Mapping]] = ..., hidden_state: _Optional[_Union[HiddenState, _Mapping]] = ..., parameters: _Optional[_Union[DecodingParameters, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "ttft_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    ttft_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "predicted_rating", "finish_reason", "token_logprobs", "timing", "user_fallback", "item_fallback", "cached")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATING_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    USER_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ITEM_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    predicted_rating: float
    finish_reason: FinishReason
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    timing: Timing
    user_fallback: bool
    item_fallback: bool
    cached: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., predicted_rating: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., user_fallback: _Optional[bool] = ..., item_fallback: _Optional[bool] = ..., cached: _Optional[bool] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "token_logprobs", "predicted_rating", "finish_reason", "timing", "user_fallback", "item_fallback", "cached")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATING_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    USER_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ITEM_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    predicted_rating: float
    finish_reason: FinishReason
    timing: Timing
    user_fallback: bool
    item_fallback: bool
    cached: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., predicted_rating: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., user_fallback: _Optional[bool] = ..., item_fallback: _Optional[bool] = ..., cached: _Optional[bool] = ...) -> None: ...

class GenerateBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GenerateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[GenerateRequest, _Mapping]]] = ...) -> None: ...

class GenerateBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[GenerateResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[GenerateResponse, _Mapping]]] = ...) -> None: ...

class PredictRatingsRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "item_ids", "pairs", "top_k")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    pairs: _containers.RepeatedCompositeFieldContainer[UserItem]
    top_k: int
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., pairs: _Optional[_Iterable[_Union[UserItem, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class PredictRatingsResponse(_message.Message):
    __slots__ = ("request_id", "ratings", "indices", "item_ids", "user_fallback", "item_fallback", "queue_ms", "total_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ITEM_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ratings: _containers.RepeatedScalarFieldContainer[float]
    indices: _containers.RepeatedScalarFieldContainer[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    user_fallback: _containers.RepeatedScalarFieldContainer[bool]
    item_fallback: _containers.RepeatedScalarFieldContainer[bool]
    queue_ms: float
    total_ms: float
    def __init__(self, request_id: _Optional[str] = ..., ratings: _Optional[_Iterable[float]] = ..., indices: _Optional[_Iterable[int]] = ..., item_ids: _Optional[_Iterable[str]] = ..., user_fallback: _Optional[_Iterable[bool]] = ..., item_fallback: _Optional[_Iterable[bool]] = ..., queue_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "vocab_size", "embedding_size", "hidden_size", "num_layers", "num_users", "num_items", "min_rating", "max_rating", "bos_id", "eos_id", "pad_id", "unk_id", "default_max_tokens", "provider", "max_slots", "max_queued", "sampling_top_k", "max_batch_requests", "precision", "max_tokens", "max_beams", "max_stop_tokens", "accepts_hidden_state", "max_request_bytes", "bundle_version", "server_version", "max_rating_pairs", "rating_chunk_size", "unknown_entities_fallback", "cache_size")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_USERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MIN_RATING_FIELD_NUMBER: _ClassVar[int]
    MAX_RATING_FIELD_NUMBER: _ClassVar[int]
    BOS_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    UNK_ID_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_HIDDEN_STATE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_RATING_PAIRS_FIELD_NUMBER: _ClassVar[int]
    RATING_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ENTITIES_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    CACHE_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_layers: int
    num_users: int
    num_items: int
    min_rating: float
    max_rating: float
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    default_max_tokens: int
    provider: str
    max_slots: int
    max_queued: int
    sampling_top_k: int
    max_batch_requests: int
    precision: str
    max_tokens: int
    max_beams: int
    max_stop_tokens: int
    accepts_hidden_state: bool
    max_request_bytes: int
    bundle_version: str
    server_version: str
    max_rating_pairs: int
    rating_chunk_size: int
    unknown_entities_fallback: bool
    cache_size: int
    def __init__(self, model_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., embedding_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_users: _Optional[int] = ..., num_items: _Optional[int] = ..., min_rating: _Optional[float] = ..., max_rating: _Optional[float] = ..., bos_id: _Optional[int] = ..., eos_id: _Optional[int] = ..., pad_id: _Optional[int] = ..., unk_id: _Optional[int] = ..., default_max_tokens: _Optional[int] = ..., provider: _Optional[str] = ..., max_slots: _Optional[int] = ..., max_queued: _Optional[int] = ..., sampling_top_k: _Optional[int] = ..., max_batch_requests: _Optional[int] = ..., precision: _Optional[str] = ..., max_tokens: _Optional[int] = ..., max_beams: _Optional[int] = ..., max_stop_tokens: _Optional[int] = ..., accepts_hidden_state: _Optional[bool] = ..., max_request_bytes: _Optional[int] = ..., bundle_version: _Optional[str] = ..., server_version: _Optional[str] = ..., max_rating_pairs: _Optional[int] = ..., rating_chunk_size: _Optional[int] = ..., unknown_entities_fallback: _Optional[bool] = ..., cache_size: _Optional[int] = ...) -> None: ...
