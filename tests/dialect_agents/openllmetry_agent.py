"""OpenLLMetry / Traceloop dialect: ``opentelemetry-instrumentation-openai`` (Traceloop's package) around the
``openai`` client.

Only the LLM spans come from OpenLLMetry. Its workflow/agent/tool spans come from the ``traceloop-sdk`` decorators,
and ``traceloop-sdk`` cannot be installed next to this project's OpenTelemetry SDK (it pulls in ~40 instrumentation
packages, one of which pins an older ``opentelemetry-instrumentation``), so the agent here is what a user of the bare
instrumentation package writes: one plain span of their own around the turn (no dialect attributes; the default
``record_exception``/``set_status_on_exception`` of ``start_as_current_span``) and an untraced tool function. The
tool call is therefore only visible inside the LLM messages.

Content capture is on (``TRACELOOP_TRACE_CONTENT`` defaults to true). ``error``: the fake model answers HTTP 500.
"""

from __future__ import annotations

from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, TASK, Harness, get_weather, tool_loop

h = Harness("dialect-openllmetry")

import openai  # noqa: E402
from opentelemetry.instrumentation.openai import OpenAIInstrumentor  # noqa: E402

OpenAIInstrumentor().instrument(tracer_provider=h.tracer_provider)
tracer = h.tracer_provider.get_tracer("weather-agent")
client = openai.OpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0)


def run_agent(model: str) -> str:
    with tracer.start_as_current_span("weather-agent"):
        return tool_loop(client, model, TASK, get_weather)


with h.scenario("ok") as info:
    info["output"] = run_agent(MODEL)
with h.scenario("error", expect_error=True) as info:
    info["output"] = run_agent(ERROR_MODEL)
h.finish()
