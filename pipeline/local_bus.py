"""The embedded shape's bus: the local SQLite log (``sinks.local_log``) as one partition, output topics as files.

Consumer: partition ``0`` of ``topic`` in ``<state_dir>/spans.db``; offsets are the log's offsets; the group's
committed offset lives in the log's ``group_offsets`` table (stored there in the reader's "last processed"
convention, i.e. the bus offset minus one). The log has no change notification, so an empty poll re-reads every
``poll_interval_s``. Only ONE consumer per group may run against a log: there is no group coordination.

Publishers: :class:`LocalBusPublisher` appends every record to the same log (any topic, any headers), so the
loop's stages consume envelopes and each other's results exactly as they would consume Kafka topics; for the
topics people read as files (envelopes, dead letters) it also keeps a *file view* written by
:class:`LocalFilePublisher`: a record of topic ``trace-source.<name>`` becomes the file ``<root>/<name>/<key>.json``
(the latest record per key wins, like a compacted topic), written atomically (temp file, fsync, rename, fsync of
the directory) so readers never see half a file and a returned ``publish`` survives ``kill -9`` and power loss.
A JSON value (header ``content-type: application/json``) is the file itself; any other value is wrapped as
``{"key", "headers", "value_base64"}``. The log append comes first: it is what consumers read; a crash between
the two leaves a stale file that the replay that follows rewrites.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Mapping

from sinks.base import (
    HEADER_CONTENT_TYPE,
    HEADER_RECEIVED_AT,
    HEADER_SIGNAL,
    HEADER_SOURCE_ID,
    HEADER_TRANSPORT,
    SPANS_TOPIC,
)
from sinks.file_view import atomic_write_bytes, file_name, topic_dir, view_path  # noqa: F401 - re-exported
from pipeline.group_commit import GroupWriter
from sinks.local_log import LOG_FILENAME, LocalLogAppender, LocalLogReader
from pipeline.bus import BusPublishError, BusRecord, Headers, PartitionListener, decode_headers, encode_headers

JSON_CONTENT_TYPE = "application/json"


class LocalLogConsumer:
    """:class:`pipeline.bus.BusConsumer` over ``<state_dir>/spans.db`` (partition 0 of ``topic``).

    ``start`` raises ``FileNotFoundError`` when the log does not exist (``serve`` creates it on start).
    """

    def __init__(self, state_dir: str | Path, *, topic: str = SPANS_TOPIC, group_id: str,
                 poll_interval_s: float = 0.1) -> None:
        self.path = Path(state_dir) / LOG_FILENAME
        self.topic = topic
        self.group_id = group_id
        self.poll_interval_s = poll_interval_s
        self._reader: LocalLogReader | None = None
        self._after = 0  # last offset handed out (reader convention)

    async def start(self, listener: PartitionListener) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"no embedded log at {self.path}: start `trace-source serve` with this state dir")
        self._reader = await asyncio.to_thread(LocalLogReader, self.path)
        self._after = await asyncio.to_thread(self._reader.committed_offset, self.group_id, self.topic)
        await listener.on_assigned({0})

    async def poll(self, max_records: int, timeout_s: float) -> list[BusRecord]:
        reader = self._require()
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await asyncio.to_thread(reader.read, self._after, max_records, topic=self.topic)
            if rows:
                self._after = rows[-1].offset
                return [_to_bus_record(r) for r in rows]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await asyncio.sleep(min(self.poll_interval_s, remaining))

    async def commit(self, offsets: Mapping[int, int]) -> None:
        if 0 in offsets:
            reader = self._require()
            await asyncio.to_thread(reader.commit_offset, self.group_id, self.topic, offsets[0] - 1)

    def assignment(self) -> frozenset[int]:
        return frozenset({0}) if self._reader is not None else frozenset()

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await asyncio.to_thread(reader.close)

    def _require(self) -> LocalLogReader:
        if self._reader is None:
            raise RuntimeError("LocalLogConsumer is not started")
        return self._reader


def _to_bus_record(r) -> BusRecord:
    if r.headers is not None:  # a record the pipeline published: its own headers
        return BusRecord(topic=r.topic, partition=0, offset=r.offset,
                         key=None if r.key is None else r.key.encode("utf-8"), value=r.value,
                         headers=decode_headers(r.headers))
    headers = [
        (HEADER_SOURCE_ID, r.source_id.encode()),
        (HEADER_SIGNAL, r.signal.encode()),
        (HEADER_RECEIVED_AT, str(r.received_at_ns).encode()),
        (HEADER_CONTENT_TYPE, r.content_type.encode()),
    ]
    transport = getattr(r, "transport", None)  # column added to the log's schema later; older rows lack it
    if transport:
        headers.append((HEADER_TRANSPORT, transport.encode()))
    return BusRecord(topic=r.topic, partition=0, offset=r.offset,
                     key=None if r.key is None else r.key.encode("ascii"), value=r.value, headers=tuple(headers))


class LocalFilePublisher:
    """:class:`pipeline.bus.BusPublisher` writing one file per key under ``root`` (see the module docstring)."""

    max_message_bytes: int | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, topic: str, key: bytes | None) -> Path:
        """Where ``publish(topic, key, ...)`` writes."""
        return view_path(self.root, topic, key)

    async def start(self) -> None:
        return None

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        hdrs = {k: v.decode("utf-8", errors="replace") for k, v in headers}
        if hdrs.get(HEADER_CONTENT_TYPE) != JSON_CONTENT_TYPE:
            value = json.dumps({"key": None if key is None else key.decode("utf-8", errors="replace"),
                                "headers": hdrs, "value_base64": base64.b64encode(value).decode()},
                               indent=2).encode()
        try:
            await asyncio.to_thread(atomic_write_bytes, self.path_for(topic, key), value)
        except OSError as exc:
            raise BusPublishError(f"cannot write {self.path_for(topic, key)}: {exc}") from exc

    def record_size(self, key: bytes | None, value: bytes, headers: Headers = ()) -> int:
        return len(value)

    async def stop(self) -> None:
        return None


class LocalBusPublisher:
    """:class:`pipeline.bus.BusPublisher` of the embedded shape: appends to ``<state_dir>/spans.db`` (consumable by
    :class:`LocalLogConsumer`), plus the file view under ``state_dir`` for ``file_topics``. The log must exist
    (``serve`` creates it); :meth:`start` raises ``FileNotFoundError`` otherwise."""

    max_message_bytes: int | None = None

    def __init__(self, state_dir: str | Path, *, file_topics: tuple[str, ...] = ()) -> None:
        self.state_dir = Path(state_dir)
        self.file_topics = frozenset(file_topics)
        self.files = LocalFilePublisher(self.state_dir)
        self._appender: LocalLogAppender | None = None
        # Concurrent publishes (a stage working on several records) share one transaction and one fsync.
        self._writer = GroupWriter("local-bus-writer", lambda rows: self._appender.append_many(rows))

    def path_for(self, topic: str, key: bytes | None) -> Path:
        """The file view's path of a record (``file_topics`` only)."""
        return self.files.path_for(topic, key)

    async def start(self) -> None:
        if self._appender is not None:
            return
        path = self.state_dir / LOG_FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no embedded log at {path}: start `trace-source serve` with this state dir")
        self._appender = await asyncio.to_thread(LocalLogAppender, path)

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        if self._appender is None:
            await self.start()
        hdrs = {k: v.decode("utf-8", errors="replace") for k, v in headers}
        try:
            await self._writer.submit((topic, None if key is None else key.decode("utf-8", errors="replace"), value,
                                       encode_headers(list(headers)),
                                       hdrs.get(HEADER_CONTENT_TYPE, "application/octet-stream"),
                                       hdrs.get(HEADER_SOURCE_ID, ""), time.time_ns()))
        except Exception as exc:  # sqlite3.Error: disk full, locked past the busy timeout
            raise BusPublishError(f"cannot append to the embedded log for {topic}: {exc}") from exc
        if topic in self.file_topics:
            await self.files.publish(topic, key, value, headers)

    def record_size(self, key: bytes | None, value: bytes, headers: Headers = ()) -> int:
        return len(value)

    async def stop(self) -> None:
        await self._writer.close()
        appender, self._appender = self._appender, None
        if appender is not None:
            await asyncio.to_thread(appender.close)


def read_local_record(state_dir: str | Path, topic: str, offset: int) -> BusRecord | None:
    """The record of ``topic`` at ``offset`` in the embedded log, or ``None`` when there is none."""
    with LocalLogReader(Path(state_dir) / LOG_FILENAME) as reader:
        rows = reader.read(offset - 1, 1, topic=topic)
    return _to_bus_record(rows[0]) if rows and rows[0].offset == offset else None
