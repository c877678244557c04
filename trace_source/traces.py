"""``trace-source traces`` and ``trace-source traces show``: read assembled envelopes back for people.

Sources: the embedded traces directory (``<state_dir>/traces/<trace_id>.json``), or the Kafka traces topic read
from the beginning without a consumer group (the latest version per trace id wins; claim-checked envelopes are
read from the artifact store). Output: a table (or JSON lines) of recent traces; one trace as readable text (or
the envelope JSON).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

from normalizers.envelope import Envelope
from pipeline.outputs import HEADER_ENVELOPE_VERSION, resolve_envelope


# -- loading ------------------------------------------------------------------------------------------------------

def _local_paths(state_dir: Path) -> list[Path]:
    traces_dir = Path(state_dir) / "traces"
    if not traces_dir.is_dir():
        raise FileNotFoundError(f"no assembled traces under {traces_dir}: has `trace-source serve --state-dir "
                                f"{state_dir}` assembled any yet?")
    paths = [p for p in traces_dir.glob("*.json") if not p.name.startswith(".")]
    return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)


async def _kafka_latest(bootstrap: str, topic: str, artifact_dir: Path | None, timeout: float,
                        security=None) -> list[Envelope]:
    """Latest envelope per trace id on ``topic`` (highest version, then the newest record), newest first."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from sinks.kafka_security import aiokafka_kwargs, start_or_explain

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                client_id="trace-source-traces", **aiokafka_kwargs(security))
    await start_or_explain(consumer.start, bootstrap, security)
    try:
        parts = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        if not parts:
            raise FileNotFoundError(f"topic {topic!r} not found on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        latest: dict[str, tuple[int, int, bytes, tuple]] = {}  # trace id -> (version, timestamp, value, headers)
        async with asyncio.timeout(timeout):
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for msgs in batches.values():
                    for m in msgs:
                        headers = tuple(m.headers or ())
                        version = int(next((v for k, v in headers if k == HEADER_ENVELOPE_VERSION), b"1"))
                        trace_id = (m.key or b"").decode()
                        old = latest.get(trace_id)
                        if old is None or (version, m.timestamp) >= old[:2]:
                            latest[trace_id] = (version, m.timestamp, m.value or b"", headers)
    finally:
        await consumer.stop()
    ordered = sorted(latest.values(), key=lambda v: v[1], reverse=True)
    return [resolve_envelope(value, headers, artifact_dir) for _, _, value, headers in ordered]


async def _partitions(consumer, topic: str):
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic)


def load_envelopes(*, kafka_bootstrap_servers: str | None, topic: str, state_dir: Path,
                   artifact_dir: Path | None, timeout: float, limit: int | None = None,
                   security=None) -> list[Envelope]:
    """Newest first. ``security``: a ``sinks.kafka_security.KafkaSecurity`` for the Kafka client. Raises
    ``FileNotFoundError`` when there is no traces directory / topic."""
    artifact_dir = artifact_dir or Path(state_dir) / "artifacts"
    if kafka_bootstrap_servers:
        envs = asyncio.run(_kafka_latest(kafka_bootstrap_servers, topic, artifact_dir, timeout, security))
        return envs[:limit] if limit else envs
    paths = _local_paths(state_dir)
    return [Envelope.from_json_bytes(p.read_bytes()) for p in (paths[:limit] if limit else paths)]


# -- listing ------------------------------------------------------------------------------------------------------

def status_of(env: Envelope) -> str:
    """``failed`` (a fatal error: the run itself failed), ``errors`` (recoverable errors only), ``ok``."""
    errors = env.agent_run.errors
    if any(e.fatal for e in errors):
        return "failed"
    return "errors" if errors else "ok"


