"""The one validation layer: limits computed once, errors that carry field and reason."""

from __future__ import annotations

import numpy as np
import pytest

from gruserve.runtime.bundle import ModelInfo
from gruserve.runtime.config import SchedulerConfig
from gruserve.runtime.errors import InvalidRequestError, NotFoundError
from gruserve.runtime.request_builder import (
    MAX_ENTITY_ID_LEN,
    MAX_REQUEST_ID_LEN,
    RequestBuilder,
)
from gruserve.runtime.requests import DecodingParams, Limits, Strategy
from gruserve.runtime.sampler import SamplingParams, ending_tokens, suppress_token

INFO = ModelInfo(
    name="m", vocab=tuple(f"w{i}" for i in range(50)), users={"u1": 0, "u2": 1},
    items={"i1": 0}, bos_id=0, eos_id=1, pad_id=2, unk_id=3, hidden_size=4, num_layers=1,
    model_config={"max_len": 15},
)


def builder(top_k=8, can_write_states=True, **config) -> RequestBuilder:
    limits = Limits.of(
        SchedulerConfig(**config), vocab_size=len(INFO.vocab), model_max_len=15,
        sampling_top_k=top_k,
    )
    return RequestBuilder(INFO, limits, can_write_states=can_write_states)


def test_limits_are_computed_once_from_config_and_bundle():
    limits = Limits.of(
        SchedulerConfig(num_slots=6, max_tokens=10, max_beams=8, max_stop_tokens=3),
        vocab_size=50, model_max_len=15, sampling_top_k=16,
    )
    assert limits.max_beams == 6  # a beam takes a slot: the batch limit binds first
    assert limits.default_max_tokens == 10  # the model's 15 capped by the ceiling
    assert (limits.max_tokens, limits.max_stop_tokens) == (10, 3)
    narrow = Limits.of(SchedulerConfig(max_beams=8), vocab_size=50, model_max_len=15,
                       sampling_top_k=4)
    assert narrow.max_beams == 4  # and beams need as many TopK candidates


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (DecodingParams(max_tokens=99), "parameters.max_tokens"),
        (DecodingParams(min_tokens=20, max_tokens=10), "parameters.min_tokens"),
        (DecodingParams(stop_token_ids=(77,)), "parameters.stop_token_ids"),
        (DecodingParams(strategy=Strategy.SAMPLE, sampling=SamplingParams(top_p=1.5)),
         "parameters.top_p"),
        (DecodingParams(strategy=Strategy.SAMPLE, sampling=SamplingParams(top_k=9)),
         "parameters.top_k"),
        (DecodingParams(sampling=SamplingParams(temperature=float("nan"))),
         "parameters.temperature"),
        (DecodingParams(strategy=Strategy.BEAM, num_beams=9), "parameters.num_beams"),
        (DecodingParams(strategy=Strategy.BEAM, length_penalty=1e9), "parameters.length_penalty"),
        # every parameter is checked whatever the strategy: these are all greedy requests
        (DecodingParams(sampling=SamplingParams(top_p=1.5)), "parameters.top_p"),
        (DecodingParams(sampling=SamplingParams(temperature=-1.0)), "parameters.temperature"),
        (DecodingParams(num_beams=1_000_000), "parameters.num_beams"),
        (DecodingParams(sampling=SamplingParams(top_k=1_000_000_000)), "parameters.top_k"),
        (DecodingParams(length_penalty=1e9), "parameters.length_penalty"),
        (DecodingParams(sampling=SamplingParams(seed=-1)), "parameters.seed"),
    ],
)
def test_invalid_parameters_carry_their_field_and_reason(params, field):
    with pytest.raises(InvalidRequestError) as info:
        builder().build("r", params, user_id="u1", item_id="i1")
    error = info.value
    assert error.field == field
    assert error.reason and str(error) == f"{field}: {error.reason}"
    nested = error.with_prefix("requests[3].")
    assert isinstance(nested, InvalidRequestError)
    assert nested.field == f"requests[3].{field}" and nested.reason == error.reason


