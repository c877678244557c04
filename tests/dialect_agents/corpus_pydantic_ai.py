"""Grading corpus, Pydantic AI: its built-in instrumentation (``Agent.instrument_all()``, instrumentation version 5)
and its own agent loop, tool retries (``ModelRetry``) and usage limits, against the fake model — the same stack as
``pydantic_ai_agent.py``, through the labeled scenarios of ``tests/test_grading_corpus.py``:

* ``success``, ``success_no_tools`` (an agent without tools);
* ``tool_raised``: the tool raises ``ConnectionError``, which escapes ``run_sync``;
* ``recovered``: the tool raises ``ModelRetry`` once (Pydantic AI sends the retry prompt to the model, which calls
  the tool again);
* ``false_success``: the tool returns ``{"ok": false, ...}``, the model answers as if it had worked;
* ``turn_limit``: the model keeps calling the tool; ``UsageLimits(request_limit=3)`` stops the run with
  ``UsageLimitExceeded``;
* ``refusal``: the model refuses;
* ``provider_error``: the model answers HTTP 500 (``max_retries=0``).
"""

from __future__ import annotations

from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, TASK, Harness, get_weather
from corpus_tools import TIMED_OUT, FlakyWeather, failing_result_weather, raising_weather

h = Harness("corpus-pydantic-ai")

import openai  # noqa: E402
from pydantic_ai import Agent, ModelRetry  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402
from pydantic_ai.usage import UsageLimits  # noqa: E402

Agent.instrument_all()
provider = OpenAIProvider(openai_client=openai.AsyncOpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0))


def make_agent(model: str, tool=get_weather) -> Agent:
    agent = Agent(OpenAIChatModel(model, provider=provider), name="weather-agent", retries=2,
                  instructions="You answer weather questions. Use the get_weather tool.")
    if tool is not None:
        @agent.tool_plain
        def get_weather(city: str) -> str:  # noqa: F811 - the tool the model calls, backed by ``tool``
            """Current weather for a city."""
            return tool(city)
    return agent


def run(model: str, tool=get_weather, **kwargs) -> str:
    return make_agent(model, tool).run_sync(TASK, **kwargs).output


SCENARIOS = {
    "success": lambda: run(MODEL),
    "success_no_tools": lambda: run(MODEL, None),
    "tool_raised": lambda: run(MODEL, raising_weather),
    "recovered": lambda: run(f"{MODEL}+retry", FlakyWeather(ModelRetry(TIMED_OUT))),
    "false_success": lambda: run(MODEL, failing_result_weather),
    "turn_limit": lambda: run(f"{MODEL}+loop", usage_limits=UsageLimits(request_limit=3)),
    "refusal": lambda: run(f"{MODEL}+refuse"),
    "provider_error": lambda: run(ERROR_MODEL),
}

h.run_all(SCENARIOS)
