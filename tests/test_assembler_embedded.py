"""Acceptance, embedded shape: real OTel SDK exporters -> ``trace-source serve`` (no broker) -> the in-process
assembler -> ``<state_dir>/traces/<trace_id>.json``.

Exporter-retry duplicates collapse; late spans give version 2 holding the whole trace; ``kill -9`` of serve while
traces are open loses nothing and does not re-version traces already written; poison input lands in
``<state_dir>/dlq/``; ``trace-source traces`` lists and shows the files.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from assembler_support import AgentClient, free_port, wait_for
from interop_support import metric
from normalizers.envelope import Envelope
from serve_proc import ServeProcess
from sinks.base import Batch, Record
from sinks.local_log import LocalLogSink

_BIN = Path(sys.executable).with_name("trace-source")
QUIET = {"TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": "0.5", "TRACE_SOURCE_ASSEMBLER_COMMIT_INTERVAL_S": "0.2"}


def envelope_files(state_dir: Path) -> dict[str, Envelope]:
    traces = state_dir / "traces"
    if not traces.is_dir():
        return {}
    return {p.stem: Envelope.from_json_bytes(p.read_bytes()) for p in traces.glob("*.json")}


def wait_for_envelopes(state_dir: Path, expected: dict[str, set[str]], version: int = 1) -> dict[str, Envelope]:
    def ready():
        files = envelope_files(state_dir)
        return files if all(t in files and {s.span_id for s in files[t].spans} == expected[t]
                            and files[t].envelope_version == version for t in expected) else None
    return wait_for(ready, f"{len(expected)} envelopes (version {version}) under {state_dir}/traces")


def test_exporters_to_trace_files_with_duplicates_and_cli(tmp_path):
    state = tmp_path / "state"
    with ServeProcess(state, env=QUIET) as serve:
        expected: dict[str, set[str]] = {}
        for transport in ("http", "grpc"):
            client = AgentClient(serve, transport)
            expected.update(client.complete_traces(3))
            client.resend_all()  # exporter-retry duplicates
            client.close()
        files = wait_for_envelopes(state, expected)
        n_spans = sum(len(s) for s in expected.values())
        wait_for(lambda: metric(serve.http_url, "trace_source_assembler_duplicates_dropped_total", kind="span")
                 == n_spans, "every resent span counted as a duplicate")
        mtimes = {p: p.stat().st_mtime_ns for p in (state / "traces").glob("*.json")}
        for trace_id, env in files.items():
            assert env.trace_id == trace_id and env.completeness.closed_reason == "root-ended-and-quiet"
            assert env.source.kind in ("otlp-http", "otlp-grpc") and env.agent_run.agent_name == "planner"
        assert metric(serve.http_url, "trace_source_assembler_envelopes_total",
                      reason="root-ended-and-quiet") == len(expected)
        # No leftover temp files from the atomic writes.
        assert not [p for p in (state / "traces").iterdir() if p.suffix != ".json"]

        listing = subprocess.run([str(_BIN), "traces", "--state-dir", str(state)], capture_output=True, text=True,
                                 check=True, timeout=60).stdout
        assert listing.splitlines()[0].split()[:4] == ["TRACE", "ID", "AGENT", "TASK"]
        assert all(t in listing for t in expected) and listing.count("planner") == len(expected)
        trace_id = next(iter(expected))
        shown = subprocess.run([str(_BIN), "traces", "show", trace_id[:12], "--state-dir", str(state)],
                               capture_output=True, text=True, check=True, timeout=60).stdout
        assert trace_id in shown and "execute_tool search step-0" in shown and "gpt-4o" in shown
        as_json = subprocess.run([str(_BIN), "traces", "--state-dir", str(state), "show", trace_id, "--json"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout
        assert Envelope.model_validate_json(as_json).idempotency_key == files[trace_id].idempotency_key
    # Nothing rewrote the files after the duplicates (still version 1, same bytes).
    assert {p: p.stat().st_mtime_ns for p in (state / "traces").glob("*.json")} == mtimes


def test_late_span_gives_version_two_with_the_whole_trace(tmp_path):
    state = tmp_path / "state"
    with ServeProcess(state, env=QUIET) as serve:
        client = AgentClient(serve, "http")
        expected = client.complete_traces(1)
        [(trace_id, span_ids)] = expected.items()
        first = wait_for_envelopes(state, expected)[trace_id]
        # A span of the same trace arriving after it was closed (e.g. a slow background task).
        parent = SpanContext(int(trace_id, 16), int(sorted(span_ids)[0], 16), is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
        ctx = otel_trace.set_span_in_context(NonRecordingSpan(parent))
        with client.tracer.start_as_current_span("late background task", context=ctx) as late:
            late_id = format(late.get_span_context().span_id, "016x")
        client.close()
        second = wait_for_envelopes(state, {trace_id: span_ids | {late_id}}, version=2)[trace_id]
        assert second.idempotency_key != first.idempotency_key
        assert metric(serve.http_url, "trace_source_assembler_late_versions_total") == 1


def test_kill_9_while_traces_are_open_loses_nothing(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    serve = ServeProcess(state, "--port", str(port), env={**QUIET,
                                                          "TRACE_SOURCE_ASSEMBLER_MAX_WAIT_S": "600"}).start()
    client = AgentClient(serve, "http")
    try:
        done = client.complete_traces(2)
        before = wait_for_envelopes(state, done)
        open_ids, roots = client.open_traces(3)
        client.resend_all()
        wait_for(lambda: metric(serve.http_url, "trace_source_assembler_open_traces") == 3, "3 open traces")
        mtimes = {p: p.stat().st_mtime_ns for p in (state / "traces").glob("*.json")}
        serve.kill()
        serve.start()  # same port: the exporter keeps its endpoint
        for root in roots:
            root.end()
        after = wait_for_envelopes(state, {**done, **open_ids})
        for trace_id in open_ids:
            assert after[trace_id].completeness.root_seen
        for trace_id in done:  # recognized from its file after the restart: neither rewritten nor re-versioned
            assert after[trace_id].idempotency_key == before[trace_id].idempotency_key
        assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    finally:
        client.close()
        serve.stop()


def test_poison_record_goes_to_the_dlq_directory(tmp_path):
    state = tmp_path / "state"
    with ServeProcess(state, env=QUIET) as serve:
        garbage = b"\x0a\xff\xff\xff\xff\x0f not protobuf"

        async def write() -> None:  # a second writer on the same log, like a foreign producer
            sink = LocalLogSink(state, fsync=False)
            await sink.start()
            try:
                await sink.write(Batch([Record(b"e" * 32, garbage, "traces", 1)], "intruder", 123))
            finally:
                await sink.stop()

        asyncio.run(write())
        [dead] = wait_for(lambda: list((state / "dlq").glob("*.json")) if (state / "dlq").is_dir() else None,
                          "a dead letter file")
        letter = json.loads(dead.read_text())
        assert base64.b64decode(letter["value_base64"]) == garbage
        assert "not an OTLP TracesData" in letter["headers"]["error"]
        assert letter["headers"]["source-id"] == "intruder" and letter["headers"]["original-key"] == "e" * 32
        assert metric(serve.http_url, "trace_source_assembler_dlq_records_total", cause="undecodable") == 1
        # The assembler carries on.
        client = AgentClient(serve, "grpc")
        wait_for_envelopes(state, client.complete_traces(1))
        client.close()
