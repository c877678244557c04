"""The assembler's state machine, without I/O: per-partition trace buffers, span dedupe, close rules, versions of
late data, and the low-watermark offset that is safe to commit.

Driven by :class:`pipeline.assembler.Assembler`; tested with a fake clock (``clock`` is any ``() -> float``
returning seconds; only differences matter).

**Buffers.** A record value (OTLP ``TracesData``/``LogsData`` bytes, see ``sinks.base``) is decoded once with the
protobuf runtime to learn its trace ids, span ids, end times and status codes; the raw bytes are kept (memory is
counted in OTLP wire bytes) and only turned into canonical spans when the trace closes
(``pipeline.envelope_builder``). A span id seen before is a duplicate (exporter retry, replay) unless the new copy
ends later, which replaces the old one; log records are identified by (span id, time, observed time, severity,
event name). A record that brings nothing new is not kept.

**Close rules** (:meth:`AssemblerCore.due`): ``root-ended-and-quiet`` — a span without parent has ended and no new
data came for ``quiet_period_s`` (for a prompt-keyed trace, which has no spans and so no root: no new data came for
``prompt_quiet_period_s``); ``max-wait`` — ``max_wait_s`` since the trace's first data; ``evicted`` — the
buffered bytes of all open traces exceed ``max_buffered_bytes``: oldest trace first. Times are the assembler's own
arrival times (replays restart the clocks; a replay reads faster than the data was produced, so gaps shrink).

**Log records without a trace id.** Those carrying ``prompt.id`` (Claude Code events) belong to the synthetic trace
``sinks.base.prompt_trace_id(session.id, prompt.id)`` — recomputed here from the attributes, the same id the
receiver used as the record key — and are assembled like any trace: one prompt = one trace = one envelope. Such a
trace is *prompt-keyed*; its log records keep their empty trace id in the envelope. Records with neither a trace id
nor a ``prompt.id`` cannot be grouped and are only counted.

**Late data and versions.** Closed traces are remembered in a bounded LRU (``remembered`` entries): version, known
span triples and log ids, and — within ``retained_bytes`` — the raw records. Data for a remembered trace that is
all known is dropped (a replay of what was already emitted); new data reopens the trace as version N+1, seeded with
the retained records (or the prior envelope given by a lookup), so the new version holds the whole trace. An entry
whose records were dropped for memory reopens with the new data only.

**Low-watermark** (kafka-and-helm.md §5, per partition): the commit point is the smallest first offset of the
open traces and of the closed-but-unacknowledged envelopes, else last consumed + 1 — lowered further so it never
falls *inside* a closed trace's offset range (first..last record, duplicates included). Without that last rule, a
replay from the committed offset would see only the tail of an already-emitted trace and emit a fragment under a
new key; with it, a replay always rebuilds whole traces, so re-emitted envelopes keep their idempotency keys. The
watermark never moves back.

**After a restart** the LRU is empty (unless a ``lookup`` — the embedded traces directory — refills it on
demand). Replayed records of traces emitted before the crash are rebuilt whole and re-emitted with the same key and
version 1; late data of a trace whose whole range was already committed past (it arrived after the watermark
passed the trace) comes out as an envelope of just that data, version 1, under its own key. Consumers keep, per
trace id, the envelope with the most spans / highest version.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

from google.protobuf.message import DecodeError
from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
from opentelemetry.proto.trace.v1.trace_pb2 import Status, TracesData

from normalizers.canonical import (SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK,
                                   log_event_identity)
from pipeline.bus import BusRecord
from sinks.base import (
    HEADER_RECEIVED_AT, HEADER_SIGNAL, HEADER_SOURCE_ID, HEADER_TRANSPORT, SIGNAL_LOGS, SIGNAL_TRACES,
    prompt_trace_id_of, prompt_trace_id_of_dict)

if TYPE_CHECKING:
    from normalizers.canonical import CanonicalLogEvent
    from normalizers.envelope import Envelope

CLOSED_QUIET = "root-ended-and-quiet"
CLOSED_MAX_WAIT = "max-wait"
CLOSED_EVICTED = "evicted"
#: Close reason of a prompt-keyed trace (log events only, no root that could end) gone quiet.
CLOSED_PROMPT_QUIET = "quiet"

_STATUS = {v: k.removeprefix("STATUS_CODE_") for k, v in Status.StatusCode.items()}
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_REMOTE_PARENT = SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK

#: (end_time_unix_nano, status code short name) of a span; what the envelope key covers besides the span id.
SpanFacts = tuple[int, str]
#: Identity of a log record: (span id hex, time ns, observed time ns, severity number, event name).
LogId = tuple[str, int, int, int, str]


class PoisonRecord(ValueError):
    """A record that can never be assembled (undecodable value, ids of the wrong length, unknown signal)."""


@dataclass(slots=True)
class TraceFacts:
    """What one record says about one trace: its spans' facts, roots, and log record ids. ``prompt_keyed``: the
    trace id is the synthetic one of log records without a trace id (see the module docstring)."""

    spans: dict[str, SpanFacts] = field(default_factory=dict)
    root_ended: bool = False
    root_seen: bool = False
    logs: set[LogId] = field(default_factory=set)
    prompt_keyed: bool = False


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A kept input record (raw value bytes) with the metadata the envelope needs."""

    offset: int
    signal: str
    value: bytes
    source_id: str
    transport: str | None
    received_at_ns: int


