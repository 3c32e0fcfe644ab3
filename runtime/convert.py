"""Protobuf <-> domain conversion: the one module besides the servicer that knows *_pb2."""

from __future__ import annotations

import numpy as np

from gruserve import __version__
from gruserve.v1 import gruserve_pb2 as pb

from .bundle import ModelInfo
from .config import ServiceConfig
from .engine import Engine
from .errors import InvalidRequestError
from .model_host import Served
from .requests import (
    DecodingParams,
    FinishReason,
    RatingOutput,
    RatingRequest,
    Request,
    RequestOutput,
    Strategy,
)
from .sampler import SamplingParams

_STRATEGIES = {
    pb.DECODING_STRATEGY_UNSPECIFIED: Strategy.GREEDY,
    pb.DECODING_STRATEGY_GREEDY: Strategy.GREEDY,
    pb.DECODING_STRATEGY_SAMPLE: Strategy.SAMPLE,
    pb.DECODING_STRATEGY_BEAM: Strategy.BEAM,
}
_FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
}


def decoding_params(p: pb.DecodingParameters) -> DecodingParams:
    """Proto defaults (0) become the documented defaults; every check is the
    RequestBuilder's."""
    if p.strategy not in _STRATEGIES:
        raise InvalidRequestError("parameters.strategy", f"unknown value {p.strategy}")
    return DecodingParams(
        strategy=_STRATEGIES[p.strategy],
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        sampling=SamplingParams(
            temperature=p.temperature or 1.0,
            top_k=p.top_k,
            top_p=p.top_p or 1.0,
            seed=p.seed if p.HasField("seed") else None,
        ),
        num_beams=p.num_beams,
        length_penalty=p.length_penalty if p.HasField("length_penalty") else 1.0,
        stop_token_ids=tuple(p.stop_token_ids),
        return_logprobs=p.return_logprobs,
    )


def engine_request(
    engine: Engine, message: pb.GenerateRequest, *, stream: bool, request_id: str | None = None
) -> Request:
    """A GenerateRequest as a validated engine Request (with `request_id` instead of the
    message's, when given); raises InvalidRequest/NotFound."""
    params = decoding_params(message.parameters)
    request_id = message.request_id if request_id is None else request_id
    which = message.WhichOneof("conditioning")
    if which == "user_item":
        return engine.make_request(
            request_id, params, user_id=message.user_item.user_id,
            item_id=message.user_item.item_id, stream=stream,
        )
    if which == "hidden_state":
        return engine.make_request(
            request_id, params,
            hidden_state=np.asarray(message.hidden_state.values, dtype=np.float32), stream=stream,
        )
    raise InvalidRequestError("conditioning", "set user_item or hidden_state")


def _timing(output: RequestOutput) -> pb.Timing:
    def ms(seconds: float | None) -> float:
        return 0.0 if seconds is None else seconds * 1e3

    return pb.Timing(
        queue_ms=ms(output.queue_s), ttft_ms=ms(output.first_token_s), total_ms=ms(output.total_s)
    )


def rating_request(
    engine: Engine, message: pb.PredictRatingsRequest, *, request_id: str | None = None
) -> RatingRequest:
    """A PredictRatingsRequest as a validated RatingRequest (with `request_id` instead of the
    message's, when given); raises InvalidRequest/NotFound."""
    return engine.make_ratings(
        message.request_id if request_id is None else request_id, user_id=message.user_id,
        item_ids=list(message.item_ids),
        pairs=[(p.user_id, p.item_id) for p in message.pairs], top_k=message.top_k,
    )


def ratings_response(
    output: RatingOutput, request: RatingRequest, message: pb.PredictRatingsRequest
) -> pb.PredictRatingsResponse:
    indices = output.indices.tolist()
    if message.pairs:
        item_ids = [message.pairs[i].item_id for i in indices]
    else:
        item_ids = [message.item_ids[i] for i in indices]
    response = pb.PredictRatingsResponse(
        request_id=output.request_id, ratings=output.ratings.tolist(), indices=indices,
        item_ids=item_ids, queue_ms=output.queue_s * 1e3, total_ms=output.total_s * 1e3,
    )
    user_fallback = request.user_fallback[output.indices]
    item_fallback = request.item_fallback[output.indices]
    if user_fallback.any() or item_fallback.any():
        response.user_fallback.extend(user_fallback.tolist())
        response.item_fallback.extend(item_fallback.tolist())
    return response


def generate_response(
    output: RequestOutput, info: ModelInfo, *, request: Request | None = None,
    cached: bool = False,
) -> pb.GenerateResponse:
    tokens = output.token_ids or []
    response = pb.GenerateResponse(
        request_id=output.request_id,
        token_ids=tokens,
        text=info.detokenize(tokens),
        finish_reason=_FINISH.get(output.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        token_logprobs=output.logprobs or [],
        timing=_timing(output),
        cached=cached,
    )
    if output.predicted_rating is not None:
        response.predicted_rating = output.predicted_rating
    if request is not None:
        response.user_fallback = request.user_fallback
        response.item_fallback = request.item_fallback
    return response


def stream_response(
    output: RequestOutput, info: ModelInfo, *, first: bool, request: Request | None = None,
    cached: bool = False,
) -> pb.GenerateStreamResponse:
    text = info.detokenize(output.new_token_ids)
    if text and not first:
        text = " " + text
    message = pb.GenerateStreamResponse(
        request_id=output.request_id,
        token_ids=output.new_token_ids,
        text=text,
        token_logprobs=output.new_logprobs or [],
        cached=cached,
    )
    if first and output.predicted_rating is not None:
        message.predicted_rating = output.predicted_rating
    if first and request is not None:
        message.user_fallback = request.user_fallback
        message.item_fallback = request.item_fallback
    if output.finished:
        message.finish_reason = _FINISH.get(output.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        message.timing.CopyFrom(_timing(output))
    return message


def model_info(served: Served, *, service: ServiceConfig) -> pb.GetModelInfoResponse:
    cache = served.cache
    engine = served.engine
    info, cfg, limits = engine.info, engine.info.model_config, engine.limits
    return pb.GetModelInfoResponse(
        model_name=info.name,
        vocab_size=len(info.vocab),
        embedding_size=int(cfg.get("emsize", 0)),
        hidden_size=info.hidden_size,
        num_layers=info.num_layers,
        num_users=len(info.users),
        num_items=len(info.items),
        min_rating=float(cfg.get("min_rating", 0)),
        max_rating=float(cfg.get("max_rating", 0)),
        bos_id=info.bos_id,
        eos_id=info.eos_id,
        pad_id=info.pad_id,
        unk_id=info.unk_id,
        default_max_tokens=limits.default_max_tokens,
        provider=served.provider,
        max_slots=engine.config.num_slots,
        max_queued=engine.config.max_queued,
        sampling_top_k=limits.sampling_top_k,
        max_batch_requests=service.max_batch_requests,
        precision=served.bundle.precision,
        max_tokens=limits.max_tokens,
        max_beams=limits.max_beams,
        max_stop_tokens=limits.max_stop_tokens,
        accepts_hidden_state=bool(engine.runner.can_write_states),
        max_request_bytes=service.max_message_bytes,
        bundle_version=served.version,
        server_version=__version__,
        max_rating_pairs=limits.max_rating_pairs,
        rating_chunk_size=limits.rating_chunk_size,
        unknown_entities_fallback=engine.fallback_entities,
        cache_size=0 if cache is None else cache.max_entries,
    )
