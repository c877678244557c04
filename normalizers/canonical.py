"""OTLP protobuf -> canonical spans and log events: plain, typed, JSON-ready Python values.

Input: serialized ``opentelemetry.proto.trace.v1.TracesData`` / ``opentelemetry.proto.logs.v1.LogsData`` bytes (the
record values on ``trace-source.spans``, see ``sinks.base``), or the decoded messages.
Output: :class:`CanonicalSpan` / :class:`CanonicalLogEvent` models (pydantic v2) with

* ids as lowercase hex ``str`` (``""`` when absent), timestamps as ``int`` unix nanoseconds;
* attributes as ``dict[str, Any]`` with OTLP ``AnyValue`` mapped to JSON types: string, bool, int (``int_value``,
  int64), float (``double_value``), list (``array_value``), dict (``kvlist_value``), and ``bytes_value`` as a
  base64 ``str`` (the OTLP/JSON convention). A key repeated in one attribute list keeps its last value;
* span kind and status code as their short OTLP names (``SERVER``, ``ERROR``, ...);
* the resource's attributes and the instrumentation scope (name, version, attributes) copied onto each item, so an
  item stands alone after spans of one trace arrive in several batches.

Pure functions, no I/O. Raises ``google.protobuf.message.DecodeError`` for bytes that are not the named message.
"""

from __future__ import annotations

import base64
from typing import Any, Iterable, TypeVar

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status, TracesData
from pydantic import BaseModel, Field

_M = TypeVar("_M", bound=BaseModel)
_KIND_NAMES = {v: k.removeprefix("SPAN_KIND_") for k, v in Span.SpanKind.items()}
_STATUS_NAMES = {v: k.removeprefix("STATUS_CODE_") for k, v in Status.StatusCode.items()}


def any_value(v: AnyValue) -> Any:
    """OTLP ``AnyValue`` -> JSON-compatible Python value (see module docstring); ``None`` when unset."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        return v.double_value
    if which == "bool_value":
        return v.bool_value
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return base64.b64encode(v.bytes_value).decode()


_SCALARS = frozenset({"string_value", "int_value", "double_value", "bool_value"})


def attributes(kvs: Iterable) -> dict[str, Any]:
    """Repeated ``KeyValue`` -> ``dict[str, Any]`` (last value wins for a repeated key)."""
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        which = v.WhichOneof("value")
        out[kv.key] = getattr(v, which) if which in _SCALARS else any_value(v)
    return out


class Scope(BaseModel):
    """Instrumentation scope (``InstrumentationScope``)."""

    name: str = ""
    version: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)


class SpanEvent(BaseModel):
    name: str
    time_unix_nano: int
    attributes: dict[str, Any] = Field(default_factory=dict)


class SpanLink(BaseModel):
    trace_id: str
    span_id: str
    attributes: dict[str, Any] = Field(default_factory=dict)


class CanonicalSpan(BaseModel):
    """One span in canonical form (ids hex ``str``, times ``int`` ns, typed attributes)."""

    trace_id: str
    span_id: str
    parent_span_id: str = ""
    parent_is_remote: bool | None = None
    """Whether the parent span lives in another process (OTLP ``Span.flags`` bit ``SPAN_FLAGS_CONTEXT_IS_REMOTE``,
    valid only when ``SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE`` is set); ``None`` when the exporter did not say (SDKs
    before OTLP 1.1). A span with a remote parent is the *local root* of its process's part of the trace."""
    name: str
    kind: str = "UNSPECIFIED"
    start_time_unix_nano: int = 0
    end_time_unix_nano: int = 0
    status_code: str = "UNSET"
    status_message: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)
    events: list[SpanEvent] = Field(default_factory=list)
    links: list[SpanLink] = Field(default_factory=list)
    resource: dict[str, Any] = Field(default_factory=dict)
    scope: Scope = Field(default_factory=Scope)

    @property
    def is_root(self) -> bool:
        return not self.parent_span_id

    @property
    def is_local_root(self) -> bool:
        """True for a span whose parent is remote (propagated ``traceparent`` from a caller whose spans go
        elsewhere): the top of this process's run, treated like a root by the assembler and the grader."""
        return bool(self.parent_span_id) and self.parent_is_remote is True

    @property
    def is_run_root(self) -> bool:
        """:attr:`is_root` or :attr:`is_local_root`."""
        return not self.parent_span_id or self.parent_is_remote is True


class CanonicalLogEvent(BaseModel):
    """One OTLP log record in canonical form.

    ``event_name`` comes from ``LogRecord.event_name`` (OTLP >= 1.5) or, from older SDKs, the ``event.name``
    attribute. ``body`` is the ``AnyValue`` body as a JSON value.
    """

    trace_id: str = ""
    span_id: str = ""
    time_unix_nano: int = 0
    observed_time_unix_nano: int = 0
    event_name: str = ""
    severity_number: int = 0
    severity_text: str = ""
    body: Any = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    resource: dict[str, Any] = Field(default_factory=dict)
    scope: Scope = Field(default_factory=Scope)


