"""Dialect tests from real instrumentation: real agents, real instrumentation packages, real OTLP exporters.

Each dialect's agent (``tests/dialect_agents/*.py``, ``tests/interop/js/dialect_vercel.mjs``) runs in its own process
(fresh global ``TracerProvider``) against the OpenAI-compatible fake model of ``tests/fake_llm.py`` and exports
through the instrumentation's usual OTLP/HTTP exporter into one ``trace-source serve`` (embedded log). Every agent runs
two turns of the same task, "What's the weather in Paris?":

* ``ok``: model asks for ``get_weather({"city": "Paris"})`` (usage 42/17) -> the agent runs the tool -> the model
  answers (usage 58/9);
* ``error``: the fake model answers HTTP 500 on the first call and the agent gives up.

The test then reads what landed, builds the agent-run view of each trace and checks: the dialect detected; task input
and final answer; both LLM calls with model and the fake server's token counts; the tool call with its name, call id,
arguments and result; and on the error run, the failed LLM call with an error on its span id (fatal on the run's root
when the dialect has a recognized root span). The grading rules (docs/grading.md) must pass every ``ok`` envelope and
grade every ``error`` envelope ``failed`` / ``provider_error``.

Dialects and the packages producing them (pinned in pyproject's ``test`` extra / ``tests/interop/js``):

========================  =========================================================================================
``otel-genai-default``    ``opentelemetry-instrumentation-openai-v2`` (semconv 1.30 mode: ``gen_ai.system`` spans +
                          ``gen_ai.*.message`` / ``gen_ai.choice`` log events), agent/tool spans from
                          ``opentelemetry-util-genai``
``otel-genai-latest``     the same with ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` and
                          ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=span_and_event``
``openinference``         ``openinference-instrumentation-openai`` + ``OITracer`` agent/tool decorators; the first
                          model call is streamed (SSE)
``openllmetry``           Traceloop's ``opentelemetry-instrumentation-openai`` (LLM spans only; see the script)
``pydantic-ai``           Pydantic AI's built-in instrumentation (``Agent.instrument_all()``)
``langfuse``              Langfuse SDK: ``@observe`` agent/tool, ``langfuse.openai`` generations, its own exporter
``vercel-legacy``         ``ai`` 7 + ``@ai-sdk/openai`` + ``@ai-sdk/otel`` ``LegacyOpenTelemetry`` (``ai.*`` spans),
                          OTel JS SDK OTLP/HTTP JSON exporter
``vercel-genai``          the same with ``OpenTelemetry()`` (v7 GenAI-semconv spans)
========================  =========================================================================================

Claude Code cannot run here (a proprietary CLI needing Anthropic's API); hand-written fixtures cover it.

Where the run view comes from: :data:`RUN_VIEW_SOURCE` (or ``TRACE_SOURCE_TEST_RUN_VIEW``). ``"envelope"`` (the
default) reads the assembler's ``<state_dir>/traces/<trace_id>.json`` envelope (polled until it holds every span)
and uses its ``agent_run``; ``"records"`` rebuilds it from the landed OTLP records with ``normalizers.canonical`` +
``normalizers.agent_run.build_agent_run`` (isolates the normalizer from the assembler when debugging).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import fake_llm
from fake_llm import FakeLLM
from normalizers.agent_run import AgentRun, build_agent_run
from normalizers.canonical import (
    CanonicalLogEvent,
    CanonicalSpan,
    log_events_from_logs_data,
    spans_from_traces_data,
)
from agent_process import run_agent_script
from normalizers.envelope import Envelope
from pipeline.grading.rules import grade_envelope
from serve_proc import ServeProcess
from sinks.local_log import LOG_FILENAME, LocalLogReader

#: ``"records"``: build the run view from the landed records; ``"envelope"``: read the assembler's envelope file.
#: ``TRACE_SOURCE_TEST_RUN_VIEW`` overrides it for one run.
RUN_VIEW_SOURCE = os.environ.get("TRACE_SOURCE_TEST_RUN_VIEW", "envelope")

TESTS_DIR = Path(__file__).resolve().parent
AGENTS_DIR = TESTS_DIR / "dialect_agents"
JS_DIR = TESTS_DIR / "interop" / "js"
LANDING_TIMEOUT_S = 60

TOOL_CALL_USAGES = [fake_llm.TOOL_CALL_USAGE, fake_llm.FINAL_USAGE]


@dataclass(frozen=True)
class Dialect:
    """One real-instrumentation agent and what its trace must show."""

    key: str
    command: tuple[str, ...]  # "python" / "node" are resolved at run time
    dialects: frozenset[str]  # expected AgentRun.dialects
    env: dict[str, str] = field(default_factory=dict)
    agent_name: str | None = "weather-agent"  # None: the dialect records no agent name
    tool_source: str = "span"  # where the run view finds the tool call ("messages": no tool span)
    root_recognized: bool = True  # the run's root span is a dialect run span -> its error is fatal
    error_model_recorded: bool = True  # the failed LLM span still names the requested model
    session_id: str | None = None  # exact session id expected ("*" = any non-empty)
    user_id: str | None = None
    streamed_first_call: bool = False
    counts_exports: bool = True  # the script can see its exporter's results
    logs: bool = False  # the instrumentation also exports OTLP log records

    @property
    def model(self) -> str:
        return f"gpt-fake-{self.key}"

    @property
    def error_model(self) -> str:
        return f"gpt-fake-error-{self.key}"


def _py(script: str) -> tuple[str, ...]:
    return ("python", str(AGENTS_DIR / script))


DIALECTS = [
    Dialect("otel-genai-default", _py("otel_genai.py"), frozenset({"otel-genai"}), logs=True,
            env={"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}),
    Dialect("otel-genai-latest", _py("otel_genai.py"), frozenset({"otel-genai"}), logs=True,
            env={"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental",
                 "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "span_and_event"}),
    # OpenInference LLM spans set llm.model_name from the response only; a failed call names its model only inside
    # llm.invocation_parameters / input.value.
    Dialect("openinference", _py("openinference_agent.py"), frozenset({"openinference"}),
            error_model_recorded=False, streamed_first_call=True),
    Dialect("openllmetry", _py("openllmetry_agent.py"), frozenset({"openllmetry"}), agent_name=None,
            tool_source="messages", root_recognized=False),
    Dialect("pydantic-ai", _py("pydantic_ai_agent.py"), frozenset({"pydantic-ai"}), session_id="*"),
    Dialect("langfuse", _py("langfuse_agent.py"), frozenset({"langfuse"}), agent_name=None,
            session_id="session-weather-1", user_id="user-42", counts_exports=False),
    Dialect("vercel-legacy", ("node", str(JS_DIR / "dialect_vercel.mjs")), frozenset({"vercel-ai"}),
            env={"VERCEL_TELEMETRY": "legacy"}),
    # v7's OpenTelemetry() integration speaks GenAI semconv (scope "gen_ai"), routed to the GenAI reader (§3 rule 4).
    Dialect("vercel-genai", ("node", str(JS_DIR / "dialect_vercel.mjs")), frozenset({"otel-genai"}),
            env={"VERCEL_TELEMETRY": "genai"}),
]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fake() -> Any:
    with FakeLLM() as server:
        yield server


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Envelope mode: close traces 1 s after their root ended instead of the assembler's default quiet period.
    env = {"TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": "1"} if RUN_VIEW_SOURCE == "envelope" else {}
    with ServeProcess(tmp_path_factory.mktemp("dialects") / "state", env=env) as proc:
        yield proc


@dataclass
class AgentReport:
    """What one agent process reported (see ``tests/dialect_agents/_common.py``) and how long it took."""

    dialect: Dialect
    scenarios: dict[str, dict[str, Any]]
    span_exports: list[str]
    log_exports: list[str]
    seconds: float
    stderr: str


@pytest.fixture(scope="module")
def run_agent(fake: FakeLLM, serve: ServeProcess) -> Any:
    """``run_agent(dialect) -> AgentReport``; each agent process runs once per module, shared by its tests."""
    cache: dict[str, AgentReport] = {}

    def run(d: Dialect) -> AgentReport:
        if d.key not in cache:
            cache[d.key] = _run_agent_process(d, fake, serve)
        return cache[d.key]

    return run


def _run_agent_process(d: Dialect, fake: FakeLLM, serve: ServeProcess) -> AgentReport:
    if d.command[0] == "node" and not (JS_DIR / "node_modules" / "ai").is_dir():
        pytest.fail(f"the Vercel AI SDK is not installed: run `make test`, or `npm ci` in {JS_DIR}", pytrace=False)
    out = run_agent_script(d.command, serve, fake.base_url, model=d.model, error_model=d.error_model, env=d.env,
                           label=d.key)
    return AgentReport(d, out.scenarios, out.span_exports, out.log_exports, out.seconds, out.stderr)


# ----------------------------------------------------------------------------------------------- run view


@dataclass
class Landed:
    spans: list[CanonicalSpan]
    log_events: list[CanonicalLogEvent]
    run: AgentRun
    envelope: Envelope | None = None  # in "envelope" mode


def _read_records(state_dir: Path, trace_id: str) -> tuple[list[CanonicalSpan], list[CanonicalLogEvent]]:
    """Spans (one per span id) and log records of ``trace_id`` in the embedded log."""
    spans: dict[str, CanonicalSpan] = {}
    events: list[CanonicalLogEvent] = []
    with LocalLogReader(state_dir / LOG_FILENAME) as reader:
        offset = 0
        while batch := reader.read(offset, 1000):
            for rec in batch:
                offset = rec.offset
                if rec.key != trace_id:
                    continue
                if rec.signal == "traces":
                    for s in spans_from_traces_data(rec.value):
                        if s.trace_id == trace_id:
                            spans.setdefault(s.span_id, s)
                elif rec.signal == "logs":
                    events.extend(e for e in log_events_from_logs_data(rec.value) if e.trace_id == trace_id)
    return list(spans.values()), events


def _from_records(state_dir: Path, trace_id: str, span_ids: set[str], logs: bool) -> Landed | None:
    spans, events = _read_records(state_dir, trace_id)
    if not span_ids <= {s.span_id for s in spans} or (logs and not events):
        return None
    return Landed(spans, events, build_agent_run(spans, events))


def _from_envelope(state_dir: Path, trace_id: str, span_ids: set[str], logs: bool) -> Landed | None:
    path = state_dir / "traces" / f"{trace_id}.json"
    try:
        envelope = Envelope.from_json_bytes(path.read_bytes())
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return None
    if not span_ids <= {s.span_id for s in envelope.spans} or (logs and not envelope.log_events):
        return None
    return Landed(envelope.spans, envelope.log_events, envelope.agent_run, envelope)


def landed_run(serve: ServeProcess, trace_id: str, span_ids: set[str], logs: bool) -> Landed:
    """The run view of ``trace_id`` once every span the agent ended (and, if expected, its log records) landed."""
    read = _from_envelope if RUN_VIEW_SOURCE == "envelope" else _from_records
    deadline = time.monotonic() + LANDING_TIMEOUT_S
    while True:
        got = read(serve.state_dir, trace_id, span_ids, logs)
        if got is not None:
            return got
        if time.monotonic() > deadline:
            spans, events = _read_records(serve.state_dir, trace_id)
            pytest.fail(f"trace {trace_id} did not fully land via {RUN_VIEW_SOURCE!r} in {LANDING_TIMEOUT_S}s: "
                        f"expected spans {sorted(span_ids)}, log has {sorted(s.span_id for s in spans)} and "
                        f"{len(events)} log records\nserve log:\n{serve.log_tail()}")
        time.sleep(0.2)


def scenario_run(report: AgentReport, name: str, serve: ServeProcess) -> tuple[dict[str, Any], Landed]:
    """Check what the agent process says about scenario ``name``, then return it with the landed run view."""
    d = report.dialect
    sc = report.scenarios[name]
    assert len(sc["trace_ids"]) == 1, f"[{d.key}] {name}: expected one trace, got {sc['trace_ids']}"
    if d.counts_exports:
        assert report.span_exports and set(report.span_exports) == {"SUCCESS"}, report.span_exports
    if d.logs:
        assert report.log_exports and set(report.log_exports) == {"SUCCESS"}, (
            f"[{d.key}] the instrumentation should have exported OTLP log records (export results: "
            f"{report.log_exports}); for otel-genai-default, opentelemetry-instrumentation-openai-v2 keeps its "
            f"semconv-1.30 event mode only with opentelemetry-util-genai 0.4b0 (1.x always uses the latest "
            f"conventions)\nagent stderr: {report.stderr[-3000:]}")
    span_ids = {s["span_id"] for s in sc["spans"]}
    landed = landed_run(serve, sc["trace_ids"][0], span_ids, d.logs)
    assert {s.span_id for s in landed.spans} == span_ids, f"[{d.key}] landed spans differ from the ended ones"
    print(f"[{d.key}] {name}: trace {sc['trace_ids'][0]}, {len(landed.spans)} spans, "
          f"{len(landed.log_events)} log records, run view via {RUN_VIEW_SOURCE}")
    return sc, landed


# --------------------------------------------------------------------------- recorded-form tolerance helpers


def decoded(value: Any) -> Any:
    """``value`` with one JSON string layer removed when it decodes to a string (Vercel records a tool's string
    result JSON-serialized: ``"\\"sunny, 22C\\""``)."""
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except ValueError:
            return value
        if isinstance(inner, str):
            return inner
    return value


def call_arguments(value: Any) -> Any:
    """Tool arguments as a dict. Accepts a JSON string and the ``{"args": [], "kwargs": {...}}`` wrapper that
    decorator-based SDKs (Langfuse ``@observe``, Traceloop ``@tool``) record around keyword-only calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, dict) and set(value) == {"args", "kwargs"} and value["args"] == []:
        return value["kwargs"]
    return value


