"""Success criteria of a repository's ``scenario.md`` (docs/contract.md): the bullets under every heading whose title
contains "Success criteria". Bullets written in one of the documented deterministic forms (docs/grading.md
"Success criteria") are checked against the trace; every other bullet is a *judged* criterion, left to the optional
LLM judge. Pure: no I/O.

Grammar (case-insensitive; ``X`` a tool name, bare or in backticks/quotes; ``"..."`` a double-quoted text; a
trailing period is ignored)::

    tool X is called                          (also: was called, is called at least once, the agent calls tool X)
    tool X succeeds                           (also: is called and succeeds, was called and succeeded)
    tool X is not called                      (also: is never called, was not called, the agent does not call tool X)
    tool X is called at most N times          (N a number, "once" or "twice")
    the final output contains "..."           (also: the output / the answer / the final answer)
    the final output does not contain "..."
    no tool errors                            (also: there are no tool errors)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.grading.facts import RunFacts, ToolStep
from pipeline.grading.model import CriterionResult, Evidence
from pipeline.grading.signals import quote

Op = Literal["called", "succeeds", "not_called", "at_most", "contains", "not_contains", "no_tool_errors"]


@dataclass(frozen=True)
class Criterion:
    """One success criterion: its text as written; ``kind`` ``deterministic`` (``op`` and its arguments set) or
    ``judged``."""

    text: str
    kind: Literal["deterministic", "judged"] = "judged"
    op: Op | None = None
    tool: str | None = None
    needle: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class CriterionCheck:
    """A criterion checked against one trace: the :class:`CriterionResult` stored in the grade, and for a failed
    deterministic criterion the evidence (``kind="criterion"``) that shows it."""

    result: CriterionResult
    evidence: Evidence | None = None


# -- parsing -------------------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(?:\[[ xX]\]\s+)?(?P<text>.+)$")
_NAME = r"[`'\"]?(?P<tool>[A-Za-z0-9_][\w.:/-]*?)[`'\"]?"
_TOOL = rf"(?:the\s+)?tool\s+{_NAME}"
_TEXT = r"\"(?P<needle>[^\"]+)\""
_OUTPUT = r"the\s+(?:final\s+)?(?:output|answer)"
_COUNTS = {"once": 1, "twice": 2}
_FORMS: tuple[tuple[Op, re.Pattern[str]], ...] = tuple((op, re.compile(p, re.IGNORECASE)) for op, p in (
    ("succeeds", rf"{_TOOL}\s+(?:(?:is|was|gets)\s+called\s+and\s+)?succeed(?:s|ed)"),
    ("not_called", rf"{_TOOL}\s+(?:is|was)\s+(?:not|never)\s+called"),
    ("not_called", rf"the\s+agent\s+(?:does|did)\s+not\s+call\s+{_TOOL}"),
    ("not_called", rf"the\s+agent\s+never\s+calls\s+{_TOOL}"),
    ("at_most", rf"{_TOOL}\s+(?:is|was)\s+called\s+at\s+most\s+(?P<limit>\d+\s+times?|once|twice)"),
    ("called", rf"{_TOOL}\s+(?:is|was)\s+called(?:\s+at\s+least\s+once)?"),
    ("called", rf"(?:the\s+agent\s+)?calls\s+{_TOOL}"),
    ("contains", rf"{_OUTPUT}\s+contains\s+{_TEXT}"),
    ("not_contains", rf"{_OUTPUT}\s+does\s+not\s+contain\s+{_TEXT}"),
    ("no_tool_errors", r"(?:there\s+are\s+)?no\s+tool\s+errors"),
))


def parse_criteria(scenario: str) -> list[Criterion]:
    """The success criteria of a ``scenario.md`` text: one :class:`Criterion` per bullet under each heading whose
    title contains "success criteria" (case-insensitive), down to the next heading of the same or a higher level.
    A bullet's indented continuation lines belong to it. ``[]`` when there is no such section."""
    bullets: list[str] = []
    level: int | None = None  # the level of the success-criteria heading we are under, if any
    for line in scenario.splitlines():
        if m := _HEADING.match(line):
            depth = len(m.group(1))
            if level is not None and depth <= level:
                level = None
            if level is None and "success criteria" in m.group(2).lower():
                level = depth
            continue
        if level is None:
            continue
        if b := _BULLET.match(line):
            bullets.append(b.group("text"))
        elif bullets and line.startswith((" ", "\t")) and line.strip():
            bullets[-1] += " " + line.strip()
    return [parse_criterion(b) for b in bullets]


