"""The default grader: deterministic rules over an envelope's agent-run view and spans, no network.

``grade_envelope(envelope, criteria=...) -> Grade``. Pure and deterministic (the same envelope gives the same bytes,
so a re-published grade is byte-identical), and it never raises: an input the rules cannot read gives an
``inconclusive`` grade that says why.

The rules, in the order they are tried (docs/grading.md "Rules"; agent-semconv §4 "Detecting a failed run": the run
is judged on its root, errors of its steps are evidence):

* a partial trace (no root and no local root, or evicted) whose run did not visibly fail -> ``inconclusive`` /
  ``partial_trace``; a trace with no agent activity and no failure -> ``inconclusive`` / ``none``;
* the run failed (root span ERROR or a fatal error): a turn/step limit in the error -> ``turn_limit``; else the last
  step that failed and was not recovered decides — a tool -> ``tool_error``, an LLM call -> ``provider_error`` (5xx,
  rate limit, auth) or ``agent_error``; else a loop -> ``turn_limit``; else ``agent_error``;
* the run completed: a limit in the answer, or a loop without an answer -> ``turn_limit``; the last LLM call failed
  and there is no answer -> ``provider_error`` / ``agent_error``; a tool failure no retry recovered ->
  ``false_success`` when the answer does not admit it, else ``tool_error``; a refusal -> ``gave_up``; an answer cut
  at the token limit or no answer at all (content recorded) -> ``wrong_output``; else ``passed``;
* a failed deterministic success criterion turns ``passed`` into ``failed`` / ``wrong_output`` and is evidence of
  any failed verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import structlog

from normalizers.agent_run import LlmCall, RunError
from normalizers.envelope import Envelope
from pipeline.grading.criteria import Criterion, CriterionCheck, check_criteria
from pipeline.grading.facts import RunFacts, ToolStep, read_facts
from pipeline.grading.model import REPRODUCIBLE, Evidence, FailureSignature, Grade, GraderInfo
from pipeline.grading.signals import (
    REFUSAL_FINISH_REASONS, TRUNCATED_FINISH_REASONS, admits_failure, limit_hit, provider_failure, quote, refusal)

log = structlog.get_logger(__name__)

#: Version of the rules; part of the grade stage's config version, so a new version re-grades (new stage keys).
GRADER_VERSION = "1.0.0"

#: Longest quote inside a summary sentence (the evidence keeps up to 500 characters).
_SUMMARY_QUOTE = 160
#: Calls of a loop quoted as evidence (the summary gives the count).
_LOOP_EVIDENCE = 5


@dataclass(frozen=True)
class Finding:
    """What one rule concluded: verdict, category, the sentence that opens the summary, the evidence, and the
    failing tool / error type of the signature."""

    verdict: str
    category: str
    sentence: str
    evidence: tuple[Evidence, ...] = ()
    tool: str | None = None
    error_type: str | None = None


Rule = Callable[[RunFacts], "Finding | None"]


def grade_envelope(envelope: Envelope, *, criteria: list[Criterion] | None = None) -> Grade:
    """Grade one envelope with the rules (module docstring) and the deterministic ``criteria`` (from
    :func:`pipeline.grading.criteria.parse_criteria`; judged ones are listed, undecided). Never raises."""
    try:
        facts = read_facts(envelope)
        checks = check_criteria(criteria or [], facts)
        finding = with_criteria(classify(facts), checks)
        return _grade(facts, finding, checks)
    except Exception as exc:  # noqa: BLE001 - a grade never crashes the stage; the reason is in the grade
        log.exception("grading.rules_failed", trace_id=envelope.trace_id)
        return _unreadable(envelope, exc)


def classify(f: RunFacts) -> Finding:
    """The first finding of the rules that applies (module docstring)."""
    if f.partial and not f.run_failed:
        return Finding("inconclusive", "partial_trace", f"The trace is partial: {f.partial}; no failure is visible "
                       "in what arrived, and the missing part may hold the run's outcome.",
                       (Evidence(span_id="", kind="attribute", name="completeness",
                                 quote=quote(f.envelope.completeness.model_dump_json())),))
    if not f.recognized and not f.run_failed:
        return Finding("inconclusive", "none", "No agent run was recognized in this trace (no span or log event "
                       "of a known GenAI/agent convention), so there is nothing to grade.")
    rules = FAILED_RUN_RULES if f.run_failed else COMPLETED_RUN_RULES
    for rule in rules:
        if (found := rule(f)) is not None:
            return found
    return passed(f)


# ------------------------------------------------------------------------------------------- the run failed


def limit_in_error(f: RunFacts) -> Finding | None:
    """The fatal error (or the root's status) names a turn/step/iteration limit -> ``turn_limit``."""
    for err in _run_errors(f):
        # A provider's rate-limit message is not the agent's turn limit.
        if (words := limit_hit(_error_text(err))) and not provider_failure(_error_text(err)):
            return Finding("failed", "turn_limit", f"The run stopped at a turn/step limit ({words!r}): "
                           f"{_short(_error_text(err))}.", (_ev_error(err), *_ev_loop(f)), error_type=err.type)
    return None


def failing_step(f: RunFacts) -> Finding | None:
    """The last step that failed and was not recovered decides: a tool -> ``tool_error``; an LLM call ->
    ``provider_error`` when its error is the provider's (5xx, 429, 401/403), else ``agent_error``."""
    tool = _last_unrecovered(f)
    llm = f.failed_llm
    if tool is not None and (llm is None or tool.call.end_time_unix_nano >= llm.end_time_unix_nano):
        return Finding("failed", "tool_error", f"Tool `{tool.name}` {_how_failed(tool)} and no later call of it "
                       f"succeeded; the run then failed.", (_ev_tool(tool), *_ev_run_failed(f)),
                       tool=tool.name, error_type=tool.error_type)
    if llm is not None:
        return _llm_finding(f, llm, "the run failed on it")
    return None


def loop_before_failure(f: RunFacts) -> Finding | None:
    """The run failed after repeating the same successful tool call -> ``turn_limit`` (a loop)."""
    if not f.loop:
        return None
    name = f.loop[0].name or "?"
    return Finding("failed", "turn_limit", f"The run looped: it called tool `{name}` {len(f.loop)} times in a row "
                   "with the same arguments, then failed.", (*_ev_loop(f), *_ev_run_failed(f)), tool=name)


def provider_in_error(f: RunFacts) -> Finding | None:
    """A fatal error that is the provider's with no LLM call recorded (e.g. Claude Code ``api_retries_exhausted``)
    -> ``provider_error``."""
    for err in f.fatal:
        if provider_failure(_error_text(err)):
            return Finding("failed", "provider_error", f"The LLM provider failed: {_short(_error_text(err))}.",
                           (_ev_error(err),), error_type=err.type)
    return None


def agent_error(f: RunFacts) -> Finding:
    """Nothing more specific: the agent crashed -> ``agent_error`` with the fatal error's type."""
    errs = _run_errors(f)
    first = errs[0] if errs else None
    what = _short(_error_text(first)) if first else "its root span ended in ERROR"
    return Finding("failed", "agent_error", f"The run failed: {what}.", tuple(_ev_run_failed(f)),
                   error_type=first.type if first else _root_error_type(f))


FAILED_RUN_RULES: tuple[Rule, ...] = (limit_in_error, failing_step, loop_before_failure, provider_in_error,
                                      agent_error)


# ------------------------------------------------------------------------------------------ the run completed


def limit_in_answer(f: RunFacts) -> Finding | None:
    """The answer says the agent stopped at a limit (LangChain's "Agent stopped due to iteration limit") ->
    ``turn_limit``."""
    if words := limit_hit(f.final_output):
        return Finding("failed", "turn_limit", f"The run stopped at a turn/step limit: its answer says "
                       f"{_short(f.final_output)!r} ({words!r}).", (*_ev_output(f), *_ev_loop(f)))
    return None


def loop_without_answer(f: RunFacts) -> Finding | None:
    """The same successful tool call repeated and no answer -> ``turn_limit`` (a loop)."""
    if not f.loop or f.final_output:
        return None
    name = f.loop[0].name or "?"
    return Finding("failed", "turn_limit", f"The run looped: it called tool `{name}` {len(f.loop)} times in a row "
                   "with the same arguments and ended without an answer.", tuple(_ev_loop(f)), tool=name)


def llm_failure_at_end(f: RunFacts) -> Finding | None:
    """The last LLM call failed and there is no answer (the root still said OK) -> ``provider_error`` /
    ``agent_error``."""
    if f.failed_llm is None or f.final_output:
        return None
    return _llm_finding(f, f.failed_llm, "the run ended without an answer")


def unrecovered_tool(f: RunFacts) -> Finding | None:
    """A tool failure no retry recovered: ``false_success`` when the run has an answer that does not admit the
    failure; ``tool_error`` when the answer admits it or there is none."""
    tool = _last_unrecovered(f)
    if tool is None:
        return None
    base = f"Tool `{tool.name}` {_how_failed(tool)} and no later call of it succeeded"
    if f.final_output and not admits_failure(f.final_output):
        return Finding("failed", "false_success", f"{base}, yet the run ended OK with an answer that claims "
                       f"success: {_short(f.final_output)!r}.", (_ev_tool(tool), *_ev_output(f)),
                       tool=tool.name, error_type=tool.error_type)
    ending = (f"; the answer reports it ({_short(f.final_output)!r})" if f.final_output
              else "; the run ended without an answer")
    return Finding("failed", "tool_error", base + ending + ".", (_ev_tool(tool), *_ev_output(f)),
                   tool=tool.name, error_type=tool.error_type)


def refused(f: RunFacts) -> Finding | None:
    """The model refused (finish reason ``content_filter`` / ``refusal``, a ``refusal`` message part) or the answer
    refuses or gives up on the task -> ``gave_up``."""
    last = _last_llm(f)
    if last is not None:
        if reasons := sorted({r.lower() for r in last.finish_reasons} & REFUSAL_FINISH_REASONS):
            return Finding("failed", "gave_up", f"The model refused: its last call finished with {reasons[0]!r}.",
                           (_ev_finish(last, reasons[0]), *_ev_output(f)))
        for m in last.output_messages:
            for p in m.parts:
                if p.type == "refusal":
                    text = p.content if isinstance(p.content, str) else quote(p.content)
                    return Finding("failed", "gave_up", f"The model refused: {_short(text)!r}.",
                                   (Evidence(span_id=last.span_id, kind="attribute", name="refusal",
                                             quote=quote(text)),))
    if words := refusal(f.final_output):
        return Finding("failed", "gave_up", f"The agent refused or gave up: its answer says "
                       f"{_short(f.final_output)!r} ({words!r}).", tuple(_ev_output(f)))
    return None


def truncated(f: RunFacts) -> Finding | None:
    """The answer's LLM call stopped at the token limit (finish reason ``length`` / ``max_tokens``) ->
    ``wrong_output``."""
    last = _last_llm(f)
    if last is None:
        return None
    reasons = sorted({r.lower() for r in last.finish_reasons} & TRUNCATED_FINISH_REASONS)
    if not reasons:
        return None
    return Finding("failed", "wrong_output", f"The answer was cut at the token limit (finish reason "
                   f"{reasons[0]!r}).", (_ev_finish(last, reasons[0]), *_ev_output(f)))


def no_answer(f: RunFacts) -> Finding | None:
    """Content was recorded but the run has no final answer -> ``wrong_output`` (missing output). Without recorded
    content a missing answer only means "not recorded" (semconv §5)."""
    if f.final_output or not f.content_recorded:
        return None
    return Finding("failed", "wrong_output", "The run ended OK but without a final answer, although the "
                   "instrumentation recorded message content.", tuple(_ev_root(f)))


COMPLETED_RUN_RULES: tuple[Rule, ...] = (limit_in_answer, loop_without_answer, llm_failure_at_end, unrecovered_tool,
                                         refused, truncated, no_answer)


def passed(f: RunFacts) -> Finding:
    root = f"root span `{f.root.name}` ended {f.root.status_code}" if f.root else "no error ended the run"
    answer = f" with the answer {_short(f.final_output)!r}" if f.final_output else (
        "" if f.content_recorded else " (message content was not recorded)")
    return Finding("passed", "none", f"The run completed: {root}{answer}.", (*_ev_root(f), *_ev_output(f)))


# ------------------------------------------------------------------------------------------- criteria, grade


def with_criteria(finding: Finding, checks: list[CriterionCheck]) -> Finding:
    """A failed deterministic criterion fails a passed run (``wrong_output``) and is evidence of a failed one; a
    partial or unrecognized trace stays inconclusive (the missing part may satisfy it)."""
    failed = [c for c in checks if c.result.passed is False]
    if not failed or finding.verdict == "inconclusive":
        return finding
    evidence = tuple(c.evidence for c in failed)
    if finding.verdict == "passed":
        texts = "; ".join(repr(c.result.text) for c in failed)
        return Finding("failed", "wrong_output", f"The run completed, but success criteria of the scenario failed: "
                       f"{_short(texts)} ({failed[0].result.detail}).", evidence + finding.evidence)
    return replace(finding, evidence=finding.evidence + evidence)


def _grade(f: RunFacts, finding: Finding, checks: list[CriterionCheck]) -> Grade:
    env = f.envelope
    failed = finding.verdict == "failed"
    return Grade(
        trace_id=env.trace_id, envelope_key=env.idempotency_key, envelope_version=env.envelope_version,
        verdict=finding.verdict, reproduce=failed and finding.category in REPRODUCIBLE, category=finding.category,
        summary=summary(f, finding), evidence=list(finding.evidence),
        signature=FailureSignature(category=finding.category, tool=finding.tool, error_type=finding.error_type)
        if failed else None,
        task=quote(f.run.task_input) if f.run.task_input else None, agent=f.run.agent_name,
        criteria=[c.result for c in checks], grader=GraderInfo(version=GRADER_VERSION), details=details(f))


def summary(f: RunFacts, finding: Finding) -> str:
    """One paragraph: the finding's sentence, then what the run did (calls, recovered errors, completeness) and
    its task."""
    run = f.run
    tools = sorted({t.name for t in f.tools})
    parts = [finding.sentence,
             f"The run ({run.agent_name or 'agent'}) made {len(run.llm_calls)} LLM call(s) and {len(f.tools)} tool "
             f"call(s){' (' + ', '.join(tools) + ')' if tools else ''}."]
    if recovered := f.recovered_tools():
        names = ", ".join(sorted({t.name for t in recovered}))
        parts.append(f"{len(recovered)} tool failure(s) were recovered by a later successful call ({names}) and "
                     "are not counted as failures.")
    if f.partial and finding.verdict != "inconclusive":
        parts.append(f"The trace is partial ({f.partial}), but the failure above is visible in what arrived.")
    if f.root is not None and f.root.is_local_root:
        parts.append("Its top span has a remote parent (a propagated traceparent): graded as a complete run.")
    if run.task_input:
        parts.append(f"Task: {_short(run.task_input)!r}.")
    return " ".join(parts)


def details(f: RunFacts) -> dict:
    """Counts the rules looked at (JSON values only, deterministic)."""
    c = f.envelope.completeness
    return {
        "spans": len(f.envelope.spans), "log_events": len(f.envelope.log_events),
        "llm_calls": len(f.run.llm_calls), "tool_calls": len(f.tools),
        "tool_failures": sum(1 for t in f.tools if t.failure is not None),
        "recovered_tool_failures": len(f.recovered_tools()), "errors": len(f.run.errors),
        "fatal_errors": len(f.fatal), "root_span_id": f.root.span_id if f.root else None,
        "root_is_local": c.root_is_local, "closed_reason": c.closed_reason, "partial": f.partial is not None,
        "content_recorded": f.content_recorded, "dialects": list(f.run.dialects),
    }


def _unreadable(env: Envelope, exc: Exception) -> Grade:
    return Grade(trace_id=env.trace_id, envelope_key=env.idempotency_key, envelope_version=env.envelope_version,
                 verdict="inconclusive", reproduce=False, category="none",
                 summary=f"The rules could not read this envelope ({type(exc).__name__}: {_short(str(exc))}); "
                         "no verdict.", grader=GraderInfo(version=GRADER_VERSION),
                 details={"internal_error": f"{type(exc).__name__}: {quote(str(exc))}"})


# ------------------------------------------------------------------------------------------------- helpers


def _llm_finding(f: RunFacts, llm: LlmCall, consequence: str) -> Finding:
    errs = f.errors_by_span.get(llm.span_id, [])
    text = " ".join(filter(None, [*(_error_text(e) for e in errs), llm.error]))
    error_type = next((e.type for e in errs if e.type), None)
    model = f" ({llm.model})" if llm.model else ""
    if words := provider_failure(text):
        return Finding("failed", "provider_error", f"The LLM provider failed{model} ({words!r}): "
                       f"{_short(llm.error or text)}; {consequence}.", (_ev_llm(f, llm), *_ev_run_failed(f)),
                       error_type=error_type)
    return Finding("failed", "agent_error", f"The last LLM call{model} failed with an error that is not the "
                   f"provider's: {_short(llm.error or text)}; {consequence}.", (_ev_llm(f, llm), *_ev_run_failed(f)),
                   error_type=error_type)


def _how_failed(tool: ToolStep) -> str:
    """"raised ConnectionError: ..." / "failed (...)" / "returned a failure (...)"."""
    if tool.failure_kind == "result":
        return f"returned a failure ({_short(tool.failure)})"
    if tool.errors and tool.errors[0].type:
        return f"raised {_short(_error_text(tool.errors[0]))}"
    return f"failed ({_short(tool.failure)})"


def _last_unrecovered(f: RunFacts) -> ToolStep | None:
    steps = f.unrecovered_tools()
    return max(steps, key=lambda t: t.call.end_time_unix_nano) if steps else None


def _last_llm(f: RunFacts) -> LlmCall | None:
    calls = f.run.llm_calls
    return max(calls, key=lambda c: (c.end_time_unix_nano, c.start_time_unix_nano)) if calls else None


def _run_errors(f: RunFacts) -> list[RunError]:
    """The errors that failed the run: the fatal ones, else the root span's own (status / exception events) when
    no dialect recognized the root."""
    if f.fatal:
        return f.fatal
    root = f.root
    if root is None or root.status_code != "ERROR":
        return []
    excs = [RunError(span_id=root.span_id, source="exception-event", type=_str(e.attributes.get("exception.type")),
                     message=_str(e.attributes.get("exception.message"))) for e in root.events if e.name == "exception"]
    return excs or [RunError(span_id=root.span_id, source="span-status", type=_root_error_type(f),
                             message=root.status_message or None)]


def _root_error_type(f: RunFacts) -> str | None:
    return _str(f.root.attributes.get("error.type")) if f.root is not None else None


def _error_text(err: RunError | None) -> str:
    if err is None:
        return ""
    return ": ".join(p for p in (err.type, err.message) if p) or "error"


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _short(text: str | None) -> str:
    return quote(" ".join((text or "").split()), _SUMMARY_QUOTE)


_EVIDENCE_KIND = {"exception-event": "exception", "span-status": "status", "log-event": "log_event",
                  "attribute": "attribute"}


def _ev_error(err: RunError) -> Evidence:
    return Evidence(span_id=err.span_id, kind=_EVIDENCE_KIND.get(err.source, "status"), name=err.type,
                    quote=quote(_error_text(err)))


def _ev_root(f: RunFacts) -> list[Evidence]:
    root = f.root
    if root is None:
        return []
    status = f"{root.status_code}: {root.status_message}" if root.status_message else root.status_code
    return [Evidence(span_id=root.span_id, kind="status", name=root.name, quote=quote(status))]


def _ev_run_failed(f: RunFacts) -> list[Evidence]:
    """The run's own failure: its first fatal error, and the root's status when that is another span."""
    out = [_ev_error(e) for e in _run_errors(f)[:1]]
    if f.root_failed and not any(e.span_id == f.root.span_id for e in out):
        out.extend(_ev_root(f))
    return out


def _ev_tool(step: ToolStep) -> Evidence:
    call = step.call
    if step.failure_kind == "result":
        return Evidence(span_id=call.span_id, kind="tool_result", name=step.name, quote=quote(call.result))
    if step.errors:
        first = step.errors[0]
        return Evidence(span_id=call.span_id, kind=_EVIDENCE_KIND.get(first.source, "status"), name=step.name,
                        quote=quote(_error_text(first)))
    kind = "tool_result" if call.source == "messages" else "status"
    return Evidence(span_id=call.span_id, kind=kind, name=step.name, quote=quote(step.failure))


def _ev_llm(f: RunFacts, llm: LlmCall) -> Evidence:
    errs = f.errors_by_span.get(llm.span_id, [])
    if errs:
        return _ev_error(errs[0])
    return Evidence(span_id=llm.span_id, kind="status", name=llm.model, quote=quote(llm.error or "error"))


def _ev_output(f: RunFacts) -> list[Evidence]:
    if not f.final_output:
        return []
    return [Evidence(span_id=f.root.span_id if f.root else "", kind="output", quote=quote(f.final_output))]


def _ev_finish(call: LlmCall, reason: str) -> Evidence:
    return Evidence(span_id=call.span_id, kind="finish_reason", name="gen_ai.response.finish_reasons", quote=reason)


def _ev_loop(f: RunFacts) -> list[Evidence]:
    return [Evidence(span_id=c.span_id, kind="attribute", name=f"tool {c.name} arguments", quote=quote(c.arguments))
            for c in f.loop[:_LOOP_EVIDENCE]]
