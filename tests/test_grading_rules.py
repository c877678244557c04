"""The grading rules on hand-built envelopes: each rule, and the near miss it must not fire on.

Envelopes are built the way the assembler builds them (canonical spans -> ``build_agent_run`` -> envelope) from OTel
GenAI spans (``invoke_agent`` root, ``chat`` and ``execute_tool`` children), plus Claude Code log events and plain
non-agent spans where a rule is about them.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from grading_support import ANSWER, OK_RUN, TASK, TRACE, chat, envelope, grade, root, sid, span, tool
from normalizers.canonical import CanonicalLogEvent, Scope
from pipeline.grading.facts import LOOP_REPEATS
from pipeline.grading.model import REPRODUCIBLE, Grade
from pipeline.grading.rules import GRADER_VERSION, grade_envelope

def assert_failed(g: Grade, category: str, *, tool_name: str | None = None, error_type: str | None = None) -> None:
    assert (g.verdict, g.category) == ("failed", category), g.model_dump_json(indent=1)
    assert g.reproduce is (category in REPRODUCIBLE)
    assert g.signature is not None and g.signature.category == category
    assert (g.signature.tool, g.signature.error_type) == (tool_name, error_type), g.signature
    assert g.evidence and all(e.quote for e in g.evidence)
    span_ids = {sid(n) for n in range(1, 30)} | {""}
    assert all(e.span_id in span_ids for e in g.evidence)
    assert g.summary and "\n" not in g.summary


def assert_passed(g: Grade) -> None:
    assert (g.verdict, g.category, g.signature, g.reproduce) == ("passed", "none", None, False), \
        g.model_dump_json(indent=1)




# ------------------------------------------------------------------------------------------------ passed


def test_a_run_that_answered_passes_with_its_root_and_answer_as_evidence():
    g = grade(OK_RUN)
    assert_passed(g)
    assert [(e.kind, e.span_id, e.quote) for e in g.evidence] == [("status", sid(1), "OK"),
                                                                  ("output", sid(1), ANSWER)]
    assert g.task == TASK and g.agent == "support" and g.grader.version == GRADER_VERSION
    assert g.details["llm_calls"] == 2 and g.details["tool_calls"] == 1 and g.details["tool_failures"] == 0


def test_grading_is_deterministic_to_the_byte():
    assert grade(OK_RUN).to_json_bytes() == grade(OK_RUN).to_json_bytes()


def test_without_recorded_content_a_missing_answer_is_not_a_failure():
    spans = [span(1, "invoke_agent support", {"gen_ai.operation.name": "invoke_agent"}),
             span(2, "chat gpt-x", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-x"}, parent=1)]
    g = grade(spans)
    assert_passed(g)
    assert "not recorded" in g.summary and g.details["content_recorded"] is False


def test_missing_answer_with_recorded_content_is_wrong_output():
    g = grade([root(answer=None), chat(2, finish="tool_calls"), tool(3, result={"refunded": True})])
    assert_failed(g, "wrong_output")
    assert "without a final answer" in g.summary


# ------------------------------------------------------------------------------------------------ tool_error


def test_tool_raised_and_the_run_failed_is_tool_error():
    g = grade([root(answer=None, status="ERROR", message="refund failed", exc=("ConnectionError", "db down")),
               chat(2, finish="tool_calls"),
               tool(3, status="ERROR", exc=("ConnectionError", "db down"))])
    assert_failed(g, "tool_error", tool_name="refund_order", error_type="ConnectionError")
    assert g.evidence[0].span_id == sid(3) and g.evidence[0].kind == "exception"
    assert "ConnectionError: db down" in g.evidence[0].quote
    assert sid(1) in {e.span_id for e in g.evidence}  # the run's own failure is quoted too
    assert "refund_order" in g.summary and "raised ConnectionError" in g.summary


def test_tool_error_recovered_by_a_retry_of_the_same_tool_is_noise():
    g = grade([root(status="OK"), chat(2, finish="tool_calls"),
               tool(3, status="ERROR", exc=("TimeoutError", "timed out")), chat(4, finish="tool_calls"),
               tool(5, result={"refunded": True}), chat(6, answer=ANSWER)])
    assert_passed(g)
    assert g.details["tool_failures"] == 1 and g.details["recovered_tool_failures"] == 1
    assert "recovered" in g.summary


def test_a_retry_that_fails_again_is_not_a_recovery():
    g = grade([root(answer=None, status="ERROR", exc=("TimeoutError", "timed out")), chat(2, finish="tool_calls"),
               tool(3, status="ERROR", exc=("TimeoutError", "timed out")), chat(4, finish="tool_calls"),
               tool(5, status="ERROR", exc=("TimeoutError", "timed out"))])
    assert_failed(g, "tool_error", tool_name="refund_order", error_type="TimeoutError")
    assert g.evidence[0].span_id == sid(5)  # the last failure is the one quoted


def test_another_tool_succeeding_is_not_a_recovery_of_the_failed_one():
    g = grade([root(status="OK"), chat(2, finish="tool_calls"), tool(3, status="ERROR", exc=("KeyError", "x")),
               chat(4, finish="tool_calls"), tool(5, "lookup_order", result={"found": True}),
               chat(6, answer=ANSWER)])
    assert_failed(g, "false_success", tool_name="refund_order", error_type="KeyError")


def test_unrecovered_tool_failure_the_answer_admits_is_tool_error_not_false_success():
    answer = "I could not refund order A-1002: the payment service failed."
    g = grade([root(answer=answer, status="OK"), chat(2, finish="tool_calls"),
               tool(3, result={"ok": False, "error": "payment service down"}), chat(4, answer=answer)])
    assert_failed(g, "tool_error", tool_name="refund_order")
    assert "reports it" in g.summary


# ------------------------------------------------------------------------------------------------ false_success


def test_tool_result_reports_failure_while_the_answer_claims_success_is_false_success():
    g = grade([root(status="OK"), chat(2, finish="tool_calls"),
               tool(3, result={"ok": False, "error": "order A-1002 not found"}), chat(4, answer=ANSWER)])
    assert_failed(g, "false_success", tool_name="refund_order")
    assert [(e.kind, e.span_id) for e in g.evidence] == [("tool_result", sid(3)), ("output", sid(1))]
    assert "order A-1002 not found" in g.evidence[0].quote and g.evidence[1].quote == ANSWER


def test_a_result_that_merely_mentions_errors_is_not_a_failure():
    for result in ("no errors found", {"status": "ok", "errors": []}, {"error": None, "refunded": True},
                   "Error rate: 0%"):
        assert_passed(grade([root(status="OK"), chat(2, finish="tool_calls"), tool(3, result=result),
                             chat(4, answer=ANSWER)]))


def test_failed_result_forms():
    for result in ({"success": False}, {"status": "FAILED"}, {"isError": True, "content": []}, "Error: timeout",
                   "ValueError: bad order id", {"result": {"ok": False}}, {"type": "error-text", "value": "x"}):
        g = grade([root(status="OK"), chat(2, finish="tool_calls"), tool(3, result=result), chat(4, answer=ANSWER)])
        assert_failed(g, "false_success", tool_name="refund_order")


# ------------------------------------------------------------------------------------------------ turn_limit


def test_max_turns_error_is_turn_limit():
    g = grade([root(answer=None, status="ERROR", exc=("agents.exceptions.MaxTurnsExceeded", "Max turns (10) exceeded")),
               chat(2, finish="tool_calls"), tool(3, result={"refunded": True})])
    assert_failed(g, "turn_limit", error_type="agents.exceptions.MaxTurnsExceeded")
    assert g.evidence[0].kind == "exception" and "Max turns (10) exceeded" in g.evidence[0].quote


def test_a_loop_without_an_answer_is_turn_limit():
    spans = [root(answer=None, status="OK")]
    for i in range(LOOP_REPEATS + 1):
        spans += [chat(2 + 2 * i, finish="tool_calls"), tool(3 + 2 * i, "check_status", result={"state": "pending"})]
    g = grade(spans)
    assert_failed(g, "turn_limit", tool_name="check_status")
    assert f"{LOOP_REPEATS + 1} times" in g.summary


def test_polling_the_same_tool_then_answering_is_not_a_loop():
    spans = [root(status="OK")]
    for i in range(LOOP_REPEATS):
        spans += [chat(2 + 2 * i, finish="tool_calls"), tool(3 + 2 * i, "check_status", result={"state": "pending"})]
    spans.append(chat(20, answer=ANSWER))
    assert_passed(grade(spans))


def test_an_answer_that_says_the_iteration_limit_stopped_it_is_turn_limit():
    text = "Agent stopped due to iteration limit or time limit."
    g = grade([root(answer=text, status="OK"), chat(2, answer=text)])
    assert_failed(g, "turn_limit")


# ------------------------------------------------------------------------------------------------ gave_up


def test_refusal_is_gave_up():
    text = "I'm sorry, but I can't help with refunds."
    g = grade([root(answer=text, status="OK"), chat(2, answer=text)])
    assert_failed(g, "gave_up")
    assert g.evidence[0].kind == "output" and g.evidence[0].quote == text


def test_content_filter_finish_reason_is_gave_up():
    g = grade([root(answer=None, status="OK"), chat(2, finish="content_filter")])
    assert_failed(g, "gave_up")
    assert (g.evidence[0].kind, g.evidence[0].quote) == ("finish_reason", "content_filter")


def test_words_that_only_look_like_a_refusal_pass():
    caveat = ANSWER + " The refund of $42.50 reaches the card in 3-5 days; it shows as 'ACME RETURNS'. " * 3 + \
        "I cannot help with orders of other shops."
    for text in ("I can't wait for your next order!", "You can't go wrong with a refund: done, A-1002 is refunded.",
                 "I was able to complete the refund.", caveat):
        assert_passed(grade([root(answer=text, status="OK"), chat(2, answer=text)]))


# ------------------------------------------------------------------------------------------------ provider_error


def test_llm_5xx_that_killed_the_run_is_provider_error_not_reproduced():
    g = grade([root(answer=None, status="ERROR", exc=("openai.InternalServerError", "Error code: 500 - overloaded")),
               chat(2, status="ERROR", exc=("openai.InternalServerError", "Error code: 500 - overloaded"))])
    assert_failed(g, "provider_error", error_type="openai.InternalServerError")
    assert g.reproduce is False and g.evidence[0].span_id == sid(2)


def test_a_rate_limit_that_killed_the_run_is_not_a_turn_limit():
    exc = ("RateLimitError", "Error code: 429 - request limit reached for this organization")
    g = grade([root(answer=None, status="ERROR", exc=exc), chat(2, status="ERROR", exc=exc)])
    assert_failed(g, "provider_error", error_type="RateLimitError")


def test_rate_limit_and_auth_are_provider_errors():
    for exc in (("RateLimitError", "Error code: 429 - rate limit reached"),
                ("AuthenticationError", "Error code: 401 - invalid_api_key")):
        g = grade([root(answer=None, status="ERROR", exc=exc), chat(2, status="ERROR", exc=exc)])
        assert_failed(g, "provider_error", error_type=exc[0])


def test_llm_error_followed_by_a_successful_call_is_noise():
    g = grade([root(status="OK"), chat(2, status="ERROR", exc=("RateLimitError", "Error code: 429")),
               chat(3, answer=ANSWER)])
    assert_passed(g)


def test_bad_request_from_the_agent_is_agent_error_not_provider_error():
    exc = ("openai.BadRequestError", "Error code: 400 - context_length_exceeded")
    g = grade([root(answer=None, status="ERROR", exc=exc), chat(2, status="ERROR", exc=exc)])
    assert_failed(g, "agent_error", error_type="openai.BadRequestError")


def test_claude_code_retries_exhausted_is_provider_error():
    def cc(name: str, attrs: dict, t: int) -> CanonicalLogEvent:
        return CanonicalLogEvent(trace_id=TRACE, time_unix_nano=t, event_name=f"claude_code.{name}",
                                 attributes={"session.id": "s", "prompt.id": "p", **attrs},
                                 scope=Scope(name="com.anthropic.claude_code.events"),
                                 resource={"service.name": "claude-code"})
    logs = [cc("user_prompt", {"prompt": TASK}, 1), cc("api_error", {"error": "Overloaded", "status_code": 529}, 2),
            cc("api_retries_exhausted", {"error": "gave up after 10 attempts", "status_code": 529}, 3)]
    g = grade([], logs=logs, closed="quiet")
    assert_failed(g, "provider_error", error_type="claude_code.api_error")
    assert g.evidence[0].kind == "log_event" and g.details["partial"] is False


# ------------------------------------------------------------------------------------------------ agent_error


def test_a_crash_outside_any_step_is_agent_error():
    g = grade([root(answer=None, status="ERROR", exc=("KeyError", "'order'")), chat(2, finish="tool_calls"),
               tool(3, result={"refunded": True})])
    assert_failed(g, "agent_error", error_type="KeyError")
    assert g.evidence[0].span_id == sid(1) and "KeyError" in g.evidence[0].quote


def test_an_unrecognized_root_in_error_still_fails_the_run():
    spans = [span(1, "POST /refund", {"http.request.method": "POST"}, status="ERROR", message="boom",
                  exc=("RuntimeError", "boom")),
             chat(2, answer=ANSWER)]
    assert_failed(grade(spans), "agent_error", error_type="RuntimeError")


def test_a_trace_without_agent_activity_is_inconclusive():
    g = grade([span(1, "GET /health", {"http.request.method": "GET"}, status="OK")])
    assert (g.verdict, g.category, g.signature) == ("inconclusive", "none", None)


# ------------------------------------------------------------------------------------------------ wrong_output


def test_an_answer_cut_at_the_token_limit_is_wrong_output():
    g = grade([root(answer="Order A-1002 was", status="OK"), chat(2, answer="Order A-1002 was", finish="length")])
    assert_failed(g, "wrong_output")
    assert (g.evidence[0].kind, g.evidence[0].quote) == ("finish_reason", "length")


# ------------------------------------------------------------------------------------------------ completeness


def test_partial_trace_is_inconclusive_unless_the_run_visibly_failed():
    orphan = [chat(2, finish="tool_calls", parent=1), tool(3, result={"ok": False, "error": "x"}, parent=1),
              chat(4, answer=ANSWER, parent=1)]  # the root (span 1) never arrived
    g = grade(orphan, closed="max-wait")
    assert (g.verdict, g.category, g.signature, g.reproduce) == ("inconclusive", "partial_trace", None, False)
    assert g.evidence[0].name == "completeness" and "max-wait" in g.summary

    # The agent span arrived (its caller did not) and it ended in ERROR: the failure is unambiguous.
    failed = [root(n=5, answer=None, parent=9, status="ERROR", exc=("ConnectionError", "db down")),
              tool(6, parent=5, status="ERROR", exc=("ConnectionError", "db down"))]
    g = grade(failed, closed="max-wait")
    assert_failed(g, "tool_error", tool_name="refund_order", error_type="ConnectionError")
    assert "partial" in g.summary


def test_an_evicted_trace_is_partial_even_with_its_root():
    g = grade(OK_RUN, closed="evicted")
    assert (g.verdict, g.category) == ("inconclusive", "partial_trace")


def test_a_local_root_is_a_complete_run():
    spans = [root(parent=9, remote_parent=True, status="OK"), chat(2, answer=ANSWER)]
    env = envelope(spans)
    assert env.completeness.root_is_local and env.completeness.root_seen
    g = grade_envelope(env)
    assert_passed(g)
    assert g.details["root_is_local"] is True and g.details["root_span_id"] == sid(1)
    assert "remote parent" in g.summary
    # The same span with a parent that is *not* marked remote is an orphan: partial.
    orphan = [root(parent=9, status="OK"), chat(2, answer=ANSWER)]
    assert grade(orphan, closed="max-wait").category == "partial_trace"


# ------------------------------------------------------------------------------------------------ criteria


SCENARIO = """# Refunds

