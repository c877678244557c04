"""The journal: the canonical, append-only record of the loop — one event per phase transition of a run.

As in the seed system, the journal is canonical and every status view is a projection of it
(:mod:`pipeline.journal.projection`). An event says which trace and envelope it concerns, the phase (``import``,
``grade``, ``seed``, ``reproduce``, ``fix``, ``reprocess``), the status reached and why, the artifact paths that
justify it, and the run's launch metadata (:class:`RunInfo`).

Appends are **idempotent by** :attr:`JournalEvent.event_id`: a stage runner appends the events of an outcome after
recording it in the ledger, and appends them again when a redelivered record finds the outcome already recorded,
so a crash between the two never loses an event and never writes one twice. :func:`event_id` derives the id from
the stage key, the ledger row's generation (``reprocess`` increments it) and the event's index in the outcome.

Two implementations: :class:`pipeline.journal.jsonl.JsonlJournal` (embedded, ``<state_dir>/runs.jsonl``) and
:class:`pipeline.journal.postgres.PostgresJournal` (cluster, table ``journal``). :func:`open_journal` picks one.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

#: Phases of the loop (seed-system.md "The loop, phase by phase"), plus ``reprocess`` for the operator's re-run.
Phase = Literal["import", "grade", "seed", "reproduce", "fix", "reprocess"]
PHASES: tuple[str, ...] = ("import", "grade", "seed", "reproduce", "fix", "reprocess")

#: How a run was started.
Trigger = Literal["otlp", "upload", "import", "sync", "autoloop", "reprocess", "reproduction"]

JOURNAL_FILENAME = "runs.jsonl"


def utc_now() -> str:
    """Now as ISO 8601 UTC with microseconds and a ``Z`` (the journal's time format)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SourceRef(BaseModel):
    """Where the run's trace came from (the envelope's ``source``)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str


class RunInfo(BaseModel):
    """Launch metadata every event of a run carries (seed-system.md "Every run carries its launch metadata")."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="Id of this pass of the loop over one envelope (32 hex).")
    policy: str = Field(description="Execution policy the run was launched with: observe | grade | reproduce | fix.")
    source: SourceRef
    repository: str | None = Field(None, description="The agent's repository (owner/name) when known.")
    trigger: str = Field(description="What started the run: otlp, upload, import, sync, autoloop, reprocess, "
                                     "reproduction.")
    parent_run_id: str | None = Field(None, description="The run this one re-runs (reprocess) or reproduces.")
    created_at: str = Field(description="When the run was launched, ISO 8601 UTC.")


class JournalEvent(BaseModel):
    """One phase transition. ``at`` is ISO 8601 UTC; ``artifacts`` are paths relative to the artifact root (the
    state dir in the embedded default); ``details`` holds phase-specific facts (a grade's verdict and category, a
    reproduction's attempt counts, a pull request URL)."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(description="Idempotency id of the event (64 hex), see pipeline.journal.event_id.")
    at: str
    trace_id: str
    envelope_key: str
    envelope_version: int | None = None
    phase: Phase
    status: str = Field(description="The phase's outcome, e.g. imported, failed, passed, inconclusive, blocked, "
                                    "reproduced, flaky, not_reproduced, pr_opened, budget_exhausted.")
    reason: str | None = None
    artifacts: list[str] = Field(default_factory=list)
    stage_key: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    run: RunInfo

    def to_json_line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


def event_id(stage_key: str, generation: int, index: int) -> str:
    """Deterministic id of the ``index``-th event of the outcome recorded under ``stage_key`` at ``generation``:
    sha256 of ``"<stage_key>\\n<generation>\\n<index>\\n"`` (64 hex)."""
    return hashlib.sha256(f"{stage_key}\n{generation}\n{index}\n".encode()).hexdigest()


def run_id_for(envelope_key: str, generation: int = 0) -> str:
    """Run id of the first pass over an envelope (32 hex): the same envelope replayed gives the same run id;
    ``generation`` > 0 (a reprocess) gives a new one."""
    return hashlib.sha256(f"run\n{envelope_key}\n{generation}\n".encode()).hexdigest()[:32]


class Journal(Protocol):
    """Append-only event log. Both implementations raise :class:`JournalError` when the store cannot be used."""

    async def start(self) -> None: ...

    async def append(self, events: list[JournalEvent]) -> int:
        """Append the events whose ``event_id`` is not in the journal yet, in order, durably; returns how many were
        new."""
        ...

    async def events(self, *, trace_id: str | None = None, limit: int | None = None,
                     parent_run_id: str | None = None) -> list[JournalEvent]:
        """Events in append order — of one trace when ``trace_id``, of the runs whose parent is ``parent_run_id``
        (a reproduction's attempts) when given; ``limit`` keeps the newest N."""
        ...

    async def close(self) -> None: ...


class JournalError(Exception):
    """The journal cannot be read or written."""


def open_journal(database_url: str | None, state_dir: str | Path) -> Journal:
    """The Postgres journal for a ``postgresql://`` URL, else ``<state_dir>/runs.jsonl``. Not started yet."""
    if database_url:
        from pipeline.journal.postgres import PostgresJournal

        return PostgresJournal(database_url)
    from pipeline.journal.jsonl import JsonlJournal

    return JsonlJournal(Path(state_dir) / JOURNAL_FILENAME)
