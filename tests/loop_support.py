"""Helpers for the loop's tests: envelopes of agent runs built the way the assembler builds them (canonical GenAI
spans → agent-run view → envelope), reading the journal, and waiting for what a running ``serve`` writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

from normalizers.agent_run import build_agent_run
from normalizers.canonical import CanonicalSpan, Scope, SpanEvent
from normalizers.envelope import Completeness, Envelope, Source, envelope_idempotency_key
from pipeline.journal import JournalEvent
from pipeline.journal.jsonl import read_events

_T = TypeVar("_T")

T0 = 1_700_000_000_000_000_000
RESOURCE = {"service.name": "loop-test-agent"}


def _span(trace_id: str, n: int, parent: int | None, name: str, attrs: dict, *, status: str = "OK",
          message: str = "", exception: tuple[str, str] | None = None) -> CanonicalSpan:
    events = []
    if exception:
        events.append(SpanEvent(name="exception", time_unix_nano=T0 + 900 + n,
                                attributes={"exception.type": exception[0], "exception.message": exception[1]}))
    return CanonicalSpan(trace_id=trace_id, span_id=f"{n + 1:016x}", parent_span_id="" if parent is None
                         else f"{parent + 1:016x}", name=name, kind="INTERNAL", start_time_unix_nano=T0 + n,
                         end_time_unix_nano=T0 + 1000 + n, status_code=status, status_message=message,
                         attributes=attrs, events=events, resource=RESOURCE, scope=Scope(name="loop-test"))


def agent_envelope(i: int, *, tool_fails: bool) -> Envelope:
    """An OTel GenAI agent run: ``invoke_agent`` root → ``execute_tool lookup_order``; with ``tool_fails`` the tool
    raises and the run ends in ERROR (a task failure), else the tool answers and the run ends OK."""
    trace_id = f"{0xA000 + i:032x}"
    task = f"Where is order A-{1000 + i}?"
    root_attrs = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support",
                  "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text",
                                                                                 "content": task}]}])}
    tool_attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order",
                  "gen_ai.tool.call.id": f"call_{i}", "gen_ai.tool.call.arguments": json.dumps({"order_id": f"A-{i}"})}
    if tool_fails:
        tool = _span(trace_id, 1, 0, "execute_tool lookup_order", tool_attrs, status="ERROR",
                     message="order database unreachable", exception=("ConnectionError", "order database unreachable"))
        root = _span(trace_id, 0, None, "invoke_agent support", root_attrs, status="ERROR",
                     message="tool lookup_order failed", exception=("ConnectionError", "order database unreachable"))
    else:
        tool_attrs["gen_ai.tool.call.result"] = json.dumps({"order_id": f"A-{i}", "status": "shipped"})
        tool = _span(trace_id, 1, 0, "execute_tool lookup_order", tool_attrs)
        root_attrs["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "finish_reason": "stop", "parts": [
            {"type": "text", "content": f"Order A-{i} has shipped."}]}])
        root = _span(trace_id, 0, None, "invoke_agent support", root_attrs)
    spans = [root, tool]
    return Envelope(idempotency_key=envelope_idempotency_key(trace_id, spans), trace_id=trace_id,
                    source=Source(id="loop-test", kind="otlp-http"), received_at_unix_nano=T0,
                    assembled_at_unix_nano=T0 + 5000,
                    completeness=Completeness(root_seen=True, closed_reason="root-ended-and-quiet"),
                    resource=RESOURCE, spans=spans, agent_run=build_agent_run(spans, []))


def failing_envelope(i: int) -> Envelope:
    return agent_envelope(i, tool_fails=True)


def passing_envelope(i: int) -> Envelope:
    return agent_envelope(i, tool_fails=False)


def journal(state_dir: Path) -> list[JournalEvent]:
    return read_events(Path(state_dir) / "runs.jsonl")


def phase_events(state_dir: Path, phase: str, trace_id: str | None = None) -> list[JournalEvent]:
    return [e for e in journal(state_dir) if e.phase == phase and (trace_id is None or e.trace_id == trace_id)]


def emit_runs(otlp_url: str, failing: list[bool], *, service: str = "loop-test-agent") -> list[str]:
    """Export one GenAI agent run per entry through the real OTel SDK (OTLP/HTTP protobuf) to ``otlp_url``: an
    ``invoke_agent`` root with an ``execute_tool lookup_order`` child; a failing run's tool raises and the run ends
    in ERROR. Returns the trace ids (32 hex) in order."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Status, StatusCode

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_url}/v1/traces", timeout=30)))
    tracer = provider.get_tracer("loop-test")
    ids = []
    for i, fail in enumerate(failing):
        task = f"Where is order A-{i}?"
        with tracer.start_as_current_span("invoke_agent support", attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support",
                "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": task}]}])
        }) as root:
            ids.append(f"{root.get_span_context().trace_id:032x}")
            with tracer.start_as_current_span("execute_tool lookup_order", attributes={
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order",
                    "gen_ai.tool.call.arguments": json.dumps({"order_id": f"A-{i}"})}) as tool:
                if fail:
                    tool.record_exception(ConnectionError("order database unreachable"))
                    tool.set_status(Status(StatusCode.ERROR, "order database unreachable"))
                else:
                    tool.set_attribute("gen_ai.tool.call.result", json.dumps({"status": "shipped"}))
            if fail:
                root.record_exception(ConnectionError("order database unreachable"))
                root.set_status(Status(StatusCode.ERROR, "tool lookup_order failed"))
            else:
                root.set_attribute("gen_ai.output.messages", json.dumps([{"role": "assistant", "finish_reason": "stop",
                                                                          "parts": [{"type": "text",
                                                                                     "content": "It shipped."}]}]))
    provider.shutdown()
    return ids


def poll(read: Callable[[], _T | None], what: str, serve: Any, timeout_s: float = 60.0) -> _T:
    """``read()`` every 0.2 s until it returns something other than ``None`` (a missing or half-written file —
    ``FileNotFoundError`` / ``ValueError`` — counts as not yet); fails the test after ``timeout_s`` with ``serve``'s
    log tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (found := read()) is not None:
                return found
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not there after {timeout_s:g}s\nserve log:\n{serve.log_tail()}")
        time.sleep(0.2)


def wait_envelope(serve: Any, trace_id: str, ready: Callable[[Envelope], bool], timeout_s: float = 60.0) -> Envelope:
    """The assembled ``<state_dir>/traces/<trace_id>.json`` of a running ``serve`` once ``ready(envelope)``."""
    path = serve.state_dir / "traces" / f"{trace_id}.json"

    def read() -> Envelope | None:
        env = Envelope.from_json_bytes(path.read_bytes())
        return env if ready(env) else None

    return poll(read, f"envelope of trace {trace_id}", serve, timeout_s)