class Decoded(NamedTuple):
    """:func:`decode_record`'s result: trace id (32 hex) -> :class:`TraceFacts`, and the number of log records
    with neither a trace id nor a ``prompt.id`` (they cannot be grouped and are not assembled; counted in
    metrics)."""

    traces: dict[str, TraceFacts]
    untraced_logs: int = 0


def decode_record(rec: BusRecord) -> Decoded:
    """What ``rec`` holds, per trace. Raises :class:`PoisonRecord` with a specific message."""
    signal = rec.header(HEADER_SIGNAL, SIGNAL_TRACES)
    if signal not in (SIGNAL_TRACES, SIGNAL_LOGS):
        raise PoisonRecord(f"unknown signal header {signal!r} (expected traces or logs)")
    try:
        data = LogsData.FromString(rec.value) if signal == SIGNAL_LOGS else TracesData.FromString(rec.value)
    except (DecodeError, ValueError) as exc:
        kind = "LogsData" if signal == SIGNAL_LOGS else "TracesData"
        raise PoisonRecord(f"value is not an OTLP {kind} protobuf: {exc}") from exc
    out: dict[str, TraceFacts] = {}
    if signal == SIGNAL_LOGS:
        untraced = 0
        may_have_prompts = b"prompt.id" in rec.value  # else no attribute needs reading (see receiver.split)
        for rl in data.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    prompt_keyed = not lr.trace_id or lr.trace_id == _ZERO_TRACE  # OTLP: empty or zeros = no trace
                    if prompt_keyed:
                        tid = prompt_trace_id_of(lr.attributes) if may_have_prompts else None
                        if tid is None:
                            untraced += 1
                            continue
                    elif len(lr.trace_id) != 16:
                        raise PoisonRecord(f"log record trace id {lr.trace_id.hex()!r} is not 16 bytes")
                    else:
                        tid = lr.trace_id
                    name = lr.event_name or next((kv.value.string_value for kv in lr.attributes
                                                  if kv.key == "event.name"), "")
                    facts = out.setdefault(tid.hex(), TraceFacts())
                    facts.prompt_keyed = facts.prompt_keyed or prompt_keyed
                    # The same tuple as normalizers.canonical.log_event_identity, read from the protobuf directly.
                    facts.logs.add((lr.span_id.hex(), lr.time_unix_nano, lr.observed_time_unix_nano,
                                    lr.severity_number, name))
        return Decoded(out, untraced)
    for rs in data.resource_spans:
        for ss in rs.scope_spans:
            for sp in ss.spans:
                if len(sp.trace_id) != 16 or sp.trace_id == _ZERO_TRACE:
                    raise PoisonRecord(f"span trace id {sp.trace_id.hex()!r} is not 16 non-zero bytes")
                if len(sp.span_id) != 8 or sp.span_id == _ZERO_SPAN:
                    raise PoisonRecord(f"span id {sp.span_id.hex()!r} is not 8 non-zero bytes")
                facts = out.setdefault(sp.trace_id.hex(), TraceFacts())
                span_id = sp.span_id.hex()
                new = (sp.end_time_unix_nano, _STATUS.get(sp.status.code, "UNSET"))
                old = facts.spans.get(span_id)
                if old is None or new[0] > old[0]:
                    facts.spans[span_id] = new
                # A span without a parent, or whose parent is remote (a local root: the caller's spans go
                # elsewhere and never arrive), is the top of the run; waiting for its parent would only reach
                # max-wait.
                if not sp.parent_span_id or sp.flags & _REMOTE_PARENT == _REMOTE_PARENT:
                    facts.root_seen = True
                    facts.root_ended = facts.root_ended or sp.end_time_unix_nano > 0
    return Decoded(out)


