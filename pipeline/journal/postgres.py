"""The cluster's journal: table ``journal`` in the ledger's Postgres database, shared by every worker and read by
``trace-source status`` / ``traces``.

One row per event: ``seq`` (``BIGSERIAL``, the append order), ``event_id`` (unique: appends are
``INSERT ... ON CONFLICT (event_id) DO NOTHING``, so appending an outcome again after a crash or a redelivery adds
nothing), the indexed columns ``trace_id``, ``envelope_key``, ``phase``, ``status``, ``at``, ``parent_run_id``, the
event as ``jsonb`` (``event``, for queries) and its exact JSON text (``body``, what :meth:`PostgresJournal.events`
returns, byte for byte what the JSON-lines journal would hold: ``jsonb`` normalizes numbers and cannot hold
``\\u0000``, which its copy turns into U+FFFD).

The schema is created and migrated at :meth:`PostgresJournal.start` (component ``journal`` in ``schema_migrations``,
see :mod:`pipeline.postgres_store`). Every method raises :class:`~pipeline.journal.JournalError` when the database
cannot be used.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog

from pipeline.journal import JournalError, JournalEvent
from pipeline.postgres_store import PostgresStore, jsonb_safe, where_equal

#: Schema scripts; ``MIGRATIONS[i]`` takes the journal from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE journal (
        seq BIGSERIAL PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        trace_id TEXT NOT NULL,
        envelope_key TEXT NOT NULL,
        phase TEXT NOT NULL,
        status TEXT NOT NULL,
        at TIMESTAMPTZ,
        parent_run_id TEXT,
        event JSONB NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX journal_trace ON journal (trace_id, seq);
    CREATE INDEX journal_phase_status ON journal (phase, status);
    CREATE INDEX journal_at ON journal (at);
    CREATE INDEX journal_parent_run ON journal (parent_run_id, seq) WHERE parent_run_id IS NOT NULL;
    """,
)

log = structlog.get_logger(__name__)

_INSERT = ("INSERT INTO journal (event_id, trace_id, envelope_key, phase, status, at, parent_run_id, event, body) "
           "VALUES ")
_ROW = "(%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
_ON_CONFLICT = " ON CONFLICT (event_id) DO NOTHING"
_MAX_ROWS = 1000  # events per INSERT: 9,000 bind parameters, well under Postgres's 65,535


def _insert_sql(rows: int) -> str:
    """One ``INSERT`` of ``rows`` events: a single statement is atomic on its own (no ``BEGIN``/``COMMIT`` round
    trips), and Postgres inserts a ``VALUES`` list in its order, so ``seq`` follows the call's order."""
    return _INSERT + ", ".join([_ROW] * rows) + _ON_CONFLICT


def _at(text: str) -> datetime | None:
    """The event's ``at`` for the indexed column; ``None`` when it is not ISO 8601 (the body keeps it as written)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _params(event: JournalEvent) -> tuple[Any, ...]:
    body = event.model_dump_json()
    return (event.event_id, event.trace_id, event.envelope_key, event.phase, event.status, _at(event.at),
            event.run.parent_run_id, jsonb_safe(body), body)


class PostgresJournal(PostgresStore):
    """:class:`pipeline.journal.Journal` over the Postgres database at ``database_url`` (see
    :class:`pipeline.postgres_store.PostgresStore` for the pool and timeouts)."""

    component = "journal"
    migrations = MIGRATIONS
    error = JournalError

    async def append(self, events: list[JournalEvent]) -> int:
        if not events:
            return 0
        # All of the call's new events or none: one statement (the usual case: a record's few events), or for a
        # call beyond one statement's bind parameters (65,535) several in one transaction.
        chunks = [events[i:i + _MAX_ROWS] for i in range(0, len(events), _MAX_ROWS)]
        async with self.connection(transaction=len(chunks) > 1) as conn:
            added = 0
            for chunk in chunks:
                cur = await conn.execute(_insert_sql(len(chunk)), [p for e in chunk for p in _params(e)])
                added += cur.rowcount
            return added

    async def events(self, *, trace_id: str | None = None, limit: int | None = None,
                     parent_run_id: str | None = None) -> list[JournalEvent]:
        where_sql, params = where_equal(trace_id=trace_id, parent_run_id=parent_run_id)
        if limit:  # the newest ``limit``, returned oldest first
            sql = (f"SELECT seq, body FROM (SELECT seq, body FROM journal{where_sql} ORDER BY seq DESC LIMIT %s) "
                   "AS newest ORDER BY seq")
            params.append(limit)
        else:
            sql = f"SELECT seq, body FROM journal{where_sql} ORDER BY seq"
        async with self.connection(transaction=False) as conn:
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
        out = []
        for seq, body in rows:
            try:
                out.append(JournalEvent.model_validate_json(body))
            except ValueError as exc:  # as the JSON-lines journal does with a line it cannot read
                log.warning("journal.bad_row", journal=self.target, seq=seq, error=str(exc)[:200])
        return out
