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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MessagePart(BaseModel):
    """One part of a :class:`Message` (GenAI ≥1.37 part types, semconv §2.1).

    ``text``/``reasoning`` use ``content``; ``tool_call`` uses ``id``, ``name``, ``arguments`` (decoded JSON when the
    wire value was a JSON string, else the raw string); ``tool_call_response`` uses ``id`` and ``response`` (the
    ``result`` spelling of Pydantic AI and the registry example is folded into ``response``). Other part types keep
    their own fields (``modality``, ``mime_type``, ``uri``, ``file_id``, ...) as extra keys.
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

    A call that wraps another traced call (e.g. an agent SDK's response span around the client library's span) is
    not added twice: only the innermost call reporting tokens counts, and ``llm_call_count`` counts those calls.
    Aggregates (Pydantic AI ``gen_ai.aggregated_usage.*``, Vercel root ``ai.usage.*``) are used only when no LLM
    call reports tokens.
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
