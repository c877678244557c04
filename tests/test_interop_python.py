"""Acceptance: the OpenTelemetry Python SDK's own OTLP exporters against ``trace-source serve`` run as a process.

Spans and log records are made with the real SDK (``TracerProvider`` / ``LoggerProvider`` with batch and simple
processors) and sent by the real OTLP/HTTP (protobuf) and OTLP/gRPC exporters, plain and gzip-compressed. What
landed is read back independently — the embedded log with ``LocalLogReader``, Kafka with an aiokafka consumer from
the beginning of a fresh topic — and every span id sent must be there exactly once, under its trace id's key, with
the span, its resource and its scope exactly as the exporter encoded them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import requests
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    InMemoryLogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from interop_support import (
    Landed,
    RecordingLogExporter,
    RecordingSpanExporter,
    assert_each_span_exactly_once,
    attributes,
    check_record_contract,
    landed_kafka,
    landed_local,
    log_records_of,
    make_agent_traces,
    metric,
    span_exporter,
)
from serve_proc import ServeProcess

SCOPE = ("interop.python.agent", "0.3.0")
RESOURCE_ATTRS = {"service.name": "interop-py-agent", "service.version": "2.0.1", "deployment.environment.name": "ci",
                  "agent.framework": "handmade"}

# (transport, gzip?, processor): every exporter and compression, both processor kinds.
CLIENTS = [
    pytest.param("http", False, "batch", id="http-batch"),
    pytest.param("http", True, "simple", id="http-gzip-simple"),
    pytest.param("grpc", False, "simple", id="grpc-simple"),
    pytest.param("grpc", True, "batch", id="grpc-gzip-batch"),
]


def send_agent_traces(serve: ServeProcess, transport: str, gzip: bool, processor: str, n_traces: int = 4,
                      headers: dict | None = None):
    """Run the SDK: returns (span id -> trace id, the finished ReadableSpans, the exporter's results)."""
    provider = TracerProvider(resource=Resource.create(RESOURCE_ATTRS), shutdown_on_exit=False)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    exporter = RecordingSpanExporter(span_exporter(serve, transport, gzip, headers))
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_export_batch_size=7, schedule_delay_millis=50) if processor == "batch"
        else SimpleSpanProcessor(exporter))
    ids = make_agent_traces(provider, SCOPE, n_traces)
    assert provider.force_flush(30_000)
    provider.shutdown()
    return ids, memory.get_finished_spans(), exporter.results


def assert_spans_as_sent(records: list[Landed], ids: dict[str, str], finished) -> None:
    """Exactly once each, and span + resource + scope equal to what the exporter encodes for them."""
    by_id = assert_each_span_exactly_once(records, ids)
    sent = encode_spans(finished)
    n_checked = 0
    for rs in sent.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                landed = by_id[span.span_id.hex()]
                assert landed.span == span, f"span {span.name} changed on the way"
                assert landed.resource_spans.resource == rs.resource
                assert landed.resource_spans.schema_url == rs.schema_url
                assert landed.scope_spans.scope == ss.scope
                n_checked += 1
    assert n_checked == len(ids)
    # Spot checks that don't rely on the encoder above: resource, scope, GenAI attributes, nesting, error status.
    any_span = next(iter(by_id.values()))
    assert {k: v for k, v in attributes(any_span.resource_spans.resource.attributes).items()
            if k in RESOURCE_ATTRS} == RESOURCE_ATTRS
    assert (any_span.scope_spans.scope.name, any_span.scope_spans.scope.version) == SCOPE
    spans = [ls.span for ls in by_id.values()]
    errors = [s for s in spans if s.status.code == ProtoStatus.STATUS_CODE_ERROR]
    assert len(errors) == len({s.trace_id for s in spans})  # one failing tool call per trace
    assert all(s.status.message == "tool timed out" and s.name.startswith("execute_tool") for s in errors)
    assert all(any(e.name == "exception" for e in s.events) for s in errors)
    chat = next(s for s in spans if s.name.startswith("chat"))
    attrs = attributes(chat.attributes)
    assert attrs["gen_ai.request.model"] == "gpt-4o" and attrs["gen_ai.usage.input_tokens"] >= 120
    assert [e.name for e in chat.events] == ["gen_ai.content.prompt", "gen_ai.content.completion"]
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == len({s.trace_id for s in spans})
    for s in spans:
        if s.parent_span_id:
            assert s.parent_span_id.hex() in by_id, f"{s.name}: parent not among the landed spans"


