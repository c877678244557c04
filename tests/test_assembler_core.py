"""The assembler's rules without I/O (``pipeline.buffers`` + ``pipeline.envelope_builder``), with a fake clock.

Dedupe by span id, the three close rules, late data -> version N+1, the low-watermark (including the rule that it
never falls inside an emitted trace), revocation, poison detection — and a randomized crash/replay simulation: a
second, empty assembler replaying from the committed watermark must re-emit every trace under the key the first
one used (or emit it for the first time), and no span may be lost.
"""

from __future__ import annotations

import random

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, LogsData, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status, TracesData

from normalizers.envelope import Envelope, envelope_idempotency_key
from pipeline.buffers import (
    CLOSED_EVICTED, CLOSED_MAX_WAIT, CLOSED_QUIET, AssemblerCore, ClosedInfo, PoisonRecord, decode_record)
from pipeline.bus import BusRecord
from pipeline.envelope_builder import build_envelope
from normalizers.redact import Redactor

T0 = 1_700_000_000_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


def tid(n: int) -> str:
    return f"{n + 1:032x}"


def sid(n: int) -> str:
    return f"{n + 1:016x}"


def span(trace: int, n: int, parent: int | None = None, end: int | None = None, status: int = 0,
         name: str | None = None, attrs: dict | None = None) -> Span:
    """Span number ``n`` of trace number ``trace`` (ids from :func:`tid` / :func:`sid`); no parent = a root."""
    return Span(trace_id=bytes.fromhex(tid(trace)), span_id=bytes.fromhex(sid(n)),
                parent_span_id=b"" if parent is None else bytes.fromhex(sid(parent)),
                name=name or f"op-{n}", start_time_unix_nano=T0 + n,
                end_time_unix_nano=T0 + 1000 + n if end is None else end, status=Status(code=status),
                attributes=[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in (attrs or {}).items()])


def record(offset: int, *spans: Span, partition: int = 0, source: str = "src") -> BusRecord:
    data = TracesData(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="agent"))]),
        scope_spans=[ScopeSpans(spans=list(spans))])])
    key = spans[0].trace_id.hex().encode() if spans else None
    return BusRecord(topic="trace-source.spans", partition=partition, offset=offset, key=key,
                     value=data.SerializeToString(),
                     headers=(("source-id", source.encode()), ("signal", b"traces"),
                              ("received-at", str(T0 + offset).encode()), ("transport", b"otlp-grpc")))


def log_record(offset: int, trace: int, span_n: int, t: int, partition: int = 0) -> BusRecord:
    data = LogsData(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=[LogRecord(
        trace_id=bytes.fromhex(tid(trace)), span_id=bytes.fromhex(sid(span_n)), time_unix_nano=t,
        event_name="gen_ai.client.inference.operation.details", body=AnyValue(string_value="hi"))])])])
    return BusRecord(topic="trace-source.spans", partition=partition, offset=offset, key=tid(trace).encode(),
                     value=data.SerializeToString(), headers=(("signal", b"logs"), ("source-id", b"src")))


def make_core(clock: FakeClock, **kw) -> AssemblerCore:
    kw = {"quiet_period_s": 5.0, "max_wait_s": 300.0, "clock": clock, **kw}
    core = AssemblerCore(**kw)
    core.assign([0])
    return core


def feed(core: AssemblerCore, rec: BusRecord):
    return core.ingest(rec, decode_record(rec).traces)


def build(closed) -> Envelope:
    return build_envelope(closed, assembled_at_ns=T0 + 10**9, redactor=Redactor())


# -- dedupe and close rules --------------------------------------------------------------------------------------------

