"""The embedded shape's *file view* of output topics: a record of topic ``trace-source.<name>`` with key ``K`` is the
file ``<root>/<name>/<K>.json`` (the latest record per key wins, like a compacted topic).

Shared by the pipeline's local bus (``pipeline.local_bus``: the assembler's envelopes, dead letters) and the
receiver's envelope upload (``sinks.envelopes``), so both write the same layout. Writes are atomic and durable:
temp file, fsync, rename, fsync of the directory — readers never see half a file, and a returned write survives
``kill -9`` and power loss.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def atomic_write_bytes(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically and durably: readers see the old file or the new one, never a mix.

    Creates missing parent directories. ``sync_dir=False`` leaves the directory's fsync (which makes the rename
    durable) to the caller, who may do it once for many files. Raises ``OSError`` (disk full, permissions); the temp
    file is removed then.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not sync_dir:
        return
    # The rename itself is durable only once the directory entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def topic_dir(topic: str) -> str:
    """Directory name of an output topic: ``trace-source.traces`` -> ``traces``."""
    return _UNSAFE.sub("_", topic.removeprefix("trace-source."))


def file_name(key: bytes | None) -> str:
    """File name (without ``.json``) for a record key; unsafe characters become ``_``."""
    text = "null" if key is None else key.decode("utf-8", errors="replace")
    return _UNSAFE.sub("_", text) or "_"


def view_path(root: str | Path, topic: str, key: bytes | None) -> Path:
    """Where the file view keeps the latest record of ``key`` on ``topic``."""
    return Path(root) / topic_dir(topic) / f"{file_name(key)}.json"
