"""The idempotency ledger: one row per *stage key*, so a stage never does its work twice.

A stage key (DESIGN.md "Idempotency keys") is :func:`stage_key` = ``sha256(stage, envelope key, config version)``.
Every stage runner claims the key of a record before working on it, renews the claim's *lease* while it works, and
records the result when done. Redelivery (a replay after a crash, a rebalance, a new consumer group reading from
offset 0) finds the row done and re-publishes the stored result instead of working again.

Row states (:data:`STATES`)::

    claimed ──complete──► done | blocked        (terminal: the stored result is re-published on redelivery)
       │  └──fail────────► failed               (terminal: the input went to the dead-letter topic)
       └──release / lease expiry ──► claimable again (attempts counts every claim)
    done | blocked | failed ──reopen (only `trace-source reprocess`)──► reopened ──claim──► claimed

Fencing: ``complete``, ``fail`` and ``renew`` succeed only for the current lease owner, so a worker that lost its
lease (paused past the expiry while another took over) cannot overwrite the new owner's result.

Two implementations with one behaviour: :class:`pipeline.ledger.sqlite.SqliteLedger` (embedded default, under the
state dir) and :class:`pipeline.ledger.postgres.PostgresLedger` (cluster; psycopg 3). Both create and migrate their
schema themselves. :func:`open_ledger` picks one from a database URL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from pipeline.bus import decode_headers, encode_headers  # noqa: F401  (stored header form, re-exported)

#: Ledger row states.
State = Literal["claimed", "done", "blocked", "failed", "reopened"]
STATES: tuple[str, ...] = ("claimed", "done", "blocked", "failed", "reopened")
#: States whose result is final until someone reprocesses the trace on purpose.
TERMINAL: frozenset[str] = frozenset({"done", "blocked", "failed"})


def stage_key(stage: str, envelope_key: str, config_version: str) -> str:
    """The stage key: SHA-256 (64 lowercase hex) of ``"<stage>\\n<envelope key>\\n<config version>\\n"`` (UTF-8).

    ``stage``: the stage name (``grade``, ``seed``, ``reproduce``, ``fix``); ``envelope_key``: the envelope's
    idempotency key (64 hex); ``config_version``: the stage's :attr:`pipeline.stage.Stage.config_version`, which
    changes when a setting that changes the result changes (so a new grader version grades again). Raises
    ``ValueError`` for an empty part or one holding a newline.
    """
    parts = (stage, envelope_key, config_version)
    if any(not p or "\n" in p for p in parts):
        raise ValueError(f"stage key parts must be non-empty single lines, got {parts!r}")
    return hashlib.sha256("".join(p + "\n" for p in parts).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RowInfo:
    """What a new row records about its input: the trace, the envelope, and where the input record sits (so
    ``trace-source reprocess`` can read it back from the bus)."""

    stage: str
    trace_id: str
    envelope_key: str
    config_version: str
    input_topic: str = ""
    input_partition: int = 0
    input_offset: int = 0


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger row. Times are unix seconds (``float``) of the ledger's clock (Postgres: the server's).

    ``result``: the exact output record value the stage published (bytes, re-published unchanged on redelivery),
    ``None`` when the stage published nothing; ``result_headers``: its headers. ``journal``: the journal events of
    the outcome (JSON array), appended again on redelivery so a crash between recording and journaling loses none.
    ``generation``: 0, +1 per reopen.
    """

    stage_key: str
    stage: str
    trace_id: str
    envelope_key: str
    config_version: str
    state: str
    lease_owner: str | None
    lease_expires_at: float | None
    attempts: int
    generation: int
    result: bytes | None
    result_headers: tuple[tuple[str, bytes], ...]
    error: str | None
    input_topic: str
    input_partition: int
    input_offset: int
    created_at: float
    updated_at: float
    journal: bytes | None = None


@dataclass(frozen=True, slots=True)
class Acquired:
    """The caller now holds the lease on the row (a new row, an expired lease, a released or reopened row)."""

    row: LedgerRow


@dataclass(frozen=True, slots=True)
class Finished:
    """The row is terminal (done / blocked / failed): do not work again; re-publish ``row.result`` if any."""

    row: LedgerRow


