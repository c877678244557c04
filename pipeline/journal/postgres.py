"""The cluster's journal: table ``journal`` in the ledger's Postgres database, shared by every worker and read by
``trace-source status`` / ``traces``.

One row per event: ``seq`` (``BIGSERIAL``, the append order), ``event_id`` (unique: appends are
``INSERT ... ON CONFLICT (event_id) DO NOTHING``, so appending an outcome again after a crash or a redelivery adds
nothing), the indexed columns ``trace_id``, ``envelope_key``, ``phase``, ``status``, ``at``, ``parent_run_id``, the
event as ``jsonb`` (``event``, for queries) and its exact JSON text (``body``, what :meth:`PostgresJournal.events`
returns, byte for byte what the JSON-lines journal would hold: ``jsonb`` normalizes numbers and cannot hold
``\\u0000``, which its copy turns into U+FFFD).

Concurrent appends of one journal object (the records of a poll batch) are gathered by
:class:`pipeline.coalesce.Coalescer` and written together: the calls' events, each call's contiguous and in its
order, in one ``INSERT ... RETURNING event_id`` (as many calls as fit in :data:`_MAX_ROWS` rows; a call whose event
ids repeat one of an earlier call of the statement starts the next statement), so each call's events are still all
written or none. A statement the database refuses for its data is retried call by call, so one call's bad event
fails only that call.

The schema is created and migrated at :meth:`PostgresJournal.start` (component ``journal`` in ``schema_migrations``,
see :mod:`pipeline.postgres_store`). Every method raises :class:`~pipeline.journal.JournalError` when the database
cannot be used.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
import structlog

from pipeline.coalesce import Coalescer
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
_RETURNING = " RETURNING event_id"


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


def _values(events: list[JournalEvent]) -> list[Any]:
    """The bind parameters of an :func:`_insert_sql` for ``events``, row after row."""
    return [p for e in events for p in _params(e)]


def _statements(calls: list[list[JournalEvent]]) -> list[list[int]]:
    """``calls`` (indexes, in order) packed into statements of at most :data:`_MAX_ROWS` rows in which no event id
    of a call repeats one of an earlier call (so the ids a statement returns tell whose events were new)."""
    statements: list[list[int]] = []
    rows, ids = 0, set()
    for i, events in enumerate(calls):
        mine = {e.event_id for e in events}
        if not statements or rows + len(events) > _MAX_ROWS or not ids.isdisjoint(mine):
            statements.append([])
            rows, ids = 0, set()
        statements[-1].append(i)
        rows += len(events)
        ids |= mine
    return statements


class PostgresJournal(PostgresStore):
    """:class:`pipeline.journal.Journal` over the Postgres database at ``database_url`` (see
    :class:`pipeline.postgres_store.PostgresStore` for the pool and timeouts)."""

    component = "journal"
    migrations = MIGRATIONS
    error = JournalError

    def __init__(self, database_url: str, *, max_connections: int = 4, timeout_s: float = 10.0) -> None:
        super().__init__(database_url, max_connections=max_connections, timeout_s=timeout_s)
        #: Concurrent appends, written together (``appends.batches`` counts the groups, one or more statements).
        self.appends: Coalescer[list[JournalEvent], int | JournalError] = Coalescer(self._append_calls)

    async def append(self, events: list[JournalEvent]) -> int:
        if not events:
            return 0
        if len(events) <= _MAX_ROWS:  # the usual case, a record's few events: written with other calls' events
            added = await self.appends.submit(events)
            if isinstance(added, JournalError):
                raise added
            return added
        # All of the call's new events or none: beyond one statement's bind parameters (65,535), several
        # statements in one transaction.
        chunks = [events[i:i + _MAX_ROWS] for i in range(0, len(events), _MAX_ROWS)]
        async with self.connection(transaction=len(chunks) > 1) as conn:
            added = 0
            for chunk in chunks:
                cur = await conn.execute(_insert_sql(len(chunk)), _values(chunk))
                added += cur.rowcount
            return added

    async def _append_calls(self, calls: list[list[JournalEvent]]) -> list[int | JournalError]:
        """Write the events of ``calls`` (each at most :data:`_MAX_ROWS`); per call how many of its events were new,
        or the error that refused its events alone."""
        added: list[int | JournalError] = [0] * len(calls)
        async with self.connection(transaction=False) as conn:
            for statement in _statements(calls):
                if len(statement) == 1:
                    added[statement[0]] = await self._insert(conn, calls[statement[0]])
                    continue
                events = [e for i in statement for e in calls[i]]
                try:
                    cur = await conn.execute(_insert_sql(len(events)) + _RETURNING,
                                             _values(events))
                except (psycopg.DataError, psycopg.IntegrityError):  # somebody's event: find whose, alone
                    for i in statement:
                        added[i] = await self._insert(conn, calls[i])
                    continue
                new = {row[0] for row in await cur.fetchall()}
                for i in statement:
                    added[i] = len(new.intersection(e.event_id for e in calls[i]))
        return added

    async def _insert(self, conn: Any, events: list[JournalEvent]) -> int | JournalError:
        """One call's events in one statement: how many were new, or the error when its data was refused."""
        try:
            cur = await conn.execute(_insert_sql(len(events)), _values(events))
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            return JournalError(f"{self.describe()}: {self._message(exc)}")
        return cur.rowcount

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
