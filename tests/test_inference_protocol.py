"""The Open Inference Protocol (KServe v2 / Triton) over real sockets, spoken by Triton's own
client (tritonclient.grpc): health and metadata, inference that gives exactly what
gruserve.v1 gives, fan-out, streaming, every error status, auth and the metrics."""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_pb_grpc
from tritonclient.utils import InferenceServerException

from gruserve.inference import grpc_service_pb2 as oip_pb
from gruserve.runtime.client import GruserveClient, build_request
from gruserve.v1 import gruserve_pb2 as pb

from .serving import WAIT_S, ServerThread, StepGate, running_server, wait_for

TOKEN = "s3cret-token"
FINISH_NAMES = {
    pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_TOKEN: "stop_token",
}
SAMPLE = dict(strategy="sample", max_tokens=12, temperature=1.5, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def server(synthetic_bundle_dir):
    # no result cache: these tests compare what each protocol decodes, and the cache would
    # answer one protocol with the other's answers (tests/test_result_cache.py tests it)
    with running_server(synthetic_bundle_dir, metrics_port=0, cache_size=0) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def native(server):
    with GruserveClient(server.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def model(synthetic_bundle):
    return synthetic_bundle.name


@pytest.fixture(scope="module")
def pairs(synthetic_bundle):
    return list(zip(synthetic_bundle.users[:8], synthetic_bundle.items[:8], strict=True))


def id_inputs(pairs, *, column: bool = False) -> list[triton.InferInput]:
    """USER_ID and ITEM_ID, BYTES [N] (or [N, 1]), sent as raw contents (tritonclient's way)."""
    inputs = []
    for name, values in (("USER_ID", [u for u, _ in pairs]), ("ITEM_ID", [i for _, i in pairs])):
        array = np.array([v.encode() for v in values], dtype=np.object_)
        if column:
            array = array.reshape(-1, 1)
        tensor = triton.InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def state_input(states: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("HIDDEN_STATE", list(states.shape), "FP32")
    tensor.set_data_from_numpy(states.astype(np.float32))
    return tensor


def rows(result) -> list[dict]:
    """Each row of an InferResult: its tokens (TOKEN_IDS cut at LENGTHS), text, rating, ..."""
    tokens, lengths = result.as_numpy("TOKEN_IDS"), result.as_numpy("LENGTHS")
    texts, reasons = result.as_numpy("TEXT"), result.as_numpy("FINISH_REASON")
    ratings = result.as_numpy("RATING")
    return [
        {
            "tokens": tokens[i, : lengths[i]].tolist(), "text": texts[i].decode(),
            "rating": ratings[i], "finish": reasons[i].decode(),
        }
        for i in range(len(lengths))
    ]


def native_rows(native, pairs, **params) -> list[dict]:
    out = []
    for user, item in pairs:
        reply = native.generate(user=user, item=item, **params)
        out.append({
            "tokens": list(reply.token_ids), "text": reply.text,
            "rating": np.float32(reply.predicted_rating),
            "finish": FINISH_NAMES[reply.finish_reason],
        })
    return out


def triton_error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def status_of(error: InferenceServerException) -> str:
    return error.status()  # e.g. "StatusCode.INVALID_ARGUMENT"


# --- health and metadata --------------------------------------------------------------------


def test_live_ready_and_metadata(client, model, synthetic_bundle, server):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, synthetic_bundle.version)
    meta = client.get_server_metadata()
    assert meta.name == "gruserve"
    assert meta.version
    assert "model_configuration" in meta.extensions
    model_meta = client.get_model_metadata(model)
    assert model_meta.name == model
    assert list(model_meta.versions) == [synthetic_bundle.version]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in model_meta.inputs}
    width = synthetic_bundle.num_layers * synthetic_bundle.hidden_size
    assert inputs == {
        "USER_ID": ("BYTES", [-1]), "ITEM_ID": ("BYTES", [-1]),
        "HIDDEN_STATE": ("FP32", [-1, width]),
    }
    outputs = {t.name: t.datatype for t in model_meta.outputs}
    assert outputs == {
        "TOKEN_IDS": "INT64", "LENGTHS": "INT64", "TEXT": "BYTES", "RATING": "FP32",
        "FINISH_REASON": "BYTES", "LOGPROBS": "FP32",
    }
    config = client.get_model_config(model).config
    assert config.name == model
    assert config.max_batch_size == 0
    assert {i.name for i in config.input} == set(inputs)
    assert all(i.optional for i in config.input)
    assert config.parameters["bundle_version"].string_value == synthetic_bundle.version
    assert config.parameters["pad_id"].string_value == str(synthetic_bundle.special_ids["pad"])
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        (model, synthetic_bundle.version, "READY")
    ]


