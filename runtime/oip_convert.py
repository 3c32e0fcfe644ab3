"""Open Inference Protocol messages <-> the engine's requests and outputs. With oip_servicer,
the only modules that know grpc_service_pb2.

One model per server: the bundle, named after it (`bundle.name`), with one version, the
bundle's version (its manifest's sha256[:12]; a reload to a changed bundle changes it).
An empty version means the one served. Every value check of a decoding option is the
RequestBuilder's, as for gruserve.v1; this module only reads tensors and parameters and
names what it cannot read (`inputs.USER_ID`, `parameters.top_p`, `outputs.TEXT`).
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass

import numpy as np

from gruserve.inference import grpc_service_pb2 as pb

from .bundle import ModelInfo
from .engine import Engine
from .errors import InvalidRequestError, NotFoundError, RequestError
from .model_host import Served
from .oip_tensors import (
    decode_bytes,
    decode_numeric,
    element_count,
    encode_bytes,
    encode_numeric,
    padded,
)
from .requests import DecodingParams, Request, RequestOutput, Strategy
from .sampler import SamplingParams

SERVER_NAME = "gruserve"
PLATFORM = "gruserve"
# Triton's extension names: request parameters, the ModelConfig RPC
EXTENSIONS = ("parameters", "model_configuration")
FINAL_RESPONSE = "triton_final_response"  # Triton's flag on a decoupled model's last response


@dataclass(frozen=True)
class TensorDef:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable


def input_defs(info: ModelInfo) -> tuple[TensorDef, ...]:
    """Conditioning: USER_ID and ITEM_ID, or HIDDEN_STATE; N rows = N generations."""
    return (
        TensorDef("USER_ID", "BYTES", (-1,)),
        TensorDef("ITEM_ID", "BYTES", (-1,)),
        TensorDef("HIDDEN_STATE", "FP32", (-1, info.num_layers * info.hidden_size)),
    )


OUTPUT_DEFS = (
    TensorDef("TOKEN_IDS", "INT64", (-1, -1)),  # [N, T], padded with the model's <pad> id
    TensorDef("LENGTHS", "INT64", (-1,)),  # tokens of each row in TOKEN_IDS
    TensorDef("TEXT", "BYTES", (-1,)),  # UTF-8, the tokens' words joined by spaces
    TensorDef("RATING", "FP32", (-1,)),  # NaN for a row conditioned on HIDDEN_STATE
    TensorDef("FINISH_REASON", "BYTES", (-1,)),  # eos | length | stop_token
    TensorDef("LOGPROBS", "FP32", (-1, -1)),  # [N, T] like TOKEN_IDS, 0-padded
)
OUTPUT_NAMES = tuple(d.name for d in OUTPUT_DEFS)
# what a stream's chunk responses carry; RATING and FINISH_REASON come on the final one
CHUNK_OUTPUTS = frozenset({"TOKEN_IDS", "LENGTHS", "TEXT", "LOGPROBS"})
_CONFIG_TYPES = {"BYTES": pb.TYPE_STRING, "FP32": pb.TYPE_FP32, "INT64": pb.TYPE_INT64}
_TYPED_FIELDS = {"BYTES": "bytes_contents", "FP32": "fp32_contents"}

# decoding options: request parameter -> the kind of value it takes
_DECODING_PARAMETERS = {
    "strategy": str, "max_tokens": int, "min_tokens": int, "temperature": float,
    "top_k": int, "top_p": float, "seed": int, "num_beams": int, "length_penalty": float,
    "stop_token_ids": tuple, "return_logprobs": bool,
}
# Triton's own request parameters that change nothing here: requests are FIFO, deadlines
# are the gRPC call's, and a stream always ends with a final response
_IGNORED_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_start", "sequence_end", "triton_enable_empty_final_response"}
)
# the RequestBuilder's names for what this protocol calls inputs
_INPUT_OF_FIELD = {
    "user_item.user_id": "USER_ID", "user_item.item_id": "ITEM_ID",
    "hidden_state": "HIDDEN_STATE",
}


# --- the model ----------------------------------------------------------------------------


def check_model(served: Served, name: str, version: str, *, fields=("name", "version")) -> None:
    """NotFoundError unless `name` (and `version`, if given) is what is served."""
    model = served.bundle.name
    if name != model:
        raise NotFoundError(fields[0], f"unknown model {name!r} (this server serves {model!r})")
    if version and version != served.version:
        raise NotFoundError(
            fields[1], f"model {model!r} has no version {version!r} (serving {served.version!r})"
        )


def server_metadata() -> pb.ServerMetadataResponse:
    try:
        version = importlib.metadata.version("gruserve")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=EXTENSIONS)


def _tensor_metadata(defs) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=d.name, datatype=d.datatype, shape=d.shape)
        for d in defs
    ]


def model_metadata(served: Served) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=served.bundle.name, versions=[served.version], platform=PLATFORM,
        inputs=_tensor_metadata(input_defs(served.engine.info)),
        outputs=_tensor_metadata(OUTPUT_DEFS),
    )


def model_config(served: Served, *, max_rows: int) -> pb.ModelConfigResponse:
    engine = served.engine
    limits = engine.limits
    parameters = {
        "bundle_version": served.version, "precision": served.bundle.precision,
        "provider": served.provider, "pad_id": engine.info.pad_id,
        "default_max_tokens": limits.default_max_tokens, "max_tokens": limits.max_tokens,
        "sampling_top_k": limits.sampling_top_k, "max_beams": limits.max_beams,
        "max_rows": max_rows,
    }
    config = pb.ModelConfig(
        name=served.bundle.name, platform=PLATFORM, max_batch_size=0,
        input=[
            pb.ModelInput(name=d.name, data_type=_CONFIG_TYPES[d.datatype], dims=d.shape,
                          optional=True)
            for d in input_defs(engine.info)
        ],
        output=[
            pb.ModelOutput(name=d.name, data_type=_CONFIG_TYPES[d.datatype], dims=d.shape)
            for d in OUTPUT_DEFS
        ],
        parameters={k: pb.ModelParameter(string_value=str(v)) for k, v in parameters.items()},
        # unary ModelInfer answers whole texts; ModelStreamInfer streams them
        model_transaction_policy=pb.ModelTransactionPolicy(decoupled=False),
    )
    return pb.ModelConfigResponse(config=config)


def repository_index(served: Served, *, ready: bool, ready_only: bool):
    index = pb.RepositoryIndexResponse()
    if ready or not ready_only:
        index.models.add(
            name=served.bundle.name, version=served.version,
            state="READY" if ready else "UNAVAILABLE",
        )
    return index


# --- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InferCall:
    """A ModelInferRequest read and validated: one engine request per row."""

    id: str
    model_name: str
    model_version: str
    requests: list[Request]
    outputs: tuple[str, ...]
    pad_id: int


def _parameter(field: str, p: pb.InferParameter, kind: type):
    which = p.WhichOneof("parameter_choice")
    value = getattr(p, which) if which else None
    integral = which in ("int64_param", "uint64_param")
    if kind is int and integral:
        if value < 0:
            raise InvalidRequestError(field, f"must be >= 0, got {value}")
        return value
    if kind is float and (integral or which == "double_param"):
        return float(value)
    if kind is bool and which == "bool_param":
        return value
    if kind is str and which == "string_param":
        return value
    if kind is tuple and integral:
        return (value,)
    if kind is tuple and which == "string_param":
        text = value.strip().removeprefix("[").removesuffix("]")
        try:
            return tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise InvalidRequestError(
                field, f"must be token ids separated by commas, got {value!r}"
            ) from None
    wanted = {int: "an integer (int64_param)", float: "a number (double_param)",
              bool: "a bool_param", str: "a string_param",
              tuple: "token ids (a string_param '3,17' or an int64_param)"}[kind]
    raise InvalidRequestError(field, f"must be {wanted}, got {which or 'no value'}")


def decoding_params(parameters) -> DecodingParams:
    """The request's parameters as DecodingParams (an unset option keeps its default)."""
    values, sampling = {}, {}
    for key, p in parameters.items():
        field = f"parameters.{key}"
        if key in _DECODING_PARAMETERS:
            value = _parameter(field, p, _DECODING_PARAMETERS[key])
            if key in ("temperature", "top_k", "top_p", "seed"):
                sampling[key] = value
            else:
                values[key] = value
        elif key == "sequence_id":
            which = p.WhichOneof("parameter_choice")
            if which and getattr(p, which):  # 0 / "": not part of a sequence
                raise InvalidRequestError(
                    field, "sequences are not supported: every request stands alone"
                )
        elif key not in _IGNORED_PARAMETERS:
            raise InvalidRequestError(
                field, f"unknown parameter (known: {', '.join(_DECODING_PARAMETERS)})"
            )
    if "strategy" in values:
        choices = [s.value for s in Strategy]
        if values["strategy"] not in choices:
            raise InvalidRequestError(
                "parameters.strategy",
                f"must be one of {', '.join(choices)}, got {values['strategy']!r}",
            )
        values["strategy"] = Strategy(values["strategy"])
    if "stop_token_ids" in values:
        values["stop_token_ids"] = tuple(values["stop_token_ids"])
    return DecodingParams(**values, sampling=SamplingParams(**sampling))


