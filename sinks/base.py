"""The sink contract shared by the Kafka producer and the embedded durable log.

A *record* is one trace's worth of OTLP data from one export request: the value is the serialized
``opentelemetry.proto.trace.v1.TracesData`` (signal ``traces``) or ``opentelemetry.proto.logs.v1.LogsData``
(signal ``logs``) protobuf, the key is the trace id as 32 lowercase hex characters (ASCII bytes), or ``None`` for
log records that carry no trace id. This is the same wire form the OpenTelemetry Collector's Kafka exporter writes
with ``encoding: otlp_proto`` and partitioning by trace id.

One exception: log records without a trace id that carry a ``prompt.id`` attribute (Claude Code log events, semconv
§2.7 "without traces, rebuild a run from logs by ``session.id`` + ``prompt.id``") are keyed by a *synthetic* trace id,
:func:`prompt_trace_id` of their ``session.id`` and ``prompt.id``, so that every record of one prompt lands on one
partition and the assembler rebuilds the prompt as one trace. The records themselves are left as sent (their
``trace_id`` stays empty); the assembler recomputes the id from the same attributes rather than trusting the key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

SIGNAL_TRACES = "traces"
SIGNAL_LOGS = "logs"

#: Media type of every record value written by trace-source (OTLP protobuf).
VALUE_CONTENT_TYPE = "application/x-protobuf"

#: Topic that receives the per-trace span batches (Kafka topic / local-log ``topic`` column).
SPANS_TOPIC = "trace-source.spans"

# Header names carried with every record (Kafka headers / local-log columns).
HEADER_SOURCE_ID = "source-id"
HEADER_SIGNAL = "signal"
HEADER_RECEIVED_AT = "received-at"  # unix time in nanoseconds, decimal ASCII
HEADER_CONTENT_TYPE = "content-type"
HEADER_TRANSPORT = "transport"  # otlp-http | otlp-grpc: the envelope's source kind


#: Domain-separation prefix of :func:`prompt_trace_id` (a synthetic id can never equal a hash of anything else).
PROMPT_TRACE_ID_DOMAIN = b"claude-code-prompt:"
PROMPT_ID_ATTRIBUTE = "prompt.id"
SESSION_ID_ATTRIBUTE = "session.id"


def prompt_trace_id(session_id: str, prompt_id: str) -> bytes:
    """The synthetic 16-byte trace id of a prompt: the first 16 bytes of
    ``sha256(b"claude-code-prompt:" + session.id + b"\\0" + prompt.id)`` (both UTF-8; ``session.id`` may be ``""``
    since Claude Code omits it when ``OTEL_METRICS_INCLUDE_SESSION_ID=false``; ``prompt.id`` is a UUID on its own).

    Deterministic, so the receiver (Kafka key) and the assembler (trace id) agree without sharing state, and a
    consumer can recompute it from an envelope's log events.
    """
    digest = hashlib.sha256(PROMPT_TRACE_ID_DOMAIN + session_id.encode() + b"\0" + prompt_id.encode()).digest()
    return digest[:16]


def prompt_trace_id_of(attributes: Iterable[Any]) -> bytes | None:
    """:func:`prompt_trace_id` of an OTLP ``KeyValue`` list (a log record's ``attributes``), or ``None`` when it has
    no non-empty string ``prompt.id``. Only string values count; for a repeated key the last one wins (as in
    ``normalizers.canonical.attributes``), so this agrees with :func:`prompt_trace_id_of_dict` on the same record."""
    session_id = prompt_id = ""
    for kv in attributes:
        key = kv.key
        if key == PROMPT_ID_ATTRIBUTE:
            prompt_id = kv.value.string_value
        elif key == SESSION_ID_ATTRIBUTE:
            session_id = kv.value.string_value
    return prompt_trace_id(session_id, prompt_id) if prompt_id else None


def prompt_trace_id_of_dict(attributes: Mapping[str, Any]) -> bytes | None:
    """:func:`prompt_trace_id_of` for decoded attributes (``dict`` of JSON values, e.g. a canonical log event's)."""
    prompt_id = attributes.get(PROMPT_ID_ATTRIBUTE)
    if not isinstance(prompt_id, str) or not prompt_id:
        return None
    session_id = attributes.get(SESSION_ID_ATTRIBUTE)
    return prompt_trace_id(session_id if isinstance(session_id, str) else "", prompt_id)


@dataclass(frozen=True, slots=True)
class Record:
    """One per-trace OTLP batch.

    ``key``: trace id as 32 lowercase hex ASCII bytes (for log records without a trace id but with ``prompt.id``:
    the synthetic :func:`prompt_trace_id`), or ``None`` (other log records without a trace id).
    ``value``: serialized ``TracesData`` / ``LogsData`` protobuf bytes.
    ``signal``: :data:`SIGNAL_TRACES` or :data:`SIGNAL_LOGS`.
    ``item_count``: spans (traces) or log records (logs) inside ``value``; used for metrics only.
    """

    key: bytes | None
    value: bytes
    signal: str
    item_count: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    """All records produced by one export request, with the metadata that travels as headers.

    ``source_id``: the authenticated source (see ``receiver.auth``); ``received_at_ns``: unix ns when the request
    arrived; ``transport``: ``otlp-http`` or ``otlp-grpc``.
    """

    records: Sequence[Record]
    source_id: str
    received_at_ns: int
    transport: str = "otlp-http"

    @property
    def size_bytes(self) -> int:
        return sum(len(r.value) for r in self.records)

    def headers(self, record: Record) -> list[tuple[str, bytes]]:
        """Kafka-style headers for ``record``: list of (name, value bytes)."""
        return [
            (HEADER_SOURCE_ID, self.source_id.encode()),
            (HEADER_SIGNAL, record.signal.encode()),
            (HEADER_RECEIVED_AT, str(self.received_at_ns).encode()),
            (HEADER_CONTENT_TYPE, VALUE_CONTENT_TYPE.encode()),
            (HEADER_TRANSPORT, self.transport.encode()),
        ]


class SinkUnavailable(Exception):
    """The sink cannot take data right now (broker down or slow past the deadline, disk error).

    The receiver answers HTTP 503 with ``Retry-After: retry_after_s`` / gRPC UNAVAILABLE with ``RetryInfo``.
    Records of the failed write may still land later (the exporter's retry can then duplicate them; the assembler
    drops duplicate spans by span id).
    """

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RecordTooLarge(Exception):
    """One record is bigger than the sink accepts even after the receiver split its trace (Kafka:
    ``max_request_size`` / the topic's ``max.message.bytes``).

    Permanent for that record: retrying the same bytes cannot succeed, so the receiver answers 413 (gRPC
    RESOURCE_EXHAUSTED without RetryInfo) instead of 503. Sinks check every record before writing any, so normally
    nothing of the batch was written; only a broker-side rejection (a topic ``max.message.bytes`` below the
    producer's limit) can come after other records of the batch landed. ``size_bytes``: the record's encoded size;
    ``limit_bytes``: the sink's configured limit (a broker may enforce a lower one); ``key``: the record's key.
    """

    def __init__(self, message: str, *, key: bytes | None, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(message)
        self.key = key
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class Sink(Protocol):
    """Durable destination of per-trace batches.

    ``write`` returns only after every record of the batch is durable (Kafka: acknowledged with ``acks=all``;
    local log: committed), and raises :class:`SinkUnavailable` otherwise. ``ready`` tells ``/readyz`` whether the
    sink is reachable now. ``describe`` is a short human string for logs and status output.
    """

    name: str

    async def start(self) -> None: ...

    async def write(self, batch: Batch) -> None: ...

    async def ready(self) -> bool: ...

    async def stop(self) -> None: ...

    def describe(self) -> str: ...