def test_health_lists_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_model_or_version_is_not_found(client, model, pairs):
    for call in (
        lambda: client.is_model_ready("no-such-model"),
        lambda: client.get_model_metadata("no-such-model"),
        lambda: client.get_model_metadata(model, "123"),
        lambda: client.get_model_config(model, "0"),
        lambda: client.infer("no-such-model", id_inputs(pairs[:1])),
        lambda: client.infer(model, id_inputs(pairs[:1]), model_version="1"),
    ):
        error = triton_error(call)
        assert status_of(error) == "StatusCode.NOT_FOUND"
        assert "no-such-model" in error.message() or "version" in error.message()


# --- inference ------------------------------------------------------------------------------


def test_infer_returns_what_generate_returns(client, native, model, pairs):
    expected = native_rows(native, pairs[:1])
    result = client.infer(model, id_inputs(pairs[:1]), request_id="req-1")
    assert rows(result) == expected
    response = result.get_response()
    assert response.id == "req-1"
    assert response.model_name == model
    # [N, 1] ids are the same request
    assert rows(client.infer(model, id_inputs(pairs[:1], column=True))) == expected


def test_seeded_sampling_matches_generate(client, native, model, pairs):
    expected = native_rows(native, pairs[:3], **SAMPLE)
    result = client.infer(model, id_inputs(pairs[:3]), parameters=SAMPLE)
    assert rows(result) == expected
    # and other seeds give other texts (the seed reaches the sampler)
    texts = {
        tuple(rows(client.infer(model, id_inputs(pairs[:1]), parameters=dict(SAMPLE, seed=s)))[0]
              ["tokens"])
        for s in range(6)
    }
    assert len(texts) > 1


def test_fan_out_decodes_the_rows_together(client, native, model, pairs, server):
    """N = 8 rows are 8 generations submitted at once: they share decode steps."""
    expected = native_rows(native, pairs)
    before = server.metrics()
    result = client.infer(model, id_inputs(pairs))
    after = server.metrics()
    assert rows(result) == expected
    assert result.as_numpy("TOKEN_IDS").shape == (8, max(len(r["tokens"]) for r in expected))

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    # steps that ran more than 4 rows: only concurrent decoding makes them
    assert ("gruserve_step_batch_size_bucket", (("le", "4.0"),)) in after
    wide_steps = delta("gruserve_step_batch_size_count") - delta(
        "gruserve_step_batch_size_bucket", le="4.0"
    )
    assert wide_steps >= 1
    assert delta("gruserve_requests_total", rpc="ModelInfer", code="OK") == 1
    assert delta("gruserve_request_latency_seconds_count") == 8


def test_hidden_state_rows(client, native, model, synthetic_bundle):
    rng = np.random.default_rng(0)
    width = synthetic_bundle.num_layers * synthetic_bundle.hidden_size
    states = rng.uniform(-1, 1, (2, width)).astype(np.float32)
    result = client.infer(model, [state_input(states)], parameters={"max_tokens": 10})
    got = rows(result)
    for row, state in zip(got, states, strict=True):
        reply = native.generate(hidden_state=state.tolist(), max_tokens=10)
        assert row["tokens"] == list(reply.token_ids)
        assert row["text"] == reply.text
        assert np.isnan(row["rating"])  # no encoder ran


def test_decoding_options_match_generate(client, native, model, pairs):
    cases = [
        dict(strategy="beam", num_beams=3, length_penalty=0.5),
        dict(max_tokens=3, min_tokens=3),
        dict(strategy="sample", top_k=1, seed=5, max_tokens=12),
    ]
    for params in cases:
        assert rows(client.infer(model, id_inputs(pairs[:2]), parameters=params)) == (
            native_rows(native, pairs[:2], **params)
        ), params
    # stop_token_ids: a string of ids ("3,17") or one id
    tokens = native_rows(native, pairs[:1])[0]["tokens"]
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    for stop in (f"{tokens[cut]}", f"{tokens[cut]},{tokens[cut]}", tokens[cut]):
        got = rows(client.infer(model, id_inputs(pairs[:1]),
                                parameters={"stop_token_ids": stop}))[0]
        assert got["tokens"] == tokens[:cut]
        assert got["finish"] == "stop_token"


