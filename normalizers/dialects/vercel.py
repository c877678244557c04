"""Vercel AI SDK legacy ``ai.*`` spans (v3–v6; ``LegacyOpenTelemetry()`` in v7): semconv §1 column
"Vercel-legacy" and §2.4. v7 ``OpenTelemetry()`` spans are GenAI-new and read by
:mod:`normalizers.dialects.genai`."""

from __future__ import annotations

from typing import Any

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects._base import SpanCtx, SpanView, decode_json, put, to_int, to_str
from normalizers.dialects._messages import genai_messages, last_text

NAME = "vercel-ai"

_LLM_OPS = frozenset({"ai.generateText.doGenerate", "ai.streamText.doStream", "ai.generateObject.doGenerate",
                      "ai.streamObject.doStream"})
_ROOT_OPS = frozenset({"ai.generateText", "ai.streamText", "ai.generateObject", "ai.streamObject"})
# (usage field, keys in precedence order): generateText writes promptTokens/completionTokens, streamText v5+
# inputTokens/outputTokens/..., v6 the *TokenDetails objects flattened (semconv §1 token rows, §2.4).
_USAGE_KEYS = (
    ("input_tokens", ("ai.usage.promptTokens", "ai.usage.inputTokens")),
    ("output_tokens", ("ai.usage.completionTokens", "ai.usage.outputTokens")),
    ("total_tokens", ("ai.usage.totalTokens",)),
    ("cache_read_input_tokens", ("ai.usage.cachedInputTokens", "ai.usage.inputTokenDetails.cacheReadTokens")),
    ("cache_creation_input_tokens", ("ai.usage.inputTokenDetails.cacheWriteTokens",)),
    ("reasoning_tokens", ("ai.usage.reasoningTokens", "ai.usage.outputTokenDetails.reasoningTokens")),
)


def detect(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """``ai.operationId``, ``operation.name`` starting with ``ai.``, or scope ``ai`` (semconv §3 rule 4)."""
    if not isinstance(item, CanonicalSpan):
        return False
    a = item.attributes
    return ("ai.operationId" in a or str(a.get("operation.name", "")).startswith("ai.")
            or item.scope.name == "ai")


def _usage(ctx: SpanCtx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, keys in _USAGE_KEYS:
        if (v := to_int(ctx.first(*keys))) is not None:
            out[field] = v
    return out


def _output_message(ctx: SpanCtx) -> dict[str, Any] | None:
    """``ai.response.{reasoning,text,object,toolCalls,finishReason}`` -> one assistant message."""
    a = ctx.attrs
    parts: list[dict[str, Any]] = []
    if a.get("ai.response.reasoning"):
        parts.append({"type": "reasoning", "content": a["ai.response.reasoning"]})
    for key in ("ai.response.text", "ai.response.object"):
        if a.get(key):
            parts.append({"type": "text", "content": to_str(a[key])})
    calls = ctx.json("ai.response.toolCalls")
    for tc in calls if isinstance(calls, list) else ():
        if isinstance(tc, dict):  # v4 `args`, v5+ `input`
            parts.append({"type": "tool_call", "id": to_str(tc.get("toolCallId")), "name": to_str(tc.get("toolName")),
                          "arguments": decode_json(tc["input"] if "input" in tc else tc.get("args"))})
    if not parts:
        return None
    msg: dict[str, Any] = {"role": "assistant", "parts": parts}
    if a.get("ai.response.finishReason"):
        msg["finish_reason"] = to_str(a["ai.response.finishReason"])
    return msg


def _prompt_text(prompt: Any) -> str | None:
    """Root ``ai.prompt`` = JSON ``{system, prompt, messages}`` -> ``prompt``, or the last user message of
    ``messages`` (semconv §1 "run task input")."""
    if isinstance(prompt, str):
        return prompt or None
    if not isinstance(prompt, dict):
        return None
    p = prompt.get("prompt")
    if isinstance(p, str) and p:
        return p
    return last_text(genai_messages(p if isinstance(p, list) else prompt.get("messages"), "user"), "user")


def _operation(ctx: SpanCtx) -> str:
    return to_str(ctx.attrs.get("ai.operationId")) or str(ctx.attrs.get("operation.name", "")).partition(" ")[0]


def span_kind(ctx: SpanCtx) -> str | None:
    """``ai.operationId``: step ops -> llm, ``ai.toolCall`` -> tool, root ops -> agent, ``ai.embed*``."""
    op = _operation(ctx)
    if op in _LLM_OPS:
        return "llm"
    if op == "ai.toolCall":
        return "tool"
    if op in _ROOT_OPS:
        return "agent"
    if op.startswith("ai.embed"):
        return "embedding"
    return None


def extract_span(ctx: SpanCtx, view: SpanView) -> None:
    a = ctx.attrs
    op = _operation(ctx)
    kind = view.kind
    if kind == "llm":
        d = view.llm
        put(d, "model", to_str(a.get("ai.model.id")))
        put(d, "response_model", to_str(a.get("ai.response.model")))
        # ai.model.provider is e.g. "openai.chat": the part before the dot is the provider.
        put(d, "provider", (to_str(a.get("ai.model.provider")) or "").partition(".")[0])
        put(d, "operation", op)
        put(d, "input_messages", genai_messages(ctx.json("ai.prompt.messages"), "user"))
        out = _output_message(ctx)
        if out is not None:
            put(d, "output_messages", [out])
        put(d, "finish_reasons", [out["finish_reason"]] if out and out.get("finish_reason") else [])
        for field, value in _usage(ctx).items():
            put(d, field, value)
    elif kind == "tool":
        t = view.tool
        put(t, "name", to_str(a.get("ai.toolCall.name")))
        put(t, "call_id", to_str(a.get("ai.toolCall.id")))
        put(t, "arguments", ctx.json("ai.toolCall.args"))
        put(t, "result", ctx.json("ai.toolCall.result"))
    elif kind == "agent":
        view.set("agent_name", a.get("ai.telemetry.functionId") or a.get("resource.name"))
        view.set("run_input", _prompt_text(ctx.json("ai.prompt")))
        view.set("run_output", to_str(a.get("ai.response.text") or a.get("ai.response.object")))
        if not view.aggregate_usage:
            view.aggregate_usage = _usage(ctx)
    view.set("session_id", ctx.first("ai.telemetry.metadata.sessionId", "ai.settings.context.sessionId"))
    view.set("user_id", ctx.first("ai.telemetry.metadata.userId", "ai.settings.context.userId"))
