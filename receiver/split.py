"""Split one OTLP export request into per-trace OTLP batches, keeping resource and scope.

Input: the decoded ``ExportTraceServiceRequest`` / ``ExportLogsServiceRequest`` (upb message, already validated by
parsing) and, when the request arrived as protobuf, its decompressed body bytes.
Output: :class:`SplitResult` with one :class:`sinks.base.Record` per trace id whose value is the serialized
``TracesData`` / ``LogsData`` holding only that trace's spans (log records), each under a copy of its original
``Resource`` and ``InstrumentationScope`` (and their ``schema_url``).

Why slices of the wire bytes: the receiver's hot path must stay around a microsecond per span. Re-serializing each
span costs more than that on its own, and building Python dicts per attribute ten times more. ``TracesData``,
``ResourceSpans`` and ``ScopeSpans`` (and their logs twins, which share the field numbers: 1 = resource/scope,
2 = repeated children, 3 = schema_url) are plain length-delimited fields, and an ``ExportTraceServiceRequest`` body
is byte-for-byte a valid ``TracesData``. So the splitter walks the three outer levels of the body once, remembers
where each span's field (tag, length and bytes) sits, and writes each trace's batch by joining those slices under
re-used resource/scope field bytes and new length prefixes. Runs of consecutive spans of one trace become a single
slice, a request that is one trace is passed through unchanged, and span contents are never re-encoded.

Ids are read from the parsed message (one C-level pass per id column) and validated per the OTLP spec
(``opentelemetry-proto`` ``trace.proto`` / ``logs.proto``): a span's trace id must be 16 bytes and its span id 8
bytes, neither all zeros; a non-empty parent span id must be 8 bytes. A log record's trace id is optional (empty or
all zeros = no trace); if present it must be 16 bytes, and a present span id 8 bytes. Invalid items are rejected and
counted (reported to the client as ``partial_success``); the rest are kept.

Log records without a trace id are grouped by the synthetic trace id of their ``session.id`` + ``prompt.id``
attributes when they have a ``prompt.id`` (Claude Code log events: one prompt = one agent run, semconv §2.7), see
``sinks.base.prompt_trace_id``; the key is that id, the records are copied unchanged (their ``trace_id`` stays
empty). The rest keep the ``None`` key. Only the attributes of records without a trace id whose bytes contain
``prompt.id`` are read, so the span path, traced logs and plain untraced logs cost (next to) nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from receiver.errors import BadRequest
from sinks.base import SIGNAL_LOGS, SIGNAL_TRACES, Record, prompt_trace_id_of

_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_ONLY_16 = {16}
_ONLY_8 = {8}
_EMPTY_OR_8 = {0, 8}

# Tags of the length-delimited fields shared by both signals (field_number << 3 | wire type 2).
_TAG_1 = 0x0A  # TracesData.resource_spans, ResourceSpans.resource, ScopeSpans.scope
_TAG_2 = 0x12  # ResourceSpans.scope_spans, ScopeSpans.spans
_TAG_1_BYTE = b"\x0a"
_TAG_2_BYTE = b"\x12"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Length prefixes of all sizes below 16 KiB, precomputed: a table lookup is several times cheaper than encoding a
# varint in Python, and nearly every scope and resource header is that small.
_SMALL_VARINTS = [_varint(n) for n in range(1 << 14)]


def _len_prefix(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 16384 else _varint(n)


def _varint_rest(buf: bytes, i: int, first: int) -> tuple[int, int]:
    """Finish a varint whose first byte ``first`` (>= 0x80) was read; ``i`` is the next index. Returns (value, i)."""
    value, shift = first & 0x7F, 7
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


class ScanError(Exception):
    """The outer levels are not the expected wire shape (should not happen after a successful parse)."""


def _fields(buf: bytes, start: int, end: int, flat: bool = False):
    """Walk protobuf fields in ``buf[start:end]``; yield (tag, field_start, value_start, value_end).

    ``field_start`` is where the tag begins, so ``buf[field_start:value_end]`` is the whole field as encoded.
    Only the outer message levels are walked, so this loop runs once per span, not per attribute.
    """
    i = start
    while i < end:
        field_start = i
        tag = buf[i]
        i += 1
        if tag >= 0x80:  # multi-byte tag: only unknown (high-numbered) fields, never ours
            tag, i = _varint_rest(buf, i, tag)
        wire_type = tag & 7
        if wire_type == 2:
            n = buf[i]
            i += 1
            if n >= 0x80:  # the one-byte case stays inline: it is most scopes and small spans
                n, i = _varint_rest(buf, i, n)
            value_start = i
            i += n
        elif wire_type == 0:
            value_start = i
            while buf[i] >= 0x80:
                i += 1
            i += 1
        elif wire_type == 1:
            value_start, i = i, i + 8
        elif wire_type == 5:
            value_start, i = i, i + 4
        elif wire_type == 4:  # end-group: ends the group being skipped by _skip_group
            value_start = i
        elif wire_type == 3:  # deprecated group (only in unknown fields): skip to its end-group tag
            value_start = i
            if not flat:
                i = _skip_group(buf, i, end, tag >> 3)
        else:
            raise ScanError(f"unexpected wire type {wire_type}")
        if i > end:
            raise ScanError("field runs past its message")
        yield tag, field_start, value_start, i


def _skip_group(buf: bytes, i: int, end: int, field_number: int) -> int:
    """Index just past the end-group tag matching ``field_number``.

    Groups nest; a stack instead of recursion keeps a hostile 100k-deep nesting from exhausting the Python stack.
    """
    open_groups = [field_number]
    for tag, _, _, after in _fields(buf, i, end, flat=True):
        wire_type = tag & 7
        if wire_type == 3:
            open_groups.append(tag >> 3)
        elif wire_type == 4:
            if open_groups.pop() != tag >> 3:
                raise ScanError("mismatched end-group tag")
            if not open_groups:
                return after
    raise ScanError("unterminated group")


@dataclass(slots=True)
class _Scope:
    header: list  # whole encoded fields other than the items: scope, schema_url (and unknown fields)
    items: list  # (field_start, field_end) of each item's whole field (tag + length + bytes)


@dataclass(slots=True)
class _Resource:
    header: list
    scopes: list


class TooManyItems(BadRequest):
    """More resources, scopes and items than the body's size allows (see :func:`scan`): HTTP 400."""


