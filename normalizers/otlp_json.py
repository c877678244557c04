"""OTLP/JSON <-> protobuf messages: lenient on input, strict spec JSON on output. Pure: no I/O.

Shared by the receiver (``POST /v1/traces`` with ``application/json``, which turns :class:`OtlpJsonError` into a
400) and the file importer (OTLP JSON files as SDK file exporters and the Collector's file exporter write them).

OTLP/JSON is proto3 JSON with departures (spec §"JSON Protobuf Encoding"; reference otlp-receiver.md §1.7):
``traceId``/``spanId``/``parentSpanId`` are hex, not base64; enums are integers; keys are lowerCamelCase;
unknown fields are ignored; 64-bit integers are decimal strings (decoders take numbers too).

Input: ``json.loads``, then the id fields are rewritten from hex to base64 at the few paths where they live, then
``google.protobuf.json_format.ParseDict`` does the rest. That parser already accepts lowerCamelCase and proto field
names, enum names or numbers, and 64-bit integers as strings or numbers, as the Collector's pdata decoder does.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Callable, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

__all__ = ["OtlpJsonError", "parse_json_request", "message_to_json", "MAX_MESSAGE_DEPTH"]


class OtlpJsonError(ValueError):
    """Invalid OTLP/JSON. ``field``: path of the offending field (e.g.
    ``resourceSpans[0].scopeSpans[1].spans[3].traceId``) when the error is about one field, else ``None``."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


BadRequest = OtlpJsonError  # the name the decoder below was written with

M = TypeVar("M", bound=Message)

#: Maximum protobuf message nesting accepted from JSON. 100 is what the upb binary decoder allows
#: (``upb_DecodeOptions_MaxDepth``), so whatever we accept as JSON still decodes after re-encoding as protobuf
#: (for the Kafka sink and its consumers). For spans that is 31 levels of ``kvlistValue`` or 47 of ``arrayValue``.
MAX_MESSAGE_DEPTH = 100

# Where ids live, per request type: (repeated-field keys, id-field keys, children). Each key is listed in both
# spellings ParseDict accepts (json_name, proto name); a nested AnyValue can never hold an id, so nothing else is
# walked. "spans"/"links" are the same in both spellings.
_Node = tuple[tuple[str, ...], tuple[str, ...], tuple[Any, ...]]
_TRACE_IDS = ("traceId", "trace_id", "spanId", "span_id")
_LINKS: _Node = (("links",), _TRACE_IDS, ())
_SPANS: _Node = (("spans",), (*_TRACE_IDS, "parentSpanId", "parent_span_id"), (_LINKS,))
_SCOPE_SPANS: _Node = (("scopeSpans", "scope_spans"), (), (_SPANS,))
_RESOURCE_SPANS: _Node = (("resourceSpans", "resource_spans"), (), (_SCOPE_SPANS,))
_LOG_RECORDS: _Node = (("logRecords", "log_records"), _TRACE_IDS, ())
_SCOPE_LOGS: _Node = (("scopeLogs", "scope_logs"), (), (_LOG_RECORDS,))
_RESOURCE_LOGS: _Node = (("resourceLogs", "resource_logs"), (), (_SCOPE_LOGS,))
_ID_PATHS: dict[str, tuple[_Node, ...]] = {
    "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest": (_RESOURCE_SPANS,),
    "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest": (_RESOURCE_LOGS,),
    # Same JSON shape as the export requests (file exporters write either).
    "opentelemetry.proto.trace.v1.TracesData": (_RESOURCE_SPANS,),
    "opentelemetry.proto.logs.v1.LogsData": (_RESOURCE_LOGS,),
}


def max_containers(body_len: int) -> int:
    """Most JSON objects + arrays a body of ``body_len`` bytes may hold.

    The smallest real OTLP/JSON attribute, ``{"key":"a","value":{"intValue":1}}``, is 34 bytes for 2 objects;
    ``{},`` repeated is 3 bytes per object but costs ~100 bytes each once ``json.loads`` builds it, so a dense body
    under the size cap could still take gigabytes. One container per 12 bytes (plus an allowance) admits the
    former and refuses the latter. Braces inside strings count too, which only makes the bound looser.
    """
    return 1024 + body_len // 12


