"""The optional LLM judge, for what the rules cannot decide (docs/grading.md "The judge").

Two implementations of one :class:`Judge` protocol (``async assess(envelope, rules_grade) -> JudgeAnswer``):

* :class:`HttpJudge` — any OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``), asked
  for a structured verdict with ``response_format: {"type": "json_schema", ...}`` (:data:`VERDICT_SCHEMA`, strict);
  an endpoint that rejects ``response_format`` with HTTP 400 is asked once more without it. The API key is read from
  the environment variable whose *name* is configured (``--judge-api-key-env``).
* :class:`CommandJudge` — ``--judge-command``, run by ``/bin/sh -c``: the envelope JSON on stdin, the rules' grade in
  the environment variable ``TRACE_SOURCE_RULES_GRADE``, a verdict JSON on stdout.

Either way the answer is validated against :class:`JudgeAnswer`. A judge that is unreachable, times out, answers
non-2xx, exits non-zero or answers something that fails the schema raises :class:`JudgeError`;
:func:`apply_judge` (pure) turns that into a :class:`~pipeline.grading.model.JudgeReport` saying why, and the rules'
verdict stands: a grade never blocks on the judge.

Merge rule (:func:`apply_judge`): the judge may decide only where the rules cannot — the rules said
``inconclusive``, or they said ``passed`` while judged success criteria are open (:func:`needs_judge`). A ``failed``
from the rules rests on deterministic evidence and stands whatever the judge says.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any, Literal, Protocol

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from normalizers.envelope import Envelope
from pipeline.grading.model import (
    CATEGORIES, REPRODUCIBLE, Category, CriterionResult, Evidence, FailureSignature, Grade, JudgeReport, Usage)
from pipeline.grading.signals import quote

#: Environment variable holding the rules' grade (JSON) for a judge command.
RULES_GRADE_ENV = "TRACE_SOURCE_RULES_GRADE"

#: Characters of one tool argument / result / message put into the judge's prompt.
_FIELD_MAX = 1_000
#: Tool and LLM calls put into the judge's prompt (the first and last ones are kept).
_CALLS_MAX = 40

_CATEGORY_HELP = {
    "none": "no failure (verdict passed)",
    "tool_error": "a tool failed and the run could not complete the task",
    "provider_error": "the LLM provider failed (5xx, rate limit, auth)",
    "gave_up": "the agent refused or gave up on the task",
    "false_success": "the agent claimed success although a step failed",
    "turn_limit": "the run hit a turn/step limit or looped",
    "wrong_output": "the answer is missing or wrong, or a success criterion is not met",
    "agent_error": "the agent crashed otherwise",
    "partial_trace": "the trace is too incomplete to tell (verdict inconclusive)",
}

SYSTEM_PROMPT = (
    "You grade one run of an AI agent from its trace. Decide whether the run holds a real task failure: the agent "
    "did not accomplish its task (verdict \"failed\"), it did (\"passed\"), or the trace cannot tell "
    "(\"inconclusive\"). A tool error the agent recovered from by retrying is not a failure. Check each listed "
    "success criterion of the scenario. Quote the trace for your evidence, naming the span id you quote. Categories: "
    + "; ".join(f"{k}: {v}" for k, v in _CATEGORY_HELP.items())
    + ". Answer with one JSON object only, matching the given schema.")

#: JSON Schema of the verdict (OpenAI structured outputs, strict mode: every property required, no extras).
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["verdict", "category", "summary", "evidence", "criteria"],
    "properties": {
        "verdict": {"type": "string", "enum": ["failed", "passed", "inconclusive"]},
        "category": {"type": "string", "enum": list(CATEGORIES)},
        "summary": {"type": "string", "description": "One paragraph a reviewer reads first."},
        "evidence": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["span_id", "quote"],
            "properties": {"span_id": {"type": "string"}, "quote": {"type": "string"}}}},
        "criteria": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["text", "passed", "detail"],
            "properties": {"text": {"type": "string"}, "passed": {"type": ["boolean", "null"]},
                           "detail": {"type": "string"}}}},
    },
}


class JudgeEvidence(BaseModel):
    model_config = ConfigDict(extra="ignore")

    span_id: str = ""
    quote: str = Field(min_length=1)


class JudgedCriterion(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str
    passed: bool | None = None
    detail: str | None = None


class JudgeAnswer(BaseModel):
    """A judge's verdict (the shape of :data:`VERDICT_SCHEMA`), plus the tokens it cost. A command judge may add
    ``usage`` (``input_tokens``, ``output_tokens``, ``total_tokens``) to its JSON; unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    verdict: Literal["failed", "passed", "inconclusive"]
    category: Category = "none"
    summary: str = Field(min_length=1)
    evidence: list[JudgeEvidence] = Field(default_factory=list)
    criteria: list[JudgedCriterion] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)