## Success criteria
- tool `refund_order` succeeds
- tool `delete_account` is not called
- the final output contains "refunded"
- the answer is polite and names the order
"""


def test_criteria_pass_and_judged_ones_stay_open():
    g = grade(OK_RUN, criteria=SCENARIO)
    assert_passed(g)
    assert [(c.kind, c.passed) for c in g.criteria] == [("deterministic", True), ("deterministic", True),
                                                        ("deterministic", True), ("judged", None)]


def test_a_failed_criterion_fails_a_passing_run_as_wrong_output():
    g = grade([root(answer="Done.", status="OK"), chat(2, finish="tool_calls"), tool(3, result={"refunded": True}),
               chat(4, answer="Done.")], criteria=SCENARIO)
    assert_failed(g, "wrong_output")
    [ev] = [e for e in g.evidence if e.kind == "criterion"]
    assert ev.name == 'the final output contains "refunded"' and "'Done.'" in ev.quote
    assert [c.passed for c in g.criteria] == [True, True, False, None]


def test_a_failed_criterion_is_evidence_of_a_more_specific_failure():
    g = grade([root(answer=None, status="ERROR", exc=("ConnectionError", "db down")), chat(2, finish="tool_calls"),
               tool(3, status="ERROR", exc=("ConnectionError", "db down"))], criteria=SCENARIO)
    assert_failed(g, "tool_error", tool_name="refund_order", error_type="ConnectionError")
    assert {e.name for e in g.evidence if e.kind == "criterion"} == {"tool `refund_order` succeeds",
                                                                    'the final output contains "refunded"'}


def test_criteria_do_not_decide_a_partial_trace():
    g = grade([chat(2, answer="Done.", parent=1)], closed="max-wait", criteria=SCENARIO)
    assert (g.verdict, g.category) == ("inconclusive", "partial_trace")
    assert g.criteria[2].passed is False


# ------------------------------------------------------------------------------------------------ odd input

_odd = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
                    | st.sampled_from(["{", "[", '{"ok": false}', "Error: x", "I'm sorry, but I can't help",
                                       "Max turns (3) exceeded", "Error code: 500"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                max_size=3), max_leaves=8)
_KEYS = ["gen_ai.operation.name", "gen_ai.tool.name", "gen_ai.tool.call.result", "gen_ai.tool.call.arguments",
         "gen_ai.output.messages", "gen_ai.input.messages", "gen_ai.response.finish_reasons", "error.type",
         "openinference.span.kind", "output.value", "input.value", "tool.name"]


@settings(max_examples=200, deadline=None)
@given(attrs=st.lists(st.dictionaries(st.sampled_from(_KEYS), _odd, max_size=6), min_size=1, max_size=4),
       statuses=st.lists(st.sampled_from(["OK", "ERROR", "UNSET"]), min_size=4, max_size=4),
       closed=st.sampled_from(["root-ended-and-quiet", "max-wait", "evicted"]))
def test_odd_values_never_raise_nor_fall_back(attrs, statuses, closed):
    spans = [span(i + 1, f"s{i}", a, parent=i if i else None, status=statuses[i],
                  exc=("E", "m") if statuses[i] == "ERROR" else None) for i, a in enumerate(attrs)]
    g = grade(spans, closed=closed, criteria=SCENARIO)
    assert "internal_error" not in g.details  # the rules read it, no safety net needed
    Grade.model_validate_json(g.to_json_bytes())
    assert g.verdict in ("failed", "passed", "inconclusive")
    assert not any(isinstance(v, float) and math.isnan(v) for v in g.details.values())
