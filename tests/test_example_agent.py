"""The example agent repository (``examples/support-agent/``) end to end with real parts: its own headless harness
(the contract's command, run as a process with the environment a reproduction attempt gets), the real OpenAI SDK and
OpenTelemetry instrumentation exporting OTLP/HTTP into a real ``trace-source serve`` (embedded default), and the
envelopes the assembler writes to ``<state_dir>/traces/``.

The model is the example's local fake (``examples/support-agent/fake_model.py``), a stand-in for a paid LLM provider,
which cannot run here. The agent's bug (``normalize_order_id`` does not upper-case, so ``a-1002`` is not found):

* failing task: a refund of ``a-1002`` -> ``lookup_order`` raises ``OrderNotFound``, no refund, an apology;
* passing task: a refund of ``A-1001`` -> lookup, refund, confirmation;
* content capture off -> the run is there (spans, tool names, errors) but no task, messages or tool arguments;
* flaky: the failing task at temperature 0.7 -> the fake model tidies the id on even seeds; the harness seeds with
  ``TRACE_SOURCE_ATTEMPT``, so attempts 1 and 3 fail and attempt 2 passes.

The example's own unit tests (its repository's validation command) run here too, so CI covers them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from normalizers.envelope import Envelope
from pipeline.contract import Contract, load_contract
from pipeline.reproduction import BASE_ENV, harness_env
from pipeline.seeding import build_seed
from loop_support import wait_envelope
from serve_proc import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "support-agent"
FAILING_TASK = "Hi, my blender from order a-1002 arrived broken. Please refund it."
PASSING_TASK = "Hi, the kettle from order A-1001 arrived broken. Please refund it."
LANDING_TIMEOUT_S = 60


def _load_fake_model() -> Any:
    spec = importlib.util.spec_from_file_location("support_agent_fake_model", EXAMPLE / "fake_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def contract() -> Contract:
    c = load_contract(EXAMPLE)
    assert c.ok and c.problems == [], c.problems
    return c


@pytest.fixture(scope="module")
def fake() -> Any:
    with _load_fake_model().FakeModel() as server:
        yield server


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with ServeProcess(tmp_path_factory.mktemp("example") / "state",
                      env={"TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": "1"}) as proc:
        yield proc


def worker_env(fake: Any, **extra: str) -> dict[str, str]:
    """The environment a trace-source worker would run the harness from: this interpreter's bin directory first on
    PATH (so the contract's ``python`` is the one with the agent's dependencies) and the fake model's URL."""
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**env, "OPENAI_BASE_URL": fake.base_url, **extra}


def run_harness(contract: Contract, env: dict[str, str]) -> dict[str, Any]:
    """The contract's command, verbatim, in the repository's working directory; its stdout JSON."""
    harness = contract.harness
    proc = subprocess.run(list(harness.command), cwd=EXAMPLE / harness.workdir, env=env, capture_output=True,
                          text=True, timeout=harness.timeout_s)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def original_run(contract: Contract, fake: Any, serve: Any, task: str, **extra: str) -> dict[str, Any]:
    """A run as a user starts it: the contract's env defaults, the task, the exporter pointed at ``serve``."""
    env = {**worker_env(fake), **contract.harness.env, "OPENAI_BASE_URL": fake.base_url, "AGENT_TASK": task,
           "OTEL_EXPORTER_OTLP_ENDPOINT": serve.http_url, **extra}
    return run_harness(contract, env)


def landed(serve: Any, trace_id: str) -> Envelope:
    """The assembled envelope of ``trace_id`` once the assembler wrote it with the run's root span."""
    return wait_envelope(serve, trace_id, lambda env: env.completeness.root_seen, LANDING_TIMEOUT_S)


def span(env: Envelope, name: str) -> Any:
    (found,) = [s for s in env.spans if s.name == name]
    return found


def assert_failed_lookup(env: Envelope, out: dict[str, Any], task: str) -> None:
    """The bug's signature in a trace: the lookup of the id as written raised OrderNotFound, nothing was refunded,
    and the run still ended normally with an apology."""
    run = env.agent_run
    assert run.task_input == task
    (tool,) = run.tool_calls
    assert (tool.name, tool.arguments) == ("lookup_order", {"order_id": "a-1002"})
    assert tool.result == {"error": "OrderNotFound", "message": "no order 'a-1002'"}
    assert tool.error and "no order 'a-1002'" in tool.error
    failed = span(env, "execute_tool lookup_order")
    assert failed.status_code == "ERROR" and failed.attributes["error.type"] == "OrderNotFound"
    assert [(e.span_id, e.type, e.fatal) for e in run.errors] == [(failed.span_id, "OrderNotFound", False)]
    assert span(env, "invoke_agent support-agent").status_code != "ERROR"
    assert run.final_output == out["answer"] and "couldn't" in run.final_output


