"""The contract every loop stage (grade, seed, reproduce, fix) implements to plug into :mod:`pipeline.runner`.

A stage holds only its decision and its one side effect. The runner owns everything else: consume, identify,
claim the stage key in the ledger with a lease (renewed while the stage works), retries with backoff, the
dead-letter topic, recording the outcome, journaling it, publishing it, committing offsets. Adding a stage is one
module implementing :class:`Stage` and a line in :data:`pipeline.stages.STAGES`, like adding a component to the
OpenTelemetry Collector.

Records between stages (topics ``trace-source.grades``, ``.seeds``, ``.reproductions``, ``.fixes``): key = trace id
(32 hex, ASCII); value = the stage's JSON document; headers:

===================== ===========================================================================================
``idempotency-key``   the envelope's idempotency key (64 hex), carried unchanged along the whole loop
``envelope-version``  the envelope version (decimal)
``stage``             the stage that produced the record
``stage-key``         its stage key (64 hex)
``trace-source-run``  the run's launch metadata, :class:`pipeline.journal.RunInfo` as JSON
``content-type``      ``application/json``
===================== ===========================================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from pipeline.bus import BusRecord
from pipeline.journal import RunInfo

HEADER_IDEMPOTENCY_KEY = "idempotency-key"
HEADER_ENVELOPE_VERSION = "envelope-version"
HEADER_STAGE = "stage"
HEADER_STAGE_KEY = "stage-key"
HEADER_RUN = "trace-source-run"
HEADER_CONTENT_TYPE = "content-type"
#: Set on a record ``trace-source reprocess`` put back on a stage's input topic (value: the reason).
HEADER_REPROCESS = "reprocess"
#: Optional on an envelope record: what brought it in (``import``, ``sync``, ``upload``, ``autoloop``); the grade
#: stage records it as the run's trigger. Without it the trigger follows the envelope's source kind. Defined with
#: the traces topic's record form in ``sinks.envelopes``.
from sinks.envelopes import HEADER_TRIGGER  # noqa: E402,F401

#: Resource attributes the reproduce stage gives a harness run (through ``OTEL_RESOURCE_ATTRIBUTES``), so that the
#: reproduction's own trace is graded as a run of its own whose parent is the run it reproduces — and never
#: reproduced itself (its policy is capped at ``grade``).
RESOURCE_TRIGGER = "trace_source.trigger"
RESOURCE_PARENT_RUN_ID = "trace_source.parent_run_id"
RESOURCE_REPRODUCTION_OF = "trace_source.reproduction.trace_id"
RESOURCE_ATTEMPT = "trace_source.reproduction.attempt"
RESOURCE_ATTEMPT_ID = "trace_source.reproduction.attempt_id"


_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PoisonInput(ValueError):
    """The input record can never be worked on (undecodable, missing its idempotency key, fails validation): it
    goes to the dead-letter topic with this message, and the ledger row (if any) becomes ``failed``."""


class TransientError(Exception):
    """A failure worth retrying with backoff (a service briefly unreachable). The runner retries the record up to
    its ``max_attempts``, then dead-letters it."""


@dataclass(frozen=True, slots=True)
class Identity:
    """What a record is about: its trace, its envelope (key, version) and, for records made by an earlier stage,
    the run they belong to (``None`` for envelopes straight from the assembler or an import)."""

    trace_id: str
    envelope_key: str
    envelope_version: int | None
    run: RunInfo | None


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One claimed record handed to :meth:`Stage.work`. ``generation``: the ledger row's (0, +1 per reprocess);
    ``attempt``: 1 for the first claim of this generation's work, counting retries and take-overs."""

    record: BusRecord
    identity: Identity
    stage_key: str
    generation: int
    attempt: int

    @property
    def trace_id(self) -> str:
        return self.identity.trace_id


@dataclass(slots=True)
class EventDraft:
    """A journal event as a stage describes it; the runner adds the ids, time, envelope and run."""

    phase: str
    status: str
    reason: str | None = None
    artifacts: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    """What a stage's work came to.

    ``state``: ``done``, or ``blocked`` when a prerequisite was missing (the trace stops here with ``events``
    saying why). ``document``: the JSON bytes to publish on the output topic (``None`` publishes nothing).
    ``events``: journal events in order. ``run``: the run's launch metadata when the input did not carry it
    (the entry stage creates it from the envelope).
    """

    state: Literal["done", "blocked"]
    document: bytes | None
    events: list[EventDraft]
    run: RunInfo | None = None


class Stage(Protocol):
    """A loop stage. Attributes are read once at start; ``work`` is called once per claimed record (again only
    after a crash before its outcome was recorded, or after a reprocess)."""

    #: Stage name (``grade``); part of the stage key and the metrics labels.
    name: str
    #: The journal phase it performs (``grade``, ``seed``, ``reproduce``, ``fix``).
    phase: str
    #: True for the stage that reads envelopes and launches runs: it runs under every policy (it journals the
    #: import, and under ``observe`` nothing else).
    entry: bool
    input_topic: str
    output_topic: str
    group_id: str
    #: Changes whenever a setting that changes the stage's result changes (part of the stage key).
    config_version: str
    #: Records worked on at once by one runner when ``--concurrency`` is not given (distinct traces only).
    default_concurrency: int

    def identify(self, record: BusRecord) -> Identity:
        """Parse the record's identity from key and headers. Raises :class:`PoisonInput`."""
        ...

    def select(self, record: BusRecord) -> str | None:
        """``None`` to work on the record; else the reason it is not for this stage (e.g. "grade passed: nothing
        to reproduce"): it is committed past without a ledger row."""
        ...

    async def start(self) -> None: ...

    async def work(self, item: WorkItem) -> Outcome:
        """Do the work and its one side effect (artifacts, an external run). Raises :class:`PoisonInput`,
        :class:`TransientError`, or anything else (treated as poison)."""
        ...

    async def close(self) -> None: ...


def identify_record(record: BusRecord) -> Identity:
    """The identity every loop record carries: key = trace id, headers ``idempotency-key``, ``envelope-version`` and
    (after the first stage) ``trace-source-run``. Raises :class:`PoisonInput` naming what is missing."""
    trace_id = (record.key or b"").decode("ascii", errors="replace")
    if not _HEX32.match(trace_id):
        raise PoisonInput(f"record key {trace_id[:64]!r} is not a trace id (32 lowercase hex)")
    envelope_key = record.header(HEADER_IDEMPOTENCY_KEY) or ""
    if not _HEX64.match(envelope_key):
        raise PoisonInput(f"header {HEADER_IDEMPOTENCY_KEY} {envelope_key[:80]!r} is not an envelope key (64 hex)")
    version_text = record.header(HEADER_ENVELOPE_VERSION)
    try:
        version = int(version_text) if version_text else None
    except ValueError:
        raise PoisonInput(f"header {HEADER_ENVELOPE_VERSION} {version_text[:20]!r} is not an integer") from None
    run_text = record.header(HEADER_RUN)
    try:
        run = RunInfo.model_validate_json(run_text) if run_text else None
    except ValidationError as exc:
        raise PoisonInput(f"header {HEADER_RUN} is not valid run metadata: {exc.errors()[0]['msg']}") from None
    return Identity(trace_id=trace_id, envelope_key=envelope_key, envelope_version=version, run=run)