def log_event_in_trace(event: "CanonicalLogEvent", trace_id: str) -> "CanonicalLogEvent | None":
    """``event`` if it belongs to ``trace_id`` (32 hex), else ``None``: its own trace id is ``trace_id``, or it has
    none (empty or all zeros) and its ``session.id`` + ``prompt.id`` give that synthetic id — then returned with
    ``trace_id=""`` (an all-zero id normalized: it means "no trace" in OTLP). What :func:`decode_record` attributed
    to the trace, for the envelope builder."""
    own = event.trace_id
    if own == trace_id:
        return event
    if own.strip("0"):
        return None
    tid = prompt_trace_id_of_dict(event.attributes)
    if tid is None or tid.hex() != trace_id:
        return None
    return event.model_copy(update={"trace_id": ""}) if own else event


def stored(rec: BusRecord) -> StoredRecord:
    """The kept form of an input record."""
    try:
        received = int(rec.header(HEADER_RECEIVED_AT, "0") or 0)
    except ValueError:
        received = 0
    return StoredRecord(offset=rec.offset, signal=rec.header(HEADER_SIGNAL, SIGNAL_TRACES) or SIGNAL_TRACES,
                        value=rec.value, source_id=rec.header(HEADER_SOURCE_ID, "") or "",
                        transport=rec.header(HEADER_TRANSPORT), received_at_ns=received)


@dataclass(slots=True)
class ClosedInfo:
    """What is remembered of a closed trace (an LRU entry).

    ``records``: the raw records of all its versions, ``None`` once dropped to respect ``retained_bytes``.
    ``prior``: the previous envelope when the entry came from a lookup (embedded traces directory) instead.
    """

    version: int
    spans: dict[str, SpanFacts]
    logs: set[LogId]
    root_ended: bool
    records: list[StoredRecord] | None = None
    prior: "Envelope | None" = None
    nbytes: int = 0

    @classmethod
    def from_envelope(cls, env: "Envelope", nbytes: int = 0) -> "ClosedInfo":
        return cls(version=env.envelope_version,
                   spans={s.span_id: (s.end_time_unix_nano, s.status_code) for s in env.spans},
                   logs={log_event_identity(e) for e in env.log_events},
                   root_ended=any(s.is_run_root and s.end_time_unix_nano > 0 for s in env.spans),
                   prior=env, nbytes=nbytes)


@dataclass(eq=False, slots=True)
class OpenTrace:
    """A trace being buffered. ``pin``: lowest offset a replay must start at to rebuild it whole; ``last``: its
    highest offset; both cover only data not yet committed past (seeded records of earlier versions are not)."""

    trace_id: str
    partition: int
    version: int
    pin: int
    last: int
    first_seen: float
    last_seen: float
    records: list[StoredRecord] = field(default_factory=list)
    spans: dict[str, SpanFacts] = field(default_factory=dict)
    logs: set[LogId] = field(default_factory=set)
    root_ended: bool = False
    nbytes: int = 0
    new_records: int = 0
    prior: "Envelope | None" = None
    prompt_keyed: bool = False


@dataclass(frozen=True, slots=True)
class ClosedTrace:
    """A trace to emit: everything needed to build its envelope, plus what :meth:`AssemblerCore.acknowledge` needs.

    ``records``: raw records in order (earlier versions' first); ``new_records``: how many at the end arrived for
    this version (what the DLQ gets if the envelope cannot be built); ``prior``: an earlier envelope to merge.
    """

    token: int
    trace_id: str
    partition: int
    version: int
    reason: str
    records: tuple[StoredRecord, ...]
    new_records: int
    prior: "Envelope | None"
    root_ended: bool
    epoch: int
    prompt_keyed: bool = False


@dataclass(slots=True)
class IngestOutcome:
    """Counts for metrics from one :meth:`AssemblerCore.ingest`."""

    new_spans: int = 0
    duplicate_spans: int = 0
    new_logs: int = 0
    duplicate_logs: int = 0
    reopened: int = 0
    ignored: bool = False  # the partition is not owned (revoked meanwhile)


