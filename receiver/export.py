"""The one export path both servers share: decoded request -> per-trace records -> durable sink write.

The HTTP and gRPC servers only translate their transport (content type, compression, status codes) to and from
this module; validation, splitting, the in-flight budget and the sink call live here once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from receiver.backpressure import InflightBudget
from receiver.errors import BadRequest, RecordRefused
from receiver.metrics import ReceiverMetrics
from receiver.split import ScanError, SplitResult, Wire, item_budget, scan, split_logs, split_traces
from sinks.base import SIGNAL_LOGS, SIGNAL_TRACES, Batch, RecordTooLarge, Sink, SinkUnavailable

log = structlog.get_logger(__name__)

REQUEST_TYPES = {SIGNAL_TRACES: ExportTraceServiceRequest, SIGNAL_LOGS: ExportLogsServiceRequest}
_SPLITTERS = {SIGNAL_TRACES: split_traces, SIGNAL_LOGS: split_logs}


class Overloaded(SinkUnavailable):
    """The in-flight byte budget is exhausted; the client should retry after ``retry_after_s`` seconds."""


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    """What the client is told on success: ``rejected`` items (int) and an English ``error_message`` (str);
    both empty/zero means full success (``partial_success`` unset)."""

    accepted: int
    rejected: int
    error_message: str


def parse_protobuf(signal: str, body: bytes):
    """Decode an OTLP protobuf export request (``bytes``); returns ``(message, wire)`` for :meth:`ExportService.export`.

    The outer levels are walked first (:func:`receiver.split.scan`), so a request with more resources, scopes and
    items than its size allows is refused before the upb parse could allocate for them. Raises
    :class:`receiver.errors.BadRequest` on undecodable bytes (including nesting past protobuf's recursion limit) or
    too many items, as the OTLP spec requires a 400 / INVALID_ARGUMENT for bad data.
    """
    try:
        wire = scan(body, item_budget(len(body)))
    except (ScanError, IndexError):
        wire = None  # not protobuf at the outer levels: the parse below says what is wrong
    try:
        message = REQUEST_TYPES[signal].FromString(body)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise BadRequest(f"cannot decode {REQUEST_TYPES[signal].DESCRIPTOR.name} protobuf: {exc}") from None
    return message, wire


class ExportService:
    """Validates, splits and durably writes export requests.

    ``max_record_bytes``: largest per-trace record value handed to the sink (int, bytes); ``retry_after_s``: the
    delay (int, seconds) suggested to clients when the budget is exhausted.
    """

    def __init__(self, sink: Sink, budget: InflightBudget, metrics: ReceiverMetrics, *,
                 max_record_bytes: int, retry_after_s: int) -> None:
        self.sink = sink
        self.budget = budget
        self.metrics = metrics
        self.max_record_bytes = max_record_bytes
        self.retry_after_s = retry_after_s

    def reserve(self, n: int, held: int = 0) -> None:
        """Reserve ``n`` more in-flight bytes for a request already holding ``held``, or raise :class:`Overloaded`;
        pair with :meth:`release`."""
        if not self.budget.try_acquire(n, held):
            raise Overloaded(
                f"receiver is over its in-flight limit ({self.budget.limit_bytes} bytes); retry later",
                retry_after_s=self.retry_after_s)

    def release(self, n: int) -> None:
        self.budget.release(n)

    async def export(self, signal: str, request, source_id: str, received_at_ns: int,
                     wire: Wire | None = None, transport: str = "otlp-http") -> ExportOutcome:
        """Split ``request`` by trace id and write it; return once durable.

        ``wire``: from :func:`parse_protobuf` when the request arrived as protobuf (spans are then sliced out of
        the received bytes instead of re-encoded). ``transport``: ``otlp-http`` or ``otlp-grpc``, recorded with
        the data. Raises :class:`sinks.base.SinkUnavailable` when the sink cannot
        take the data now (the client must retry); nothing is acknowledged in that case.
        """
        split: SplitResult = _SPLITTERS[signal](request, self.max_record_bytes, wire)
        if split.rejected:
            self.metrics.items_rejected.labels(signal).inc(split.rejected)
        if split.records:
            sink_name = self.sink.name
            t0 = time.perf_counter()
            try:
                await self.sink.write(Batch(split.records, source_id, received_at_ns, transport))
            except SinkUnavailable:
                self.metrics.sink_errors.labels(sink_name).inc()
                raise
            except RecordTooLarge as exc:
                self.metrics.sink_errors.labels(sink_name).inc()
                raise RecordRefused(f"{exc} (raise the topic's max.message.bytes or lower --max-record-bytes)") \
                    from None
            self.metrics.sink_latency.labels(sink_name).observe(time.perf_counter() - t0)
            self.metrics.records_written.labels(sink_name, signal).inc(len(split.records))
            self.metrics.items_accepted.labels(signal).inc(split.accepted)
        return ExportOutcome(split.accepted, split.rejected, split.error_message)