class Wire:
    """Where each resource, scope and item field of a serialized request sits: the result of :func:`scan`."""

    __slots__ = ("buf", "mv", "resources")

    def __init__(self, buf: bytes, resources: list[_Resource]) -> None:
        self.buf, self.mv, self.resources = buf, memoryview(buf), resources


def item_budget(body_len: int) -> int:
    """Most resources + scopes + items a body of ``body_len`` bytes may hold.

    A real span is at least ~30 bytes (two ids alone take 28) and usually hundreds; a real log record tens of
    bytes. One item per 24 bytes, plus a small allowance, admits every realistic request while bounding what
    decoding costs: an empty ``ResourceSpans`` is 2 bytes on the wire but over a hundred bytes once decoded, so
    a 64 MiB body of them would take gigabytes of memory and seconds of CPU.
    """
    return 1024 + body_len // 24


def scan(buf: bytes, max_items: int | None = None) -> Wire:
    """Walk the three outer levels of a serialized export request (``bytes``) and return their layout.

    Raises :class:`TooManyItems` as soon as more than ``max_items`` resources, scopes and items are seen, so a
    pathological request is refused before anything is decoded. Raises ``ScanError`` or ``IndexError`` for
    bytes that are not well-formed protobuf at these levels (the full parse then reports the real error).
    """
    limit = max_items if max_items is not None else 1 << 62
    count = 0
    mv = memoryview(buf)
    resources: list[_Resource] = []
    for tag, _, rs_start, rs_end in _fields(buf, 0, len(buf)):
        if tag != _TAG_1:
            continue  # not a TracesData field: dropped, as a TracesData parser would ignore it anyway
        res = _Resource([], [])
        for tag2, f2, s2, e2 in _fields(buf, rs_start, rs_end):
            if tag2 != _TAG_2:
                res.header.append(mv[f2:e2])
                continue
            scope = _Scope([], [])
            items = scope.items
            # The items (spans / log records): this loop runs once per item, so the common field (tag 2, length
            # below 128 or a longer varint) is decoded inline; any other field goes through _fields.
            i = s2
            while i < e2:
                f3 = i
                if buf[i] == _TAG_2:
                    n = buf[i + 1]
                    i += 2
                    if n >= 0x80:
                        b = buf[i]
                        if b < 0x80:  # a two-byte length (128 B – 16 KiB): most spans, decoded inline
                            n = (n & 0x7F) | (b << 7)
                            i += 1
                        else:
                            n, i = _varint_rest(buf, i, n)
                    i += n
                    if i > e2:
                        raise ScanError("field runs past its message")
                    items.append((f3, i))
                    continue
                tag3, _, _, i = next(_fields(buf, f3, e2))
                if tag3 == _TAG_2:
                    items.append((f3, i))
                else:
                    scope.header.append(mv[f3:i])
            res.scopes.append(scope)
            count += len(items) + 1
            if count > limit:
                break
        resources.append(res)
        count += 1
        if count > limit:
            raise TooManyItems(
                f"request holds more than {limit} resources, scopes and items in {len(buf)} bytes "
                f"(at most one per 24 bytes is accepted); split it into smaller requests")
    return Wire(buf, resources)


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
    """Trace id per span (16 bytes), or None for an invalid span (the reason goes to ``rej``)."""
    # One pass: each step over the repeated field makes a Python wrapper for the span, so one walk instead of three.
    tids: list[bytes] = []
    sids: list[bytes] = []
    psids: list[bytes] = []
    add_tid, add_sid, add_psid = tids.append, sids.append, psids.append
    for s in items:
        add_tid(s.trace_id)
        add_sid(s.span_id)
        add_psid(s.parent_span_id)
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
        elif len(psid) not in _EMPTY_OR_8:
            rej.add(f"{where}[{i}]: parent_span_id must be empty or 8 bytes (got {len(psid)} bytes)")
        else:
            keys.append(tid)
            continue
        keys.append(None)
    return keys