def _typed_contents(field: str, tensor) -> list:
    expected = _TYPED_FIELDS[tensor.datatype]
    for descriptor, _values in tensor.contents.ListFields():
        if descriptor.name != expected:
            raise InvalidRequestError(
                field, f"{tensor.datatype} data goes in contents.{expected}, "
                f"not contents.{descriptor.name}",
            )
    return list(getattr(tensor.contents, expected))


def _tensor_values(field: str, tensor, raw: bytes | None, definition: TensorDef):
    """(shape, values): values a list of bytes (BYTES) or a float32 array (FP32)."""
    if tensor.datatype != definition.datatype:
        raise InvalidRequestError(
            field, f"datatype must be {definition.datatype}, got {tensor.datatype or 'none'}"
        )
    for key in tensor.parameters:
        raise InvalidRequestError(f"{field}.parameters.{key}", "tensor parameters (shared "
                                  "memory) are not supported: send the data in the request")
    shape = list(tensor.shape)
    count = element_count(field, shape)
    if raw is None:
        values = _typed_contents(field, tensor)
        if len(values) != count:
            raise InvalidRequestError(
                field, f"shape {shape} needs {count} values, contents hold {len(values)}"
            )
        if definition.datatype == "FP32":
            values = np.asarray(values, dtype=np.float32)
    else:
        if tensor.contents.ListFields():
            raise InvalidRequestError(field, "data given twice: raw_input_contents and contents")
        if definition.datatype == "BYTES":
            values = decode_bytes(field, raw, count)
        else:
            values = decode_numeric(field, definition.datatype, raw, count)
    return shape, values