def test_logprobs_output(client, native, model, pairs):
    params = {"return_logprobs": True}
    result = client.infer(model, id_inputs(pairs[:2]), parameters=params)
    logprobs, lengths = result.as_numpy("LOGPROBS"), result.as_numpy("LENGTHS")
    for i, (user, item) in enumerate(pairs[:2]):
        reply = native.generate(user=user, item=item, return_logprobs=True)
        assert logprobs[i, : lengths[i]].tolist() == pytest.approx(list(reply.token_logprobs))
        assert (logprobs[i, lengths[i]:] == 0).all()
    # without return_logprobs there is no LOGPROBS output
    assert client.infer(model, id_inputs(pairs[:1])).as_numpy("LOGPROBS") is None


def test_requested_outputs_are_the_outputs(client, native, model, pairs):
    outputs = [triton.InferRequestedOutput("TEXT"), triton.InferRequestedOutput("TOKEN_IDS")]
    result = client.infer(model, id_inputs(pairs[:1]), outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["TEXT", "TOKEN_IDS"]
    assert result.as_numpy("TEXT")[0].decode() == native_rows(native, pairs[:1])[0]["text"]


def _typed_request(model, pairs=None, state=None) -> triton_pb.ModelInferRequest:
    """A request with typed contents (no raw bytes), built with tritonclient's own messages."""
    request = triton_pb.ModelInferRequest(model_name=model)
    if pairs is not None:
        users, items = [u for u, _ in pairs], [i for _, i in pairs]
        for name, values in (("USER_ID", users), ("ITEM_ID", items)):
            tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(values)])
            tensor.contents.bytes_contents.extend(v.encode() for v in values)
    if state is not None:
        tensor = request.inputs.add(name="HIDDEN_STATE", datatype="FP32", shape=list(state.shape))
        tensor.contents.fp32_contents.extend(state.reshape(-1).tolist())
    return request


@pytest.fixture(scope="module")
def triton_stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield triton_pb_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_are_accepted(triton_stub, client, model, pairs, synthetic_bundle):
    raw = client.infer(model, id_inputs(pairs[:3]))
    typed = triton.InferResult(triton_stub.ModelInfer(_typed_request(model, pairs[:3]), timeout=30))
    assert rows(typed) == rows(raw)
    width = synthetic_bundle.num_layers * synthetic_bundle.hidden_size
    state = np.linspace(-1, 1, width, dtype=np.float32).reshape(1, width)
    typed = triton_stub.ModelInfer(_typed_request(model, state=state), timeout=30)
    raw = client.infer(model, [state_input(state)])
    (typed_row,), (raw_row,) = rows(triton.InferResult(typed)), rows(raw)
    assert np.isnan(typed_row.pop("rating")) and np.isnan(raw_row.pop("rating"))
    assert typed_row == raw_row


# --- streaming ------------------------------------------------------------------------------


def _final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


class Stream:
    """tritonclient's stream: responses collected per request id from its callback."""

    def __init__(self, client, **kwargs) -> None:
        self.client = client
        self.results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: self.results.put((result, error)),
                            **kwargs)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.client.stop_stream(cancel_requests=True)

    def next(self):
        return self.results.get(timeout=30)

    def until_final(self, ids: set[str]) -> tuple[dict[str, list], list]:
        """Every response up to each of `ids`' final one; errors apart."""
        responses: dict[str, list] = {i: [] for i in ids}
        errors, open_ids = [], set(ids)
        while open_ids:
            result, error = self.next()
            if error is not None:
                errors.append(error)
                continue
            request_id = result.get_response().id
            responses[request_id].append(result)
            if _final(result):
                open_ids.discard(request_id)
        return responses, errors