class JudgeError(Exception):
    """The judge gave no usable verdict. ``status``: ``unavailable`` (unreachable, timeout, non-2xx, non-zero exit)
    or ``invalid`` (an answer that fails the schema). ``usage``: tokens already spent (an invalid answer cost
    them too)."""

    status: Literal["unavailable", "invalid"] = "unavailable"

    def __init__(self, reason: str, usage: Usage | None = None) -> None:
        super().__init__(reason)
        self.usage = usage or Usage()


class JudgeUnavailable(JudgeError):
    status = "unavailable"


class JudgeInvalid(JudgeError):
    status = "invalid"


class Judge(Protocol):
    """What the grade stage needs of a judge."""

    async def assess(self, envelope: Envelope, rules_grade: Grade) -> JudgeAnswer:
        """The judge's verdict on ``envelope``; raises :class:`JudgeError` (or any exception, which
        :func:`apply_judge` reports as ``unavailable``)."""

    def describe(self) -> str:
        """Which judge, without secrets (part of the grade stage's config version)."""

    async def close(self) -> None:
        """Release connections."""


# ------------------------------------------------------------------------------------------- what it is asked


def judge_input(envelope: Envelope, rules_grade: Grade) -> dict[str, Any]:
    """The digest of the run the HTTP judge reads (pure): task, answer, the LLM and tool calls (fields cut to
    1000 characters, at most 40 calls of each kind), errors, completeness, the rules' grade and the criteria."""
    run = envelope.agent_run
    return {
        "trace_id": envelope.trace_id,
        "agent": run.agent_name,
        "task": run.task_input,
        "final_output": run.final_output,
        "completeness": envelope.completeness.model_dump(),
        "llm_calls": _cap([{"span_id": c.span_id, "model": c.model, "finish_reasons": c.finish_reasons,
                            "error": c.error, "answer": _cut(_last_text(c.output_messages))}
                           for c in run.llm_calls]),
        "tool_calls": _cap([{"span_id": t.span_id, "name": t.name, "arguments": _cut(t.arguments),
                             "result": _cut(t.result), "error": t.error} for t in run.tool_calls]),
        "errors": [{"span_id": e.span_id, "type": e.type, "message": _cut(e.message), "fatal": e.fatal}
                   for e in run.errors[:_CALLS_MAX]],
        "rules": {"verdict": rules_grade.verdict, "category": rules_grade.category, "summary": rules_grade.summary},
        "success_criteria": [c.model_dump() for c in rules_grade.criteria],
    }


