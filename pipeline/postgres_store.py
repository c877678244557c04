"""What the cluster's Postgres stores (the ledger and the journal) share: connecting with clear errors, a small
connection pool, and schema migrations the product applies itself.

Each store is a *component* (``ledger``, ``journal``) with an ordered tuple of migration scripts:
``migrations[i]`` takes the component's tables from version ``i`` to ``i + 1``. :meth:`PostgresStore.start` applies
the missing scripts in one transaction under a transaction-level advisory lock (so many workers starting at once
migrate exactly once and the others wait, then find nothing to do) and records each applied version as a row
``(component, version, applied_at)`` of the table ``schema_migrations``. A database whose recorded version of the
component is higher than this release knows was written by a newer trace-source and is refused.

Errors are the store's own (``LedgerError`` / ``JournalError``), naming the server as ``postgresql://user@host:port/db``
and never the password. Times used for leases come from the server's clock (``now()``), so workers on machines whose
clocks disagree still agree on lease expiry.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import ClassVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

#: Key of the advisory lock every component's migrations run under (one lock: migrations are rare and short).
MIGRATION_LOCK = int.from_bytes(hashlib.sha256(b"trace-source schema_migrations").digest()[:8], "big", signed=True)

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)"""


#: ``scheme://user:password@`` of a URL (the password up to the authority's last ``@``).
_URL_PASSWORD = re.compile(r"^(\w+://[^:/@?#]*):([^/?#]*)@")


def describe_url(database_url: str) -> str:
    """``postgresql://user@host:port/dbname`` of a libpq URL or conninfo string, without the password (missing parts
    as libpq defaults them: ``PGHOST``/``PGPORT``/... or the local socket and 5432)."""
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.Error:  # libpq will refuse it and say why; name it as given, without the password
        return _URL_PASSWORD.sub(r"\1@", database_url)
    env = os.environ
    host = params.get("host") or params.get("hostaddr") or env.get("PGHOST") or "local-socket"
    port = params.get("port") or env.get("PGPORT") or "5432"
    user = params.get("user") or env.get("PGUSER") or ""
    dbname = params.get("dbname") or env.get("PGDATABASE") or user
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{dbname}"


def _password(database_url: str) -> str | None:
    try:
        return conninfo_to_dict(database_url).get("password") or None
    except psycopg.Error:
        found = _URL_PASSWORD.match(database_url)
        return found.group(2) if found and found.group(2) else None


class PostgresStore:
    """Base of :class:`pipeline.ledger.postgres.PostgresLedger` and :class:`pipeline.journal.postgres.PostgresJournal`.

    ``database_url``: a libpq URL (``postgresql://user:pass@host:5432/db``). ``max_connections``: the pool's size
    (each operation holds one connection for one transaction). ``timeout_s``: how long connecting, or waiting for a
    pooled connection, may take before the store's error is raised.
    """

    component: ClassVar[str]
    migrations: ClassVar[tuple[str, ...]]
    error: ClassVar[type[Exception]]

    def __init__(self, database_url: str, *, max_connections: int = 4, timeout_s: float = 10.0) -> None:
        self.database_url = database_url
        self.target = describe_url(database_url)
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._secret = _password(database_url)
        self._pool: AsyncConnectionPool | None = None

    @property
    def schema_version(self) -> int:
        return len(self.migrations)

    def describe(self) -> str:
        return f"postgres {self.component} {self.target}"

    def _message(self, exc: BaseException) -> str:
        """The driver's message on one line, with the password masked should the driver ever echo it."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text.replace(self._secret, "***") if self._secret else text

    async def start(self) -> None:
        """Connect, apply missing migrations, open the pool. Raises :attr:`error` when the server cannot be reached
        (its host, port and the driver's reason) or holds a newer schema. A no-op when already started."""
        if self._pool is not None:
            return
        try:
            conn = await AsyncConnection.connect(self.database_url, autocommit=True,
                                                 connect_timeout=max(1, round(self.timeout_s)))
        except psycopg.Error as exc:
            raise self.error(f"cannot connect to Postgres at {self.target} for the {self.component}: "
                             f"{self._message(exc)}") from None
        try:
            async with conn:
                await self._migrate(conn)
        except psycopg.Error as exc:
            raise self.error(f"cannot migrate the {self.component} schema in {self.target}: "
                             f"{self._message(exc)}") from None
        pool = AsyncConnectionPool(self.database_url, min_size=1, max_size=self.max_connections, open=False,
                                   kwargs={"autocommit": True}, timeout=self.timeout_s,
                                   name=f"trace-source-{self.component}")
        try:
            await pool.open(wait=True, timeout=self.timeout_s)
        except psycopg.Error as exc:
            await pool.close()
            raise self.error(f"cannot connect to Postgres at {self.target} for the {self.component}: "
                             f"{self._message(exc)}") from None
        self._pool = pool

    async def _migrate(self, conn: AsyncConnection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(_MIGRATIONS_TABLE)
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = %s",
                                     (self.component,))
            (version,) = await cur.fetchone()
            if version > self.schema_version:
                raise self.error(
                    f"{self.target} has {self.component} schema version {version}; this trace-source knows up to "
                    f"{self.schema_version} (upgrade trace-source)")
            for number, script in enumerate(self.migrations[version:], version + 1):
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_migrations (component, version) VALUES (%s, %s)",
                                   (self.component, number))

    @asynccontextmanager
    async def connection(self, *, transaction: bool = True) -> AsyncIterator[AsyncConnection]:
        """A pooled connection, inside one transaction (committed when the block ends, rolled back on an
        exception) unless ``transaction=False`` (autocommit: each statement is its own transaction). Driver errors
        (server gone, no pooled connection within ``timeout_s``) become :attr:`error`; callers may retry, since
        every operation of both stores is safe to repeat."""
        pool = self._pool
        if pool is None:
            raise self.error(f"{self.describe()} is not started")
        try:
            async with pool.connection() as conn, (conn.transaction() if transaction else nullcontext()):
                yield conn
        except psycopg.Error as exc:
            raise self.error(f"{self.describe()}: {self._message(exc)}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


def where_equal(**columns: object) -> tuple[str, list[object]]:
    """`` WHERE a = %s AND b = %s`` over the columns whose value is not ``None`` (``""`` when none), and the
    values."""
    given = {name: value for name, value in columns.items() if value is not None}
    sql = " WHERE " + " AND ".join(f"{name} = %s" for name in given) if given else ""
    return sql, list(given.values())


_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def jsonb_safe(json_text: str) -> str:
    """JSON text Postgres accepts as ``jsonb``: its ``\\u0000`` escapes (which ``jsonb`` rejects) become ``\\ufffd``.
    Only for the queryable copy; the exact text is stored beside it."""
    if "\\u0000" not in json_text:  # nearly always: skip the regex scan, which costs per backslash
        return json_text
    return _NUL_ESCAPE.sub(r"\1\\ufffd", json_text)


def text_safe(text: str | None) -> str | None:
    """``text`` without NUL characters (Postgres ``text`` cannot hold them): each becomes U+FFFD."""
    return None if text is None else text.replace("\x00", "\ufffd")
