"""The embedded default's durable log: per-trace batches committed to SQLite (WAL mode) under the state dir.

Used when no Kafka broker is configured. One table holds the records in commit order; the ``offset`` column is
an ``INTEGER PRIMARY KEY AUTOINCREMENT``, so offsets grow monotonically and are never reused, and because a
single writer thread commits them in offset order, a reader that has seen offset ``n`` has seen every committed
offset below ``n``. A second tiny table keeps consumer-group offsets for the pipeline's local bus.

Write path: :class:`LocalLogSink` owns one dedicated writer thread and one SQLite connection. ``write()`` queues
its rows and awaits a future; the writer drains *everything* queued, inserts it in one transaction, commits once
(one fsync with ``fsync=True``) and then resolves every waiting future (group commit). Throughput with fsync
therefore grows with concurrency instead of being capped at one fsync per request.

Read path: :class:`LocalLogReader` is synchronous and may run in another process (``trace-source tail``) while
``serve`` is writing; WAL mode lets readers and the writer proceed concurrently.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import structlog

from sinks.base import SPANS_TOPIC, VALUE_CONTENT_TYPE, Batch, SinkUnavailable

log = structlog.get_logger(__name__)

DEFAULT_STATE_DIR = ".trace-source"
#: File name of the log inside the state dir.
LOG_FILENAME = "spans.db"
#: ``PRAGMA user_version`` of the schema below; a file with a higher version was written by a newer release.
#: Version 2 added ``records.headers`` (the pipeline's stage topics carry arbitrary Kafka-style headers); version 3
#: the ``idempotency_keys`` table (:meth:`LocalLogAppender.append_once`).
SCHEMA_VERSION = 3

# How long a connection waits for another connection's write lock (the sink's writer vs. a reader committing a
# group offset) before failing with "database is locked".
_BUSY_TIMEOUT_S = 5.0

# "offset" is an SQL keyword (LIMIT ... OFFSET), hence always quoted.
_SCHEMA = """
CREATE TABLE records (
    "offset" INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key TEXT,
    value BLOB NOT NULL,
    signal TEXT NOT NULL,
    source_id TEXT NOT NULL,
    received_at_ns INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    transport TEXT NOT NULL,
    headers TEXT
);
CREATE TABLE group_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic)
) WITHOUT ROWID;
CREATE TABLE idempotency_keys (
    topic TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (topic, idempotency_key)
) WITHOUT ROWID;
"""

_INSERT = (
    "INSERT INTO records (topic, key, value, signal, source_id, received_at_ns, content_type, transport)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    'SELECT "offset", topic, key, value, signal, source_id, received_at_ns, content_type, transport, headers'
    ' FROM records'
)
_APPEND = ("INSERT INTO records (topic, key, value, signal, source_id, received_at_ns, content_type, transport,"
           " headers) VALUES (?, ?, ?, '', ?, ?, ?, '', ?)")
#: Upgrades from the version in the key to the next one.
_MIGRATIONS = {
    1: "ALTER TABLE records ADD COLUMN headers TEXT",
    2: 'CREATE TABLE idempotency_keys (topic TEXT NOT NULL, idempotency_key TEXT NOT NULL, "offset" INTEGER NOT NULL,'
       ' result TEXT NOT NULL, PRIMARY KEY (topic, idempotency_key)) WITHOUT ROWID',
}


def _connect(path: Path, *, create: bool, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with the schema in place.

    ``create=False`` refuses to create a missing file (a reader pointed at the wrong state dir should fail, not
    leave an empty database behind). Raises ``sqlite3.Error`` (``OperationalError`` "unable to open database file"
    for a missing file or directory).
    """
    mode = "rwc" if create else "rw"
    conn = sqlite3.connect(
        f"file:{quote(str(path))}?mode={mode}",
        uri=True,
        timeout=_BUSY_TIMEOUT_S,
        isolation_level=None,  # autocommit; transactions are explicit so no read snapshot is held open
        check_same_thread=check_same_thread,
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        _ensure_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"{path} has schema version {version}; this trace-source only knows version {SCHEMA_VERSION}"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-check under the write lock: the sink and a reader may both be creating or upgrading the file.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        else:
            for v in range(version, SCHEMA_VERSION):
                conn.execute(_MIGRATIONS[v])
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # keep the original error
                conn.execute("ROLLBACK")
        raise


def encode_headers(headers) -> str:
    """Headers as stored outside Kafka (this log's ``headers`` column, the ledger): JSON
    ``[[name, base64 value], ...]`` of ``(name, value bytes)`` pairs, order and repeats kept."""
    return json.dumps([[k, base64.b64encode(v).decode()] for k, v in headers])


def decode_headers(text: str | None) -> tuple[tuple[str, bytes], ...]:
    """Inverse of :func:`encode_headers` (``None`` or ``""`` -> ``()``). Raises ``ValueError`` for other text."""
    if not text:
        return ()
    return tuple((k, base64.b64decode(v)) for k, v in json.loads(text))


@dataclass(frozen=True, slots=True)
class LocalRecord:
    """One committed record of the local log.

    ``offset``: position in the log (> 0, strictly increasing in commit order). ``key``: trace id as 32 lowercase
    hex characters (``str``), or ``None``. ``value``: the OTLP protobuf bytes. ``received_at_ns``: unix time in
    nanoseconds when the export request arrived. ``content_type``: media type of ``value``. ``transport``: how it
    arrived (``otlp-http`` | ``otlp-grpc``). ``headers``: ``None`` for span/log batches from the receiver (their
    headers are the columns above); for records the pipeline publishes (envelopes, stage results), every header as
    JSON ``[[name, base64 value], ...]``.
    """

    offset: int
    topic: str
    key: str | None
    value: bytes
    signal: str
    source_id: str
    received_at_ns: int
    content_type: str
    transport: str
    headers: str | None = None


class _Write:
    """One queued ``write()``: its rows, their size for the queue bound, and the caller's future."""

    __slots__ = ("future", "nbytes", "rows")

    def __init__(self, rows: list[tuple], nbytes: int, future: asyncio.Future[None]) -> None:
        self.rows = rows
        self.nbytes = nbytes
        self.future = future


class LocalLogSink:
    """:class:`sinks.base.Sink` over a SQLite file in WAL mode, ``<state_dir>/spans.db``.

    ``fsync=True`` uses ``PRAGMA synchronous=FULL``: a returned ``write()`` survives power loss. ``fsync=False``
    uses ``NORMAL``: the commit reaches the OS but is not fsynced, which still survives ``kill -9`` of the process
    but not a machine crash.

    ``max_queued_bytes`` bounds the record bytes accepted but not yet committed; past it ``write()`` raises
    :class:`SinkUnavailable` at once (a single batch larger than the bound is still accepted when nothing else is
    queued, otherwise it could never be written). ``max_db_bytes`` optionally caps the file size (SQLite
    ``max_page_count``); when full, writes fail with :class:`SinkUnavailable` like on a full disk.
    """

    name = "local-log"

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        *,
        topic: str = SPANS_TOPIC,
        fsync: bool = True,
        max_queued_bytes: int = 64 * 1024 * 1024,
        max_db_bytes: int | None = None,
    ) -> None:
        self.path = Path(state_dir) / LOG_FILENAME
        self.topic = topic
        self.fsync = fsync
        self.max_queued_bytes = max_queued_bytes
        self.max_db_bytes = max_db_bytes
        #: Number of transactions committed so far (each may hold many ``write()`` calls).
        self.commits = 0
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()  # None asks the writer to stop
        self._queued_bytes = 0  # only touched on the event loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        # Message of the last failed commit, cleared by the next successful one (written by the writer thread,
        # read by the loop; a plain attribute swap is atomic under the GIL).
        self._error: str | None = None

    @property
    def queued_bytes(self) -> int:
        """Record value bytes accepted by ``write()`` and not yet committed (or failed)."""
        return self._queued_bytes

    async def start(self) -> None:
        """Create the state dir and the database if needed, and start the writer thread.

        Raises :class:`SinkUnavailable` if the file cannot be opened or created (permissions, bad path, a file
        written by a newer schema version).
        """
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkUnavailable(f"cannot create the state dir for the local log {self.path}: {exc}") from exc
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name="local-log-writer", daemon=True)
        self._thread.start()
        await opened
        self._accepting = True
        log.info("local_log.started", path=str(self.path), fsync=self.fsync, topic=self.topic)

    async def write(self, batch: Batch) -> None:
        """Append every record of ``batch`` and return once they are committed.

        All records of one batch land in the same transaction, contiguous and in order. Raises
        :class:`SinkUnavailable` when the sink is not running, the queue bound is reached, or the commit failed
        (disk full, I/O error, ``max_db_bytes`` reached); in that case none of the batch was written. Raises
        ``UnicodeDecodeError`` (a ``ValueError``) if a record key is not ASCII.
        """
        if not self._accepting or self._loop is None:
            raise SinkUnavailable(f"local log {self.path} is not running")
        if not batch.records:
            return
        nbytes = batch.size_bytes
        if self._queued_bytes and self._queued_bytes + nbytes > self.max_queued_bytes:
            raise SinkUnavailable(
                f"local log writer is behind: {self._queued_bytes} bytes waiting for commit "
                f"(limit {self.max_queued_bytes})"
            )
        # Rows are built here rather than on the writer thread so a bad record fails only its own caller,
        # never the whole commit group.
        rows = [
            (
                self.topic,
                None if r.key is None else r.key.decode("ascii"),
                r.value,
                r.signal,
                batch.source_id,
                batch.received_at_ns,
                VALUE_CONTENT_TYPE,
                batch.transport,
            )
            for r in batch.records
        ]
        future: asyncio.Future[None] = self._loop.create_future()
        self._queued_bytes += nbytes
        self._queue.put(_Write(rows, nbytes, future))
        await future

    async def ready(self) -> bool:
        """True while the writer runs and its last commit (if any) succeeded.

        After a failed commit (disk full, I/O error) this stays False until a later ``write()`` commits again.
        """
        return self._accepting and self._thread is not None and self._thread.is_alive() and self._error is None

    async def stop(self) -> None:
        """Stop accepting writes, commit everything already queued, and close the database."""
        self._accepting = False
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        log.info("local_log.stopped", path=str(self.path), commits=self.commits)

    def describe(self) -> str:
        return f"local log {self.path} (topic {self.topic}, fsync {'on' if self.fsync else 'off'})"

    # -- writer thread -------------------------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[None]) -> None:
        try:
            conn = _connect(self.path, create=True)
            conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            if self.max_db_bytes is not None:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count={max(1, self.max_db_bytes // page_size)}")
        except (sqlite3.Error, OSError) as exc:
            error = SinkUnavailable(f"cannot open the local log {self.path}: {exc}")
            self._call_on_loop(_settle_future, opened, error)
            return
        self._call_on_loop(_settle_future, opened, None)
        try:
            stopping = False
            while not stopping:
                group = [self._queue.get()]
                while True:
                    try:
                        group.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stopping = None in group
                writes = [w for w in group if w is not None]
                if writes:
                    self._commit(conn, writes)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, writes: list[_Write]) -> None:
        message: str | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, [row for w in writes for row in w.rows])
            conn.execute("COMMIT")
        # Anything escaping here would leave every caller of the group awaiting forever, so the whole group
        # fails with the error instead; sqlite3.Error is the expected case (full disk, I/O error).
        except Exception as exc:
            message = f"local log {self.path} is not writable: {exc}"
            if conn.in_transaction:
                # SQLite may already have rolled back on its own (e.g. SQLITE_FULL during COMMIT).
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if self._error is None:
                log.error("local_log.commit_failed", path=str(self.path), error=str(exc), writes=len(writes))
        else:
            self.commits += 1
            if self._error is not None:
                log.info("local_log.writable_again", path=str(self.path))
        self._error = message
        self._call_on_loop(self._settle_group, writes, message)

    def _call_on_loop(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            # The loop is already closed (process shutting down without stop()); nobody is waiting any more.
            log.debug("local_log.loop_closed", path=str(self.path))

    # -- event loop thread ---------------------------------------------------------------------------------

    def _settle_group(self, writes: list[_Write], error_message: str | None) -> None:
        for w in writes:
            self._queued_bytes -= w.nbytes
            # A separate exception per caller: one instance raised in several tasks would share a traceback.
            _settle_future(w.future, None if error_message is None else SinkUnavailable(error_message))


def _settle_future(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; its rows are committed (or not) all the same
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class LocalLogAppender:
    """Synchronous appender of single records with arbitrary headers, for the pipeline's own topics in the
    embedded shape (envelopes, stage results, dead letters), usable next to a running :class:`LocalLogSink`: each
    append is one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock serializes it with the sink's writer), with
    ``synchronous=FULL``, so a returned :meth:`append` survives power loss. Thread-safe (one call at a time).

    Raises ``sqlite3.Error`` when the file cannot be opened or written (the log must exist: ``serve`` creates it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = _connect(self.path, create=True, check_same_thread=False)
        self._conn.execute("PRAGMA synchronous=FULL")

    def append(self, topic: str, key: str | None, value: bytes, headers_json: str, *, content_type: str,
               source_id: str = "", received_at_ns: int = 0) -> int:
        """Append one record; returns its offset. ``headers_json``: ``[[name, base64 value], ...]``."""
        return self.append_many([(topic, key, value, headers_json, content_type, source_id, received_at_ns)])[0]

    def append_many(self, rows: list[tuple[str, str | None, bytes, str, str, str, int]]) -> list[int]:
        """Append ``(topic, key, value, headers_json, content_type, source_id, received_at_ns)`` rows in one
        transaction (one fsync); returns their offsets, in order."""
        with self._transaction() as conn:
            return [conn.execute(_APPEND, (topic, key, value, source_id, received_at_ns, content_type,
                                           headers_json)).lastrowid
                    for topic, key, value, headers_json, content_type, source_id, received_at_ns in rows]

    @contextlib.contextmanager
    def _transaction(self):
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` under the lock; rolled back when the body raises."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def append_once(self, topic: str, key: str | None, value: bytes, headers_json: str, *, content_type: str,
                    idempotency_key: str, result: str, source_id: str = "",
                    received_at_ns: int = 0) -> tuple[int, str, bool]:
        """Append one record unless ``topic`` already holds one appended under ``idempotency_key``.

        The check, the append and the key's row are one transaction, so a record is in the log exactly once per key
        whatever process dies when. ``result``: JSON text stored with the key (what to answer a repeated request
        with). Returns ``(offset, result, appended)``: the new offset and ``result``, or the original record's
        offset and stored result with ``appended`` false.
        """
        with self._transaction() as conn:
            row = conn.execute('SELECT "offset", result FROM idempotency_keys WHERE topic = ? AND idempotency_key = ?',
                               (topic, idempotency_key)).fetchone()
            if row is not None:
                return row[0], row[1], False
            offset = conn.execute(_APPEND, (topic, key, value, source_id, received_at_ns, content_type,
                                            headers_json)).lastrowid
            conn.execute('INSERT INTO idempotency_keys (topic, idempotency_key, "offset", result) VALUES (?, ?, ?, ?)',
                         (topic, idempotency_key, offset, result))
        return offset, result, True

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class LocalLogReader:
    """Synchronous reader of a local log file, usable from another process while ``serve`` writes to it.

    ``path``: the database file (``<state_dir>/spans.db``). Raises ``sqlite3.OperationalError`` if the file does
    not exist (it is never created by a reader). One call at a time is served (a lock serializes callers), so an
    instance may be shared between threads, e.g. via ``asyncio.to_thread``.

    Consumer-group offsets follow the reader's ``after_offset`` convention: a group commits the last offset it has
    fully processed and resumes with ``read(committed_offset(group, topic), ...)``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = _connect(self.path, create=False, check_same_thread=False)

    def read(self, after_offset: int = 0, limit: int = 1000, *, topic: str | None = None) -> list[LocalRecord]:
        """Up to ``limit`` committed records with ``offset > after_offset``, in offset order.

        ``topic``: only records of that topic (offsets then have gaps where other topics' records are).
        """
        query = _SELECT + ' WHERE "offset" > ?'
        params: tuple = (after_offset,)
        if topic is not None:
            query += " AND topic = ?"
            params += (topic,)
        query += ' ORDER BY "offset" LIMIT ?'
        with self._lock:
            rows = self._conn.execute(query, (*params, limit)).fetchall()
        return [LocalRecord(*row) for row in rows]

    def last_offset(self, *, topic: str | None = None) -> int:
        """Offset of the newest committed record (of ``topic`` if given); 0 when there is none."""
        query = 'SELECT "offset" FROM records'
        params: tuple = ()
        if topic is not None:
            query += " WHERE topic = ?"
            params = (topic,)
        with self._lock:
            row = self._conn.execute(query + ' ORDER BY "offset" DESC LIMIT 1', params).fetchone()
        return 0 if row is None else row[0]

    def commit_offset(self, group: str, topic: str, offset: int) -> None:
        """Durably record that ``group`` has processed ``topic`` up to and including ``offset``."""
        with self._lock:
            self._conn.execute(
                'INSERT INTO group_offsets (group_id, topic, "offset") VALUES (?, ?, ?)'
                ' ON CONFLICT (group_id, topic) DO UPDATE SET "offset" = excluded."offset"',
                (group, topic, offset),
            )

    def committed_offset(self, group: str, topic: str) -> int:
        """The last offset ``group`` committed for ``topic``; 0 (read from the start) when it never committed."""
        with self._lock:
            row = self._conn.execute(
                'SELECT "offset" FROM group_offsets WHERE group_id = ? AND topic = ?', (group, topic)
            ).fetchone()
        return 0 if row is None else row[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LocalLogReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