def test_duplicate_spans_are_dropped_and_trace_closes_after_root_and_quiet_period():
    clock = FakeClock()
    core = make_core(clock)
    child, root = span(0, 1, parent=0), span(0, 0)
    out = feed(core, record(1, child))
    assert (out.new_spans, out.duplicate_spans) == (1, 0)
    out = feed(core, record(2, child))  # exporter retry of the same batch
    assert (out.new_spans, out.duplicate_spans) == (0, 1)
    feed(core, record(3, root, child))
    assert core.due() == []  # root ended, but not quiet yet
    clock.advance(4.9)
    assert core.due() == []
    clock.advance(0.2)
    [closed] = core.due()
    assert closed.reason == CLOSED_QUIET and closed.version == 1
    env = build(closed)
    assert sorted(s.span_id for s in env.spans) == [sid(0), sid(1)]
    assert env.completeness.root_seen and env.completeness.closed_reason == CLOSED_QUIET
    assert env.source.id == "src" and env.source.kind == "otlp-grpc"
    assert env.received_at_unix_nano == T0 + 1
    assert env.idempotency_key == envelope_idempotency_key(tid(0), env.spans)
    assert core.open_traces == 0 and core.buffered_bytes == 0


def test_new_data_restarts_the_quiet_period_and_duplicates_do_not():
    clock = FakeClock()
    core = make_core(clock)
    feed(core, record(1, span(0, 0)))
    clock.advance(4)
    feed(core, record(2, span(0, 1, parent=0)))
    clock.advance(4)
    feed(core, record(3, span(0, 1, parent=0)))  # duplicate: does not count as activity
    assert core.due() == []
    clock.advance(1.1)
    assert [c.trace_id for c in core.due()] == [tid(0)]


def test_trace_without_root_waits_for_max_wait():
    clock = FakeClock()
    core = make_core(clock, max_wait_s=60)
    feed(core, record(1, span(0, 1, parent=0)))
    clock.advance(30)
    assert core.due() == []
    clock.advance(30)
    [closed] = core.due()
    assert closed.reason == CLOSED_MAX_WAIT
    assert build(closed).completeness.root_seen is False


def test_local_root_with_a_remote_parent_closes_after_quiet_instead_of_max_wait():
    # An agent behind an API: its top span's parent came in a propagated traceparent and never arrives. The SDK
    # marks it with the span flags CONTEXT_HAS_IS_REMOTE | CONTEXT_IS_REMOTE (0x300).
    clock = FakeClock()
    core = make_core(clock, max_wait_s=60)
    top = span(0, 1, parent=99)
    top.flags = 0x301
    feed(core, record(1, span(0, 2, parent=1), top))
    clock.advance(5.1)
    [closed] = core.due()
    assert closed.reason == CLOSED_QUIET
    env = build(closed)
    assert env.completeness.root_seen and env.completeness.root_is_local
    [local_root] = [s for s in env.spans if s.span_id == sid(1)]
    assert local_root.parent_is_remote is True and local_root.is_local_root


def test_a_parent_known_to_be_local_is_not_a_local_root():
    clock = FakeClock()
    core = make_core(clock, max_wait_s=60)
    child = span(0, 1, parent=99)
    child.flags = 0x101  # HAS_IS_REMOTE set, IS_REMOTE clear: the parent is in this process and still to come
    feed(core, record(1, child))
    clock.advance(30)
    assert core.due() == []
    clock.advance(30)
    [closed] = core.due()
    assert closed.reason == CLOSED_MAX_WAIT and build(closed).completeness.root_seen is False


def test_memory_bound_evicts_oldest_first_and_never_drops():
    clock = FakeClock()
    first = record(1, span(0, 1, parent=0))
    core = make_core(clock, max_buffered_bytes=len(first.value) * 2 + 1)
    feed(core, first)
    clock.advance(1)
    feed(core, record(2, span(1, 1, parent=0)))
    assert core.due() == []
    clock.advance(1)
    feed(core, record(3, span(2, 1, parent=0)))
    [closed] = core.due()
    assert (closed.trace_id, closed.reason) == (tid(0), CLOSED_EVICTED)
    assert core.open_traces == 2 and core.buffered_bytes <= core.max_buffered_bytes


