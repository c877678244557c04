"""The agent's tool loop and the harness, against the local fake model (fake_model.py, loopback only)."""

import json

import openai
import pytest

from support_agent import harness
from support_agent.agent import SupportAgent
from support_agent.orders import OrderStore


def agent_for(fake, **kwargs):
    client = openai.OpenAI(base_url=fake.base_url, api_key="unused", max_retries=0)
    store = OrderStore.load()
    return SupportAgent(client, store, model="gpt-4o-mini", **kwargs), store


def test_a_refund_request_is_looked_up_refunded_and_confirmed(fake):
    agent, store = agent_for(fake)
    result = agent.run("Hi, the kettle from order A-1001 arrived broken. Please refund it.")
    assert [(s.name, s.arguments, s.error) for s in result.steps] == [
        ("lookup_order", {"order_id": "A-1001"}, None), ("refund_order", {"order_id": "A-1001", "amount": 39.9}, None)]
    assert result.steps[1].result["status"] == "refunded"
    assert "refunded $39.90" in result.answer
    assert [r["order_id"] for r in store.refunds] == ["A-1001"]
    assert result.trace_id is not None and len(result.trace_id) == 32


def test_a_status_question_gets_the_status_and_no_refund(fake):
    agent, store = agent_for(fake)
    result = agent.run("Where is my order #A1003?")
    assert [s.name for s in result.steps] == ["lookup_order"]
    assert result.answer == "Your order A-1003 (toaster) is shipped."
    assert store.refunds == []


def test_a_failing_tool_goes_back_to_the_model_and_the_run_still_answers(fake):
    agent, store = agent_for(fake)
    result = agent.run("Please refund order Z-9999.")
    (step,) = result.steps
    assert step.error.startswith("OrderNotFound") and step.result["error"] == "OrderNotFound"
    last = fake.requests[-1]["messages"][-1]
    assert last["role"] == "tool" and json.loads(last["content"]) == step.result
    assert "sorry" in result.answer.lower() and store.refunds == []


def test_sampling_parameters_are_sent_with_every_request(fake):
    agent, _ = agent_for(fake, temperature=0.7, seed=4)
    agent.run("Refund order A-1001 please")
    assert [(r["temperature"], r["seed"]) for r in fake.requests] == [(0.7, 4)] * 3
    agent, _ = agent_for(fake)
    fake.requests.clear()
    agent.run("Where is A-1003?")
    assert all("seed" not in r and r["temperature"] == 0 for r in fake.requests)


def test_the_seed_adds_orders_only_from_successful_recorded_lookups(tmp_path):
    seed = {"tool_calls": [
        {"name": "lookup_order", "arguments": {"order_id": "C-3001"}, "error": None,
         "result": {"order_id": "C-3001", "item": "lamp", "total": 12.0, "status": "delivered"}},
        {"name": "lookup_order", "arguments": {"order_id": "D-4001"}, "error": None,
         "result": json.dumps({"order_id": "D-4001", "item": "rug", "total": 80.0, "status": "shipped"})},
        {"name": "lookup_order", "arguments": {"order_id": "x"}, "error": "OrderNotFound",
         "result": {"error": "OrderNotFound", "message": "no order 'x'"}},
        {"name": "lookup_order", "arguments": {"order_id": "A-1001"}, "error": None,
         "result": {"order_id": "A-1001", "item": "changed", "total": 1.0, "status": "delivered"}},
        {"name": "refund_order", "arguments": {}, "error": None, "result": {"order_id": "E-5001"}}]}
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed))
    store = OrderStore.load()
    assert harness.apply_seed(store, path) == ["C-3001", "D-4001"]
    assert store.lookup_order("D-4001")["item"] == "rug"
    assert store.lookup_order("A-1001")["item"] == "electric kettle"  # the data file wins for known orders


def test_the_harness_needs_a_task(monkeypatch, capsys):
    monkeypatch.delenv("AGENT_TASK", raising=False)
    assert harness.main() == 2
    assert "AGENT_TASK" in capsys.readouterr().err


@pytest.mark.parametrize("env, seed", [({}, None), ({"TRACE_SOURCE_ATTEMPT": "3"}, 3),
                                       ({"TRACE_SOURCE_ATTEMPT": "3", "SUPPORT_AGENT_SEED": "8"}, 8)])
def test_the_sampling_seed_comes_from_the_environment(env, seed):
    assert harness._seed_from_env(env) == seed
