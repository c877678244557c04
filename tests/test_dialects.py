"""Dialect readers and the agent-run view, on hand-written canonical spans / log records.

Every fixture uses the exact keys of /work/shared/reference/agent-semconv.md (cited as "semconv §N"). Tests that
run the real instrumentation packages live elsewhere; these cover each dialect's forms and the edge cases.
"""

from __future__ import annotations

import json
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normalizers.agent_run import AgentRun, build_agent_run
from normalizers.canonical import CanonicalLogEvent, CanonicalSpan, Scope, SpanEvent
from normalizers.dialects import DIALECT_NAMES, detect_dialects
from normalizers.dialects._base import loads

TRACE = "0af7651916cd43dd8448eb211c80319c"
_ids = count(1)


def sid(n: int) -> str:
    return f"{n:016x}"


def span(n: int, name: str, attrs: dict | None = None, *, parent: int | None = None, start: int | None = None,
         end: int | None = None, status: str = "UNSET", message: str = "", events: list | None = None,
         scope: str = "", resource: dict | None = None) -> CanonicalSpan:
    start = n * 1000 if start is None else start
    return CanonicalSpan(
        trace_id=TRACE, span_id=sid(n), parent_span_id=sid(parent) if parent else "", name=name,
        start_time_unix_nano=start, end_time_unix_nano=end if end is not None else start + 500,
        status_code=status, status_message=message, attributes=attrs or {},
        events=[SpanEvent(name=e[0], time_unix_nano=start + 1, attributes=e[1]) for e in events or ()],
        scope=Scope(name=scope), resource=resource or {})


def log(name: str = "", attrs: dict | None = None, *, body=None, span_n: int | None = None, t: int = 0,
        scope: str = "", resource: dict | None = None) -> CanonicalLogEvent:
    return CanonicalLogEvent(trace_id=TRACE, span_id=sid(span_n) if span_n else "", time_unix_nano=t,
                             event_name=name, body=body, attributes=attrs or {}, scope=Scope(name=scope),
                             resource=resource or {})


def exception(type_: str, message: str) -> tuple[str, dict]:
    return ("exception", {"exception.type": type_, "exception.message": message})


def text_parts(msg) -> list[str]:
    return [p.content for p in msg.parts if p.type == "text"]


# ------------------------------------------------------------------------------------------------ OTel GenAI


