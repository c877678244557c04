"""Pydantic AI (instrumentation versions 1–6) and Logfire integrations: semconv §1 column "PAI", §2.6, and the
Logfire bridge for the OpenAI Agents SDK (§1 "OpenAI Agents SDK").

Pydantic AI v3+ spans are GenAI-new (``invoke_agent``/``chat``/``execute_tool``), so this reader adds only what
the shared ``gen_ai.*`` reader cannot know: the run span's ``pydantic_ai.all_messages`` / ``final_result`` /
``gen_ai.aggregated_usage.*``, the v≤2 names and keys (``agent run``, ``running tool``, ``agent_name``,
``tool_arguments``, ``tool_response``) and the v1 ``events`` / ``all_messages_events`` arrays. Logfire adds the
``request_data``/``response_data`` payloads of ``instrument_openai`` (version 1), the OpenAI Agents span shapes
and ``logfire.level_num``/``error`` failures.
"""

from __future__ import annotations

from typing import Any

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects import genai
from normalizers.dialects._base import SpanCtx, SpanView, put, to_int, to_str
from normalizers.dialects._messages import first_text, genai_messages, payload_text, provider_messages

NAME = "pydantic-ai"
LOGFIRE_NAME = "logfire"

_PAI_KEYS = ("pydantic_ai.all_messages", "final_result", "model_request_parameters", "gen_ai.agent.call.id",
             "all_messages_events", "tool_arguments")
_LOGFIRE_ERROR_LEVEL = 17  # logfire.level_num: warn 13, error 17, fatal 21
# logfire.openai_agents message templates -> kind (semconv §1 "OpenAI Agents SDK").
_AGENTS_KINDS = (("Agent run", "agent"), ("Function:", "tool"), ("Responses API", "llm"), ("Handoff", "handoff"),
                 ("Guardrail", "guardrail"))


def _is_logfire_scope(name: str) -> bool:
    return name == "logfire" or name.startswith("logfire.")


def detect(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """Scope ``pydantic-ai``, a Pydantic-AI-only key, ``gen_ai.aggregated_usage.*``, or (v1 format) an ``events``
    array outside Logfire scopes, whose OpenAI integration uses the same key (semconv §3 rule 5)."""
    if not isinstance(item, CanonicalSpan):
        return False
    a = item.attributes
    return (item.scope.name == "pydantic-ai" or not a.keys().isdisjoint(_PAI_KEYS)
            or (ctx or SpanCtx(item)).has_prefix("gen_ai.aggregated_usage")
            or ("events" in a and not _is_logfire_scope(item.scope.name)))


def detect_logfire(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """Scope ``logfire.*``, or ``logfire.msg_template`` / ``logfire.span_type`` (semconv §3 rule 6)."""
    if not isinstance(item, CanonicalSpan):
        return False
    a = item.attributes
    return _is_logfire_scope(item.scope.name) or "logfire.msg_template" in a or "logfire.span_type" in a


def _event_messages(ctx: SpanCtx, key: str) -> dict[str, Any]:
    """v1 ``events`` / ``all_messages_events`` = JSON array of ``{"event.name": "gen_ai.user.message", …body}``
    -> LlmCall message fields, parsed like the GenAI events they mirror."""
    d: dict[str, Any] = {}
    items = ctx.json(key)
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict):
            genai.apply_message_event(str(item.get("event.name", "")), item, d)
    return d


def span_kind(ctx: SpanCtx) -> str | None:
    """Kinds the GenAI operation name cannot give: Logfire OpenAI Agents message templates, v≤2 span names
    (``agent run``, ``running tool``), run-span payload keys, and model spans known only by their payload (v1
    ``events``, Logfire ``request_data``)."""
    span, a = ctx.span, ctx.attrs
    if span.scope.name == "logfire.openai_agents":
        template = str(a.get("logfire.msg_template") or span.name)
        for prefix, kind in _AGENTS_KINDS:
            if template.startswith(prefix):
                return kind
    if span.name == "agent run" or "pydantic_ai.all_messages" in a or "all_messages_events" in a:
        return "agent"
    if span.name == "running tool":
        return "tool"
    if "events" in a or "request_data" in a:
        return "llm"
    return None


def extract_span(ctx: SpanCtx, view: SpanView) -> None:
    a = ctx.attrs
    kind = view.kind
    # The OpenAI Agents bridge exports raw span_data fields: `name`, `input`, `output` (semconv §1).
    agents = ctx.span.scope.name == "logfire.openai_agents"
    if kind == "agent":
        view.set("agent_name", a.get("gen_ai.agent.name") or a.get("agent_name")
                 or (a.get("name") if agents else None))
        msgs = genai_messages(a.get("pydantic_ai.all_messages"), "user")
        if not msgs and "all_messages_events" in a:
            msgs = _event_messages(ctx, "all_messages_events").get("input_messages", [])
        view.set("run_input", first_text(msgs, "user"))
        view.set("run_output", payload_text(a.get("final_result"), output=True))
        if not view.aggregate_usage:
            view.aggregate_usage = (genai.usage_fields(a, "gen_ai.aggregated_usage.")
                                    or genai.usage_fields(a, "gen_ai.usage."))
    elif kind == "tool":
        t = view.tool
        put(t, "arguments", ctx.json("gen_ai.tool.call.arguments"))
        put(t, "arguments", ctx.json("tool_arguments"))  # v≤2
        put(t, "result", ctx.json("gen_ai.tool.call.result"))
        put(t, "result", ctx.json("tool_response"))
        if agents:
            put(t, "name", to_str(a.get("name")))
            put(t, "arguments", ctx.json("input"))
            put(t, "result", ctx.json("output"))
    elif kind == "llm":
        d = view.llm
        for field, value in _event_messages(ctx, "events").items():
            put(d, field, value)
        put(d, "input_messages", provider_messages(ctx.json("request_data"), output=False))
        put(d, "output_messages", provider_messages(ctx.json("response_data"), output=True))
        put(d, "output_messages", provider_messages(ctx.json("response"), output=True))
    level = to_int(a.get("logfire.level_num"))
    err = ctx.json("error")
    if isinstance(err, dict):  # OpenAI Agents error data {message, data}
        data = err.get("data")
        view.add_error(None, err.get("message") if data is None else f"{err.get('message')}: {to_str(data)}")
    elif level is not None and level >= _LOGFIRE_ERROR_LEVEL:
        view.add_error(None, to_str(err) or a.get("logfire.msg"))