def assert_all_succeeded(results) -> None:
    assert results, "the exporter was never called"
    assert all(r == SpanExportResult.SUCCESS for r, _ in results), results


def check_protocol_metrics(serve: ServeProcess, transport: str, gzip: bool, n_requests: int) -> None:
    """The requests arrived over the intended protocol, each answered OK once (no retries), compressed if asked."""
    status = "200" if transport == "http" else "OK"
    assert metric(serve.http_url, "trace_source_requests_total", protocol=transport, signal="traces",
                  status=status) == n_requests
    other = "grpc" if transport == "http" else "http"
    assert metric(serve.http_url, "trace_source_requests_total", protocol=other) == 0
    if transport == "http":  # HTTP bodies are decompressed by trace-source itself, so both sizes are visible
        received = metric(serve.http_url, "trace_source_received_bytes_total", protocol="http")
        decoded = metric(serve.http_url, "trace_source_decoded_bytes_total", protocol="http")
        assert (received < decoded) if gzip else (received == decoded), (received, decoded)


# --------------------------------------------------------------------------- spans


@pytest.mark.parametrize("transport,gzip,processor", CLIENTS)
def test_sdk_spans_land_exactly_once_in_embedded_log(tmp_path: Path, transport, gzip, processor):
    before = time.time_ns()
    with ServeProcess(tmp_path / "state") as serve:
        ids, finished, results = send_agent_traces(serve, transport, gzip, processor)
        assert_all_succeeded(results)
        records = landed_local(serve.state_dir)  # read while serve runs: acknowledged means committed
        check_protocol_metrics(serve, transport, gzip, len(results))
    check_record_contract(records, source_id="default", received_between=(before, time.time_ns()))
    assert {r.signal for r in records} == {"traces"}
    assert len(ids) == 4 * 5
    assert_spans_as_sent(records, ids, finished)


@pytest.mark.kafka
@pytest.mark.parametrize("transport,gzip,processor", CLIENTS)
async def test_sdk_spans_land_exactly_once_on_kafka(tmp_path: Path, kafka_bootstrap: str, kafka_topic: str,
                                                   transport, gzip, processor):
    before = time.time_ns()
    with ServeProcess(tmp_path / "state", "--kafka-topic", kafka_topic, kafka_bootstrap=kafka_bootstrap) as serve:
        ids, finished, results = await asyncio.to_thread(send_agent_traces, serve, transport, gzip, processor)
        assert_all_succeeded(results)
        # Read before stopping serve: a 200 / OK means Kafka already acknowledged (acks=all).
        records = await landed_kafka(kafka_bootstrap, kafka_topic)
        check_protocol_metrics(serve, transport, gzip, len(results))
    assert not (tmp_path / "state" / "spans.db").exists(), "with Kafka configured nothing goes to the embedded log"
    check_record_contract(records, source_id="default", received_between=(before, time.time_ns()))
    assert {r.signal for r in records} == {"traces"}
    assert_spans_as_sent(records, ids, finished)
    # Per-trace records: one trace id per record, and every trace's records share one partition (keyed by trace).
    partitions: dict[str, set[str]] = {}
    for rec in records:
        partitions.setdefault(rec.key, set()).add(rec.where.split(" offset")[0])
    assert len(partitions) == 4 and all(len(p) == 1 for p in partitions.values()), partitions


# --------------------------------------------------------------------------- logs


