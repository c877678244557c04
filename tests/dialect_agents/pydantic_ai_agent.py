"""Pydantic AI dialect: its built-in OpenTelemetry instrumentation, switched on with ``Agent.instrument_all()``
(Pydantic AI 2.x dropped the ``Agent(..., instrument=True)`` argument; ``instrument_all`` and the ``Instrumentation``
capability remain), default ``InstrumentationSettings`` (instrumentation version 5, content included), and
``OpenAIChatModel`` pointed at the fake model through ``OpenAIProvider``. The agent registers ``get_weather`` as a
tool; Pydantic AI runs it itself and traces it as an ``execute_tool`` span.

``error``: the fake model answers HTTP 500 (``max_retries=0`` on the OpenAI client), which escapes ``run_sync``.
"""

from __future__ import annotations

from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, TASK, Harness
from _common import get_weather as weather_impl

h = Harness("dialect-pydantic-ai")

import openai  # noqa: E402
from pydantic_ai import Agent  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402

Agent.instrument_all()  # the global TracerProvider set by the Harness
provider = OpenAIProvider(openai_client=openai.AsyncOpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0))


def make_agent(model: str) -> Agent:
    agent = Agent(OpenAIChatModel(model, provider=provider), name="weather-agent",
                  instructions="You answer weather questions. Use the get_weather tool.")

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return weather_impl(city)

    return agent


with h.scenario("ok") as info:
    info["output"] = make_agent(MODEL).run_sync(TASK).output
with h.scenario("error", expect_error=True) as info:
    info["output"] = make_agent(ERROR_MODEL).run_sync(TASK).output
h.finish()