_NO_TRACE = b""  # group key for log records without a trace id (and without a prompt.id)
_PROMPT_ID = b"prompt.id"  # every record with a prompt.id attribute holds these bytes (its key) on the wire


def _log_keys(items: Any, where: str, rej: _Rejections, buf: bytes, ranges: list) -> list[bytes | None]:
    """Group key per log record, or None for an invalid record (reason to ``rej``): its trace id; without one, the
    synthetic :func:`sinks.base.prompt_trace_id` of its ``session.id`` + ``prompt.id`` (Claude Code events), else
    ``b""``.

    Only records without a trace id whose wire bytes (``buf[ranges[i]]``) contain ``prompt.id`` have their
    attributes read: a byte search in C rules out the others (~50 ns), while reading the attributes through the
    protobuf runtime costs ~200 ns per attribute (a Claude Code event has 10-25).
    """
    keys: list[bytes | None] = []
    for i, rec in enumerate(items):
        tid, sid = rec.trace_id, rec.span_id
        if tid and len(tid) != 16:
            rej.add(f"{where}[{i}]: trace_id must be empty or 16 bytes (got {len(tid)} bytes)")
            keys.append(None)
        elif sid and len(sid) != 8:
            rej.add(f"{where}[{i}]: span_id must be empty or 8 bytes (got {len(sid)} bytes)")
            keys.append(None)
        elif not tid or tid == _ZERO_TRACE_ID:
            start, end = ranges[i]
            keys.append((buf.find(_PROMPT_ID, start, end) >= 0 and prompt_trace_id_of(rec.attributes)) or _NO_TRACE)
        else:
            keys.append(tid)
    return keys


class _Piece:
    """Items of one trace under one (resource, scope): item field ranges, consecutive ones merged."""

    __slots__ = ("ri", "si", "ranges", "count")

    def __init__(self, ri: int, si: int, start: int, end: int) -> None:
        self.ri, self.si, self.ranges, self.count = ri, si, [[start, end]], 1

    def add(self, start: int, end: int) -> None:
        last = self.ranges[-1]
        if last[1] == start:
            last[1] = end
        else:
            self.ranges.append([start, end])
        self.count += 1


def _group(request: Any, sig: _Signal, wire: list[_Resource], buf: bytes,
           rej: _Rejections) -> tuple[dict[bytes, list[_Piece]], int]:
    traces = sig is _TRACES
    groups: dict[bytes, list[_Piece]] = {}
    accepted = 0
    for ri, rs in enumerate(getattr(request, sig.resources)):
        for si, ss in enumerate(getattr(rs, sig.scopes)):
            items = getattr(ss, sig.items)
            if not items:
                continue
            ranges = wire[ri].scopes[si].items
            if len(ranges) != len(items):
                raise ScanError("item count differs between parse and wire walk")
            where = f"{sig.resources}[{ri}].{sig.scopes}[{si}].{sig.items}"
            keys = _span_keys(items, where, rej) if traces else _log_keys(items, where, rej, buf, ranges)
            for key, (start, end) in zip(keys, ranges):
                if key is None:
                    continue
                accepted += 1
                pieces = groups.get(key)
                if pieces is None:
                    groups[key] = [_Piece(ri, si, start, end)]
                    continue
                last = pieces[-1]
                if last.ri == ri and last.si == si:
                    last.add(start, end)
                else:
                    pieces.append(_Piece(ri, si, start, end))
    return groups, accepted


def _encode(mv: memoryview, wire: list[_Resource], pieces: list[_Piece]) -> bytes:
    """``TracesData`` / ``LogsData`` bytes for the pieces of one trace (in request order)."""
    out: list = []
    i, n = 0, len(pieces)
    while i < n:
        ri = pieces[i].ri
        res = wire[ri]
        body: list = list(res.header)
        while i < n and pieces[i].ri == ri:
            piece = pieces[i]
            scope = res.scopes[piece.si]
            chunks = [*scope.header, *[mv[a:b] for a, b in piece.ranges]]
            size = sum(map(len, chunks))
            body.append(_TAG_2_BYTE)
            body.append(_len_prefix(size))
            body.extend(chunks)
            i += 1
        out.append(_TAG_1_BYTE)
        out.append(_len_prefix(sum(map(len, body))))
        out.extend(body)
    return b"".join(out)