def _genai_new_trace(with_root_io: bool) -> list[CanonicalSpan]:
    root_attrs = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "weather-agent",
                  "gen_ai.provider.name": "openai", "gen_ai.conversation.id": "conv-1",
                  "gen_ai.usage.input_tokens": 999}
    if with_root_io:
        root_attrs["gen_ai.input.messages"] = json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "Root task"}]}])
        root_attrs["gen_ai.output.messages"] = json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "Root answer"}], "finish_reason": "stop"}])
    chat1_in = [{"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]}]
    chat1_out = [{"role": "assistant", "parts": [
        {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}],
        "finish_reason": "tool_call"}]
    chat2_in = chat1_in + chat1_out + [{"role": "tool", "parts": [
        {"type": "tool_call_response", "id": "call_1", "result": "18C, sunny"}]}]
    chat2_out = [{"role": "assistant", "parts": [{"type": "reasoning", "content": "easy"},
                                                 {"type": "text", "content": "It is 18C and sunny."}],
                  "finish_reason": "stop"}]
    return [
        span(1, "invoke_agent weather-agent", root_attrs),
        span(2, "chat gpt-4o", {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.input.messages": json.dumps(chat1_in),
            "gen_ai.output.messages": json.dumps(chat1_out),
            "gen_ai.system_instructions": json.dumps([{"type": "text", "content": "Be brief."}]),
            "gen_ai.response.finish_reasons": ["tool_calls"], "gen_ai.usage.input_tokens": 100,
            "gen_ai.usage.output_tokens": 20, "gen_ai.usage.cache_read.input_tokens": 40}, parent=1),
        span(3, "execute_tool get_weather", {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_weather",
            "gen_ai.tool.call.id": "call_1", "gen_ai.tool.call.arguments": "{\"city\": \"Paris\"}",
            "gen_ai.tool.call.result": "18C, sunny"}, parent=1),
        span(4, "chat gpt-4o", {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.input.messages": json.dumps(chat2_in), "gen_ai.output.messages": json.dumps(chat2_out),
            "gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 150,
            "gen_ai.usage.output_tokens": 30, "gen_ai.usage.reasoning.output_tokens": 5}, parent=1),
    ]


def test_genai_new_spans():
    run = build_agent_run(_genai_new_trace(with_root_io=False), [])
    assert run.dialects == ["otel-genai"]
    assert run.agent_name == "weather-agent"
    assert run.session_id == "conv-1"
    assert run.task_input == "Weather in Paris?"  # first user message of the first chat span
    assert run.final_output == "It is 18C and sunny."
    first, second = run.llm_calls
    assert (first.span_id, first.model, first.response_model, first.provider) == (
        sid(2), "gpt-4o", "gpt-4o-2024-08-06", "openai")
    assert first.finish_reasons == ["tool_calls"]
    assert first.system_instructions == "Be brief."
    assert (first.input_tokens, first.output_tokens, first.cache_read_input_tokens) == (100, 20, 40)
    call_part = first.output_messages[0].parts[0]
    assert (call_part.type, call_part.id, call_part.name, call_part.arguments) == (
        "tool_call", "call_1", "get_weather", {"city": "Paris"})
    assert first.output_messages[0].finish_reason == "tool_call"
    # The `result` spelling of tool_call_response is folded into `response` (semconv §2.1 "Gotcha").
    tool_msg = second.input_messages[-1]
    assert tool_msg.role == "tool" and tool_msg.parts[0].response == "18C, sunny"
    assert [p.type for p in second.output_messages[0].parts] == ["reasoning", "text"]
    assert second.reasoning_tokens == 5 and second.content_captured
    # One tool call: the span and the message parts describe the same call id.
    assert len(run.tool_calls) == 1
    tool = run.tool_calls[0]
    assert (tool.span_id, tool.name, tool.call_id, tool.arguments, tool.result, tool.error, tool.source) == (
        sid(3), "get_weather", "call_1", {"city": "Paris"}, "18C, sunny", None, "span")
    # The invoke_agent usage is an aggregate: per-call values are summed instead.
    u = run.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens, u.cache_read_input_tokens, u.reasoning_tokens) == (
        250, 50, 300, 40, 5)
    assert (u.llm_call_count, u.tool_call_count) == (2, 1)
    assert run.errors == []


def test_genai_new_root_agent_messages_win():
    run = build_agent_run(_genai_new_trace(with_root_io=True), [])
    assert run.task_input == "Root task"
    assert run.final_output == "Root answer"


def test_genai_inference_details_log_event_joins_its_span():
    """Content only on the opt-in ``gen_ai.client.inference.operation.details`` record (EVENT_ONLY mode)."""
    spans = [span(1, "chat gpt-4o", {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                     "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7})]
    details = log("gen_ai.client.inference.operation.details", {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
        "gen_ai.input.messages": [{"role": "user", "parts": [{"type": "text", "content": "Only in a log"}]}],
        "gen_ai.output.messages": [{"role": "assistant", "parts": [{"type": "text", "content": "Logged answer"}],
                                    "finish_reason": "stop"}],
        "gen_ai.system_instructions": [{"type": "text", "content": "sys"}]}, span_n=1, t=1500)
    run = build_agent_run(spans, [details])
    assert len(run.llm_calls) == 1
    call = run.llm_calls[0]
    assert call.span_id == sid(1) and call.input_tokens == 7
    assert text_parts(call.input_messages[0]) == ["Only in a log"]
    assert call.system_instructions == "sys" and call.finish_reasons == ["stop"]
    assert run.task_input == "Only in a log" and run.final_output == "Logged answer"


def test_genai_details_event_without_its_span_is_a_call_of_its_own():
    ev = log("gen_ai.client.inference.operation.details", body={
        "gen_ai.request.model": "m", "gen_ai.input.messages": [
            {"role": "user", "parts": [{"type": "text", "content": "hi"}]}]}, span_n=77, t=5)
    run = build_agent_run([], [ev])
    assert run.dialects == ["otel-genai"]
    assert [(c.span_id, c.model) for c in run.llm_calls] == [(sid(77), "m")]
    assert run.task_input == "hi"


def test_genai_old_log_events_openai_v2_default_mode():
    """1.28–1.36: content as per-message log records; older SDKs name them only in the ``event.name`` attribute."""
    spans = [span(1, "chat gpt-4o-mini", {
        "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.finish_reasons": ["tool_calls"], "gen_ai.usage.input_tokens": 50,
        "gen_ai.usage.output_tokens": 10})]
    logs = [
        log("gen_ai.system.message", {"gen_ai.system": "openai"}, body={"content": "You are helpful."},
            span_n=1, t=1),
        log("", {"event.name": "gen_ai.user.message", "gen_ai.system": "openai"},
            body={"content": "What is 2+2?"}, span_n=1, t=2),
        log("gen_ai.assistant.message", body={"tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"expr\": \"2+2\"}"}}]},
            span_n=1, t=3),
        log("gen_ai.tool.message", body={"content": "4", "id": "c1"}, span_n=1, t=4),
        log("gen_ai.choice", body={"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "2+2 is 4."}}, span_n=1, t=5),
    ]
    run = build_agent_run(spans, logs)
    assert run.dialects == ["otel-genai"]
    call = run.llm_calls[0]
    assert [m.role for m in call.input_messages] == ["system", "user", "assistant", "tool"]
    assert call.system_instructions == "You are helpful."
    assert call.input_messages[2].parts[0].arguments == {"expr": "2+2"}
    assert call.input_messages[3].parts[0].type == "tool_call_response"
    assert call.input_messages[3].parts[0].response == "4"
    assert call.output_messages[0].finish_reason == "stop"
    assert call.finish_reasons == ["tool_calls"]  # the span attribute wins over the event
    assert call.provider == "openai"
    assert run.task_input == "What is 2+2?"
    assert run.final_output is None  # the span's finish reason says the call ended in a tool call
    # The tool call seen only in messages is reported, answered by the tool message.
    [tool] = run.tool_calls
    assert (tool.name, tool.call_id, tool.arguments, tool.result, tool.source, tool.span_id) == (
        "calc", "c1", {"expr": "2+2"}, "4", "messages", sid(1))


def test_genai_old_span_less_events_are_grouped_per_call():
    logs = [log("gen_ai.user.message", body={"content": "q1"}, t=1),
            log("gen_ai.choice", body={"index": 0, "finish_reason": "stop", "message": {"content": "a1"}}, t=2),
            log("gen_ai.user.message", body={"content": "q2"}, t=3),
            log("gen_ai.choice", body={"index": 0, "finish_reason": "stop", "message": {"content": "a2"}}, t=4)]
    run = build_agent_run([], logs)
    assert [text_parts(c.input_messages[0]) for c in run.llm_calls] == [["q1"], ["q2"]]
    assert run.task_input == "q1" and run.final_output == "a2"
    assert run.usage.llm_call_count == 2


def test_genai_1_26_span_events_and_prompt_tokens():
    spans = [span(1, "chat gpt-4", {
        "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4", "gen_ai.usage.prompt_tokens": 11,
        "gen_ai.usage.completion_tokens": 3}, events=[
        ("gen_ai.content.prompt", {"gen_ai.prompt": json.dumps([{"role": "user", "content": "Hello"}])}),
        ("gen_ai.content.completion",
         {"gen_ai.completion": json.dumps([{"role": "assistant", "content": "Hi there"}])})])]
    run = build_agent_run(spans, [])
    call = run.llm_calls[0]
    assert (call.input_tokens, call.output_tokens) == (11, 3)
    assert run.task_input == "Hello" and run.final_output == "Hi there"


def test_handled_exception_on_ok_root_is_not_fatal():
    run = build_agent_run([span(1, "invoke_agent a", {"gen_ai.operation.name": "invoke_agent"},
                                events=[exception("ValueError", "retrying")])], [])
    assert [(e.source, e.type, e.fatal) for e in run.errors] == [("exception-event", "ValueError", False)]


def test_genai_errors_span_status_exception_event_and_log():
    spans = [
        span(1, "invoke_agent a", {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "a"},
             status="ERROR", message="boom", events=[exception("RateLimitError", "429 too many")]),
        span(2, "chat m", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                           "error.type": "RateLimitError"}, parent=1, status="ERROR"),
        span(3, "execute_tool t", {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t"},
             parent=1, status="ERROR", message="tool exploded"),
    ]
    logs = [log("gen_ai.client.operation.exception", {"error.type": "TimeoutError",
                                                      "exception.message": "timed out"}, span_n=2, t=3)]
    run = build_agent_run(spans, logs)
    errs = [(e.span_id, e.source, e.type, e.message, e.fatal) for e in run.errors]
    assert errs == [
        (sid(1), "exception-event", "RateLimitError", "429 too many", True),
        (sid(2), "span-status", "RateLimitError", None, False),
        (sid(3), "span-status", None, "tool exploded", False),
        (sid(2), "log-event", "TimeoutError", "timed out", False),
    ]
    assert run.llm_calls[0].error == "RateLimitError"
    assert run.tool_calls[0].error == "tool exploded"


# ------------------------------------------------------------------------------------------------ OpenInference


def test_openinference_agent_llm_tool():
    spans = [
        span(1, "Agent", {"openinference.span.kind": "AGENT", "agent.name": "support-bot",
                          "input.value": "Reset my password", "input.mime_type": "text/plain",
                          "output.value": json.dumps({"output": "Done, check your email."}),
                          "output.mime_type": "application/json", "session.id": "s-9", "user.id": "u-1"},
             scope="openinference.instrumentation.langchain"),
        span(2, "ChatOpenAI", {
            "openinference.span.kind": "LLM", "llm.model_name": "gpt-4o", "llm.provider": "openai",
            "llm.system": "openai",
            "llm.input_messages.0.message.role": "system", "llm.input_messages.0.message.content": "Be nice.",
            "llm.input_messages.1.message.role": "user",
            "llm.input_messages.1.message.contents.0.message_content.type": "text",
            "llm.input_messages.1.message.contents.0.message_content.text": "Reset my password",
            "llm.input_messages.1.message.contents.1.message_content.type": "image",
            "llm.input_messages.1.message.contents.1.message_content.image.image.url": "https://x/img.png",
            "llm.output_messages.0.message.role": "assistant",
            "llm.output_messages.0.message.tool_calls.0.tool_call.id": "tc_1",
            "llm.output_messages.0.message.tool_calls.0.tool_call.function.name": "reset_password",
            "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments": "{\"user\": \"u-1\"}",
            "llm.finish_reason": "tool_calls", "llm.token_count.prompt": 30, "llm.token_count.completion": 8,
            "llm.token_count.total": 38, "llm.token_count.prompt_details.cache_read": 10,
            "llm.token_count.completion_details.reasoning": 2}, parent=1),
        span(3, "reset_password", {"openinference.span.kind": "TOOL", "tool.name": "reset_password",
                                   "input.value": "{\"user\": \"u-1\"}", "output.value": "email sent"},
             parent=1, start=3000),
        span(4, "lookup", {"openinference.span.kind": "TOOL", "tool.name": "lookup", "input.value": "{}"},
             parent=1, status="ERROR", events=[exception("KeyError", "'u-2'")]),
    ]
    run = build_agent_run(spans, [])
    assert run.dialects == ["openinference"]
    assert run.agent_name == "support-bot"
    assert (run.session_id, run.user_id) == ("s-9", "u-1")
    assert run.task_input == "Reset my password"
    assert run.final_output == "Done, check your email."
    call = run.llm_calls[0]
    assert (call.model, call.provider, call.finish_reasons) == ("gpt-4o", "openai", ["tool_calls"])
    assert (call.input_tokens, call.output_tokens, call.total_tokens) == (30, 8, 38)
    assert (call.cache_read_input_tokens, call.reasoning_tokens) == (10, 2)
    assert call.system_instructions == "Be nice."
    user = call.input_messages[1]
    assert [p.type for p in user.parts] == ["text", "uri"] and user.parts[1].uri == "https://x/img.png"
    tc = call.output_messages[0].parts[0]
    assert (tc.type, tc.id, tc.name, tc.arguments) == ("tool_call", "tc_1", "reset_password", {"user": "u-1"})
    # The TOOL span has no tool.id: it is joined to the requested call by name and gets its call id.
    by_name = {t.name: t for t in run.tool_calls}
    assert len(run.tool_calls) == 2
    assert (by_name["reset_password"].call_id, by_name["reset_password"].arguments,
            by_name["reset_password"].result) == ("tc_1", {"user": "u-1"}, "email sent")
    assert by_name["lookup"].error == "'u-2'"
    assert [(e.span_id, e.source, e.type, e.fatal) for e in run.errors] == [
        (sid(4), "exception-event", "KeyError", False)]
    assert run.usage.total_tokens == 38


def test_openinference_raw_provider_json_fallback():
    """Older OI spans without flat messages: parse the raw request/response JSON (semconv §5 encoding 7)."""
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Summarize this"}]}
    response = {"choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Summary."}}]}
    spans = [span(1, "llm", {"openinference.span.kind": "LLM", "input.value": json.dumps(request),
                             "output.value": json.dumps(response), "input.mime_type": "application/json"})]
    run = build_agent_run(spans, [])
    call = run.llm_calls[0]
    assert call.finish_reasons == ["stop"]
    assert run.task_input == "Summarize this" and run.final_output == "Summary."


