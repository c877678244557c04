"""``trace-source status [TRACE]``: the loop as people read it — a projection of the journal
(``pipeline.journal.projection``), printed as text or JSON. Reads only; never changes anything."""

from __future__ import annotations

import asyncio
import json

from pipeline.journal import JournalEvent, open_journal
from pipeline.journal.projection import find_trace, latest_runs, run_record, summary
from pipeline.loop_settings import LoopSettings


def load_events(settings: LoopSettings) -> tuple[list[JournalEvent], str]:
    """Every journal event, and a description of where they were read from."""
    url = settings.database_url()
    journal = open_journal(url, settings.state_dir)

    async def read() -> list[JournalEvent]:
        await journal.start()
        try:
            return await journal.events()
        finally:
            await journal.close()

    where = "Postgres journal" if url else str(settings.state_dir / "runs.jsonl")
    return asyncio.run(read()), where


def _cut(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


_PHASE_LABEL = {"import": "imported", "grade": "graded", "seed": "seeded", "reproduce": "reproduced",
                "fix": "fixed", "reprocess": "reprocessed"}


def load_sources(settings: LoopSettings) -> list[dict]:
    """Every registered source with its state (``<state_dir>/sources.db``; none when there is no registry)."""
    from pipeline.sources.store import open_source_store

    try:
        store = open_source_store(settings.state_dir, settings.database_url(), create=False)
    except FileNotFoundError:
        return []
    try:
        return [r.as_dict() for r in store.list()]
    finally:
        store.close()


def load_autoloops(settings: LoopSettings) -> list[dict]:
    """The local loops registered in ``<state_dir>/autoloops.json``, each with ``running``."""
    from pipeline.sources.autoloop import registered

    return registered(settings.state_dir)


def _cursor_text(cursor) -> str:
    if not cursor:
        return "-"
    if isinstance(cursor, dict) and "files" in cursor:
        return f"{len(cursor['files'])} file(s) read"
    if isinstance(cursor, dict) and "value" in cursor:
        return f"{cursor['value']} / {cursor.get('id')}"
    if isinstance(cursor, dict) and "timestamp" in cursor:
        return str(cursor["timestamp"])
    return json.dumps(cursor)[:40]


def render_sources(sources: list[dict], autoloops: list[dict]) -> list[str]:
    lines: list[str] = []
    if sources:
        lines += ["", "Sources", f"  {'NAME':18}  {'PROVIDER':9}  {'VALIDATION':10}  {'STATUS':7}  "
                  f"{'LAST SYNC (UTC)':19}  {'IMPORTED':>8}  {'REJECTED':>8}  CURSOR"]
        for src in sources:
            lines.append(f"  {_cut(src['name'], 18):18}  {src['provider']:9}  {src['validation']:10}  "
                         f"{src['status']:7}  {(src['last_sync_at'] or '-')[:19]:19}  {src['imported_total']:>8}  "
                         f"{src['rejected_total']:>8}  {_cut(_cursor_text(src['cursor']), 44)}")
            if src["last_error"]:
                lines.append(f"      last error: {_cut(src['last_error'], 100)}")
            for problem in src["problems"][:3]:
                lines.append(f"      invalid: {_cut(problem, 100)}")
    if autoloops:
        lines += ["", "Local loops (autoloop)"]
        for a in autoloops:
            lines.append(f"  {'running' if a['running'] else 'stopped':8} pid {a['pid']:<8} {a['watch_dir']}  "
                         f"(repo {a['repo']}, OTLP {a.get('otlp_endpoint') or '-'}, log {a.get('log')})")
    return lines


def render_summary(settings: LoopSettings, *, limit: int, as_json: bool) -> str:
    events, where = load_events(settings)
    counts = summary(events)
    latest = latest_runs(events)[:limit]
    sources, autoloops = load_sources(settings), load_autoloops(settings)
    if as_json:
        return json.dumps({"journal": where, **counts, "runs": [run_record(v) for v in latest], "sources": sources,
                           "autoloops": autoloops}, indent=2) + "\n"
    lines = [f"Loop status — {counts['traces']} traces (latest run each), journal: {where}", ""]
    for phase, statuses in counts["phases"].items():
        total = sum(statuses.values())
        detail = " · ".join(f"{s} {n}" for s, n in sorted(statuses.items(), key=lambda kv: -kv[1]))
        lines.append(f"  {_PHASE_LABEL.get(phase, phase):12} {total:>6}   {detail}")
    if not counts["phases"]:
        lines.append("  (no runs yet: send traces to `trace-source serve`)")
    for title, reasons in (("blocked", counts["blocked"]), ("errors", counts["errors"])):
        if reasons:
            lines.append(f"  {title:12} {sum(reasons.values()):>6}")
            lines.extend(f"      {n:>4} × {_cut(r, 96)}" for r, n in reasons.items())
    if latest:
        lines += ["", "Latest runs", f"  {'TRACE ID':32}  {'CREATED (UTC)':19}  {'VERDICT':12}  {'CATEGORY':14}  "
                  f"{'LAST PHASE':22}  REASON"]
        for v in latest:
            last = f"{v.last.phase}: {v.last.status}"
            lines.append(f"  {v.trace_id:32}  {v.run.created_at[:19]:19}  {v.verdict or '-':12}  "
                         f"{v.category or '-':14}  {_cut(last, 22):22}  "
                         f"{_cut(v.last.reason if v.last.status != 'passed' else '', 60)}")
    lines += render_sources(sources, autoloops)
    return "\n".join(lines) + "\n"


def render_source(settings: LoopSettings, name: str, *, as_json: bool) -> str | None:
    """One registered source in detail (``status NAME``), or None when no source has that name."""
    source = next((s for s in load_sources(settings) if s["name"] == name), None)
    if source is None:
        return None
    from pipeline.sources.store import open_source_store

    store = open_source_store(settings.state_dir, settings.database_url(), create=False)
    try:
        rejected = store.rejected(name)
    finally:
        store.close()
    if as_json:
        return json.dumps({**source, "rejected_items": rejected}, indent=2) + "\n"
    lines = [f"source      {source['name']} ({source['provider']})",
             f"validation  {source['validation']}" + (f" at {source['validated_at']}" if source["validated_at"] else ""),
             *(f"            {p}" for p in source["problems"]),
             f"status      {source['status']}" + (f" — {source['last_error']}" if source["last_error"] else ""),
             f"cursor      {_cursor_text(source['cursor'])}",
             f"last sync   {source['last_sync_at'] or 'never'} (imported {source['last_imported']}, rejected "
             f"{source['last_rejected']}; totals {source['imported_total']} / {source['rejected_total']})",
             f"config      {json.dumps(source['config'], sort_keys=True)}"]
    for r in rejected[-10:]:
        lines.append(f"rejected    {r['at'][:19]}  {r['item']}: {r['kind']}: {_cut(r['reason'], 90)}")
    return "\n".join(lines) + "\n"


def render_run(settings: LoopSettings, trace: str, *, as_json: bool) -> str:
    """One trace's latest run. Raises ``LookupError`` for an unknown or ambiguous id."""
    events, where = load_events(settings)
    trace_id = find_trace(events, trace)
    view = next(v for v in latest_runs(events) if v.trace_id == trace_id)
    if as_json:
        return json.dumps(run_record(view), indent=2) + "\n"
    r = view.run
    lines = [f"trace     {view.trace_id}  (envelope v{view.envelope_version or '?'}, key {view.envelope_key[:16]}…)",
             f"run       {r.run_id}  trigger {r.trigger}  policy {r.policy}  created {r.created_at}",
             f"source    {r.source.kind}:{r.source.id}" + (f"  repository {r.repository}" if r.repository else ""),
             *( [f"parent    {r.parent_run_id}"] if r.parent_run_id else []), "", "phases"]
    for e in view.events:
        lines.append(f"  {e.at[:19]}  {e.phase:10} {e.status:16} {_cut(e.reason, 80) if e.reason else ''}")
        for a in e.artifacts:
            lines.append(f"  {'':19}  {'':10} -> {settings.artifact_root / a}")
        if url := e.details.get("pr_url"):
            lines.append(f"  {'':19}  {'':10} pull request: {url}")
    last = view.last
    if view.stopped:
        lines += ["", f"stopped   at {last.phase}: {last.status} — {last.reason or '(no reason recorded)'}"]
    else:
        lines += ["", f"latest    {last.phase}: {last.status}"]
    lines.append(f"journal   {where}")
    return "\n".join(lines) + "\n"
