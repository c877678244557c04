"""Glue from a closed trace (``pipeline.buffers.ClosedTrace``) to its upload envelope (``normalizers.envelope``).

Steps: decode the kept OTLP records to canonical spans and log events (``normalizers.canonical``), merged with the
previous envelope's content when the trace was reopened from one; one span per span id (the copy that ends latest,
the first one on ties — the same rule the buffers dedupe with), one log event per (span id, time, observed time,
severity, event name); redact (``normalizers.redact``) *before* building the agent-run view
(``normalizers.agent_run``) so the view only sees redacted content; then the idempotency key over the trace id and
the span set, and the :class:`~normalizers.envelope.Envelope`.

Pure and CPU-bound (the assembler runs it in a worker thread). Raises whatever validation raises
(``pydantic.ValidationError``, ``ValueError``): the assembler then sends the trace's records to the DLQ.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from normalizers.agent_run import build_agent_run
from normalizers.canonical import (CanonicalLogEvent, CanonicalSpan, log_event_identity, log_events_from_logs_data,
                                   spans_from_traces_data)
from normalizers.envelope import Completeness, Envelope, RedactionReport, Source, envelope_idempotency_key, repository_from
from normalizers.redact import Redactor
from pipeline.buffers import ClosedTrace, log_event_in_trace
from sinks.base import SIGNAL_LOGS

#: Source kind when the records do not say how they arrived (e.g. written by another producer).
DEFAULT_SOURCE_KIND = "otlp"
DEFAULT_SOURCE_ID = "unknown"


def collect(closed: ClosedTrace) -> tuple[list[CanonicalSpan], list[CanonicalLogEvent]]:
    """The trace's canonical spans (ordered by start time, span id) and log events (ordered by time)."""
    spans: dict[str, CanonicalSpan] = {}
    logs: dict[tuple, CanonicalLogEvent] = {}
    if closed.prior is not None:
        spans = {s.span_id: s for s in closed.prior.spans}
        logs = {log_event_identity(e): e for e in closed.prior.log_events}
    for rec in closed.records:
        if rec.signal == SIGNAL_LOGS:
            for e in log_events_from_logs_data(rec.value):
                if (e := log_event_in_trace(e, closed.trace_id)) is not None:  # own id, or prompt-keyed
                    logs.setdefault(log_event_identity(e), e)
            continue
        for s in spans_from_traces_data(rec.value):
            if s.trace_id != closed.trace_id:
                continue
            old = spans.get(s.span_id)
            if old is None or s.end_time_unix_nano > old.end_time_unix_nano:
                spans[s.span_id] = s
    return unique_spans(spans.values()), unique_log_events(logs.values())


def unique_spans(spans: Iterable[CanonicalSpan]) -> list[CanonicalSpan]:
    """One span per span id — the copy that ends latest, the first one on ties (the rule the assembler's buffers
    dedupe with) — ordered by start time, then span id."""
    kept: dict[str, CanonicalSpan] = {}
    for s in spans:
        old = kept.get(s.span_id)
        if old is None or s.end_time_unix_nano > old.end_time_unix_nano:
            kept[s.span_id] = s
    return sorted(kept.values(), key=lambda s: (s.start_time_unix_nano, s.span_id))


def unique_log_events(events: Iterable[CanonicalLogEvent]) -> list[CanonicalLogEvent]:
    """One log event per :func:`~normalizers.canonical.log_event_identity` (the first), ordered by time."""
    kept: dict[tuple, CanonicalLogEvent] = {}
    for e in events:
        kept.setdefault(log_event_identity(e), e)
    return sorted(kept.values(), key=lambda e: (e.time_unix_nano or e.observed_time_unix_nano, log_event_identity(e)))


def build_envelope(closed: ClosedTrace, *, assembled_at_ns: int, redactor: Redactor | None = None,
                   repository: str | None = None) -> Envelope:
    """The envelope of ``closed`` (version ``closed.version``, closed for ``closed.reason``).

    ``assembled_at_ns``: unix ns to record as the assembly time. ``redactor``: ``None`` leaves content as received
    (``redaction.masking_applied`` false). ``repository``: configured ``owner/name``, else read from resource
    attributes (``normalizers.envelope.repository_from``).
    """
    spans, logs = collect(closed)
    prior = closed.prior
    received = [r.received_at_ns for r in closed.records if r.received_at_ns > 0]
    if prior is not None:
        received.append(prior.received_at_unix_nano)
    first = closed.records[0] if closed.records else None
    source = Source(
        id=(first.source_id if first and first.source_id else (prior.source.id if prior else DEFAULT_SOURCE_ID)),
        kind=(first.transport if first and first.transport else (prior.source.kind if prior else DEFAULT_SOURCE_KIND)))
    return envelope_from_spans(
        closed.trace_id, spans, logs, source=source, version=closed.version, closed_reason=closed.reason,
        received_at_ns=min(received) if received else assembled_at_ns, assembled_at_ns=assembled_at_ns,
        redactor=redactor, repository=repository,
        prior_redaction=prior.redaction if prior is not None else None)


def envelope_from_spans(trace_id: str, spans: list[CanonicalSpan], logs: list[CanonicalLogEvent], *, source: Source,
                        version: int, closed_reason: str, received_at_ns: int, assembled_at_ns: int,
                        redactor: Redactor | None = None, repository: str | None = None,
                        prior_redaction: RedactionReport | None = None) -> Envelope:
    """The envelope of one complete trace: ``spans`` / ``logs`` already one per id and ordered (:func:`collect`,
    :func:`unique_spans`); redaction first, then the agent-run view over the redacted content, the idempotency key
    and the completeness (root seen / local). Used by the assembler and by the pulled sources
    (``pipeline.sources``), whose runs are complete when read. ``prior_redaction``: counts already in content
    carried over from an earlier version (not counted again)."""
    report = RedactionReport()
    if redactor is not None:
        spans, logs, report = redactor.redact(spans, logs)
    if prior_redaction is not None and prior_redaction.masking_applied:
        # Masks already in the prior content are not counted again; carry its counts over.
        masked = Counter(report.masked)
        masked.update(prior_redaction.masked)
        report = report.model_copy(update={
            "masking_applied": True, "masked": dict(sorted(masked.items())),
            "dropped_by_allow_list": report.dropped_by_allow_list + prior_redaction.dropped_by_allow_list,
            "dropped_by_deny_list": report.dropped_by_deny_list + prior_redaction.dropped_by_deny_list})

    root = next((s for s in spans if not s.parent_span_id), None) or next((s for s in spans if s.is_local_root), None)
    resource = (root or (spans[0] if spans else None) or (logs[0] if logs else None))
    resource_attrs = dict(resource.resource) if resource is not None else {}
    return Envelope(
        idempotency_key=envelope_idempotency_key(trace_id, spans, logs),
        envelope_version=version,
        trace_id=trace_id,
        source=source,
        repository=repository_from(repository, resource_attrs),
        received_at_unix_nano=received_at_ns,
        assembled_at_unix_nano=assembled_at_ns,
        completeness=Completeness(root_seen=root is not None, root_is_local=root is not None and root.is_local_root,
                                  closed_reason=closed_reason),
        resource=resource_attrs,
        spans=spans,
        log_events=logs,
        agent_run=build_agent_run(spans, logs),
        redaction=report,
    )