def test_wrapper_llm_spans_are_not_counted_twice():
    """OpenAI Agents (OI bridge) Response span wrapping the OpenAI client span (semconv §3 "Wrapper duplicates")."""
    spans = [
        span(1, "Agent workflow", {"openinference.span.kind": "AGENT"}),
        span(2, "response", {"openinference.span.kind": "LLM", "llm.token_count.prompt": 10,
                             "llm.token_count.completion": 5}, parent=1),
        span(3, "ChatCompletion", {"openinference.span.kind": "LLM", "llm.token_count.prompt": 10,
                                   "llm.token_count.completion": 5}, parent=2),
    ]
    run = build_agent_run(spans, [])
    assert len(run.llm_calls) == 2
    assert (run.usage.input_tokens, run.usage.output_tokens, run.usage.llm_call_count) == (10, 5, 1)


# ------------------------------------------------------------------------------------------------ OpenLLMetry


def test_openllmetry_old_flat_spans_and_decorators():
    spans = [
        span(1, "trip_planner.workflow", {
            "traceloop.span.kind": "workflow", "traceloop.entity.name": "trip_planner",
            "traceloop.workflow.name": "trip_planner",
            "traceloop.entity.input": json.dumps({"args": ["Plan 2 days in Rome"], "kwargs": {}}),
            "traceloop.entity.output": json.dumps("Day 1: Colosseum. Day 2: Vatican."),
            "traceloop.association.properties.session_id": "sess-7",
            "traceloop.association.properties.user_id": "user-7"}, scope="traceloop.tracer"),
        span(2, "openai.chat", {
            "llm.request.type": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4",
            "gen_ai.response.model": "gpt-4-0613", "traceloop.workflow.name": "trip_planner",
            "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": "Plan 2 days in Rome",
            "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.finish_reason": "tool_calls",
            "gen_ai.completion.0.tool_calls.0.id": "call_a", "gen_ai.completion.0.tool_calls.0.name": "search",
            "gen_ai.completion.0.tool_calls.0.arguments": "{\"q\": \"Rome\"}",
            "gen_ai.usage.prompt_tokens": 12, "gen_ai.usage.completion_tokens": 6,
            "llm.usage.total_tokens": 18}, parent=1, scope="opentelemetry.instrumentation.openai"),
        span(3, "search.tool", {"traceloop.span.kind": "tool", "traceloop.entity.name": "search",
                                "traceloop.entity.input": json.dumps({"args": [], "kwargs": {"q": "Rome"}}),
                                "traceloop.entity.output": json.dumps(["Colosseum", "Vatican"])}, parent=1),
        span(4, "openai.chat", {
            "llm.request.type": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4",
            "gen_ai.prompt.0.role": "tool", "gen_ai.prompt.0.content": "[\"Colosseum\", \"Vatican\"]",
            "gen_ai.prompt.0.tool_call_id": "call_a",
            "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": "Day 1: Colosseum.",
            "gen_ai.completion.0.finish_reason": "stop", "gen_ai.usage.input_tokens": 20,
            "gen_ai.usage.output_tokens": 9}, parent=1),
    ]
    run = build_agent_run(spans, [])
    assert run.dialects == ["openllmetry"]
    assert run.agent_name == "trip_planner"  # the workflow name: no agent span
    assert (run.session_id, run.user_id) == ("sess-7", "user-7")
    assert run.task_input == "Plan 2 days in Rome"
    assert run.final_output == "Day 1: Colosseum. Day 2: Vatican."
    first = run.llm_calls[0]
    assert (first.model, first.provider, first.operation) == ("gpt-4", "openai", "chat")
    assert (first.input_tokens, first.output_tokens, first.total_tokens) == (12, 6, 18)
    assert first.finish_reasons == ["tool_calls"]
    assert first.output_messages[0].parts[0].arguments == {"q": "Rome"}
    # A tool message answering call_a keeps its text (which only looks like JSON) as the response.
    assert run.llm_calls[1].input_messages[0].parts[0].response == "[\"Colosseum\", \"Vatican\"]"
    [tool] = run.tool_calls
    assert (tool.name, tool.call_id, tool.arguments, tool.result) == (
        "search", "call_a", {"q": "Rome"}, ["Colosseum", "Vatican"])
    assert (run.usage.input_tokens, run.usage.output_tokens, run.usage.total_tokens) == (32, 15, 47)


