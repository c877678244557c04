"""Trace files -> canonical spans, log events or envelopes. Pure: bytes in (the reader in
``pipeline.sources.files`` opens the files).

Formats recognized by content (the file name only breaks ties):

============================ ===============================================================================
OTLP JSON                    one ``TracesData`` / ``ExportTraceServiceRequest`` document (``resourceSpans``), or
                             ``LogsData`` (``resourceLogs``); or JSON lines of them, as the OpenTelemetry
                             Collector's file exporter and the SDKs' file / console exporters write them
OTLP protobuf                one serialized ``TracesData`` / ``ExportTraceServiceRequest`` message, or the
                             Collector file exporter's ``format: proto`` stream (each message prefixed with its
                             length as a 4-byte big-endian integer)
trace-source envelope        ``{"schema_version": "trace-source.envelope/v1", ...}``, one per document or line
Langfuse trace export        a trace with its ``observations`` (``GET /api/public/traces/{id}``), a list of
                             them, or an API page ``{"data": [...]}``
============================ ===============================================================================

Errors, each a class of its own: :class:`AdapterMismatch` — readable data that no adapter knows (JSON without any
of the shapes above, a binary file that is not OTLP protobuf); :class:`BrokenFile` — a known format that is broken
(truncated JSON, an invalid envelope, a protobuf message that does not parse).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from pydantic import ValidationError

from normalizers.canonical import (CanonicalLogEvent, CanonicalSpan, log_events_from_logs_data,
                                   spans_from_traces_data)
from normalizers.envelope import Envelope
from normalizers.langfuse_api import LangfuseShapeError, is_langfuse_trace, spans_from_langfuse_trace
from normalizers.otlp_json import OtlpJsonError, parse_json_request

ENVELOPE_PREFIX = "trace-source.envelope/"


class FileFormatError(ValueError):
    """Base of the file errors; ``kind`` names the class as reports show it."""

    kind = "broken file"


class AdapterMismatch(FileFormatError):
    """Readable data in a shape no adapter knows."""

    kind = "adapter mismatch"


class BrokenFile(FileFormatError):
    """A known format, broken."""

    kind = "broken file"


@dataclass
class FileContent:
    """What one file holds: ``format`` (``otlp-json``, ``otlp-jsonl``, ``otlp-protobuf``, ``envelope``,
    ``langfuse``), spans and log events of any number of traces (grouped by trace id by the caller), and whole
    envelopes."""

    format: str
    spans: list[CanonicalSpan] = field(default_factory=list)
    log_events: list[CanonicalLogEvent] = field(default_factory=list)
    envelopes: list[Envelope] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.spans or self.log_events or self.envelopes)


def parse_trace_file(data: bytes, name: str = "") -> FileContent:
    """The traces in a file's bytes (see the module docstring). Raises :class:`AdapterMismatch` or
    :class:`BrokenFile` with the reason; an empty file is :class:`AdapterMismatch` ("empty")."""
    text_start = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if not data.strip():
        raise AdapterMismatch("the file is empty")
    if text_start in (b"{", b"["):
        return _parse_json(data, name)
    return _parse_protobuf(data, name)


# -- JSON -----------------------------------------------------------------------------------------------------------

def _parse_json(data: bytes, name: str) -> FileContent:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BrokenFile(f"not valid UTF-8 at byte {exc.start}") from None
    try:
        docs = [json.loads(text)]
        lines = False
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise BrokenFile(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        docs, lines = [], True
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BrokenFile(f"invalid JSON on line {n}: {e.msg} at column {e.colno}") from None
    out = FileContent(format="otlp-jsonl" if lines else "otlp-json")
    kinds = set()
    for n, doc in enumerate(docs, 1):
        where = f"line {n}: " if lines else ""
        kinds.add(_add_document(out, doc, where))
    if kinds == {"envelope"}:
        out.format = "envelope"
    elif kinds == {"langfuse"}:
        out.format = "langfuse"
    return out


#: OTLP JSON documents: (keys that announce one, message type, decoder, FileContent list, what it holds).
_OTLP_JSON = ((("resourceSpans", "resource_spans"), TracesData, spans_from_traces_data, "spans", "traces"),
              (("resourceLogs", "resource_logs"), LogsData, log_events_from_logs_data, "log_events", "logs"))


def _add_document(out: FileContent, doc: Any, where: str) -> str:
    for keys, message_type, decode, target, what in _OTLP_JSON:
        if isinstance(doc, dict) and any(k in doc for k in keys):
            try:
                getattr(out, target).extend(decode(parse_json_request(json.dumps(doc).encode(), message_type)))
            except OtlpJsonError as exc:
                raise BrokenFile(f"{where}invalid OTLP JSON {what}: {exc.message}") from None
            return "otlp"
    if isinstance(doc, dict) and str(doc.get("schema_version", "")).startswith(ENVELOPE_PREFIX):
        try:
            out.envelopes.append(Envelope.model_validate(doc))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "envelope"
            raise BrokenFile(f"{where}invalid trace-source envelope: {loc}: {first['msg']} "
                             f"({exc.error_count()} error(s))") from None
        return "envelope"
    traces = None
    if is_langfuse_trace(doc):
        traces = [doc]
    elif isinstance(doc, list) and doc and all(is_langfuse_trace(d) for d in doc):
        traces = doc
    elif isinstance(doc, dict) and isinstance(doc.get("data"), list) and doc["data"] and all(
            is_langfuse_trace(d) for d in doc["data"]):
        traces = doc["data"]
    if traces is not None:
        for t in traces:
            try:
                out.spans.extend(spans_from_langfuse_trace(t))
            except LangfuseShapeError as exc:
                raise BrokenFile(f"{where}{exc}") from None
        return "langfuse"
    raise AdapterMismatch(f"{where}JSON {_describe(doc)} is none of: OTLP JSON (resourceSpans / resourceLogs), a "
                          "trace-source envelope (schema_version), a Langfuse trace export (id, timestamp, "
                          "observations)")


def _describe(doc: Any) -> str:
    if isinstance(doc, dict):
        keys = sorted(doc)[:8]
        return f"object with keys {', '.join(keys) or '(none)'}" + ("…" if len(doc) > 8 else "")
    if isinstance(doc, list):
        return f"array of {len(doc)} item(s)"
    return type(doc).__name__


# -- protobuf -------------------------------------------------------------------------------------------------------

def _valid_spans(msg: TracesData) -> bool:
    spans = [sp for rs in msg.resource_spans for ss in rs.scope_spans for sp in ss.spans]
    return bool(spans) and all(len(sp.trace_id) == 16 and len(sp.span_id) == 8 and sp.name
                               for sp in spans)


def _valid_logs(msg: LogsData) -> bool:
    recs = [r for rl in msg.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    return bool(recs) and all(len(r.trace_id) in (0, 16) and (r.time_unix_nano or r.observed_time_unix_nano)
                              for r in recs)


def _length_prefixed(data: bytes) -> list[bytes] | None:
    chunks, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 4:
            return None
        (size,) = struct.unpack(">I", data[pos:pos + 4])
        pos += 4
        if size == 0 or size > len(data) - pos:
            return None
        chunks.append(data[pos:pos + size])
        pos += size
    return chunks or None


#: File name endings that announce OTLP protobuf: such a file that does not parse is broken, not foreign.
PROTOBUF_SUFFIXES = (".pb", ".binpb", ".protobuf", ".otlp", ".proto")


def _parse_protobuf(data: bytes, name: str) -> FileContent:
    candidates = [c for c in (_length_prefixed(data), [data]) if c]
    out = FileContent(format="otlp-protobuf")
    for chunks in candidates:
        spans: list[CanonicalSpan] = []
        logs: list[CanonicalLogEvent] = []
        ok = True
        for chunk in chunks:
            try:
                traces = TracesData.FromString(chunk)
                if _valid_spans(traces):
                    spans.extend(spans_from_traces_data(traces))
                    continue
                logs_msg = LogsData.FromString(chunk)
                if _valid_logs(logs_msg):
                    logs.extend(log_events_from_logs_data(logs_msg))
                    continue
            except DecodeError:
                pass
            ok = False
            break
        if ok:
            out.spans, out.log_events = spans, logs
            return out
    error = BrokenFile if name.lower().endswith(PROTOBUF_SUFFIXES) else AdapterMismatch
    try:
        TracesData.FromString(data)
    except DecodeError as exc:
        raise error(f"a binary file that is not OTLP protobuf TracesData / LogsData ({exc})") from None
    raise error("a binary file that is not OTLP protobuf TracesData / LogsData (it parses, but holds no "
                          "span with a 16-byte trace id, an 8-byte span id and a name)")
