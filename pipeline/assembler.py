"""The assembler stage: consume per-trace OTLP batches, assemble traces, emit upload envelopes, commit safely.

One loop per process (``trace-source worker assemble``, or a task inside the embedded ``serve``)::

    poll a batch ─► decode each record (undecodable → DLQ) ─► buffers (pipeline.buffers: dedupe, versions)
       ▲                                                        │ close rules fire (quiet / max wait / memory)
       │                                                        ▼
    commit the low-watermark every commit_interval_s ◄── build envelopes in a thread ─► publish, await durable

The rules themselves (dedupe, close, versions, watermark) live in :mod:`pipeline.buffers`; this module does the
I/O around them. Guarantees:

* **Never drops a trace.** A closed trace's envelope is published and awaited; a failed publish is retried with
  backoff until it succeeds (or the partition is revoked / the process stops — then the watermark still holds its
  offsets, so the next owner replays and emits it). An envelope that cannot be built (a normalizer bug on odd
  input) sends the trace's records to the DLQ with the error instead of wedging the partition.
* **Crash safety.** Offsets are committed only up to the low-watermark, so after ``kill -9`` or a revocation the
  next owner replays every trace that was open or not yet durably emitted, whole, and re-emits it under the same
  idempotency key — or, when the lookup (traces directory, Kafka traces index) knows it was emitted, is dropped
  as a duplicate, and late data becomes version N+1 of the whole trace (:mod:`pipeline.closed_index`).
* **Rebalances** (Kafka, eager protocol): on revocation the watermark of the revoked partitions is committed and
  their buffers are discarded — no partial envelopes; the new owner replays.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

import structlog

from normalizers.envelope import Envelope
from normalizers.redact import Redactor
from pipeline.buffers import (AssemblerCore, ClosedInfo, ClosedTrace, PoisonRecord, StoredRecord, TraceFacts, _adds,
                              decode_record)
from pipeline.bus import BusConsumer, BusPublishError, BusRecord
from pipeline.envelope_builder import build_envelope
from pipeline.gc_policy import BetweenChunks
from pipeline.metrics import AssemblerMetrics
from pipeline.outputs import EnvelopeOutput
from pipeline.settings import AssemblerSettings
from sinks.base import HEADER_RECEIVED_AT, HEADER_SIGNAL, HEADER_SOURCE_ID, HEADER_TRANSPORT, SIGNAL_LOGS, SIGNAL_TRACES

log = structlog.get_logger(__name__)

_BACKOFF_START_S = 0.2
_EMIT_CHUNK = 64  # envelopes built and published per round
_BACKOFF_MAX_S = 10.0


class _Abandoned(Exception):
    """An output write given up because the partition moved or the assembler is stopping (the next owner or the
    next start replays it)."""


class TracesDirLookup:
    """Finds the last envelope of a trace in the embedded traces directory (``<state_dir>/traces/<id>.json``), so
    that after a restart replayed data of an emitted trace is recognized (no duplicate emission) and late data
    gets version N+1 holding the whole trace."""

    def __init__(self, traces_dir: str | Path) -> None:
        self.traces_dir = Path(traces_dir)

    def may_have(self, trace_id: str) -> bool:
        """Cheap check (one ``stat``) before :meth:`load`."""
        return (self.traces_dir / f"{trace_id}.json").exists()

    async def load(self, trace_id: str, facts: TraceFacts | None = None) -> ClosedInfo | None:
        """The last envelope of ``trace_id`` as a memory entry (``facts``, the new data, are not needed here: the
        file is local, so the earlier envelope is always read)."""
        path = self.traces_dir / f"{trace_id}.json"
        try:
            data = await asyncio.to_thread(path.read_bytes)
            return ClosedInfo.from_envelope(Envelope.from_json_bytes(data), nbytes=len(data))
        except FileNotFoundError:
            return None
        except Exception as exc:  # an unreadable file must not stop assembly; the trace is then emitted afresh
            log.warning("assembler.lookup_failed", path=str(path), error=str(exc))
            return None


class Assembler:
    """Runs the assembler over ``consumer`` (a :class:`pipeline.bus.BusConsumer`) into ``output``.

    ``clock``: monotonic seconds for the close rules (injectable for tests); ``wall_ns``: unix ns recorded as the
    assembly time. ``lookup``: optional memory of closed traces beyond the in-process one — :class:`TracesDirLookup`
    (embedded) or ``pipeline.closed_index.KafkaClosedTraces`` (Kafka; also told of assignments and of every
    published envelope). ``redactor``: ``None`` disables masking. ``collector``: runs the cyclic garbage collector
    after each published chunk (``worker assemble``, see :mod:`pipeline.gc_policy`); ``None`` leaves it to CPython
    (the embedded ``serve``, where the receiver shares the process). Implements
    :class:`pipeline.bus.PartitionListener` for its consumer.
    """

    def __init__(self, consumer: BusConsumer, output: EnvelopeOutput, settings: AssemblerSettings, *,
                 metrics: AssemblerMetrics | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns, lookup=None,
                 redactor: Redactor | None = None, collector: BetweenChunks | None = None) -> None:
        self.consumer = consumer
        self.output = output
        self.settings = settings
        self.metrics = metrics or AssemblerMetrics()
        self.clock = clock
        self.wall_ns = wall_ns
        self.lookup = lookup
        self.redactor = redactor
        self.collector = collector
        self.core = AssemblerCore(
            quiet_period_s=settings.quiet_period_s, max_wait_s=settings.max_wait_s,
            max_buffered_bytes=settings.max_buffered_bytes, remembered=settings.closed_traces_remembered,
            retained_bytes=settings.retained_bytes, clock=clock,
            prompt_quiet_period_s=settings.prompt_quiet_period_s)
        self.metrics.bind(lambda: self.core.open_traces, lambda: self.core.buffered_bytes,
                          lambda: self.core.retained_bytes)
        self._committed: dict[int, int] = {}
        self._stop = asyncio.Event()
        self.started = asyncio.Event()

    # -- PartitionListener ----------------------------------------------------------------------------------------

    async def on_assigned(self, partitions: set[int]) -> None:
        self.core.assign(partitions)
        if hasattr(self.lookup, "on_assigned"):
            self.lookup.on_assigned(partitions)  # reads in the background; _recall waits for it
        log.info("assembler.assigned", partitions=sorted(partitions), topic=self.consumer.topic)

    async def on_revoked(self, partitions: set[int]) -> None:
        offsets = self.core.revoke(partitions)
        if offsets:
            await self.consumer.commit(offsets)
        for p in partitions:
            self._committed.pop(p, None)
        log.info("assembler.revoked", partitions=sorted(partitions), committed=offsets)

    # -- main loop ------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then commit the watermark and leave. Open traces are not emitted on stop:
        they are replayed (whole) by the next start or owner."""
        self._stop = stop
        await self.consumer.start(self)
        self.started.set()
        log.info("assembler.started", topic=self.consumer.topic, group_id=self.consumer.group_id,
                 quiet_period_s=self.settings.quiet_period_s, max_wait_s=self.settings.max_wait_s,
                 prompt_quiet_period_s=self.settings.prompt_quiet_period_s)
        next_commit = self.clock() + self.settings.commit_interval_s
        try:
            while not stop.is_set():
                await self.step()
                if self.clock() >= next_commit:
                    try:
                        await self.commit()
                    except Exception as exc:  # noqa: BLE001 - a missed commit is safe: it only delays progress
                        log.warning("assembler.commit_failed", error=repr(exc))
                    next_commit = self.clock() + self.settings.commit_interval_s
        finally:
            try:
                await self.commit()
            finally:
                await self.consumer.stop()
                log.info("assembler.stopped", open_traces=self.core.open_traces)

    async def step(self) -> None:
        """One round: poll (up to ``tick_s``), ingest, close and emit what is due."""
        records = await self.consumer.poll(self.settings.poll_max_records, self.settings.tick_s)
        for rec in records:
            await self._ingest(rec)
        await self._emit(self.core.due())

    async def commit(self) -> None:
        """Commit every owned partition's watermark that moved since the last commit."""
        offsets = {p: w for p, w in self.core.watermarks().items() if self._committed.get(p) != w}
        if not offsets:
            return
        await self.consumer.commit(offsets)
        self._committed.update(offsets)
        for p, w in offsets.items():
            self.metrics.committed_offset.labels(str(p)).set(w)

    # -- input ----------------------------------------------------------------------------------------------------

    async def _ingest(self, rec: BusRecord) -> None:
        signal = rec.header(HEADER_SIGNAL, SIGNAL_TRACES) or SIGNAL_TRACES
        self.metrics.records.labels(signal if signal in (SIGNAL_TRACES, SIGNAL_LOGS) else "other").inc()
        try:
            decoded = decode_record(rec)
        except PoisonRecord as exc:
            error = str(exc)  # bound outside the except-clause name, which Python unbinds when the clause ends
            log.warning("assembler.poison", topic=rec.topic, partition=rec.partition, offset=rec.offset,
                        error=error)
            try:
                await self._durably(lambda: self.output.dead_letter(rec, error), rec.partition, None)
            except _Abandoned:
                return  # not consumed: the watermark stays below it
            self.metrics.dlq.labels("undecodable").inc()
            self.core.skip(rec)
            return
        if decoded.untraced_logs:
            self.metrics.untraced_logs.inc(decoded.untraced_logs)
        if self.lookup is not None:
            await self._recall(rec.partition, decoded.traces)
        outcome = self.core.ingest(rec, decoded.traces)
        if outcome.duplicate_spans:
            self.metrics.duplicates.labels("span").inc(outcome.duplicate_spans)
        if outcome.duplicate_logs:
            self.metrics.duplicates.labels("log").inc(outcome.duplicate_logs)
        if outcome.reopened:
            self.metrics.late_versions.inc(outcome.reopened)

    async def _recall(self, partition: int, traces: dict[str, TraceFacts]) -> None:
        """Fill the memory from the lookup before ``traces`` (one record's) are ingested: traces it does not know,
        and remembered traces whose earlier content is no longer in memory but that this data will reopen."""
        unknown = self.core.unknown(partition, traces)
        ready = getattr(self.lookup, "ready", None)
        if unknown and ready is not None:
            await ready()
        for trace_id in unknown:
            if self.lookup.may_have(trace_id):
                info = await self.lookup.load(trace_id, traces[trace_id])
                if info is not None:
                    self.core.remember(partition, trace_id, info)
        for trace_id, facts in traces.items():
            info = self.core.lru.get((partition, trace_id))
            if (info is None or info.prior is not None or info.records is not None
                    or not _adds(info.spans, info.logs, facts) or not self.lookup.may_have(trace_id)):
                continue
            found = await self.lookup.load(trace_id, facts)
            if found is not None and found.version == info.version:
                info.prior = found.prior

    # -- output ---------------------------------------------------------------------------------------------------

    async def _emit(self, closed: list[ClosedTrace]) -> None:
        # In chunks: catching up on a backlog can close thousands of traces in one step, and publishing them all
        # at once made sends time out (retries, no loss, but slower than a steady stream of bounded batches).
        for i in range(0, len(closed), _EMIT_CHUNK):
            built = await asyncio.to_thread(self._build_all, closed[i:i + _EMIT_CHUNK])
            await asyncio.gather(*(self._publish(c, env_or_error) for c, env_or_error in built))
            if self.collector is not None:
                del built  # the chunk's envelopes are garbage now: the young collection finds few objects alive
                self.collector.after_chunk()

    def _build_all(self, closed: list[ClosedTrace]) -> list[tuple[ClosedTrace, Envelope | Exception]]:
        out: list[tuple[ClosedTrace, Envelope | Exception]] = []
        for c in closed:
            t0 = time.perf_counter()
            try:
                out.append((c, build_envelope(c, assembled_at_ns=self.wall_ns(), redactor=self.redactor)))
            except Exception as exc:  # noqa: BLE001 - any normalizer failure: dead-letter the trace, keep going
                out.append((c, exc))
            self.metrics.build_seconds.observe(time.perf_counter() - t0)
        return out

    async def _publish(self, c: ClosedTrace, env: Envelope | Exception) -> None:
        try:
            if isinstance(env, Exception):
                log.error("assembler.envelope_build_failed", trace_id=c.trace_id, error=repr(env))
                for stored in c.records[len(c.records) - c.new_records:]:
                    rec = self._as_bus_record(c, stored)
                    await self._durably(lambda r=rec: self.output.dead_letter(r, f"envelope build failed: {env!r}"),
                                        c.partition, c)
                    self.metrics.dlq.labels("envelope-build-failed").inc()
            else:
                published = await self._durably(lambda: self.output.publish(env), c.partition, c)
                if hasattr(self.lookup, "published"):  # before acknowledging: the index must know it first
                    await self._durably(lambda: self.lookup.published(env, published, c.partition), c.partition, c)
                self.metrics.envelopes.labels(c.reason).inc()
                self.metrics.envelope_bytes.observe(published.size_bytes)
                if published.claim_check:
                    self.metrics.claim_checks.inc()
                log.info("assembler.emitted", trace_id=c.trace_id, version=c.version, reason=c.reason,
                         spans=len(env.spans), key=env.idempotency_key, claim_check=published.claim_check)
        except _Abandoned:
            return  # still inflight in the abandoned state: its offsets were not committed past
        self.core.acknowledge(c)

    async def _durably(self, write, partition: int, closed: ClosedTrace | None):
        """``await write()`` until it succeeds; raises :class:`_Abandoned` once the partition is no longer ours
        (for ``closed``: no longer the same ownership) or the assembler is stopping."""
        delay = _BACKOFF_START_S
        while True:
            try:
                return await write()
            except (BusPublishError, OSError) as exc:
                self.metrics.publish_errors.inc()
                log.warning("assembler.publish_retry", error=str(exc), retry_in_s=delay)
            owned = self.core.owns(closed) if closed is not None else partition in self.core.partitions
            if self._stop.is_set() or not owned:
                raise _Abandoned()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _as_bus_record(self, c: ClosedTrace, s: StoredRecord) -> BusRecord:
        headers = [(HEADER_SOURCE_ID, s.source_id.encode()), (HEADER_SIGNAL, s.signal.encode()),
                   (HEADER_RECEIVED_AT, str(s.received_at_ns).encode()),
                   ("content-type", b"application/x-protobuf")]
        if s.transport:
            headers.append((HEADER_TRANSPORT, s.transport.encode()))
        return BusRecord(topic=self.consumer.topic, partition=c.partition, offset=s.offset,
                         key=c.trace_id.encode(), value=s.value, headers=tuple(headers))