def test_openllmetry_errors():
    spans = [span(1, "pipeline.workflow", {"traceloop.span.kind": "workflow", "traceloop.entity.name": "pipeline"},
                  status="ERROR", events=[exception("RuntimeError", "step 2 failed")]),
             span(2, "anthropic.chat", {"llm.request.type": "chat", "gen_ai.system": "anthropic",
                                        "error.type": "APIStatusError"}, parent=1, status="ERROR",
                  message="overloaded")]
    run = build_agent_run(spans, [])
    assert [(e.span_id, e.source, e.type, e.message, e.fatal) for e in run.errors] == [
        (sid(1), "exception-event", "RuntimeError", "step 2 failed", True),
        (sid(2), "span-status", "APIStatusError", "overloaded", False)]
    assert run.llm_calls[0].error == "overloaded"


def test_openllmetry_new_genai_llm_span():
    """≥0.55: still ``openai.chat`` but GenAI-new content (semconv §2.3), routed to the GenAI reader."""
    spans = [span(1, "openai.chat", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4.1",
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "Yo"}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "finish_reason": "stop", "parts": [
            {"type": "text", "content": "Hey"}, {"type": "refusal", "content": "no"}]}]),
        "gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 2, "gen_ai.usage.total_tokens": 5, "gen_ai.usage.reasoning_tokens": 1})]
    run = build_agent_run(spans, [])
    assert run.dialects == ["openllmetry"]
    call = run.llm_calls[0]
    assert (call.total_tokens, call.reasoning_tokens, call.finish_reasons) == (5, 1, ["stop"])
    assert [p.type for p in call.output_messages[0].parts] == ["text", "refusal"]
    assert run.final_output == "Hey"


# ------------------------------------------------------------------------------------------------ Vercel AI SDK


