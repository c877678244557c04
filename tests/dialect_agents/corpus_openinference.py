"""Grading corpus, OpenInference: ``openinference-instrumentation-openai`` around the ``openai`` client (LLM spans),
agent and tool spans from ``openinference-instrumentation``'s ``OITracer`` decorators — the same stack as
``openinference_agent.py``, running ``_common.tool_loop`` through some labeled scenarios of
``tests/test_grading_corpus.py``: ``success``, ``tool_raised``, ``recovered`` (the tool times out once, the error
goes back to the model, which calls it again), ``false_success``, ``refusal``, ``provider_error``.
"""

from __future__ import annotations

from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, TASK, Harness, get_weather, tool_loop
from corpus_tools import TIMED_OUT, FlakyWeather, failing_result_weather, raising_weather

h = Harness("corpus-openinference")

import openai  # noqa: E402
from openinference.instrumentation import OITracer, TraceConfig  # noqa: E402
from openinference.instrumentation.openai import OpenAIInstrumentor  # noqa: E402

OpenAIInstrumentor().instrument(tracer_provider=h.tracer_provider)
tracer = OITracer(h.tracer_provider.get_tracer("weather-agent"), config=TraceConfig())
client = openai.OpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0)


def traced(impl):
    """``impl`` as the agent's ``get_weather`` tool, traced as an OpenInference TOOL span."""
    @tracer.tool(name="get_weather", description="Current weather for a city.")
    def get_weather(city: str) -> str:
        return impl(city)
    return get_weather


@tracer.agent(name="weather-agent")
def run_agent(task: str, model: str, tool, catch: bool = False) -> str:
    return tool_loop(client, model, task, tool, catch=catch)


h.run_all({
    "success": lambda: run_agent(TASK, MODEL, traced(get_weather)),
    "tool_raised": lambda: run_agent(TASK, MODEL, traced(raising_weather)),
    "recovered": lambda: run_agent(TASK, f"{MODEL}+retry", traced(FlakyWeather(TimeoutError(TIMED_OUT))), True),
    "false_success": lambda: run_agent(TASK, MODEL, traced(failing_result_weather)),
    "refusal": lambda: run_agent(TASK, f"{MODEL}+refuse", traced(get_weather)),
    "provider_error": lambda: run_agent(TASK, ERROR_MODEL, traced(get_weather)),
})