@dataclass(frozen=True, slots=True)
class Held:
    """Another owner holds an unexpired lease until ``expires_at`` (unix s): wait, then claim again."""

    row: LedgerRow
    expires_at: float


ClaimResult = Acquired | Finished | Held


@dataclass(frozen=True, slots=True)
class Completion:
    """What a finished claim records: ``state`` ``done`` or ``blocked``; the published value and headers; the
    outcome's journal events (JSON array bytes)."""

    state: Literal["done", "blocked"]
    result: bytes | None
    result_headers: tuple[tuple[str, bytes], ...] = field(default_factory=tuple)
    journal: bytes | None = None


class LeaseLost(Exception):
    """The caller no longer holds the lease (it expired and another worker claimed the row, or the row was
    reopened): its work must not be recorded or published."""


class LedgerError(Exception):
    """The ledger cannot be opened or used (unreachable database, schema written by a newer release)."""


class Ledger(Protocol):
    """The ledger API both implementations provide. Every method is atomic; all raise :class:`LedgerError` when the
    database cannot be reached (callers retry: every operation is safe to repeat)."""

    async def start(self) -> None:
        """Connect, create or migrate the schema. Raises :class:`LedgerError`."""
        ...

    async def claim(self, key: str, info: RowInfo, owner: str, lease_s: float) -> ClaimResult:
        """Claim ``key`` for ``owner`` for ``lease_s`` seconds (see the module docstring for the transitions).
        Each successful claim increments ``attempts``."""
        ...

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        """Extend ``owner``'s lease to now + ``lease_s``. Raises :class:`LeaseLost`."""
        ...

    async def complete(self, key: str, owner: str, completion: Completion) -> LedgerRow:
        """Record the result and make the row terminal. Raises :class:`LeaseLost`."""
        ...

    async def fail(self, key: str, owner: str, error: str) -> LedgerRow:
        """Mark the row ``failed`` with ``error`` (its input was dead-lettered). Raises :class:`LeaseLost`."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give the claim up (graceful shutdown): the row stays ``claimed`` with no owner and an expired lease, so
        the next claim takes it at once. A no-op when ``owner`` does not hold it."""
        ...

    async def reopen(self, key: str, reason: str) -> LedgerRow | None:
        """Reopen a terminal row on purpose (``trace-source reprocess``): state ``reopened``, ``generation`` + 1,
        the old result kept until the new one replaces it. ``None`` when there is no such row; a row that is not
        terminal is returned unchanged."""
        ...

    async def get(self, key: str) -> LedgerRow | None:
        ...

    async def rows(self, *, trace_id: str | None = None, stage: str | None = None,
                   limit: int = 1000) -> list[LedgerRow]:
        """Rows newest first (``updated_at``), optionally of one trace and/or stage."""
        ...

    async def close(self) -> None:
        ...


def default_sqlite_path(state_dir: str | Path) -> Path:
    """The embedded ledger file: ``<state_dir>/ledger.db``."""
    return Path(state_dir) / "ledger.db"


def open_ledger(database_url: str | None, state_dir: str | Path) -> Ledger:
    """A Postgres ledger for a ``postgresql://`` / ``postgres://`` URL, else the SQLite ledger in ``state_dir``.
    Not started yet (call :meth:`Ledger.start`). Raises ``ValueError`` for another URL scheme."""
    if database_url:
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("the database URL must start with postgresql:// (the cluster ledger is Postgres)")
        from pipeline.ledger.postgres import PostgresLedger

        return PostgresLedger(database_url)
    from pipeline.ledger.sqlite import SqliteLedger

    return SqliteLedger(default_sqlite_path(state_dir))


# -- the claim rule, shared by both implementations -------------------------------------------------------------

ClaimDecision = Literal["insert", "take", "finished", "held"]


def decide_claim(row: LedgerRow | None, owner: str, now: float) -> ClaimDecision:
    """What :meth:`Ledger.claim` does with the current ``row``: ``insert`` a new one, ``take`` it over (reopened,
    released, expired, or already ours), report it ``finished`` (terminal) or ``held`` by a live lease."""
    if row is None:
        return "insert"
    if row.state in TERMINAL:
        return "finished"
    if row.state == "reopened" or row.lease_owner in (None, owner):
        return "take"
    if row.lease_expires_at is None or row.lease_expires_at <= now:
        return "take"
    return "held"