def _cut(buf: bytes, mv: memoryview, wire: list[_Resource], key: bytes | None, pieces: list[_Piece], sig: _Signal,
         max_record_bytes: int, rej: _Rejections) -> tuple[list[Record], int]:
    """Records of at most ``max_record_bytes`` for an oversized trace; returns them and the items rejected."""
    records: list[Record] = []
    rejected = 0
    chunk: list[_Piece] = []
    chunk_bytes = 0
    for p in pieces:
        for start, end in p.ranges:
            for _, f, _, e in _fields(buf, start, end):  # a merged range may hold several items
                size = e - f + 64  # + room for this item's share of resource/scope headers
                if size > max_record_bytes:
                    rej.add(f"a {sig.item_noun} of trace {key.decode() if key else '-'} is {e - f} bytes, "
                            f"over the {max_record_bytes}-byte record limit")
                    rejected += 1
                    continue
                if chunk and chunk_bytes + size > max_record_bytes:
                    records.append(Record(key, _encode(mv, wire, chunk), sig.signal, sum(c.count for c in chunk)))
                    chunk, chunk_bytes = [], 0
                if chunk and chunk[-1].ri == p.ri and chunk[-1].si == p.si:
                    chunk[-1].add(f, e)
                else:
                    chunk.append(_Piece(p.ri, p.si, f, e))
                chunk_bytes += size
    if chunk:
        records.append(Record(key, _encode(mv, wire, chunk), sig.signal, sum(c.count for c in chunk)))
    return records, rejected


def _walk(request: Any, sig: _Signal, wire: Wire | None):
    if wire is None:
        wire = scan(request.SerializeToString())
    rej = _Rejections()
    groups, accepted = _group(request, sig, wire.resources, wire.buf, rej)
    return wire, rej, groups, accepted


def _run(request: Any, sig: _Signal, max_record_bytes: int, wire: Wire | None) -> SplitResult:
    try:
        wire, rej, groups, accepted = _walk(request, sig, wire)
    except (ScanError, IndexError):
        # Cannot happen for bytes upb parsed (the walk accepts every wire type upb does), but stay correct anyway:
        # walk upb's own canonical re-encoding, without unknown fields.
        request = type(request).FromString(request.SerializeToString())
        request.DiscardUnknownFields()
        wire, rej, groups, accepted = _walk(request, sig, None)
    buf, mv, resources = wire.buf, wire.mv, wire.resources
    if len(groups) == 1 and not rej.count and len(buf) <= max_record_bytes:
        # One trace, nothing rejected: the request body already is the per-trace TracesData/LogsData.
        ((tid, _),) = groups.items()
        return SplitResult([Record(tid.hex().encode() if tid else None, buf, sig.signal, accepted)], accepted)
    records: list[Record] = []
    for tid, pieces in groups.items():
        key = tid.hex().encode() if tid else None
        value = _encode(mv, resources, pieces)
        if len(value) <= max_record_bytes:
            records.append(Record(key, value, sig.signal, sum(p.count for p in pieces)))
            continue
        # Too big for one record: cut between items (same key, so the records stay on one partition, in order).
        cut, too_big = _cut(buf, mv, resources, key, pieces, sig, max_record_bytes, rej)
        records.extend(cut)
        accepted -= too_big
    return SplitResult(records, accepted, rej.count, rej.message(sig.item_noun))


def split_traces(request: Any, max_record_bytes: int, wire: Wire | None = None) -> SplitResult:
    """Group an ``ExportTraceServiceRequest``'s spans by trace id into ``TracesData`` records.

    ``request``: the parsed request (ids are validated from it). ``wire``: :func:`scan` of its protobuf bytes when
    the request arrived as protobuf (else the request is serialized and scanned once). ``max_record_bytes``: largest value to emit; bigger per-trace batches are
    cut between spans into several records with the same key; a single span above it is rejected (counted in
    ``rejected``), never silently dropped. Records come out in first-seen trace order.
    """
    return _run(request, _TRACES, max_record_bytes, wire)


def split_logs(request: Any, max_record_bytes: int, wire: Wire | None = None) -> SplitResult:
    """Group an ``ExportLogsServiceRequest``'s log records by trace id into ``LogsData`` records.

    Log records without a trace id are grouped by prompt when they carry ``prompt.id`` (key: the synthetic
    ``sinks.base.prompt_trace_id`` of ``session.id`` + ``prompt.id``); the others are kept together in one record
    whose key is ``None``. Otherwise as :func:`split_traces`.
    """
    return _run(request, _LOGS, max_record_bytes, wire)
