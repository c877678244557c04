"""Claude Code: log events (``claude_code.*``) and the beta traces (``claude_code.interaction`` →
``claude_code.llm_request`` | ``claude_code.tool`` …). Semconv §1 column "CC", §2.7, §4 row "Claude Code".

Content (prompts, tool input/output) is ``<REDACTED>`` or absent unless the ``OTEL_LOG_*`` switches are on;
redacted values are treated as absent so they never become a task input or tool argument.
"""

from __future__ import annotations

from typing import Any

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects._base import LogFacts, SpanCtx, SpanView, decode_json, log_name, put, to_int, to_str

NAME = "claude-code"

_PREFIX = "claude_code."
_EVENTS_SCOPE = "com.anthropic.claude_code.events"
_SERVICE = "claude-code"
# Short names that `event.name` holds (semconv §2.7); with `prompt.id` they identify Claude Code records.
_SHORT_NAMES = frozenset({
    "user_prompt", "assistant_response", "api_request", "api_error", "api_retries_exhausted", "api_refusal",
    "api_request_body", "api_response_body", "tool_result", "tool_decision", "subagent_completed",
    "internal_error"})
_REDACTED = "<REDACTED>"
_SPAN_KINDS = {"llm_request": "llm", "tool": "tool", "interaction": "agent"}


def _content(value: Any) -> Any:
    """Gated content: ``<REDACTED>`` and empty values -> ``None``."""
    if value is None or value == "" or (isinstance(value, str) and value.startswith(_REDACTED)):
        return None
    return value


def event_name(ev: CanonicalLogEvent) -> str | None:
    """The full ``claude_code.<name>`` of a record, read from the body, ``event_name`` / ``event.name`` (short or
    full) — semconv §2.7 "Read body, event_name and event.name" — else ``None``."""
    if isinstance(ev.body, str) and ev.body.startswith(_PREFIX):
        return ev.body
    name = log_name(ev)
    if name.startswith(_PREFIX):
        return name
    if name in _SHORT_NAMES and ("prompt.id" in ev.attributes or ev.scope.name == _EVENTS_SCOPE
                                 or ev.resource.get("service.name") == _SERVICE):
        return _PREFIX + name
    return None


def detect(item: CanonicalSpan | CanonicalLogEvent, ctx: SpanCtx | None = None) -> bool:
    """Spans named ``claude_code.*``; log records with a Claude Code event name (semconv §3 rule 7)."""
    if isinstance(item, CanonicalLogEvent):
        return event_name(item) is not None
    return item.name.startswith(_PREFIX)


def _tool_output(span: CanonicalSpan) -> Any:
    """The gated ``tool.output`` span event (``OTEL_LOG_TOOL_CONTENT=1``). Its attribute names are not
    documented: a single attribute is the output, else ``output``/``content``, else all attributes."""
    for ev in span.events:
        if ev.name == "tool.output" and ev.attributes:
            attrs = ev.attributes
            if len(attrs) == 1:
                return _content(decode_json(next(iter(attrs.values()))))
            for key in ("output", "content"):
                if key in attrs:
                    return _content(decode_json(attrs[key]))
            return attrs
    return None


def _failed(a: dict[str, Any]) -> bool:
    return str(a.get("success", "")).lower() == "false"


def span_kind(ctx: SpanCtx) -> str | None:
    """``claude_code.llm_request`` -> llm, ``claude_code.tool`` -> tool, ``claude_code.interaction`` -> agent;
    the other spans (``tool.blocked_on_user``, ``tool.execution``, ``hook``) keep their own name."""
    name = ctx.span.name.removeprefix(_PREFIX)
    return _SPAN_KINDS.get(name, name)


def extract_span(ctx: SpanCtx, view: SpanView) -> None:
    a, name = ctx.attrs, ctx.span.name
    if name == "claude_code.llm_request":
        view.fatal = True  # semconv §4: an llm_request span in ERROR is a hard failure (retries are span events)
        d = view.llm
        put(d, "model", to_str(a.get("model") or a.get("gen_ai.request.model")))
        put(d, "provider", "anthropic")
        put(d, "input_tokens", to_int(a.get("input_tokens")))
        put(d, "output_tokens", to_int(a.get("output_tokens")))
        put(d, "cache_read_input_tokens", to_int(a.get("cache_read_tokens")))
        put(d, "cache_creation_input_tokens", to_int(a.get("cache_creation_tokens")))
        put(d, "finish_reasons", [to_str(a["stop_reason"])] if a.get("stop_reason") else [])
    elif name == "claude_code.tool":
        t = view.tool
        put(t, "name", to_str(a.get("tool_name")))
        put(t, "call_id", to_str(a.get("tool_use_id") or a.get("gen_ai.tool.call.id")))
        put(t, "arguments", _content(ctx.json("tool_input")))
        put(t, "arguments", _content(ctx.json("tool_parameters")))
        put(t, "result", _tool_output(ctx.span))
    elif name == "claude_code.interaction":
        view.set("run_input", _content(a.get("user_prompt")))
        view.set("agent_name", a.get("agent.name") or ctx.span.resource.get("service.name"))
    if _failed(a) or _content(a.get("error")):
        view.add_error(a.get("status_code"), _content(a.get("error")))
    view.set("session_id", a.get("session.id"))
    view.set("user_id", a.get("user.id"))