def _rows(field: str, shape: list[int], width: int | None) -> int:
    """N of an [N] / [N, 1] id tensor (width None) or an [N, width] state tensor."""
    if width is None:
        ok = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        wanted = "[N] or [N, 1]"
    else:
        ok = len(shape) == 2 and shape[1] == width
        wanted = f"[N, {width}] (N rows of num_layers * hidden_size)"
    if not ok or shape[0] < 1:
        raise InvalidRequestError(field, f"shape must be {wanted} with N >= 1, got {shape}")
    return shape[0]


def _conditioning(message, info: ModelInfo, max_rows: int) -> list[dict]:
    """One make_request keyword set per row: user_id + item_id, or hidden_state."""
    defs = {d.name: d for d in input_defs(info)}
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise InvalidRequestError(
            "raw_input_contents",
            f"needs one entry per input ({len(message.inputs)}), got {len(raw)}",
        )
    tensors: dict[str, tuple[list[int], object]] = {}
    for index, tensor in enumerate(message.inputs):
        field = f"inputs.{tensor.name}"
        if tensor.name not in defs:
            raise InvalidRequestError(field, f"unknown input (known: {', '.join(defs)})")
        if tensor.name in tensors:
            raise InvalidRequestError(field, "given twice")
        tensors[tensor.name] = _tensor_values(
            field, tensor, raw[index] if raw else None, defs[tensor.name]
        )
    if "HIDDEN_STATE" in tensors:
        if "USER_ID" in tensors or "ITEM_ID" in tensors:
            raise InvalidRequestError("inputs", "give USER_ID and ITEM_ID, or HIDDEN_STATE, "
                                                "not both")
        shape, values = tensors["HIDDEN_STATE"]
        n = _rows("inputs.HIDDEN_STATE", shape, defs["HIDDEN_STATE"].shape[1])
        rows = [{"hidden_state": row} for row in values.reshape(n, -1)]
        first = "HIDDEN_STATE"
    elif "USER_ID" in tensors or "ITEM_ID" in tensors:
        for name, other in (("USER_ID", "ITEM_ID"), ("ITEM_ID", "USER_ID")):
            if name not in tensors:
                raise InvalidRequestError(f"inputs.{name}", f"required with {other}")
        users = _ids("USER_ID", *tensors["USER_ID"])
        items = _ids("ITEM_ID", *tensors["ITEM_ID"])
        if len(items) != len(users):
            raise InvalidRequestError(
                "inputs.ITEM_ID", f"has {len(items)} rows, USER_ID has {len(users)}"
            )
        rows = [{"user_id": u, "item_id": i} for u, i in zip(users, items, strict=True)]
        first = "USER_ID"
    else:
        raise InvalidRequestError(
            "inputs", "give USER_ID and ITEM_ID (BYTES [N]) or HIDDEN_STATE (FP32 [N, "
            f"{defs['HIDDEN_STATE'].shape[1]}])",
        )
    if len(rows) > max_rows:
        raise InvalidRequestError(
            f"inputs.{first}", f"{len(rows)} rows; at most {max_rows} generations per request"
        )
    return rows