def test_conditioning_and_id_errors():
    b = builder()
    cases = [
        (dict(user_id="", item_id="i1"), InvalidRequestError, "user_item.user_id"),
        (dict(user_id="u1", item_id=None), InvalidRequestError, "user_item.item_id"),
        (dict(user_id="nobody", item_id="i1"), NotFoundError, "user_item.user_id"),
        (dict(user_id="u1", item_id="none"), NotFoundError, "user_item.item_id"),
        (dict(hidden_state=np.zeros(3)), InvalidRequestError, "hidden_state"),
        (dict(hidden_state=np.full(4, np.inf)), InvalidRequestError, "hidden_state"),
        # finite but outside the GRU's range: NaN log-probs and garbage tokens if let through
        (dict(hidden_state=np.full(4, 3e38)), InvalidRequestError, "hidden_state"),
        (dict(hidden_state=np.full(4, -1.5)), InvalidRequestError, "hidden_state"),
        # ids are bounded and printable: refused before any lookup, not NOT_FOUND
        (dict(user_id="u" * (MAX_ENTITY_ID_LEN + 1), item_id="i1"), InvalidRequestError,
         "user_item.user_id"),
        (dict(user_id="u1", item_id="i\x001"), InvalidRequestError, "user_item.item_id"),
        (dict(user_id="u\n1", item_id="i1"), InvalidRequestError, "user_item.user_id"),
    ]
    for kwargs, kind, field in cases:
        with pytest.raises(kind) as info:
            b.build("r", DecodingParams(), **kwargs)
        assert info.value.field == field, kwargs
    with pytest.raises(InvalidRequestError) as info:
        builder(can_write_states=False).build("r", DecodingParams(), hidden_state=np.zeros(4))
    assert info.value.field == "hidden_state" and "raw states" in info.value.reason
    for bad_id in ("x" * (MAX_REQUEST_ID_LEN + 1), "new\nline"):
        with pytest.raises(InvalidRequestError) as info:
            b.build(bad_id, DecodingParams(), user_id="u1", item_id="i1")
        assert info.value.field == "request_id"


def test_not_found_names_the_id_and_its_place_in_a_batch():
    with pytest.raises(NotFoundError) as info:
        builder().build("r", DecodingParams(), user_id="ghost", item_id="i1")
    assert str(info.value) == "unknown user_id 'ghost'"
    nested = info.value.with_prefix("requests[1].")
    assert str(nested) == "requests[1]: unknown user_id 'ghost'"
    assert nested.field == "requests[1].user_item.user_id"


def test_built_requests_are_resolved_and_keyed_by_the_engine():
    b = builder()
    first = b.build("same", DecodingParams(), user_id="u2", item_id="i1")
    second = b.build("same", DecodingParams(), user_id="u2", item_id="i1")
    assert first.client_id == second.client_id == "same"
    assert first.request_id != second.request_id
    assert (first.user_index, first.item_index) == (1, 0)
    assert first.params.max_tokens == 15 and first.params.num_beams == 1
    beam = b.build("", DecodingParams(strategy=Strategy.BEAM), user_id="u1", item_id="i1")
    assert beam.params.num_beams == 4  # the default
    narrow = builder(max_beams=2).build(
        "", DecodingParams(strategy=Strategy.BEAM), user_id="u1", item_id="i1"
    )
    assert narrow.params.num_beams == 2  # the default, capped at the limit
    edge = b.build("", DecodingParams(), hidden_state=np.array([1.0, -1.0, 0.0, 0.5]))
    assert edge.hidden_state.tolist() == [1.0, -1.0, 0.0, 0.5]  # the bound is inclusive
    sampled = b.build("", DecodingParams(strategy=Strategy.SAMPLE), user_id="u1", item_id="i1")
    assert sampled.client_id and 0 <= sampled.seed < 2**63  # a seed picked and recorded


def test_ending_tokens_is_the_one_definition_of_an_ending():
    eos = 1
    chosen = np.array([1, 5, 7, 9])
    per_row = np.array([[5, -1], [5, -1], [-1, -1], [9, 7]])
    assert ending_tokens(chosen, eos).tolist() == [True, False, False, False]
    assert ending_tokens(chosen, eos, per_row).tolist() == [True, True, False, True]
    assert ending_tokens(chosen, eos, np.array([7])).tolist() == [True, False, True, False]
    candidates = np.array([[1, 5, 6], [8, 7, 9]])  # stop lists are padded with -1 (no token)
    stops = np.array([[6, -1], [9, -1]])
    assert ending_tokens(candidates, eos, stops).tolist() == [
        [True, False, True], [False, False, True],
    ]
    logprobs = np.log(np.full((2, 3), 1 / 3, np.float32))
    masked = suppress_token(logprobs, candidates, eos, np.array([True, False]), stops)
    assert np.isneginf(masked[0, [0, 2]]).all() and np.isfinite(masked[0, 1])
    assert np.isfinite(masked[1]).all()  # a row not selected keeps every candidate
