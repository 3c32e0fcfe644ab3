"""What an operator sees of a running server: JSON logs and the access log, x-request-id,
the metrics (checked against docs/metrics.md), OpenTelemetry spans, reflection v1."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from prometheus_client.parser import text_string_to_metric_families

import gruserve
from gruserve.inference import grpc_service_pb2 as oip_pb
from gruserve.inference import grpc_service_pb2_grpc as oip_grpc
from gruserve.runtime import cli, logs, reflection
from gruserve.runtime.cli_config import logging_from_args
from gruserve.runtime.client import GruserveClient, build_request
from gruserve.runtime.config import ConfigError, LoggingConfig
from gruserve.runtime.reflection import V1_FILE, V1_SERVICE_NAME
from gruserve.v1 import gruserve_pb2 as pb

from .serving import running_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(synthetic_bundle):
    return {"user": synthetic_bundle.users[0], "item": synthetic_bundle.items[0]}


@pytest.fixture
def json_log():
    """The JSON lines every logger writes while the test runs."""
    stream = io.StringIO()
    handler = logs.configure(LoggingConfig(log_format="json"), stream)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logging.getLogger().removeHandler(handler)


def _generate(client, *, metadata=(), **kwargs):
    return client.stub.Generate.with_call(build_request(**kwargs), timeout=30, metadata=metadata)


# --- logs -----------------------------------------------------------------------------------


def test_json_lines_and_one_access_line_per_rpc(synthetic_bundle_dir, pair, json_log):
    with running_server(synthetic_bundle_dir) as server, GruserveClient(server.target) as client:
        reply, call = _generate(client, metadata=(("x-request-id", "trace-abc-1"),), **pair)
        with pytest.raises(grpc.RpcError):
            client.generate(**dict(pair, user="nobody"), request_id="r-missing")
        chunks = list(client.stream(**pair, request_id="r-stream"))
        with grpc.insecure_channel(server.target) as channel:  # the other protocol, too
            oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                oip_pb.ServerLiveRequest(), timeout=10, metadata=(("x-request-id", "oip-1"),)
            )
    # the caller's x-request-id is the request's id and comes back in the metadata
    assert reply.request_id == "trace-abc-1"
    assert ("x-request-id", "trace-abc-1") in call.initial_metadata()
    records = json_log()
    for record in records:  # every line is one JSON object with the common fields
        assert {"time", "level", "logger", "message"} <= record.keys()
    access = [r for r in records if r["logger"] == "gruserve.access"]
    assert [(r["request_id"], r["status"]) for r in access] == [
        ("trace-abc-1", "OK"), ("r-missing", "NOT_FOUND"), ("r-stream", "OK"), ("oip-1", "OK"),
    ]
    assert access[3]["method"] == "inference.GRPCInferenceService/ServerLive"
    first = access[0]
    assert first["level"] == "INFO"
    assert first["method"] == "gruserve.v1.Generator/Generate"
    assert first["tokens"] == len(reply.token_ids)
    assert first["duration_ms"] > 0 and first["peer"].startswith("ipv")
    assert access[2]["tokens"] == sum(len(c.token_ids) for c in chunks)
    assert access[2]["method"] == "gruserve.v1.Generator/GenerateStream"
    startup = [r for r in records if "serving" in r["message"] and r["level"] == "INFO"]
    assert startup and f"gruserve {gruserve.__version__} serving" in startup[0]["message"]


def test_a_message_request_id_wins_over_the_header(synthetic_bundle_dir, pair, json_log):
    with running_server(synthetic_bundle_dir) as server, GruserveClient(server.target) as client:
        reply, call = _generate(
            client, metadata=(("x-request-id", "from-header"),), request_id="from-body", **pair
        )
        batch, batch_call = client.stub.GenerateBatch.with_call(
            pb.GenerateBatchRequest(requests=[build_request(**pair), build_request(**pair)]),
            timeout=30,
            metadata=(("x-request-id", "batch-7"),),
        )
        with pytest.raises(grpc.RpcError) as info:
            _generate(client, metadata=(("x-request-id", "x" * 129),), **pair)
    assert reply.request_id == "from-body"
    assert ("x-request-id", "from-header") in call.initial_metadata()
    assert ("x-request-id", "batch-7") in batch_call.initial_metadata()
    assert len({r.request_id for r in batch.responses}) == 2  # items keep their own ids
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("x-request-id: at most 128 characters")
    access = [r for r in json_log() if r["logger"] == "gruserve.access"]
    assert [r["request_id"] for r in access[:2]] == ["from-header", "batch-7"]


def test_the_access_log_can_be_turned_off(synthetic_bundle_dir, pair, caplog):
    caplog.set_level(logging.INFO, logger="gruserve.access")
    with running_server(synthetic_bundle_dir, access_log=False) as server:
        with GruserveClient(server.target) as client:
            client.generate(**pair)
    assert not [r for r in caplog.records if r.name == "gruserve.access"]


def test_log_settings_go_before_or_after_the_command_or_in_the_environment():
    parse = cli.build_parser().parse_args
    assert logging_from_args(parse(["serve", "--log-level", "DEBUG"]), {}).log_level == "DEBUG"
    assert logging_from_args(parse(["--log-level", "DEBUG", "info"]), {}).log_level == "DEBUG"
    after = logging_from_args(parse(["train", "--out", "x", "--log-format", "json"]), {})
    assert after == LoggingConfig(log_format="json")
    env = {"GRUSERVE_LOG_LEVEL": "WARNING", "GRUSERVE_LOG_FORMAT": "json"}
    assert logging_from_args(parse(["generate"]), env) == LoggingConfig("WARNING", "json")
    assert logging_from_args(parse(["generate", "--log-level", "ERROR"]), env).log_level == (
        "ERROR"
    )
    with pytest.raises(ConfigError, match="--log-format: must be one of text, json"):
        logging_from_args(parse(["info"]), {"GRUSERVE_LOG_FORMAT": "xml"})


def test_a_json_record_carries_its_exception_and_extras():
    record = logging.LogRecord("gruserve.x", logging.ERROR, __file__, 1, "failed %d", (3,), None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    record.status = "INTERNAL"
    with logs.request_context("ctx-id"):
        entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "failed 3" and entry["level"] == "ERROR"
    assert entry["request_id"] == "ctx-id" and entry["status"] == "INTERNAL"
    assert "RuntimeError: boom" in entry["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


# --- metrics --------------------------------------------------------------------------------


def _documented() -> dict[str, tuple[str, frozenset[str]]]:
    """series -> (type, labels) from the tables of docs/metrics.md."""
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            labels = frozenset(re.findall(r"`([a-z_]+)`", cells[3]))
            rows[cells[0].strip("`")] = (cells[1], labels)
    return rows


def _scraped(url: str) -> dict[str, tuple[str, frozenset[str]]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    assert "_created" not in text
    series = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        series[name] = (family.type, labels)
    return series


def test_every_series_is_documented_and_follows_the_conventions(synthetic_bundle_dir, pair):
    with running_server(synthetic_bundle_dir, metrics_port=0, max_queued=50) as server:
        with GruserveClient(server.target) as client:
            reply = client.generate(**pair)
            list(client.stream(**pair, max_tokens=3, min_tokens=3))
        scraped = _scraped(f"http://127.0.0.1:{server.server.metrics_port}/metrics")
        values = server.metrics()
    documented = _documented()
    assert scraped == documented
    for name, (kind, _) in scraped.items():
        assert name.endswith("_total") == (kind == "counter"), name
        assert name.startswith(("gruserve_", "process_", "python_")), name
        if kind == "gauge" and name.endswith("_info"):
            assert name in ("gruserve_build_info", "gruserve_model_info", "python_info")
    assert values[("gruserve_build_info", (("version", gruserve.__version__),))] == 1
    assert values[("gruserve_slot_capacity", ())] == 32
    assert values[("gruserve_queue_capacity", ())] == 50
    finished = {
        labels[0][1]: value for (name, labels), value in values.items()
        if name == "gruserve_finished_requests_total"
    }
    assert finished.get("length", 0) >= 1  # the stream: exactly 3 tokens
    assert sum(finished.values()) == 2  # warm-up is not an RPC: not counted
    assert values[("gruserve_request_generated_tokens_count", ())] == 2
    assert values[("gruserve_request_generated_tokens_sum", ())] == len(reply.token_ids) + 3
    assert values[("gruserve_inter_token_latency_seconds_count", ())] >= 1


# --- reflection -----------------------------------------------------------------------------


def test_reflection_v1_lists_and_describes_the_services(synthetic_bundle_dir):
    with running_server(synthetic_bundle_dir) as server:
        # a client's own copy of the v1 messages (the server's pool is its own)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(reflection._v1_file())
        request_cls = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
        )
        response_cls = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
        )
        with grpc.insecure_channel(server.target) as channel:
            call = channel.stream_stream(
                f"/{V1_SERVICE_NAME}/ServerReflectionInfo",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
            listed, described = call(iter([
                request_cls(list_services=""),
                request_cls(file_containing_symbol=V1_SERVICE_NAME),
            ]), timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert {"gruserve.v1.Generator", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            V1_SERVICE_NAME, "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    assert V1_FILE in {f.name for f in files}


# --- traces ---------------------------------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def test_each_rpc_is_a_span_with_the_request_story(synthetic_bundle_dir, pair):
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    with running_server(synthetic_bundle_dir, tracer_provider=provider) as server:
        with GruserveClient(server.target) as client:
            reply, _ = _generate(
                client, metadata=(("traceparent", traceparent),), request_id="t1", **pair
            )
            list(client.stream(**pair, request_id="t2"))
            with pytest.raises(grpc.RpcError):
                client.generate(**dict(pair, user="nobody"), request_id="t3")
    spans = {s.attributes["gruserve.request_id"]: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"t1", "t2", "t3"}
    first = spans["t1"]
    assert first.name == "gruserve.v1.Generator/Generate" and first.kind is SpanKind.SERVER
    assert format(first.context.trace_id, "032x") == TRACE_ID  # the caller's trace
    assert format(first.parent.span_id, "016x") == PARENT_ID
    assert first.attributes["rpc.system"] == "grpc"
    assert first.attributes["rpc.grpc.status_code"] == 0
    events = [e.name for e in first.events]
    assert events == ["queued", "admitted", "first_token", "finished"]
    times = [e.timestamp for e in first.events]
    assert times == sorted(times) and first.start_time <= times[0] <= times[-1] <= first.end_time
    assert first.events[-1].attributes["gruserve.num_tokens"] == len(reply.token_ids)
    assert spans["t2"].name == "gruserve.v1.Generator/GenerateStream"
    assert [e.name for e in spans["t2"].events][-1] == "finished"
    assert spans["t2"].parent is None  # no traceparent: a new trace
    assert spans["t3"].attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert spans["t3"].status.status_code is StatusCode.UNSET  # the client's error, not ours


def test_the_runtime_serves_without_opentelemetry(synthetic_bundle_dir):
    """The otel extra is optional: with its packages made unimportable the server still
    starts and answers, and asking for an exporter says what to install."""
    code = f"""