def _ids(name: str, shape: list[int], values: list[bytes]) -> list[str]:
    _rows(f"inputs.{name}", shape, None)
    ids = []
    for row, value in enumerate(values):
        try:
            ids.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequestError(f"inputs.{name}[{row}]", "not valid UTF-8") from None
    return ids


def _requested_outputs(message, params: DecodingParams) -> tuple[str, ...]:
    if not message.outputs:
        names = [n for n in OUTPUT_NAMES if n != "LOGPROBS" or params.return_logprobs]
        return tuple(names)
    names = []
    for output in message.outputs:
        field = f"outputs.{output.name}"
        if output.name not in OUTPUT_NAMES:
            raise InvalidRequestError(field, f"unknown output (known: {', '.join(OUTPUT_NAMES)})")
        if output.name in names:
            raise InvalidRequestError(field, "requested twice")
        for key in output.parameters:
            raise InvalidRequestError(f"{field}.parameters.{key}", "output parameters "
                                      "(classification, shared memory) are not supported")
        if output.name == "LOGPROBS" and not params.return_logprobs:
            raise InvalidRequestError(field, "needs parameters.return_logprobs = true")
        names.append(output.name)
    return tuple(names)


def _renamed(error: RequestError, row: int) -> RequestError:
    """A RequestBuilder error about an input, named as this protocol names it."""
    if error.field == "request_id":
        return type(error)("id", error.reason)
    name = _INPUT_OF_FIELD.get(error.field)
    if name is None:
        return error  # parameters.* are named alike in both protocols
    field = f"inputs.{name}[{row}]"
    return type(error)(field, error.reason, scope=f"{field}.")