def _joined(responses: list, row: int = 0) -> dict:
    """A streamed request's row, its chunks put together, as rows() gives a unary one."""
    chunks, final = responses[:-1], responses[-1]
    assert chunks and all(not _final(c) for c in chunks) and _final(final)
    tokens, text = [], ""
    for chunk in chunks:
        length = chunk.as_numpy("LENGTHS")[row]
        tokens += chunk.as_numpy("TOKEN_IDS")[row, :length].tolist()
        text += chunk.as_numpy("TEXT")[row].decode()
        assert chunk.as_numpy("FINISH_REASON") is None  # on the final response only
    assert final.as_numpy("TOKEN_IDS").shape[1] == 0  # the tokens were all in the chunks
    return {
        "tokens": tokens, "text": text, "rating": final.as_numpy("RATING")[row],
        "finish": final.as_numpy("FINISH_REASON")[row].decode(),
    }


def test_stream_gives_the_same_tokens(client, native, model, pairs):
    expected = native_rows(native, pairs[:3], **SAMPLE)
    with Stream(client) as stream:
        client.async_stream_infer(model, id_inputs(pairs[:1]), request_id="one",
                                  parameters=SAMPLE)
        client.async_stream_infer(model, id_inputs(pairs[:3]), request_id="three",
                                  parameters=SAMPLE, enable_empty_final_response=True)
        responses, errors = stream.until_final({"one", "three"})
    assert not errors
    assert _joined(responses["one"]) == expected[0]
    assert [_joined(responses["three"], row) for row in range(3)] == expected


def test_stream_sends_each_step_as_it_comes(server, client, native, model, pairs):
    """One response per decode step while the client keeps up: tokens arrive before the
    text is finished."""
    params = {"max_tokens": 4, "min_tokens": 4}
    expected = native_rows(native, pairs[:1], **params)[0]
    with StepGate(server.engine) as gate, Stream(client) as stream:
        client.async_stream_infer(model, id_inputs(pairs[:1]), request_id="s", parameters=params)
        chunks = []
        for _ in range(4):
            gate.allow(1)
            result, error = stream.next()
            assert error is None and not _final(result)
            chunks.append(result.as_numpy("TOKEN_IDS")[0].tolist())
        assert [len(c) for c in chunks] == [1, 1, 1, 1]
        assert sum(chunks, []) == expected["tokens"]
        gate.open()
        result, error = stream.next()
        assert _final(result)
        assert result.as_numpy("FINISH_REASON")[0].decode() == "length"


def test_stream_errors_come_in_band(client, native, model, pairs):
    """A bad request on the stream gets its error; the stream serves the others."""
    with Stream(client) as stream:
        client.async_stream_infer(model, id_inputs([("nobody", pairs[0][1])]), request_id="bad")
        client.async_stream_infer("no-such-model", id_inputs(pairs[:1]), request_id="lost")
        client.async_stream_infer(model, id_inputs(pairs[:1]), request_id="good")
        responses, errors = stream.until_final({"good"})
        while len(errors) < 2:
            result, error = stream.next()
            assert error is not None
            errors.append(error)
    assert _joined(responses["good"]) == native_rows(native, pairs[:1])[0]
    messages = sorted(str(e) for e in errors)
    assert messages[0].startswith("[request id: bad] NOT_FOUND: inputs.USER_ID[0]: ")
    assert messages[1].startswith("[request id: lost] NOT_FOUND: unknown model 'no-such-model'")


def test_cancelling_a_stream_frees_its_slots(server, client, model, pairs):
    engine = server.engine
    aborted = engine.stats.num_requests_aborted
    with StepGate(engine) as gate:
        stream = Stream(client)
        client.async_stream_infer(model, id_inputs(pairs[:3]), request_id="gone")
        gate.wait_blocked()  # the three rows are decoding
        assert engine.num_in_flight == 3
        key = ("gruserve_requests_total", (("code", "CANCELLED"), ("rpc", "ModelStreamInfer")))
        before = server.metrics().get(key, 0)
        stream.__exit__()  # tritonclient cancels the stream
        wait_for(lambda: server.metrics().get(key, 0) == before + 1, "the server to see it")
        gate.open()  # the aborts are applied at this step's end
    wait_for(lambda: engine.num_in_flight == 0, "the stream's rows to be aborted")
    assert engine.stats.num_requests_aborted == aborted + 3


