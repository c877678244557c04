"""Langfuse native OTel attributes (``langfuse.trace.*``, ``langfuse.observation.*``): semconv §1 column "LF"
and §2.5."""

from __future__ import annotations

from typing import Any

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects._base import SpanCtx, SpanView, compact_json, decode_json, put, to_int, to_str
from normalizers.dialects._messages import genai_messages, payload_text, provider_messages, text_message

NAME = "langfuse"

# langfuse.observation.type -> SpanView.kind; span, event, guardrail, evaluator keep their own names.
_TYPES = {"generation": "llm", "embedding": "embedding", "agent": "agent", "tool": "tool", "chain": "chain",
          "retriever": "retriever"}


def detect(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """Any ``langfuse.*`` key (observation, trace, and the compat ``langfuse.session.id``/``langfuse.user.id``)
    or scope ``langfuse-sdk`` (semconv §3 rule 1)."""
    if not isinstance(item, CanonicalSpan):
        return False
    return item.scope.name == "langfuse-sdk" or (ctx or SpanCtx(item)).has_prefix("langfuse")


def _messages(value: Any, output: bool) -> list[dict[str, Any]]:
    """``langfuse.observation.input``/``output`` (any JSON) -> messages: a message list or message, a provider
    payload, else one text message holding the value (compact JSON when structured)."""
    role = "assistant" if output else "user"
    v = decode_json(value)
    if isinstance(v, list) or (isinstance(v, dict) and ("role" in v or "parts" in v)):
        return genai_messages(v, role)
    return provider_messages(v, output) or [text_message(role, v if isinstance(v, str) else compact_json(v))]


def _usage(details: Any) -> dict[str, int]:
    """``langfuse.observation.usage_details`` (free-form JSON object of counts) -> usage fields. Langfuse's own
    keys are ``input``/``output``/``total``; provider spellings and cache/reasoning keys are matched by name."""
    if not isinstance(details, dict):
        return {}
    out: dict[str, int] = {}
    for key, raw in details.items():
        v = to_int(raw)
        if v is None:
            continue
        k = key.lower()
        if k in ("input", "prompt_tokens", "input_tokens"):
            field = "input_tokens"
        elif k in ("output", "completion_tokens", "output_tokens"):
            field = "output_tokens"
        elif k in ("total", "total_tokens"):
            field = "total_tokens"
        elif "cache_read" in k or "cached" in k:
            field = "cache_read_input_tokens"
        elif "cache_creation" in k or "cache_write" in k:
            field = "cache_creation_input_tokens"
        elif "reasoning" in k:
            field = "reasoning_tokens"
        else:
            continue
        out.setdefault(field, v)
    return out


def span_kind(ctx: SpanCtx) -> str | None:
    """``langfuse.observation.type`` (semconv §2.5 mapper rule 1) -> view kind."""
    obs_type = to_str(ctx.attrs.get("langfuse.observation.type"))
    return _TYPES.get(obs_type.lower(), obs_type.lower()) if obs_type else None


def extract_span(ctx: SpanCtx, view: SpanView) -> None:
    a = ctx.attrs
    kind = view.kind
    inp, out = a.get("langfuse.observation.input"), a.get("langfuse.observation.output")
    if kind == "llm":
        d = view.llm
        put(d, "model", to_str(a.get("langfuse.observation.model.name")))
        if inp is not None:
            put(d, "input_messages", _messages(inp, output=False))
        if out is not None:
            put(d, "output_messages", _messages(out, output=True))
        for field, value in _usage(ctx.json("langfuse.observation.usage_details")).items():
            put(d, field, value)
    elif kind == "tool":
        put(view.tool, "arguments", ctx.json("langfuse.observation.input"))
        put(view.tool, "result", ctx.json("langfuse.observation.output"))
    else:
        view.set("run_input", payload_text(inp, output=False))
        view.set("run_output", payload_text(out, output=True))
    view.set("trace_input", payload_text(a.get("langfuse.trace.input"), output=False))
    view.set("trace_output", payload_text(a.get("langfuse.trace.output"), output=True))
    view.set("agent_name", a.get("langfuse.trace.name"))
    view.set("session_id", ctx.first("langfuse.session.id", "session.id"))
    view.set("user_id", ctx.first("langfuse.user.id", "user.id"))
    if str(a.get("langfuse.observation.level", "")).upper() == "ERROR":
        view.add_error("langfuse.observation.level=ERROR", a.get("langfuse.observation.status_message"))