def test_vercel_legacy_generate_text_v5():
    root = {"ai.operationId": "ai.generateText", "operation.name": "ai.generateText trip",
            "ai.telemetry.functionId": "trip", "resource.name": "trip",
            "ai.prompt": json.dumps({"system": "sys", "prompt": "Weather in Oslo?"}),
            "ai.response.text": "Cold, 2C.", "ai.usage.promptTokens": 999, "ai.usage.completionTokens": 999,
            "ai.telemetry.metadata.sessionId": "chat-3", "ai.telemetry.metadata.userId": "alice"}
    step1 = {"ai.operationId": "ai.generateText.doGenerate", "ai.model.id": "gpt-4o-mini",
             "ai.model.provider": "openai.chat", "gen_ai.system": "openai.chat",
             "ai.prompt.messages": json.dumps([{"role": "system", "content": "sys"},
                                               {"role": "user", "content": [{"type": "text",
                                                                             "text": "Weather in Oslo?"}]}]),
             "ai.response.toolCalls": json.dumps([{"toolCallId": "tc1", "toolName": "weather",
                                                   "input": "{\"city\":\"Oslo\"}"}]),
             "ai.response.finishReason": "tool-calls", "ai.usage.promptTokens": 40,
             "ai.usage.completionTokens": 10, "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 10}
    step2 = {"ai.operationId": "ai.generateText.doGenerate", "ai.model.id": "gpt-4o-mini",
             "ai.model.provider": "openai.chat", "ai.response.model": "gpt-4o-mini-2024-07-18",
             "ai.prompt.messages": json.dumps([
                 {"role": "assistant", "content": [{"type": "tool-call", "toolCallId": "tc1", "toolName": "weather",
                                                    "input": {"city": "Oslo"}}]},
                 {"role": "tool", "content": [{"type": "tool-result", "toolCallId": "tc1", "toolName": "weather",
                                               "output": {"type": "json", "value": {"temp": 2}}}]}]),
             "ai.response.text": "Cold, 2C.", "ai.response.finishReason": "stop",
             "ai.usage.inputTokens": 60, "ai.usage.outputTokens": 5, "ai.usage.cachedInputTokens": 32,
             "ai.usage.reasoningTokens": 3}
    tool = {"ai.operationId": "ai.toolCall", "ai.toolCall.name": "weather", "ai.toolCall.id": "tc1",
            "ai.toolCall.args": "{\"city\":\"Oslo\"}", "ai.toolCall.result": "{\"temp\":2}"}
    spans = [span(1, "ai.generateText", root, scope="ai"),
             span(2, "ai.generateText.doGenerate", step1, parent=1, scope="ai"),
             span(3, "ai.toolCall", tool, parent=1, scope="ai"),
             span(4, "ai.generateText.doGenerate", step2, parent=1, scope="ai")]
    run = build_agent_run(spans, [])
    assert run.dialects == ["vercel-ai"]
    assert run.agent_name == "trip"
    assert (run.session_id, run.user_id) == ("chat-3", "alice")
    assert run.task_input == "Weather in Oslo?" and run.final_output == "Cold, 2C."
    c1, c2 = run.llm_calls
    assert (c1.model, c1.provider, c1.operation) == ("gpt-4o-mini", "openai", "ai.generateText.doGenerate")
    assert c1.finish_reasons == ["tool-calls"] and c1.system_instructions == "sys"
    assert c1.output_messages[0].parts[0].arguments == {"city": "Oslo"}
    assert c2.response_model == "gpt-4o-mini-2024-07-18"
    assert (c2.input_tokens, c2.cache_read_input_tokens, c2.reasoning_tokens) == (60, 32, 3)
    assert c2.input_messages[1].parts[0].response == {"temp": 2}
    [t] = run.tool_calls
    assert (t.name, t.call_id, t.arguments, t.result, t.error) == ("weather", "tc1", {"city": "Oslo"},
                                                                   {"temp": 2}, None)
    # Root ai.usage.* is the sum of the steps; counted once.
    assert (run.usage.input_tokens, run.usage.output_tokens, run.usage.llm_call_count) == (100, 15, 2)


def test_vercel_v4_messages_tool_error_and_root_messages_prompt():
    root = {"ai.operationId": "ai.streamText",
            "ai.prompt": json.dumps({"messages": [{"role": "user", "content": "first"},
                                                  {"role": "assistant", "content": "ok"},
                                                  {"role": "user", "content": "latest ask"}]})}
    step = {"ai.operationId": "ai.streamText.doStream", "ai.model.id": "claude-3-5-sonnet",
            "ai.prompt.messages": json.dumps([
                {"role": "assistant", "content": [{"type": "tool-call", "toolCallId": "x1", "toolName": "fs",
                                                   "args": {"path": "/etc"}}]},
                {"role": "tool", "content": [{"type": "tool-result", "toolCallId": "x1", "toolName": "fs",
                                              "result": "EACCES", "isError": True}]}]),
            "ai.response.text": "I cannot read it.", "ai.response.finishReason": "stop"}
    run = build_agent_run([span(1, "ai.streamText", root),
                           span(2, "ai.streamText.doStream", step, parent=1),
                           span(3, "ai.toolCall", {"ai.operationId": "ai.toolCall", "ai.toolCall.name": "fs",
                                                   "ai.toolCall.id": "x1"}, parent=1, status="ERROR",
                                events=[exception("Error", "EACCES")])], [])
    assert run.task_input == "latest ask"  # semconv §1: last user message of `messages`
    assert run.final_output == "I cannot read it."  # root has no ai.response.text: last stopping LLM call
    [t] = run.tool_calls
    assert (t.call_id, t.arguments, t.result, t.error) == ("x1", {"path": "/etc"}, "EACCES", "EACCES")
    part = run.llm_calls[0].input_messages[1].parts[0]
    assert part.is_error is True  # failed tool whose error went back to the model
    assert [(e.span_id, e.fatal) for e in run.errors] == [(sid(3), False)]


def test_vercel_root_error_is_fatal():
    run = build_agent_run([span(1, "ai.generateText", {"ai.operationId": "ai.generateText"},
                                status="ERROR", events=[exception("AI_APICallError", "overloaded")])], [])
    assert [(e.source, e.type, e.message, e.fatal) for e in run.errors] == [
        ("exception-event", "AI_APICallError", "overloaded", True)]


# ------------------------------------------------------------------------------------------------ Langfuse


def test_langfuse_native_attributes():
    spans = [
        span(1, "support-run", {
            "langfuse.trace.name": "support", "langfuse.trace.input": json.dumps({"question": "Refund?"}),
            "langfuse.trace.output": "Refund issued.", "langfuse.session.id": "lf-s", "langfuse.user.id": "lf-u",
            "langfuse.observation.type": "agent", "langfuse.observation.level": "ERROR",
            "langfuse.observation.status_message": "policy check failed"}, scope="langfuse-sdk"),
        span(2, "llm-call", {
            "langfuse.observation.type": "generation", "langfuse.observation.model.name": "claude-sonnet-4",
            "langfuse.observation.input": json.dumps([{"role": "user", "content": "Refund?"}]),
            "langfuse.observation.output": json.dumps({"role": "assistant", "content": "Refund issued."}),
            "langfuse.observation.usage_details": json.dumps({"input": 21, "output": 4, "total": 25,
                                                              "cache_read_input_tokens": 8})}, parent=1),
        span(3, "refund", {"langfuse.observation.type": "tool",
                           "langfuse.observation.input": json.dumps({"order": 42}),
                           "langfuse.observation.output": "ok", "langfuse.observation.level": "ERROR"}, parent=1),
    ]
    run = build_agent_run(spans, [])
    assert run.dialects == ["langfuse"]
    assert run.agent_name == "support"
    assert (run.session_id, run.user_id) == ("lf-s", "lf-u")
    assert run.task_input == "Refund?" and run.final_output == "Refund issued."
    call = run.llm_calls[0]
    assert call.model == "claude-sonnet-4"
    assert (call.input_tokens, call.output_tokens, call.total_tokens, call.cache_read_input_tokens) == (21, 4, 25, 8)
    assert text_parts(call.output_messages[0]) == ["Refund issued."]
    [t] = run.tool_calls
    assert (t.name, t.arguments, t.result, t.error) == ("refund", {"order": 42}, "ok",
                                                         "langfuse.observation.level=ERROR")
    assert [(e.span_id, e.source, e.message, e.fatal) for e in run.errors] == [
        (sid(1), "attribute", "policy check failed", True), (sid(3), "attribute", None, False)]
    assert run.errors[0].type == "langfuse.observation.level=ERROR"


# ------------------------------------------------------------------------------------------------ Pydantic AI


def test_pydantic_ai_v3_plus():
    all_messages = [
        {"role": "system", "parts": [{"type": "text", "content": "You are a calculator."}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is 6*7?"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "pyd_1", "name": "mul",
                                         "arguments": {"a": 6, "b": 7}}]},
        {"role": "user", "parts": [{"type": "tool_call_response", "id": "pyd_1", "name": "mul", "result": 42}]},
        {"role": "assistant", "parts": [{"type": "text", "content": "42"}]}]
    run_attrs = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "calc", "agent_name": "calc",
                 "model_name": "gpt-4o", "gen_ai.agent.call.id": "run-1", "gen_ai.conversation.id": "conv-p",
                 "logfire.msg": "calc run", "pydantic_ai.all_messages": json.dumps(all_messages),
                 "final_result": "42", "gen_ai.aggregated_usage.input_tokens": 77,
                 "gen_ai.aggregated_usage.output_tokens": 11}
    chat1 = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.system": "openai",
             "gen_ai.request.model": "gpt-4o", "gen_ai.input.messages": json.dumps(all_messages[1:2]),
             "gen_ai.output.messages": json.dumps([{**all_messages[2], "finish_reason": "tool_call"}]),
             "gen_ai.usage.input_tokens": 30, "gen_ai.usage.output_tokens": 6}
    chat2 = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
             "gen_ai.input.messages": json.dumps(all_messages[1:4]),
             "gen_ai.output.messages": json.dumps([{"role": "assistant", "finish_reason": "stop", "parts": [
                 {"type": "thinking", "content": "6*7"}, {"type": "text", "content": "42"}]}]),
             "gen_ai.usage.input_tokens": 47, "gen_ai.usage.output_tokens": 5}
    tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "mul", "gen_ai.tool.call.id": "pyd_1",
            "gen_ai.tool.call.arguments": "{\"a\":6,\"b\":7}", "gen_ai.tool.call.result": "42"}
    spans = [span(1, "invoke_agent calc", run_attrs, scope="pydantic-ai"),
             span(2, "chat gpt-4o", chat1, parent=1, scope="pydantic-ai"),
             span(3, "execute_tool mul", tool, parent=1, scope="pydantic-ai"),
             span(4, "chat gpt-4o", chat2, parent=1, scope="pydantic-ai")]
    run = build_agent_run(spans, [])
    assert run.dialects == ["pydantic-ai"]
    assert (run.agent_name, run.session_id) == ("calc", "conv-p")
    assert run.task_input == "What is 6*7?" and run.final_output == "42"
    c2 = run.llm_calls[1]
    assert [p.type for p in c2.output_messages[0].parts] == ["reasoning", "text"]  # thinking -> reasoning
    assert c2.input_messages[2].parts[0].response == 42  # `result` spelling
    [t] = run.tool_calls
    assert (t.name, t.call_id, t.arguments, t.result) == ("mul", "pyd_1", {"a": 6, "b": 7}, "42")
    # Per-call usage, not the run span's aggregate (semconv §5 "Tokens").
    assert (run.usage.input_tokens, run.usage.output_tokens) == (77, 11)
    assert run.usage.llm_call_count == 2


def test_pydantic_ai_tool_retry_error():
    """A ``ToolRetryError`` marks execute_tool ERROR and puts the retry prompt in the result (semconv §4)."""
    spans = [span(1, "invoke_agent a", {"gen_ai.operation.name": "invoke_agent", "final_result": "done"},
                  scope="pydantic-ai"),
             span(2, "execute_tool lookup", {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup",
                                             "gen_ai.tool.call.id": "c9", "gen_ai.tool.call.result": "Fix the id",
                                             "pydantic_ai.tool.failure_stage": "execution"}, parent=1,
                  status="ERROR", message="ToolRetryError", scope="pydantic-ai")]
    run = build_agent_run(spans, [])
    [t] = run.tool_calls
    assert (t.call_id, t.result, t.error) == ("c9", "Fix the id", "ToolRetryError")
    assert [(e.span_id, e.fatal) for e in run.errors] == [(sid(2), False)]  # the run recovered


