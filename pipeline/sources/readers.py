"""The readers of pulled sources: each yields pages of traces from a cursor and checks its own setup for ``test``.

A reader never publishes; :mod:`pipeline.sources.sync` imports each page and stores the cursor the page ends at,
so a crash re-reads at most one page (whose traces are then found imported and skipped).

Errors a reader raises are :class:`SourceError`, whose ``kind`` is the seed system's failure class for trace
import: ``auth`` / ``missing auth``, ``connection``, ``mapping``, ``cursor``, ``filters``, ``bad shape``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Protocol

import aiohttp

from normalizers.foreign import ForeignValueError, time_ns, trace_id_of
from normalizers.langfuse_api import LangfuseShapeError, spans_from_langfuse_trace
from pipeline.sources.config import FilesConfig, LangfuseConfig, SecretError, resolve_secret
from pipeline.sources.files import file_state, list_trace_files, merge_reads, read_trace_file
from pipeline.sources.importer import PulledTrace


class SourceError(Exception):
    """The source cannot be read; ``kind``: ``auth``, ``missing auth``, ``connection``, ``mapping``, ``cursor``,
    ``filters``, ``bad shape``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass
class Rejected:
    item: str
    kind: str
    reason: str


@dataclass
class Page:
    """Traces read, items that could not become traces, and the cursor after this page (stored once the page is
    imported)."""

    traces: list[PulledTrace]
    rejected: list[Rejected] = field(default_factory=list)
    cursor: Any = None


@dataclass
class Check:
    """One line of ``trace-source test``: ``ok`` or the problem, precisely."""

    what: str
    ok: bool
    detail: str = ""
    fatal: bool = True


class Reader(Protocol):
    async def pages(self, cursor: Any) -> AsyncIterator[Page]: ...

    async def check(self) -> list[Check]: ...


# -- files --------------------------------------------------------------------------------------------------------

class FilesReader:
    """A directory: one page of the files new or changed since the cursor (``{"files": {path: [size,
    mtime_ns]}}``)."""

    def __init__(self, config: FilesConfig) -> None:
        self.config = config

    async def pages(self, cursor: Any) -> AsyncIterator[Page]:
        seen = dict((cursor or {}).get("files", {}))
        try:
            paths = await asyncio.to_thread(list_trace_files, self.config.path)
        except FileNotFoundError as exc:
            raise SourceError("connection", str(exc)) from None
        settled_before = time.time_ns() - int(self.config.settle_s * 1e9)
        # The state is taken before reading: a file that changes while it is read is read again next time.
        states = {p: file_state(p) for p in paths}
        changed = [p for p in paths if seen.get(str(p)) != states[p] and states[p][1] <= settled_before]
        if not changed:
            return
        reads = await asyncio.to_thread(lambda: [read_trace_file(p) for p in changed])
        for p in changed:
            seen[str(p)] = states[p]
        yield Page(merge_reads(reads), [Rejected(str(r.path), r.kind, r.error) for r in reads if r.error],
                   {"files": seen})

    async def check(self) -> list[Check]:
        path = self.config.path
        if not path.exists():
            return [Check("path", False, f"{path} does not exist")]
        files = await asyncio.to_thread(list_trace_files, path)
        checks = [Check("path", True, f"{path}: {len(files)} file(s)")]
        if files:
            read = await asyncio.to_thread(read_trace_file, files[0])
            checks.append(Check(f"read {files[0].name}", read.error is None,
                                f"{read.format}: {len(read.traces)} trace(s)" if read.error is None
                                else f"{read.kind}: {read.error}", fatal=False))
        return checks


# -- Langfuse -----------------------------------------------------------------------------------------------------

