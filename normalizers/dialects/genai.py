"""OTel GenAI semantic conventions, old (1.26–1.36) and new (≥1.37) forms, on spans, span events and log events.

Keys follow the "GenAI-new" and "GenAI-old" columns of semconv §1 and the version table of §2.1. This reader also
runs last on every recognized span as the fallback for the shared ``gen_ai.*`` keys that other dialects write too
(OpenLLMetry ≥0.55, Vercel, Pydantic AI, Claude Code spans), so dialect-specific keys win (semconv §3 "Hazards").
"""

from __future__ import annotations

from typing import Any, Mapping

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects._base import (LogFacts, SpanCtx, SpanView, log_name, present, put, str_list, to_int,
                                       to_str)
from normalizers.dialects._messages import (EVENT_ROLES, chat_message, first_text, genai_messages, last_text,
                                            system_instructions_text)

NAME = "otel-genai"

# gen_ai.operation.name -> SpanView.kind (semconv §1 "kind" rows; `completion`/`generate` are the Langfuse
# mapper's extra LLM spellings, §2.5 rule 3). Other operations keep their own name as kind.
_OP_KINDS = {"chat": "llm", "text_completion": "llm", "generate_content": "llm", "completion": "llm",
             "generate": "llm", "embeddings": "embedding", "execute_tool": "tool", "invoke_agent": "agent",
             "invoke_workflow": "workflow", "retrieval": "retriever"}
DETAILS_EVENT = "gen_ai.client.inference.operation.details"
EXCEPTION_EVENT = "gen_ai.client.operation.exception"
_CHOICE_EVENT = "gen_ai.choice"
_CONTENT_EVENTS = frozenset({*EVENT_ROLES, _CHOICE_EVENT, "gen_ai.content.prompt", "gen_ai.content.completion",
                             DETAILS_EVENT})


