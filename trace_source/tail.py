"""``trace-source tail``: print the spans and log records that landed, from the embedded log or a Kafka topic.

Each record value is OTLP ``TracesData`` / ``LogsData`` protobuf (see ``sinks.base``); tail prints one line (or one
JSON object, ids as lowercase hex as in OTLP/JSON) per span or log record.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Iterator, TextIO

from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status, TracesData

from sinks.base import SIGNAL_LOGS

_POLL_S = 0.2


def _service_name(resource) -> str:
    for kv in resource.attributes:
        if kv.key == "service.name":
            return kv.value.string_value
    return ""


def describe_record(value: bytes, signal: str, source_id: str) -> Iterator[dict]:
    """One dict per span / log record in a record value (bytes). Undecodable values yield one error dict."""
    try:
        data = LogsData.FromString(value) if signal == SIGNAL_LOGS else TracesData.FromString(value)
    except Exception as exc:  # a foreign producer's bytes on the topic must not stop tail
        yield {"signal": signal, "source": source_id, "error": f"undecodable record: {exc}"}
        return
    if signal == SIGNAL_LOGS:
        for rl in data.resource_logs:
            service = _service_name(rl.resource)
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    yield {"signal": "logs", "traceId": rec.trace_id.hex(), "spanId": rec.span_id.hex(),
                           "eventName": rec.event_name, "severityText": rec.severity_text,
                           "timeUnixNano": str(rec.time_unix_nano), "service": service, "source": source_id}
        return
    for rs in data.resource_spans:
        service = _service_name(rs.resource)
        for ss in rs.scope_spans:
            for sp in ss.spans:
                yield {"signal": "traces", "traceId": sp.trace_id.hex(), "spanId": sp.span_id.hex(),
                       "parentSpanId": sp.parent_span_id.hex(), "name": sp.name,
                       "kind": Span.SpanKind.Name(sp.kind).removeprefix("SPAN_KIND_"),
                       "status": Status.StatusCode.Name(sp.status.code).removeprefix("STATUS_CODE_"),
                       "statusMessage": sp.status.message,
                       "startTimeUnixNano": str(sp.start_time_unix_nano),
                       "endTimeUnixNano": str(sp.end_time_unix_nano), "service": service, "source": source_id}


def format_line(item: dict) -> str:
    """Readable one-line form: trace id, span id, name (or log event), status, source."""
    if "error" in item:
        return f"!! {item['error']} (source={item['source']})"
    if item["signal"] == "logs":
        name = item["eventName"] or "log"
        return (f"{item['traceId'] or '-':32}  {item['spanId'] or '-':16}  {name}  "
                f"{item['severityText'] or '-'}  source={item['source']}")
    status = item["status"] + (f" ({item['statusMessage']})" if item["statusMessage"] else "")
    return f"{item['traceId']}  {item['spanId']}  {item['name']}  {status}  source={item['source']}"


class _Printer:
    def __init__(self, out: TextIO, as_json: bool, max_records: int | None) -> None:
        self.out, self.as_json, self.max_records, self.count = out, as_json, max_records, 0

    def emit(self, value: bytes, signal: str, source_id: str) -> bool:
        """Print a record's items; False once ``max_records`` is reached."""
        for item in describe_record(value, signal, source_id):
            self.out.write((json.dumps(item) if self.as_json else format_line(item)) + "\n")
            self.count += 1
            if self.max_records is not None and self.count >= self.max_records:
                self.out.flush()
                return False
        self.out.flush()
        return True


async def _tail_local(state_dir: Path, topic: str, printer: _Printer, from_beginning: bool,
                      idle_timeout: float | None) -> None:
    from sinks.local_log import LOG_FILENAME, LocalLogReader

    path = state_dir / LOG_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no embedded log at {path}: has `trace-source serve --state-dir {state_dir}` run?")
    with LocalLogReader(path) as reader:
        offset = 0 if from_beginning else reader.last_offset(topic=topic)
        last_data = time.monotonic()
        while True:
            batch = reader.read(offset, 500, topic=topic)
            for rec in batch:
                offset = rec.offset
                if not printer.emit(rec.value, rec.signal, rec.source_id):
                    return
            if batch:
                last_data = time.monotonic()
                continue
            if idle_timeout is not None and time.monotonic() - last_data >= idle_timeout:
                return
            await asyncio.sleep(_POLL_S)


async def _tail_kafka(bootstrap: str, topic: str, printer: _Printer, from_beginning: bool,
                      idle_timeout: float | None, security=None) -> None:
    from aiokafka import AIOKafkaConsumer

    from sinks.kafka_security import aiokafka_kwargs, start_or_explain

    # No consumer group (group_id=None): tail reads every partition of the topic and never moves a group's committed
    # offsets; where it starts is just the offset reset policy.
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest" if from_beginning else "latest",
                                client_id="trace-source-tail", **aiokafka_kwargs(security))
    await start_or_explain(consumer.start, bootstrap, security)
    try:
        if topic not in await consumer.topics():
            raise FileNotFoundError(f"topic {topic!r} not found on {bootstrap}")
        last_data = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=int(_POLL_S * 1000), max_records=500)
            for records in batches.values():
                for rec in records:
                    headers = {k: v.decode(errors="replace") for k, v in (rec.headers or ())}
                    if not printer.emit(rec.value or b"", headers.get("signal", "traces"),
                                        headers.get("source-id", "")):
                        return
            if batches:
                last_data = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last_data >= idle_timeout:
                return
    finally:
        await consumer.stop()


async def run_tail(*, kafka_bootstrap_servers: str | None, topic: str, state_dir: Path, from_beginning: bool,
                   max_records: int | None, idle_timeout: float | None, as_json: bool, out: TextIO,
                   security=None) -> int:
    """Print records until ``max_records`` items or ``idle_timeout`` seconds without data; returns items printed.
    ``security``: a ``sinks.kafka_security.KafkaSecurity`` for the Kafka consumer.

    Raises ``FileNotFoundError`` when the embedded log or the topic does not exist, ``KafkaError`` when the
    cluster cannot be used.
    """
    printer = _Printer(out, as_json, max_records)
    if kafka_bootstrap_servers:
        await _tail_kafka(kafka_bootstrap_servers, topic, printer, from_beginning, idle_timeout, security)
    else:
        await _tail_local(state_dir, topic, printer, from_beginning, idle_timeout)
    return printer.count
