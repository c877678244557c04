"""Seeding, pure: the reproduction scenario and starting state of one failed run, from the trace and the
repository's contract (``docs/contract.md``) — or the list of missing evidence, never a guess.

* :func:`fill_template` — a seed template with its ``{{ path }}`` placeholders filled from the envelope; every
  placeholder without a value is reported, not invented.
* :func:`missing_evidence` — what the trace lacks for a reproduction (task input, tool arguments), each with how to
  capture it (which attribute, span or instrumentation setting).
* :func:`build_seed` — both, plus the specialised ``scenario.md`` text.

No I/O: the seed stage (:mod:`pipeline.stages.seed`) reads the inputs and writes the artifacts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from normalizers.envelope import Envelope
from pipeline.contract import section

#: ``{{ path }}`` inside a string; path = dotted names, a tool may carry ``#n`` (n-th call, from 1).
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.\-]*(?:#\d+)?(?:\.[\w\-]+)*)\s*\}\}")

_RUN_FIELDS = ("task_input", "final_output", "agent_name", "session_id", "user_id")


@dataclass(frozen=True)
class Missing:
    """One missing piece of evidence: ``item`` (what), ``where`` (template/placeholder or trace part), ``how`` to
    capture it."""

    item: str
    where: str
    how: str

    def as_dict(self) -> dict[str, str]:
        return {"item": self.item, "where": self.where, "how": self.how}


@dataclass
class SeedResult:
    """``missing`` empty: ``scenario`` (Markdown) and ``seed`` (the seed.json document) are set."""

    missing: list[Missing] = field(default_factory=list)
    scenario: str | None = None
    seed: dict[str, Any] | None = None


class _NoValue(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


def _dig(value: Any, keys: list[str], path: str) -> Any:
    for key in keys:
        if isinstance(value, str):
            try:  # tool arguments and results are often JSON text
                value = json.loads(value)
            except ValueError:
                pass
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise _NoValue(f"the recorded value has no field {key!r} on the way to {path}")
    return value


def resolve(env: Envelope, path: str) -> Any:
    """The value of placeholder ``path`` in ``env`` (see docs/contract.md). Raises :class:`_NoValue` with how to
    capture it when the trace does not hold it."""
    head, _, rest = path.partition(".")
    run = env.agent_run
    if head == "trace" and rest == "trace_id":
        return env.trace_id
    if head == "run" and rest in _RUN_FIELDS:
        value = getattr(run, rest)
        if value in (None, ""):
            raise _NoValue(f"the trace recorded no run {rest}: capture message content (e.g. "
                           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true) or set it on the agent span")
        return value
    if head == "resource" and rest:
        if rest not in env.resource:
            raise _NoValue(f"add the resource attribute {rest} to the agent's OTel resource "
                           "(OTEL_RESOURCE_ATTRIBUTES)")
        return env.resource[rest]
    if head.startswith("tool") and rest:
        name_part, _, tail = rest.partition(".")
        name, _, nth = name_part.partition("#")
        calls = [t for t in run.tool_calls if t.name == name]
        index = int(nth) - 1 if nth else 0
        if index >= len(calls):
            raise _NoValue(f"the trace has {len(calls)} call(s) of tool {name}: trace the tool's execution (an "
                           f"execute_tool span, gen_ai.tool.name={name}) or narrow the template")
        call = calls[index]
        kind, _, fields = tail.partition(".")
        if kind not in ("arguments", "result"):
            raise _NoValue(f"tool placeholders read .arguments or .result, not {kind!r}")
        value = call.arguments if kind == "arguments" else call.result
        if value is None:
            attr = "gen_ai.tool.call.arguments" if kind == "arguments" else "gen_ai.tool.call.result"
            raise _NoValue(f"the {kind} of tool {name} were not captured: record {attr} on its execute_tool span "
                           "(content capture on)")
        return _dig(value, fields.split(".") if fields else [], path)
    raise _NoValue(f"unknown placeholder {path!r}: see docs/contract.md for trace.*, run.*, resource.*, tool.*")


def fill_template(template: Any, env: Envelope, where: str) -> tuple[Any, list[Missing]]:
    """``template`` with every placeholder filled; the list of placeholders that have no value."""
    missing: list[Missing] = []

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        if not isinstance(value, str):
            return value
        whole = PLACEHOLDER.fullmatch(value.strip())
        if whole:
            try:
                return resolve(env, whole.group(1))
            except _NoValue as exc:
                missing.append(Missing(f"{{{{ {whole.group(1)} }}}}", where, exc.how))
                return value

        def one(m: re.Match) -> str:
            try:
                v = resolve(env, m.group(1))
            except _NoValue as exc:
                missing.append(Missing(f"{{{{ {m.group(1)} }}}}", where, exc.how))
                return m.group(0)
            return v if isinstance(v, str) else json.dumps(v)

        return PLACEHOLDER.sub(one, value)

    return fill(template), missing


def missing_evidence(env: Envelope) -> list[Missing]:
    """What every reproduction needs from the trace: the task input, and the arguments of each tool call."""
    out: list[Missing] = []
    run = env.agent_run
    if not run.task_input:
        out.append(Missing("task input", "trace", "the harness gets the task as AGENT_TASK: record the run's input "
                           "(gen_ai.input.messages / the first user message with content capture on, or "
                           "input.value for OpenInference) on the agent or root span"))
    for t in run.tool_calls:
        if t.arguments is None:
            out.append(Missing(f"arguments of tool {t.name or '?'}", f"span {t.span_id}",
                               "record gen_ai.tool.call.arguments on the execute_tool span (content capture on), "
                               "or keep tool_call parts in the LLM messages"))
    return out


def _tool_lines(env: Envelope) -> list[str]:
    lines = []
    for i, t in enumerate(env.agent_run.tool_calls, 1):
        args = json.dumps(t.arguments, ensure_ascii=False) if t.arguments is not None else "(not captured)"
        result = t.result if isinstance(t.result, str) else json.dumps(t.result, ensure_ascii=False)
        line = f"{i}. `{t.name or '?'}` {args} → {result if t.result is not None else '(no result recorded)'}"
        if t.error:
            line += f" — error: {t.error}"
        lines.append(line)
    return lines or ["(the trace recorded no tool calls)"]


def scenario_text(env: Envelope, grade: dict[str, Any], standing: str) -> str:
    """The repository's standing scenario specialised with this run: its task input, the tool calls and results
    the trace recorded, the failure observed, and the success criteria."""
    def part(name: str) -> str:
        return section(standing, name) or "(not given in the repository's scenario.md)"

    evidence = [f"- span `{e.get('span_id') or '-'}` ({e.get('kind')}{', ' + e['name'] if e.get('name') else ''}): "
                f"{e.get('quote')}" for e in grade.get("evidence", [])]
    return "\n".join([
        f"# Reproduction scenario — trace {env.trace_id}",
        "",
        "Generated by trace-source from the repository's scenario.md and this trace. The harness receives the task "
        "in AGENT_TASK and the seed in TRACE_SOURCE_SEED_PATH.",
        "",
        "## Setup", "", part("setup"), "",
        "## Prompt", "", "The task of the failed run, verbatim:", "", "```text", env.agent_run.task_input or "", "```",
        "",
        "## Tool calls recorded in the trace", "", *_tool_lines(env), "",
        "## Failure observed", "",
        f"Verdict **{grade.get('verdict')}**, category **{grade.get('category')}**.", "",
        grade.get("summary") or "", "", *evidence, "",
        "## Expected behaviour", "", part("expected behaviour"), "",
        "## Success criteria", "", part("success criteria"), ""])


def build_seed(env: Envelope, grade: dict[str, Any], standing_scenario: str,
               templates: dict[str, Any]) -> SeedResult:
    """The seed of one failed run, or what is missing for it (see the module docstring)."""
    missing = missing_evidence(env)
    filled: dict[str, Any] = {}
    for name, template in sorted(templates.items()):
        value, gaps = fill_template(template, env, f"seeds/{name}")
        filled[name] = value
        missing.extend(gaps)
    if missing:
        return SeedResult(missing=missing)
    seed = {"trace_id": env.trace_id, "envelope_key": env.idempotency_key, "task": env.agent_run.task_input,
            "templates": filled,
            "tool_calls": [{"name": t.name, "call_id": t.call_id, "arguments": t.arguments, "result": t.result,
                            "error": t.error} for t in env.agent_run.tool_calls]}
    return SeedResult(scenario=scenario_text(env, grade, standing_scenario), seed=seed)