def _excerpt(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def load_verdicts(state_dir: Path, database_url_env: str = "TRACE_SOURCE_DATABASE_URL") -> dict:
    """Trace id -> (envelope key, verdict, category) of its latest grade, from the journal (the Postgres one when
    the variable named ``database_url_env`` is set, else ``<state_dir>/runs.jsonl``); ``{}`` when there is none."""
    import os

    from pipeline.journal import JournalError, open_journal
    from pipeline.journal.projection import verdicts

    journal = open_journal(os.environ.get(database_url_env) or None, state_dir)

    async def read():
        await journal.start()
        try:
            return await journal.events()
        finally:
            await journal.close()

    try:
        return verdicts(asyncio.run(read()))
    except (JournalError, OSError):
        return {}


def verdict_of(env: Envelope, verdicts: dict) -> str:
    """The grade of this envelope version: ``failed`` / ``passed`` / ``inconclusive``; ``pending`` while its
    latest grade is of another version; ``-`` when it was never graded."""
    found = verdicts.get(env.trace_id)
    if found is None:
        return "-"
    key, verdict, _ = found
    return verdict if key == env.idempotency_key else "pending"


def summary(env: Envelope, verdicts: dict | None = None) -> dict:
    run = env.agent_run
    found = (verdicts or {}).get(env.trace_id)
    return {"trace_id": env.trace_id, "agent": run.agent_name, "task": _excerpt(run.task_input, 200),
            "verdict": verdict_of(env, verdicts or {}),
            "category": found[2] if found and found[0] == env.idempotency_key else None,
            "status": status_of(env), "llm_calls": len(run.llm_calls), "tool_calls": len(run.tool_calls),
            "errors": len(run.errors), "version": env.envelope_version,
            "closed_reason": env.completeness.closed_reason, "spans": len(env.spans),
            "assembled_at": _time(env.assembled_at_unix_nano), "idempotency_key": env.idempotency_key}


def list_traces(*, limit: int, as_json: bool, **source) -> str:
    envs = load_envelopes(limit=limit, **source)
    verdicts = load_verdicts(source["state_dir"])
    if as_json:
        return "".join(json.dumps(summary(e, verdicts)) + "\n" for e in envs)
    header = (f"{'TRACE ID':32}  {'AGENT':16}  {'TASK':36}  {'STATUS':7}  {'VERDICT':12}  {'LLM':>4}  {'TOOLS':>5}  "
              f"{'ERRORS':>6}  CLOSED")
    rows = [header]
    for e in envs:
        s = summary(e, verdicts)
        closed = s["closed_reason"] + ("" if s["version"] == 1 else f" (v{s['version']})")
        rows.append(f"{s['trace_id']:32}  {_excerpt(s['agent'] or '-', 16):16}  {_excerpt(s['task'] or '-', 36):36}  "
                    f"{s['status']:7}  {s['verdict']:12}  {s['llm_calls']:>4}  {s['tool_calls']:>5}  {s['errors']:>6}  "
                    f"{closed}")
    if not envs:
        rows.append("(no traces yet)")
    return "\n".join(rows) + "\n"


# -- one trace ----------------------------------------------------------------------------------------------------

def _time(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _find(trace_id: str, source: dict) -> Envelope:
    prefix = trace_id.lower()
    if not source.get("kafka_bootstrap_servers"):
        exact = Path(source["state_dir"]) / "traces" / f"{prefix}.json"
        if exact.exists():
            return Envelope.from_json_bytes(exact.read_bytes())
        matches = [p for p in _local_paths(source["state_dir"]) if p.stem.startswith(prefix)]
        if len(matches) == 1:
            return Envelope.from_json_bytes(matches[0].read_bytes())
    else:
        envs = [e for e in load_envelopes(**source) if e.trace_id.startswith(prefix)]
        if len(envs) == 1:
            return envs[0]
        matches = envs
    if not matches:
        raise LookupError(f"no assembled trace with id {trace_id}")
    raise LookupError(f"{len(matches)} traces start with {trace_id}; give more characters")


def show_trace(trace_id: str, *, as_json: bool, **source) -> str:
    env = _find(trace_id, source)
    if as_json:
        return json.dumps(json.loads(env.to_json_bytes()), indent=2, ensure_ascii=False) + "\n"
    run = env.agent_run
    out = [
        f"trace     {env.trace_id}   version {env.envelope_version}   status {status_of(env)}",
        f"key       {env.idempotency_key}",
        f"source    {env.source.id} ({env.source.kind})" + (f"   repository {env.repository}" if env.repository else ""),
        f"received  {_time(env.received_at_unix_nano)}   assembled {_time(env.assembled_at_unix_nano)}",
        f"closed    {env.completeness.closed_reason}" + ("" if env.completeness.root_seen else "   (root span never seen)"),
        f"agent     {run.agent_name or '-'}   dialects {', '.join(run.dialects) or '-'}",
        f"task      {_excerpt(run.task_input, 200) or '-'}",
        f"output    {_excerpt(run.final_output, 200) or '-'}",
        f"usage     {run.usage.input_tokens} in / {run.usage.output_tokens} out tokens, "
        f"{len(run.llm_calls)} LLM calls, {len(run.tool_calls)} tool calls",
    ]
    if run.llm_calls:
        out.append("\nLLM calls")
        for c in run.llm_calls:
            tokens = f"{c.input_tokens if c.input_tokens is not None else '?'}/" \
                     f"{c.output_tokens if c.output_tokens is not None else '?'} tokens"
            finish = ",".join(c.finish_reasons) or "-"
            out.append(f"  {c.model or c.response_model or '?':24} finish {finish:12} {tokens}"
                       + (f"   ERROR {_excerpt(c.error, 80)}" if c.error else ""))
    if run.tool_calls:
        out.append("\nTool calls")
        for t in run.tool_calls:
            args = _excerpt(json.dumps(t.arguments, ensure_ascii=False) if t.arguments is not None else "", 60)
            line = f"  {t.name or '?'}({args})"
            if t.error:
                line += f"   ERROR {_excerpt(t.error, 80)}"
            elif t.result is not None:
                line += f" -> {_excerpt(json.dumps(t.result, ensure_ascii=False), 60)}"
            out.append(line)
    if run.errors:
        out.append("\nErrors")
        for e in run.errors:
            out.append(f"  {'FATAL ' if e.fatal else ''}{e.source}: {e.type or ''} {_excerpt(e.message, 120)}".rstrip())
    out.append(f"\nSpans ({len(env.spans)})")
    out.extend(_span_tree(env))
    if env.log_events:
        out.append(f"\nLog events ({len(env.log_events)})")
        for e in env.log_events[:50]:
            out.append(f"  {_time(e.time_unix_nano or e.observed_time_unix_nano)}  {e.event_name or '-'}")
    if env.redaction.masked:
        out.append("\nRedacted  " + ", ".join(f"{k}: {v}" for k, v in env.redaction.masked.items()))
    return "\n".join(out) + "\n"


def _span_tree(env: Envelope) -> list[str]:
    ids = {s.span_id for s in env.spans}
    children: dict[str, list] = {}
    for s in env.spans:
        children.setdefault(s.parent_span_id if s.parent_span_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            ms = max(0, s.end_time_unix_nano - s.start_time_unix_nano) / 1e6
            status = s.status_code + (f" {_excerpt(s.status_message, 60)}" if s.status_message else "")
            lines.append(f"  {'  ' * depth}{s.name}  {ms:.1f} ms  {status}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return lines