def detect(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """Spans: ``gen_ai.operation.name``, ``gen_ai.provider.name`` or ``gen_ai.system`` (semconv §3 rule 8; the
    registry only calls it GenAI when no other dialect matched). Log events: any ``gen_ai.*`` event name."""
    if isinstance(item, CanonicalLogEvent):
        return log_name(item).startswith("gen_ai.")
    a = item.attributes
    return "gen_ai.operation.name" in a or "gen_ai.provider.name" in a or "gen_ai.system" in a


def fill_llm(a: Mapping[str, Any], d: dict[str, Any]) -> None:
    """GenAI LLM-call keys of a span's attributes or of a ``gen_ai.client.inference.operation.details`` event
    -> LlmCall fields in ``d`` (first writer wins). Reads ``gen_ai.{input,output}.messages`` (≥1.37), the 1.26
    ``gen_ai.prompt``/``gen_ai.completion`` JSON strings, both token spellings (1.26 ``prompt_tokens``/
    ``completion_tokens``; ≥1.27 ``input_tokens``/``output_tokens``), cache keys of v1.40 and the newest
    ``cache_write`` rename, and OpenLLMetry-new's ``gen_ai.usage.reasoning_tokens`` beside v1.41's key."""
    # Absent keys are skipped before any conversion: every converter maps None to a value ``put`` ignores.
    get = a.get
    if (v := get("gen_ai.request.model")) is not None:
        put(d, "model", to_str(v))
    if (v := get("gen_ai.response.model")) is not None:
        put(d, "response_model", to_str(v))
    if (v := get("gen_ai.provider.name") or get("gen_ai.system")) is not None:
        put(d, "provider", to_str(v))
    if (v := get("gen_ai.operation.name")) is not None:
        put(d, "operation", to_str(v))
    if not d.get("input_messages") and (v := get("gen_ai.input.messages", get("gen_ai.prompt"))) is not None:
        put(d, "input_messages", genai_messages(v, "user"))
    if not d.get("output_messages") and (v := get("gen_ai.output.messages", get("gen_ai.completion"))) is not None:
        put(d, "output_messages", genai_messages(v, "assistant"))
    if (v := get("gen_ai.system_instructions")) is not None:
        put(d, "system_instructions", system_instructions_text(v))
    if (v := get("gen_ai.response.finish_reasons")) is not None:
        put(d, "finish_reasons", str_list(v))
    for field, keys in _TOKEN_KEYS:  # the first key that carries information
        for k in keys:
            if (v := get(k)) is not None and present(v):
                put(d, field, to_int(v))
                break


# LlmCall token fields and their keys in precedence order (see fill_llm).
_TOKEN_KEYS = (
    ("input_tokens", ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")),
    ("output_tokens", ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")),
    ("total_tokens", ("gen_ai.usage.total_tokens",)),
    ("cache_read_input_tokens", ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens")),
    ("cache_creation_input_tokens", ("gen_ai.usage.cache_creation.input_tokens",
                                     "gen_ai.usage.cache_write.input_tokens",
                                     "gen_ai.usage.cache_creation_input_tokens")),
    ("reasoning_tokens", ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens")),
)


def _first(a: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if present(v := a.get(k)):
            return v
    return None


def usage_fields(a: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{prefix}input_tokens`` etc. (``gen_ai.usage.`` or Pydantic AI's ``gen_ai.aggregated_usage.``) ->
    Usage-like dict with the keys that are present."""
    out: dict[str, Any] = {}
    for field, key in (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                       ("total_tokens", "total_tokens"), ("cache_read_input_tokens", "cache_read.input_tokens"),
                       ("cache_creation_input_tokens", "cache_creation.input_tokens"),
                       ("reasoning_tokens", "reasoning.output_tokens")):
        if (v := to_int(a.get(prefix + key))) is not None:
            out[field] = v
    return out


def apply_message_event(name: str, payload: Mapping[str, Any], d: dict[str, Any]) -> None:
    """One content event (span event or log record; semconv §5 "Treat gen_ai.* span events and log events
    alike") -> appended/filled LlmCall fields in ``d``. Handles the deprecated ``gen_ai.{system,user,assistant,
    tool}.message`` / ``gen_ai.choice`` bodies (1.28–1.36), the 1.27 ``gen_ai.content.prompt`` /
    ``gen_ai.content.completion`` span events and ``gen_ai.client.inference.operation.details`` (≥1.37).
    Other names are ignored."""
    if name in EVENT_ROLES:
        if (m := chat_message(dict(payload), EVENT_ROLES[name])) is not None:
            d.setdefault("input_messages", []).append(m)
    elif name == _CHOICE_EVENT:
        if (m := chat_message(dict(payload), "assistant")) is not None:
            d.setdefault("output_messages", []).append(m)
            if m.get("finish_reason"):
                d.setdefault("finish_reasons", []).append(m["finish_reason"])
    elif name == "gen_ai.content.prompt":
        put(d, "input_messages", genai_messages(payload.get("gen_ai.prompt"), "user"))
    elif name == "gen_ai.content.completion":
        put(d, "output_messages", genai_messages(payload.get("gen_ai.completion"), "assistant"))
    elif name == DETAILS_EVENT:
        fill_llm(payload, d)


def span_kind(ctx: SpanCtx) -> str | None:
    """``gen_ai.operation.name`` mapped by ``_OP_KINDS``; without one, tool and model keys decide."""
    op = to_str(ctx.attrs.get("gen_ai.operation.name"))
    if op:
        return _OP_KINDS.get(op, op)
    if ctx.first("gen_ai.tool.name", "gen_ai.tool.call.id"):
        # Tool spans without an operation name (older Pydantic AI; Langfuse mapper rule 7, semconv §2.5).
        return "tool"
    if ctx.first("gen_ai.request.model", "gen_ai.response.model", "gen_ai.prompt", "gen_ai.completion"):
        return "llm"  # 1.26–1.27 inference spans carry no operation name
    return None


def extract_span(ctx: SpanCtx, view: SpanView) -> None:
    """Fill ``view`` from ``gen_ai.*`` span attributes and ``gen_ai.*`` span events."""
    a = ctx.attrs
    kind = view.kind
    if kind == "llm":
        fill_llm(a, view.llm)
        pending: dict[str, Any] = {}
        for ev in ctx.span.events:
            apply_message_event(ev.name, ev.attributes, pending)
        for k, v in pending.items():
            put(view.llm, k, v)
    elif kind == "tool":
        t = view.tool
        put(t, "name", to_str(a.get("gen_ai.tool.name")))
        put(t, "call_id", to_str(a.get("gen_ai.tool.call.id")))
        put(t, "arguments", ctx.json("gen_ai.tool.call.arguments"))
        put(t, "result", ctx.json("gen_ai.tool.call.result"))
    elif kind in ("agent", "workflow"):
        view.set("run_input", first_text(genai_messages(a.get("gen_ai.input.messages"), "user"), "user"))
        view.set("run_output",
                 last_text(genai_messages(a.get("gen_ai.output.messages"), "assistant"), "assistant"))
        if not view.aggregate_usage:
            view.aggregate_usage = usage_fields(a, "gen_ai.usage.")
    view.set("agent_name", a.get("gen_ai.agent.name"))
    view.set("workflow_name", a.get("gen_ai.workflow.name"))
    view.set("session_id", a.get("gen_ai.conversation.id"))
    view.set("user_id", ctx.first("user.id", "enduser.id"))


def extract_logs(events: list[CanonicalLogEvent], views: dict[str, SpanView], facts: LogFacts) -> None:
    """GenAI log records (time-ordered) -> ``facts``.

    Content events join the LLM call of their span (``facts.llm[span_id]``). Records without a span id (e.g.
    openai-v2 logs for unsampled spans) are grouped into synthetic calls: a new call starts when an input-side
    message follows an output-side one, and every ``…operation.details`` record is a call of its own.
    ``gen_ai.client.operation.exception`` (v1.41) becomes a ``log-event`` error.
    """
    group = 0
    last_side = "input"
    for ev in events:
        name = log_name(ev)
        # Bodies carry the content (legacy events: the whole message), attributes the metadata.
        payload = {**ev.attributes, **ev.body} if isinstance(ev.body, dict) else ev.attributes
        facts.set("session_id", payload.get("gen_ai.conversation.id"))
        if name == EXCEPTION_EVENT:
            facts.errors.append({"span_id": ev.span_id, "source": "log-event",
                                 "type": to_str(payload.get("error.type") or payload.get("exception.type")),
                                 "message": to_str(payload.get("exception.message"))})
            continue
        if name not in _CONTENT_EVENTS:
            continue  # e.g. gen_ai.evaluation.result: no call data
        side = "output" if name in (_CHOICE_EVENT, "gen_ai.content.completion") else "input"
        if ev.span_id:
            key = ev.span_id
        else:
            if name == DETAILS_EVENT or (side == "input" and last_side == "output"):
                group += 1
            last_side = "output" if name == DETAILS_EVENT else side
            key = f"log:{group}"
        d = facts.llm.get(key)
        if d is None:
            d = facts.llm[key] = {"span_id": ev.span_id, "start_time_unix_nano": ev.time_unix_nano}
        apply_message_event(name, payload, d)
        if ev.span_id not in views:
            d["end_time_unix_nano"] = max(d.get("end_time_unix_nano", 0), ev.time_unix_nano)
