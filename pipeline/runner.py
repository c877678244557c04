"""The one stage runner: every loop stage (grade, seed, reproduce, fix) is a plug-in to it (:mod:`pipeline.stage`).

Per record — records of one trace in offset order, records of different traces (and partitions) concurrently, at
most ``concurrency`` at a time (the stage's own default: many for grading, one for stages that run a repository's
commands)::

    identify ─► select / policy ─► claim the stage key (ledger lease) ─► stage.work (lease renewed meanwhile)
       │ poison                        │ done already: re-publish the stored result
       ▼                               ▼
    dead-letter topic ◄── give up ── retries with backoff ── record outcome (ledger) ─► journal ─► publish
                                                                                           │
    commit offsets only past records whose outcome is recorded and published ◄────────────┘

Guarantees (with :mod:`pipeline.ledger` and :mod:`pipeline.journal`):

* **Never twice.** A stage key's work runs once: a redelivered record (crash, rebalance, replay into a new consumer
  group) finds the row done and its stored result — the same bytes — is re-published; journal appends are keyed by
  event id, so the journal gets each event once. Work runs again only when a lease expired because its worker
  died before recording the outcome, or after ``trace-source reprocess`` reopened the row on purpose.
* **Never lost.** Offsets are committed only past records whose outcome is recorded and published (or that were
  skipped or dead-lettered), so a crash replays the rest. A poison record goes to the dead-letter topic with the
  error; a record whose work keeps failing transiently goes there after ``max_attempts`` claims.
* **Shutdown.** On stop, work in progress gets ``shutdown_grace_s`` to finish; then it is cancelled and its claim
  released, so the next worker takes it at once instead of waiting for the lease to expire.
* **Rebalance.** Revoked partitions' finished offsets are committed at once; work already running is allowed to
  finish and record its outcome (the next owner then finds it done, or waits for the lease), never cancelled half
  way, since a cancelled reproduction or fix would be repeated.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from typing import Awaitable, Callable, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.bus import BusConsumer, BusPublisher, BusPublishError, BusRecord
from pipeline.journal import Journal, JournalError, JournalEvent, RunInfo, SourceRef, event_id, run_id_for, utc_now
from pipeline.ledger import (
    Acquired, Completion, Finished, Held, LeaseLost, Ledger, LedgerError, LedgerRow, RowInfo, stage_key)
from pipeline.outputs import DeadLetters
from pipeline.policy import allows, narrower
from pipeline.stage import (
    HEADER_CONTENT_TYPE, HEADER_ENVELOPE_VERSION, HEADER_IDEMPOTENCY_KEY, HEADER_RUN, HEADER_STAGE,
    HEADER_STAGE_KEY, EventDraft, Identity, Outcome, PoisonInput, Stage, TransientError, WorkItem)

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Errors of the runner's own I/O (ledger, journal, bus, disk) and of a stage that says "try again": retried.
TRANSIENT = (TransientError, LedgerError, JournalError, BusPublishError, OSError, TimeoutError)


def default_owner() -> str:
    """A lease owner id unique to this process: ``<host>:<pid>:<random>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class StageMetrics:
    """Prometheus metrics of stage runners, labelled by ``stage`` (several runners may share one registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        p = "trace_source_stage_"
        self.records = Counter(p + "records_total", "Input records by what happened to them: worked, republished "
                               "(done already), skipped (not for this stage or policy), dead_lettered.",
                               ["stage", "outcome"], registry=r)
        self.outcomes = Counter(p + "outcomes_total", "Recorded outcomes by ledger state and journal status.",
                                ["stage", "state", "status"], registry=r)
        self.retries = Counter(p + "retries_total", "Retries after a transient error, by where it happened.",
                               ["stage", "where"], registry=r)
        self.held = Counter(p + "held_total", "Claims that found another worker's live lease and waited.",
                            ["stage"], registry=r)
        self.work_seconds = Histogram(p + "work_seconds", "Time of one stage.work call.", ["stage"], registry=r,
                                      buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300, 1800))
        self.inflight = Gauge(p + "inflight", "Records being worked on.", ["stage"], registry=r)
        self.lease_renewals = Counter(p + "lease_renewals_total", "Lease renewals during long work.", ["stage"],
                                      registry=r)
        self.committed_offset = Gauge(p + "committed_offset", "Last committed offset (next to read).",
                                      ["stage", "partition"], registry=r)


class _Abandoned(Exception):
    """The record is left unsettled because the runner is stopping or lost the partition: it is not committed
    past, so it is processed again by the next start or owner."""


class StageRunner:
    """Runs ``stage`` over ``consumer``; outputs through ``publisher``, dead letters through ``dead_letters``.

    The caller owns the lifecycles of ``publisher``, ``ledger`` and ``journal`` (they may be shared by several
    runners of one process); the runner starts and stops the consumer and the stage. ``policy``: this worker's
    execution policy (a run goes only as far as the narrower of its own and this one). ``lease_s``: lease length,
    renewed every third of it. ``max_attempts``: claims of one stage key (retries and take-overs) before its input
    is dead-lettered. Implements :class:`pipeline.bus.PartitionListener` for its consumer.
    """

    def __init__(self, stage: Stage, consumer: BusConsumer, publisher: BusPublisher, dead_letters: DeadLetters,
                 ledger: Ledger, journal: Journal, *, policy: str, owner: str | None = None, lease_s: float = 60.0,
                 max_attempts: int = 5, poll_max_records: int = 100, poll_timeout_s: float = 0.5,
                 commit_interval_s: float = 1.0, backoff_start_s: float = 0.5, backoff_max_s: float = 30.0,
                 shutdown_grace_s: float = 30.0, concurrency: int | None = None,
                 metrics: StageMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage = stage
        self.consumer = consumer
        self.publisher = publisher
        self.dead_letters = dead_letters
        self.ledger = ledger
        self.journal = journal
        self.policy = policy
        self.owner = owner or default_owner()
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_max_records = poll_max_records
        self.poll_timeout_s = poll_timeout_s
        self.commit_interval_s = commit_interval_s
        self.backoff_start_s = backoff_start_s
        self.backoff_max_s = backoff_max_s
        self.shutdown_grace_s = shutdown_grace_s
        self.concurrency = max(1, concurrency or getattr(stage, "default_concurrency", 1))
        self._slots = asyncio.Semaphore(self.concurrency)
        self.metrics = metrics or StageMetrics()
        self.clock = clock
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._epochs: dict[int, int] = {}  # partition -> assignment epoch (bumped on revoke)
        self._done: dict[int, int] = {}  # partition -> next offset to commit
        self._committed: dict[int, int] = {}
        self._working: dict[str, asyncio.Future[None]] = {}  # stage keys being worked on in this process
        self._labels = {"stage": stage.name}

    # -- PartitionListener ----------------------------------------------------------------------------------------

    async def on_assigned(self, partitions: set[int]) -> None:
        for p in partitions:
            self._epochs[p] = self._epochs.get(p, 0) + 1
        log.info("stage.assigned", stage=self.stage.name, topic=self.consumer.topic, partitions=sorted(partitions))

    async def on_revoked(self, partitions: set[int]) -> None:
        offsets = {p: o for p, o in self._done.items() if p in partitions and self._committed.get(p) != o}
        if offsets:
            await self.consumer.commit(offsets)
        for p in partitions:
            self._epochs[p] = self._epochs.get(p, 0) + 1
            self._done.pop(p, None)
            self._committed.pop(p, None)
        log.info("stage.revoked", stage=self.stage.name, partitions=sorted(partitions), committed=offsets)

    # -- main loop ------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish (or release) what is in progress and commit."""
        self._stop = stop
        await self.stage.start()
        try:
            await self.consumer.start(self)
        except BaseException:
            await self.stage.close()
            raise
        self.started.set()
        log.info("stage.started", stage=self.stage.name, topic=self.consumer.topic, group_id=self.consumer.group_id,
                 output_topic=self.stage.output_topic, policy=self.policy, owner=self.owner)
        next_commit = self.clock() + self.commit_interval_s
        try:
            while not stop.is_set():
                records = await self.consumer.poll(self.poll_max_records, self.poll_timeout_s)
                if records:
                    await self._run_batch(records)
                if self.clock() >= next_commit or stop.is_set():
                    await self._commit_quietly()
                    next_commit = self.clock() + self.commit_interval_s
        finally:
            await self._commit_quietly()
            await self.consumer.stop()
            await self.stage.close()
            log.info("stage.stopped", stage=self.stage.name)

    async def _run_batch(self, records: list[BusRecord]) -> None:
        by_partition: dict[int, list[BusRecord]] = {}
        for rec in records:
            by_partition.setdefault(rec.partition, []).append(rec)
        batch = asyncio.ensure_future(asyncio.gather(
            *(self._run_partition(p, recs) for p, recs in by_partition.items())))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({batch, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not batch.done():
                # Stopping: give the work in progress its grace period, then cancel it (claims are released).
                await asyncio.wait({batch}, timeout=self.shutdown_grace_s)
                if not batch.done():
                    log.warning("stage.shutdown_cancelling", stage=self.stage.name,
                                grace_s=self.shutdown_grace_s)
                    batch.cancel()
            await asyncio.gather(batch, return_exceptions=True)
        finally:
            stopping.cancel()

    async def _run_partition(self, partition: int, records: list[BusRecord]) -> None:
        """Settle ``records``: one chain per record key (trace), in offset order within a chain, chains concurrently
        (bounded by the runner-wide ``concurrency``); then move the committable offset past the longest prefix of
        settled records — a record still unsettled (abandoned) holds back every later offset."""
        epoch = self._epochs.get(partition, 0)
        chains: dict[bytes | None, list[BusRecord]] = {}
        for rec in records:
            chains.setdefault(rec.key, []).append(rec)
        settled: set[int] = set()

        async def chain(recs: list[BusRecord]) -> None:
            for rec in recs:
                async with self._slots:
                    try:
                        await self._handle(rec, epoch)
                    except _Abandoned:
                        return
                settled.add(rec.offset)

        await asyncio.gather(*(chain(c) for c in chains.values()))
        if self._epochs.get(partition, 0) != epoch:
            return
        for rec in records:
            if rec.offset not in settled:
                break
            self._done[partition] = rec.offset + 1

    async def _commit_quietly(self) -> None:
        owned = self.consumer.assignment()
        offsets = {p: o for p, o in self._done.items() if p in owned and self._committed.get(p) != o}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - a missed commit only delays progress; the next one covers it
            log.warning("stage.commit_failed", stage=self.stage.name, error=repr(exc))
            return
        self._committed.update(offsets)
        for p, o in offsets.items():
            self.metrics.committed_offset.labels(self.stage.name, str(p)).set(o)

    def _check(self, partition: int, epoch: int) -> None:
        if self._stop.is_set() or self._epochs.get(partition, 0) != epoch:
            raise _Abandoned()

    async def _sleep(self, seconds: float, partition: int, epoch: int) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass
        self._check(partition, epoch)

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], rec: BusRecord, epoch: int) -> T:
        """``await call()`` until it succeeds; transient errors are retried with backoff while the record is ours."""
        delay = self.backoff_start_s
        while True:
            try:
                return await call()
            except LeaseLost:
                raise
            except TRANSIENT as exc:
                self.metrics.retries.labels(self.stage.name, what).inc()
                log.warning("stage.retry", stage=self.stage.name, where=what, error=str(exc), retry_in_s=delay)
            await self._sleep(delay, rec.partition, epoch)
            delay = min(delay * 2, self.backoff_max_s)

    # -- one record -----------------------------------------------------------------------------------------------

    async def _handle(self, rec: BusRecord, epoch: int) -> None:
        name = self.stage.name
        try:
            ident = self.stage.identify(rec)
        except PoisonInput as exc:
            await self._dead_letter(rec, epoch, f"cannot read the input record: {exc}", None, None, None)
            return
        if (reason := self.stage.select(rec)) is not None:
            self.metrics.records.labels(name, "skipped").inc()
            log.debug("stage.skipped", stage=name, trace_id=ident.trace_id, reason=reason)
            return
        if not self.stage.entry:
            effective = narrower(ident.run.policy, self.policy) if ident.run else self.policy
            if not allows(effective, self.stage.phase):
                self.metrics.records.labels(name, "skipped").inc()
                log.debug("stage.skipped", stage=name, trace_id=ident.trace_id,
                          reason=f"execution policy {effective} stops before {self.stage.phase}")
                return
        key = stage_key(name, ident.envelope_key, self.stage.config_version)
        # One worker per stage key inside this process (the lease owner id is per process).
        while (other := self._working.get(key)) is not None:
            await asyncio.shield(other)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._working[key] = done
        try:
            await self._claim_and_work(rec, epoch, ident, key)
        finally:
            del self._working[key]
            done.set_result(None)

    async def _claim_and_work(self, rec: BusRecord, epoch: int, ident: Identity, key: str) -> None:
        name = self.stage.name
        info = RowInfo(stage=name, trace_id=ident.trace_id, envelope_key=ident.envelope_key,
                       config_version=self.stage.config_version, input_topic=rec.topic,
                       input_partition=rec.partition, input_offset=rec.offset)
        last_error: str | None = None
        delay = self.backoff_start_s
        while True:
            self._check(rec.partition, epoch)
            claim = await self._retrying("claim", lambda: self.ledger.claim(key, info, self.owner, self.lease_s),
                                         rec, epoch)
            if isinstance(claim, Finished):
                await self._replay(claim.row, rec, epoch, ident)
                return
            if isinstance(claim, Held):
                self.metrics.held.labels(name).inc()
                wait = max(0.05, min(claim.expires_at - time.time(), 5.0))
                log.info("stage.held", stage=name, trace_id=ident.trace_id, owner=claim.row.lease_owner,
                         wait_s=round(wait, 2))
                await self._sleep(wait, rec.partition, epoch)
                continue
            assert isinstance(claim, Acquired)
            row = claim.row
            if row.attempts > self.max_attempts:
                error = f"gave up after {self.max_attempts} attempts" + (f": {last_error}" if last_error else "")
                await self._dead_letter(rec, epoch, error, ident, key, row)
                return
            item = WorkItem(record=rec, identity=ident, stage_key=key, generation=row.generation,
                            attempt=row.attempts)
            try:
                outcome = await self._work_with_lease(item)
            except LeaseLost as exc:
                log.warning("stage.lease_lost", stage=name, trace_id=ident.trace_id, error=str(exc))
                continue  # another worker owns it now: claim again (held until it finishes, then done)
            except TRANSIENT as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                self.metrics.retries.labels(name, "work").inc()
                log.warning("stage.work_retry", stage=name, trace_id=ident.trace_id, attempt=row.attempts,
                            error=last_error, retry_in_s=delay)
                await self._release(key)
                await self._sleep(delay, rec.partition, epoch)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - PoisonInput or a stage bug: dead-letter, keep the partition going
                log.exception("stage.work_failed", stage=name, trace_id=ident.trace_id)
                await self._dead_letter(rec, epoch, f"{type(exc).__name__}: {exc}", ident, key, row)
                return
            await self._record(rec, epoch, ident, key, row, outcome)
            return

    async def _work_with_lease(self, item: WorkItem) -> Outcome:
        """``stage.work(item)``, renewing the lease every third of ``lease_s``. Cancellation (shutdown) cancels the
        work and releases the claim; a lost lease cancels the work and raises :class:`LeaseLost`."""
        name = self.stage.name
        task = asyncio.ensure_future(self.stage.work(item))
        self.metrics.inflight.labels(name).inc()
        started = time.perf_counter()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.lease_s / 3)
                if task in done:
                    return task.result()
                try:
                    await self.ledger.renew(item.stage_key, self.owner, self.lease_s)
                    self.metrics.lease_renewals.labels(name).inc()
                except LeaseLost:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise
                except LedgerError as exc:  # keep working; a later renewal may get through before expiry
                    log.warning("stage.renew_failed", stage=name, trace_id=item.trace_id, error=str(exc))
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.shield(self._release(item.stage_key))
            raise
        finally:
            self.metrics.inflight.labels(name).dec()
            self.metrics.work_seconds.labels(name).observe(time.perf_counter() - started)

    async def _release(self, key: str) -> None:
        try:
            await self.ledger.release(key, self.owner)
        except LedgerError as exc:  # the lease then simply expires
            log.warning("stage.release_failed", stage=self.stage.name, error=str(exc))

    # -- outcomes -------------------------------------------------------------------------------------------------

    def _run_of(self, ident: Identity, outcome: Outcome | None, rec: BusRecord) -> RunInfo:
        if ident.run is not None:
            return ident.run
        if outcome is not None and outcome.run is not None:
            return outcome.run
        # An input no stage could read: still journaled, with what the record says.
        return RunInfo(run_id=run_id_for(ident.envelope_key), policy=self.policy,
                       source=SourceRef(id=rec.header("source-id", "unknown") or "unknown", kind="unknown"),
                       trigger="otlp", created_at=utc_now())

    def _events(self, ident: Identity, key: str, generation: int, run: RunInfo,
                drafts: list[EventDraft]) -> list[JournalEvent]:
        at = utc_now()
        return [JournalEvent(event_id=event_id(key, generation, i), at=at, trace_id=ident.trace_id,
                             envelope_key=ident.envelope_key, envelope_version=ident.envelope_version,
                             phase=d.phase, status=d.status, reason=d.reason, artifacts=list(d.artifacts),
                             stage_key=key, details=dict(d.details), run=run)
                for i, d in enumerate(drafts)]

    def _headers(self, ident: Identity, key: str, run: RunInfo) -> tuple[tuple[str, bytes], ...]:
        headers = [(HEADER_IDEMPOTENCY_KEY, ident.envelope_key.encode()), (HEADER_STAGE, self.stage.name.encode()),
                   (HEADER_STAGE_KEY, key.encode()), (HEADER_RUN, run.model_dump_json().encode()),
                   (HEADER_CONTENT_TYPE, b"application/json")]
        if ident.envelope_version is not None:
            headers.insert(1, (HEADER_ENVELOPE_VERSION, str(ident.envelope_version).encode()))
        return tuple(headers)

    async def _record(self, rec: BusRecord, epoch: int, ident: Identity, key: str, row: LedgerRow,
                      outcome: Outcome) -> None:
        run = self._run_of(ident, outcome, rec)
        events = self._events(ident, key, row.generation, run, outcome.events)
        headers = self._headers(ident, key, run)
        journal = b"[" + b",".join(e.model_dump_json().encode() for e in events) + b"]"  # read back by _replay
        completion = Completion(state=outcome.state, result=outcome.document, result_headers=headers,
                                journal=journal)
        try:
            await self._retrying("record", lambda: self.ledger.complete(key, self.owner, completion), rec, epoch)
        except LeaseLost as exc:  # another worker took over meanwhile and will record its own outcome
            log.warning("stage.lease_lost_before_record", stage=self.stage.name, trace_id=ident.trace_id,
                        error=str(exc))
            raise _Abandoned() from exc
        await self._retrying("journal", lambda: self.journal.append(events), rec, epoch)
        if outcome.document is not None:
            await self._retrying("publish", lambda: self.publisher.publish(
                self.stage.output_topic, ident.trace_id.encode(), outcome.document, headers), rec, epoch)
        status = outcome.events[-1].status if outcome.events else outcome.state
        self.metrics.records.labels(self.stage.name, "worked").inc()
        self.metrics.outcomes.labels(self.stage.name, outcome.state, status).inc()
        log.info("stage.recorded", stage=self.stage.name, trace_id=ident.trace_id, state=outcome.state,
                 status=status, stage_key=key, run_id=run.run_id)

    async def _replay(self, row: LedgerRow, rec: BusRecord, epoch: int, ident: Identity) -> None:
        """A redelivered record whose outcome is recorded: journal and re-publish it exactly as first recorded."""
        if row.state == "failed":
            self.metrics.records.labels(self.stage.name, "skipped").inc()
            return
        if row.journal:
            events = [JournalEvent.model_validate(e) for e in json.loads(row.journal)]
            await self._retrying("journal", lambda: self.journal.append(events), rec, epoch)
        if row.result is not None:
            await self._retrying("publish", lambda: self.publisher.publish(
                self.stage.output_topic, ident.trace_id.encode(), row.result, row.result_headers), rec, epoch)
        self.metrics.records.labels(self.stage.name, "republished").inc()
        log.info("stage.republished", stage=self.stage.name, trace_id=ident.trace_id, stage_key=row.stage_key,
                 state=row.state)

    async def _dead_letter(self, rec: BusRecord, epoch: int, error: str, ident: Identity | None, key: str | None,
                           row: LedgerRow | None) -> None:
        """Input that cannot be worked on: DLQ (with the error) → an ``error`` journal event → ledger ``failed``."""
        name = self.stage.name
        log.warning("stage.dead_letter", stage=name, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                    error=error)
        await self._retrying("dlq", lambda: self.dead_letters.dead_letter(rec, error, stage=name), rec, epoch)
        if ident is not None and key is not None:
            drafts = [EventDraft(phase=self.stage.phase, status="error", reason=error)]
            events = self._events(ident, key, row.generation if row else 0, self._run_of(ident, None, rec), drafts)
            await self._retrying("journal", lambda: self.journal.append(events), rec, epoch)
        if key is not None and row is not None:
            try:
                await self._retrying("fail", lambda: self.ledger.fail(key, self.owner, error), rec, epoch)
            except LeaseLost:
                pass  # another worker owns the key now; its outcome wins
        self.metrics.records.labels(name, "dead_lettered").inc()