def test_pydantic_ai_aggregate_usage_when_no_call_reports_tokens():
    spans = [span(1, "invoke_agent calc", {"gen_ai.agent.name": "calc", "gen_ai.operation.name": "invoke_agent",
                                           "gen_ai.aggregated_usage.input_tokens": 77,
                                           "gen_ai.aggregated_usage.output_tokens": 11}, scope="pydantic-ai")]
    run = build_agent_run(spans, [])
    assert (run.usage.input_tokens, run.usage.output_tokens, run.usage.total_tokens) == (77, 11, 88)
    assert run.usage.llm_call_count == 0


def test_pydantic_ai_v1_and_v2_forms():
    """v≤2 names/keys (``agent run``, ``running tool``, ``tool_arguments``) and v1 ``events`` arrays."""
    events = [{"event.name": "gen_ai.system.message", "content": "sys", "role": "system"},
              {"event.name": "gen_ai.user.message", "content": "Ping?", "role": "user"},
              {"event.name": "gen_ai.choice", "index": 0, "finish_reason": "stop",
               "message": {"role": "assistant", "content": "Pong."}}]
    spans = [span(1, "agent run", {"agent_name": "pinger", "model_name": "gpt-4o",
                                   "all_messages_events": json.dumps(events[:2]), "final_result": "Pong."},
                  scope="pydantic-ai"),
             span(2, "chat gpt-4o", {"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
                                     "gen_ai.request.model": "gpt-4o", "events": json.dumps(events)},
                  parent=1, scope="pydantic-ai"),
             span(3, "running tool", {"gen_ai.tool.name": "ping", "tool_arguments": "{\"host\":\"a\"}",
                                      "tool_response": "up"}, parent=1, scope="pydantic-ai")]
    run = build_agent_run(spans, [])
    assert run.agent_name == "pinger"
    assert run.task_input == "Ping?" and run.final_output == "Pong."
    call = run.llm_calls[0]
    assert [m.role for m in call.input_messages] == ["system", "user"]
    assert call.finish_reasons == ["stop"]
    [t] = run.tool_calls
    assert (t.name, t.arguments, t.result) == ("ping", {"host": "a"}, "up")


def test_logfire_openai_agents_and_instrument_openai():
    scope = "logfire.openai_agents"
    spans = [
        span(1, "Agent run: {name!r}", {"logfire.msg_template": "Agent run: {name!r}", "name": "triage",
                                        "logfire.level_num": 17,
                                        "error": json.dumps({"message": "Max turns exceeded",
                                                             "data": {"max_turns": 3}})}, scope=scope),
        span(2, "Responses API with {gen_ai.request.model!r}", {
            "logfire.msg_template": "Responses API with {gen_ai.request.model!r}", "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3,
            "events": json.dumps([{"event.name": "gen_ai.user.message", "content": "Route me"}]),
            "response": json.dumps({"output": [{"type": "message", "content": [
                {"type": "output_text", "text": "Routing to billing"}]}]})}, parent=1, scope=scope),
        span(3, "Function: {name}", {"logfire.msg_template": "Function: {name}", "name": "route",
                                     "input": "{\"to\": \"billing\"}", "output": "ok"}, parent=1, scope=scope),
        span(4, "Chat Completion with {request_data[model]!r}", {
            "logfire.msg_template": "Chat Completion with {request_data[model]!r}", "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            "request_data": json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
            "response_data": json.dumps({"message": {"role": "assistant", "content": "y"}})},
            parent=1, scope="logfire.openai"),
    ]
    run = build_agent_run(spans, [])
    assert run.dialects == ["logfire"]
    assert run.agent_name == "triage"
    assert run.task_input == "Route me"
    r, c = run.llm_calls
    assert text_parts(r.output_messages[0]) == ["Routing to billing"]
    assert text_parts(c.input_messages[0]) == ["x"] and text_parts(c.output_messages[0]) == ["y"]
    [t] = run.tool_calls
    assert (t.name, t.arguments, t.result) == ("route", {"to": "billing"}, "ok")
    assert [(e.span_id, e.source, e.message, e.fatal) for e in run.errors] == [
        (sid(1), "attribute", "Max turns exceeded: {\"max_turns\":3}", True)]


def test_pydantic_ai_through_logfire_names_both_dialects():
    s = span(1, "invoke_agent a", {"gen_ai.operation.name": "invoke_agent", "logfire.msg_template": "{agent} run",
                                   "final_result": "x"}, scope="pydantic-ai")
    assert detect_dialects(s) == ["pydantic-ai", "logfire"]


# ------------------------------------------------------------------------------------------------ Claude Code


def _cc(name: str, attrs: dict, t: int, short: bool = False, **kw) -> CanonicalLogEvent:
    """Claude Code records: ``event.name`` holds the short name; some exporters give the full one."""
    base = {"session.id": "cc-sess", "prompt.id": "p1", "user.id": "anon-1", "event.sequence": t}
    return log(name if short else f"claude_code.{name}", {**base, **attrs}, t=t,
               scope="com.anthropic.claude_code.events", resource={"service.name": "claude-code"}, **kw)


def test_claude_code_log_events_only():
    logs = [
        _cc("user_prompt", {"prompt": "Fix the failing test", "prompt_length": 20}, 1, short=True),
        _cc("api_request", {"model": "claude-sonnet-4-5", "input_tokens": 10, "output_tokens": 50,
                            "cache_read_tokens": 900, "cache_creation_tokens": 100, "duration_ms": 2}, 10_000_000),
        _cc("tool_result", {"tool_name": "Bash", "tool_use_id": "toolu_1", "success": "false",
                            "error_type": "exit_code", "duration_ms": 1}, 20_000_000),
        _cc("api_error", {"model": "claude-sonnet-4-5", "error": "Overloaded", "status_code": 529}, 30_000_000),
        _cc("api_request", {"model": "claude-sonnet-4-5", "input_tokens": 5, "output_tokens": 7}, 40_000_000),
        _cc("assistant_response", {"response": "Fixed: off-by-one in parse()."}, 50_000_000),
        _cc("tool_decision", {"tool_name": "Edit", "decision": "reject"}, 60_000_000),
    ]
    run = build_agent_run([], logs)
    assert run.dialects == ["claude-code"]
    assert (run.session_id, run.user_id, run.agent_name) == ("cc-sess", "anon-1", "claude-code")
    assert run.task_input == "Fix the failing test"
    assert run.final_output == "Fixed: off-by-one in parse()."
    first, _ = run.llm_calls
    assert (first.model, first.provider, first.input_tokens, first.output_tokens) == (
        "claude-sonnet-4-5", "anthropic", 10, 50)
    assert (first.cache_read_input_tokens, first.cache_creation_input_tokens) == (900, 100)
    assert (first.start_time_unix_nano, first.end_time_unix_nano) == (8_000_000, 10_000_000)
    assert not first.content_captured
    [t] = run.tool_calls
    assert (t.name, t.call_id, t.error, t.source) == ("Bash", "toolu_1", "exit_code", "log-event")
    assert [(e.source, e.type, e.message, e.fatal) for e in run.errors] == [
        ("log-event", "exit_code", "exit_code", False),
        ("log-event", "claude_code.api_error", "529: Overloaded", False),  # a later api_request recovered
    ]
    assert (run.usage.input_tokens, run.usage.output_tokens, run.usage.cache_read_input_tokens) == (15, 57, 900)


