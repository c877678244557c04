"""The *agent run* view of one trace: what the agent was asked, what it answered, and what it did in between.

Built by :func:`build_agent_run` from canonical spans and log events (``normalizers.canonical``) following
``/work/shared/reference/agent-semconv.md`` (cited below as "semconv §N"). Every dialect's message form is
normalized to the OTel GenAI ≥1.37 message shape (semconv §2.1 "Message schema")::

    {"role": "user"|"assistant"|"system"|"tool"|<custom>,
     "parts": [{"type": "text", "content": "..."},
               {"type": "tool_call", "id": "...", "name": "...", "arguments": {...} | "raw json"},
               {"type": "tool_call_response", "id": "...", "response": ...},
               {"type": "reasoning", "content": "..."}, {"type": "uri"|"blob"|"file"|<any>, ...}],
     "name": "...", "finish_reason": "..."}

All fields have defaults so ``AgentRun()`` is a valid empty run.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects import read_logs, read_span
from normalizers.dialects._base import LogFacts, SpanView, put, to_str
from normalizers.dialects._messages import first_text, last_text, message_text


class MessagePart(BaseModel):
    """One part of a :class:`Message` (GenAI ≥1.37 part types, semconv §2.1).

    ``text``/``reasoning`` use ``content``; ``tool_call`` uses ``id``, ``name``, ``arguments`` (decoded JSON when the
    wire value was a JSON string, else the raw string); ``tool_call_response`` uses ``id`` and ``response`` (the
    ``result`` spelling of Pydantic AI and the registry example is folded into ``response``; ``is_error: true`` is
    added when the dialect marks the tool result as a failure: Vercel ``error-*`` outputs / ``isError``, Anthropic
    ``is_error``). ``thinking`` parts become ``reasoning``. Other part types (``uri``, ``blob``, ``file``,
    ``refusal``, ...) keep their own fields (``modality``, ``mime_type``, ``uri``, ``file_id``, ...) as extra keys.
    """

    model_config = ConfigDict(extra="allow")

    type: str
    content: Any = None
    id: str | None = None
    name: str | None = None
    arguments: Any = None
    response: Any = None


class Message(BaseModel):
    """A chat message in the GenAI ≥1.37 shape (semconv §2.1), whatever dialect it came from."""

    role: str
    parts: list[MessagePart] = Field(default_factory=list)
    name: str | None = None
    finish_reason: str | None = None


class LlmCall(BaseModel):
    """One model invocation: one per LLM span (all dialects describing that span merged), or one per Claude Code
    ``claude_code.api_request`` log event that has no span (semconv §1 "kind: LLM call").

    Token counts follow the emitting convention: GenAI/OpenAI input counts include cached tokens, Claude Code and
    Anthropic-style counts exclude them (semconv §5 "Tokens"). ``None`` = not reported.
    """

    span_id: str = ""
    model: str | None = None
    response_model: str | None = None
    provider: str | None = None
    operation: str | None = None
    input_messages: list[Message] = Field(default_factory=list)
    output_messages: list[Message] = Field(default_factory=list)
    system_instructions: str | None = None
    finish_reasons: list[str] = Field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    start_time_unix_nano: int = 0
    end_time_unix_nano: int = 0
    error: str | None = None
    content_captured: bool = False
    """Whether any message content or system instructions arrived. Content is opt-in almost everywhere
    (semconv §5), so ``False`` means "not recorded", not "empty prompt"."""


class ToolCall(BaseModel):
    """One tool execution (semconv §1 rows "tool name" … "tool result").

    ``source`` says where it was seen: a tool span, a Claude Code ``claude_code.tool_result`` log event, or only
    inside LLM messages (a ``tool_call`` part, answered by a ``tool_call_response`` part) when nothing traced the
    execution — then ``span_id`` is the LLM span that requested it.
    """

    span_id: str = ""
    name: str | None = None
    call_id: str | None = None
    arguments: Any = None
    result: Any = None
    error: str | None = None
    source: Literal["span", "log-event", "messages"] = "span"
    start_time_unix_nano: int = 0
    end_time_unix_nano: int = 0


class RunError(BaseModel):
    """One error signal (semconv §1 row "errors", §4).

    ``source``: ``span-status`` (status ERROR with no ``exception`` event), ``exception-event`` (one per
    ``exception`` span event), ``log-event`` (e.g. ``gen_ai.client.operation.exception``, ``claude_code.api_error``)
    or ``attribute`` (e.g. ``langfuse.observation.level=ERROR``, Claude Code ``success="false"``, Logfire ``error``).
    ``fatal`` marks a hard run failure per semconv §4 (error on the run's root span; Claude Code
    ``api_retries_exhausted``, ``internal_error``, or an ``api_error`` never followed by an ``api_request``); other
    errors are evidence only, since agents usually recover from failed tools and retried requests.
    """

    span_id: str = ""
    source: Literal["span-status", "exception-event", "log-event", "attribute"] = "span-status"
    type: str | None = None
    message: str | None = None
    fatal: bool = False


class Usage(BaseModel):
    """Token totals over the run's LLM calls (semconv §5 "Tokens").

    A call that wraps another traced call (e.g. an agent SDK's response span around the client library's span,
    semconv §3 "Wrapper duplicates") is not added twice: a call's tokens count unless a descendant LLM call
    reports tokens, and ``llm_call_count`` counts calls without an LLM-call descendant. ``total_tokens`` adds each
    counted call's total, or its input + output when it reports no total. Aggregates (Pydantic AI
    ``gen_ai.aggregated_usage.*``, GenAI ``invoke_agent`` usage, Vercel root ``ai.usage.*``) are used only when no
    LLM call reports tokens (semconv §3 "Usage double counting", §5 "Tokens").
    """

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0
    llm_call_count: int = 0
    tool_call_count: int = 0


class AgentRun(BaseModel):
    """The agent-run view of one trace (DESIGN.md "The upload envelope").

    ``dialects`` uses the names of ``normalizers.dialects.DIALECT_NAMES`` in first-seen order. ``task_input`` and
    ``final_output`` follow semconv §1 rows "run task input" / "run final output" and §5 (structured values are
    reduced to the user/assistant text when their shape is known, else compact JSON). Spans no dialect recognizes
    stay in the envelope's span list but add nothing here.
    """

    dialects: list[str] = Field(default_factory=list)
    agent_name: str | None = None
    task_input: str | None = None
    final_output: str | None = None
    llm_calls: list[LlmCall] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    errors: list[RunError] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    session_id: str | None = None
    user_id: str | None = None


# --------------------------------------------------------------------------------------------------- building

# Span kinds that describe a whole run (semconv §1 "kind: agent" / "kind: chain/workflow").
_RUN_KINDS = frozenset({"agent", "workflow", "chain", "task"})
# Kinds whose own input/output is never the run's, even on a trace root.
_STEP_KINDS = frozenset({"llm", "tool", "embedding", "retriever"})
# Finish reasons that end a turn with an answer (semconv §5 "Final output": stop / end_turn; Gemini's STOP is
# lower-cased; Anthropic's stop_sequence is a normal end too).
_TERMINAL = frozenset({"stop", "end_turn", "stop_sequence"})
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                 "reasoning_tokens")
_usage_values = attrgetter(*_USAGE_FIELDS)


def build_agent_run(spans: list[CanonicalSpan], log_events: list[CanonicalLogEvent]) -> AgentRun:
    """Spans and log records of ONE trace -> its :class:`AgentRun`. Pure; never raises on odd attribute values.

    Rules (agent-semconv.md):

    * each span is read by every dialect it matches (§3), dialect-specific keys first; spans no dialect
      recognizes add nothing;
    * one :class:`LlmCall` per LLM span; GenAI content log records and Claude Code ``api_request`` records join
      the call of their span id, or become calls of their own (§5 "Index logs by (trace_id, span_id)");
    * tool calls come from tool spans, Claude Code ``tool_result`` records and, when nothing traced the execution,
      from ``tool_call`` / ``tool_call_response`` message parts, joined by call id (or, for spans without one, by
      tool name in time order);
    * task input / final output (§1 rows "run task input" / "run final output", §5): Langfuse trace-level value →
      the shallowest run span's own input/output → first user text of the earliest LLM call / last assistant
      text of the last LLM call that ended with a terminal finish reason (or none) → Claude Code prompt/response
      records;
    * errors (§4): status ERROR / ``exception`` events of recognized spans, dialect error attributes, error log
      records; errors on the run's root span are ``fatal``;
    * usage: see :class:`Usage`.
    """
    ordered = sorted(spans, key=lambda s: (s.start_time_unix_nano, s.span_id))
    by_id = {s.span_id: s for s in ordered}
    depth = _depths(by_id)
    views: dict[str, SpanView] = {}
    for span in ordered:
        if (view := read_span(span)) is not None:
            views[span.span_id] = view
    facts = read_logs(log_events, views)
    shallow = sorted(views.values(), key=lambda v: depth[v.span.span_id])  # stable: start order within a depth

    run_view = next((v for v in shallow if v.kind in _RUN_KINDS), None)
    drafts = _llm_drafts(views, facts, by_id)  # normalized dicts, in start order: text rules read these
    validate = LlmCall.__pydantic_validator__.validate_python  # LlmCall.model_validate, minus its wrapper
    llm_calls = [validate(d) for d in drafts]
    errors, span_error = _errors(views, facts, run_view, depth)
    for call in llm_calls:
        _assign(call, {"error": span_error.get(call.span_id)})
    tool_calls = _tool_calls(views, facts, llm_calls, span_error)

    # Run-level inputs: the shallowest run span, else a trace root that is not itself one step.
    io_views = [v for v in shallow if v.kind in _RUN_KINDS
                or (depth[v.span.span_id] == 0 and v.kind not in _STEP_KINDS)]
    task_input = (_first(v.trace_input for v in shallow) or _first(v.run_input for v in io_views)
                  or _first(first_text(d.get("input_messages", ()), "user") for d in drafts)
                  or facts.task_input)
    final_output = (_first(v.trace_output for v in shallow) or _first(v.run_output for v in io_views)
                    or _last_answer(drafts) or facts.final_output)

    dialects: list[str] = []
    for name in (*(n for v in views.values() for n in v.dialects), *facts.dialects):
        if name not in dialects:
            dialects.append(name)
    return AgentRun(
        dialects=dialects,
        agent_name=(_first(v.agent_name for v in shallow if v.kind == "agent")
                    or _first(v.agent_name for v in shallow) or _first(v.workflow_name for v in shallow)
                    or facts.agent_name),
        task_input=task_input,
        final_output=final_output,
        llm_calls=llm_calls,
        tool_calls=tool_calls,
        errors=errors,
        usage=_usage(llm_calls, tool_calls, shallow, by_id),
        session_id=_first(v.session_id for v in shallow) or facts.session_id,
        user_id=_first(v.user_id for v in shallow) or facts.user_id,
    )


def _first(values) -> Any:
    return next((v for v in values if v), None)


def _assign(model: BaseModel, values: dict[str, Any]) -> None:
    """``setattr(model, name, value)`` for each item, as pydantic does it for a plain field of a model without
    ``validate_assignment`` (value stored as is, field marked set), minus the per-call attribute dispatch."""
    model.__dict__.update(values)
    model.__pydantic_fields_set__.update(values)


def _depths(by_id: dict[str, CanonicalSpan]) -> dict[str, int]:
    """Span id -> depth below the trace root; a span whose parent is not in the trace counts as a root, and a
    parent cycle is cut where it closes."""
    depth: dict[str, int] = {}
    for sid in by_id:
        path: list[str] = []
        seen: set[str] = set()
        cur = sid
        while cur in by_id and cur not in depth and cur not in seen:
            seen.add(cur)
            path.append(cur)
            cur = by_id[cur].parent_span_id
        d = depth.get(cur, -1)
        for p in reversed(path):
            d += 1
            depth[p] = d
    return depth


def _llm_drafts(views: dict[str, SpanView], facts: LogFacts,
                by_id: dict[str, CanonicalSpan]) -> list[dict[str, Any]]:
    """LlmCall field dicts: LLM spans merged with the log facts of their span id (span attributes win), then
    log-only calls; sorted by start time."""
    drafts: list[dict[str, Any]] = []
    for sid, view in views.items():
        if view.kind != "llm":
            continue
        d = dict(view.llm)
        if extra := facts.llm.get(sid):
            for key, value in extra.items():
                put(d, key, value)
        d["span_id"] = sid
        d["start_time_unix_nano"] = view.span.start_time_unix_nano
        d["end_time_unix_nano"] = view.span.end_time_unix_nano
        drafts.append(d)
    for key, d in facts.llm.items():
        sid = d.get("span_id", "")
        if key == sid and sid in views and views[sid].kind == "llm":
            continue  # merged above
        span = by_id.get(sid)
        if span is not None:  # a span no reader classified as an LLM call, but its logs say it was one
            d = {**d, "start_time_unix_nano": span.start_time_unix_nano,
                 "end_time_unix_nano": span.end_time_unix_nano}
        drafts.append(d)
    for d in drafts:
        if not d.get("finish_reasons"):
            d["finish_reasons"] = [m["finish_reason"] for m in d.get("output_messages", ())
                                   if m.get("finish_reason")]
        if not d.get("system_instructions"):
            # Dialects that keep the system prompt inside the messages (OI, OLL, Vercel, legacy events).
            texts = [t for m in d.get("input_messages", ()) if m.get("role") in ("system", "developer")
                     and (t := message_text(m))]
            d["system_instructions"] = "\n".join(texts) or None
        d["content_captured"] = bool(d.get("input_messages") or d.get("output_messages")
                                     or d.get("system_instructions"))
    drafts.sort(key=lambda d: d.get("start_time_unix_nano") or 0)
    return drafts


def _span_errors(view: SpanView) -> list[dict[str, Any]]:
    """Status ERROR / ``exception`` events of one span (semconv §4 "Everywhere") merged with the dialect's error
    attributes: those fill the blanks of the first span error instead of repeating the same failure."""
    span = view.span
    out = [{"span_id": span.span_id, "source": "exception-event",
            "type": to_str(ev.attributes.get("exception.type")),
            "message": to_str(ev.attributes.get("exception.message"))}
           for ev in span.events if ev.name == "exception"]
    if not out and span.status_code == "ERROR":
        out.append({"span_id": span.span_id, "source": "span-status",
                    "type": to_str(span.attributes.get("error.type")), "message": span.status_message or None})
    if not out:
        return list(view.errors)
    for attr_err in view.errors:
        for key in ("type", "message"):
            if not out[0][key]:
                out[0][key] = attr_err[key]
    return out


def _errors(views: dict[str, SpanView], facts: LogFacts, run_view: SpanView | None,
            depth: dict[str, int]) -> tuple[list[RunError], dict[str, str]]:
    """All errors, plus span id -> a one-line error for LlmCall.error / ToolCall.error.

    Fatal (semconv §4 "Hard failure"): the run's root (the shallowest run span, else any recognized trace root)
    ended in ERROR or carries a dialect error attribute, or a dialect marked the span's errors fatal. An
    ``exception`` event on a root that still ended OK was handled, so it is evidence only."""
    errors: list[RunError] = []
    by_span: dict[str, str] = {}
    for sid, view in views.items():
        errs = _span_errors(view)
        if not errs:
            continue
        is_root = view is run_view if run_view is not None else depth[sid] == 0
        failed = view.span.status_code == "ERROR"
        for e in errs:
            errors.append(RunError(**e, fatal=(view.fatal or is_root) and (failed or e["source"] == "attribute")))
        first = errs[0]
        by_span[sid] = first["message"] or first["type"] or "error"
    errors.extend(RunError.model_validate(e) for e in facts.errors)
    return errors, by_span


def _tool_calls(views: dict[str, SpanView], facts: LogFacts, llm_calls: list[LlmCall],
                span_error: dict[str, str]) -> list[ToolCall]:
    drafts: list[dict[str, Any]] = []
    for sid, view in views.items():
        if view.kind != "tool":
            continue
        d = dict(view.tool)
        # Langfuse and OpenInference tools are named by their span (GenAI: "execute_tool {name}").
        put(d, "name", view.span.name.removeprefix("execute_tool "))
        d.update(span_id=sid, source="span", start_time_unix_nano=view.span.start_time_unix_nano,
                 end_time_unix_nano=view.span.end_time_unix_nano, error=span_error.get(sid))
        drafts.append(d)
    _join_message_tools(drafts, llm_calls)
    by_call_id = {d["call_id"]: d for d in drafts if d.get("call_id")}
    for t in facts.tools:
        target = by_call_id.get(t.get("call_id")) or next(
            (d for d in drafts if t["span_id"] and d["span_id"] == t["span_id"] and d["source"] == "span"), None)
        if target is None:
            drafts.append(dict(t))
            continue
        for key in ("name", "call_id", "arguments", "error"):
            put(target, key, t.get(key))
    drafts.sort(key=lambda d: d["start_time_unix_nano"])
    validate = ToolCall.__pydantic_validator__.validate_python  # ToolCall.model_validate, minus its wrapper
    return [validate(d) for d in drafts]


def _join_message_tools(drafts: list[dict[str, Any]], llm_calls: list[LlmCall]) -> None:
    """Fill/extend tool-call drafts from the ``tool_call`` parts of LLM messages and the ``tool_call_response``
    parts answering them (semconv §1 "tool call id": ``parts[].id``). A requested call joins the tool span with
    the same call id, else the first unjoined span without a call id of the same name that started after the
    request; otherwise it is a ``source="messages"`` call on the requesting LLM span. Calls without an id are only
    taken from output messages, since a history replay cannot be told apart from a new request."""
    requested: dict[str | None, tuple[MessagePart, LlmCall]] = {}
    anonymous: list[tuple[MessagePart, LlmCall]] = []
    responses: dict[str, MessagePart] = {}
    for call in llm_calls:
        for out, messages in ((False, call.input_messages), (True, call.output_messages)):
            for m in messages:
                for p in m.parts:
                    if p.type == "tool_call":
                        if p.id:
                            requested.setdefault(p.id, (p, call))
                        elif out:
                            anonymous.append((p, call))
                    elif p.type == "tool_call_response" and p.id:
                        responses.setdefault(p.id, p)
    if not requested and not anonymous:
        return
    by_call_id = {d["call_id"]: d for d in drafts if d.get("call_id")}
    unjoined = [d for d in drafts if not d.get("call_id")]
    for part, call in (*requested.values(), *anonymous):
        target = by_call_id.get(part.id) if part.id else None
        if target is None:
            target = next((d for d in unjoined if part.name and d.get("name") == part.name
                           and d["start_time_unix_nano"] >= call.start_time_unix_nano), None)
            if target is not None:
                unjoined.remove(target)
                put(target, "call_id", part.id)
        if target is None:
            target = {"span_id": call.span_id, "name": part.name, "call_id": part.id, "source": "messages",
                      "start_time_unix_nano": call.end_time_unix_nano, "end_time_unix_nano": call.end_time_unix_nano}
            drafts.append(target)
        put(target, "arguments", part.arguments)
        resp = responses.get(part.id) if part.id else None
        if resp is not None:
            put(target, "result", resp.response)
            if getattr(resp, "is_error", False):
                put(target, "error", to_str(resp.response) or "error")


def _last_answer(drafts: list[dict[str, Any]]) -> str | None:
    """Last assistant text of the latest-ending LLM call whose finish reasons are terminal or unknown."""
    for d in sorted(drafts, key=lambda d: d.get("end_time_unix_nano") or 0, reverse=True):
        reasons = {r.lower() for r in d["finish_reasons"]}
        if reasons and not reasons & _TERMINAL:
            continue
        if text := last_text(d.get("output_messages", []), "assistant"):
            return text
    return None


def _usage(llm_calls: list[LlmCall], tool_calls: list[ToolCall], shallow: list[SpanView],
           by_id: dict[str, CanonicalSpan]) -> Usage:
    """Sum per-call tokens without double counting wrappers (see :class:`Usage`)."""
    call_ids = {c.span_id for c in llm_calls if c.span_id in by_id}
    wrappers: set[str] = set()  # LLM calls with an LLM-call descendant
    covered: set[str] = set()  # LLM calls with a token-reporting LLM-call descendant
    reported: list[tuple[LlmCall, tuple]] = []  # calls reporting tokens, with their _USAGE_FIELDS values
    for c in llm_calls:
        values = _usage_values(c)
        reports = values.count(None) != len(values)  # validated ints never equal None
        if reports:
            reported.append((c, values))
        seen = {c.span_id}
        cur = by_id[c.span_id].parent_span_id if c.span_id in by_id else ""
        while cur in by_id and cur not in seen:
            seen.add(cur)
            if cur in call_ids:
                wrappers.add(cur)
                if reports:
                    covered.add(cur)
            cur = by_id[cur].parent_span_id
    usage = Usage(llm_call_count=sum(1 for c in llm_calls if c.span_id not in wrappers),
                  tool_call_count=len(tool_calls))
    counted = [(c, values) for c, values in reported if c.span_id not in covered]
    if counted:
        sums = [getattr(usage, f) for f in _USAGE_FIELDS]
        total = usage.total_tokens
        for c, values in counted:
            for i, v in enumerate(values):
                sums[i] = sums[i] + (v or 0)
            total += (c.total_tokens if c.total_tokens is not None
                      else (c.input_tokens or 0) + (c.output_tokens or 0))
        _assign(usage, {**dict(zip(_USAGE_FIELDS, sums)), "total_tokens": total})
        return usage
    aggregate = _first(v.aggregate_usage for v in shallow)
    if aggregate:
        sums = {f: aggregate.get(f) or 0 for f in _USAGE_FIELDS}
        sums["total_tokens"] = aggregate.get("total_tokens") or sums["input_tokens"] + sums["output_tokens"]
        _assign(usage, sums)
    return usage
