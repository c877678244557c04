"""Status views as projections of the journal (seed-system.md: "The journal is canonical: status views and
dashboards are projections of the append-only event log"). Pure functions over :class:`JournalEvent` lists in
append order; nothing here reads a file.

A *run* is one pass of the loop over one envelope (its events share ``run.run_id``); a trace has a run per
envelope version and per reprocess. Views show the latest run of each trace (the one whose first event came last).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.journal import PHASES, JournalEvent, RunInfo

#: Statuses that end a run before the policy's last phase.
STOP_STATUSES = frozenset({"blocked", "error"})


@dataclass
class RunView:
    """One run and its events in order."""

    run: RunInfo
    trace_id: str
    envelope_key: str
    envelope_version: int | None
    events: list[JournalEvent] = field(default_factory=list)

    @property
    def last(self) -> JournalEvent:
        return self.events[-1]

    def phase(self, phase: str) -> JournalEvent | None:
        """The latest event of ``phase`` in this run."""
        return next((e for e in reversed(self.events) if e.phase == phase), None)

    @property
    def verdict(self) -> str | None:
        graded = self.phase("grade")
        return graded.details.get("verdict", graded.status) if graded and graded.status != "error" else None

    @property
    def category(self) -> str | None:
        graded = self.phase("grade")
        return graded.details.get("category") if graded else None

    @property
    def stopped(self) -> bool:
        """The run ended early: blocked or failed at some phase (a later reprocess starts a new run)."""
        return self.last.status in STOP_STATUSES

    def artifacts(self) -> list[str]:
        seen: list[str] = []
        for e in self.events:
            seen.extend(a for a in e.artifacts if a not in seen)
        return seen


def runs(events: list[JournalEvent]) -> list[RunView]:
    """Every run, in the order of its first event."""
    views: dict[str, RunView] = {}
    for e in events:
        view = views.get(e.run.run_id)
        if view is None:
            view = views[e.run.run_id] = RunView(e.run, e.trace_id, e.envelope_key, e.envelope_version)
        view.events.append(e)
    return list(views.values())


def latest_runs(events: list[JournalEvent]) -> list[RunView]:
    """The latest run of each trace, newest first."""
    latest: dict[str, RunView] = {}
    for view in runs(events):
        latest[view.trace_id] = view  # later first event wins
    return list(reversed(latest.values()))


def find_trace(events: list[JournalEvent], prefix: str) -> str:
    """The one trace id starting with ``prefix``. Raises ``LookupError`` when none or several match."""
    ids = sorted({e.trace_id for e in events if e.trace_id.startswith(prefix.lower())})
    if not ids:
        raise LookupError(f"no run of a trace {prefix!r} in the journal")
    if len(ids) > 1:
        raise LookupError(f"{prefix!r} matches {len(ids)} traces ({', '.join(i[:12] for i in ids[:5])}…): "
                          "give more of the id")
    return ids[0]


def summary(events: list[JournalEvent]) -> dict[str, Any]:
    """Counts over the latest run of each trace: per phase the statuses reached, blocked runs by reason, errors.

    ``{"traces": N, "phases": {phase: {status: count}}, "blocked": {reason: count}, "errors": {reason: count}}``
    (phases in loop order, only those reached by some run).
    """
    latest = latest_runs(events)
    phases: dict[str, Counter] = {p: Counter() for p in PHASES}
    blocked: Counter = Counter()
    errors: Counter = Counter()
    for view in latest:
        for phase in PHASES:
            if (e := view.phase(phase)) is not None:
                phases[phase][e.status] += 1
        if view.last.status == "blocked":
            blocked[view.last.reason or "(no reason recorded)"] += 1
        elif view.last.status == "error":
            errors[_first_line(view.last.reason)] += 1
    return {"traces": len(latest), "phases": {p: dict(c) for p, c in phases.items() if c},
            "blocked": dict(blocked.most_common()), "errors": dict(errors.most_common())}


def run_record(view: RunView) -> dict[str, Any]:
    """A run as one JSON-ready dict (``status --json``)."""
    return {"trace_id": view.trace_id, "envelope_key": view.envelope_key,
            "envelope_version": view.envelope_version, "run": view.run.model_dump(mode="json"),
            "verdict": view.verdict, "category": view.category, "phase": view.last.phase,
            "status": view.last.status, "stop_reason": view.last.reason if view.stopped else None,
            "artifacts": view.artifacts(), "events": [e.model_dump(mode="json") for e in view.events]}


def verdicts(events: list[JournalEvent]) -> dict[str, tuple[str, str | None, str | None]]:
    """Trace id -> (envelope key, verdict, category) of the latest grade event per trace."""
    out: dict[str, tuple[str, str | None, str | None]] = {}
    for e in events:
        if e.phase == "grade" and e.status != "error":
            out[e.trace_id] = (e.envelope_key, e.details.get("verdict", e.status), e.details.get("category"))
    return out


def _first_line(text: str | None) -> str:
    return (text or "(no reason recorded)").strip().splitlines()[0][:200]