def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LangfuseReader:
    """Langfuse's public API: ``GET /api/public/traces?page=&limit=&orderBy=timestamp.asc&fromTimestamp=`` (pages
    ``meta.totalPages``), then ``GET /api/public/traces/{id}`` for each trace's observations. Basic auth with the
    public / secret key. Cursor ``{"timestamp": ISO, "seen": {id: [fingerprint, ISO]}}``: the newest trace timestamp
    imported; the next sync asks from there (inclusive, minus ``lookback_s``, since the API can show a trace minutes
    late). A listed trace whose listing entry is unchanged since it was imported (same fingerprint: a hash of the
    entry, which holds its observation ids, latency, output) is not fetched again; the others are, and the importer
    skips those whose content did not change."""

    def __init__(self, config: LangfuseConfig) -> None:
        self.config = config

    def _auth(self) -> str:
        """The ``Authorization`` header: Basic with the public key as user and the secret key as password."""
        try:
            public = resolve_secret(self.config.public_key_env, None, "Langfuse public key")
            secret = resolve_secret(self.config.secret_key_env, None, "Langfuse secret key")
        except SecretError as exc:
            raise SourceError("missing auth", str(exc).removeprefix("missing auth: ")) from None
        return "Basic " + base64.b64encode(f"{public}:{secret}".encode()).decode()

    async def _get(self, session: aiohttp.ClientSession, path: str, params: dict | None = None) -> Any:
        url = self.config.base_url.rstrip("/") + path
        for attempt in range(5):
            try:
                async with session.get(url, params=params) as resp:
                    if resp.status in (401, 403):
                        raise SourceError("auth", f"Langfuse at {self.config.base_url} refused the keys from "
                                          f"{self.config.public_key_env} / {self.config.secret_key_env} "
                                          f"(HTTP {resp.status}): check they belong to this project and host")
                    if resp.status in (429, 502, 503, 504) and attempt < 4:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "") or 2 ** attempt)
                                            if (resp.headers.get("Retry-After") or "").isdigit() else 2 ** attempt)
                        continue
                    if resp.status != 200:
                        raise SourceError("connection", f"GET {url} answered HTTP {resp.status}: "
                                          f"{(await resp.text())[:300]}")
                    try:
                        return await resp.json(content_type=None)
                    except ValueError:
                        raise SourceError("bad shape", f"GET {url} did not answer JSON") from None
            except aiohttp.ClientError as exc:
                raise SourceError("connection", f"cannot reach Langfuse at {self.config.base_url}: {exc}") from None
            except asyncio.TimeoutError:
                raise SourceError("connection", f"GET {url}: no answer within {self.config.timeout_s:g} s") from None
        raise SourceError("connection", f"GET {url}: still rate-limited after 5 attempts")

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers={"Authorization": self._auth()},
                                     timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))

    async def pages(self, cursor: Any) -> AsyncIterator[Page]:
        since = (cursor or {}).get("timestamp")
        seen: dict[str, list[str]] = dict((cursor or {}).get("seen") or {})
        params: dict[str, Any] = {"limit": self.config.page_size, "orderBy": "timestamp.asc"}
        newest = since
        if since:
            try:
                start = datetime.fromisoformat(since.replace("Z", "+00:00")) - timedelta(seconds=self.config.lookback_s)
            except ValueError:
                raise SourceError("cursor", f"stored cursor {since!r} is not an ISO time") from None
            params["fromTimestamp"] = start.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        taken = 0
        async with self._session() as session:
            page_no = 1
            while True:
                listing = await self._get(session, "/api/public/traces", {**params, "page": page_no})
                if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
                    raise SourceError("bad shape", "GET /api/public/traces did not answer {data: [...], meta}")
                traces, rejected = [], []
                for item in listing["data"]:
                    if self.config.source_limit is not None and taken >= self.config.source_limit:
                        break
                    tid = str(item.get("id"))
                    fingerprint = hashlib.sha256(json.dumps(item, sort_keys=True, default=str).encode()).hexdigest()
                    if (seen.get(tid) or [None])[0] == fingerprint[:16]:
                        continue  # listed again inside the lookback window, unchanged
                    taken += 1
                    detail = await self._get(session, f"/api/public/traces/{tid}")
                    try:
                        spans = spans_from_langfuse_trace(detail)
                        traces.append(PulledTrace(trace_id_of(detail.get("id"), "langfuse-trace"),
                                                  f"langfuse trace {tid}", spans))
                        ts = _iso(time_ns(detail.get("timestamp")))
                        seen[tid] = [fingerprint[:16], ts]
                        if newest is None or time_ns(ts) > time_ns(newest):
                            newest = ts
                    except (LangfuseShapeError, ForeignValueError, AttributeError) as exc:
                        rejected.append(Rejected(f"langfuse trace {tid}", "bad shape", str(exc)))
                yield Page(traces, rejected, self._cursor(newest, seen) if newest else cursor)
                meta = listing.get("meta") or {}
                if (self.config.source_limit is not None and taken >= self.config.source_limit) or \
                        page_no >= int(meta.get("totalPages") or 0) or not listing["data"]:
                    return
                page_no += 1

    def _cursor(self, newest: str, seen: dict[str, list[str]]) -> dict:
        """The cursor, remembering only the traces inside the lookback window (the only ones listed again)."""
        floor = time_ns(newest) - int(self.config.lookback_s * 1e9)
        return {"timestamp": newest, "seen": {k: v for k, v in seen.items() if time_ns(v[1]) >= floor}}

    async def check(self) -> list[Check]:
        try:
            async with self._session() as session:
                listing = await self._get(session, "/api/public/traces", {"limit": 1, "page": 1})
                checks = [Check("reachable and authenticated", True, self.config.base_url),
                          Check("credential read-only", True, "Langfuse API keys are project keys: they can also "
                                "ingest; trace-source only reads", fatal=False)]
                data = listing.get("data") if isinstance(listing, dict) else None
                if not isinstance(data, list):
                    return checks + [Check("listing shape", False, "GET /api/public/traces did not answer "
                                           "{data: [...], meta}")]
                if not data:
                    return checks + [Check("one page read", True, "no traces yet", fatal=False)]
                detail = await self._get(session, f"/api/public/traces/{data[0].get('id')}")
                spans = spans_from_langfuse_trace(detail)
                return checks + [Check("one page read and normalized", True,
                                       f"trace {data[0].get('id')}: {len(spans) - 1} observation(s)")]
        except SourceError as exc:
            return [Check("reachable and authenticated", False, str(exc))]
        except (LangfuseShapeError, ForeignValueError) as exc:
            return [Check("one page read and normalized", False, f"bad shape: {exc}")]