def _root(landed: Landed) -> CanonicalSpan:
    ids = {s.span_id for s in landed.spans}
    roots = [s for s in landed.spans if not s.parent_span_id or s.parent_span_id not in ids]
    assert len(roots) == 1, [s.name for s in roots]
    return roots[0]


# What each instrumentation put on the wire, checked on the raw records so a package that silently switched
# conventions (e.g. a util-genai release that ignores OTEL_SEMCONV_STABILITY_OPT_IN) cannot pass as another dialect.


def _names(landed: Landed) -> list[str]:
    return [s.name for s in landed.spans]


def _wire_otel_genai_default(landed: Landed) -> None:
    chats = [s for s in landed.spans if s.name.startswith("chat ")]
    assert len(chats) == 2, _names(landed)
    for s in chats:
        assert s.scope.name == "opentelemetry.instrumentation.openai_v2", s.scope
        assert s.attributes.get("gen_ai.system") == "openai", s.attributes
        assert "gen_ai.provider.name" not in s.attributes and "gen_ai.input.messages" not in s.attributes
    assert {e.event_name for e in landed.log_events} == {
        "gen_ai.user.message", "gen_ai.assistant.message", "gen_ai.tool.message", "gen_ai.choice"}


def _wire_otel_genai_latest(landed: Landed) -> None:
    chats = [s for s in landed.spans if s.name.startswith("chat ")]
    assert len(chats) == 2, _names(landed)
    for s in chats:
        assert s.attributes.get("gen_ai.provider.name") == "openai", s.attributes
        assert "gen_ai.input.messages" in s.attributes and "gen_ai.output.messages" in s.attributes
    assert {e.event_name for e in landed.log_events} == {"gen_ai.client.inference.operation.details"}


