"""The embedded journal: ``<state_dir>/runs.jsonl``, one :class:`~pipeline.journal.JournalEvent` JSON per line.

Several processes may append (``serve`` with its in-process stages, a ``worker``, ``trace-source reprocess``):
within a process, concurrent appends are grouped (:mod:`pipeline.group_commit`); every group takes an exclusive
``flock`` on the file, first reads what others appended since this process last
looked (to know every ``event_id`` already present), then writes only new events, flushes and fsyncs. A line cut
short by a crash (no trailing newline) is ignored by readers and terminated before the next append, so one torn
write never corrupts the next event.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
from pathlib import Path

import structlog

from pipeline.group_commit import GroupWriter
from pipeline.journal import JournalError, JournalEvent

log = structlog.get_logger(__name__)


class JsonlJournal:
    """:class:`pipeline.journal.Journal` over a JSON-lines file (created with its directory on first append)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._ids: set[str] = set()
        self._read_to = 0  # bytes of the file already scanned for ids
        self._lock = threading.Lock()
        self._new: set[str] = set()  # ids the last append wrote
        self._writer: GroupWriter[list[JournalEvent], int] = GroupWriter("journal-writer", self._append_groups)

    def describe(self) -> str:
        return f"journal {self.path}"

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create {self.path.parent}: {exc}") from exc

    async def append(self, events: list[JournalEvent]) -> int:
        if not events:
            return 0
        return await self._writer.submit(events)

    def _append_groups(self, groups: list[list[JournalEvent]]) -> list[int]:
        """One flock, one write, one fsync for every queued call; returns how many events of each were new."""
        flat = [e for g in groups for e in g]
        self._append(flat)
        counts, seen = [], set()
        for g in groups:
            counts.append(sum(1 for e in g if e.event_id in self._new and not (e.event_id in seen or seen.add(
                e.event_id))))
        return counts

    def _append(self, events: list[JournalEvent]) -> int:
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as exc:
                raise JournalError(f"cannot open {self.path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size < self._read_to:  # truncated or replaced under us: rescan from the start
                    self._ids.clear()
                    self._read_to = 0
                torn = self._scan(fd, size)
                new = [e for e in events if e.event_id not in self._ids]
                # Duplicates inside one call keep the first.
                seen: set[str] = set()
                new = [e for e in new if not (e.event_id in seen or seen.add(e.event_id))]
                self._new = {e.event_id for e in new}
                if new:
                    data = b"".join(e.to_json_line() for e in new)
                    if torn:
                        data = b"\n" + data
                    os.write(fd, data)
                    os.fsync(fd)
                    self._ids.update(e.event_id for e in new)
                    self._read_to = os.fstat(fd).st_size
                return len(new)
            except OSError as exc:
                raise JournalError(f"cannot append to {self.path}: {exc}") from exc
            finally:
                os.close(fd)  # releases the flock

    def _scan(self, fd: int, size: int) -> bool:
        """Read lines appended since the last scan; record their ids. True when the file ends in a torn line."""
        if size == self._read_to:
            return self._torn_tail(fd, size)
        chunk = os.pread(fd, size - self._read_to, self._read_to)
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            if eid := _event_id(line):
                self._ids.add(eid)
        self._read_to += end
        return end < len(chunk)

    def _torn_tail(self, fd: int, size: int) -> bool:
        return size > 0 and os.pread(fd, 1, size - 1) != b"\n"

    async def events(self, *, trace_id: str | None = None, limit: int | None = None,
                     parent_run_id: str | None = None) -> list[JournalEvent]:
        return await asyncio.to_thread(read_events, self.path, trace_id=trace_id, limit=limit,
                                       parent_run_id=parent_run_id)

    async def close(self) -> None:
        await self._writer.close()


def _event_id(line: bytes) -> str | None:
    try:
        return json.loads(line).get("event_id")
    except (ValueError, AttributeError):
        return None


def read_events(path: Path, *, trace_id: str | None = None, limit: int | None = None,
                parent_run_id: str | None = None) -> list[JournalEvent]:
    """Every complete, valid event of the file in order (a torn or unreadable line is skipped with a warning),
    filtered by ``trace_id`` / ``parent_run_id``; the newest ``limit`` when given. A missing file has none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc}") from exc
    out: list[JournalEvent] = []
    complete = data[:data.rfind(b"\n") + 1]
    for n, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        if trace_id is not None and trace_id.encode() not in line:
            continue  # cheap pre-filters; the parsed fields decide
        if parent_run_id is not None and parent_run_id.encode() not in line:
            continue
        try:
            event = JournalEvent.model_validate_json(line)
        except ValueError as exc:
            log.warning("journal.bad_line", path=str(path), line=n, error=str(exc)[:200])
            continue
        if (trace_id is None or event.trace_id == trace_id) and (
                parent_run_id is None or event.run.parent_run_id == parent_run_id):
            out.append(event)
    return out[-limit:] if limit else out
