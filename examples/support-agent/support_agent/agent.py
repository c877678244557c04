"""The support agent: a plain tool loop over the OpenAI chat completions API.

One run = one customer message (the task). The model is offered ``lookup_order`` and ``refund_order``
(:mod:`support_agent.orders`); every tool call it asks for is executed and its result (or error) goes back to it,
until it answers in text. A failing tool does not stop the run: its error is given to the model as the tool's
result, as most agents do, and the model decides what to tell the customer.

Telemetry: the run is an ``invoke_agent support-agent`` span (task and answer as its input/output messages), each
tool call an ``execute_tool <name>`` span (arguments and result as ``gen_ai.tool.call.arguments`` /
``gen_ai.tool.call.result`` when content capture is on; status ERROR and ``error.type`` = the exception class when
the tool raised). The ``chat`` spans come from the OpenAI instrumentation (:mod:`support_agent.telemetry`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.util.genai.handler import TelemetryHandler
from opentelemetry.util.genai.types import InputMessage, OutputMessage, Text
from opentelemetry.util.genai.utils import should_capture_content_on_spans_in_experimental_mode

from support_agent.orders import TOOL_SCHEMAS, OrderStore

AGENT_NAME = "support-agent"
SYSTEM_PROMPT = ("You are the customer-support agent of an online shop. Look the order up with lookup_order before "
                 "anything else; refund delivered orders with refund_order when the customer asks for it. Answer the "
                 "customer in one or two sentences.")


class TurnLimitExceeded(RuntimeError):
    pass


@dataclass
class ToolStep:
    """One tool call as executed: ``result`` is what went back to the model (the error payload when it failed)."""

    name: str
    call_id: str
    arguments: Any
    result: Any
    error: str | None = None


@dataclass
class RunResult:
    answer: str
    steps: list[ToolStep] = field(default_factory=list)
    trace_id: str | None = None


class SupportAgent:
    """``client``: an ``openai.OpenAI``; ``handler``: the GenAI telemetry handler (a no-op one when ``None``);
    ``temperature`` / ``seed``: sampling parameters sent with every request (``seed`` only when not ``None``)."""

    def __init__(self, client: Any, store: OrderStore, *, model: str, temperature: float = 0.0,
                 seed: int | None = None, handler: TelemetryHandler | None = None, max_turns: int = 6) -> None:
        self.client = client
        self.store = store
        self.model = model
        self.temperature = temperature
        self.seed = seed
        self.handler = handler or TelemetryHandler()
        self.max_turns = max_turns
        self.tools = {"lookup_order": store.lookup_order, "refund_order": store.refund_order}

    def run(self, task: str) -> RunResult:
        """Answer one customer message. Raises what the OpenAI client raises (the run's span then ends in error)
        and :class:`TurnLimitExceeded` when the model keeps calling tools."""
        with self.handler.invoke_local_agent("openai", request_model=self.model) as agent:
            agent.agent_name = AGENT_NAME
            agent.input_messages = [InputMessage(role="user", parts=[Text(content=task)])]
            ctx = agent.span.get_span_context()
            result = RunResult(answer="", trace_id=f"{ctx.trace_id:032x}")
            messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": task}]
            for _ in range(self.max_turns):
                extra = {"seed": self.seed} if self.seed is not None else {}
                reply = self.client.chat.completions.create(model=self.model, messages=messages, tools=TOOL_SCHEMAS,
                                                            temperature=self.temperature, **extra)
                message = reply.choices[0].message
                messages.append(message.model_dump(exclude_none=True))
                if not message.tool_calls:
                    result.answer = message.content or ""
                    agent.output_messages = [OutputMessage(role="assistant", parts=[Text(content=result.answer)],
                                                           finish_reason=reply.choices[0].finish_reason or "stop")]
                    return result
                for call in message.tool_calls:
                    step = self.call_tool(call.function.name, call.id, call.function.arguments)
                    result.steps.append(step)
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(step.result)})
            raise TurnLimitExceeded(f"no answer after {self.max_turns} model turns")

    def call_tool(self, name: str, call_id: str, raw_arguments: str) -> ToolStep:
        """Run one tool call inside its ``execute_tool`` span; a tool exception becomes the step's error."""
        tool = self.handler.start_tool(name, tool_call_id=call_id, tool_type="function")
        capture = should_capture_content_on_spans_in_experimental_mode()
        if capture:
            tool.attributes["gen_ai.tool.call.arguments"] = raw_arguments
        arguments: Any = raw_arguments
        try:
            arguments = json.loads(raw_arguments or "{}")
            output = self.tools[name](**arguments)
        except Exception as exc:  # noqa: BLE001 - whatever the tool raised is reported to the model
            step = ToolStep(name, call_id, arguments, {"error": type(exc).__name__, "message": str(exc)},
                            error=f"{type(exc).__name__}: {exc}")
            if capture:
                tool.attributes["gen_ai.tool.call.result"] = json.dumps(step.result)
            tool.fail(exc)
            return step
        if capture:
            tool.attributes["gen_ai.tool.call.result"] = json.dumps(output)
        tool.stop()
        return ToolStep(name, call_id, arguments, output)
