"""The cluster's ledger: table ``stage_runs`` in Postgres (psycopg 3, async), shared by every worker of every stage.

Same behaviour as :class:`pipeline.ledger.sqlite.SqliteLedger`, made safe for many workers on many machines:

* **claim** first tries ``INSERT ... ON CONFLICT (stage_key) DO NOTHING`` (a new key: one statement, the row is
  ours), then reads the row (terminal: :class:`~pipeline.ledger.Finished`, the redelivery case, without a lock).
  Otherwise one transaction locks it with ``SELECT ... FOR UPDATE``, applies the shared rule
  :func:`pipeline.ledger.decide_claim` and updates it; concurrent claimers of one key queue on the row lock, so
  exactly one of them acquires it.
* **renew / complete / fail / release** are single ``UPDATE ... WHERE state = 'claimed' AND lease_owner = %s``
  statements (fencing: a worker that lost its lease matches no row and gets :class:`~pipeline.ledger.LeaseLost`).
* **Coalescing.** Concurrent claims and completions of one ledger object (the records of a poll batch) are gathered
  by :class:`pipeline.coalesce.Coalescer` into one statement per group of up to :data:`MAX_GROUP` keys: one
  ``INSERT ... SELECT ... FROM unnest(...) ON CONFLICT DO NOTHING RETURNING`` for the claims (keys in sorted order,
  so two workers inserting overlapping groups take the keys' index entries in the same order and cannot deadlock),
  one ``UPDATE ... FROM unnest(...) WHERE <owned>`` for the completions. A key the statement did not return takes
  the single-key path on its own, exactly as above (the row read, the locked transaction; the read naming the
  holder for :class:`~pipeline.ledger.LeaseLost`). One key appears at most once per group; a failed statement
  raises :class:`~pipeline.ledger.LedgerError` to every caller of its group. Arrays rather than a ``VALUES`` list
  keep one statement text for every group size, so each connection parses and plans it once.
* Times are the **server's** ``now()`` (lease expiry ``now() + lease``), stored as ``timestamptz`` and read back as
  unix seconds, so workers whose clocks disagree still agree on when a lease has expired.

The schema is created and migrated at :meth:`PostgresLedger.start` (component ``ledger`` in ``schema_migrations``,
see :mod:`pipeline.postgres_store`). Every method raises :class:`~pipeline.ledger.LedgerError` when the database
cannot be used.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from pipeline.coalesce import Coalescer
from pipeline.ledger import (
    TERMINAL, Acquired, ClaimResult, Completion, Finished, Held, LeaseLost, LedgerError, LedgerRow, RowInfo, decide_claim,
    decode_headers, encode_headers)
from pipeline.postgres_store import PostgresStore, text_safe, where_equal

#: Schema scripts; ``MIGRATIONS[i]`` takes the ledger from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE stage_runs (
        stage_key TEXT PRIMARY KEY,
        stage TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        envelope_key TEXT NOT NULL,
        config_version TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('claimed', 'done', 'blocked', 'failed', 'reopened')),
        lease_owner TEXT,
        lease_expires_at TIMESTAMPTZ,
        attempts INTEGER NOT NULL DEFAULT 0,
        generation INTEGER NOT NULL DEFAULT 0,
        result BYTEA,
        result_headers TEXT,
        error TEXT,
        input_topic TEXT NOT NULL DEFAULT '',
        input_partition INTEGER NOT NULL DEFAULT 0,
        input_offset BIGINT NOT NULL DEFAULT 0,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        journal BYTEA
    );
    CREATE INDEX stage_runs_trace ON stage_runs (trace_id, updated_at);
    CREATE INDEX stage_runs_stage ON stage_runs (stage, updated_at);
    CREATE INDEX stage_runs_updated ON stage_runs (updated_at);
    """,
)

#: The columns of :class:`LedgerRow`, in order; times as unix seconds.
_COLUMNS = ("stage_key, stage, trace_id, envelope_key, config_version, state, lease_owner, "
            "extract(epoch FROM lease_expires_at)::float8, attempts, generation, result, result_headers, error, "
            "input_topic, input_partition, input_offset, extract(epoch FROM created_at)::float8, "
            "extract(epoch FROM updated_at)::float8, journal")

_LEASE = "now() + make_interval(secs => %s::float8)"
_OWNED = "stage_key = %s AND state = 'claimed' AND lease_owner = %s"

#: Most keys one coalesced claim or completion statement carries (10 and 6 array elements per key).
MAX_GROUP = 500