def _wire_openinference(landed: Landed) -> None:
    kinds = sorted(s.attributes.get("openinference.span.kind", "") for s in landed.spans)
    assert kinds == ["AGENT", "LLM", "LLM", "TOOL"], kinds


def _wire_openllmetry(landed: Landed) -> None:
    llm = [s for s in landed.spans if s.name == "openai.chat"]
    assert len(llm) == 2, _names(landed)
    assert all(s.scope.name.startswith("opentelemetry.instrumentation.openai") for s in llm)


def _wire_pydantic_ai(landed: Landed) -> None:
    assert {s.scope.name for s in landed.spans} == {"pydantic-ai"}
    assert sorted(s.attributes.get("gen_ai.operation.name", "") for s in landed.spans) == [
        "chat", "chat", "execute_tool", "invoke_agent"]


def _wire_langfuse(landed: Landed) -> None:
    assert {s.scope.name for s in landed.spans} == {"langfuse-sdk"}
    assert sorted(s.attributes.get("langfuse.observation.type", "") for s in landed.spans) == [
        "agent", "generation", "generation", "tool"]


def _wire_vercel_legacy(landed: Landed) -> None:
    assert {s.scope.name for s in landed.spans} == {"ai"}
    assert sorted(s.attributes.get("ai.operationId", "") for s in landed.spans) == [
        "ai.generateText", "ai.generateText.doGenerate", "ai.generateText.doGenerate", "ai.toolCall"]