def test_log_records_join_their_trace_and_are_deduplicated():
    clock = FakeClock()
    core = make_core(clock)
    feed(core, record(1, span(0, 0)))
    out = feed(core, log_record(2, 0, 0, T0 + 5))
    assert out.new_logs == 1
    out = feed(core, log_record(3, 0, 0, T0 + 5))
    assert (out.new_logs, out.duplicate_logs) == (0, 1)
    clock.advance(6)
    [closed] = core.due()
    env = build(closed)
    assert len(env.log_events) == 1 and env.log_events[0].event_name.startswith("gen_ai.")


def test_a_later_copy_of_a_span_replaces_the_earlier_one():
    clock = FakeClock()
    core = make_core(clock)
    feed(core, record(1, span(0, 0, end=T0 + 10)))
    out = feed(core, record(2, span(0, 0, end=T0 + 20, status=2)))
    assert out.new_spans == 1
    clock.advance(6)
    [closed] = core.due()
    [s] = build(closed).spans
    assert (s.end_time_unix_nano, s.status_code) == (T0 + 20, "ERROR")


# -- late data and versions --------------------------------------------------------------------------------------------

def test_late_span_gives_version_two_with_the_whole_trace_and_replays_give_nothing():
    clock = FakeClock()
    core = make_core(clock)
    feed(core, record(1, span(0, 0), span(0, 1, parent=0)))
    clock.advance(6)
    [v1] = core.due()
    core.acknowledge(v1)
    out = feed(core, record(2, span(0, 1, parent=0)))  # replay / retry of emitted data
    assert out.duplicate_spans == 1 and out.reopened == 0 and core.open_traces == 0
    out = feed(core, record(3, span(0, 2, parent=0)))  # a late span
    assert out.reopened == 1
    clock.advance(6)
    [v2] = core.due()
    env1, env2 = build(v1), build(v2)
    assert (env1.envelope_version, env2.envelope_version) == (1, 2)
    assert sorted(s.span_id for s in env2.spans) == [sid(0), sid(1), sid(2)]
    assert env1.idempotency_key != env2.idempotency_key


def test_late_span_without_retained_records_gives_only_the_new_data():
    clock = FakeClock()
    core = make_core(clock, retained_bytes=0)
    feed(core, record(1, span(0, 0)))
    clock.advance(6)
    core.acknowledge(core.due()[0])
    feed(core, record(2, span(0, 1, parent=0)))
    clock.advance(301)
    [v2] = core.due()
    env = build(v2)
    assert env.envelope_version == 2 and [s.span_id for s in env.spans] == [sid(1)]


def test_retained_byte_budget_drops_the_records_of_the_least_recently_used_traces_first():
    clock = FakeClock()
    size = len(record(1, span(0, 0)).value)
    core = make_core(clock, retained_bytes=3 * size)
    for n in range(4):  # four closed traces, one record each; the budget keeps the records of three
        feed(core, record(n + 1, span(n, 0)))
        clock.advance(6)
        core.acknowledge(core.due()[0])
        if n == 2:
            feed(core, record(10, span(0, 0)))  # a replayed duplicate makes trace 0 recently used again
    held = [t for (_, t), info in core.lru.items() if info.records]  # least recently used first
    assert held == [tid(2), tid(0), tid(3)] and core.retained_bytes == 3 * size
    assert len(core.lru) == 4  # the stripped entry still knows its spans and version
    feed(core, record(20, span(0, 1, parent=0)))  # late data of a trace whose records are held: whole version 2
    clock.advance(301)
    [v2] = core.due()
    assert sorted(s.span_id for s in build(v2).spans) == [sid(0), sid(1)]