def chat_messages(envelope: Envelope, rules_grade: Grade) -> list[dict[str, str]]:
    """The chat messages sent to an OpenAI-compatible judge (pure)."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": json.dumps(judge_input(envelope, rules_grade), ensure_ascii=False,
                                                   default=str)}]


def _cut(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return quote(value, _FIELD_MAX)


def _cap(items: list[dict]) -> list[dict]:
    if len(items) <= _CALLS_MAX:
        return items
    half = _CALLS_MAX // 2
    return [*items[:half], {"omitted": len(items) - 2 * half}, *items[-half:]]


def _last_text(messages: list) -> str | None:
    for m in reversed(messages):
        for p in reversed(m.parts):
            if p.type == "text" and isinstance(p.content, str):
                return p.content
    return None


# ------------------------------------------------------------------------------------------- parsing answers


def parse_answer(content: str | bytes, usage: Usage | None = None) -> JudgeAnswer:
    """A judge's text -> :class:`JudgeAnswer`; a JSON object, optionally inside a Markdown code fence. Raises
    :class:`JudgeInvalid` (carrying ``usage``) for anything else."""
    text = content.decode(errors="replace") if isinstance(content, bytes) else content
    text = text.strip()
    if text.startswith("```"):  # models without structured output often fence their JSON
        text = text.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(text)
    except ValueError:
        raise JudgeInvalid(f"the answer is not JSON: {quote(text, 200)!r}", usage) from None
    if not isinstance(data, dict):
        raise JudgeInvalid(f"the answer is not a JSON object: {quote(text, 200)!r}", usage)
    if usage is not None:
        data = {**data, "usage": usage.model_dump()}
    try:
        return JudgeAnswer.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()[:5])
        raise JudgeInvalid(f"the answer does not match the verdict schema: {problems}", usage) from None


def _known_spans(answer: JudgeAnswer, envelope: Envelope) -> JudgeAnswer:
    """Evidence span ids the trace does not have are cleared (a model may invent them)."""
    ids = {s.span_id for s in envelope.spans}
    evidence = [e if e.span_id in ids else e.model_copy(update={"span_id": ""}) for e in answer.evidence]
    return answer.model_copy(update={"evidence": evidence})


# ------------------------------------------------------------------------------------------- the HTTP judge


class HttpJudge:
    """An OpenAI-compatible chat-completions judge (aiohttp). ``api_key``: the key itself (the settings read it from
    the environment variable they name); ``timeout_s``: deadline of one assessment, retries included."""

    def __init__(self, *, model: str, base_url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def assess(self, envelope: Envelope, rules_grade: Grade) -> JudgeAnswer:
        messages = chat_messages(envelope, rules_grade)
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self._ask(messages, structured=True)
        except TimeoutError:
            raise JudgeUnavailable(f"no answer within {self.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise JudgeUnavailable(f"unreachable: {type(exc).__name__}: {quote(str(exc), 200)}") from None
        return _known_spans(answer, envelope)

    async def _ask(self, messages: list[dict[str, str]], *, structured: bool) -> JudgeAnswer:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if structured:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "agent_run_verdict", "strict": True, "schema": VERDICT_SCHEMA}}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with self._client().post(f"{self.base_url}/chat/completions", json=body, headers=headers) as resp:
            status, raw = resp.status, await resp.read()
        if status == 400 and structured and b"response_format" in raw:
            # The endpoint does not do structured outputs: ask again, the prompt still demands the JSON.
            return await self._ask(messages, structured=False)
        if not 200 <= status < 300:
            raise JudgeUnavailable(f"HTTP {status}: {quote(raw.decode(errors='replace'), 300)}")
        return _answer_of(raw)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session


def _answer_of(raw: bytes) -> JudgeAnswer:
    """A chat-completions response body -> the verdict in its first choice's message."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise JudgeInvalid(f"the response body is not JSON: {quote(raw.decode(errors='replace'), 200)!r}") from None
    usage = _usage(data.get("usage") if isinstance(data, dict) else None)
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise JudgeInvalid("the response has no choices[0].message", usage) from None
    if isinstance(message, dict) and message.get("refusal"):
        raise JudgeInvalid(f"the judge refused: {quote(message['refusal'], 200)!r}", usage)
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise JudgeInvalid("the answer is empty", usage)
    return parse_answer(content, usage)


