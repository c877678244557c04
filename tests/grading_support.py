"""Hand-built envelopes for the grading tests, made the way the assembler makes them (canonical spans ->
``build_agent_run`` -> envelope): OTel GenAI ``invoke_agent`` roots with ``chat`` and ``execute_tool`` children."""

from __future__ import annotations

import json

from normalizers.agent_run import build_agent_run
from normalizers.canonical import CanonicalLogEvent, CanonicalSpan, Scope, SpanEvent
from normalizers.envelope import Completeness, Envelope, Source, envelope_idempotency_key
from pipeline.grading.criteria import parse_criteria
from pipeline.grading.model import Grade
from pipeline.grading.rules import grade_envelope

TRACE = "5b8efff798038103d269b633813fc60c"
TASK = "Refund order A-1002"
ANSWER = "Order A-1002 was refunded."


def sid(n: int) -> str:
    return f"{n:016x}"


def msgs(role: str, text: str, finish: str | None = None) -> str:
    m: dict = {"role": role, "parts": [{"type": "text", "content": text}]}
    if finish:
        m["finish_reason"] = finish
    return json.dumps([m])


def span(n: int, name: str, attrs: dict, *, parent: int | None = None, status: str = "UNSET", message: str = "",
         exc: tuple[str, str] | None = None, remote_parent: bool = False) -> CanonicalSpan:
    events = [SpanEvent(name="exception", time_unix_nano=n * 1000 + 1,
                        attributes={"exception.type": exc[0], "exception.message": exc[1]})] if exc else []
    return CanonicalSpan(trace_id=TRACE, span_id=sid(n), parent_span_id=sid(parent) if parent else "",
                         parent_is_remote=True if remote_parent else None, name=name, kind="INTERNAL",
                         start_time_unix_nano=n * 1000, end_time_unix_nano=n * 1000 + 500, status_code=status,
                         status_message=message, attributes=attrs, events=events, scope=Scope(name="test"))


def root(answer: str | None = ANSWER, **kw) -> CanonicalSpan:
    attrs = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support",
             "gen_ai.input.messages": msgs("user", TASK)}
    if answer is not None:
        attrs["gen_ai.output.messages"] = msgs("assistant", answer, "stop")
    return span(kw.pop("n", 1), "invoke_agent support", attrs, **kw)


def chat(n: int, *, answer: str | None = None, finish: str = "stop", parent: int = 1, **kw) -> CanonicalSpan:
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-x",
             "gen_ai.input.messages": msgs("user", TASK), "gen_ai.response.finish_reasons": [finish]}
    if answer is not None:
        attrs["gen_ai.output.messages"] = msgs("assistant", answer, finish)
    return span(n, "chat gpt-x", attrs, parent=parent, **kw)


def tool(n: int, name: str = "refund_order", *, result: object = None, args: object = None, parent: int = 1,
         **kw) -> CanonicalSpan:
    attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, "gen_ai.tool.call.id": f"call_{n}",
             "gen_ai.tool.call.arguments": json.dumps(args if args is not None else {"order_id": "A-1002"})}
    if result is not None:
        attrs["gen_ai.tool.call.result"] = result if isinstance(result, str) else json.dumps(result)
    return span(n, f"execute_tool {name}", attrs, parent=parent, **kw)


def envelope(spans: list[CanonicalSpan], *, closed: str = "root-ended-and-quiet",
             logs: list[CanonicalLogEvent] = ()) -> Envelope:
    top = next((s for s in spans if s.is_run_root), None)
    return Envelope(idempotency_key=envelope_idempotency_key(TRACE, spans, logs), trace_id=TRACE,
                    source=Source(id="test", kind="otlp-http"), received_at_unix_nano=1, assembled_at_unix_nano=2,
                    completeness=Completeness(root_seen=top is not None, root_is_local=bool(top and top.is_local_root),
                                              closed_reason=closed),
                    spans=spans, log_events=list(logs), agent_run=build_agent_run(spans, list(logs)))


def grade(spans: list[CanonicalSpan], **kw) -> Grade:
    criteria = kw.pop("criteria", None)
    return grade_envelope(envelope(spans, **kw), criteria=parse_criteria(criteria) if criteria else None)



#: A run that called its tool and answered: invoke_agent -> chat (tool call) -> execute_tool -> chat (answer).
OK_RUN = [root(status="OK"), chat(2, finish="tool_calls"), tool(3, result={"refunded": True}), chat(4, answer=ANSWER)]
