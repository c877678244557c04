"""OpenLLMetry / Traceloop: SDK decorator spans and the old (≤0.54) flat LLM spans (semconv §1 column "OLL",
§2.3). New (≥0.55) LLM spans are GenAI-new and are read by :mod:`normalizers.dialects.genai`."""

from __future__ import annotations

import json
from typing import Any

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects._base import SpanCtx, SpanView, put, to_int, to_str
from normalizers.dialects._messages import oll_flat_messages, payload_text

NAME = "openllmetry"

_SPAN_KINDS = {"workflow": "workflow", "task": "task", "agent": "agent", "tool": "tool"}
_REQUEST_KINDS = {"chat": "llm", "completion": "llm", "embedding": "embedding", "rerank": "retriever"}
# Keys only the old LLM spans (and new ones' total) write, semconv §3 rule 3.
_OLD_LLM_KEYS = ("llm.request.type", "llm.usage.total_tokens", "gen_ai.usage.total_tokens", "llm.is_streaming",
                 "gen_ai.openai.api_base")
_PROPS = "traceloop.association.properties."


def _has_flat(ctx: SpanCtx, prefix: str) -> bool:
    if not ctx.has_prefix(prefix):
        return False
    n = len(prefix) + 1
    return any(k.startswith(prefix + ".") and k[n:].partition(".")[0].isdigit() for k in ctx.attrs)


def detect(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """``traceloop.*`` keys or scope ``traceloop.tracer``; old LLM spans by flat ``gen_ai.{prompt,completion}.N.*``
    keys or the other old-only keys (semconv §3 rule 3)."""
    if not isinstance(item, CanonicalSpan):
        return False
    ctx = ctx or SpanCtx(item)
    a = item.attributes
    return (item.scope.name == "traceloop.tracer" or "traceloop.span.kind" in a
            or "traceloop.workflow.name" in a or ctx.has_prefix("traceloop.entity")
            or ctx.has_prefix("traceloop.association.properties")
            or not a.keys().isdisjoint(_OLD_LLM_KEYS)
            or _has_flat(ctx, "gen_ai.prompt") or _has_flat(ctx, "gen_ai.completion"))


def entity_value(value: Any) -> Any:
    """``traceloop.entity.input`` = JSON ``{"args": [...], "kwargs": {...}}`` -> the kwargs dict when there are no
    positional args, the single positional arg when there are no kwargs, else the whole decoded object.
    Other values (``traceloop.entity.output``) are just JSON-decoded. The SDK always JSON-encodes these, so a
    JSON string scalar (``"\"text\""``) is decoded too; undecodable values stay raw."""
    v = value
    if isinstance(value, str):
        try:
            v = json.loads(value)
        except ValueError:
            return value
    if isinstance(v, dict) and set(v) <= {"args", "kwargs"} and v:
        args, kwargs = v.get("args") or [], v.get("kwargs") or {}
        if not args and isinstance(kwargs, dict):
            return kwargs
        if len(args) == 1 and not kwargs:
            return args[0]
    return v


def span_kind(ctx: SpanCtx) -> str | None:
    """``traceloop.span.kind`` (decorators), else old LLM spans' ``llm.request.type`` or flat prompt keys."""
    a = ctx.attrs
    if kind := to_str(a.get("traceloop.span.kind")):
        return _SPAN_KINDS.get(kind, kind)
    if req := to_str(a.get("llm.request.type")):
        return _REQUEST_KINDS.get(req, req)
    if _has_flat(ctx, "gen_ai.prompt") or _has_flat(ctx, "gen_ai.completion"):
        return "llm"
    return None


def extract_span(ctx: SpanCtx, view: SpanView) -> None:
    a = ctx.attrs
    kind = view.kind
    if kind == "llm":
        d = view.llm
        put(d, "input_messages", oll_flat_messages(a, "gen_ai.prompt", "user"))
        outputs = oll_flat_messages(a, "gen_ai.completion", "assistant")
        put(d, "output_messages", outputs)
        put(d, "finish_reasons", [m["finish_reason"] for m in outputs if m.get("finish_reason")])
        put(d, "operation", to_str(a.get("llm.request.type")))
        put(d, "total_tokens", to_int(a.get("llm.usage.total_tokens")))
        put(d, "reasoning_tokens", to_int(a.get("llm.usage.reasoning_tokens")))
    elif kind == "tool":
        t = view.tool
        put(t, "name", to_str(a.get("gen_ai.tool.name") or a.get("traceloop.entity.name")))
        put(t, "arguments", entity_value(a.get("traceloop.entity.input")))
        put(t, "result", entity_value(a.get("traceloop.entity.output")))
    else:
        view.set("run_input", _entity_text(a.get("traceloop.entity.input"), output=False))
        view.set("run_output", _entity_text(a.get("traceloop.entity.output"), output=True))
        if kind == "agent":
            view.set("agent_name", a.get("gen_ai.agent.name") or a.get("traceloop.entity.name"))
        elif kind == "workflow":
            view.set("workflow_name", a.get("traceloop.entity.name"))
    view.set("workflow_name", a.get("traceloop.workflow.name"))
    view.set("session_id", a.get(_PROPS + "session_id"))
    view.set("user_id", a.get(_PROPS + "user_id"))


def _entity_text(value: Any, output: bool) -> str | None:
    return payload_text(entity_value(value), output)