class PartitionState:
    """Buffers and offset bookkeeping of one owned partition (discarded on revocation)."""

    def __init__(self, partition: int, epoch: int) -> None:
        self.partition = partition
        self.epoch = epoch  # distinguishes this ownership from a later one of the same partition
        self.open: dict[str, OpenTrace] = {}  # creation order == first_seen order
        self.activity: OrderedDict[str, None] = OrderedDict()  # open trace ids, least recently updated first
        self.inflight: dict[int, tuple[int, str]] = {}  # token -> (pin, trace id): closed, not yet acknowledged
        self.done: dict[str, list[int]] = {}  # trace id -> [first, last] offsets of an emitted trace
        self.last_consumed: int | None = None
        self.floor: int | None = None  # highest watermark handed out; it never moves back

    def watermark(self) -> int | None:
        """The offset safe to commit now (next offset to read), or None before the first record."""
        if self.last_consumed is None:
            return None
        w = self.last_consumed + 1
        for t in self.open.values():
            w = min(w, t.pin)
        for pin, _ in self.inflight.values():
            w = min(w, pin)
        # Never inside an emitted trace's range: lower to its first offset (may cascade into another range).
        changed = True
        while changed:
            changed = False
            for first, last in self.done.values():
                if first < w <= last:
                    w, changed = first, True
        if self.floor is not None:
            w = max(w, self.floor)
        self.floor = w
        # Ranges wholly below the watermark can never straddle it again.
        for tid in [tid for tid, (_, last) in self.done.items() if last < w]:
            del self.done[tid]
        return w


