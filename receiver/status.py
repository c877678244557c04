"""OTLP/HTTP response bodies: ``google.rpc.Status`` for failures, ``Export*ServiceResponse`` for success. Pure.

Rules (spec §"OTLP/HTTP Response", §"Failures"; reference otlp-receiver.md §1.3):
- a failure body MUST be a ``google.rpc.Status`` in the request's encoding; for 400 its ``details`` SHOULD hold a
  ``google.rpc.BadRequest``; throttling MAY carry ``google.rpc.RetryInfo`` (what the Collector reads for
  ``Retry-After``);
- full success = the export response with ``partial_success`` unset; partial success sets it with a rejected count
  and/or an English ``error_message`` (count 0 + message = a warning);
- the server MUST bound the response (4 MiB recommended) and SHOULD shorten ``error_message`` to fit. Messages are
  cut to ``MAX_MESSAGE_BYTES`` here, so every body is far below 4 MiB.
"""

from __future__ import annotations

from typing import Literal

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from receiver.otlp_json import message_to_json

__all__ = ["status_body", "export_response_body", "MAX_MESSAGE_BYTES"]

#: Longest ``message`` / ``error_message`` / field-violation description kept, in UTF-8 bytes (suffix included).
MAX_MESSAGE_BYTES = 8 * 1024
_MAX_FIELD_BYTES = 1024  # a field path; ours are short, but it may echo client-chosen keys
_TRUNCATED = "…(truncated)"

_JSON = "application/json"
_PROTOBUF = "application/x-protobuf"
# Media type (lower-cased, parameters dropped) -> encoding. "application/protobuf" is the IANA-registered name.
_ENCODINGS = {_JSON: _JSON, _PROTOBUF: _PROTOBUF, "application/protobuf": _PROTOBUF}

_RESPONSES: dict[str, type[Message]] = {
    "traces": trace_service_pb2.ExportTraceServiceResponse,
    "logs": logs_service_pb2.ExportLogsServiceResponse,
}
_REJECTED_FIELD = {"traces": "rejected_spans", "logs": "rejected_log_records"}


def status_body(
    code: int,
    message: str,
    content_type: str,
    *,
    bad_request_field: str | None = None,
    retry_after_s: int | None = None,
) -> bytes:
    """Build a failure body: a ``google.rpc.Status`` encoded per the response media type.

    Args:
        code: ``google.rpc.Code`` number (``google.rpc.code_pb2``): 3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED,
            13 INTERNAL, 14 UNAVAILABLE, 16 UNAUTHENTICATED, ... Clients SHOULD NOT branch on it (spec).
        message: English explanation (str). Cut to ``MAX_MESSAGE_BYTES`` UTF-8 bytes with a "…(truncated)"
            suffix; unpaired surrogates become "?".
        content_type: the response media type, normally the request's: ``application/json`` -> proto3 JSON
            (``{"code":3,"message":"…","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest",…}]}``),
            ``application/x-protobuf`` or ``application/protobuf`` -> binary. Parameters (``; charset=utf-8``) and
            case are ignored.
        bad_request_field: when given, ``details`` gets a ``google.rpc.BadRequest`` with one ``FieldViolation``
            (``field`` = this path, cut to 1 KiB; ``description`` = the message).
        retry_after_s: when given (whole seconds, >= 0), ``details`` gets a ``google.rpc.RetryInfo`` with that
            ``retry_delay``. The HTTP layer still sets the ``Retry-After`` header itself.

    Returns:
        The encoded body (bytes), at most about 18 KiB.

    Raises:
        ValueError: ``content_type`` is neither JSON nor protobuf, or ``retry_after_s`` is negative (caller bugs).
    """
    encoding = _encoding(content_type)
    text = _bounded(message, MAX_MESSAGE_BYTES)
    status = status_pb2.Status(code=code, message=text)
    if bad_request_field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=_bounded(bad_request_field, _MAX_FIELD_BYTES), description=text
        )
        _pack(status, error_details_pb2.BadRequest(field_violations=[violation]))
    if retry_after_s is not None:
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        _pack(status, error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after_s)))
    return _encode(status, encoding)


def export_response_body(
    kind: Literal["traces", "logs"], rejected: int, error_message: str, content_type: str
) -> bytes:
    """Build a success body: ``ExportTraceServiceResponse`` or ``ExportLogsServiceResponse``.

    Args:
        kind: ``"traces"`` or ``"logs"``.
        rejected: number of spans / log records rejected (int, >= 0) -> ``partial_success.rejected_spans`` /
            ``rejected_log_records``.
        error_message: English reason or warning (str, may be empty); cut like ``status_body``'s message.
        content_type: response media type, as for ``status_body``.

    Returns:
        The encoded body (bytes). ``partial_success`` is set only when ``rejected > 0`` or ``error_message`` is
        non-empty; otherwise it is the empty message (``b""`` / ``b"{}"``), served from a precomputed table.

    Raises:
        ValueError: unknown ``kind`` or ``content_type``, or negative ``rejected`` (caller bugs).
    """
    encoding = _encoding(content_type)
    if kind not in _RESPONSES:
        raise ValueError(f"kind must be 'traces' or 'logs', got {kind!r}")
    if rejected < 0:
        raise ValueError(f"rejected must be >= 0, got {rejected}")
    if not rejected and not error_message:
        return _EMPTY_BODIES[(kind, encoding)]
    response = _RESPONSES[kind]()
    partial = response.partial_success  # type: ignore[attr-defined]
    partial.SetInParent()
    setattr(partial, _REJECTED_FIELD[kind], rejected)
    partial.error_message = _bounded(error_message, MAX_MESSAGE_BYTES)
    return _encode(response, encoding)


def _encoding(content_type: str) -> str:
    media_type = content_type.split(";", 1)[0].strip().lower()
    try:
        return _ENCODINGS[media_type]
    except KeyError:
        raise ValueError(
            f"cannot encode a response as {content_type!r}; use application/json or application/x-protobuf"
        ) from None


def _encode(msg: Message, encoding: str) -> bytes:
    return message_to_json(msg) if encoding == _JSON else msg.SerializeToString()


def _pack(status: status_pb2.Status, detail: Message) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)  # type_url "type.googleapis.com/google.rpc.<Name>"
    status.details.append(packed)


def _bounded(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` UTF-8 bytes on a character boundary; make it encodable (protobuf strings
    must be valid UTF-8, and an exception text can carry unpaired surrogates from client JSON)."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
        text = raw.decode("utf-8")
    if len(raw) <= limit:
        return text
    keep = limit - len(_TRUNCATED.encode("utf-8"))
    return raw[:keep].decode("utf-8", "ignore") + _TRUNCATED


# Full success is the hot path: the same few bytes every time (b"" for protobuf, b"{}" for JSON).
_EMPTY_BODIES: dict[tuple[str, str], bytes] = {
    (kind, encoding): _encode(cls(), encoding) for kind, cls in _RESPONSES.items() for encoding in (_JSON, _PROTOBUF)
}