def test_reopening_from_a_prior_envelope_merges_its_content():
    clock = FakeClock()
    core = make_core(clock)
    feed(core, record(1, span(0, 0)))
    clock.advance(6)
    [c] = core.due()
    prior = build(c)
    fresh = make_core(clock)  # e.g. after a restart, with the envelope found in the traces directory
    fresh.remember(0, tid(0), ClosedInfo.from_envelope(prior))
    assert fresh.unknown(0, [tid(0), tid(1)]) == [tid(1)]
    out = feed(fresh, record(5, span(0, 0)))
    assert out.duplicate_spans == 1 and fresh.open_traces == 0  # replayed data of an emitted trace: nothing to do
    feed(fresh, record(6, span(0, 1, parent=0)))
    clock.advance(6)
    [v2] = fresh.due()
    env = build(v2)
    assert env.envelope_version == 2 and sorted(s.span_id for s in env.spans) == [sid(0), sid(1)]


# -- watermark ---------------------------------------------------------------------------------------------------------

def test_watermark_is_the_oldest_open_or_unacknowledged_trace_else_next_offset():
    clock = FakeClock()
    core = make_core(clock)
    state = core.partitions[0]
    assert state.watermark() is None
    feed(core, record(10, span(0, 0)))
    assert state.watermark() == 10
    clock.advance(3)
    feed(core, record(11, span(1, 0)))
    clock.advance(3)
    [a] = core.due()  # trace 0 closed, not yet durable
    assert state.watermark() == 10
    core.acknowledge(a)
    assert state.watermark() == 11
    clock.advance(3)
    core.acknowledge(core.due()[0])
    assert state.watermark() == 12


def test_watermark_never_falls_inside_an_emitted_trace():
    clock = FakeClock()
    core = make_core(clock)
    state = core.partitions[0]
    feed(core, record(1, span(0, 1, parent=0)))   # trace A starts
    feed(core, record(2, span(1, 1, parent=0)))   # trace B starts
    feed(core, record(3, span(0, 0)))             # A's root, after B's first record
    clock.advance(6)
    [a] = core.due()
    core.acknowledge(a)
    # Naively B pins 2, which lies inside A's range 1..3: a replay from 2 would rebuild only part of A.
    assert state.watermark() == 1
    feed(core, record(4, span(0, 0)))  # a duplicate of A extends its range while B is open
    clock.advance(301)
    core.acknowledge(core.due()[0])
    assert state.watermark() == 5


def test_revocation_returns_the_watermark_and_forgets_unacknowledged_traces():
    clock = FakeClock()
    core = make_core(clock)
    feed(core, record(1, span(0, 0)))
    feed(core, record(2, span(1, 1, parent=0)))
    clock.advance(6)
    [inflight] = core.due()
    assert core.revoke([0]) == {0: 1}
    assert core.open_traces == 0 and core.buffered_bytes == 0
    assert not core.owns(inflight)
    assert (0, tid(0)) not in core.lru  # not durable: a later owner (maybe us) must emit it again
    core.assign([0])
    assert not core.owns(inflight)  # a new ownership of the same partition
    out = feed(core, record(1, span(0, 0)))
    assert out.new_spans == 1


def test_poison_records_are_detected():
    bad = BusRecord(topic="t", partition=0, offset=1, key=b"k", value=b"\xff\xff\xff", headers=())
    with pytest.raises(PoisonRecord, match="not an OTLP TracesData"):
        decode_record(bad)
    with pytest.raises(PoisonRecord, match="unknown signal"):
        decode_record(BusRecord(topic="t", partition=0, offset=1, key=None, value=b"",
                                headers=(("signal", b"metrics"),)))
    short = TracesData(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[
        Span(trace_id=b"\x01" * 8, span_id=b"\x02" * 8, name="x")])])])
    with pytest.raises(PoisonRecord, match="16 non-zero bytes"):
        decode_record(BusRecord(topic="t", partition=0, offset=1, key=None, value=short.SerializeToString()))


# -- crash / replay simulation -----------------------------------------------------------------------------------------

