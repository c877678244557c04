"""The source registry and each source's state, shared by the CLI commands (``connect``, ``test``, ``sync``,
``watch``, ``import``, ``status``) and ``autoloop``: ``<state_dir>/sources.db`` (SQLite, WAL mode) in the embedded
shape, or the same tables in the cluster's Postgres database (:class:`PostgresSourceStore`, component ``sources`` of
``schema_migrations``) when a database URL is configured — :func:`open_source_store` picks.

Tables:

* ``sources`` — one row per registered source: name, provider, the provider's configuration (JSON; never a
  credential: those are named by environment variable or secret reference), registration time.
* ``source_state`` — per source: the cursor (JSON, provider-specific), validation (ok / problems, when), last sync
  (time, imported, rejected), totals, the last error and whether the source is *blocked* (the last read failed with a
  connection, credential or schema error).
* ``imported`` — per (source, trace id): the last envelope's idempotency key and version, so a trace read again
  with the same content is skipped and one read with new content becomes version N+1.
* ``rejected`` — per (source, item): why an item (a row, a file, an API trace) could not be imported.

Every write is one short transaction; a reader in another process (``status``) sees committed state only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FILENAME = "sources.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    name TEXT PRIMARY KEY, provider TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS source_state (
    name TEXT PRIMARY KEY, cursor TEXT, validated_at TEXT, validation_ok INTEGER, problems TEXT,
    last_sync_at TEXT, last_imported INTEGER NOT NULL DEFAULT 0, last_rejected INTEGER NOT NULL DEFAULT 0,
    imported_total INTEGER NOT NULL DEFAULT 0, rejected_total INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    blocked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS imported (
    source TEXT NOT NULL, trace_id TEXT NOT NULL, idempotency_key TEXT NOT NULL, version INTEGER NOT NULL,
    imported_at TEXT NOT NULL, PRIMARY KEY (source, trace_id));
CREATE TABLE IF NOT EXISTS rejected (
    source TEXT NOT NULL, item TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (source, item));
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SourceNotFound(LookupError):
    """No source registered under that name."""


@dataclass
class SourceRecord:
    """A registered source and its state (see the module docstring)."""

    name: str
    provider: str
    config: dict[str, Any]
    created_at: str
    cursor: Any = None
    validated_at: str | None = None
    validation_ok: bool | None = None
    problems: list[str] = field(default_factory=list)
    last_sync_at: str | None = None
    last_imported: int = 0
    last_rejected: int = 0
    imported_total: int = 0
    rejected_total: int = 0
    last_error: str | None = None
    blocked: bool = False

    @property
    def validation(self) -> str:
        """``valid``, ``invalid`` or ``untested``."""
        return "untested" if self.validation_ok is None else "valid" if self.validation_ok else "invalid"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "provider": self.provider, "config": self.config, "created_at": self.created_at,
                "validation": self.validation, "validated_at": self.validated_at, "problems": self.problems,
                "cursor": self.cursor, "last_sync_at": self.last_sync_at, "last_imported": self.last_imported,
                "last_rejected": self.last_rejected, "imported_total": self.imported_total,
                "rejected_total": self.rejected_total, "last_error": self.last_error,
                "status": "blocked" if self.blocked else "ok"}


class SourceStore:
    """``<state_dir>/sources.db``. ``create=False`` raises ``FileNotFoundError`` when there is none (readers such
    as ``status`` never create it). Thread-safe (one call at a time)."""

    def __init__(self, state_dir: str | Path, *, create: bool = True) -> None:
        self.path = Path(state_dir) / FILENAME
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no source registry at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _exec(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- registry ----------------------------------------------------------------------------------------------------

    def register(self, name: str, provider: str, config: dict[str, Any]) -> bool:
        """Register (or re-register with a new configuration, keeping the state) ``name``; True when new."""
        existed = bool(self._exec("SELECT 1 FROM sources WHERE name = ?", (name,)))
        # The state row first: a source is never visible without one to count into.
        self._exec("INSERT INTO source_state (name) VALUES (?) ON CONFLICT (name) DO NOTHING", (name,))
        self._exec("INSERT INTO sources (name, provider, config, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (name) "
                   "DO UPDATE SET provider = excluded.provider, config = excluded.config",
                   (name, provider, json.dumps(config, sort_keys=True), utc_now()))
        if existed:  # a changed configuration must be tested again
            self._exec("UPDATE source_state SET validation_ok = NULL, problems = NULL, validated_at = NULL "
                       "WHERE name = ?", (name,))
        return not existed

    def get(self, name: str) -> SourceRecord:
        """Raises :class:`SourceNotFound` (naming the registered sources)."""
        rows = self._exec(_SELECT + " WHERE s.name = ?", (name,))
        if not rows:
            known = [r.name for r in self.list()]
            raise SourceNotFound(f"no source named {name!r} is registered"
                                 + (f" (registered: {', '.join(known)})" if known else
                                    " (register one with `trace-source connect <provider> --name NAME`)"))
        return _record(rows[0])

    def list(self) -> list[SourceRecord]:
        return [_record(r) for r in self._exec(_SELECT + " ORDER BY s.name")]

    # -- state -------------------------------------------------------------------------------------------------------

    def set_validation(self, name: str, ok: bool, problems: list[str]) -> None:
        self._exec("UPDATE source_state SET validation_ok = ?, problems = ?, validated_at = ? WHERE name = ?",
                   (int(ok), json.dumps(problems), utc_now(), name))

    def set_cursor(self, name: str, cursor: Any) -> None:
        self._exec("UPDATE source_state SET cursor = ? WHERE name = ?", (json.dumps(cursor), name))

    def record_sync(self, name: str, *, imported: int, rejected: int, error: str | None) -> None:
        """The end of a sync: counts, and ``error`` (the source could not be read: it is *blocked*) or none."""
        self._exec("UPDATE source_state SET last_sync_at = ?, last_imported = ?, last_rejected = ?, "
                   "imported_total = imported_total + ?, rejected_total = rejected_total + ?, last_error = ?, "
                   "blocked = ? WHERE name = ?",
                   (utc_now(), imported, rejected, imported, rejected, error, int(error is not None), name))

    # -- imported traces ---------------------------------------------------------------------------------------------

    def prior(self, source: str, trace_id: str) -> tuple[str, int] | None:
        """``(idempotency key, version)`` of the last envelope imported for the trace, or None."""
        rows = self._exec("SELECT idempotency_key, version FROM imported WHERE source = ? AND trace_id = ?",
                          (source, trace_id))
        return (rows[0][0], rows[0][1]) if rows else None

    def record_import(self, source: str, trace_id: str, key: str, version: int) -> None:
        self._exec("INSERT INTO imported (source, trace_id, idempotency_key, version, imported_at) VALUES "
                   "(?, ?, ?, ?, ?) ON CONFLICT (source, trace_id) DO UPDATE SET idempotency_key = "
                   "excluded.idempotency_key, version = excluded.version, imported_at = excluded.imported_at "
                   "WHERE excluded.version >= imported.version", (source, trace_id, key, version, utc_now()))

    def record_rejected(self, source: str, item: str, kind: str, reason: str) -> None:
        self._exec("INSERT INTO rejected (source, item, kind, reason, at) VALUES (?, ?, ?, ?, ?) ON CONFLICT "
                   "(source, item) DO UPDATE SET kind = excluded.kind, reason = excluded.reason, at = excluded.at",
                   (source, item, kind, reason[:2000], utc_now()))

    def rejected(self, source: str) -> list[dict[str, str]]:
        return [{"item": r[0], "kind": r[1], "reason": r[2], "at": r[3]} for r in self._exec(
            "SELECT item, kind, reason, at FROM rejected WHERE source = ? ORDER BY at", (source,))]


_SELECT = ("SELECT s.name, s.provider, s.config, s.created_at, st.cursor, st.validated_at, st.validation_ok, "
           "st.problems, st.last_sync_at, st.last_imported, st.last_rejected, st.imported_total, st.rejected_total, "
           "st.last_error, st.blocked FROM sources s LEFT JOIN source_state st ON st.name = s.name")


def _record(r: tuple) -> SourceRecord:
    return SourceRecord(name=r[0], provider=r[1], config=json.loads(r[2]), created_at=r[3],
                        cursor=json.loads(r[4]) if r[4] else None, validated_at=r[5],
                        validation_ok=None if r[6] is None else bool(r[6]), problems=json.loads(r[7]) if r[7] else [],
                        last_sync_at=r[8], last_imported=r[9] or 0, last_rejected=r[10] or 0,
                        imported_total=r[11] or 0, rejected_total=r[12] or 0, last_error=r[13], blocked=bool(r[14]))


class PostgresSourceStore(SourceStore):
    """The registry in the cluster's Postgres database (tables ``sources``, ``source_state``, ``imported``,
    ``rejected``), so every worker and operator sees the same sources and cursors. The schema is created once under
    the shared migration lock and recorded as component ``sources`` in ``schema_migrations``. Raises
    :class:`SourceStoreError` (host and reason, never the password) when the database cannot be used."""

    component = "sources"

    def __init__(self, database_url: str) -> None:
        import psycopg

        from pipeline.postgres_store import _MIGRATIONS_TABLE, MIGRATION_LOCK, describe_url

        self.path = describe_url(database_url)
        self._lock = threading.Lock()
        try:
            self._conn = psycopg.connect(database_url, autocommit=True, connect_timeout=10)
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                self._conn.execute(_MIGRATIONS_TABLE)
                (version,) = self._conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations WHERE "
                                                "component = %s", (self.component,)).fetchone()
                if version > 1:
                    raise SourceStoreError(f"{self.path} has sources schema version {version}; this trace-source "
                                           "knows 1 (upgrade trace-source)")
                if version == 0:
                    self._conn.execute(_SCHEMA)  # portable SQL: TEXT and INTEGER columns
                    self._conn.execute("INSERT INTO schema_migrations (component, version) VALUES (%s, 1)",
                                       (self.component,))
        except psycopg.Error as exc:
            raise SourceStoreError(f"cannot use the source registry in Postgres at {self.path}: "
                                   f"{' '.join(str(exc).split())}") from None

    def _exec(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        try:
            with self._lock:
                cur = self._conn.execute(sql.replace("?", "%s"), params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise SourceStoreError(f"source registry in Postgres at {self.path}: {' '.join(str(exc).split())}") \
                from None


class SourceStoreError(Exception):
    """The registry's database cannot be used."""


def open_source_store(state_dir: str | Path, database_url: str | None = None, *, create: bool = True) -> SourceStore:
    """The Postgres registry for a database URL, else ``<state_dir>/sources.db``."""
    if database_url:
        return PostgresSourceStore(database_url)
    return SourceStore(state_dir, create=create)
