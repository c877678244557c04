"""OTLP/JSON for the receiver: the pure decoder of :mod:`normalizers.otlp_json`, its errors as 400s.

Every defect of a body raises :class:`receiver.errors.BadRequest` (``.field`` set when the error is about one
field); nothing else escapes. ``message_to_json`` encodes responses and ``google.rpc.Status`` bodies.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

from normalizers.otlp_json import MAX_MESSAGE_DEPTH, OtlpJsonError, message_to_json
from normalizers.otlp_json import parse_json_request as _parse
from receiver.errors import BadRequest

__all__ = ["parse_json_request", "message_to_json", "MAX_MESSAGE_DEPTH"]

M = TypeVar("M", bound=Message)


def parse_json_request(body: bytes, message_type: type[M]) -> M:
    """:func:`normalizers.otlp_json.parse_json_request`, raising :class:`BadRequest` instead of its error."""
    try:
        return _parse(body, message_type)
    except OtlpJsonError as exc:
        raise BadRequest(exc.message, field=exc.field) from None
