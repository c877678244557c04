"""Grading corpus, OTel GenAI: ``opentelemetry-instrumentation-openai-v2`` (semconv latest mode, content on spans)
around the ``openai`` client, agent and tool spans from ``opentelemetry-util-genai``'s ``TelemetryHandler`` — the
same stack as ``otel_genai.py``, running a small multi-turn agent loop (task -> model -> tools -> model ... ->
answer, at most ``MAX_TURNS`` model calls) through the labeled scenarios of ``tests/test_grading_corpus.py``.

The fake model's behaviour per scenario comes from the model name (``tests/fake_llm.py`` "scripts"). Scenarios:

* ``success``, ``success_no_tools`` (no tools offered), ``local_root`` (the success run inside a context extracted
  from a W3C ``traceparent`` carrier, so the agent's top span has a remote parent);
* ``tool_raised``: the tool raises and the agent lets it escape;
* ``recovered``: the tool times out once; the agent returns the error to the model, which calls it again;
* ``false_success``: the tool returns ``{"ok": false, ...}``, the model answers as if it had worked;
* ``loop``: the model calls the tool again and again; the agent stops at ``MAX_TURNS`` without an answer;
* ``refusal``: the model refuses;
* ``provider_error``: the model answers HTTP 500;
* ``crashed_mid_run``: the agent's own span never ends (the process stops mid-run), so its trace has no root.
"""

from __future__ import annotations

import json
import os
import secrets

from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, TASK, Harness, get_weather, tool_loop
from _genai_agent import agent_span
from corpus_tools import TIMED_OUT, FlakyWeather, failing_result_weather, raising_weather

os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")
os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "span_only")
h = Harness("corpus-otel-genai")

import openai  # noqa: E402
from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor  # noqa: E402
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: E402
from opentelemetry.util.genai.handler import get_telemetry_handler  # noqa: E402
from opentelemetry.util.genai.types import InputMessage, OutputMessage, Text  # noqa: E402

OpenAIInstrumentor().instrument(tracer_provider=h.tracer_provider)
handler = get_telemetry_handler(tracer_provider=h.tracer_provider)
client = openai.OpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0)
MAX_TURNS = 4


def traced_tool(call: dict, tool) -> str:
    """One tool call inside an ``execute_tool`` span (a raising tool marks it ERROR and re-raises)."""
    with handler.tool(call["function"]["name"], tool_call_id=call["id"], tool_type="function") as span:
        args = json.loads(call["function"]["arguments"])
        span.arguments = args
        span.tool_result = tool(**args)
        return span.tool_result


def run_agent(model: str, tool=get_weather, *, offer_tools: bool = True, catch: bool = False) -> str:
    """The agent (``_common.tool_loop``, at most ``MAX_TURNS`` model calls) inside its ``invoke_agent`` span."""
    with agent_span(handler, model) as agent:
        agent.input_messages = [InputMessage(role="user", parts=[Text(content=TASK)])]
        answer = tool_loop(client, model, TASK, tool, offer_tools=offer_tools, max_turns=MAX_TURNS, catch=catch,
                           run_tool=traced_tool)
        if answer:
            agent.output_messages = [OutputMessage(role="assistant", parts=[Text(content=answer)],
                                                   finish_reason="stop")]
        return answer


def crashed_mid_run() -> str:
    """The agent's process stops mid-run: its own ``invoke_agent`` span never ends, so it is never exported, while
    its model and tool spans are — a trace without its root."""
    root = h.tracer_provider.get_tracer("weather-agent").start_span(
        "invoke_agent weather-agent", attributes={"gen_ai.operation.name": "invoke_agent",
                                                  "gen_ai.agent.name": "weather-agent"})
    token = otel_context.attach(trace.set_span_in_context(root))
    try:
        return tool_loop(client, MODEL, TASK, get_weather, run_tool=traced_tool)
    finally:
        otel_context.detach(token)  # and no root.end(): the crash


def in_remote_context(fn):
    """Run ``fn`` under a span context extracted from a ``traceparent`` header, as an API server does for a
    request whose caller traces elsewhere."""
    carrier = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
    token = otel_context.attach(TraceContextTextMapPropagator().extract(carrier))
    try:
        return fn()
    finally:
        otel_context.detach(token)


SCENARIOS = {
    "success": lambda: run_agent(MODEL),
    "success_no_tools": lambda: run_agent(MODEL, offer_tools=False),
    "local_root": lambda: in_remote_context(lambda: run_agent(MODEL)),
    "crashed_mid_run": crashed_mid_run,
    "tool_raised": lambda: run_agent(MODEL, raising_weather),
    "recovered": lambda: run_agent(f"{MODEL}+retry", FlakyWeather(TimeoutError(TIMED_OUT)), catch=True),
    "false_success": lambda: run_agent(MODEL, failing_result_weather),
    "loop": lambda: run_agent(f"{MODEL}+loop"),
    "refusal": lambda: run_agent(f"{MODEL}+refuse"),
    "provider_error": lambda: run_agent(ERROR_MODEL),
}

h.run_all(SCENARIOS)
