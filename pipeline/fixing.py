"""Fixing, pure: the documents of the fix phase — the failure context handed to the coding agent, the commit
message, the pull request's body (``fixes/<trace_id>/pr-details.md``) and the fix status (``status.json``).
The fix stage (:mod:`pipeline.stages.fix`) runs the commands and publishes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

FIX_SCHEMA_VERSION = "trace-source.fix/v1"

#: Fix statuses (the seed system's vocabulary): ``pr_opened`` — proven and a draft pull request exists;
#: ``blocked`` — a prerequisite is missing or publishing failed (the patch and the exact blocker are written);
#: ``validation_failed`` — the last attempt's patch failed the repository's validation;
#: ``budget_exhausted`` — no attempt was proven within ``--max-fix-attempts``.
FIX_STATUSES = ("pr_opened", "blocked", "validation_failed", "budget_exhausted")


@dataclass
class FixAttempt:
    """One attempt of the loop: what the coding agent did and whether it was proven.

    ``outcome``: ``no_change`` | ``fix_failed`` (the command failed or timed out) | ``validation_failed`` |
    ``still_failing`` (the reproduction still shows the failure) | ``unproven`` (no attempt's trace was graded) |
    ``proven``."""

    n: int
    outcome: str = ""
    detail: str | None = None
    fix_exit_code: int | None = None
    fix_timed_out: bool = False
    usage: dict[str, Any] | None = None
    commit: str | None = None
    files: list[str] = field(default_factory=list)
    validation_exit_code: int | None = None
    validation_output: str | None = None
    reproduction: dict[str, Any] | None = None  # {"attempts": N, "graded": g, "failing": f, "traces": [...]}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _q(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


def fix_prompt(grade: dict[str, Any], manifest: dict[str, Any], scenario: str, previous: list[FixAttempt],
               paths: dict[str, str]) -> str:
    """The Markdown handed to the coding agent (``TRACE_SOURCE_FIX_PROMPT``): the failure, its evidence, how it
    reproduces, the scenario, and on later attempts why the earlier ones were not good enough."""
    lines = [
        "# Fix a reproduced agent failure",
        "",
        "An agent run in this repository failed, and the failure reproduces with the repository's own harness. "
        "Change the repository's code so the task succeeds. Keep the change small and focused; do not change the "
        "harness or the tests to hide the failure.",
        "",
        f"## The failure: {grade.get('category')}",
        "",
        grade.get("summary") or "",
        "",
        "Evidence from the trace:",
        *[f"- span `{e.get('span_id') or '-'}` ({e.get('kind')}{', ' + e['name'] if e.get('name') else ''}): "
          f"{e.get('quote')}" for e in grade.get("evidence", [])],
        "",
        "## The task the agent was given",
        "",
        "```text", manifest.get("task") or "", "```",
        "",
        f"## How it reproduces: {manifest.get('reproduced')}/{len(manifest.get('attempts', []))} attempts failed",
        "",
        f"Harness: `{' '.join(manifest.get('command') or [])}` at revision {manifest.get('revision') or '-'}.",
        *[f"- attempt {a.get('n')}: exit {a.get('exit_code')}, graded {a.get('verdict')} / {a.get('category')}"
          + (f" — {a.get('summary')}" if a.get("summary") else "") for a in manifest.get("attempts", [])],
        "",
        "## The scenario (the repository's standing contract, specialised for this run)",
        "",
        scenario.strip(),
        "",
        "## Files with more context",
        "",
        *[f"- {name}: {path}" for name, path in paths.items()],
    ]
    if previous:
        lines += ["", "## Earlier attempts that were not good enough", ""]
        for a in previous:
            lines.append(f"- attempt {a.n}: {a.outcome}" + (f" — {a.detail}" if a.detail else ""))
            if a.validation_output and a.outcome == "validation_failed":
                lines += ["", "```text", a.validation_output[-3000:], "```", ""]
    return "\n".join(lines) + "\n"


def commit_message(trace_id: str, grade: dict[str, Any]) -> str:
    """``Fix <category> seen in trace <id>`` with the summary and the trace id as a trailer."""
    category = grade.get("category") or "failure"
    sig = grade.get("signature") or {}
    where = f" in {sig['tool']}" if sig.get("tool") else ""
    summary = (grade.get("summary") or "").strip()
    return (f"Fix {category.replace('_', ' ')}{where} (trace {trace_id[:12]})\n\n{summary}\n\n"
            f"Trace-Id: {trace_id}\nGenerated-By: trace-source fix stage\n")


def pr_title(trace_id: str, grade: dict[str, Any]) -> str:
    return commit_message(trace_id, grade).splitlines()[0]


def pr_body(trace_id: str, grade: dict[str, Any], manifest: dict[str, Any], attempt: FixAttempt,
            attempts: list[FixAttempt], *, validation_command: str | None) -> str:
    """``pr-details.md``: failure summary, evidence, reproduction before/after, validation output, files changed,
    residual risk — what a reviewer reads first."""
    before_total = len(manifest.get("attempts", []))
    before_failed = manifest.get("reproduced", 0)
    proof = attempt.reproduction or {}
    after_total, after_failed = proof.get("attempts", 0), proof.get("failing", 0)
    risk = []
    if manifest.get("status") == "flaky":
        risk.append(f"The original failure was flaky ({before_failed}/{before_total} attempts failed), so "
                    f"{after_failed}/{after_total} after the fix is weaker evidence than it looks.")
    if proof.get("graded", after_total) < after_total:
        risk.append(f"Only {proof.get('graded')} of {after_total} proof attempts produced a graded trace.")
    if not validation_command:
        risk.append("No validation command was configured: only the reproduction proves the change.")
    risk.append("Generated by a coding agent: review the change as you would any contribution.")
    return "\n".join([
        f"## Fix for a reproduced agent failure — {grade.get('category')}",
        "",
        f"Trace `{trace_id}` failed: {grade.get('summary') or ''}",
        "",
        "### Evidence",
        *[f"- span `{e.get('span_id') or '-'}` ({e.get('kind')}{', ' + e['name'] if e.get('name') else ''}): "
          f"{e.get('quote')}" for e in grade.get("evidence", [])],
        "",
        "### Reproduction",
        "",
        "| | attempts | failing with the original signature |",
        "|---|---|---|",
        f"| before (revision {str(manifest.get('revision') or '-')[:12]}) | {before_total} | {before_failed} |",
        f"| after (commit {str(attempt.commit or '-')[:12]}) | {after_total} | {after_failed} |",
        "",
        f"Harness: `{' '.join(manifest.get('command') or [])}`",
        "",
        "### Validation",
        "",
        (f"`{validation_command}` exited {attempt.validation_exit_code}." if validation_command else "(none)"),
        *(["", "```text", (attempt.validation_output or "")[-4000:], "```"] if attempt.validation_output else []),
        "",
        "### Files changed",
        *[f"- `{f}`" for f in attempt.files],
        "",
        "### Residual risk",
        *[f"- {r}" for r in risk],
        "",
        f"### Attempts ({len(attempts)})",
        *[f"- attempt {a.n}: {a.outcome}" + (f" — {a.detail}" if a.detail else "")
          + (f" (usage: {json.dumps(a.usage)})" if a.usage else "") for a in attempts],
        "",
        "_Opened as a draft by trace-source. Nothing was pushed to a protected or default branch._",
        ""])


def status_document(base: dict[str, Any], status: str, reason: str | None, *, attempts: list[FixAttempt],
                    **extra: Any) -> dict[str, Any]:
    """``fixes/<trace_id>/status.json`` (and the record on ``trace-source.fixes``)."""
    return {"schema_version": FIX_SCHEMA_VERSION, **base, "status": status, "reason": reason,
            "attempts": [a.as_dict() for a in attempts], **extra}