_new = object.__new__
_setattr = object.__setattr__


def trusted(cls: type[_M], values: dict[str, Any]) -> _M:
    """A model of ``cls`` holding ``values`` without validation, as ``cls(**values)`` would build it: ``values`` must
    hold every field of ``cls`` in declaration order, each already of its field's type (the decoders below build
    them so; nested models as instances). The dict becomes the model's ``__dict__``; every field counts as set.
    For models without extra fields or private attributes (the canonical ones)."""
    m = _new(cls)
    _setattr(m, "__dict__", values)
    _setattr(m, "__pydantic_fields_set__", set(values))
    _setattr(m, "__pydantic_extra__", None)
    _setattr(m, "__pydantic_private__", None)
    return m


def _scope(s) -> Scope:
    return trusted(Scope, {"name": s.name, "version": s.version, "attributes": attributes(s.attributes)})


def spans_from_traces_data(data: TracesData | bytes) -> list[CanonicalSpan]:
    """All spans of a ``TracesData`` (message or serialized bytes), in order.

    Spans of one resource (scope) share its attribute dict (``Scope`` instance): models are built without
    validation (:func:`trusted`), the decoded values having the field types already; nothing modifies them."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = TracesData.FromString(bytes(data))
    out: list[CanonicalSpan] = []
    kinds, statuses = _KIND_NAMES, _STATUS_NAMES
    for rs in data.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = _scope(ss.scope)
            for sp in ss.spans:
                status = sp.status
                out.append(trusted(CanonicalSpan, {
                    "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
                    "parent_span_id": sp.parent_span_id.hex(),
                    "parent_is_remote": parent_is_remote(sp.flags), "name": sp.name,
                    "kind": kinds.get(sp.kind, "UNSPECIFIED"),
                    "start_time_unix_nano": sp.start_time_unix_nano, "end_time_unix_nano": sp.end_time_unix_nano,
                    "status_code": statuses.get(status.code, "UNSET"), "status_message": status.message,
                    "attributes": attributes(sp.attributes),
                    "events": [trusted(SpanEvent, {"name": e.name, "time_unix_nano": e.time_unix_nano,
                                                   "attributes": attributes(e.attributes)}) for e in sp.events],
                    "links": [trusted(SpanLink, {"trace_id": lk.trace_id.hex(), "span_id": lk.span_id.hex(),
                                                 "attributes": attributes(lk.attributes)}) for lk in sp.links],
                    "resource": resource, "scope": scope}))
    return out


#: OTLP ``SpanFlags`` bits (trace.proto): the exporter says whether the parent is remote, and whether it is.
SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK = 0x100
SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK = 0x200


def parent_is_remote(flags: int) -> bool | None:
    """OTLP ``Span.flags`` -> is the parent remote? ``None`` when ``SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE`` is unset."""
    if not flags & SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK:
        return None
    return bool(flags & SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK)


def log_event_identity(e: CanonicalLogEvent) -> tuple[str, int, int, int, str]:
    """What tells two log records apart: (span id, time ns, observed time ns, severity number, event name).

    Log records carry no id of their own; the assembler drops records with the same identity as duplicates
    (exporter retries) and the idempotency key of a span-less trace hashes these tuples.
    """
    return (e.span_id, e.time_unix_nano, e.observed_time_unix_nano, e.severity_number, e.event_name)


def log_events_from_logs_data(data: LogsData | bytes) -> list[CanonicalLogEvent]:
    """All log records of a ``LogsData`` (message or serialized bytes), in order (models built as in
    :func:`spans_from_traces_data`)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = LogsData.FromString(bytes(data))
    out: list[CanonicalLogEvent] = []
    for rl in data.resource_logs:
        resource = attributes(rl.resource.attributes)
        for sl in rl.scope_logs:
            scope = _scope(sl.scope)
            for rec in sl.log_records:
                attrs = attributes(rec.attributes)
                out.append(trusted(CanonicalLogEvent, {
                    "trace_id": rec.trace_id.hex(), "span_id": rec.span_id.hex(),
                    "time_unix_nano": rec.time_unix_nano, "observed_time_unix_nano": rec.observed_time_unix_nano,
                    "event_name": rec.event_name or str(attrs.get("event.name", "")),
                    "severity_number": rec.severity_number, "severity_text": rec.severity_text,
                    "body": any_value(rec.body), "attributes": attrs, "resource": resource, "scope": scope}))
    return out
