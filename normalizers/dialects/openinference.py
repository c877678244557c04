"""OpenInference (Arize) spans: semconv §1 column "OI" and §2.2."""

from __future__ import annotations

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects._base import SpanCtx, SpanView, put, str_list, to_int, to_str
from normalizers.dialects._messages import indexed, oi_flat_messages, payload_text, provider_messages, text_message

NAME = "openinference"

_KINDS = {"LLM": "llm", "TOOL": "tool", "AGENT": "agent", "CHAIN": "chain", "EMBEDDING": "embedding",
          "RETRIEVER": "retriever", "RERANKER": "retriever"}


def detect(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """``openinference.span.kind`` or scope ``openinference.instrumentation.*`` (semconv §3 rule 2)."""
    return isinstance(item, CanonicalSpan) and (
        "openinference.span.kind" in item.attributes
        or item.scope.name.startswith("openinference.instrumentation."))


def span_kind(ctx: SpanCtx) -> str | None:
    """``openinference.span.kind`` (UPPERCASE enum, semconv §2.2) -> view kind."""
    raw = to_str(ctx.attrs.get("openinference.span.kind"))
    return _KINDS.get(raw.upper(), raw.lower()) if raw else None


def extract_span(ctx: SpanCtx, view: SpanView) -> None:
    a = ctx.attrs
    kind = view.kind
    if kind == "llm":
        _llm(ctx, view)
    elif kind == "tool":
        t = view.tool
        put(t, "name", to_str(a.get("tool.name")))
        # tool.id is the spec key; ag2 writes tool_call.id (semconv §1 "tool call id").
        put(t, "call_id", to_str(a.get("tool.id") or a.get("tool_call.id")))
        # input.value holds the call arguments; some frameworks (agno, autogen, ag2) use tool.parameters instead.
        put(t, "arguments", ctx.json("input.value"))
        put(t, "arguments", ctx.json("tool.parameters"))
        put(t, "result", ctx.json("output.value"))
    else:
        view.set("run_input", payload_text(a.get("input.value"), output=False))
        view.set("run_output", payload_text(a.get("output.value"), output=True))
    if kind == "agent":
        # The openai-agents bridge names AGENT spans after the agent and sets agent.name / graph.node.id.
        view.set("agent_name", a.get("agent.name") or a.get("graph.node.name") or a.get("graph.node.id")
                 or ctx.span.name)
    view.set("session_id", a.get("session.id"))
    view.set("user_id", a.get("user.id"))


def _llm(ctx: SpanCtx, view: SpanView) -> None:
    a, d = ctx.attrs, view.llm
    put(d, "model", to_str(a.get("llm.model_name") or a.get("llm.request.model_name")))
    put(d, "response_model", to_str(a.get("llm.response.model_name")))
    put(d, "provider", to_str(a.get("llm.provider") or a.get("llm.system")))
    inputs = oi_flat_messages(a, "llm.input_messages", "user")
    if not inputs:  # legacy completion prompts, then the raw request JSON (semconv §5 encoding 7)
        inputs = [text_message("user", p["prompt.text"]) for p in indexed(a, "llm.prompts.") if "prompt.text" in p]
        inputs = inputs or provider_messages(ctx.json("input.value"), output=False)
    put(d, "input_messages", inputs)
    outputs = oi_flat_messages(a, "llm.output_messages", "assistant")
    if not outputs:
        outputs = [text_message("assistant", c["completion.text"])
                   for c in indexed(a, "llm.choices.") if "completion.text" in c]
        outputs = outputs or provider_messages(ctx.json("output.value"), output=True)
    put(d, "output_messages", outputs)
    # llm.finish_reason exists since Apr 2026; older spans: the finish reasons parsed from output.value.
    put(d, "finish_reasons", str_list(a.get("llm.finish_reason"))
        or [m["finish_reason"] for m in outputs if m.get("finish_reason")])
    put(d, "input_tokens", to_int(a.get("llm.token_count.prompt")))
    put(d, "output_tokens", to_int(a.get("llm.token_count.completion")))
    put(d, "total_tokens", to_int(a.get("llm.token_count.total")))
    put(d, "cache_read_input_tokens", to_int(a.get("llm.token_count.prompt_details.cache_read")))
    put(d, "cache_creation_input_tokens", to_int(a.get("llm.token_count.prompt_details.cache_write")))
    put(d, "reasoning_tokens", to_int(a.get("llm.token_count.completion_details.reasoning")))

