"""The embedded default's ledger: one SQLite file (WAL mode) under the state dir, ``<state_dir>/ledger.db``.

Every operation is one ``BEGIN IMMEDIATE`` transaction, so claims from several processes on one machine (``serve``
and a ``worker`` or ``reprocess`` against the same state dir) serialize on SQLite's write lock. Calls run
on the event loop's thread behind a lock (they are short: WAL, ``synchronous=NORMAL``); times are this machine's
``time.time()``.

Schema versions live in ``PRAGMA user_version``; :data:`MIGRATIONS` lists the scripts that bring a file from one
version to the next, applied in order at :meth:`SqliteLedger.start`. A file with a newer version is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from pipeline.ledger import (
    TERMINAL, Acquired, ClaimResult, Completion, Finished, Held, LeaseLost, LedgerError, LedgerRow, RowInfo,
    decide_claim, decode_headers, encode_headers)

T = TypeVar("T")

#: Schema scripts; ``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE stage_runs (
        stage_key TEXT PRIMARY KEY,
        stage TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        envelope_key TEXT NOT NULL,
        config_version TEXT NOT NULL,
        state TEXT NOT NULL,
        lease_owner TEXT,
        lease_expires_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        generation INTEGER NOT NULL DEFAULT 0,
        result BLOB,
        result_headers TEXT,
        error TEXT,
        input_topic TEXT NOT NULL DEFAULT '',
        input_partition INTEGER NOT NULL DEFAULT 0,
        input_offset INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        journal BLOB
    );
    CREATE INDEX stage_runs_trace ON stage_runs (trace_id, updated_at);
    CREATE INDEX stage_runs_updated ON stage_runs (updated_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = ("stage_key, stage, trace_id, envelope_key, config_version, state, lease_owner, lease_expires_at, "
            "attempts, generation, result, result_headers, error, input_topic, input_partition, input_offset, "
            "created_at, updated_at, journal")


#: Every column but the large ones, which are read only when a claim finds the row finished.
_LIGHT_COLUMNS = _COLUMNS.replace("result, result_headers,", "NULL, NULL,").replace("journal", "NULL")


def _row(values: tuple | None) -> LedgerRow | None:
    if values is None:
        return None
    v = list(values)
    v[10] = None if v[10] is None else bytes(v[10])
    v[11] = decode_headers(v[11])
    v[18] = None if v[18] is None else bytes(v[18])
    return LedgerRow(*v)


class SqliteLedger:
    """:class:`pipeline.ledger.Ledger` over the SQLite file ``path`` (created with its directory if missing)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"sqlite ledger {self.path}"

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed (kill -9), not a power cut. What a cut
            # can cost is bounded: the journal (fsynced) keeps every outcome, event ids dedupe it, and a ledger row
            # lost with the cut only makes a later replay re-publish instead of skipping. It saves an fsync per
            # claim and per result (the embedded grade stage's throughput was bounded by them).
            conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(conn)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc}") from exc
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{self.path} has ledger schema version {version}; this trace-source knows "
                                  f"up to {SCHEMA_VERSION} (upgrade trace-source)")
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    async def _tx(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        # On the event loop's own thread: with WAL and synchronous=NORMAL a transaction is tens of microseconds,
        # less than handing it to a thread costs. Another process holding the write lock makes it wait (up to the
        # busy timeout); the embedded shape's writers hold it for a transaction at a time.
        return self._tx_sync(fn)

    def _tx_sync(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        conn = self._conn
        if conn is None:
            raise LedgerError(f"the ledger {self.path} is not started")
        with self._lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(conn, self.clock())
                    conn.execute("COMMIT")
                    return out
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger {self.path}: {exc}") from exc

    @staticmethod
    def _get(conn: sqlite3.Connection, key: str) -> LedgerRow | None:
        return _row(conn.execute(f"SELECT {_COLUMNS} FROM stage_runs WHERE stage_key = ?", (key,)).fetchone())

    @staticmethod
    def _get_state(conn: sqlite3.Connection, key: str) -> LedgerRow | None:
        """The row without its result, headers and journal (what a claim that does not find it finished needs)."""
        return _row(conn.execute(f"SELECT {_LIGHT_COLUMNS} FROM stage_runs WHERE stage_key = ?", (key,)).fetchone())

    async def claim(self, key: str, info: RowInfo, owner: str, lease_s: float) -> ClaimResult:
        def fn(conn: sqlite3.Connection, now: float) -> ClaimResult:
            row = self._get_state(conn, key)
            decision = decide_claim(row, owner, now)
            if decision == "finished":
                return Finished(self._get(conn, key))
            if decision == "held":
                return Held(row, row.lease_expires_at or now)
            if decision == "insert":
                conn.execute(
                    "INSERT INTO stage_runs (stage_key, stage, trace_id, envelope_key, config_version, state, "
                    "lease_owner, lease_expires_at, attempts, input_topic, input_partition, input_offset, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'claimed', ?, ?, 1, ?, ?, ?, ?, ?)",
                    (key, info.stage, info.trace_id, info.envelope_key, info.config_version, owner, now + lease_s,
                     info.input_topic, info.input_partition, info.input_offset, now, now))
            else:
                conn.execute("UPDATE stage_runs SET state = 'claimed', lease_owner = ?, lease_expires_at = ?, "
                             "attempts = attempts + 1, updated_at = ? WHERE stage_key = ?",
                             (owner, now + lease_s, now, key))
            return Acquired(self._get_state(conn, key))

        return await self._tx(fn)

    def _owned(self, conn: sqlite3.Connection, key: str, owner: str) -> LedgerRow:
        row = self._get_state(conn, key)
        if row is None or row.state != "claimed" or row.lease_owner != owner:
            holder = "nobody" if row is None else f"{row.lease_owner} ({row.state})"
            raise LeaseLost(f"stage key {key[:12]}… is no longer claimed by {owner}: now {holder}")
        return row

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        def fn(conn: sqlite3.Connection, now: float) -> None:
            self._owned(conn, key, owner)
            conn.execute("UPDATE stage_runs SET lease_expires_at = ?, updated_at = ? WHERE stage_key = ?",
                         (now + lease_s, now, key))

        await self._tx(fn)

    async def complete(self, key: str, owner: str, completion: Completion) -> LedgerRow:
        def fn(conn: sqlite3.Connection, now: float) -> LedgerRow:
            self._owned(conn, key, owner)
            conn.execute("UPDATE stage_runs SET state = ?, result = ?, result_headers = ?, journal = ?, error = NULL, "
                         "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE stage_key = ?",
                         (completion.state, completion.result, encode_headers(completion.result_headers),
                          completion.journal, now, key))
            return self._get(conn, key)

        return await self._tx(fn)

    async def fail(self, key: str, owner: str, error: str) -> LedgerRow:
        def fn(conn: sqlite3.Connection, now: float) -> LedgerRow:
            self._owned(conn, key, owner)
            conn.execute("UPDATE stage_runs SET state = 'failed', error = ?, lease_owner = NULL, "
                         "lease_expires_at = NULL, updated_at = ? WHERE stage_key = ?", (error, now, key))
            return self._get(conn, key)

        return await self._tx(fn)

    async def release(self, key: str, owner: str) -> None:
        def fn(conn: sqlite3.Connection, now: float) -> None:
            conn.execute("UPDATE stage_runs SET lease_owner = NULL, lease_expires_at = ?, updated_at = ? "
                         "WHERE stage_key = ? AND state = 'claimed' AND lease_owner = ?", (now, now, key, owner))

        await self._tx(fn)

    async def reopen(self, key: str, reason: str) -> LedgerRow | None:
        def fn(conn: sqlite3.Connection, now: float) -> LedgerRow | None:
            row = self._get(conn, key)
            if row is None or row.state not in TERMINAL:
                return row
            conn.execute("UPDATE stage_runs SET state = 'reopened', generation = generation + 1, error = ?, "
                         "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE stage_key = ?",
                         (f"reopened: {reason}", now, key))
            return self._get(conn, key)

        return await self._tx(fn)

    async def get(self, key: str) -> LedgerRow | None:
        return await self._tx(lambda conn, now: self._get(conn, key))

    async def rows(self, *, trace_id: str | None = None, stage: str | None = None,
                   limit: int = 1000) -> list[LedgerRow]:
        where: list[str] = []
        params: list = []
        if trace_id is not None:
            where.append("trace_id = ?")
            params.append(trace_id)
        if stage is not None:
            where.append("stage = ?")
            params.append(stage)
        sql = f"SELECT {_COLUMNS} FROM stage_runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, stage_key LIMIT ?"
        return await self._tx(lambda conn, now: [_row(r) for r in conn.execute(sql, (*params, limit)).fetchall()])

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with self._lock:
                conn.close()
