"""What the rules look at, read once from an envelope: the run's root span, whether the trace is partial, each tool
call's failure and whether a retry recovered it, the failed LLM call the run ended on, repeated identical tool calls.
Pure; never raises on odd attribute values (they are envelope JSON values, read defensively).

The agent-run view (:mod:`normalizers.agent_run`) already follows agent-semconv §4 ("Detecting a failed run": judge
the run on its root, child errors are evidence) and §5; these facts add what the view does not decide: recovery,
loops, and the trace's completeness.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from normalizers.agent_run import AgentRun, LlmCall, RunError, ToolCall
from normalizers.canonical import CanonicalSpan
from normalizers.envelope import Envelope
from pipeline.grading.signals import tool_result_failure

#: Identical consecutive tool calls (same tool, same arguments, none failed) that make a loop.
LOOP_REPEATS = 3


@dataclass(frozen=True)
class ToolStep:
    """One tool call and its outcome.

    ``failure``: the text that says the step failed — the tool's error (it raised: span ERROR / exception event /
    error attribute) or the part of its result that reports a failure (:func:`tool_result_failure`) — else
    ``None``. ``failure_kind``: ``"error"`` or ``"result"``. ``error_type``: the exception type on the tool's span,
    when one was recorded. ``recovered_by``: the later call of the same tool that succeeded (docs/grading.md
    "Recovered"), else ``None``.
    """

    call: ToolCall
    failure: str | None = None
    failure_kind: str | None = None
    error_type: str | None = None
    errors: tuple[RunError, ...] = ()
    recovered_by: ToolCall | None = None

    @property
    def name(self) -> str:
        return self.call.name or "?"

    @property
    def unrecovered(self) -> bool:
        return self.failure is not None and self.recovered_by is None


@dataclass(frozen=True)
class RunFacts:
    """The facts of one envelope (see the module docstring).

    ``root``: the run's top span — a span without a parent or, for an agent behind a propagated ``traceparent``, a
    span whose parent is remote (``completeness.root_is_local``); the earliest-starting one when there are several.
    ``partial``: why the trace is incomplete (``None`` when complete). ``fatal``: the view's fatal errors.
    ``failed_llm``: the run's last LLM call when it failed (no later call succeeded), else ``None``.
    ``loop``: the tool calls of the longest run of :data:`LOOP_REPEATS` or more identical successful calls.
    """

    envelope: Envelope
    run: AgentRun
    root: CanonicalSpan | None
    partial: str | None
    errors_by_span: dict[str, list[RunError]]
    fatal: list[RunError]
    tools: list[ToolStep]
    failed_llm: LlmCall | None
    loop: list[ToolCall] = field(default_factory=list)

    @property
    def root_failed(self) -> bool:
        return self.root is not None and self.root.status_code == "ERROR"

    @property
    def run_failed(self) -> bool:
        """The run itself failed (semconv §4 "Hard failure"): its root span ended in ERROR or the view holds a
        fatal error (a dialect run span in ERROR, Claude Code's terminal error events)."""
        return self.root_failed or bool(self.fatal)

    @property
    def final_output(self) -> str | None:
        out = self.run.final_output
        return out if isinstance(out, str) and out.strip() else None

    @property
    def content_recorded(self) -> bool:
        """Whether the instrumentation recorded message content at all (it is opt-in almost everywhere, semconv
        §5): without it a missing final output means "not recorded", not "no answer"."""
        return bool(self.run.task_input or self.run.final_output
                    or any(c.content_captured for c in self.run.llm_calls))

    @property
    def recognized(self) -> bool:
        """Whether any span or log event was read as part of an agent run (a dialect matched)."""
        return bool(self.run.dialects or self.run.llm_calls or self.run.tool_calls)

    def unrecovered_tools(self) -> list[ToolStep]:
        return [t for t in self.tools if t.unrecovered]

    def recovered_tools(self) -> list[ToolStep]:
        return [t for t in self.tools if t.failure is not None and t.recovered_by is not None]


def read_facts(env: Envelope) -> RunFacts:
    """The :class:`RunFacts` of ``env``."""
    run = env.agent_run
    by_span: dict[str, list[RunError]] = {}
    for e in run.errors:
        by_span.setdefault(e.span_id, []).append(e)
    return RunFacts(envelope=env, run=run, root=run_root(env.spans), partial=partial_reason(env),
                    errors_by_span=by_span, fatal=[e for e in run.errors if e.fatal],
                    tools=tool_steps(run.tool_calls, by_span), failed_llm=failed_llm_call(run.llm_calls),
                    loop=longest_loop(run.tool_calls))


def run_root(spans: list[CanonicalSpan]) -> CanonicalSpan | None:
    """The earliest-starting span that is a root or a local root (parent remote), else ``None``."""
    roots = [s for s in spans if s.is_run_root]
    return min(roots, key=lambda s: (s.start_time_unix_nano, s.span_id)) if roots else None


def partial_reason(env: Envelope) -> str | None:
    """Why the trace is incomplete, or ``None``: evicted by the assembler before it could close, or spans without
    a root or local root. A run of log events alone (Claude Code) has no root to wait for and is complete when it
    closed on quiet."""
    c = env.completeness
    if c.closed_reason == "evicted":
        return "the assembler evicted the trace before it closed (memory bound), so spans may be missing"
    if env.spans and not c.root_seen and run_root(env.spans) is None:
        return (f"the trace has no root span and no local root (closed on {c.closed_reason}), so the run's own "
                "outcome and output may be missing")
    return None


def tool_steps(calls: list[ToolCall], errors_by_span: dict[str, list[RunError]]) -> list[ToolStep]:
    """Each tool call with its failure and, for a failed one, the later call of the same tool that succeeded."""
    steps = [_step(c, errors_by_span) for c in calls]
    out = []
    for i, step in enumerate(steps):
        if step.failure is not None:
            later = next((s.call for s in steps[i + 1:] if s.failure is None and s.call.name == step.call.name), None)
            step = ToolStep(step.call, step.failure, step.failure_kind, step.error_type, step.errors, later)
        out.append(step)
    return out


def _step(call: ToolCall, errors_by_span: dict[str, list[RunError]]) -> ToolStep:
    # Only a tool's own span carries its errors; a "messages" call's span id is the LLM span that requested it.
    errors = tuple(errors_by_span.get(call.span_id, ())) if call.source == "span" else ()
    error_type = next((e.type for e in errors if e.type), None)
    if call.error:
        return ToolStep(call, call.error, "error", error_type, errors)
    if errors:
        first = errors[0]
        return ToolStep(call, first.message or first.type or "error", "error", error_type, errors)
    if (reported := tool_result_failure(call.result)) is not None:
        return ToolStep(call, reported, "result")
    return ToolStep(call)


def failed_llm_call(calls: list[LlmCall]) -> LlmCall | None:
    """The last LLM call (by end time) when it failed; an error followed by a successful call (a client retry, a
    fallback model) was recovered and is noise."""
    if not calls:
        return None
    last = max(calls, key=lambda c: (c.end_time_unix_nano, c.start_time_unix_nano))
    return last if last.error else None


def longest_loop(calls: list[ToolCall]) -> list[ToolCall]:
    """The longest run of at least :data:`LOOP_REPEATS` consecutive calls of the same tool with the same arguments
    that did not fail (repeating a *failing* call is a retry, see :func:`tool_steps`); ``[]`` when none."""
    best: list[ToolCall] = []
    current: list[ToolCall] = []
    for call in calls:
        if call.error or tool_result_failure(call.result) is not None:
            current = []
            continue
        if current and (call.name, _canonical(call.arguments)) == (current[0].name, _canonical(current[0].arguments)):
            current.append(call)
        else:
            current = [call]
        if len(current) > len(best):
            best = list(current)
    return best if len(best) >= LOOP_REPEATS else []


def _canonical(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return repr(value)
