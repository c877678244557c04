"""``sync`` (pull once from the stored cursor), ``watch`` (pull every ``interval_s``) and ``test`` of a registered
source; the CLI only calls these.

Per page: every trace is imported (:class:`pipeline.sources.importer.Importer`: built, delivered once per key,
remembered), rejected items are recorded with their reason, and only then is the page's cursor stored. A crash
anywhere re-reads at most that page: its traces are found imported and skipped, so nothing is lost or repeated. A
source that cannot be read ends the sync *blocked* with the connection / credential / schema error (``status``
shows it); the cursor stays where it was.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from normalizers.envelope import Source
from pipeline.sources.config import CONFIGS, KINDS, SecretError
from pipeline.sources.importer import Destination, Imported, Importer
from pipeline.sources.readers import Check, FilesReader, LangfuseReader, Reader, SourceError
from pipeline.sources.store import SourceRecord, SourceStore
from pipeline.sources.upload import UploadError
from sinks.base import SinkUnavailable

log = structlog.get_logger("trace_source.sources")

#: Providers whose traces are pushed, not pulled: `watch` refuses them and says what to run instead.
PUSH_PROVIDERS = {"otlp"}


def push_error(name: str) -> SourceError:
    return SourceError("push source", f"{name} is a push source: agents export OTLP to `trace-source serve` (its "
                       f"continuous path, with a bearer token mapped to {name!r}); there is nothing to pull or watch")


def build_reader(record: SourceRecord) -> Reader:
    if record.provider in PUSH_PROVIDERS:
        raise push_error(record.name)
    config = CONFIGS[record.provider].model_validate(record.config)
    if record.provider == "files":
        return FilesReader(config)
    if record.provider == "langfuse":
        return LangfuseReader(config)
    from pipeline.sources.postgres import PostgresReader

    return PostgresReader(config)


@dataclass
class SyncResult:
    """One sync: per-trace outcomes, rejected items, and the error that blocked the source (if any)."""

    source: str
    results: list[Imported] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    error: str | None = None
    pages: int = 0

    @property
    def imported(self) -> int:
        return sum(r.status == "imported" for r in self.results)

    def counts(self) -> dict[str, int]:
        out = {"imported": 0, "duplicate": 0, "unchanged": 0, "rejected": 0}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        out["rejected"] += len(self.rejected)
        return out


async def sync_once(store: SourceStore, name: str, destination: Destination, *, trigger: str = "sync") -> SyncResult:
    """Pull ``name`` once from its stored cursor into ``destination``. Raises ``SourceNotFound``; a destination
    that fails (``SinkUnavailable``, ``UploadError``) stops the sync with the cursor at the last full page and is
    re-raised after the state is recorded."""
    record = store.get(name)
    if record.provider in PUSH_PROVIDERS:
        raise push_error(name)
    out = SyncResult(name)
    config = CONFIGS[record.provider].model_validate(record.config)
    importer = Importer(store, Source(id=name, kind=KINDS[record.provider]), destination, trigger=trigger,
                        repository=config.repository)
    failure: BaseException | None = None
    try:
        async for page in build_reader(record).pages(record.cursor):
            out.pages += 1
            for trace in page.traces:
                result = await importer.run(trace)
                out.results.append(result)
                if result.status == "rejected":
                    out.rejected.append((result.item, result.kind or "bad shape", result.reason or ""))
            for r in page.rejected:
                store.record_rejected(name, r.item, r.kind, r.reason)
                out.rejected.append((r.item, r.kind, r.reason))
            store.set_cursor(name, page.cursor)
            log.info("source.page", source=name, traces=len(page.traces), rejected=len(page.rejected),
                     cursor=page.cursor if record.provider != "files" else None)
    except SourceError as exc:
        out.error = str(exc)
    except SecretError as exc:
        out.error = f"missing auth: {str(exc).removeprefix('missing auth: ')}"
    except (SinkUnavailable, UploadError) as exc:
        out.error = f"destination: {exc}"
        failure = exc
    store.record_sync(name, imported=out.imported, rejected=len(out.rejected), error=out.error)
    if out.error:
        log.warning("source.blocked", source=name, error=out.error)
    if failure is not None:
        raise failure
    return out


async def watch(store: SourceStore, name: str, destination: Destination, stop: asyncio.Event, *,
                interval_s: float | None = None, on_sync=None) -> None:
    """``sync_once`` every ``interval_s`` (default: the source's) until ``stop``. A blocked sync is retried at
    the next interval; a destination failure too."""
    record = store.get(name)
    if record.provider in PUSH_PROVIDERS:
        raise push_error(name)
    interval = interval_s or CONFIGS[record.provider].model_validate(record.config).interval_s
    while not stop.is_set():
        try:
            result = await sync_once(store, name, destination)
            if on_sync is not None:
                on_sync(result)
        except (SinkUnavailable, UploadError) as exc:
            log.warning("source.destination_unavailable", source=name, error=str(exc))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


async def test_source(store: SourceStore, name: str) -> list[Check]:
    """Validate ``name``: reachable, credential (read-only where the provider can tell), mapping against the real
    columns, one page read and normalized. Stores the verdict in the registry."""
    record = store.get(name)
    if record.provider in PUSH_PROVIDERS:
        checks = [Check("push source", True, "agents export OTLP to `trace-source serve`; nothing to pull")]
        store.set_validation(name, True, [])
        return checks
    try:
        checks = await build_reader(record).check()
    except SecretError as exc:
        checks = [Check("credential", False, str(exc))]
    except SourceError as exc:
        checks = [Check(exc.kind, False, exc.message)]
    ok = all(c.ok or not c.fatal for c in checks)
    store.set_validation(name, ok, [f"{c.what}: {c.detail}" for c in checks if not c.ok])
    return checks