def _wire_vercel_genai(landed: Landed) -> None:
    assert {s.scope.name for s in landed.spans} == {"gen_ai"}
    ops = sorted(s.attributes.get("gen_ai.operation.name", "") for s in landed.spans)
    assert {"invoke_agent", "chat", "execute_tool"} <= set(ops) and ops.count("chat") == 2, ops


WIRE_CHECKS = {
    "otel-genai-default": _wire_otel_genai_default,
    "otel-genai-latest": _wire_otel_genai_latest,
    "openinference": _wire_openinference,
    "openllmetry": _wire_openllmetry,
    "pydantic-ai": _wire_pydantic_ai,
    "langfuse": _wire_langfuse,
    "vercel-legacy": _wire_vercel_legacy,
    "vercel-genai": _wire_vercel_genai,
}
assert set(WIRE_CHECKS) == {d.key for d in DIALECTS}


def _describe(run: AgentRun) -> str:
    return json.dumps(run.model_dump(mode="json"), indent=1)[:6000]


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("d", DIALECTS, ids=lambda d: d.key)
def test_ok_run(d: Dialect, run_agent: Any, serve: ServeProcess, fake: FakeLLM) -> None:
    report = run_agent(d)
    sc, landed = scenario_run(report, "ok", serve)
    run = landed.run
    where = f"[{d.key}] run view:\n{_describe(run)}"
    assert sc["error"] is None, sc.get("traceback") or sc["error"]
    assert sc["output"] == fake_llm.FINAL_ANSWER
    WIRE_CHECKS[d.key](landed)

    # The fake model saw the whole loop: tool call turn, then the tool's result went back and got the answer.
    seen = fake.seen(model=d.model)
    assert [r.kind for r in seen] == ["tool_call", "final"], [(r.kind, r.status) for r in seen]
    assert seen[0].stream is d.streamed_first_call
    tool_msgs = [m for m in seen[1].body["messages"] if m.get("role") == "tool"]
    assert [(m.get("tool_call_id"), m.get("content")) for m in tool_msgs] == [
        (fake_llm.TOOL_CALL_ID, fake_llm.TOOL_RESULT)], seen[1].body["messages"]

    assert set(run.dialects) == d.dialects, where
    assert run.task_input and "weather in Paris" in run.task_input, where
    assert run.final_output == fake_llm.FINAL_ANSWER, where
    if d.agent_name is not None:
        assert run.agent_name == d.agent_name, where
    if d.session_id == "*":
        assert run.session_id, where
    elif d.session_id is not None:
        assert run.session_id == d.session_id, where
    if d.user_id is not None:
        assert run.user_id == d.user_id, where

    # LLM calls: one per model request, in order, with the fake server's model and usage.
    span_ids = {s.span_id for s in landed.spans}
    assert len(run.llm_calls) == 2, where
    for call, (prompt, completion) in zip(run.llm_calls, TOOL_CALL_USAGES):
        assert call.span_id in span_ids, where
        assert call.model == d.model, where
        assert (call.input_tokens, call.output_tokens) == (prompt, completion), where
        assert call.error is None, where
        assert call.content_captured, where
    assert run.llm_calls[0].start_time_unix_nano <= run.llm_calls[1].start_time_unix_nano
    assert run.usage.input_tokens == sum(p for p, _ in TOOL_CALL_USAGES), where
    assert run.usage.output_tokens == sum(c for _, c in TOOL_CALL_USAGES), where
    assert run.usage.llm_call_count == 2, where
    assert run.usage.tool_call_count == 1, where

    # The tool call: name, call id, arguments and result.
    assert len(run.tool_calls) == 1, where
    tool = run.tool_calls[0]
    assert tool.name == fake_llm.TOOL_NAME, where
    assert tool.call_id == fake_llm.TOOL_CALL_ID, where
    assert call_arguments(tool.arguments) == fake_llm.TOOL_ARGUMENTS, where
    assert decoded(tool.result) == fake_llm.TOOL_RESULT, where
    assert tool.error is None, where
    assert tool.source == d.tool_source, where
    assert tool.span_id in span_ids, where
    if d.tool_source == "span":
        tool_span = next(s for s in landed.spans if s.span_id == tool.span_id)
        assert tool_span.start_time_unix_nano >= run.llm_calls[0].start_time_unix_nano, where

    assert not run.errors, where

    # The grader passes the run (docs/grading.md); in "records" mode there is no envelope to grade.
    if landed.envelope is not None:
        grade = grade_envelope(landed.envelope)
        assert (grade.verdict, grade.category) == ("passed", "none"), grade.model_dump_json(indent=1)


