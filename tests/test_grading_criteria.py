"""The success-criteria grammar of ``scenario.md`` (docs/grading.md "Success criteria") and the failure signature."""

from __future__ import annotations

import pytest

from pipeline.grading.criteria import Criterion, parse_criteria, parse_criterion
from pipeline.grading.model import FailureSignature
from pipeline.grading.signature import same_failure


@pytest.mark.parametrize("text, op, tool, needle, limit", [
    ("tool `refund_order` is called", "called", "refund_order", None, None),
    ("Tool refund_order was called at least once.", "called", "refund_order", None, None),
    ("The agent calls tool `lookup`", "called", "lookup", None, None),
    ("tool `refund_order` succeeds", "succeeds", "refund_order", None, None),
    ("tool 'refund_order' is called and succeeds.", "succeeds", "refund_order", None, None),
    ("the tool `refund_order` was called and succeeded", "succeeds", "refund_order", None, None),
    ("tool `delete_account` is not called", "not_called", "delete_account", None, None),
    ("tool `delete_account` is never called", "not_called", "delete_account", None, None),
    ("The agent does not call tool `delete_account`", "not_called", "delete_account", None, None),
    ("tool `search` is called at most 3 times", "at_most", "search", None, 3),
    ("tool `search` is called at most once", "at_most", "search", None, 1),
    ('the final output contains "refunded"', "contains", None, "refunded", None),
    ('The answer contains "A-1002".', "contains", None, "A-1002", None),
    ('the final output does not contain "error"', "not_contains", None, "error", None),
    ("no tool errors", "no_tool_errors", None, None, None),
    ("There are no tool errors.", "no_tool_errors", None, None, None),
])
def test_deterministic_forms(text, op, tool, needle, limit):
    c = parse_criterion(text)
    assert (c.kind, c.op, c.tool, c.needle, c.limit) == ("deterministic", op, tool, needle, limit)
    assert c.text == text


@pytest.mark.parametrize("text", [
    "the answer is polite",
    "tool `refund_order` is called with the right order id",  # more than the grammar says: the judge decides
    "the final output contains the refund amount",  # no quoted text
    "refund_order succeeds",  # no "tool"
    "no errors",
])
def test_everything_else_is_judged(text):
    assert parse_criterion(text) == Criterion(text)


def test_only_bullets_under_success_criteria_headings_count():
    scenario = """# Refunds
## Setup
- tool `setup_db` is called

## Success criteria (deterministic and judged)
- tool `refund_order` succeeds
* [ ] the reply
  names the order
1. no tool errors

### Details
- tool `audit` is called

## Expected behaviour
- tool `refund_order` is not called
"""
    assert [(c.text, c.kind) for c in parse_criteria(scenario)] == [
        ("tool `refund_order` succeeds", "deterministic"),
        ("the reply names the order", "judged"),
        ("no tool errors", "deterministic"),
        ("tool `audit` is called", "deterministic"),  # a sub-heading stays inside the section
    ]


def test_no_section_means_no_criteria():
    assert parse_criteria("# Refunds\n\n## Setup\n- tool `x` is called\n") == []


SIG = FailureSignature(category="tool_error", tool="refund_order", error_type="ConnectionError")


@pytest.mark.parametrize("other, same", [
    (SIG, True),
    (FailureSignature(category="tool_error", tool="refund_order"), True),  # error type unknown on one side
    (FailureSignature(category="tool_error"), True),
    (FailureSignature(category="tool_error", tool="refund_order", error_type="builtins.ConnectionError"), True),
    (FailureSignature(category="tool_error", tool="lookup_order", error_type="ConnectionError"), False),
    (FailureSignature(category="tool_error", tool="refund_order", error_type="TimeoutError"), False),
    (FailureSignature(category="false_success", tool="refund_order"), False),
])
def test_same_failure(other, same):
    assert same_failure(SIG, other) is same
    assert same_failure(other, SIG) is same  # symmetric
