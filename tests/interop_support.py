"""Helpers for the "real clients" acceptance tests (tests/test_interop_*.py, tests/test_retry_broker_down.py).

Reads back what ``trace-source serve`` wrote — from the embedded log with :class:`sinks.local_log.LocalLogReader` or
from a Kafka topic with aiokafka — as :class:`Landed` records, decodes the OTLP values, and checks the record contract
of ``sinks.base`` (key = trace id hex of every span inside, headers). Also: OpenTelemetry Python SDK span generation
shaped like an AI agent run, and ``/metrics`` parsing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import requests
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from sinks.base import (
    HEADER_CONTENT_TYPE,
    HEADER_RECEIVED_AT,
    HEADER_SIGNAL,
    HEADER_SOURCE_ID,
    HEADER_TRANSPORT,
    SPANS_TOPIC,
    VALUE_CONTENT_TYPE,
    prompt_trace_id_of,
)
from sinks.local_log import LOG_FILENAME, LocalLogReader

HEADER_NAMES = (HEADER_SOURCE_ID, HEADER_SIGNAL, HEADER_RECEIVED_AT, HEADER_CONTENT_TYPE, HEADER_TRANSPORT)


@dataclass(frozen=True)
class Landed:
    """One record as it landed, whichever sink: ``key`` as text (or None), headers as text."""

    key: str | None
    value: bytes
    headers: dict[str, str]
    where: str  # for failure messages: "local-log offset 7" / "kafka partition 2 offset 5"

    @property
    def signal(self) -> str:
        return self.headers.get(HEADER_SIGNAL, "")

    @property
    def source_id(self) -> str:
        return self.headers.get(HEADER_SOURCE_ID, "")


# --------------------------------------------------------------------------- reading back


def landed_local(state_dir: Path, topic: str = SPANS_TOPIC) -> list[Landed]:
    """Every record of the embedded log under ``state_dir`` (read while serve runs, or after)."""
    with LocalLogReader(Path(state_dir) / LOG_FILENAME) as reader:
        out: list[Landed] = []
        offset = 0
        while batch := reader.read(offset, 1000, topic=topic):
            for rec in batch:
                offset = rec.offset
                out.append(Landed(rec.key, rec.value, {
                    HEADER_SOURCE_ID: rec.source_id, HEADER_SIGNAL: rec.signal,
                    HEADER_RECEIVED_AT: str(rec.received_at_ns), HEADER_CONTENT_TYPE: rec.content_type,
                    HEADER_TRANSPORT: rec.transport,
                }, f"local-log offset {rec.offset}"))
        return out


async def landed_kafka(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Landed]:
    """Every record of ``topic`` from the beginning up to the end offsets taken when called (no consumer group).

    A header that occurs more than once is an error (the contract says each header is present once).
    """
    async with asyncio.timeout(timeout_s):
        # The consumer's own metadata only covers topics it tracks; ask an admin client for the partitions.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="interop-test-reader")
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
    assert described["error_code"] == 0 and described["partitions"], f"topic {topic!r} on {bootstrap}: {described}"
    tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                client_id="interop-test-reader")
    await consumer.start()
    out: list[Landed] = []
    try:
        async with asyncio.timeout(timeout_s):
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            while True:
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= end[tp] for tp in tps):
                    break
                batches = await consumer.getmany(*[tp for tp in tps if positions[tp] < end[tp]], timeout_ms=1000)
                for tp, records in batches.items():
                    for rec in records:
                        if rec.offset >= end[tp]:
                            continue
                        names = [k for k, _ in rec.headers or ()]
                        dupes = [n for n, c in Counter(names).items() if c > 1]
                        assert not dupes, f"kafka {tp} offset {rec.offset}: repeated headers {dupes}"
                        headers = {k: v.decode() for k, v in rec.headers or ()}
                        out.append(Landed(None if rec.key is None else rec.key.decode("ascii"), rec.value or b"",
                                          headers, f"kafka partition {tp.partition} offset {rec.offset}"))
    finally:
        await consumer.stop()
    return out


# --------------------------------------------------------------------------- decoding and the record contract


def check_record_contract(records: Sequence[Landed], *, source_id: str | None = None,
                          received_between: tuple[int, int] | None = None) -> None:
    """Every record: all five headers, a known transport, content type ``application/x-protobuf``, a known signal, the expected source
    id, and (optionally) ``received-at`` inside ``received_between`` (unix ns, inclusive)."""
    for rec in records:
        missing = [h for h in HEADER_NAMES if h not in rec.headers]
        assert not missing, f"{rec.where}: headers {missing} missing (have {sorted(rec.headers)})"
        assert rec.headers[HEADER_CONTENT_TYPE] == VALUE_CONTENT_TYPE, rec.where
        assert rec.signal in ("traces", "logs"), f"{rec.where}: signal {rec.signal!r}"
        assert rec.headers[HEADER_TRANSPORT] in ("otlp-http", "otlp-grpc"), f"{rec.where}: transport"
        if source_id is not None:
            assert rec.source_id == source_id, f"{rec.where}: source-id {rec.source_id!r}, expected {source_id!r}"
        received_at = int(rec.headers[HEADER_RECEIVED_AT])
        if received_between is not None:
            lo, hi = received_between
            assert lo <= received_at <= hi, f"{rec.where}: received-at {received_at} outside [{lo}, {hi}]"


@dataclass(frozen=True)
class LandedSpan:
    record: Landed
    resource_spans: object  # ResourceSpans (without the other scopes' spans of the record)
    scope_spans: object  # ScopeSpans
    span: object  # opentelemetry.proto.trace.v1.Span


def spans_of(records: Sequence[Landed]) -> list[LandedSpan]:
    """Every span in the ``traces`` records, checking that the record key is the trace id hex of each span."""
    out = []
    for rec in records:
        if rec.signal != "traces":
            continue
        data = TracesData.FromString(rec.value)
        assert data.resource_spans, f"{rec.where}: a traces record without resource_spans"
        for rs in data.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    assert rec.key == span.trace_id.hex(), (
                        f"{rec.where}: key {rec.key!r} but span {span.span_id.hex()} has trace id "
                        f"{span.trace_id.hex()}")
                    out.append(LandedSpan(rec, rs, ss, span))
    return out


def log_records_of(records: Sequence[Landed]) -> list[LandedSpan]:
    """Every log record in the ``logs`` records (``.span`` holds the LogRecord), checking keys: the trace id hex
    of each log record inside; for records without a trace id, the synthetic prompt trace id of their
    ``session.id`` + ``prompt.id`` (``sinks.base.prompt_trace_id``), or None when they have no ``prompt.id``."""
    out = []
    for rec in records:
        if rec.signal != "logs":
            continue
        data = LogsData.FromString(rec.value)
        for rl in data.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    if lr.trace_id.strip(b"\0"):
                        expected_key = lr.trace_id.hex()
                    else:
                        prompt_key = prompt_trace_id_of(lr.attributes)
                        expected_key = prompt_key.hex() if prompt_key else None
                    assert rec.key == expected_key, (
                        f"{rec.where}: key {rec.key!r} but log record {lr.body.string_value!r} has trace id "
                        f"{lr.trace_id.hex()!r}")
                    out.append(LandedSpan(rec, rl, sl, lr))
    return out


def assert_each_span_exactly_once(records: Sequence[Landed], expected: dict[str, str]) -> dict[str, LandedSpan]:
    """``expected``: span id hex -> trace id hex of every span sent. Returns the landed span per span id."""
    landed = spans_of(records)
    counts = Counter(ls.span.span_id.hex() for ls in landed)
    missing = sorted(set(expected) - set(counts))
    unexpected = sorted(set(counts) - set(expected))
    duplicated = sorted(s for s, c in counts.items() if c > 1)
    assert not (missing or unexpected or duplicated), (
        f"{len(expected)} spans sent, {len(landed)} landed: missing {missing}, unexpected {unexpected}, "
        f"duplicated {duplicated}")
    by_id = {ls.span.span_id.hex(): ls for ls in landed}
    wrong_trace = {s: (by_id[s].span.trace_id.hex(), t) for s, t in expected.items() if by_id[s].span.trace_id.hex() != t}
    assert not wrong_trace, f"spans landed under another trace id (landed, sent): {wrong_trace}"
    return by_id


def count_spans_at_least_once(records: Sequence[Landed], expected: dict[str, str]) -> Counter:
    """Like :func:`assert_each_span_exactly_once` but duplicates are allowed (OTLP retries may redeliver).
    Returns how often each expected span id landed."""
    landed = spans_of(records)
    counts = Counter(ls.span.span_id.hex() for ls in landed)
    missing = sorted(set(expected) - set(counts))
    unexpected = sorted(set(counts) - set(expected))
    assert not (missing or unexpected), (
        f"{len(expected)} spans sent, {len(landed)} landed: missing {missing}, unexpected {unexpected}")
    for ls in landed:
        sid = ls.span.span_id.hex()
        assert ls.span.trace_id.hex() == expected[sid], f"span {sid} landed under trace {ls.span.trace_id.hex()}"
    return counts


def attributes(kvs) -> dict:
    """OTLP KeyValue list -> {key: python value} for scalar values."""
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


# --------------------------------------------------------------------------- the Python SDK side


class RecordingLogExporter(LogRecordExporter):
    """Wraps a real log exporter and records the result of every ``export`` call (processors swallow it)."""

    def __init__(self, inner: LogRecordExporter) -> None:
        self.inner = inner
        self.results: list[LogRecordExportResult] = []

    def export(self, batch):
        result = self.inner.export(batch)
        self.results.append(result)
        return result

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class RecordingSpanExporter(SpanExporter):
    """Wraps a real exporter and records the result of every ``export`` call (processors swallow it)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.results: list[tuple[SpanExportResult, int]] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.results.append((result, len(spans)))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def make_agent_traces(provider: TracerProvider, scope: tuple[str, str], n_traces: int,
                      steps: int = 2) -> dict[str, str]:
    """Create ``n_traces`` agent runs: an ``invoke_agent`` root, per step an LLM ``chat`` span with a nested
    ``execute_tool`` span (GenAI attributes, prompt/completion events), the first tool call of each trace failing
    with an ERROR status and a recorded exception. Returns span id hex -> trace id hex of every span."""
    tracer = provider.get_tracer(*scope)
    ids: dict[str, str] = {}

    def remember(span) -> None:
        ctx = span.get_span_context()
        ids[format(ctx.span_id, "016x")] = format(ctx.trace_id, "032x")

    for t in range(n_traces):
        with tracer.start_as_current_span(f"invoke_agent planner-{t}", kind=SpanKind.SERVER, attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner", "gen_ai.agent.id": f"a-{t}",
                "trace.index": t}) as root:
            remember(root)
            for s in range(steps):
                with tracer.start_as_current_span(f"chat gpt-4o step-{s}", kind=SpanKind.CLIENT, attributes={
                        "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
                        "gen_ai.request.temperature": 0.2, "gen_ai.request.stop_sequences": ["\n\n", "END"],
                        "gen_ai.usage.input_tokens": 120 + s, "gen_ai.usage.output_tokens": 30 + s,
                        "gen_ai.response.finish_reasons": ["tool_calls"], "llm.streaming": False}) as chat:
                    remember(chat)
                    chat.add_event("gen_ai.content.prompt", {"gen_ai.prompt": f"plan step {s} — ünïcødé ✓"})
                    with tracer.start_as_current_span(f"execute_tool search step-{s}", attributes={
                            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                            "gen_ai.tool.call.id": f"call-{t}-{s}"}) as tool:
                        remember(tool)
                        if s == 0:
                            tool.record_exception(TimeoutError("search backend timed out"))
                            tool.set_status(Status(StatusCode.ERROR, "tool timed out"))
                    chat.add_event("gen_ai.content.completion", {"gen_ai.completion": '{"tool": "search"}'})
    return ids


