"""The optional LLM judge against the local fake OpenAI-compatible server (``tests/fake_llm.py``: a paid remote
service, hence a fake; its ``judge-*`` models answer by a documented rule) and with a judge command
(``tests/judge_command.py``): a structured verdict is parsed and stored with its usage; a timeout, a malformed answer,
HTTP 500, an unreachable endpoint, a command that prints garbage or exits non-zero leave the rules' verdict with the
reason; and the grade stage inside ``serve`` stores the judge's verdict, or the rules' with the reason."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

import fake_llm
from fake_llm import FakeLLM
from pipeline.grading.criteria import parse_criteria
from pipeline.grading.judge import (
    VERDICT_SCHEMA, CommandJudge, HttpJudge, JudgeAnswer, apply_judge, build_judge, needs_judge, skipped_report)
from pipeline.grading.model import Grade
from pipeline.grading.rules import grade_envelope
from pipeline.loop_settings import LoopSettings
from loop_support import poll
from serve_proc import ServeProcess
from grading_support import ANSWER, OK_RUN, chat, envelope, grade, root, sid, tool

COMMAND = f"{sys.executable} {Path(__file__).with_name('judge_command.py')}"
PARTIAL = [chat(2, finish="tool_calls", parent=1), tool(3, result={"refunded": True}, parent=1),
           chat(4, answer=ANSWER, parent=1)]  # no root: the rules cannot tell
JUDGED = "## Success criteria\n- tool `refund_order` succeeds\n- the answer is polite\n"


@pytest.fixture(scope="module")
def llm():
    with FakeLLM() as server:
        yield server


def partial_envelope():
    return envelope(PARTIAL, closed="max-wait")


async def judged(judge, env) -> Grade:
    """What the grade stage does: rules, then the judge when it may decide (``pipeline.stages.grade``)."""
    rules = grade_envelope(env)
    assert needs_judge(rules)
    try:
        answer: object = await judge.assess(env, rules)
    except Exception as exc:  # noqa: BLE001 - as the stage does
        answer = exc
    finally:
        await judge.close()
    return apply_judge(rules, answer, judge=judge.describe())


def http_judge(llm: FakeLLM, model: str, timeout_s: float = 30) -> HttpJudge:
    return HttpJudge(model=model, base_url=llm.base_url, api_key="sk-judge", timeout_s=timeout_s)


async def test_structured_verdict_decides_an_inconclusive_run_and_its_usage_is_stored(llm):
    g = await judged(http_judge(llm, "judge-failed"), partial_envelope())
    assert (g.verdict, g.category, g.decided_by, g.reproduce) == ("failed", "wrong_output", "judge", True)
    assert g.signature is not None and g.signature.category == "wrong_output"
    report = g.judge
    assert report.status == "used" and report.judge == f"judge-failed at {llm.base_url}"
    assert (report.usage.input_tokens, report.usage.output_tokens, report.usage.total_tokens) == (321, 45, 366)
    assert fake_llm.JUDGE_SUMMARY in g.summary and "The rules had said inconclusive" in g.summary
    [ev] = [e for e in g.evidence if e.kind == "judge"]
    assert ev.span_id == sid(3)  # the fake quotes the first tool call of the digest it was sent
    [req] = llm.seen(model="judge-failed")
    assert req.authorization == "Bearer sk-judge"
    fmt = req.body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == VERDICT_SCHEMA
    Grade.model_validate_json(g.to_json_bytes())  # stored as is


async def test_judged_criteria_are_answered_by_the_judge(llm):
    env = envelope(OK_RUN)
    rules = grade_envelope(env, criteria=parse_criteria(JUDGED))
    assert rules.verdict == "passed" and needs_judge(rules)
    judge = http_judge(llm, "judge-passed")
    try:
        g = apply_judge(rules, await judge.assess(env, rules), judge=judge.describe())
    finally:
        await judge.close()
    assert (g.verdict, g.decided_by, g.judge.status) == ("passed", "rules", "agreed")
    assert [(c.kind, c.passed, c.detail) for c in g.criteria] == [
        ("deterministic", True, "the last of 1 call(s) of tool refund_order succeeded"),
        ("judged", True, "judged passed")]


async def test_an_endpoint_without_structured_outputs_is_asked_again_plainly(llm):
    g = await judged(http_judge(llm, "judge-noschema"), partial_envelope())
    assert (g.verdict, g.judge.status) == ("failed", "used")
    assert [("response_format" in r.body, r.status) for r in llm.seen(model="judge-noschema")] == [
        (True, 400), (False, 200)]


@pytest.mark.parametrize("model, status, reason", [
    ("judge-garbage", "invalid", "the answer is not JSON"),
    ("judge-badschema", "invalid", "does not match the verdict schema"),
    ("judge-error", "unavailable", "HTTP 500"),
])
async def test_a_bad_answer_leaves_the_rules_verdict_with_the_reason(llm, model, status, reason):
    env = partial_envelope()
    rules = grade_envelope(env)
    g = await judged(http_judge(llm, model), env)
    assert (g.verdict, g.category, g.decided_by) == (rules.verdict, rules.category, "rules")
    assert g.model_copy(update={"judge": None}) == rules
    assert g.judge.status == status and reason in g.judge.reason and "the rules' verdict stands" in g.judge.reason
    if status == "invalid":  # the tokens were spent all the same
        assert g.judge.usage.total_tokens == sum(fake_llm.JUDGE_USAGE)


async def test_a_judge_timeout_leaves_the_rules_verdict(llm):
    g = await judged(http_judge(llm, "judge-slow", timeout_s=0.3), partial_envelope())
    assert (g.verdict, g.judge.status) == ("inconclusive", "unavailable")
    assert "no answer within 0.3s" in g.judge.reason


async def test_an_unreachable_judge_leaves_the_rules_verdict():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    g = await judged(HttpJudge(model="m", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=10), partial_envelope())
    assert (g.verdict, g.judge.status) == ("inconclusive", "unavailable") and "unreachable" in g.judge.reason


async def test_the_command_judge_reads_the_envelope_and_the_rules_grade():
    env = partial_envelope()
    g = await judged(CommandJudge(f"{COMMAND} failed", timeout_s=30), env)
    assert (g.verdict, g.category, g.decided_by, g.judge.status) == ("failed", "wrong_output", "judge", "used")
    assert f"trace {env.trace_id}: the rules said inconclusive" in g.summary
    assert (g.judge.usage.input_tokens, g.judge.usage.output_tokens) == (7, 3)
    assert g.judge.judge == f"command: {COMMAND} failed"


@pytest.mark.parametrize("mode, status, reason", [
    ("garbage", "invalid", "the answer is not JSON"),
    ("exit", "unavailable", "exited 3: 'judge crashed: no model configured'"),
    ("slow", "unavailable", "no answer within 1s (killed)"),
])
async def test_a_command_that_fails_leaves_the_rules_verdict(mode, status, reason):
    g = await judged(CommandJudge(f"{COMMAND} {mode}", timeout_s=1), partial_envelope())
    assert (g.verdict, g.decided_by, g.judge.status) == ("inconclusive", "rules", status)
    assert reason in g.judge.reason


def test_merge_rule():
    failed = grade([root(answer=None, status="ERROR", exc=("KeyError", "x")), chat(2, answer=ANSWER)])
    passed = grade(OK_RUN)
    assert not needs_judge(failed) and not needs_judge(passed)
    says_passed = {"verdict": "passed", "summary": "fine"}
    # The rules' failed verdict rests on deterministic evidence: the judge cannot turn it.
    g = apply_judge(failed, says_passed, judge="j")
    assert (g.verdict, g.judge.status) == ("failed", "overruled") and "deterministic evidence" in g.judge.reason
    # Where it may decide, an inconclusive answer changes nothing.
    open_criteria = grade(OK_RUN, criteria=JUDGED)
    assert needs_judge(open_criteria)
    g = apply_judge(open_criteria, {"verdict": "inconclusive", "summary": "cannot tell"}, judge="j")
    assert (g.verdict, g.judge.status) == ("passed", "overruled") and "could not decide" in g.judge.reason
    inconclusive = grade(PARTIAL, closed="max-wait")
    g = apply_judge(inconclusive, {"verdict": "inconclusive", "summary": "cannot tell"}, judge="j")
    assert (g.verdict, g.judge.status) == ("inconclusive", "agreed")
    g = apply_judge(inconclusive, JudgeAnswer(verdict="passed", category="tool_error", summary="ok"), judge="j")
    assert (g.verdict, g.category, g.signature, g.judge.status) == ("passed", "none", None, "used")
    # A failure without a category of its own is wrong_output.
    g = apply_judge(inconclusive, {"verdict": "failed", "category": "partial_trace", "summary": "bad"}, judge="j")
    assert (g.verdict, g.category) == ("failed", "wrong_output")
    g = apply_judge(inconclusive, {"verdict": "nope"}, judge="j")
    assert (g.verdict, g.judge.status) == ("inconclusive", "invalid")
    assert skipped_report("j").status == "skipped"


def test_build_judge_from_settings(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret")
    http = build_judge(LoopSettings(judge_model="gpt-x", judge_base_url="http://h/v1/",
                                    judge_api_key_env="MY_JUDGE_KEY", judge_timeout_s=5))
    assert isinstance(http, HttpJudge) and http.api_key == "sk-secret" and http.timeout_s == 5
    assert "sk-secret" not in http.describe() and http.describe() == "gpt-x at http://h/v1"
    assert isinstance(build_judge(LoopSettings(judge_command="judge", judge_model="gpt-x",
                                               judge_base_url="http://h/v1")), CommandJudge)
    assert build_judge(LoopSettings()) is None


def emit_plain_span(otlp_url: str) -> str:
    """One ``GET /health`` span (no agent convention: the rules say inconclusive) through the real OTel SDK."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_url}/v1/traces", timeout=30)))
    with provider.get_tracer("judge-test").start_as_current_span("GET /health") as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
    provider.shutdown()
    return trace_id


