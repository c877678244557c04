"""The grade document: the verdict on one assembled agent run, as ``grades/<trace_id>/grade.json`` and on the topic
``trace-source.grades`` (key = trace id). Field reference and the failure taxonomy: ``docs/grading.md``.

Pure data (pydantic v2), no I/O.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GRADE_SCHEMA_VERSION = "trace-source.grade/v1"

Verdict = Literal["failed", "passed", "inconclusive"]

#: The failure taxonomy (docs/grading.md "Categories"). ``none`` for a passed run.
Category = Literal["none", "tool_error", "provider_error", "gave_up", "false_success", "turn_limit",
                   "wrong_output", "agent_error", "partial_trace"]
CATEGORIES: tuple[str, ...] = ("none", "tool_error", "provider_error", "gave_up", "false_success", "turn_limit",
                               "wrong_output", "agent_error", "partial_trace")

#: Categories of a ``failed`` verdict that are worth reproducing with the repository's harness. A provider error
#: (the LLM API failed: 5xx, rate limit, auth) is the provider's fault, not the agent's; re-running the agent says
#: nothing about the agent, so it is graded failed but not reproduced.
REPRODUCIBLE: frozenset[str] = frozenset({"tool_error", "gave_up", "false_success", "turn_limit", "wrong_output",
                                          "agent_error"})


class Evidence(BaseModel):
    """One quoted fact that supports the verdict: the span it is on, what it is, and the words themselves.

    ``kind``: ``status`` (span status / message), ``exception`` (an ``exception`` event), ``attribute`` (an
    attribute, named in ``name``), ``tool_result`` (what a tool returned), ``output`` (the run's final output),
    ``finish_reason`` (an LLM call's), ``criterion`` (a success criterion of the repository's scenario), ``judge``
    (the LLM judge's own evidence), ``log_event`` (a log record, e.g. Claude Code's ``api_retries_exhausted``).
    ``span_id`` is ``""`` for a fact of the whole trace. ``quote`` is at most 500 characters (cut with ``…``).
    """

    model_config = ConfigDict(extra="forbid")

    span_id: str = ""
    kind: Literal["status", "exception", "attribute", "tool_result", "output", "finish_reason", "criterion",
                  "judge", "log_event"]
    name: str | None = None
    quote: str


class FailureSignature(BaseModel):
    """What makes two failures "the same failure" (issue: reproduce): the category plus the failing tool and/or the
    error type, when known. Compared field by field by :func:`pipeline.grading.signature.same_failure`."""

    model_config = ConfigDict(extra="forbid")

    category: str
    tool: str | None = None
    error_type: str | None = None


class Usage(BaseModel):
    """Tokens spent by the judge (as the endpoint reported them)."""

    model_config = ConfigDict(extra="forbid")

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class JudgeReport(BaseModel):
    """What the optional LLM judge did for this grade.

    ``status``: ``used`` (its verdict decided), ``agreed`` (asked, agreed with the rules), ``overruled`` (asked,
    answered another verdict that it may not impose: the rules said ``failed`` on deterministic evidence, or the
    judge itself was inconclusive; the rules' verdict stands), ``unavailable`` (unreachable, timeout, HTTP error,
    non-zero exit: the rules' verdict stands), ``invalid`` (its answer failed the schema: the rules' verdict
    stands), ``skipped`` (configured, but the rules decided and it is asked only when they cannot). ``usage`` is
    recorded whenever the judge reported it, an invalid answer included. Merge rule: docs/grading.md "The judge".
    """

    model_config = ConfigDict(extra="forbid")

    status: Literal["used", "agreed", "overruled", "unavailable", "invalid", "skipped"]
    judge: str = Field(description="model name at base URL, or the judge command")
    reason: str | None = None
    verdict: str | None = None
    category: str | None = None
    summary: str | None = None
    usage: Usage = Field(default_factory=Usage)


class CriterionResult(BaseModel):
    """One success criterion of the repository's ``scenario.md`` and what the trace says about it.

    ``kind``: ``deterministic`` (a documented form checked against the trace: ``passed`` true/false) or ``judged``
    (left to the judge; ``passed`` is ``None`` unless the judge answered for it).
    """

    model_config = ConfigDict(extra="forbid")

    text: str
    kind: Literal["deterministic", "judged"]
    passed: bool | None = None
    detail: str | None = None


class GraderInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "rules"
    version: str


class Grade(BaseModel):
    """The verdict on one envelope (one version of one trace)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal["trace-source.grade/v1"] = GRADE_SCHEMA_VERSION
    trace_id: str
    envelope_key: str
    envelope_version: int = 1
    verdict: Verdict
    reproduce: bool = Field(description="Worth reproducing: verdict failed and category in REPRODUCIBLE.")
    category: Category
    summary: str = Field(description="One paragraph a reviewer reads first.")
    evidence: list[Evidence] = Field(default_factory=list)
    signature: FailureSignature | None = Field(None, description="Set for a failed verdict.")
    task: str | None = Field(None, description="The run's task input (first 500 characters), if recorded.")
    agent: str | None = None
    criteria: list[CriterionResult] = Field(default_factory=list)
    grader: GraderInfo
    decided_by: Literal["rules", "judge"] = "rules"
    judge: JudgeReport | None = None
    details: dict[str, Any] = Field(default_factory=dict, description="Counts the rules looked at.")

    def to_json_bytes(self) -> bytes:
        """Compact UTF-8 JSON, as published and stored."""
        return self.model_dump_json().encode()