import sys
sys.modules["opentelemetry"] = None  # import opentelemetry now raises ImportError
from gruserve.runtime import tracing
from gruserve.runtime.client import GruserveClient
from gruserve.runtime.config import ConfigError
from tests.serving import running_server
assert not tracing.available()
with running_server({str(synthetic_bundle_dir)!r}) as server, GruserveClient(server.target) as c:
    info = c.model_info()
    reply = c.generate(user=server.bundle.users[0], item=server.bundle.items[0])
    assert reply.token_ids
try:
    tracing.make_provider("otlp")
except ConfigError as exc:
    print(exc)
print("served", "opentelemetry" in str([m for m in sys.modules if sys.modules[m]]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "--trace-exporter: otlp needs the otel extra (pip install 'gruserve[otel]')"
    assert lines[-1] == "served False"


@pytest.mark.parametrize("exporter", ["otlp", "console"])
def test_the_trace_exporters_build(exporter):
    pytest.importorskip("opentelemetry.sdk")
    from gruserve.runtime.tracing import make_provider

    provider = make_provider(exporter)
    try:
        # not ended: nothing is queued, so shutting down exports nothing (no collector here)
        assert provider.get_tracer("t").start_span("s").is_recording()
        assert provider.resource.attributes["service.name"] == "gruserve"
    finally:
        provider.shutdown()
    assert make_provider("none") is None


def test_the_operations_guide_lists_every_setting_as_generated():
    from gruserve.runtime.cli_config import TABLE_BEGIN, TABLE_END, settings_table

    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.partition(TABLE_BEGIN)[2].partition(TABLE_END)[0].strip()
    assert table == settings_table(), (
        "docs/operations.md is stale: run python -m gruserve.runtime.cli_config "
        "docs/operations.md"
    )
    for variable in ("GRUSERVE_LOG_FORMAT", "GRUSERVE_NUM_SLOTS", "GRUSERVE_ACCESS_LOG"):
        assert f"`{variable}`" in table