@pytest.mark.parametrize("model, timeout_s, verdict, decided_by, status", [
    ("judge-failed", 30, "failed", "judge", "used"),
    ("judge-slow", 0.5, "inconclusive", "rules", "unavailable"),
])
def test_the_grade_stage_stores_the_judges_verdict(tmp_path, llm, model, timeout_s, verdict, decided_by, status):
    state = tmp_path / "state"
    with ServeProcess(state, "--execution-policy", "grade", "--judge-model", model, "--judge-base-url",
                      llm.base_url, "--judge-api-key-env", "E2E_JUDGE_KEY", "--judge-timeout-s", str(timeout_s),
                      env={"TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": "0.5", "E2E_JUDGE_KEY": "sk-e2e"}) as serve:
        trace_id = emit_plain_span(serve.http_url)
        path = state / "grades" / trace_id / "grade.json"
        g = poll(lambda: Grade.model_validate_json(path.read_bytes()), f"grade of {trace_id}", serve)
    assert (g.verdict, g.decided_by, g.judge.status) == (verdict, decided_by, status)
    assert g.judge.judge == f"{model} at {llm.base_url}"
    if status == "used":
        assert g.judge.usage.total_tokens == sum(fake_llm.JUDGE_USAGE)
        assert llm.seen(model=model)[-1].authorization == "Bearer sk-e2e"  # the key from the named variable
    else:
        assert "no answer within 0.5s" in g.judge.reason
