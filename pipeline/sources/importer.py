"""From a source's traces (canonical spans, or envelopes read from files) to envelopes on ``trace-source.traces``,
each once per content.

A pulled run is complete when read: it skips the assembler's waiting and is built with the assembler's own
pieces (``pipeline.envelope_builder.envelope_from_spans``: redaction, the agent-run view, the idempotency key).
``source`` is the registered name and the provider's kind; ``closed_reason`` is ``root-ended-and-quiet`` when the
run's root span ended, else ``max-wait`` (the source gave what it has; nothing more is waited for).

Versions: the source's state (:class:`pipeline.sources.store.SourceStore`) remembers the last key and version per
trace; the same content again is skipped (same key), new content is version N+1. Delivery (:class:`Destination`) is
the embedded log / Kafka through ``sinks.envelopes`` (once per key), or an upload to a receiver's
``POST /v1/envelopes``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.envelope import Envelope, Source
from normalizers.redact import Redactor
from pipeline.envelope_builder import envelope_from_spans, unique_log_events, unique_spans
from pipeline.sources.store import SourceStore
from sinks.base import prompt_trace_id_of_dict
from sinks.envelopes import EnvelopeRecord, EnvelopeSink


@dataclass
class PulledTrace:
    """One trace as a source gave it: its spans and log events, or a finished envelope (an envelope file).
    ``item``: where it came from, for reports (a file, a row id, a Langfuse trace id)."""

    trace_id: str
    item: str
    spans: list[CanonicalSpan] = field(default_factory=list)
    log_events: list[CanonicalLogEvent] = field(default_factory=list)
    envelope: Envelope | None = None


def group_traces(spans: list[CanonicalSpan], logs: list[CanonicalLogEvent], item: str) -> tuple[
        list[PulledTrace], int]:
    """Spans and log events of any number of traces -> one :class:`PulledTrace` per trace id (in first-seen order),
    and the number of log records dropped because they belong to no trace (no trace id and no ``prompt.id``)."""
    by_id: dict[str, PulledTrace] = {}
    for s in spans:
        by_id.setdefault(s.trace_id, PulledTrace(s.trace_id, item)).spans.append(s)
    dropped = 0
    for e in logs:
        tid = e.trace_id
        if not tid:
            synthetic = prompt_trace_id_of_dict(e.attributes)
            if synthetic is None:
                dropped += 1
                continue
            tid = synthetic.hex()
        by_id.setdefault(tid, PulledTrace(tid, item)).log_events.append(e)
    return list(by_id.values()), dropped


class Destination(Protocol):
    """Where envelopes go. ``deliver`` returns ``(created, result)``: created false when the key was there before."""

    async def deliver(self, envelope: Envelope, trigger: str) -> tuple[bool, dict]: ...

    def describe(self) -> str: ...


class SinkDestination:
    """The embedded log (``<state_dir>/spans.db`` + ``traces/``) or Kafka's traces topic (``sinks.envelopes``)."""

    def __init__(self, sink: EnvelopeSink) -> None:
        self.sink = sink

    async def deliver(self, envelope: Envelope, trigger: str) -> tuple[bool, dict]:
        accepted = await self.sink.put(EnvelopeRecord(
            trace_id=envelope.trace_id, idempotency_key=envelope.idempotency_key,
            envelope_version=envelope.envelope_version, closed_reason=envelope.completeness.closed_reason,
            source_id=envelope.source.id, value=envelope.to_json_bytes(), trigger=trigger))
        return accepted.created, accepted.result

    def describe(self) -> str:
        return self.sink.describe()


class UploadDestination:
    """A receiver's ``POST /v1/envelopes`` (:class:`pipeline.sources.upload.UploadClient`, entered by the caller)."""

    def __init__(self, client) -> None:
        self.client = client

    async def deliver(self, envelope: Envelope, trigger: str) -> tuple[bool, dict]:
        uploaded = await self.client.upload(envelope)
        return uploaded.created, uploaded.result

    def describe(self) -> str:
        return f"upload to {self.client.url}"


@dataclass
class Imported:
    """What happened to one trace: ``status`` ``imported`` (new on the topic), ``unchanged`` (this content was
    imported before), ``duplicate`` (the destination had the key already), ``new`` (``--preview``: would be
    imported), or ``rejected`` with ``reason``."""

    trace_id: str
    item: str
    status: str
    key: str | None = None
    version: int | None = None
    reason: str | None = None
    kind: str | None = None
    envelope: Envelope | None = None


class Importer:
    """Turns :class:`PulledTrace` into envelopes of ``source`` and delivers them (``destination`` ``None``: only
    builds them, for ``--preview``). ``trigger``: what the run journal records (``import``, ``sync``,
    ``autoloop``, ``upload``). ``repository``: ``owner/name`` to set on every envelope (else read from resource
    attributes)."""

    def __init__(self, store: SourceStore, source: Source, destination: Destination | None, *, trigger: str,
                 repository: str | None = None, redactor: Redactor | None = None,
                 wall_ns=time.time_ns) -> None:
        self.store = store
        self.source = source
        self.destination = destination
        self.trigger = trigger
        self.repository = repository
        self.redactor = redactor if redactor is not None else Redactor()
        self.wall_ns = wall_ns

    def build(self, trace: PulledTrace) -> Envelope:
        """The envelope of ``trace`` with its version from the source's state (not delivered). Raises
        ``ValueError`` (``pydantic.ValidationError``) when it cannot be built."""
        if trace.envelope is not None:
            env = trace.envelope
            if self.repository and env.repository != self.repository:
                env = env.model_copy(update={"repository": self.repository})
            return env
        spans, logs = unique_spans(trace.spans), unique_log_events(trace.log_events)
        root = next((s for s in spans if s.is_run_root), None)
        now = self.wall_ns()
        env = envelope_from_spans(
            trace.trace_id, spans, logs, source=self.source, version=1,
            closed_reason="root-ended-and-quiet" if root is not None and root.end_time_unix_nano else "max-wait",
            received_at_ns=now, assembled_at_ns=now, redactor=self.redactor, repository=self.repository)
        prior = self.store.prior(self.source.id, trace.trace_id)
        if prior is not None:
            key, version = prior
            env.envelope_version = version if key == env.idempotency_key else version + 1
        return env

    async def run(self, trace: PulledTrace) -> Imported:
        """Build and deliver one trace. Never raises for the trace's own problems (they come back ``rejected``);
        raises what the destination raises (``sinks.base.SinkUnavailable``, ``UploadError``) — the caller stops
        then, leaving the cursor where it was."""
        try:
            env = self.build(trace)
        except ValueError as exc:
            reason = str(exc).splitlines()[0][:500]
            self.store.record_rejected(self.source.id, trace.item, "bad shape", reason)
            return Imported(trace.trace_id, trace.item, "rejected", reason=reason, kind="bad shape")
        prior = self.store.prior(env.source.id, env.trace_id)
        if prior is not None and prior[0] == env.idempotency_key:
            return Imported(env.trace_id, trace.item, "unchanged", env.idempotency_key, env.envelope_version,
                            envelope=env)
        if self.destination is None:
            return Imported(env.trace_id, trace.item, "new", env.idempotency_key, env.envelope_version,
                            envelope=env)
        created, _ = await self.destination.deliver(env, self.trigger)
        self.store.record_import(env.source.id, env.trace_id, env.idempotency_key, env.envelope_version)
        return Imported(env.trace_id, trace.item, "imported" if created else "duplicate", env.idempotency_key,
                        env.envelope_version, envelope=env)


def count(results: list[Imported]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in results:
        out[r.status] += 1
    return dict(out)