#: Claims of many keys (one array per column, keys sorted): the new keys' rows come back, in any order.
_CLAIM_MANY = (
    "INSERT INTO stage_runs (stage_key, stage, trace_id, envelope_key, config_version, state, lease_owner, "
    "lease_expires_at, attempts, input_topic, input_partition, input_offset, created_at, updated_at) "
    "SELECT k, st, tr, ek, cv, 'claimed', o, now() + make_interval(secs => l), 1, it, ip, io, now(), now() "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::text[], "
    "%s::int4[], %s::int8[]) AS v(k, st, tr, ek, cv, o, l, it, ip, io) "
    f"ON CONFLICT (stage_key) DO NOTHING RETURNING {_COLUMNS}")

#: Completions of many keys, each only if its owner still holds the claim: the completed rows come back.
_COMPLETE_MANY = (
    "UPDATE stage_runs SET state = v.st, result = v.res, result_headers = v.hdr, journal = v.jr, error = NULL, "
    "lease_owner = NULL, lease_expires_at = NULL, updated_at = now() "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::bytea[], %s::text[], %s::bytea[]) "
    "AS v(k, o, st, res, hdr, jr) "
    f"WHERE stage_key = v.k AND state = 'claimed' AND lease_owner = v.o RETURNING {_COLUMNS}")


def _row(values: Any) -> LedgerRow | None:
    if values is None:
        return None
    return LedgerRow(*values[:11], decode_headers(values[11]), *values[12:])


def _key(item: tuple) -> str:
    return item[0]


_ClaimItem = tuple[str, RowInfo, str, float]  # key, info, owner, lease_s
_CompleteItem = tuple[str, str, Completion]  # key, owner, completion


