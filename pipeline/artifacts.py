"""The artifact layout of the loop (seed-system.md "Local loop and its artifacts"), under the artifact root (the
state dir in the embedded default, a shared volume in a cluster)::

    grades/<trace_id>/grade.json        the verdict (pipeline.grading.model.Grade)
    grades/<trace_id>/envelope.json     the graded envelope, kept when the run is to be reproduced
    seeds/<trace_id>/scenario.md        the generated reproduction scenario
    seeds/<trace_id>/seed.json          the filled-in seed templates and recorded tool results
    runs/<trace_id>/manifest.json       reproduction status, command, attempts, evidence, output paths
    runs/<trace_id>/stdout.json         the harness's machine-readable output per attempt
    runs/<trace_id>/stderr.log          the harness's stderr
    fixes/<trace_id>/status.json        fix status, when it blocks before a patch or PR
    fixes/<trace_id>/pr-details.md      the reviewer summary
    fixes/<trace_id>/repo.patch         the patch, when a PR cannot be opened

Paths recorded in the journal are relative to the root (``grades/<trace_id>/grade.json``), so they stay valid when
the store is mounted elsewhere. Writes are atomic and durable (temp file, fsync, rename, fsync of the directory) and
idempotent: a stage that runs again after a crash rewrites the same file. Concurrent writes are grouped
(:mod:`pipeline.group_commit`): one thread hand-off, and each directory fsynced once per group.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from pipeline.group_commit import GroupWriter
from pipeline.local_bus import atomic_write_bytes


class ArtifactStore:
    """Reads and writes artifacts under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._writer: GroupWriter[tuple[Path, bytes], None] = GroupWriter("artifact-writer", _write_group)

    @staticmethod
    def grade(trace_id: str) -> str:
        return f"grades/{trace_id}/grade.json"

    @staticmethod
    def envelope(trace_id: str) -> str:
        return f"grades/{trace_id}/envelope.json"

    @staticmethod
    def seed_dir(trace_id: str) -> str:
        return f"seeds/{trace_id}"

    @staticmethod
    def run_dir(trace_id: str) -> str:
        return f"runs/{trace_id}"

    @staticmethod
    def fix_dir(trace_id: str) -> str:
        return f"fixes/{trace_id}"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    async def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write ``data`` atomically and durably at ``relpath``; returns ``relpath``. Raises ``OSError``."""
        await self._writer.submit((self.root / relpath, data))
        return relpath

    async def write_json(self, relpath: str, document: Any) -> str:
        """Write ``document`` as indented JSON (``bytes`` are written as they are)."""
        data = document if isinstance(document, bytes) else (json.dumps(document, indent=2) + "\n").encode()
        return await self.write_bytes(relpath, data)

    async def write_text(self, relpath: str, text: str) -> str:
        return await self.write_bytes(relpath, text.encode())

    async def close(self) -> None:
        await self._writer.close()

    async def read_bytes(self, relpath: str) -> bytes:
        """Raises ``FileNotFoundError`` / ``OSError``."""
        return await asyncio.to_thread((self.root / relpath).read_bytes)


def _write_group(items: list[tuple[Path, bytes]]) -> list[None]:
    """Write every file (temp file, fsync, rename), then fsync each directory touched once. Raises ``OSError``."""
    dirs: set[Path] = set()
    for path, data in items:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(path.parent.parent)  # the new directory's own entry
        atomic_write_bytes(path, data, sync_dir=False)
        dirs.add(path.parent)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return [None] * len(items)