def finished_agent_spans(n_traces: int, service: str, scope: tuple[str, str]):
    """``n_traces`` agent runs (:func:`make_agent_traces`) recorded but not sent: (span id -> trace id, the finished
    spans), for a test to export with exporters of its choosing."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service}), shutdown_on_exit=False)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    ids = make_agent_traces(provider, scope, n_traces)
    provider.shutdown()
    return ids, memory.get_finished_spans()


def span_exporter(serve, transport: str, gzip: bool = False, headers: dict | None = None, timeout: float = 30):
    """The SDK's OTLP span exporter for ``serve`` (a ServeProcess): ``transport`` ``"http"`` (protobuf) or
    ``"grpc"`` (insecure), optionally gzip-compressed, with extra ``headers`` and the exporter's overall ``timeout``
    (seconds, retries included)."""
    if transport == "http":
        return HttpSpanExporter(endpoint=f"{serve.http_url}/v1/traces", headers=headers, timeout=timeout,
                                compression=HttpCompression.Gzip if gzip else HttpCompression.NoCompression)
    return GrpcSpanExporter(endpoint=serve.grpc_target, insecure=True, headers=headers, timeout=timeout,
                            compression=grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression)


# --------------------------------------------------------------------------- serve's /metrics and /readyz


def metric(http_url: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples called ``sample_name`` (e.g. ``trace_source_requests_total``) whose labels include
    ``labels``; 0 when there is none."""
    text = requests.get(f"{http_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def readyz_status(http_url: str) -> int:
    return requests.get(f"{http_url}/readyz", timeout=10).status_code


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0, interval_s: float = 0.2) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout_s`` (a generous bound, not a check of
    how fast anything is)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)