def infer_call(
    served: Served, message: pb.ModelInferRequest, *, stream: bool, max_rows: int
) -> InferCall:
    """Raises InvalidRequestError / NotFoundError naming the model, input, parameter or
    output."""
    check_model(served, message.model_name, message.model_version,
                fields=("model_name", "model_version"))
    engine: Engine = served.engine
    params = decoding_params(message.parameters)
    outputs = _requested_outputs(message, params)
    requests = []
    for row, conditioning in enumerate(_conditioning(message, engine.info, max_rows)):
        try:
            requests.append(
                engine.make_request(message.id, params, stream=stream, **conditioning)
            )
        except RequestError as exc:
            raise _renamed(exc, row) from None
    return InferCall(
        id=message.id, model_name=served.bundle.name, model_version=served.version,
        requests=requests, outputs=outputs, pad_id=engine.info.pad_id,
    )


# --- responses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One generation's part of a response (all of it, or a stream's chunk)."""

    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    rating: float | None = None
    finish_reason: str = ""


def row_of(output: RequestOutput, info: ModelInfo) -> Row:
    tokens = output.token_ids or []
    return Row(
        tokens, output.logprobs, info.detokenize(tokens), output.predicted_rating,
        output.finish_reason.value if output.finish_reason else "",
    )


def _encoded(name: str, rows: list[Row], pad_id: int) -> tuple[str, list[int], bytes]:
    if name == "TOKEN_IDS":
        array = padded([r.token_ids for r in rows], pad_id, np.int64)
    elif name == "LOGPROBS":
        array = padded([r.logprobs or [] for r in rows], 0.0, np.float32)
    elif name == "LENGTHS":
        array = np.array([len(r.token_ids) for r in rows], np.int64)
    elif name == "RATING":
        array = np.array([math.nan if r.rating is None else r.rating for r in rows], np.float32)
    else:
        values = [r.text if name == "TEXT" else r.finish_reason for r in rows]
        return "BYTES", [len(rows)], encode_bytes([v.encode("utf-8") for v in values])
    datatype = "INT64" if array.dtype == np.int64 else "FP32"
    return datatype, list(array.shape), encode_numeric(datatype, array)


def infer_response(
    call: InferCall, rows: list[Row], names=None, *, final: bool | None = None
) -> pb.ModelInferResponse:
    """The outputs `names` (default: the call's) of `rows`, as raw contents, as Triton
    sends them; `final` sets Triton's triton_final_response flag (streams only)."""
    response = pb.ModelInferResponse(
        model_name=call.model_name, model_version=call.model_version, id=call.id
    )
    for name in call.outputs if names is None else names:
        datatype, shape, raw = _encoded(name, rows, call.pad_id)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    if final is not None:
        response.parameters[FINAL_RESPONSE].bool_param = final
    return response


def stream_chunk(call: InferCall, rows: list[Row]) -> pb.ModelStreamInferResponse:
    names = [n for n in call.outputs if n in CHUNK_OUTPUTS]
    return pb.ModelStreamInferResponse(infer_response=infer_response(call, rows, names,
                                                                     final=False))


def stream_final(call: InferCall, finals: list[Row]) -> pb.ModelStreamInferResponse:
    """The last response of a request: every row's rating and finish reason (the tokens
    were all in the chunks: the token outputs are empty here)."""
    rows = [Row([], [], "", r.rating, r.finish_reason) for r in finals]
    return pb.ModelStreamInferResponse(infer_response=infer_response(call, rows, final=True))


def stream_error(message: pb.ModelInferRequest, code_name: str, details: str):
    """A failed request on a stream: the error in-band, the stream stays open. Triton's
    client hands a callback only the message, so it names the request (as Triton does)."""
    prefix = f"[request id: {message.id}] " if message.id else ""
    return pb.ModelStreamInferResponse(
        error_message=f"{prefix}{code_name}: {details}",
        infer_response=pb.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version, id=message.id
        ),
    )
