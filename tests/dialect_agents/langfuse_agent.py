"""Langfuse dialect: the Langfuse Python SDK (v3+ is OpenTelemetry-based) with its ``@observe`` decorator for the
agent (``as_type="agent"``) and tool (``as_type="tool"``) observations, its ``langfuse.openai`` drop-in client for
the ``generation`` observations, and ``propagate_attributes`` for the trace's session and user ids.

Export is Langfuse's own: ``LangfuseSpanProcessor`` with its ``OTLPSpanExporter`` (Basic auth, ``x-langfuse-*``
headers), pointed at ``trace-source serve`` by ``base_url`` plus ``LANGFUSE_OTEL_TRACES_EXPORT_PATH=v1/traces``
(its default path is ``/api/public/otel/v1/traces``). Its export results are not counted (the processor does not
expose its exporter); the test checks that the spans landed instead.
``error``: the fake model answers HTTP 500.
"""

from __future__ import annotations

import os

from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, OTLP_URL, TASK, Harness, tool_loop
from _common import get_weather as weather_impl

SESSION_ID = "session-weather-1"
USER_ID = "user-42"

os.environ["LANGFUSE_OTEL_TRACES_EXPORT_PATH"] = "v1/traces"
os.environ.setdefault("LANGFUSE_TRACING_ENVIRONMENT", "dialect-test")
h = Harness("dialect-langfuse", export=False)

from langfuse import Langfuse, observe, propagate_attributes  # noqa: E402

langfuse = Langfuse(public_key="pk-lf-dialect", secret_key="sk-lf-dialect", base_url=OTLP_URL,
                    tracer_provider=h.tracer_provider, flush_at=1)

from langfuse.openai import OpenAI  # noqa: E402

client = OpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0)


@observe(name="get_weather", as_type="tool")
def get_weather(city: str) -> str:
    return weather_impl(city)


@observe(name="weather-agent", as_type="agent")
def run_agent(task: str, model: str) -> str:
    with propagate_attributes(session_id=SESSION_ID, user_id=USER_ID):
        return tool_loop(client, model, task, get_weather)


with h.scenario("ok") as info:
    info["output"] = run_agent(TASK, MODEL)
with h.scenario("error", expect_error=True) as info:
    info["output"] = run_agent(TASK, ERROR_MODEL)
langfuse.flush()
h.finish()