class AssemblerCore:
    """Pure assembler state for the partitions this process owns. See the module docstring for the rules.

    ``clock``: seconds, monotonic. ``remembered``: LRU entries of closed traces; ``retained_bytes``: raw bytes the
    LRU may keep. Not thread-safe; call from one task.
    """

    def __init__(self, *, quiet_period_s: float = 5.0, max_wait_s: float = 300.0,
                 max_buffered_bytes: int = 256 * 1024 * 1024, remembered: int = 10_000,
                 retained_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float],
                 prompt_quiet_period_s: float = 30.0) -> None:
        self.quiet_period_s = quiet_period_s
        self.prompt_quiet_period_s = prompt_quiet_period_s
        self.max_wait_s = max_wait_s
        self.max_buffered_bytes = max_buffered_bytes
        self.remembered = remembered
        self.retained_limit = retained_bytes
        self.clock = clock
        self.partitions: dict[int, PartitionState] = {}
        # Kept across rebalances: if a partition comes back, its closed traces are still known.
        self.lru: OrderedDict[tuple[int, str], ClosedInfo] = OrderedDict()
        # LRU keys whose entry may still hold raw records, in LRU order: what the byte budget strips first, without
        # walking past the (many) entries already stripped. Keys the LRU dropped meanwhile are skipped lazily.
        self._holding: OrderedDict[tuple[int, str], None] = OrderedDict()
        self.buffered_bytes = 0
        self.retained_bytes = 0
        self._tokens = itertools.count(1)
        self._epochs = itertools.count(1)

    # -- ownership ----------------------------------------------------------------------------------------------

    def assign(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            if p not in self.partitions:
                self.partitions[p] = PartitionState(p, next(self._epochs))

    def revoke(self, partitions: Iterable[int]) -> dict[int, int]:
        """Forget the partitions' buffers (no partial emits: the next owner replays); returns the watermarks to
        commit first (``partition -> offset``)."""
        offsets: dict[int, int] = {}
        for p in partitions:
            state = self.partitions.pop(p, None)
            if state is None:
                continue
            w = state.watermark()
            if w is not None:
                offsets[p] = w
            self.buffered_bytes -= sum(t.nbytes for t in state.open.values())
            # A closed trace whose envelope is not durable yet must not count as emitted if the partition comes
            # back: the next owner (maybe us) replays it and must emit it. Acknowledged ones stay remembered.
            for _, trace_id in state.inflight.values():
                info = self.lru.pop((p, trace_id), None)
                if info is not None:
                    self.retained_bytes -= info.nbytes
        return offsets

    def owns(self, closed: ClosedTrace) -> bool:
        """Whether ``closed`` still belongs to a partition this process owns (same ownership epoch)."""
        state = self.partitions.get(closed.partition)
        return state is not None and state.epoch == closed.epoch

    @property
    def open_traces(self) -> int:
        return sum(len(s.open) for s in self.partitions.values())

    def watermarks(self) -> dict[int, int]:
        """Current watermark of every owned partition that has consumed something."""
        out = {}
        for p, state in self.partitions.items():
            w = state.watermark()
            if w is not None:
                out[p] = w
        return out

    # -- input --------------------------------------------------------------------------------------------------

    def unknown(self, partition: int, trace_ids: Iterable[str]) -> list[str]:
        """Trace ids neither open nor remembered: candidates for a lookup of an earlier envelope."""
        state = self.partitions.get(partition)
        if state is None:
            return []
        return [t for t in trace_ids if t not in state.open and (partition, t) not in self.lru]

    def remember(self, partition: int, trace_id: str, info: ClosedInfo) -> None:
        """Add a closed trace learnt from elsewhere (a lookup) to the LRU."""
        self._lru_put(partition, trace_id, info)

    def skip(self, rec: BusRecord) -> None:
        """Count ``rec`` as consumed without content (poison sent to the DLQ, or nothing assemblable)."""
        state = self.partitions.get(rec.partition)
        if state is not None:
            state.last_consumed = max(rec.offset, state.last_consumed or 0)

    def ingest(self, rec: BusRecord, decoded: dict[str, TraceFacts]) -> IngestOutcome:
        """Add a decoded record (``decode_record(rec).traces``) of an owned partition."""
        out = IngestOutcome()
        state = self.partitions.get(rec.partition)
        if state is None:
            out.ignored = True
            return out
        now = self.clock()
        kept: StoredRecord | None = None
        for trace_id, facts in decoded.items():
            trace = state.open.get(trace_id)
            if trace is None:
                info = self.lru.get((rec.partition, trace_id))
                if info is not None and not _adds(info.spans, info.logs, facts):
                    # All known: an exporter retry or a replay of data already emitted.
                    out.duplicate_spans += len(facts.spans)
                    out.duplicate_logs += len(facts.logs)
                    self.lru.move_to_end((rec.partition, trace_id))
                    if (rec.partition, trace_id) in self._holding:
                        self._holding.move_to_end((rec.partition, trace_id))
                    rng = state.done.get(trace_id)
                    if rng is not None:  # keep replays whole: the duplicate belongs to the trace's range
                        rng[1] = max(rng[1], rec.offset)
                    continue
                trace = self._open(state, trace_id, rec.offset, now, info)
                out.reopened += info is not None
            if not _adds(trace.spans, trace.logs, facts):
                out.duplicate_spans += len(facts.spans)
                out.duplicate_logs += len(facts.logs)
                trace.last = max(trace.last, rec.offset)
                continue
            for span_id, new in facts.spans.items():
                old = trace.spans.get(span_id)
                if old is None or new[0] > old[0]:
                    trace.spans[span_id] = new
                    out.new_spans += 1
                else:
                    out.duplicate_spans += 1
            fresh = facts.logs - trace.logs
            out.new_logs += len(fresh)
            out.duplicate_logs += len(facts.logs) - len(fresh)
            trace.logs |= fresh
            trace.root_ended = trace.root_ended or facts.root_ended
            trace.prompt_keyed = trace.prompt_keyed or facts.prompt_keyed
            if kept is None:
                kept = stored(rec)
            trace.records.append(kept)
            trace.new_records += 1
            trace.nbytes += len(rec.value)
            self.buffered_bytes += len(rec.value)
            trace.last = max(trace.last, rec.offset)
            trace.last_seen = now
            state.activity.move_to_end(trace_id)
        state.last_consumed = max(rec.offset, state.last_consumed or 0)
        return out

    def _open(self, state: PartitionState, trace_id: str, offset: int, now: float,
              info: ClosedInfo | None) -> OpenTrace:
        trace = OpenTrace(trace_id, state.partition, 1, offset, offset, now, now)
        if info is not None:  # late data: version N+1 holding the earlier content too
            del self.lru[(state.partition, trace_id)]
            self.retained_bytes -= info.nbytes
            trace.version = info.version + 1
            trace.spans = dict(info.spans)
            trace.logs = set(info.logs)
            trace.root_ended = info.root_ended
            trace.prior = info.prior
            if info.records:
                trace.records = list(info.records)
                trace.nbytes = sum(len(r.value) for r in info.records)
                self.buffered_bytes += trace.nbytes
            rng = state.done.pop(trace_id, None)
            if rng is not None:  # earlier version still above the watermark: a replay must rebuild both
                trace.pin = min(trace.pin, rng[0])
        state.open[trace_id] = trace
        state.activity[trace_id] = None
        return trace

    # -- closing ------------------------------------------------------------------------------------------------

    def due(self) -> list[ClosedTrace]:
        """Close every trace whose rule fired (quiet, max wait, then memory eviction oldest first).

        Quiet: a trace whose root ended, after ``quiet_period_s`` without new data; a prompt-keyed trace (log records
        only, no root can ever come), after ``prompt_quiet_period_s``."""
        now = self.clock()
        out: list[ClosedTrace] = []
        quiet, prompt_quiet = self.quiet_period_s, self.prompt_quiet_period_s
        shortest = min(quiet, prompt_quiet)
        for state in list(self.partitions.values()):
            for trace_id in list(state.activity):
                trace = state.open[trace_id]
                idle = now - trace.last_seen
                if idle < shortest:
                    break  # the rest were updated even later
                if trace.root_ended and idle >= quiet:
                    out.append(self._close(state, trace, CLOSED_QUIET))
                elif trace.prompt_keyed and not trace.spans and idle >= prompt_quiet:
                    out.append(self._close(state, trace, CLOSED_PROMPT_QUIET))
            for trace in list(state.open.values()):
                if now - trace.first_seen < self.max_wait_s:
                    break  # creation order: the rest are younger
                out.append(self._close(state, trace, CLOSED_MAX_WAIT))
        while self.buffered_bytes > self.max_buffered_bytes:
            heads = [(next(iter(s.open.values())), s) for s in self.partitions.values() if s.open]
            if not heads:
                break
            trace, state = min(heads, key=lambda h: h[0].first_seen)
            out.append(self._close(state, trace, CLOSED_EVICTED))
        return out

    def _close(self, state: PartitionState, trace: OpenTrace, reason: str) -> ClosedTrace:
        del state.open[trace.trace_id]
        del state.activity[trace.trace_id]
        self.buffered_bytes -= trace.nbytes
        token = next(self._tokens)
        state.inflight[token] = (trace.pin, trace.trace_id)
        state.done[trace.trace_id] = [trace.pin, trace.last]
        # Remember at close, not at acknowledgement: data arriving while the envelope is in flight is late data.
        self._lru_put(state.partition, trace.trace_id, ClosedInfo(
            version=trace.version, spans=trace.spans, logs=trace.logs, root_ended=trace.root_ended,
            records=trace.records, prior=trace.prior, nbytes=trace.nbytes))
        return ClosedTrace(token=token, trace_id=trace.trace_id, partition=state.partition, version=trace.version,
                           reason=reason, records=tuple(trace.records), new_records=trace.new_records,
                           prior=trace.prior, root_ended=trace.root_ended, epoch=state.epoch,
                           prompt_keyed=trace.prompt_keyed)

    def acknowledge(self, closed: ClosedTrace) -> None:
        """The envelope of ``closed`` is durable (or dead-lettered): it no longer holds the watermark back."""
        state = self.partitions.get(closed.partition)
        if state is not None and state.epoch == closed.epoch:
            state.inflight.pop(closed.token, None)

    # -- the closed-trace LRU -----------------------------------------------------------------------------------

    def _lru_put(self, partition: int, trace_id: str, info: ClosedInfo) -> None:
        key = (partition, trace_id)
        old = self.lru.pop(key, None)
        if old is not None:
            self.retained_bytes -= old.nbytes
        if self.remembered <= 0:
            return
        self.lru[key] = info
        self.retained_bytes += info.nbytes
        if info.nbytes:
            self._holding[key] = None
            self._holding.move_to_end(key)
        while len(self.lru) > self.remembered:
            dropped_key, dropped = self.lru.popitem(last=False)
            self.retained_bytes -= dropped.nbytes
            self._holding.pop(dropped_key, None)
        # Over the byte budget: drop the raw records of the oldest entries, keep their ids and versions.
        while self.retained_bytes > self.retained_limit and self._holding:
            entry = self.lru.get(self._holding.popitem(last=False)[0])
            if entry is not None and entry.nbytes:
                self.retained_bytes -= entry.nbytes
                entry.records, entry.prior, entry.nbytes = None, None, 0


def _adds(spans: dict[str, SpanFacts], logs: set[LogId], facts: TraceFacts) -> bool:
    """Whether ``facts`` has a span not in ``spans`` (or ending later), or a log record not in ``logs``."""
    for span_id, new in facts.spans.items():
        old = spans.get(span_id)
        if old is None or new[0] > old[0]:
            return True
    return not facts.logs <= logs