def send_logs(serve: ServeProcess, transport: str):
    """Five log records through the SDK's OTLP log exporter: three inside spans of two traces, two outside any
    span. Returns ({seq: (trace id hex | None, span id hex | None)}, finished log records, exporter results)."""
    resource = Resource.create(RESOURCE_ATTRS)
    logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
    memory = InMemoryLogRecordExporter()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    inner = (HttpLogExporter(endpoint=f"{serve.http_url}/v1/logs", timeout=30) if transport == "http"
             else GrpcLogExporter(endpoint=serve.grpc_target, insecure=True, timeout=30))
    exporter = RecordingLogExporter(inner)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=50))
    logger = logger_provider.get_logger("interop.python.logs", "0.3.0")
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    tracer = tracer_provider.get_tracer(*SCOPE)

    expected: dict[int, tuple[str | None, str | None]] = {}

    def emit(seq: int, span=None) -> None:
        logger.emit(body=f"log-{seq}", severity_number=SeverityNumber.INFO, severity_text="INFO",
                    attributes={"log.seq": seq, "gen_ai.agent.name": "planner"})
        if span is None:
            expected[seq] = (None, None)
        else:
            ctx = span.get_span_context()
            expected[seq] = (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))

    emit(0)
    with tracer.start_as_current_span("invoke_agent a") as a:
        emit(1, a)
    with tracer.start_as_current_span("invoke_agent b") as b:
        emit(2, b)
        with tracer.start_as_current_span("execute_tool search") as tool:
            emit(3, tool)
    emit(4)
    assert logger_provider.force_flush(30_000)
    logger_provider.shutdown()
    tracer_provider.shutdown()
    return expected, memory.get_finished_logs(), exporter.results


def assert_logs_as_sent(records: list[Landed], expected, finished) -> None:
    assert records and {r.signal for r in records} == {"logs"}
    landed = log_records_of(records)  # also checks key == trace id hex / None
    seqs = [int(attributes(ls.span.attributes)["log.seq"]) for ls in landed]
    assert sorted(seqs) == sorted(expected), f"log records landed: {sorted(seqs)}"
    sent = {lr.body.string_value: (rl, sl, lr)
            for rl in encode_logs(finished).resource_logs for sl in rl.scope_logs for lr in sl.log_records}
    for ls in landed:
        lr = ls.span
        seq = int(attributes(lr.attributes)["log.seq"])
        trace_id, span_id = expected[seq]
        assert (lr.trace_id.hex() or None) == trace_id and (lr.span_id.hex() or None) == span_id, seq
        assert ls.record.key == trace_id
        rl, sl, sent_lr = sent[f"log-{seq}"]
        assert lr == sent_lr and ls.resource_spans.resource == rl.resource and ls.scope_spans.scope == sl.scope
        assert (ls.scope_spans.scope.name, attributes(ls.resource_spans.resource.attributes)["service.name"]) == (
            "interop.python.logs", RESOURCE_ATTRS["service.name"])
    # Two traces -> their own records; the three records without a trace id under the null key.
    assert {r.key for r in records} == {t for t, _ in expected.values()}


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_sdk_logs_land_keyed_by_trace_in_embedded_log(tmp_path: Path, transport):
    with ServeProcess(tmp_path / "state") as serve:
        expected, finished, results = send_logs(serve, transport)
        assert results and all(r == LogRecordExportResult.SUCCESS for r in results), results
        records = landed_local(serve.state_dir)
        assert metric(serve.http_url, "trace_source_items_accepted_total", signal="logs") == 5
    check_record_contract(records, source_id="default")
    assert_logs_as_sent(records, expected, finished)


@pytest.mark.kafka
@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_sdk_logs_land_keyed_by_trace_on_kafka(tmp_path: Path, kafka_bootstrap: str, kafka_topic: str,
                                                    transport):
    with ServeProcess(tmp_path / "state", "--kafka-topic", kafka_topic, kafka_bootstrap=kafka_bootstrap) as serve:
        expected, finished, results = await asyncio.to_thread(send_logs, serve, transport)
        assert results and all(r == LogRecordExportResult.SUCCESS for r in results), results
        records = await landed_kafka(kafka_bootstrap, kafka_topic)
    check_record_contract(records, source_id="default")
    assert any(r.key is None for r in records)  # a real Kafka null key, not "" or "None"
    assert_logs_as_sent(records, expected, finished)