def test_async_client_infer_and_stream(server, native, model, pairs):
    expected = native_rows(native, pairs[:2])

    async def main():
        async with triton_aio.InferenceServerClient(server.target) as client:
            assert await client.is_server_ready()
            unary = await client.infer(model, id_inputs(pairs[:2]))

            async def requests():
                for i, pair in enumerate(pairs[:2]):
                    yield {"model_name": model, "inputs": id_inputs([pair]), "request_id": str(i)}

            streamed: dict[str, list] = {"0": [], "1": []}
            # the client half-closes after its requests: the server ends the stream once
            # they are answered
            async for result, error in client.stream_infer(requests()):
                assert error is None
                streamed[result.get_response().id].append(result)
            return unary, streamed

    unary, streamed = asyncio.run(asyncio.wait_for(main(), 60))
    assert rows(unary) == expected
    assert [_joined(streamed[str(i)]) for i in range(2)] == expected


# --- errors ---------------------------------------------------------------------------------


def _ids_tensor(name, values, shape=None, datatype="BYTES"):
    tensor = triton.InferInput(name, shape or [len(values)], datatype)
    if datatype == "BYTES":
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_)
                                   .reshape(shape or [len(values)]))
    else:
        tensor.set_data_from_numpy(np.array(values, dtype=np.int64))
    return tensor


def _state(width, n=1):
    return state_input(np.zeros((n, width), np.float32))