def _simulate(seed: int) -> int:
    """Random interleaved traces (each: children, then a root, with retries and late spans), one assembler that
    crashes at a random point, a second that replays from the last committed watermark."""
    rng = random.Random(seed)
    log: list[tuple[float, list[Span]]] = []  # (arrival delay, spans of one record)
    all_spans: dict[str, set[str]] = {}
    for t in range(rng.randint(3, 12)):
        n = rng.randint(1, 5)
        spans = [span(t, i, parent=0) for i in range(1, n + 1)] + [span(t, 0)]
        all_spans[tid(t)] = {sid(i) for i in range(n + 1)}
        for s in spans:
            log.append((0, [s]))
            if rng.random() < 0.3:
                log.append((0, [s]))  # retry duplicate
        if rng.random() < 0.2:
            late = span(t, 99, parent=0)
            all_spans[tid(t)].add(sid(99))
            log.append((0, [late]))
    rng.shuffle(log)  # interleave traces (a trace's root may come before its children: fine)
    records = [record(i + 1, *spans) for i, (_, spans) in enumerate(log)]
    delays = [rng.choice([0, 0, 0.5, 2, 6]) for _ in records]
    crash_at = rng.randint(0, len(records))

    clock = FakeClock()
    first = make_core(clock, max_wait_s=30)
    emitted_first: dict[str, set[str]] = {}  # trace -> keys emitted before the crash
    keys_of: dict[str, str] = {}
    committed = 1
    for i, rec in enumerate(records[:crash_at]):
        clock.advance(delays[i])
        feed(first, rec)
        for c in first.due():
            env = build(c)
            emitted_first.setdefault(c.trace_id, set()).add(env.idempotency_key)
            keys_of[env.idempotency_key] = ",".join(sorted(s.span_id for s in env.spans))
            first.acknowledge(c)
        if rng.random() < 0.5:
            committed = first.partitions[0].watermark() or committed

    second = make_core(FakeClock(), max_wait_s=30)  # fresh process: empty LRU
    emitted_second: dict[str, set[str]] = {}
    spans_second: dict[str, set[str]] = {}
    for rec in records[committed - 1:]:
        feed(second, rec)
    second.clock.advance(1000)
    for c in second.due():
        env = build(c)
        emitted_second.setdefault(c.trace_id, set()).add(env.idempotency_key)
        spans_second.setdefault(c.trace_id, set()).update(s.span_id for s in env.spans)

    # Nothing lost: every span is in an envelope emitted before the crash or after the restart.
    for trace_id, expected in all_spans.items():
        got = set(spans_second.get(trace_id, set()))
        for key in emitted_first.get(trace_id, ()):
            got |= set(keys_of[key].split(","))
        assert got == expected, (seed, trace_id)
    # Re-emitted envelopes keep their keys: whatever the restarted assembler emits for a trace that was already
    # emitted whole before the crash is that same envelope. The documented exception: data of a trace that
    # arrived after the watermark had passed the rest of the trace (the trace's records straddle the committed
    # offset) comes out as an envelope of that data alone.
    offsets: dict[str, list[int]] = {}
    for rec in records:
        offsets.setdefault(rec.key.decode(), []).append(rec.offset)
    straddling = 0
    for trace_id, keys in emitted_second.items():
        if min(offsets[trace_id]) < committed:
            # Only possible once the first assembler had emitted everything of the trace below the watermark.
            below = {s.span_id.hex() for rec in records[:committed - 1] if rec.key.decode() == trace_id
                     for s in TracesData.FromString(rec.value).resource_spans[0].scope_spans[0].spans}
            emitted = set().union(*(keys_of[k].split(",") for k in emitted_first.get(trace_id, ())))
            assert below <= emitted, (seed, trace_id)
            straddling += 1
            continue
        before = emitted_first.get(trace_id, set())
        whole_before = [k for k in before if set(keys_of[k].split(",")) == all_spans[trace_id]]
        if whole_before:
            assert keys <= set(whole_before), (seed, trace_id)
    return straddling


def test_crash_and_replay_keeps_keys_and_loses_nothing():
    for seed in range(400):
        _simulate(seed)