# --------------------------------------------------------------------------- auth


def make_spans(n_traces: int = 2):
    provider = TracerProvider(resource=Resource.create(RESOURCE_ATTRS), shutdown_on_exit=False)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    ids = make_agent_traces(provider, SCOPE, n_traces, steps=1)
    provider.shutdown()
    return ids, memory.get_finished_spans()


def exercise_auth(serve: ServeProcess) -> dict[str, str]:
    """Good token over both exporters (must succeed), wrong or missing tokens over both exporters and raw requests
    (must be refused). Returns the span ids that were accepted."""
    accepted: dict[str, str] = {}
    for transport in ("http", "grpc"):
        key = "Authorization" if transport == "http" else "authorization"  # gRPC metadata keys are lowercase
        ids, spans = make_spans()
        good = span_exporter(serve, transport, headers={key: "Bearer tok-a"})
        assert good.export(spans) == SpanExportResult.SUCCESS, transport
        good.shutdown()
        accepted.update(ids)
        for headers in ({key: "Bearer tok-b"}, {key: "Bearer tok-a-but-longer"}, {key: "tok-a"}, None):
            _, rejected_spans = make_spans()
            bad = span_exporter(serve, transport, headers=headers)
            assert bad.export(rejected_spans) == SpanExportResult.FAILURE, (transport, headers)
            bad.shutdown()

    raw_ids, raw_spans = make_spans()
    body = encode_spans(raw_spans).SerializeToString()
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        resp = requests.post(f"{serve.http_url}/v1/traces", data=body, timeout=10,
                             headers={"Content-Type": "application/x-protobuf", **headers})
        assert resp.status_code == 401, resp.text
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = requests.post(f"{serve.http_url}/v1/traces", data=body, timeout=10,
                         headers={"Content-Type": "application/x-protobuf", "Authorization": "Bearer tok-a"})
    assert resp.status_code == 200
    assert not ExportTraceServiceResponse.FromString(resp.content).HasField("partial_success")
    accepted.update(raw_ids)

    with grpc.insecure_channel(serve.grpc_target) as channel:
        stub = TraceServiceStub(channel)
        request = ExportTraceServiceRequest.FromString(body)
        for metadata in ((("authorization", "Bearer wrong"),), ()):
            with pytest.raises(grpc.RpcError) as info:
                stub.Export(request, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return accepted


AUTH_ARGS = ("--auth-tokens", "tok-a=agent-a,tok-z=agent-z")


def check_auth_metrics(serve: ServeProcess) -> None:
    assert metric(serve.http_url, "trace_source_requests_total", protocol="http", status="401") == 4 + 2
    assert metric(serve.http_url, "trace_source_requests_total", protocol="grpc", status="UNAUTHENTICATED") == 4 + 2


def test_auth_tokens_embedded(tmp_path: Path):
    with ServeProcess(tmp_path / "state", *AUTH_ARGS) as serve:
        accepted = exercise_auth(serve)
        records = landed_local(serve.state_dir)
        check_auth_metrics(serve)
    check_record_contract(records, source_id="agent-a")
    assert_each_span_exactly_once(records, accepted)  # nothing of the refused requests landed


@pytest.mark.kafka
async def test_auth_tokens_kafka(tmp_path: Path, kafka_bootstrap: str, kafka_topic: str):
    with ServeProcess(tmp_path / "state", *AUTH_ARGS, "--kafka-topic", kafka_topic,
                      kafka_bootstrap=kafka_bootstrap) as serve:
        accepted = await asyncio.to_thread(exercise_auth, serve)
        records = await landed_kafka(kafka_bootstrap, kafka_topic)
        check_auth_metrics(serve)
    check_record_contract(records, source_id="agent-a")
    assert_each_span_exactly_once(records, accepted)
