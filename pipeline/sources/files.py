"""Trace files on disk -> :class:`pipeline.sources.importer.PulledTrace` (the formats: ``normalizers.trace_files``).

Used by ``trace-source import <dir|file>``, by a registered ``files`` source (``connect files --path DIR``,
then ``sync`` / ``watch``) and by ``autoloop``. A directory is read recursively in name order, skipping hidden
files and the temp files writers leave (``.*``, ``*.tmp``, ``*.part``, ``*~``). A file that cannot be read is
reported by name with its error class and reason; the others are imported. Spans of one trace spread over
several files of one read (a rotated Collector file) are one trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from normalizers.trace_files import FileFormatError, parse_trace_file
from pipeline.sources.importer import PulledTrace, group_traces

_SKIP_SUFFIXES = (".tmp", ".part", ".partial", ".swp", "~", ".lock")


@dataclass
class FileRead:
    """One file: its ``format``, the traces it holds, or the ``error`` (class ``kind``) that stopped it."""

    path: Path
    format: str | None = None
    traces: list[PulledTrace] = field(default_factory=list)
    kind: str | None = None
    error: str | None = None
    dropped_log_records: int = 0


def list_trace_files(path: str | Path) -> list[Path]:
    """``path`` itself when it is a file, else every trace file under it (recursive, name order). Raises
    ``FileNotFoundError``."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                continue
            out.append(Path(dirpath) / name)
    return out


def read_trace_file(path: Path) -> FileRead:
    """Parse one file; never raises for its content (the error is in the result)."""
    read = FileRead(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        read.kind, read.error = "unreadable", f"{exc.strerror or exc}"
        return read
    try:
        content = parse_trace_file(data, path.name)
    except FileFormatError as exc:
        read.kind, read.error = exc.kind, str(exc)
        return read
    read.format = content.format
    read.traces, read.dropped_log_records = group_traces(content.spans, content.log_events, str(path))
    read.traces += [PulledTrace(e.trace_id, str(path), envelope=e) for e in content.envelopes]
    if not read.traces:
        read.kind, read.error = "adapter mismatch", "no spans, log records or envelopes in the file"
    return read


def merge_reads(reads: list[FileRead]) -> list[PulledTrace]:
    """The traces of several files: spans and log events of one trace id (from any file) together; envelopes as
    they are."""
    merged: dict[str, PulledTrace] = {}
    out: list[PulledTrace] = []
    for read in reads:
        for t in read.traces:
            if t.envelope is not None:
                out.append(t)
                continue
            have = merged.get(t.trace_id)
            if have is None:
                merged[t.trace_id] = PulledTrace(t.trace_id, t.item, list(t.spans), list(t.log_events))
            else:
                have.spans += t.spans
                have.log_events += t.log_events
                if t.item not in have.item.split(", "):
                    have.item += f", {t.item}"
    return list(merged.values()) + out


def file_state(path: Path) -> list[int]:
    """What tells a file changed: ``[size, mtime_ns]``."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