def _sort_key(ev: CanonicalLogEvent) -> tuple[int, int]:
    return ev.time_unix_nano, to_int(ev.attributes.get("event.sequence")) or 0


def extract_logs(events: list[CanonicalLogEvent], views: dict[str, SpanView], facts: LogFacts) -> None:
    """Claude Code records -> ``facts`` (semconv §2.7, §4, §5 "Index logs … by (session.id, prompt.id)").

    * ``user_prompt.prompt``: the first one is the task input; the final output is the last
      ``assistant_response.response`` with that ``prompt.id`` (else the last one at all).
    * ``api_request``: an LLM call (model, tokens, cache tokens; times from ``duration_ms``), joined to its span when
      the record carries the id of an LLM span. When the trace has ``claude_code.llm_request`` spans, records that
      do not join are dropped: tracing emits one span per request, so they would count the call twice.
    * ``tool_result``: a tool call (``success="false"`` -> error from ``error`` / ``error_type``) and, if failed, an
      error.
    * ``api_error`` (fatal unless an ``api_request`` follows in the same ``session.id``/``prompt.id``),
      ``api_retries_exhausted`` and ``internal_error`` (fatal), ``api_refusal`` (evidence): errors.
    """
    has_llm_spans = any(v.span.name == "claude_code.llm_request" for v in views.values())
    prompts: list[tuple[Any, str]] = []
    responses: list[tuple[Any, str]] = []
    pending_api_errors: list[tuple[tuple[Any, Any], dict[str, Any]]] = []
    for i, ev in enumerate(sorted(events, key=_sort_key)):
        name = event_name(ev)
        a = ev.attributes
        facts.set("session_id", a.get("session.id"))
        facts.set("user_id", a.get("user.id"))
        facts.set("agent_name", ev.resource.get("service.name"))
        turn = (a.get("session.id"), a.get("prompt.id"))
        end = ev.time_unix_nano
        duration_ns = (to_int(a.get("duration_ms")) or 0) * 1_000_000
        if name == "claude_code.user_prompt":
            if (text := to_str(_content(a.get("prompt")))) is not None:
                prompts.append((a.get("prompt.id"), text))
        elif name == "claude_code.assistant_response":
            if (text := to_str(_content(a.get("response")))) is not None:
                responses.append((a.get("prompt.id"), text))
        elif name == "claude_code.api_request":
            pending_api_errors = [(t, e) for t, e in pending_api_errors if t != turn]
            joined = ev.span_id in views and views[ev.span_id].kind == "llm"
            if not joined and has_llm_spans:
                continue
            d = facts.llm.setdefault(ev.span_id if joined else f"cc:{i}", {"span_id": ev.span_id})
            put(d, "model", to_str(a.get("model")))
            put(d, "provider", "anthropic")
            put(d, "input_tokens", to_int(a.get("input_tokens")))
            put(d, "output_tokens", to_int(a.get("output_tokens")))
            put(d, "cache_read_input_tokens", to_int(a.get("cache_read_tokens")))
            put(d, "cache_creation_input_tokens", to_int(a.get("cache_creation_tokens")))
            put(d, "start_time_unix_nano", end - duration_ns)
            put(d, "end_time_unix_nano", end)
        elif name == "claude_code.tool_result":
            failed = _failed(a)
            error = to_str(_content(a.get("error")) or a.get("error_type")) if failed else None
            facts.tools.append({
                "span_id": ev.span_id, "name": to_str(a.get("tool_name")), "call_id": to_str(a.get("tool_use_id")),
                "arguments": _content(decode_json(a.get("tool_input", a.get("tool_parameters")))),
                "error": error, "source": "log-event",
                "start_time_unix_nano": end - duration_ns, "end_time_unix_nano": end})
            if failed:
                facts.errors.append({"span_id": ev.span_id, "source": "log-event",
                                     "type": to_str(a.get("error_type")) or name, "message": error})
        elif name in ("claude_code.api_error", "claude_code.api_retries_exhausted", "claude_code.internal_error",
                      "claude_code.api_refusal"):
            status = to_str(a.get("status_code"))
            message = to_str(_content(a.get("error")) or a.get("error_code") or a.get("category"))
            err = {"span_id": ev.span_id, "source": "log-event",
                   "type": to_str(a.get("error_name")) or name,
                   "message": f"{status}: {message}" if status and message else message or status,
                   "fatal": name in ("claude_code.api_retries_exhausted", "claude_code.internal_error")}
            facts.errors.append(err)
            if name == "claude_code.api_error":
                pending_api_errors.append((turn, err))
    for _, err in pending_api_errors:
        err["fatal"] = True
    if prompts:
        prompt_id, facts.task_input = prompts[0]
        own = [text for pid, text in responses if pid == prompt_id]
        facts.final_output = own[-1] if own else responses[-1][1] if responses else None
    elif responses:
        facts.final_output = responses[-1][1]