def test_claude_code_stalled_api_error_and_fatal_records():
    logs = [_cc("user_prompt", {"prompt": "<REDACTED>"}, 1),
            _cc("api_error", {"error": "Overloaded", "status_code": 529}, 2),
            _cc("api_retries_exhausted", {"error": "gave up", "total_attempts": 10}, 3),
            _cc("internal_error", {"error_name": "TypeError", "error_code": "E42"}, 4)]
    run = build_agent_run([], logs)
    assert run.task_input is None  # redacted prompt is "not captured", not a prompt
    assert [(e.type, e.message, e.fatal) for e in run.errors] == [
        ("claude_code.api_error", "529: Overloaded", True),
        ("claude_code.api_retries_exhausted", "gave up", True),
        ("TypeError", "E42", True)]


def test_claude_code_name_in_body():
    ev = log("api_request", {"model": "m", "input_tokens": 1, "output_tokens": 2},
             body="claude_code.api_request", t=1)
    assert detect_dialects(ev) == ["claude-code"]
    assert build_agent_run([], [ev]).llm_calls[0].model == "m"


def test_claude_code_traces_with_logs():
    res = {"service.name": "claude-code"}
    scope = "com.anthropic.claude_code.tracing"
    spans = [
        span(1, "claude_code.interaction", {"span.type": "interaction", "user_prompt": "Add a README",
                                            "session.id": "cc-2"}, scope=scope, resource=res),
        span(2, "claude_code.llm_request", {
            "span.type": "llm_request", "model": "claude-opus-4", "gen_ai.system": "anthropic",
            "gen_ai.request.model": "claude-opus-4", "input_tokens": 100, "output_tokens": 40,
            "cache_read_tokens": 5, "stop_reason": "tool_use", "gen_ai.response.finish_reasons": ["tool_calls"],
            "success": "true"}, parent=1, scope=scope, resource=res),
        span(3, "claude_code.tool", {"span.type": "tool", "tool_name": "Write", "tool_use_id": "toolu_9",
                                     "gen_ai.tool.call.id": "toolu_9", "tool_input": "<REDACTED>"},
             parent=1, scope=scope, resource=res, events=[("tool.output", {"output": "wrote 12 lines"})]),
        span(4, "claude_code.tool.execution", {"span.type": "tool.execution", "success": "false",
                                               "error": "disk full"}, parent=3, status="ERROR",
             scope=scope, resource=res),
        span(5, "claude_code.llm_request", {"model": "claude-opus-4", "input_tokens": 150, "output_tokens": 10,
                                            "stop_reason": "end_turn"}, parent=1, scope=scope, resource=res),
        span(6, "claude_code.llm_request", {"model": "claude-opus-4", "success": "false", "error": "529",
                                            "status_code": 529}, parent=1, status="ERROR",
             scope=scope, resource=res),
    ]
    # Logs mirror the spans; without a joinable span id they would count each request twice.
    logs = [_cc("api_request", {"model": "claude-opus-4", "input_tokens": 100, "output_tokens": 40}, 2),
            _cc("tool_result", {"tool_name": "Write", "tool_use_id": "toolu_9", "success": "true",
                                "tool_input": "{\"path\": \"README.md\"}"}, 3),
            _cc("assistant_response", {"response": "README added."}, 9)]
    run = build_agent_run(spans, logs)
    assert run.dialects == ["claude-code"]
    assert run.task_input == "Add a README" and run.final_output == "README added."
    assert [c.span_id for c in run.llm_calls] == [sid(2), sid(5), sid(6)]
    assert run.llm_calls[0].finish_reasons == ["tool_use"]  # stop_reason wins over the gen_ai duplicate
    [t] = run.tool_calls
    assert (t.span_id, t.name, t.call_id, t.arguments, t.result) == (
        sid(3), "Write", "toolu_9", {"path": "README.md"}, "wrote 12 lines")
    assert [(e.span_id, e.source, e.type, e.message, e.fatal) for e in run.errors] == [
        (sid(4), "span-status", None, "disk full", False),
        (sid(6), "span-status", "529", "529", True),  # an llm_request in ERROR is a hard failure
    ]
    assert (run.usage.input_tokens, run.usage.output_tokens, run.usage.llm_call_count) == (250, 50, 3)


# ------------------------------------------------------------------------------------------------ robustness


def test_unknown_spans_and_logs_are_ignored():
    spans = [span(1, "GET /run", {"http.method": "GET", "http.status_code": 500}, status="ERROR"),
             span(2, "SELECT users", {"db.system": "postgresql"}, parent=1),
             span(3, "chat m", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}, parent=1)]
    logs = [log("app.started", {"x": 1}), log("", {}, body="plain log line")]
    run = build_agent_run(spans, logs)
    assert run.dialects == ["otel-genai"]
    assert [c.span_id for c in run.llm_calls] == [sid(3)]
    assert run.errors == []  # the failing HTTP span is not part of the agent run
    assert build_agent_run(spans[:2], logs) == AgentRun()


def test_malformed_json_is_kept_raw():
    spans = [span(1, "chat m", {"gen_ai.operation.name": "chat", "gen_ai.input.messages": "[{\"role\": \"us",
                                "gen_ai.usage.input_tokens": "12", "gen_ai.usage.output_tokens": "many",
                                "gen_ai.response.finish_reasons": "[\"stop\"]"}),
             span(2, "execute_tool t", {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t",
                                        "gen_ai.tool.call.arguments": "{not json",
                                        "gen_ai.tool.call.result": "plain text"})]
    run = build_agent_run(spans, [])
    call = run.llm_calls[0]
    assert text_parts(call.input_messages[0]) == ["[{\"role\": \"us"]
    assert (call.input_tokens, call.output_tokens, call.finish_reasons) == (12, None, ["stop"])
    assert (run.tool_calls[0].arguments, run.tool_calls[0].result) == ("{not json", "plain text")


_odd = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["{", "[1,", "{\"role\": 5}", "[{\"type\": 3, \"id\": 4}]", "<REDACTED>", "[]", "{}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "parts", "content", "type", "id", "name", "arguments", "message", "tool_calls",
                         "finish_reason", "function", "output", "input", "prompt", "messages", "choices",
                         "event.name", "toolCallId", "result", "response"]), inner, max_size=4),
    max_leaves=12)
_KEYS = ["gen_ai.operation.name", "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.usage.input_tokens",
         "gen_ai.system_instructions", "gen_ai.tool.call.arguments", "gen_ai.response.finish_reasons",
         "openinference.span.kind", "llm.input_messages.0.message.content", "llm.output_messages.0.message.role",
         "input.value", "output.value", "traceloop.span.kind", "traceloop.entity.input", "gen_ai.prompt.0.content",
         "gen_ai.completion.0.tool_calls.0.arguments", "ai.operationId", "ai.prompt", "ai.prompt.messages",
         "ai.response.toolCalls", "langfuse.observation.type", "langfuse.observation.input",
         "langfuse.observation.usage_details", "pydantic_ai.all_messages", "events", "final_result",
         "logfire.level_num", "error", "request_data", "response_data", "success", "tool_input", "session.id"]