class PostgresLedger(PostgresStore):
    """:class:`pipeline.ledger.Ledger` over the Postgres database at ``database_url`` (see
    :class:`pipeline.postgres_store.PostgresStore` for the pool and timeouts)."""

    component = "ledger"
    migrations = MIGRATIONS
    error = LedgerError

    def __init__(self, database_url: str, *, max_connections: int = 4, timeout_s: float = 10.0) -> None:
        super().__init__(database_url, max_connections=max_connections, timeout_s=timeout_s)
        #: Concurrent claims' inserts, one statement per group (``claims.batches`` counts the statements).
        self.claims: Coalescer[_ClaimItem, LedgerRow | None] = Coalescer(
            self._insert_claims, max_batch=MAX_GROUP, key=_key)
        #: Concurrent completions, one statement per group (``completions.batches`` counts the statements).
        self.completions: Coalescer[_CompleteItem, LedgerRow | None] = Coalescer(
            self._complete_owned, max_batch=MAX_GROUP, key=_key)

    @staticmethod
    async def _get(conn: AsyncConnection, key: str) -> LedgerRow | None:
        cur = await conn.execute(f"SELECT {_COLUMNS} FROM stage_runs WHERE stage_key = %s", (key,))
        return _row(await cur.fetchone())

    async def _insert_claims(self, items: list[_ClaimItem]) -> list[LedgerRow | None]:
        """Insert a row for each new key of ``items`` (one statement): per item its new row, or ``None`` when the key
        exists already (then the item's claim continues on its own)."""
        ordered = sorted(items, key=_key)  # one order for every worker: overlapping groups cannot deadlock
        columns = [list(c) for c in zip(*(
            (key, info.stage, info.trace_id, info.envelope_key, info.config_version, owner, float(lease_s),
             info.input_topic, info.input_partition, info.input_offset) for key, info, owner, lease_s in ordered))]
        async with self.connection(transaction=False) as conn:
            cur = await conn.execute(_CLAIM_MANY, columns)
            inserted = {row.stage_key: row for row in map(_row, await cur.fetchall())}
        return [inserted.get(item[0]) for item in items]

    async def claim(self, key: str, info: RowInfo, owner: str, lease_s: float) -> ClaimResult:
        if (inserted := await self.claims.submit((key, info, owner, lease_s))) is not None:
            return Acquired(inserted)
        # A terminal row stays terminal until a reprocess reopens it, so a redelivery (the common case here)
        # needs neither a lock nor a transaction.
        if (row := await self.get(key)) is not None and row.state in TERMINAL:
            return Finished(row)
        async with self.connection() as conn:
            # now() is the transaction's start, the same in every statement of it; taken before any wait for the
            # row lock, so it can only be early: that delays a take-over, never allows one too soon.
            cur = await conn.execute(f"SELECT {_COLUMNS}, extract(epoch FROM now())::float8 FROM stage_runs "
                                     "WHERE stage_key = %s FOR UPDATE", (key,))
            values = await cur.fetchone()
            row, now = (None, 0.0) if values is None else (_row(values[:-1]), values[-1])
            decision = decide_claim(row, owner, now)
            if decision == "finished":
                return Finished(row)
            if decision == "held":
                return Held(row, row.lease_expires_at or now)
            if decision == "insert":  # only if rows were ever deleted by hand; the next claim inserts it
                raise LedgerError(f"stage key {key[:12]}… vanished from {self.target} during a claim")
            cur = await conn.execute(
                f"UPDATE stage_runs SET state = 'claimed', lease_owner = %s, lease_expires_at = {_LEASE}, "
                f"attempts = attempts + 1, updated_at = now() WHERE stage_key = %s RETURNING {_COLUMNS}",
                (owner, lease_s, key))
            return Acquired(_row(await cur.fetchone()))

    async def _owned_update(self, key: str, owner: str, assignments: str, params: tuple) -> LedgerRow:
        """``UPDATE`` the row if ``owner`` holds its claim; else raise :class:`LeaseLost` naming the holder."""
        async with self.connection(transaction=False) as conn:
            cur = await conn.execute(f"UPDATE stage_runs SET {assignments}, updated_at = now() WHERE {_OWNED} "
                                     f"RETURNING {_COLUMNS}", (*params, key, owner))
            if (row := _row(await cur.fetchone())) is not None:
                return row
            current = await self._get(conn, key)
        raise _lease_lost(key, owner, current)

    async def _complete_owned(self, items: list[_CompleteItem]) -> list[LedgerRow | None]:
        """Complete each item's row if its owner holds the claim (one statement): per item the completed row, or
        ``None`` (then the item's caller finds out who holds it)."""
        columns = [list(c) for c in zip(*(
            (key, owner, c.state, c.result, encode_headers(c.result_headers), c.journal)
            for key, owner, c in sorted(items, key=_key)))]
        async with self.connection(transaction=False) as conn:
            cur = await conn.execute(_COMPLETE_MANY, columns)
            completed = {row.stage_key: row for row in map(_row, await cur.fetchall())}
        return [completed.get(item[0]) for item in items]

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        await self._owned_update(key, owner, f"lease_expires_at = {_LEASE}", (lease_s,))

    async def complete(self, key: str, owner: str, completion: Completion) -> LedgerRow:
        if (row := await self.completions.submit((key, owner, completion))) is not None:
            return row
        raise _lease_lost(key, owner, await self.get(key))

    async def fail(self, key: str, owner: str, error: str) -> LedgerRow:
        return await self._owned_update(
            key, owner, "state = 'failed', error = %s, lease_owner = NULL, lease_expires_at = NULL",
            (text_safe(error),))

    async def release(self, key: str, owner: str) -> None:
        async with self.connection(transaction=False) as conn:
            await conn.execute("UPDATE stage_runs SET lease_owner = NULL, lease_expires_at = now(), "
                               f"updated_at = now() WHERE {_OWNED}", (key, owner))

    async def reopen(self, key: str, reason: str) -> LedgerRow | None:
        async with self.connection(transaction=False) as conn:
            cur = await conn.execute(
                "UPDATE stage_runs SET state = 'reopened', generation = generation + 1, error = %s, "
                "lease_owner = NULL, lease_expires_at = NULL, updated_at = now() "
                f"WHERE stage_key = %s AND state IN ('done', 'blocked', 'failed') RETURNING {_COLUMNS}",
                (text_safe(f"reopened: {reason}"), key))
            if (row := _row(await cur.fetchone())) is not None:
                return row
            return await self._get(conn, key)  # none, or not terminal: unchanged

    async def get(self, key: str) -> LedgerRow | None:
        async with self.connection(transaction=False) as conn:
            return await self._get(conn, key)

    async def rows(self, *, trace_id: str | None = None, stage: str | None = None,
                   limit: int = 1000) -> list[LedgerRow]:
        where, params = where_equal(trace_id=trace_id, stage=stage)
        sql = f"SELECT {_COLUMNS} FROM stage_runs{where} ORDER BY updated_at DESC, stage_key LIMIT %s"
        async with self.connection(transaction=False) as conn:
            cur = await conn.execute(sql, (*params, limit))
            return [_row(r) for r in await cur.fetchall()]


def _lease_lost(key: str, owner: str, current: LedgerRow | None) -> LeaseLost:
    holder = "nobody" if current is None else f"{current.lease_owner} ({current.state})"
    return LeaseLost(f"stage key {key[:12]}… is no longer claimed by {owner}: now {holder}")