def _usage(u: Any) -> Usage:
    """OpenAI ``usage`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``) -> :class:`Usage`."""
    if not isinstance(u, dict):
        return Usage()
    ints = {k: v for k, v in u.items() if isinstance(v, int) and not isinstance(v, bool)}
    inp, out = ints.get("prompt_tokens", ints.get("input_tokens", 0)), ints.get("completion_tokens",
                                                                                 ints.get("output_tokens", 0))
    return Usage(input_tokens=inp, output_tokens=out, total_tokens=ints.get("total_tokens", inp + out))


# ------------------------------------------------------------------------------------------- the command judge


class CommandJudge:
    """``/bin/sh -c <command>``: envelope JSON on stdin, the rules' grade in ``TRACE_SOURCE_RULES_GRADE``, the
    worker's environment otherwise (it is the operator's own command); a verdict JSON (:class:`JudgeAnswer`) on
    stdout. Past ``timeout_s`` its whole process group is killed."""

    def __init__(self, command: str, *, timeout_s: float = 60.0) -> None:
        self.command = command
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return f"command: {self.command}"

    async def close(self) -> None:
        return None

    async def assess(self, envelope: Envelope, rules_grade: Grade) -> JudgeAnswer:
        env = {**os.environ, RULES_GRADE_ENV: rules_grade.model_dump_json()}
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise JudgeUnavailable(f"cannot start the judge command: {exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await proc.communicate(envelope.to_json_bytes())
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            raise JudgeUnavailable(f"the judge command gave no answer within {self.timeout_s:g}s (killed)") from None
        except BaseException:
            _kill_group(proc)  # cancelled (shutdown): leave no judge running
            raise
        if proc.returncode != 0:
            raise JudgeUnavailable(f"the judge command exited {proc.returncode}: "
                                   f"{quote(err.decode(errors='replace').strip(), 300)!r}")
        return _known_spans(parse_answer(out), envelope)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------- wiring, merging


def build_judge(settings: Any) -> Judge | None:
    """The judge the settings (:class:`pipeline.loop_settings.LoopSettings`) configure, else ``None``: the command
    when ``judge_command`` is set, else the HTTP judge when ``judge_model`` and ``judge_base_url`` are."""
    if settings.judge_command:
        return CommandJudge(settings.judge_command, timeout_s=settings.judge_timeout_s)
    if settings.judge_model and settings.judge_base_url:
        return HttpJudge(model=settings.judge_model, base_url=settings.judge_base_url,
                         api_key=settings.judge_api_key(), timeout_s=settings.judge_timeout_s)
    return None


def needs_judge(grade: Grade) -> bool:
    """Whether the judge may change this grade: the rules said ``inconclusive``, or ``passed`` with judged success
    criteria still open. Otherwise it is not asked (no cost)."""
    if grade.verdict == "inconclusive":
        return True
    return grade.verdict == "passed" and any(c.kind == "judged" and c.passed is None for c in grade.criteria)


def skipped_report(judge: str) -> JudgeReport:
    """The report of a configured judge that was not asked because the rules decided."""
    return JudgeReport(status="skipped", judge=judge, reason="the rules decided and no judged success criterion "
                                                             "was open, so the judge was not asked")


def apply_judge(rules_grade: Grade, answer: JudgeAnswer | BaseException | Any, *, judge: str) -> Grade:
    """The grade after the judge (pure). ``answer``: a :class:`JudgeAnswer`, a dict of its shape, or the exception
    :meth:`Judge.assess` raised.

    * an exception, or an answer that fails the schema -> the rules' grade with a report ``unavailable`` /
      ``invalid`` and the reason ("the rules' verdict stands");
    * where the judge may decide (:func:`needs_judge`) and its verdict is decisive and differs -> its verdict,
      category (``wrong_output`` for a failure without one, ``none`` for passed), summary and evidence
      (``kind="judge"``) after the rules' evidence, ``decided_by="judge"``, report ``used``;
    * the same verdict -> report ``agreed``; otherwise (rules ``failed``, or an inconclusive answer) the rules'
      verdict stands, report ``overruled``.

    The judge's answers to judged criteria fill those criteria either way; its token usage is always recorded.
    """
    if isinstance(answer, BaseException):
        return _failed_judge(rules_grade, answer, judge)
    if not isinstance(answer, JudgeAnswer):
        try:
            answer = JudgeAnswer.model_validate(answer)
        except ValidationError as exc:
            return _failed_judge(rules_grade, JudgeInvalid(f"the answer does not match the verdict schema: "
                                                           f"{quote(str(exc), 300)}"), judge)
    criteria = _merge_criteria(rules_grade.criteria, answer.criteria)
    report = JudgeReport(status="agreed", judge=judge, verdict=answer.verdict, category=answer.category,
                         summary=quote(answer.summary, 2000), usage=answer.usage)
    if answer.verdict == rules_grade.verdict:
        return rules_grade.model_copy(update={"judge": report, "criteria": criteria})
    if not needs_judge(rules_grade) or answer.verdict == "inconclusive":
        why = ("the rules' failed verdict rests on deterministic evidence" if rules_grade.verdict == "failed"
               else "the judge could not decide either" if answer.verdict == "inconclusive"
               else "the judge may decide only inconclusive runs or open judged criteria")
        report = report.model_copy(update={"status": "overruled", "reason": f"{why}; the rules' verdict stands"})
        return rules_grade.model_copy(update={"judge": report, "criteria": criteria})
    return _judged(rules_grade, answer, criteria, report.model_copy(update={"status": "used"}))


def _judged(rules: Grade, answer: JudgeAnswer, criteria: list[CriterionResult], report: JudgeReport) -> Grade:
    failed = answer.verdict == "failed"
    category = answer.category
    if failed and category in ("none", "partial_trace"):
        category = "wrong_output"
    elif not failed:
        category = "none"
    evidence = [*rules.evidence, *(Evidence(span_id=e.span_id, kind="judge", quote=quote(e.quote))
                                   for e in answer.evidence)]
    summary = (f"The LLM judge decided {answer.verdict}" + (f" ({category})" if failed else "") + ": "
               f"{quote(' '.join(answer.summary.split()), 1000)} (The rules had said {rules.verdict}: "
               f"{quote(rules.summary, 600)})")
    return rules.model_copy(update={
        "verdict": answer.verdict, "category": category, "reproduce": failed and category in REPRODUCIBLE,
        "summary": summary, "evidence": evidence, "criteria": criteria, "decided_by": "judge", "judge": report,
        "signature": FailureSignature(category=category) if failed else None})


def _failed_judge(rules: Grade, exc: BaseException, judge: str) -> Grade:
    status = exc.status if isinstance(exc, JudgeError) else "unavailable"
    usage = exc.usage if isinstance(exc, JudgeError) else Usage()
    what = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and not isinstance(exc, JudgeError):
        what = "timed out"
    report = JudgeReport(status=status, judge=judge, reason=f"{quote(what, 400)}; the rules' verdict stands",
                         usage=usage)
    return rules.model_copy(update={"judge": report})


def _merge_criteria(rules: list[CriterionResult], judged: list[JudgedCriterion]) -> list[CriterionResult]:
    """Judged criteria take the judge's ``passed`` / ``detail`` (matched by their text, whitespace and case
    ignored); deterministic ones keep the rules' result."""
    answers = {" ".join(j.text.split()).casefold(): j for j in judged}
    out = []
    for c in rules:
        j = answers.get(" ".join(c.text.split()).casefold())
        if c.kind == "judged" and j is not None:
            c = c.model_copy(update={"passed": j.passed, "detail": j.detail})
        out.append(c)
    return out