@settings(max_examples=300, deadline=None)
@given(attrs=st.dictionaries(st.sampled_from(_KEYS), _odd, max_size=8),
       kinds=st.lists(st.sampled_from(["chat", "execute_tool", "invoke_agent", "LLM", "TOOL", "tool",
                                       "ai.generateText.doGenerate", "ai.toolCall", "generation"]), max_size=3),
       body=_odd, name=st.sampled_from(["gen_ai.choice", "gen_ai.user.message", "claude_code.api_request",
                                        "gen_ai.client.inference.operation.details", "user_prompt"]))
def test_odd_values_never_raise(attrs, kinds, body, name):
    kind_keys = ["gen_ai.operation.name", "openinference.span.kind", "traceloop.span.kind", "ai.operationId",
                 "langfuse.observation.type"]
    spans = [span(1, "claude_code.llm_request", attrs, scope="pydantic-ai")]
    for i, k in enumerate(kinds, start=2):
        spans.append(span(i, "s", {**attrs, **{key: k for key in kind_keys}}, parent=i - 1, status="ERROR"))
    logs = [log(name, attrs if isinstance(attrs, dict) else {}, body=body, span_n=1, t=1),
            log(name, {"prompt.id": "p"}, body=body, t=2)]
    run = build_agent_run(spans, logs)
    AgentRun.model_validate_json(run.model_dump_json())  # JSON-ready


def test_dialect_names_are_stable():
    assert DIALECT_NAMES == ("langfuse", "openinference", "openllmetry", "vercel-ai", "pydantic-ai", "logfire",
                             "claude-code", "otel-genai")


# ------------------------------------------------------------------------------------------ JSON decoding

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _json_texts():
    dumped = st.builds(lambda v, ascii_, indent: json.dumps(v, ensure_ascii=ascii_, indent=indent),
                       _json_values, st.booleans(), st.sampled_from([None, 0, 2]))
    # Bits of JSON and near-JSON glued together: mostly malformed, sometimes valid in surprising ways.
    pieces = st.sampled_from(['{', '}', '[', ']', '"', ':', ',', ' ', '\n', '\t', '\x0c', '\u00a0', '1', '-0', '1e400',
                              '0.1', '01', '1.', 'NaN', '-Infinity', 'nan', 'true', 'null', 'True', '"\\ud800"',
                              '"\\udc00\\ud800"', '"\\u00e9"', '\ud800', '\x00', '\\', '"a"', '"a":1', '\ufeff'])
    glued = st.lists(pieces | st.text(max_size=3), max_size=12).map("".join)
    return dumped | glued | st.builds(lambda a, b: a + b, dumped, glued)


def _outcome(fn, text):
    try:
        return "ok", repr(fn(text))
    except ValueError:
        return "ValueError"
    except RecursionError:
        return "RecursionError"


@settings(max_examples=2000, deadline=None)
@given(_json_texts())
def test_loads_decodes_exactly_as_json_loads(text):
    assert _outcome(loads, text) == _outcome(json.loads, text)


@pytest.mark.parametrize("text", [
    '["\\ud800"]', '["\\udc00\\ud83d"]', '["\ud800"]', "[" * 300 + "]" * 300, "[" * 5000 + "]" * 5000,
    "[" + "9" * 4301 + "]", '{"a": 1, "b": 2, "a": 3}', "[NaN, Infinity, -Infinity]", "[1E400, -0.0, 5e-324]",
    "[1]\u00a0", "[1]\x0c", "[1] \n\t\r", "\ufeff[1]",
])
def test_loads_on_edge_cases(text):
    assert _outcome(loads, text) == _outcome(json.loads, text)


# ------------------------------------------------------------------------------------------ span detection memo

class _KeysOnly(dict):
    """Span attributes whose values a detector may not read (``operation.name`` excepted): see
    ``normalizers.dialects.detection_key``."""

    def _deny(self, *args, **kwargs):
        raise AssertionError("a span detector read an attribute value: add it to detection_key")

    def __getitem__(self, key):
        if key != "operation.name":
            self._deny()
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        if key != "operation.name":
            self._deny()
        return dict.get(self, key, default)

    values = items = _deny


_DETECT_KEYS = [
    "langfuse.observation.type", "langfuse.trace.name", "langfuse", "openinference.span.kind", "traceloop.span.kind",
    "traceloop.workflow.name", "traceloop.entity.name", "traceloop.association.properties.session_id",
    "llm.request.type", "llm.usage.total_tokens", "gen_ai.usage.total_tokens", "llm.is_streaming",
    "gen_ai.openai.api_base", "gen_ai.prompt.0.content", "gen_ai.completion.0.role", "gen_ai.prompt.x.y",
    "gen_ai.prompt", "ai.operationId", "pydantic_ai.all_messages", "final_result", "model_request_parameters",
    "gen_ai.agent.call.id", "all_messages_events", "tool_arguments", "gen_ai.aggregated_usage.input_tokens", "events",
    "logfire.msg_template", "logfire.span_type", "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system",
    "gen_ai.request.model", "input.value", "user.id"]


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(st.sampled_from(_DETECT_KEYS), max_size=6),
       name=st.sampled_from(["chat gpt-4o", "claude_code.llm_request", "claude_code", "agent run", "running tool"]),
       scope=st.sampled_from(["", "langfuse-sdk", "openinference.instrumentation.openai",
                              "openinference.instrumentation", "traceloop.tracer", "ai", "pydantic-ai", "logfire",
                              "logfire.openai_agents", "logfirex"]),
       op=st.sampled_from([None, "ai.generateText", "ai.", "chat", 3, True]),
       values=_odd)
def test_span_detection_reads_only_its_memo_key(keys, name, scope, op, values):
    from normalizers.dialects import GENAI, SPAN_DIALECTS, detection_key, read_span
    from normalizers.dialects._base import SpanCtx

    attrs = {k: values for k in keys}
    if op is not None:
        attrs["operation.name"] = op
    base = span(1, name, attrs, scope=scope)
    guarded = base.model_copy(update={"attributes": _KeysOnly(attrs)})
    # Same key, everything else different.
    other = span(2, name, {k: "other" for k in attrs} | ({"operation.name": op} if op is not None else {}),
                 parent=9, start=5, end=7, status="ERROR", message="m", events=[("exception", {"a": 1})],
                 scope=scope, resource={"service.name": "x"})
    other = other.model_copy(update={"kind": "CLIENT", "scope": other.scope.model_copy(
        update={"version": "9", "attributes": {"k": "v"}})})
    assert detection_key(other) == detection_key(base)
    for d in (*SPAN_DIALECTS, GENAI):
        found = d.detect(guarded, SpanCtx(guarded))  # raises when it reads a value
        assert d.detect(other, SpanCtx(other)) == found == d.detect(base, SpanCtx(base))
    assert detect_dialects(base) == detect_dialects(other)
    view = read_span(base)  # through the memo, twice
    assert (view and view.dialects) == ((view2 := read_span(base)) and view2.dialects)
    assert (view.dialects if view else []) == detect_dialects(base)