# (inputs(pair, width), parameters, outputs, what the error must name)
INVALID = {
    "wrong dtype": (lambda p, w: [_ids_tensor("USER_ID", [1], datatype="INT64"),
                                  _ids_tensor("ITEM_ID", [p[1]])], None, None, "inputs.USER_ID"),
    "wrong shape": (lambda p, w: [_ids_tensor("USER_ID", [p[0]] * 4, shape=[2, 2]),
                                  _ids_tensor("ITEM_ID", [p[1]])], None, None, "inputs.USER_ID"),
    "missing input": (lambda p, w: [_ids_tensor("USER_ID", [p[0]])], None, None,
                      "inputs.ITEM_ID"),
    "unknown input": (lambda p, w: [*id_inputs([p]), _ids_tensor("COLOUR", ["red"])], None,
                      None, "inputs.COLOUR"),
    "no input": (lambda p, w: [], None, None, "inputs"),
    "ids and state": (lambda p, w: [*id_inputs([p]), _state(w)], None, None, "inputs"),
    "state width": (lambda p, w: [_state(w + 1)], None, None, "inputs.HIDDEN_STATE"),
    "rows differ": (lambda p, w: [_ids_tensor("USER_ID", [p[0]] * 2),
                                  _ids_tensor("ITEM_ID", [p[1]])], None, None, "inputs.ITEM_ID"),
    "too many rows": (lambda p, w: id_inputs([p] * 65), None, None, "inputs.USER_ID"),
    "empty id": (lambda p, w: [_ids_tensor("USER_ID", [""]), _ids_tensor("ITEM_ID", [p[1]])],
                 None, None, "inputs.USER_ID[0]"),
    "bad top_p": (lambda p, w: id_inputs([p]), {"strategy": "sample", "top_p": 1.5}, None,
                  "parameters.top_p"),
    "bad temperature": (lambda p, w: id_inputs([p]), {"strategy": "sample", "temperature": -1.0},
                        None, "parameters.temperature"),
    "unknown parameter": (lambda p, w: id_inputs([p]), {"max_token": 5}, None,
                          "parameters.max_token"),
    "parameter type": (lambda p, w: id_inputs([p]), {"max_tokens": "5"}, None,
                       "parameters.max_tokens"),
    "unknown strategy": (lambda p, w: id_inputs([p]), {"strategy": "fast"}, None,
                         "parameters.strategy"),
    "too many tokens": (lambda p, w: id_inputs([p]), {"max_tokens": 1000}, None,
                        "parameters.max_tokens"),
    "negative": (lambda p, w: id_inputs([p]), {"min_tokens": -1}, None, "parameters.min_tokens"),
    "min over max": (lambda p, w: id_inputs([p]), {"max_tokens": 3, "min_tokens": 5}, None,
                     "parameters.min_tokens"),
    "beams": (lambda p, w: id_inputs([p]), {"strategy": "beam", "num_beams": 99}, None,
              "parameters.num_beams"),
    "stop ids": (lambda p, w: id_inputs([p]), {"stop_token_ids": "3,x"}, None,
                 "parameters.stop_token_ids"),
    "stop id range": (lambda p, w: id_inputs([p]), {"stop_token_ids": "99999"}, None,
                      "parameters.stop_token_ids"),
    "unknown output": (lambda p, w: id_inputs([p]), None, ["SCORE"], "outputs.SCORE"),
    "logprobs output": (lambda p, w: id_inputs([p]), None, ["LOGPROBS"], "outputs.LOGPROBS"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_argument_names_it(client, model, pairs, synthetic_bundle, case):
    make_inputs, parameters, outputs, field = INVALID[case]
    width = synthetic_bundle.num_layers * synthetic_bundle.hidden_size
    requested = [triton.InferRequestedOutput(n) for n in outputs] if outputs else None
    error = triton_error(client.infer, model, make_inputs(pairs[0], width),
                         parameters=parameters, outputs=requested)
    assert status_of(error) == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith(f"{field}: "), error.message()


def test_sequences_and_long_ids_are_invalid(client, model, pairs):
    error = triton_error(client.infer, model, id_inputs(pairs[:1]), sequence_id=7)
    assert status_of(error) == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith("parameters.sequence_id: ")
    error = triton_error(client.infer, model, id_inputs(pairs[:1]), request_id="x" * 500)
    assert error.message().startswith("id: ")
    # Triton's own parameters that change nothing here are accepted
    assert client.infer(model, id_inputs(pairs[:1]), priority=1, timeout=10**6)


def test_unknown_ids_are_not_found_and_name_the_row(client, model, pairs):
    error = triton_error(client.infer, model, id_inputs([pairs[0], ("nobody", pairs[1][1])]))
    assert status_of(error) == "StatusCode.NOT_FOUND"
    assert error.message() == "inputs.USER_ID[1]: unknown user_id 'nobody'"
    error = triton_error(client.infer, model, id_inputs([(pairs[0][0], "nothing")]))
    assert error.message() == "inputs.ITEM_ID[0]: unknown item_id 'nothing'"


def _raw_request(model, tensors, raw) -> triton_pb.ModelInferRequest:
    request = triton_pb.ModelInferRequest(model_name=model, raw_input_contents=raw)
    for name, datatype, shape in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


def _bytes(*values: bytes) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def test_malformed_tensor_data_is_invalid(triton_stub, model, pairs, synthetic_bundle):
    user, item = (v.encode() for v in pairs[0])
    width = synthetic_bundle.num_layers * synthetic_bundle.hidden_size
    ids = [("USER_ID", "BYTES", [1]), ("ITEM_ID", "BYTES", [1])]
    state = [("HIDDEN_STATE", "FP32", [1, width])]
    typed_twice = _raw_request(model, ids, [_bytes(user), _bytes(item)])
    typed_twice.inputs[0].contents.bytes_contents.append(user)
    wrong_field = _raw_request(model, state, [])
    wrong_field.inputs[0].contents.fp64_contents.extend([0.0] * width)
    short_typed = _raw_request(model, ids, [])
    short_typed.inputs[0].contents.bytes_contents.append(user)
    cases = {
        "raw_input_contents": _raw_request(model, ids, [_bytes(user)]),
        "inputs.HIDDEN_STATE": _raw_request(model, state, [b"\0" * (4 * width - 4)]),
        "inputs.USER_ID": _raw_request(model, ids, [_bytes(user)[:-1], _bytes(item)]),
        "inputs.USER_ID[0]": _raw_request(model, ids, [_bytes(b"\xff\xfe"), _bytes(item)]),
        "inputs.HIDDEN_STATE[0]": _raw_request(
            model, state, [np.full(width, np.inf, np.float32).tobytes()]),
        "inputs.ITEM_ID": _raw_request(model, ids, [_bytes(user), _bytes(item, item)]),
    }
    cases_typed = {"inputs.USER_ID": typed_twice, "inputs.HIDDEN_STATE": wrong_field,
                   "inputs.ITEM_ID": short_typed}
    for field, request in [*cases.items(), *cases_typed.items()]:
        with pytest.raises(grpc.RpcError) as info:
            triton_stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert info.value.details().startswith(f"{field}: "), info.value.details()


def test_unparsable_request_is_invalid(server):
    garbage = b"\xff\xff\xff\xff"
    with grpc.insecure_channel(server.target) as channel:
        unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            unary(garbage, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([garbage]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelStreamInfer request" in info.value.details()


def test_refused_triton_extensions_say_why(client, model, server):
    before = server.metrics()
    for call, words in (
        (lambda: client.get_inference_statistics(model), "/metrics"),
        (lambda: client.load_model(model), "SIGHUP"),
        (lambda: client.unload_model(model), "SIGHUP"),
        (lambda: client.get_system_shared_memory_status(), "shared memory"),
        (lambda: client.get_cuda_shared_memory_status(), "shared memory"),
        (lambda: client.get_trace_settings(), "tracing"),
        (lambda: client.get_log_settings(), "--log-level"),
    ):
        error = triton_error(call)
        assert status_of(error) == "StatusCode.UNIMPLEMENTED"
        assert words in error.message()
    key = ("gruserve_requests_total", (("code", "UNIMPLEMENTED"), ("rpc", "ModelStatistics")))
    assert server.metrics()[key] == before.get(key, 0) + 1


def test_queue_full_is_resource_exhausted(synthetic_bundle_dir, model, pairs):
    with running_server(synthetic_bundle_dir, num_slots=1, max_queued=1) as server, \
            GruserveClient(server.target) as native, \
            triton.InferenceServerClient(server.target) as client, \
            StepGate(server.engine) as gate:
        running = native.stub.Generate.future(build_request(user=pairs[0][0], item=pairs[0][1]),
                                              timeout=30)
        gate.wait_blocked()  # the first request holds the only slot, mid-step
        waiting = native.stub.Generate.future(build_request(user=pairs[0][0], item=pairs[0][1]),
                                              timeout=30)
        wait_for(lambda: server.engine.num_in_flight == 2, "the queued request")
        error = triton_error(client.infer, model, id_inputs(pairs[:1]))
        assert status_of(error) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue" in error.message()
        gate.open()
        assert running.result().token_ids and waiting.result().token_ids
        # a fan-out bigger than the queue fails whole, and leaves nothing behind
        error = triton_error(client.infer, model, id_inputs(pairs[:3]))
        assert status_of(error) == "StatusCode.RESOURCE_EXHAUSTED"
        wait_for(lambda: server.engine.num_in_flight == 0, "the aborted rows")
        assert rows(client.infer(model, id_inputs(pairs[:1])))


def test_broken_engine_is_unavailable_and_not_ready(synthetic_bundle_dir, model, pairs):
    with running_server(synthetic_bundle_dir) as server, \
            triton.InferenceServerClient(server.target) as client:
        assert client.is_server_ready() and client.is_model_ready(model)

        def broken_step(*args, **kwargs):
            raise RuntimeError("device lost")

        server.engine.runner.step = broken_step
        error = triton_error(client.infer, model, id_inputs(pairs[:1]))
        assert status_of(error) == "StatusCode.UNAVAILABLE"
        assert not client.is_server_ready()
        assert not client.is_model_ready(model)
        assert client.is_server_live()
        with grpc.insecure_channel(server.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert client.get_model_repository_index().models[0].state == "UNAVAILABLE"


def test_ready_follows_health_through_start_up(synthetic_bundle_dir, model):
    thread = ServerThread(synthetic_bundle_dir).create()
    try:
        with StepGate(thread.engine) as gate:
            starting = asyncio.run_coroutine_threadsafe(thread.server.start(), thread.loop)
            gate.wait_blocked()  # warm-up is decoding: the port is bound, SERVING not yet
            with triton.InferenceServerClient(thread.target) as client:
                assert client.is_server_live()
                assert not client.is_server_ready()
                assert not client.is_model_ready(model)
                gate.open()
                starting.result(WAIT_S)
                assert client.is_server_ready()
                assert client.is_model_ready(model)
    finally:
        thread.stop()


# --- auth, metrics, reflection, the contract ------------------------------------------------


def test_token_auth_applies(synthetic_bundle_dir, model, pairs):
    with running_server(synthetic_bundle_dir, auth_token=TOKEN, metrics_port=0) as server, \
            triton.InferenceServerClient(server.target) as client:
        good = {"authorization": f"Bearer {TOKEN}"}
        for headers in (None, {"authorization": "Bearer wrong"}):
            for call in (
                lambda h=headers: client.is_server_ready(headers=h),
                lambda h=headers: client.get_model_metadata(model, headers=h),
                lambda h=headers: client.infer(model, id_inputs(pairs[:1]), headers=h),
                lambda h=headers: client.get_inference_statistics(model, headers=h),
            ):
                assert status_of(triton_error(call)) == "StatusCode.UNAUTHENTICATED"
        assert client.is_server_ready(headers=good)
        assert rows(client.infer(model, id_inputs(pairs[:1]), headers=good))
        with Stream(client, headers={"authorization": "Bearer wrong"}) as stream:
            _result, error = stream.next()  # the stream itself is refused, at once
            assert "UNAUTHENTICATED" in str(error.status())
        with Stream(client, headers=good) as stream:
            client.async_stream_infer(model, id_inputs(pairs[:1]), request_id="ok")
            responses, errors = stream.until_final({"ok"})
        assert not errors and _final(responses["ok"][-1])
        denied = ("gruserve_requests_total", (("code", "UNAUTHENTICATED"), ("rpc", "ModelInfer")))
        assert server.metrics()[denied] == 2


def test_metrics_count_by_method_and_code(server, client, model, pairs):
    before = server.metrics()
    client.infer(model, id_inputs(pairs[:2]))
    triton_error(client.infer, model, id_inputs(pairs[:1]), parameters={"max_tokens": 1000})
    triton_error(client.infer, model, id_inputs([("nobody", pairs[0][1])]))
    client.is_server_ready()
    with Stream(client) as stream:
        client.async_stream_infer(model, id_inputs(pairs[:1]), request_id="m")
        client.async_stream_infer(model, id_inputs([("nobody", pairs[0][1])]))
        _responses, errors = stream.until_final({"m"})
        if not errors:
            errors.append(stream.next()[1])
        assert errors[0] is not None
    after = server.metrics()

    def delta(rpc, code):
        key = ("gruserve_requests_total", (("code", code), ("rpc", rpc)))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("ModelInfer", "OK") == 1
    assert delta("ModelInfer", "INVALID_ARGUMENT") == 1
    assert delta("ModelInfer", "NOT_FOUND") == 1
    assert delta("ServerReady", "OK") == 1
    # each request on a stream is counted on its own (before its last response leaves)
    assert delta("ModelStreamInfer", "OK") == 1
    assert delta("ModelStreamInfer", "NOT_FOUND") == 1


def test_reflection_serves_the_protocol(server):
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        assert "gruserve.v1.Generator" in database.get_services()
        file = database.FindFileContainingSymbol("inference.ModelInferRequest")
    assert file.package == "inference"
    assert "ModelStreamInfer" in [m.name for m in file.service[0].method]


def _fields(descriptor) -> dict[str, tuple]:
    return {
        f.name: (f.number, f.type, f.is_repeated,
                 f.message_type.full_name if f.message_type else None,
                 f.enum_type.full_name if f.enum_type else None,
                 f.containing_oneof.name if f.containing_oneof else None)
        for f in descriptor.fields
    }


def _messages(descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _messages(nested)


def test_the_proto_matches_tritonclients():
    """Every message, field, enum value and method gruserve declares is Triton's own, name
    and number (Triton declares more: gruserve serves a subset)."""
    theirs = triton_pb.DESCRIPTOR.pool  # tritonclient's messages, model_config.proto's too
    ours = oip_pb.DESCRIPTOR
    assert ours.package == triton_pb.DESCRIPTOR.package == "inference"
    for top in ours.message_types_by_name.values():
        for message in _messages(top):
            their = theirs.FindMessageTypeByName(message.full_name)
            mine, triton_fields = _fields(message), _fields(their)
            assert {n: triton_fields.get(n) for n in mine} == mine, message.full_name
    for enum in ours.enum_types_by_name.values():
        their = theirs.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in their.values}
    service = ours.services_by_name["GRPCInferenceService"]
    their_service = theirs.FindServiceByName(service.full_name)
    for method in service.methods:
        their = their_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming) == (
            their.input_type.full_name, their.output_type.full_name,
            their.client_streaming, their.server_streaming)
    # and it lives in a pool of its own, beside tritonclient's in this very process
    assert ours.pool is not theirs

