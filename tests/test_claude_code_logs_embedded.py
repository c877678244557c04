"""Acceptance: a Claude Code session that exports only log events (no spans, no trace ids) becomes one envelope per
prompt (semconv §2.7 "Without traces, rebuild a run from logs by ``session.id`` + ``prompt.id``").

Real parts end to end: the OpenTelemetry Python SDK (``LoggerProvider`` + the OTLP/HTTP log exporter) emits
Claude-Code-shaped records (scope ``com.anthropic.claude_code.events``, resource ``service.name=claude-code``, full
event name in the body, short one in ``event.name``, the §2.7 common attributes) -> ``trace-source serve`` (embedded
log, in-process assembler) -> ``<state_dir>/traces/<synthetic trace id>.json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
from opentelemetry.sdk.resources import Resource

from assembler_support import wait_for
from interop_support import RecordingLogExporter, landed_local, log_records_of, metric
from normalizers.envelope import Envelope
from serve_proc import ServeProcess
from sinks.base import prompt_trace_id

SESSION = "9d1c5b3e-6a2f-4e8d-b7c0-2f4a6e8c0d13"
PROMPT_1 = "3f8e2a6c-1b5d-4c9e-a7f0-6d2b8e4a1c21"
PROMPT_2 = "c4a7e1d9-8b3f-4a6c-9e2d-5f1b7c3a9e32"
T0 = 1_760_000_000_000_000_000
ENV = {"TRACE_SOURCE_ASSEMBLER_PROMPT_QUIET_PERIOD_S": "1", "TRACE_SOURCE_ASSEMBLER_COMMIT_INTERVAL_S": "0.2"}
_BIN = Path(sys.executable).with_name("trace-source")


class ClaudeCode:
    """Emits events the way Claude Code does (``CLAUDE_CODE_ENABLE_TELEMETRY=1``, ``OTEL_LOGS_EXPORTER=otlp``)."""

    def __init__(self, serve: ServeProcess) -> None:
        self.provider = LoggerProvider(resource=Resource.create({
            "service.name": "claude-code", "service.version": "2.0.14", "os.type": "linux",
            "host.arch": "amd64"}), shutdown_on_exit=False)
        self.exporter = RecordingLogExporter(OTLPLogExporter(endpoint=f"{serve.http_url}/v1/logs", timeout=30))
        # Only force_flush exports: each flush below is one request (so a request mixes prompts, and a prompt
        # spans requests).
        self.provider.add_log_record_processor(BatchLogRecordProcessor(self.exporter, schedule_delay_millis=60_000))
        self.logger = self.provider.get_logger("com.anthropic.claude_code.events", "2.0.14")
        self.sequence = 0

    def event(self, name: str, prompt_id: str | None, **attrs) -> None:
        self.sequence += 1
        t = T0 + self.sequence * 2_000_000_000
        common = {"session.id": SESSION, "user.id": "f3b1c2d4e5", "organization.id": "org-7",
                  "user.account_uuid": "acct-1", "app.version": "2.0.14", "terminal.type": "vscode",
                  "event.name": name, "event.timestamp": "2025-10-09T08:53:20.000Z",
                  "event.sequence": self.sequence}
        if prompt_id is not None:
            common["prompt.id"] = prompt_id
        self.logger.emit(body=f"claude_code.{name}", timestamp=t, severity_number=SeverityNumber.INFO,
                         attributes={**common, **attrs})

    def flush(self) -> None:
        assert self.provider.force_flush(30_000)

    def close(self) -> None:
        self.provider.shutdown()


def run_session(cc: ClaudeCode) -> None:
    """Two prompts of one session in three export requests, plus a session-level event without a prompt."""
    cc.event("user_prompt", PROMPT_1, prompt="Fix the failing test in tests/test_utils.py", prompt_length=43)
    cc.event("api_request", PROMPT_1, model="claude-sonnet-4-5", input_tokens=1200, output_tokens=310,
             cache_read_tokens=5000, cache_creation_tokens=100, cost_usd=0.0123, duration_ms=1800,
             request_id="req_01")
    cc.event("tool_result", PROMPT_1, tool_name="Read", tool_use_id="toolu_01", success="true", duration_ms=12,
             tool_result_size_bytes=2048)
    cc.event("mcp_server_connection", None, status="connected", server_scope="user")  # no prompt.id
    cc.flush()
    cc.event("tool_result", PROMPT_1, tool_name="Bash", tool_use_id="toolu_02", success="false",
             error_type="exit_code", duration_ms=900)
    cc.event("api_request", PROMPT_1, model="claude-sonnet-4-5", input_tokens=1500, output_tokens=200,
             cache_read_tokens=6000, duration_ms=1500, request_id="req_02")
    cc.event("assistant_response", PROMPT_1, response="Fixed the off-by-one in utils.slice_window.",
             response_length=43, model="claude-sonnet-4-5")
    cc.event("user_prompt", PROMPT_2, prompt="Now run the whole test suite", prompt_length=28)
    cc.flush()
    cc.event("api_request", PROMPT_2, model="claude-sonnet-4-5", input_tokens=900, output_tokens=120,
             duration_ms=1100, request_id="req_03")
    cc.event("tool_result", PROMPT_2, tool_name="Bash", tool_use_id="toolu_03", success="true", duration_ms=1500)
    cc.event("api_error", PROMPT_2, model="claude-sonnet-4-5", error="Overloaded", status_code="529",
             duration_ms=300, attempt=1)
    cc.flush()


def envelope_files(state_dir: Path) -> dict[str, Envelope]:
    traces = state_dir / "traces"
    return {p.stem: Envelope.from_json_bytes(p.read_bytes()) for p in traces.glob("*.json")} if traces.is_dir() else {}


def test_claude_code_log_only_session_becomes_one_envelope_per_prompt(tmp_path: Path):
    state = tmp_path / "state"
    one_id, two_id = prompt_trace_id(SESSION, PROMPT_1).hex(), prompt_trace_id(SESSION, PROMPT_2).hex()
    with ServeProcess(state, env=ENV) as serve:
        cc = ClaudeCode(serve)
        try:
            run_session(cc)
        finally:
            cc.close()
        assert cc.exporter.results == [LogRecordExportResult.SUCCESS] * 3
        files = wait_for(lambda: (f := envelope_files(state)) and set(f) >= {one_id, two_id} and f,
                         f"envelopes of both prompts under {state}/traces", timeout_s=60)
        assert set(files) == {one_id, two_id}
        assert metric(serve.http_url, "trace_source_assembler_envelopes_total",
                      reason="quiet") == 2
        assert metric(serve.http_url, "trace_source_assembler_untraced_log_records_total") == 1
        # The receiver keyed each prompt's records by its synthetic id (prompt 1 across two requests).
        landed = log_records_of(landed_local(state))
        keys = {}
        for ls in landed:
            keys.setdefault(ls.record.key, []).append(ls.span.body.string_value)
        assert sorted(map(len, keys.values())) == [1, 4, 6]
        assert keys[None] == ["claude_code.mcp_server_connection"]
        assert all(not ls.span.trace_id for ls in landed)  # records stored as sent

    one, two = files[one_id], files[two_id]
    for env, prompt_id in ((one, PROMPT_1), (two, PROMPT_2)):
        assert env.trace_id == prompt_trace_id(SESSION, prompt_id).hex() and env.envelope_version == 1
        assert env.spans == [] and env.completeness.root_seen is False
        assert env.completeness.closed_reason == "quiet"
        assert env.source.kind == "otlp-http" and env.resource["service.name"] == "claude-code"
        assert all(e.trace_id == "" and e.attributes["prompt.id"] == prompt_id for e in env.log_events)
        assert all(e.scope.name == "com.anthropic.claude_code.events" for e in env.log_events)
        seqs = [e.attributes["event.sequence"] for e in env.log_events]
        assert seqs == sorted(seqs)
        run = env.agent_run
        assert run.dialects == ["claude-code"] and run.agent_name == "claude-code"
        assert run.session_id == SESSION and run.user_id == "f3b1c2d4e5"
    assert [e.event_name for e in one.log_events] == [
        "user_prompt", "api_request", "tool_result", "tool_result", "api_request", "assistant_response"]
    assert [e.event_name for e in two.log_events] == ["user_prompt", "api_request", "tool_result", "api_error"]

    run = one.agent_run
    assert run.task_input == "Fix the failing test in tests/test_utils.py"
    assert run.final_output == "Fixed the off-by-one in utils.slice_window."
    assert [(c.model, c.provider, c.input_tokens, c.output_tokens) for c in run.llm_calls] == [
        ("claude-sonnet-4-5", "anthropic", 1200, 310), ("claude-sonnet-4-5", "anthropic", 1500, 200)]
    assert run.usage.model_dump() == {
        "input_tokens": 2700, "output_tokens": 510, "total_tokens": 3210, "cache_read_input_tokens": 11000,
        "cache_creation_input_tokens": 100, "reasoning_tokens": 0, "llm_call_count": 2, "tool_call_count": 2}
    assert [(t.name, t.call_id, t.error, t.source) for t in run.tool_calls] == [
        ("Read", "toolu_01", None, "log-event"), ("Bash", "toolu_02", "exit_code", "log-event")]
    assert [(e.type, e.fatal) for e in run.errors] == [("exit_code", False)]  # the model went on: evidence only

    run = two.agent_run
    assert run.task_input == "Now run the whole test suite" and run.final_output is None
    assert [(c.input_tokens, c.output_tokens) for c in run.llm_calls] == [(900, 120)]
    assert [(t.name, t.error) for t in run.tool_calls] == [("Bash", None)]
    # api_error with no api_request after it in the prompt: the run stalled (semconv §4, hard failure).
    assert [(e.type, e.message, e.fatal, e.source) for e in run.errors] == [
        ("claude_code.api_error", "529: Overloaded", True, "log-event")]
    # The traces listing reads them like any other trace.
    listing = subprocess.run([str(_BIN), "traces", "--state-dir", str(state)], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert one_id in listing and two_id in listing and "Now run the whole test suite" in listing