@pytest.mark.parametrize("d", DIALECTS, ids=lambda d: d.key)
def test_error_run(d: Dialect, run_agent: Any, serve: ServeProcess, fake: FakeLLM) -> None:
    report = run_agent(d)
    sc, landed = scenario_run(report, "error", serve)
    run = landed.run
    where = f"[{d.key}] run view:\n{_describe(run)}"
    assert sc["error"] and "fake upstream failure" in sc["error"], sc
    assert [(r.kind, r.status) for r in fake.seen(model=d.error_model)] == [("error", fake_llm.ERROR_STATUS)]

    assert set(run.dialects) == d.dialects, where
    assert run.task_input and "weather in Paris" in run.task_input, where
    assert run.final_output is None, where
    assert run.tool_calls == [], where
    assert (run.usage.input_tokens, run.usage.output_tokens) == (0, 0), where

    # The failed model request is an LLM call carrying the error.
    assert len(run.llm_calls) == 1, where
    failed = run.llm_calls[0]
    assert failed.error and "fake upstream failure" in failed.error, where
    if d.error_model_recorded:
        assert failed.model == d.error_model, where
    assert failed.input_tokens is None and failed.output_tokens is None, where

    # An error signal on that call's span id, with the server's message.
    on_call = [e for e in run.errors if e.span_id == failed.span_id]
    assert on_call, where
    assert any(e.message and "fake upstream failure" in e.message for e in on_call), where
    assert all(e.span_id in {s.span_id for s in landed.spans} for e in run.errors), where

    # The run failed: its root span (a dialect run span) carries a fatal error.
    root = _root(landed)
    assert root.status_code == "ERROR", where
    if d.root_recognized:
        fatal = [e for e in run.errors if e.fatal]
        assert fatal and {e.span_id for e in fatal} == {root.span_id}, where
        assert not [e for e in run.errors if e.fatal and e.span_id == failed.span_id], where

    # The grader blames the provider (HTTP 500), quoting the failed call, and does not ask to reproduce it.
    if landed.envelope is not None:
        grade = grade_envelope(landed.envelope)
        assert (grade.verdict, grade.category, grade.reproduce) == ("failed", "provider_error", False), \
            grade.model_dump_json(indent=1)
        assert failed.span_id in {e.span_id for e in grade.evidence}


