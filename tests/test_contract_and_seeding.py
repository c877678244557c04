"""The repository contract (``pipeline.contract``) and seeding (``pipeline.seeding``), pure: every contract problem
is named, secrets are refused, placeholders are filled from the trace with their JSON types, and missing evidence is
listed with how to capture it — never guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normalizers.agent_run import AgentRun, ToolCall
from normalizers.envelope import Completeness, Envelope, Source, envelope_idempotency_key
from pipeline.contract import load_contract, looks_secret, parse_harness, section
from pipeline.seeding import build_seed, fill_template, missing_evidence

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SCENARIO = """# Refunds

## Setup
Orders live in data/orders.json.

## Prompt
A customer asks for a refund of an order.

## Expected behavior
Look the order up, refund it, say so.

## Success criteria
- tool `refund_order` succeeds
- the answer is polite
"""


def make_env(*, task: str | None = "Refund order A-1002", tools: list[ToolCall] | None = None,
             resource: dict | None = None) -> Envelope:
    return Envelope(
        idempotency_key=envelope_idempotency_key(TRACE, []), trace_id=TRACE,
        source=Source(id="default", kind="otlp-http"), received_at_unix_nano=1, assembled_at_unix_nano=2,
        completeness=Completeness(root_seen=True, closed_reason="root-ended-and-quiet"),
        resource=resource or {"service.name": "support-agent"},
        agent_run=AgentRun(task_input=task, final_output="Refunded.", agent_name="support", tool_calls=tools if
                           tools is not None else [
                               ToolCall(span_id="a" * 16, name="lookup_order", arguments={"order_id": "a-1002"},
                                        result='{"ok": false, "error": "order a-1002 not found"}'),
                               ToolCall(span_id="b" * 16, name="lookup_order", arguments={"order_id": "A-1002"},
                                        result={"ok": True, "total": 42.5})]))


def write_contract(root: Path, harness: dict | str, scenario: str | None = SCENARIO, seeds: dict | None = None,
                   folder: str = "trace-source") -> Path:
    d = root / folder
    d.mkdir(parents=True)
    (d / "harness.json").write_text(harness if isinstance(harness, str) else json.dumps(harness))
    if scenario is not None:
        (d / "scenario.md").write_text(scenario)
    for name, template in (seeds or {}).items():
        (d / "seeds").mkdir(exist_ok=True)
        (d / "seeds" / name).write_text(template if isinstance(template, str) else json.dumps(template))
    return root


def test_a_good_contract_loads_with_its_harness_and_seeds(tmp_path):
    write_contract(tmp_path, {"command": "python -m agent.harness --quiet", "env": {"MODEL": "gpt-4o-mini"},
                              "timeout_s": 30, "setup": ["pip", "install", "-e", "."]},
                   seeds={"order.json": {"id": "{{ tool.lookup_order.arguments.order_id }}"}})
    c = load_contract(tmp_path)
    assert c.ok and c.problems == []
    assert c.harness.command == ("python", "-m", "agent.harness", "--quiet")
    assert c.harness.setup == ("pip", "install", "-e", ".") and c.harness.timeout_s == 30.0
    assert c.seeds == {"order.json": {"id": "{{ tool.lookup_order.arguments.order_id }}"}}
    assert section(c.scenario, "expected behaviour").startswith("Look the order up")  # "behavior" spelling too


def test_the_seed_systems_archal_folder_is_read_when_trace_source_is_absent(tmp_path):
    write_contract(tmp_path, {"command": ["./run.sh"]}, folder="archal")
    c = load_contract(tmp_path)
    assert c.ok and c.folder.name == "archal"


@pytest.mark.parametrize("harness, where, what", [
    ({}, "harness.json:command", "missing"),
    ({"command": []}, "harness.json:command", "is empty"),
    ({"command": 42}, "harness.json:command", "list of strings"),
    ({"command": "a", "timeout_s": 0}, "harness.json:timeout_s", "> 0"),
    ({"command": "a", "workdir": "../elsewhere"}, "harness.json:workdir", "inside the repository"),
    ({"command": "a", "env": {"API_TOKEN": "abc"}}, "harness.json:env.API_TOKEN", "holds a secret"),
    ({"command": "a", "env": {"NOTE": "key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"}},
     "harness.json:env.NOTE", "looks like a credential"),
    ("{not json", "harness.json", "not valid JSON"),
])
def test_every_harness_problem_is_named(tmp_path, harness, where, what):
    write_contract(tmp_path, harness)
    c = load_contract(tmp_path)
    assert not c.ok
    assert any(p.where.endswith(where) and what in p.what for p in c.fatal()), c.problems


def test_missing_folder_and_files_and_sections_are_reported(tmp_path):
    assert "no contract folder" in load_contract(tmp_path).problems[0].what
    write_contract(tmp_path, {"command": "a"}, scenario="## Setup\nnothing\n")
    c = load_contract(tmp_path)
    fatal = {p.what for p in c.fatal()}
    assert "no '## Success criteria' section" in fatal  # criteria are what grading and fixing check
    warnings = {p.what for p in c.problems if not p.fatal}
    assert "no '## Prompt' section" in warnings


def test_secret_looking_values_are_refused_and_plain_ones_kept():
    assert looks_secret("OPENAI_API_KEY", "x") and looks_secret("DB_PASSWORD", "hunter2")
    assert looks_secret("ANY", "Bearer abcdefghijklmnopqrstuvwxyz123456")
    assert looks_secret("MODEL", "gpt-4o-mini") is None and looks_secret("OPENAI_API_KEY", "") is None
    harness, problems = parse_harness({"command": "a", "env": {"MODEL": "m", "GITHUB_TOKEN": "ghp_x"}})
    assert harness is None and any("--pass-env GITHUB_TOKEN" in p.what for p in problems)


def test_placeholders_take_the_values_json_type_or_their_text_inside_a_string():
    env = make_env()
    filled, missing = fill_template({
        "order": "{{ tool.lookup_order.arguments }}",
        "id": "{{tool.lookup_order#2.arguments.order_id}}",
        "total": "{{ tool.lookup_order#2.result.total }}",
        "first_error": "{{ tool.lookup_order.result.error }}",
        "note": "trace {{ trace.trace_id }} asked: {{ run.task_input }} ({{ tool.lookup_order#2.result.ok }})",
        "service": ["{{ resource.service.name }}", 7]}, env, "seeds/t.json")
    assert missing == []
    assert filled == {"order": {"order_id": "a-1002"}, "id": "A-1002", "total": 42.5,
                      "first_error": "order a-1002 not found",
                      "note": f"trace {TRACE} asked: Refund order A-1002 (true)", "service": ["support-agent", 7]}


def test_placeholders_without_a_value_are_listed_with_how_to_capture_them_never_invented():
    env = make_env(tools=[ToolCall(span_id="c" * 16, name="refund_order", arguments=None)])
    filled, missing = fill_template({"a": "{{ tool.refund_order.arguments.amount }}",
                                     "b": "{{ tool.lookup_order.result }}", "c": "{{ resource.deployment.env }}",
                                     "d": "{{ run.user_id }}", "e": "{{ nonsense.x }}"}, env, "seeds/x.json")
    assert filled["a"] == "{{ tool.refund_order.arguments.amount }}"  # left as it was, not guessed
    by_item = {m.item: m for m in missing}
    assert "gen_ai.tool.call.arguments" in by_item["{{ tool.refund_order.arguments.amount }}"].how
    assert "0 call(s) of tool lookup_order" in by_item["{{ tool.lookup_order.result }}"].how
    assert "OTEL_RESOURCE_ATTRIBUTES" in by_item["{{ resource.deployment.env }}"].how
    assert "content" in by_item["{{ run.user_id }}"].how
    assert "unknown placeholder" in by_item["{{ nonsense.x }}"].how
    assert all(m.where == "seeds/x.json" for m in missing)


def test_a_trace_without_task_input_or_tool_arguments_is_missing_evidence():
    env = make_env(task=None, tools=[ToolCall(span_id="d" * 16, name="lookup_order", arguments=None)])
    items = [m.item for m in missing_evidence(env)]
    assert items == ["task input", "arguments of tool lookup_order"]
    result = build_seed(env, {"verdict": "failed"}, SCENARIO, {})
    assert result.seed is None and result.scenario is None and len(result.missing) == 2


def test_the_seed_carries_the_filled_templates_and_every_recorded_tool_call_and_the_scenario_the_run():
    env = make_env()
    grade = {"verdict": "failed", "category": "tool_error", "summary": "lookup_order failed for a-1002",
             "evidence": [{"span_id": "a" * 16, "kind": "tool_result", "name": "lookup_order",
                           "quote": "order a-1002 not found"}]}
    result = build_seed(env, grade, SCENARIO, {"order.json": {"id": "{{ tool.lookup_order.arguments.order_id }}"}})
    assert result.missing == []
    assert result.seed["templates"] == {"order.json": {"id": "a-1002"}}
    assert [c["arguments"] for c in result.seed["tool_calls"]] == [{"order_id": "a-1002"}, {"order_id": "A-1002"}]
    text = result.scenario
    assert "Refund order A-1002" in text and "order a-1002 not found" in text
    assert "Orders live in data/orders.json." in text and "tool `refund_order` succeeds" in text
    assert "**tool_error**" in text
