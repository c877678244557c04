"""Values from other systems (database rows, Langfuse's REST API, exported files) -> canonical ids, times and
status codes. Pure functions, no I/O; shared by :mod:`normalizers.rows` and :mod:`normalizers.langfuse_api`.

Ids are made deterministic so that reading the same source twice gives the same spans, hence the same envelope
idempotency key: a value that already is an OTLP id (32 / 16 lowercase or uppercase hex, a UUID without or with
dashes for trace ids) is used as it is; anything else (an integer primary key, a UUID as span id, a custom string)
becomes the first 16 / 8 bytes of ``sha256("<namespace>\\0<value>")``. The original value is kept by the callers in
an attribute (``trace_source.source.trace_id`` / ``...span_id``).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HEX16 = re.compile(r"^[0-9a-fA-F]{16}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

#: Attributes keeping a source's own ids when they had to be hashed into OTLP ids.
ATTR_SOURCE_TRACE_ID = "trace_source.source.trace_id"
ATTR_SOURCE_SPAN_ID = "trace_source.source.span_id"


class ForeignValueError(ValueError):
    """A value of the source that cannot be read (a time that is not a time, an empty id)."""


def _digest(namespace: str, value: str, nbytes: int) -> str:
    return hashlib.sha256(f"{namespace}\0{value}".encode()).digest()[:nbytes].hex()


def trace_id_of(value: Any, namespace: str = "trace") -> str:
    """A source's trace id -> 32 lowercase hex (see the module docstring). Raises :class:`ForeignValueError` for
    ``None`` or an empty value."""
    text = _id_text(value, "trace id")
    if _HEX32.match(text):
        return text.lower()
    if _UUID.match(text):
        return text.replace("-", "").lower()
    return _digest(namespace, text, 16)


def span_id_of(value: Any, namespace: str = "span") -> str:
    """A source's span id -> 16 lowercase hex (see the module docstring)."""
    text = _id_text(value, "span id")
    if _HEX16.match(text):
        return text.lower()
    return _digest(namespace, text, 8)


def is_native_trace_id(value: Any) -> bool:
    return value is not None and bool(_HEX32.match(str(value)) or _UUID.match(str(value)))


def is_native_span_id(value: Any) -> bool:
    return value is not None and bool(_HEX16.match(str(value)))


def _id_text(value: Any, what: str) -> str:
    if value is None:
        raise ForeignValueError(f"{what} is empty")
    text = str(value).strip()
    if not text:
        raise ForeignValueError(f"{what} is empty")
    return text


def time_ns(value: Any, what: str = "time") -> int:
    """A time -> unix nanoseconds (``0`` for ``None``).

    Accepts ``datetime`` (naive = UTC), ``date``, ISO 8601 text (``Z`` or an offset; naive = UTC), and numbers:
    taken as seconds below 1e11, milliseconds below 1e14, microseconds below 1e17, else nanoseconds — the units
    applications store epochs in. Raises :class:`ForeignValueError` otherwise.
    """
    if value is None or value == "":
        return 0
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    if isinstance(value, date):
        return time_ns(datetime(value.year, value.month, value.day, tzinfo=timezone.utc), what)
    if isinstance(value, bool):
        raise ForeignValueError(f"{what} {value!r} is not a time")
    if isinstance(value, (int, float, Decimal)):
        v = float(value)
        if v < 0:
            raise ForeignValueError(f"{what} {value!r} is negative")
        scale = 1e9 if v < 1e11 else 1e6 if v < 1e14 else 1e3 if v < 1e17 else 1
        return int(round(v * scale)) if scale != 1 else int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return time_ns(Decimal(text), what)
        try:
            return time_ns(datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")), what)
        except ValueError:
            raise ForeignValueError(f"{what} {value!r} is not an ISO 8601 time or an epoch number") from None
    raise ForeignValueError(f"{what} {value!r} ({type(value).__name__}) is not a time")


_ERROR_WORDS = {"error", "errored", "failed", "failure", "fail", "exception", "status_code_error", "2", "false",
                "timeout", "timed_out", "cancelled", "canceled", "aborted", "crashed"}
_OK_WORDS = {"ok", "success", "succeeded", "successful", "completed", "complete", "done", "finished", "passed",
             "status_code_ok", "1", "true"}


def status_code_of(value: Any) -> str:
    """An application's status value -> OTLP ``OK`` / ``ERROR`` / ``UNSET``: error-like words (``error``,
    ``failed``, ``timeout``, ``STATUS_CODE_ERROR``, OTLP code 2, ``false``) are ``ERROR``, success-like words
    (``ok``, ``success``, ``completed``, OTLP code 1, ``true``) are ``OK``, anything else ``UNSET``."""
    if value is None:
        return "UNSET"
    if isinstance(value, bool):
        return "OK" if value else "ERROR"
    text = str(value).strip().lower()
    if text in _ERROR_WORDS:
        return "ERROR"
    if text in _OK_WORDS:
        return "OK"
    return "UNSET"


def json_value(value: Any) -> Any:
    """A column or API value -> a JSON value for an attribute: text that holds a JSON object or array is decoded,
    ``datetime`` becomes ISO text, ``Decimal`` a number, ``bytes`` UTF-8 text (replacing what is not)."""
    if isinstance(value, str):
        s = value.strip()
        if s[:1] in ("{", "["):
            try:
                return json.loads(s)
            except ValueError:
                return value
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def attribute_value(value: Any) -> Any:
    """A JSON value -> an attribute value as canonical spans hold them: scalars as they are, objects and arrays as
    compact JSON text (the form instrumentations record ``gen_ai.*.messages`` and ``input.value`` in)."""
    v = json_value(value)
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False, default=str)
    return v


def flatten_attributes(value: Any) -> dict[str, Any]:
    """A JSON attributes column -> attributes: a JSON object's keys as they are (nested objects stay objects, as
    OTLP kvlist values do); anything else is not attributes (``{}``)."""
    v = json_value(value)
    return {str(k): json_value(x) for k, x in v.items()} if isinstance(v, dict) else {}