def parse_criterion(text: str) -> Criterion:
    """One bullet -> a deterministic :class:`Criterion` when it is one of the documented forms, else judged."""
    text = " ".join(text.split())
    body = text.rstrip(".;").strip()
    for op, pattern in _FORMS:
        if m := pattern.fullmatch(body):
            groups = m.groupdict()
            return Criterion(text, "deterministic", op, tool=groups.get("tool"), needle=groups.get("needle"),
                             limit=_count(groups.get("limit")))
    return Criterion(text)


def _count(words: str | None) -> int | None:
    """"3 times" -> 3, "once" -> 1, "twice" -> 2, None -> None."""
    if words is None:
        return None
    return _COUNTS.get(words.lower()) or int(words.split()[0])


# -- checking ------------------------------------------------------------------------------------------------------


def check_criteria(criteria: list[Criterion], facts: RunFacts) -> list[CriterionCheck]:
    """Each criterion checked against the run (judged ones are listed with ``passed=None``)."""
    return [check(c, facts) for c in criteria]


def check(c: Criterion, f: RunFacts) -> CriterionCheck:
    """One criterion against the run. ``passed`` is ``None`` for a judged criterion, and for an output criterion
    when the instrumentation recorded no message content (nothing to check)."""
    if c.kind == "judged" or c.op is None:
        return CriterionCheck(CriterionResult(text=c.text, kind="judged"))
    ok, detail, span_id = _CHECKS[c.op](c, f)
    result = CriterionResult(text=c.text, kind="deterministic", passed=ok, detail=detail)
    evidence = Evidence(span_id=span_id, kind="criterion", name=c.text, quote=quote(detail)) if ok is False else None
    return CriterionCheck(result, evidence)


Outcome = tuple[bool | None, str, str]  # passed, detail, span id of the evidence


def _calls(c: Criterion, f: RunFacts) -> list[ToolStep]:
    want = (c.tool or "").lower()
    return [t for t in f.tools if (t.call.name or "").lower() == want]


def _called(c: Criterion, f: RunFacts) -> Outcome:
    calls = _calls(c, f)
    if calls:
        return True, f"tool {c.tool} was called {len(calls)} time(s)", calls[0].call.span_id
    seen = sorted({t.name for t in f.tools})
    return False, f"tool {c.tool} was never called (tools called: {', '.join(seen) or 'none'})", _root_id(f)


def _succeeds(c: Criterion, f: RunFacts) -> Outcome:
    calls = _calls(c, f)
    if not calls:
        return _called(c, f)
    last = calls[-1]
    if last.failure is None:
        return True, f"the last of {len(calls)} call(s) of tool {c.tool} succeeded", last.call.span_id
    return False, f"the last call of tool {c.tool} failed: {last.failure}", last.call.span_id


def _not_called(c: Criterion, f: RunFacts) -> Outcome:
    calls = _calls(c, f)
    if not calls:
        return True, f"tool {c.tool} was not called", _root_id(f)
    return False, f"tool {c.tool} was called {len(calls)} time(s)", calls[0].call.span_id


def _at_most(c: Criterion, f: RunFacts) -> Outcome:
    calls = _calls(c, f)
    limit = c.limit or 0
    span = calls[limit].call.span_id if len(calls) > limit else _root_id(f)
    return len(calls) <= limit, f"tool {c.tool} was called {len(calls)} time(s), at most {limit} allowed", span


def _contains(c: Criterion, f: RunFacts) -> Outcome:
    return _output_has(c, f, want=True)


def _not_contains(c: Criterion, f: RunFacts) -> Outcome:
    return _output_has(c, f, want=False)


def _output_has(c: Criterion, f: RunFacts, *, want: bool) -> Outcome:
    """Case-insensitive, whitespace-normalized substring test of the final output."""
    out = f.final_output
    if out is None:
        if not f.content_recorded:
            return None, "the final output was not recorded (message content capture is off)", _root_id(f)
        return (not want), "the run has no final output", _root_id(f)
    found = _norm(c.needle or "") in _norm(out)
    verb = "contains" if found else "does not contain"
    return found == want, f"the final output {verb} {c.needle!r}: {quote(out, 200)!r}", _root_id(f)


def _no_tool_errors(c: Criterion, f: RunFacts) -> Outcome:
    failed = [t for t in f.tools if t.failure is not None]
    if not failed:
        return True, f"none of {len(f.tools)} tool call(s) failed", _root_id(f)
    first = failed[0]
    return False, f"{len(failed)} tool call(s) failed, first {first.name}: {first.failure}", first.call.span_id


_CHECKS = {"called": _called, "succeeds": _succeeds, "not_called": _not_called, "at_most": _at_most,
           "contains": _contains, "not_contains": _not_contains, "no_tool_errors": _no_tool_errors}


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _root_id(f: RunFacts) -> str:
    return f.root.span_id if f.root is not None else ""
