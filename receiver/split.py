"""Split one OTLP export request into per-trace OTLP batches, keeping resource and scope.

Input: a decoded ``ExportTraceServiceRequest`` / ``ExportLogsServiceRequest`` (upb protobuf message).
Output: :class:`SplitResult` with one :class:`sinks.base.Record` per trace id whose value is the serialized
``TracesData`` / ``LogsData`` holding only that trace's spans (log records), each under a copy of its original
``Resource`` and ``InstrumentationScope`` (and their ``schema_url``).

Why wire-level assembly: the receiver's hot path must stay a few microseconds per span. Building Python dicts per
attribute costs ten times that, and even ``CopyFrom`` into fresh messages costs more than re-using serialized bytes.
``TracesData``/``ResourceSpans``/``ScopeSpans`` and ``LogsData``/``ResourceLogs``/``ScopeLogs`` share field numbers
(1 = resource/scope, 2 = repeated children, 3 = schema_url), so one encoder writes both signals by concatenating
length-delimited fields. The common cases are cheaper still: a whole ``ScopeSpans`` (or ``ResourceSpans``, or the
whole request) that belongs to one trace is serialized once, or passed through unchanged, since an
``ExportTraceServiceRequest`` body is byte-for-byte a valid ``TracesData``.

Validation follows the OTLP spec (``opentelemetry-proto`` ``trace.proto`` / ``logs.proto``): a span's trace id must be
16 bytes and its span id 8 bytes, neither all zeros; a non-empty parent span id must be 8 bytes. A log record's
trace id is optional (empty or all zeros = no trace); if present it must be 16 bytes, and a present span id 8 bytes.
Invalid items are rejected and counted (reported to the client as ``partial_success``); the rest are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sinks.base import SIGNAL_LOGS, SIGNAL_TRACES, Record

_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_ONLY_16 = {16}
_ONLY_8 = {8}
_EMPTY_OR_8 = {0, 8}

# Tags of the length-delimited fields shared by both signals (field_number << 3 | wire type 2).
_TAG_1 = b"\x0a"  # TracesData.resource_spans, ResourceSpans.resource, ScopeSpans.scope
_TAG_2 = b"\x12"  # ResourceSpans.scope_spans, ScopeSpans.spans
_TAG_3 = b"\x1a"  # ResourceSpans.schema_url, ScopeSpans.schema_url


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Length prefixes of all sizes below 16 KiB, precomputed: almost every span and scope header is that small, and a
# table lookup is several times cheaper than encoding a varint in Python per span.
_SMALL_VARINTS = [_varint(n) for n in range(1 << 14)]


def _len_prefix(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 16384 else _varint(n)


def _field(tag: bytes, payload: bytes) -> bytes:
    return b"".join((tag, _len_prefix(len(payload)), payload))


def _repeated(tag: bytes, payloads: list[bytes]) -> list[bytes]:
    """Chunks of a repeated length-delimited field, to be joined once by the caller."""
    out = []
    for p in payloads:
        out.append(tag)
        out.append(_len_prefix(len(p)))
        out.append(p)
    return out


@dataclass(slots=True)
class SplitResult:
    """Per-trace records of one request plus the counts the response and metrics need.

    ``accepted``/``rejected``: spans (or log records). ``error_message``: English summary of the first rejection
    reasons, empty when nothing was rejected.
    """

    records: list[Record] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class _Signal:
    signal: str
    resources: str  # attribute on the request message: resource_spans / resource_logs
    scopes: str  # on the resource message: scope_spans / scope_logs
    items: str  # on the scope message: spans / log_records
    item_noun: str


_TRACES = _Signal(SIGNAL_TRACES, "resource_spans", "scope_spans", "spans", "span")
_LOGS = _Signal(SIGNAL_LOGS, "resource_logs", "scope_logs", "log_records", "log record")


class _Rejections:
    """Counts rejected items and keeps the first few reasons for the partial-success message."""

    __slots__ = ("count", "reasons")
    _MAX_REASONS = 5

    def __init__(self) -> None:
        self.count = 0
        self.reasons: list[str] = []

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < self._MAX_REASONS:
            self.reasons.append(reason)

    def message(self, noun: str) -> str:
        if not self.count:
            return ""
        more = "" if self.count <= len(self.reasons) else f"; and {self.count - len(self.reasons)} more"
        return f"rejected {self.count} invalid {noun}(s): " + "; ".join(self.reasons) + more


def _span_keys(items: Any, where: str, rej: _Rejections) -> list[bytes | None]:
    """Trace id per span (16 bytes), or None for an invalid span (the reason goes to ``rej``).

    Reads the ids column-wise first: one list comprehension per id field is several times cheaper than
    building per-span error context, which is only done for the rare invalid span.
    """
    tids = [s.trace_id for s in items]
    sids = [s.span_id for s in items]
    psids = [s.parent_span_id for s in items]
    # set(map(len, ...)) and `in` on a list run in C: the all-valid check costs a few ns per span.
    if (set(map(len, tids)) == _ONLY_16 and _ZERO_TRACE_ID not in tids
            and set(map(len, sids)) == _ONLY_8 and _ZERO_SPAN_ID not in sids
            and set(map(len, psids)) <= _EMPTY_OR_8):
        return tids
    keys: list[bytes | None] = []
    for i, (tid, sid, psid) in enumerate(zip(tids, sids, psids)):
        if len(tid) != 16 or tid == _ZERO_TRACE_ID:
            rej.add(f"{where}[{i}]: trace_id must be 16 bytes and not all zero (got {len(tid)} bytes)")
        elif len(sid) != 8 or sid == _ZERO_SPAN_ID:
            rej.add(f"{where}[{i}]: span_id must be 8 bytes and not all zero (got {len(sid)} bytes)")
        elif len(psid) not in (0, 8):
            rej.add(f"{where}[{i}]: parent_span_id must be empty or 8 bytes (got {len(psid)} bytes)")
        else:
            keys.append(tid)
            continue
        keys.append(None)
    return keys


_NO_TRACE = b""  # group key for log records without a trace id


def _log_keys(items: Any, where: str, rej: _Rejections) -> list[bytes | None]:
    """Trace id per log record (``b""`` when it has none), or None for an invalid record (reason to ``rej``)."""
    keys: list[bytes | None] = []
    for i, rec in enumerate(items):
        tid, sid = rec.trace_id, rec.span_id
        if tid and len(tid) != 16:
            rej.add(f"{where}[{i}]: trace_id must be empty or 16 bytes (got {len(tid)} bytes)")
            keys.append(None)
        elif sid and len(sid) != 8:
            rej.add(f"{where}[{i}]: span_id must be empty or 8 bytes (got {len(sid)} bytes)")
            keys.append(None)
        else:
            keys.append(_NO_TRACE if not tid or tid == _ZERO_TRACE_ID else tid)
    return keys


# Per trace, the pieces collected in request order: [resource_index, scope_index, [item bytes, ...]], or
# [resource_index, scope_index, None] when the whole scope belongs to the trace.
_Piece = list


def _split(request: Any, sig: _Signal) -> tuple[dict[bytes, list[_Piece]], _Rejections, int]:
    keys_of = _span_keys if sig is _TRACES else _log_keys
    rej = _Rejections()
    groups: dict[bytes, list[_Piece]] = {}
    accepted = 0
    for ri, rs in enumerate(getattr(request, sig.resources)):
        for si, ss in enumerate(getattr(rs, sig.scopes)):
            items = getattr(ss, sig.items)
            if not items:
                continue
            keys = keys_of(items, f"{sig.resources}[{ri}].{sig.scopes}[{si}].{sig.items}", rej)
            first = keys[0]
            if first is not None and keys.count(first) == len(keys):
                # Whole scope belongs to one trace: no per-item work.
                groups.setdefault(first, []).append([ri, si, None])
                accepted += len(keys)
                continue
            for it, key in zip(items, keys):
                if key is None:
                    continue
                accepted += 1
                pieces = groups.get(key)
                if pieces is None:
                    groups[key] = [[ri, si, [it.SerializeToString()]]]
                    continue
                last = pieces[-1]
                if last[0] == ri and last[1] == si and last[2] is not None:
                    last[2].append(it.SerializeToString())
                else:
                    pieces.append([ri, si, [it.SerializeToString()]])
    return groups, rej, accepted


def _encode_resource(rs: Any, sig: _Signal, scope_blobs: list[bytes]) -> bytes:
    parts = []
    if rs.HasField("resource"):
        parts.append(_field(_TAG_1, rs.resource.SerializeToString()))
    parts.extend(_repeated(_TAG_2, scope_blobs))
    if rs.schema_url:
        parts.append(_field(_TAG_3, rs.schema_url.encode()))
    return b"".join(parts)


def _encode_scope(ss: Any, item_blobs: list[bytes]) -> bytes:
    parts = []
    if ss.HasField("scope"):
        parts.append(_field(_TAG_1, ss.scope.SerializeToString()))
    parts.extend(_repeated(_TAG_2, item_blobs))
    if ss.schema_url:
        parts.append(_field(_TAG_3, ss.schema_url.encode()))
    return b"".join(parts)


def _encode(request: Any, sig: _Signal, pieces: list[_Piece]) -> bytes:
    """Serialize the pieces of one trace as ``TracesData`` / ``LogsData`` bytes."""
    resources = getattr(request, sig.resources)
    out: list[bytes] = []
    cur_ri = -1
    scope_blobs: list[bytes] = []
    for piece in pieces:
        ri, si, item_blobs = piece[0], piece[1], piece[2]
        if ri != cur_ri:
            if cur_ri >= 0:
                out.append(_field(_TAG_1, _encode_resource(resources[cur_ri], sig, scope_blobs)))
            cur_ri, scope_blobs = ri, []
        ss = getattr(resources[ri], sig.scopes)[si]
        scope_blobs.append(ss.SerializeToString() if item_blobs is None else _encode_scope(ss, item_blobs))
    if cur_ri >= 0:
        out.append(_field(_TAG_1, _encode_resource(resources[cur_ri], sig, scope_blobs)))
    return b"".join(out)


def _count(request: Any, sig: _Signal, pieces: list[_Piece]) -> int:
    resources = getattr(request, sig.resources)
    return sum(
        len(p[2]) if p[2] is not None else len(getattr(getattr(resources[p[0]], sig.scopes)[p[1]], sig.items))
        for p in pieces
    )


def _explode(request: Any, sig: _Signal, pieces: list[_Piece]) -> list[_Piece]:
    """Turn whole-scope pieces into per-item pieces so an oversized trace can be cut between items."""
    resources = getattr(request, sig.resources)
    out: list[_Piece] = []
    for ri, si, blobs in pieces:
        if blobs is None:
            items = getattr(getattr(resources[ri], sig.scopes)[si], sig.items)
            blobs = [it.SerializeToString() for it in items]
        out.extend([ri, si, [b]] for b in blobs)
    return out


def _records(request: Any, sig: _Signal, groups: dict[bytes, list[_Piece]], max_record_bytes: int,
             rej: _Rejections, raw_body: bytes | None, total_items: int) -> list[Record]:
    records: list[Record] = []
    if raw_body is not None and len(groups) == 1 and not rej.count and len(raw_body) <= max_record_bytes:
        # One trace, nothing rejected: the request body already is the per-trace TracesData/LogsData.
        ((tid, _),) = groups.items()
        key = tid.hex().encode() if tid else None
        return [Record(key, raw_body, sig.signal, total_items)]
    for tid, pieces in groups.items():
        key = tid.hex().encode() if tid else None
        value = _encode(request, sig, pieces)
        if len(value) <= max_record_bytes:
            records.append(Record(key, value, sig.signal, _count(request, sig, pieces)))
            continue
        # Too big for one message: cut between items (same key, so the records stay on one partition, in order).
        chunk: list[_Piece] = []
        chunk_bytes = 0
        for piece in _explode(request, sig, pieces):
            size = len(piece[2][0]) + 64
            if size > max_record_bytes:
                rej.add(f"a {sig.item_noun} of trace {key.decode() if key else '-'} is {size} bytes, "
                        f"over the {max_record_bytes}-byte record limit")
                continue
            if chunk and chunk_bytes + size > max_record_bytes:
                records.append(Record(key, _encode(request, sig, chunk), sig.signal, len(chunk)))
                chunk, chunk_bytes = [], 0
            chunk.append(piece)
            chunk_bytes += size
        if chunk:
            records.append(Record(key, _encode(request, sig, chunk), sig.signal, len(chunk)))
    return records


def _run(request: Any, sig: _Signal, max_record_bytes: int, raw_body: bytes | None) -> SplitResult:
    groups, rej, accepted = _split(request, sig)
    before = rej.count
    records = _records(request, sig, groups, max_record_bytes, rej, raw_body, accepted)
    accepted -= rej.count - before  # items over the record limit were rejected after being counted
    return SplitResult(records, accepted, rej.count, rej.message(sig.item_noun))


def split_traces(request: Any, max_record_bytes: int, raw_body: bytes | None = None) -> SplitResult:
    """Group an ``ExportTraceServiceRequest``'s spans by trace id into ``TracesData`` records.

    ``max_record_bytes``: largest value to emit; bigger per-trace batches are cut between spans into several records
    with the same key; a single span above it is rejected (counted in ``rejected``), never silently dropped.
    ``raw_body``: the decompressed protobuf request bytes when available, passed through unchanged when the whole
    request is one valid trace. Records come out in first-seen trace order.
    """
    return _run(request, _TRACES, max_record_bytes, raw_body)


def split_logs(request: Any, max_record_bytes: int, raw_body: bytes | None = None) -> SplitResult:
    """Group an ``ExportLogsServiceRequest``'s log records by trace id into ``LogsData`` records.

    Log records without a trace id are kept together in one record whose key is ``None``. Otherwise as
    :func:`split_traces`.
    """
    return _run(request, _LOGS, max_record_bytes, raw_body)
