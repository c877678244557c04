"""OpenInference dialect: ``openinference-instrumentation-openai`` around the ``openai`` client (LLM spans), with the
agent and tool spans made by ``openinference-instrumentation``'s ``OITracer`` decorators (``@tracer.agent``,
``@tracer.tool``), the package's own API for hand-built agents.

The ``ok`` scenario streams the first model call (SSE, ``stream_options.include_usage``) and makes the second one
plain, so both response paths of the instrumentation are exercised. ``error``: the fake model answers HTTP 500.
"""

from __future__ import annotations


from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, TASK, WEATHER_TOOL, Harness, tool_loop
from _common import get_weather as weather_impl

h = Harness("dialect-openinference")

import openai  # noqa: E402
from openinference.instrumentation import OITracer, TraceConfig  # noqa: E402
from openinference.instrumentation.openai import OpenAIInstrumentor  # noqa: E402

OpenAIInstrumentor().instrument(tracer_provider=h.tracer_provider)
tracer = OITracer(h.tracer_provider.get_tracer("weather-agent"), config=TraceConfig())
client = openai.OpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0)


@tracer.tool(name="get_weather", description="Current weather for a city.")
def get_weather(city: str) -> str:
    return weather_impl(city)


def first_call(model: str, messages: list[dict]) -> dict:
    """The tool-call turn, streamed; returns the assistant message as a dict."""
    stream = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL], stream=True,
                                            stream_options={"include_usage": True})
    calls: dict[int, dict] = {}
    content = ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.id or slot["id"]
                if tc.function is not None:
                    slot["function"]["name"] += tc.function.name or ""
                    slot["function"]["arguments"] += tc.function.arguments or ""
    message: dict = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


@tracer.agent(name="weather-agent")
def run_agent(task: str, model: str) -> str:
    return tool_loop(client, model, task, get_weather, first_call)


with h.scenario("ok") as info:
    info["output"] = run_agent(TASK, MODEL)
with h.scenario("error", expect_error=True) as info:
    info["output"] = run_agent(TASK, ERROR_MODEL)
h.finish()