def test_fake_llm_streams_and_fails() -> None:
    """The fake model's own contract, through the real ``openai`` client: plain, streamed (with and without the
    usage chunk) and failing requests."""
    import openai

    with FakeLLM() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-fake", max_retries=0)
        messages: list[dict[str, Any]] = [{"role": "user", "content": fake_llm.TASK}]
        first = client.chat.completions.create(model="m", messages=messages, tools=[fake_llm.WEATHER_TOOL])
        call = first.choices[0].message.tool_calls[0]
        assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
            fake_llm.TOOL_CALL_ID, fake_llm.TOOL_NAME, fake_llm.TOOL_ARGUMENTS)
        assert first.choices[0].finish_reason == "tool_calls"
        assert (first.usage.prompt_tokens, first.usage.completion_tokens) == fake_llm.TOOL_CALL_USAGE

        chunks = list(client.chat.completions.create(model="m", messages=messages, tools=[fake_llm.WEATHER_TOOL],
                                                     stream=True, stream_options={"include_usage": True}))
        args = "".join(tc.function.arguments or "" for c in chunks for ch in c.choices
                       for tc in ch.delta.tool_calls or [])
        assert json.loads(args) == fake_llm.TOOL_ARGUMENTS
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == fake_llm.TOOL_CALL_USAGE

        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": fake_llm.TOOL_RESULT}]
        streamed = client.chat.completions.create(model="m", messages=messages, stream=True)
        parts = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == fake_llm.FINAL_ANSWER
        assert all(c.usage is None for c in parts)  # no include_usage -> no usage chunk, like OpenAI

        with pytest.raises(openai.InternalServerError, match="fake upstream failure"):
            client.chat.completions.create(model="gpt-fake-error", messages=messages)
        assert [r.kind for r in server.requests] == ["tool_call", "tool_call", "final", "error"]
