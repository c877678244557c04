"""OTel GenAI dialect: ``opentelemetry-instrumentation-openai-v2`` around the ``openai`` client, with the agent and
tool spans made by ``opentelemetry-util-genai``'s ``TelemetryHandler`` (``invoke_local_agent`` -> ``invoke_agent``
span, ``tool`` -> ``execute_tool`` span), the helper that OTel's GenAI instrumentations use themselves.

The semconv mode comes from the environment, exactly as a user would set it:

* default: no ``OTEL_SEMCONV_STABILITY_OPT_IN``; ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
  openai-v2 then follows semconv v1.30: ``chat`` spans with ``gen_ai.system`` + log events ``gen_ai.user.message``,
  ``gen_ai.assistant.message``, ``gen_ai.tool.message``, ``gen_ai.choice``;
* latest: ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` and
  ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=span_and_event``: ``gen_ai.input.messages`` /
  ``gen_ai.output.messages`` on the spans and the ``gen_ai.client.inference.operation.details`` log event.

Scenarios: ``ok`` (task -> tool call -> tool -> final answer) and ``error`` (the fake model answers HTTP 500).
"""

from __future__ import annotations

import json
import os

from _common import ERROR_MODEL, LLM_BASE_URL, MODEL, TASK, TOOL_NAME, WEATHER_TOOL, Harness, get_weather
from _genai_agent import agent_span

mode = "latest" if "gen_ai_latest_experimental" in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "") else "default"
h = Harness(f"dialect-otel-genai-{mode}", logs=True)

import openai  # noqa: E402
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor  # noqa: E402
from opentelemetry.util.genai.handler import get_telemetry_handler  # noqa: E402
from opentelemetry.util.genai.types import InputMessage, OutputMessage, Text  # noqa: E402

OpenAIInstrumentor().instrument(tracer_provider=h.tracer_provider, logger_provider=h.logger_provider)
handler = get_telemetry_handler(tracer_provider=h.tracer_provider, logger_provider=h.logger_provider)
client = openai.OpenAI(base_url=LLM_BASE_URL, api_key="sk-fake", max_retries=0)


def run_agent(model: str) -> str:
    with agent_span(handler, model) as agent:
        agent.input_messages = [InputMessage(role="user", parts=[Text(content=TASK)])]
        messages: list[dict] = [{"role": "user", "content": TASK}]
        first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
        call = first.choices[0].message.tool_calls[0]
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        with handler.tool(call.function.name, tool_call_id=call.id, tool_type="function") as tool:
            args = json.loads(call.function.arguments)
            assert call.function.name == TOOL_NAME
            tool.arguments = args
            result = get_weather(**args)
            tool.tool_result = result
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
        answer = final.choices[0].message.content or ""
        agent.output_messages = [OutputMessage(role="assistant", parts=[Text(content=answer)], finish_reason="stop")]
        agent.input_tokens = (first.usage.prompt_tokens + final.usage.prompt_tokens)
        agent.output_tokens = (first.usage.completion_tokens + final.usage.completion_tokens)
        return answer


with h.scenario("ok") as info:
    info["output"] = run_agent(MODEL)
with h.scenario("error", expect_error=True) as info:
    info["output"] = run_agent(ERROR_MODEL)
h.finish()