def parse_json_request(body: bytes, message_type: type[M]) -> M:
    """Parse an OTLP/JSON request body into a new protobuf message.

    Args:
        body: the decompressed HTTP body (bytes, UTF-8 JSON; a leading UTF-8 BOM is tolerated).
        message_type: ``ExportTraceServiceRequest`` or ``ExportLogsServiceRequest`` (from
            ``opentelemetry.proto.collector.{trace,logs}.v1``), or ``TracesData`` / ``LogsData`` (same shape);
            other types parse too but get no hex-id handling.

    Returns:
        A new ``message_type`` instance.

    Accepted input (lenient, like the Collector's pdata decoder): ``traceId``/``spanId``/``parentSpanId`` in spans,
    span links and log records as hex of either case (``""`` = empty bytes; a wrong *length* is not an error here,
    span validation rejects it later); other ``bytes`` fields (``bytesValue``) as base64; lowerCamelCase or
    proto (snake_case) keys; enums as integers or names; 64-bit integers as strings or numbers; unknown fields
    and unknown enum *names* ignored (the latter leave the field at 0).

    Raises:
        OtlpJsonError: for every defect of the input: invalid UTF-8, JSON syntax, a non-object top level, an id that
            is not a hex string (``.field`` holds its path, e.g. ``resourceSpans[0].scopeSpans[1].spans[3].traceId``),
            wrong value types, out-of-range numbers, nesting deeper than ``MAX_MESSAGE_DEPTH`` messages, more
            objects and arrays than the body's size allows (see ``max_containers``).
            No other exception type escapes for any ``body``.
    """
    containers = body.count(b"{") + body.count(b"[")  # C-speed upper bound, before json.loads allocates them
    if containers > max_containers(len(body)):
        raise BadRequest(f"request holds {containers} JSON objects/arrays in {len(body)} bytes (at most one per "
                         f"12 bytes is accepted); split it into smaller requests")
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal over sys.get_int_max_str_digits() digits
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {_json_type(doc)}")

    message = message_type()
    _walk_ids(doc, _ID_PATHS.get(message.DESCRIPTOR.full_name, ()), (), _hex_to_base64)
    try:
        json_format.ParseDict(doc, message, ignore_unknown_fields=True, max_recursion_depth=MAX_MESSAGE_DEPTH)
    except json_format.ParseError as exc:
        if "Message too deep" in str(exc):
            raise BadRequest(
                f"invalid OTLP/JSON: nested deeper than {MAX_MESSAGE_DEPTH} messages "
                "(kvlistValue/arrayValue nesting too deep)"
            ) from None
        detail, field = _describe_parse_error(str(exc))
        raise BadRequest(f"invalid OTLP/JSON: {detail}", field=field) from None
    except RecursionError:
        raise BadRequest("invalid OTLP/JSON: nested too deeply") from None
    except (ValueError, TypeError, AttributeError) as exc:  # ParseDict lets a few escape at the top level
        raise BadRequest(f"invalid OTLP/JSON: {type(exc).__name__}: {exc}") from None
    return message


def message_to_json(msg: Message) -> bytes:
    """Encode a message as compact spec OTLP/JSON, for responses and ``google.rpc.Status`` bodies.

    lowerCamelCase keys, enums as integers, 64-bit integers as decimal strings, default values omitted, and for
    trace/log export requests the trace/span ids as lowercase hex (spec §"JSON Protobuf Encoding").

    Args:
        msg: any protobuf message; an ``Any`` inside it must name a type the default descriptor pool knows.

    Returns:
        UTF-8 JSON (bytes), no whitespace.
    """
    doc = json_format.MessageToDict(msg, preserving_proto_field_name=False, use_integers_for_enums=True)
    _walk_ids(doc, _ID_PATHS.get(msg.DESCRIPTOR.full_name, ()), (), _base64_to_hex)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- id handling ----------------------------------------------------------------------------------------------


def _walk_ids(
    obj: dict[str, Any],
    nodes: tuple[_Node, ...],
    path: tuple[str | int, ...],
    convert: Callable[[Any, tuple[str | int, ...]], Any],
) -> None:
    """Apply ``convert`` in place to each id field under ``nodes``. Wrong shapes are skipped: ParseDict reports them."""
    for keys, id_keys, children in nodes:
        for key in keys:
            items = obj.get(key)
            if not isinstance(items, list):
                continue
            for index, item in enumerate(items):
                if not isinstance(item, dict):
                    continue
                item_path = (*path, key, index)
                for id_key in id_keys:
                    value = item.get(id_key)
                    if value is not None:  # null means "unset" to ParseDict; leave it
                        item[id_key] = convert(value, (*item_path, id_key))
                if children:
                    _walk_ids(item, children, item_path, convert)


def _hex_to_base64(value: Any, path: tuple[str | int, ...]) -> str:
    """Hex id (either case, even length, no separators) -> the base64 ParseDict expects for bytes fields."""
    if not isinstance(value, str):
        field = _format_path(path)
        raise BadRequest(f"{field}: expected a hex string, got {_json_type(value)}", field=field)
    try:
        raw = binascii.unhexlify(value)  # unlike bytes.fromhex, rejects spaces; non-ASCII -> ValueError
    except ValueError:
        field = _format_path(path)
        raise BadRequest(f"{field}: not hex", field=field) from None
    return base64.b64encode(raw).decode("ascii")


def _base64_to_hex(value: Any, path: tuple[str | int, ...]) -> Any:
    """MessageToDict output (standard base64) -> lowercase hex, as the spec requires on the wire."""
    return base64.b64decode(value).hex()


# json_format wraps an error once per level: 'Failed to parse resourceSpans field: Failed to parse spans field:
# <detail> at ExportTraceServiceRequest.resourceSpans[0].scopeSpans[0].spans[0].kind....' (the "at" part is
# sometimes missing, sometimes quoted). Turn that into "<path>: <detail>".
_FAILED_TO_PARSE = re.compile(r"Failed to parse (\w+) field: ")
_AT_PATH = re.compile(r' at "?\w+\.([^"\s]+?)"?$')
_MAX_DETAIL = 1024  # ParseError texts can embed a repr of the offending (client-sized) value


def _describe_parse_error(text: str) -> tuple[str, str | None]:
    names: list[str] = []
    pos = 0
    while (m := _FAILED_TO_PARSE.match(text, pos)) is not None:
        names.append(m.group(1))
        pos = m.end()
    detail = text[pos:].rstrip(".")
    field = ".".join(names) or None
    if (m := _AT_PATH.search(detail)) is not None:
        field, detail = m.group(1), detail[: m.start()]
    if len(detail) > _MAX_DETAIL:
        detail = detail[:_MAX_DETAIL] + "…(truncated)"
    return (f"{field}: {detail}" if field else detail), field


def _format_path(parts: tuple[str | int, ...]) -> str:
    """("resourceSpans", 0, "scopeSpans", 1, "traceId") -> "resourceSpans[0].scopeSpans[1].traceId"."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append(f".{part}" if out else part)
    return "".join(out)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