def test_the_failing_task_records_the_failed_tool_call_and_the_answer(contract, fake, serve):
    out = original_run(contract, fake, serve, FAILING_TASK)
    assert [c["name"] for c in out["tool_calls"]] == ["lookup_order"]
    env = landed(serve, out["trace_id"])
    assert env.resource["service.name"] == "support-agent"
    assert env.agent_run.agent_name == "support-agent" and env.agent_run.dialects == ["otel-genai"]
    assert [s.name for s in env.spans].count("chat gpt-4o-mini") == 2
    assert_failed_lookup(env, out, FAILING_TASK)

    # The repository's seed template fills from this trace: the id as the run gave it, and what the lookup said.
    seed = build_seed(env, {"verdict": "failed"}, contract.scenario, contract.seeds)
    assert seed.missing == []
    template = seed.seed["templates"]["order.json"]
    assert template["order_id_as_given"] == "a-1002"
    assert template["lookup_result"] == {"error": "OrderNotFound", "message": "no order 'a-1002'"}
    assert seed.seed["task"] == FAILING_TASK


def test_the_passing_task_looks_up_refunds_and_confirms(contract, fake, serve):
    out = original_run(contract, fake, serve, PASSING_TASK)
    env = landed(serve, out["trace_id"])
    run = env.agent_run
    assert run.task_input == PASSING_TASK
    assert [(t.name, t.arguments, t.error) for t in run.tool_calls] == [
        ("lookup_order", {"order_id": "A-1001"}, None), ("refund_order", {"order_id": "A-1001", "amount": 39.9}, None)]
    assert run.tool_calls[1].result == {"refund_id": "R-A-1001-1", "order_id": "A-1001", "amount": 39.9,
                                        "status": "refunded"}
    assert run.errors == [] and all(s.status_code != "ERROR" for s in env.spans)
    assert run.final_output == out["answer"] == "Done: I refunded $39.90 for order A-1001 (refund R-A-1001-1)."
    assert len(run.llm_calls) == 3 and all(c.content_captured for c in run.llm_calls)


def test_with_content_capture_off_the_run_is_recorded_without_task_or_arguments(contract, fake, serve):
    out = original_run(contract, fake, serve, FAILING_TASK,
                       OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="no_content")
    assert out["tool_calls"][0]["error"].startswith("OrderNotFound")  # the same run, only less recorded
    env = landed(serve, out["trace_id"])
    run = env.agent_run
    assert run.task_input is None and run.final_output is None
    assert [(t.name, t.arguments, t.result) for t in run.tool_calls] == [("lookup_order", None, None)]
    assert span(env, "execute_tool lookup_order").attributes["error.type"] == "OrderNotFound"
    assert len(run.llm_calls) == 2 and not any(c.content_captured for c in run.llm_calls)
    recorded = json.dumps([s.attributes for s in env.spans])
    assert "blender" not in recorded and "gen_ai.tool.call.arguments" not in recorded

    # So seeding names what is missing instead of guessing.
    seed = build_seed(env, {"verdict": "failed"}, contract.scenario, contract.seeds)
    assert seed.seed is None
    assert [m.item for m in seed.missing] == ["task input", "arguments of tool lookup_order",
                                              "{{ tool.lookup_order.arguments.order_id }}",
                                              "{{ tool.lookup_order.result }}"]


def test_the_flaky_variant_fails_on_odd_attempts_only(contract, fake, serve):
    flaky = {"SUPPORT_AGENT_TEMPERATURE": "0.7"}
    original = original_run(contract, fake, serve, FAILING_TASK, **flaky)  # no seed: the id is copied as written
    original_env = landed(serve, original["trace_id"])
    assert_failed_lookup(original_env, original, FAILING_TASK)

    outcomes = {}
    for attempt in (1, 2, 3):
        env = harness_env(worker_env(fake, **flaky), contract.harness.env,
                          ["OPENAI_BASE_URL", "SUPPORT_AGENT_TEMPERATURE"], task=FAILING_TASK, attempt=attempt,
                          attempt_id=f"attempt-{attempt}", parent_run_id="run-example",
                          reproduction_of=original["trace_id"], otlp_endpoint=serve.http_url)
        out = run_harness(contract, env)
        envelope = landed(serve, out["trace_id"])
        assert envelope.resource["trace_source.trigger"] == "reproduction"
        assert envelope.resource["trace_source.reproduction.attempt"] == str(attempt)
        assert envelope.resource["trace_source.reproduction.trace_id"] == original["trace_id"]
        assert envelope.agent_run.task_input == FAILING_TASK
        if envelope.agent_run.errors:
            assert_failed_lookup(envelope, out, FAILING_TASK)
            outcomes[attempt] = "failed"
        else:
            assert [t.name for t in envelope.agent_run.tool_calls] == ["lookup_order", "refund_order"]
            assert envelope.agent_run.tool_calls[0].arguments == {"order_id": "A-1002"}
            assert "refunded $89.00" in envelope.agent_run.final_output
            outcomes[attempt] = "passed"
    assert outcomes == {1: "failed", 2: "passed", 3: "failed"}
    seeds = [r.get("seed") for r in fake.requests if r.get("temperature") == 0.7]
    assert {1, 2, 3} <= set(seeds) and None in seeds  # the original run sent no seed; attempt n sent seed n


def test_the_examples_own_unit_tests_pass():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "examples/support-agent/tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
