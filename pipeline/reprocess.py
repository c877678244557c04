"""``trace-source reprocess <trace>``: re-run a terminal trace on purpose, after its blocker was fixed.

Steps, all idempotent where they can be:

1. Find the trace's latest run in the journal and the phase to re-run (by default the phase its last event is of:
   the one that blocked, failed or ended the run).
2. Read that stage's input record back from the bus, at the position its ledger row recorded.
3. Reopen the ledger row (``reopened``, generation + 1) — the only way a done key is worked again.
4. Journal a ``reprocess`` event for the new run (``trigger: reprocess``, ``parent_run_id``: the old run).
5. Put the input record back on the stage's input topic with the new run's metadata; the stage's runner claims the
   reopened row and works it; its events get new ids (new generation), its result replaces the old one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.bus import BusRecord
from pipeline.journal import JournalEvent, RunInfo, open_journal, run_id_for, utc_now
from pipeline.journal.projection import find_trace, latest_runs
from pipeline.ledger import TERMINAL, open_ledger
from pipeline.loop_settings import LoopSettings
from pipeline.stage import HEADER_REPROCESS, HEADER_RUN


class ReprocessError(Exception):
    """The trace cannot be reprocessed; the message says why and what to do."""


@dataclass
class Reprocessed:
    trace_id: str
    phase: str
    stage_key: str
    run: RunInfo
    previous_run_id: str
    input_topic: str


async def read_input(settings: LoopSettings, topic: str, partition: int, offset: int) -> BusRecord | None:
    if settings.kafka_bootstrap_servers:
        from pipeline.kafka_bus import read_kafka_record

        return await read_kafka_record(settings.kafka_bootstrap_servers, topic, partition, offset,
                                       security=settings.kafka_security())
    from pipeline.local_bus import read_local_record

    return read_local_record(settings.state_dir, topic, offset)


async def reprocess(settings: LoopSettings, trace: str, *, phase: str | None = None,
                    reason: str = "reprocess requested", policy: str | None = None) -> Reprocessed:
    """Reprocess the latest run of the trace whose id starts with ``trace``. Raises :class:`ReprocessError`."""
    url = settings.database_url()
    journal = open_journal(url, settings.state_dir)
    ledger = open_ledger(url, settings.state_dir)
    await journal.start()
    await ledger.start()
    try:
        events = await journal.events()
        try:
            trace_id = find_trace(events, trace)
        except LookupError as exc:
            raise ReprocessError(str(exc)) from None
        view = next(v for v in latest_runs(events) if v.trace_id == trace_id)
        target = phase or view.last.phase
        if target in ("import", "reprocess"):
            target = "grade"  # an observed run (or a pending reprocess) is re-run from grading
        event = view.phase(target)
        if event is None or event.stage_key is None:
            raise ReprocessError(f"run {view.run.run_id[:12]} of trace {trace_id} has no {target} phase to re-run "
                                 f"(its phases: {', '.join(dict.fromkeys(e.phase for e in view.events))})")
        row = await ledger.get(event.stage_key)
        if row is None:
            raise ReprocessError(f"no ledger row for the {target} phase of trace {trace_id}: the ledger at "
                                 f"{'the database' if url else settings.state_dir} is not the one that ran it")
        if row.state not in TERMINAL and row.state != "reopened":
            raise ReprocessError(f"the {target} phase of trace {trace_id} is still in progress (ledger state "
                                 f"{row.state}, lease owner {row.lease_owner}); reprocess only ends of runs")
        record = await read_input(settings, row.input_topic, row.input_partition, row.input_offset)
        if record is None:
            raise ReprocessError(f"the input of the {target} phase ({row.input_topic} partition "
                                 f"{row.input_partition} offset {row.input_offset}) is no longer on the bus")
        reopened = await ledger.reopen(row.stage_key, reason)
        assert reopened is not None
        run = view.run.model_copy(update={
            "run_id": run_id_for(row.envelope_key, reopened.generation), "trigger": "reprocess",
            "parent_run_id": view.run.run_id, "created_at": utc_now(),
            **({"policy": policy} if policy else {})})
        await journal.append([JournalEvent(
            event_id=hashlib.sha256(f"reprocess\n{row.stage_key}\n{reopened.generation}\n".encode()).hexdigest(),
            at=utc_now(), trace_id=trace_id, envelope_key=row.envelope_key, envelope_version=view.envelope_version,
            phase="reprocess", status="requested", reason=reason, stage_key=row.stage_key,
            details={"phase": target, "previous_run_id": view.run.run_id, "generation": reopened.generation},
            run=run)])
        headers = [(k, v) for k, v in record.headers if k not in (HEADER_RUN, HEADER_REPROCESS)]
        headers += [(HEADER_RUN, run.model_dump_json().encode()), (HEADER_REPROCESS, reason.encode()[:1024])]
        await _publish(settings, record.topic, record.key, record.value, headers)
        return Reprocessed(trace_id, target, row.stage_key, run, view.run.run_id, record.topic)
    finally:
        await ledger.close()
        await journal.close()


async def _publish(settings: LoopSettings, topic: str, key: bytes | None, value: bytes, headers) -> None:
    if settings.kafka_bootstrap_servers:
        from pipeline.kafka_bus import KafkaPublisher

        publisher = KafkaPublisher(settings.kafka_bootstrap_servers, max_message_bytes=settings.max_message_bytes,
                                   security=settings.kafka_security())
    else:
        from pipeline.local_bus import LocalBusPublisher

        publisher = LocalBusPublisher(settings.state_dir)
    await publisher.start()
    try:
        await publisher.publish(topic, key, value, headers)
    finally:
        await publisher.stop()
