"""The loop on the example agent repository (``examples/support-agent``), end to end with real parts, embedded
default: the agent — the real OpenAI SDK and OpenTelemetry instrumentation — exports into ``trace-source serve``;
the run is graded, seeded from the repository's contract, and reproduced with the repository's own harness, whose
attempts export their own traces back into the same serve and are graded by the same grader.

The model is the example's local fake (``examples/support-agent/fake_model.py``): a paid LLM provider cannot run
here. The repository is a copy of the example in its own git repository (so revisions and working copies are
real); its harness command is wrapped to count its runs in a marker file.
"""

from __future__ import annotations

import json

import pytest

from assembler_support import wait_for
from example_repo import (FAILING_TASK, PASSING_TASK, fake_model, git, make_repository, production_run, reproduced,
                          runs_of, serve_args, worker_env)
from loop_support import journal, phase_events
from serve_proc import CliProcess, ServeProcess


@pytest.fixture(scope="module")
def fake():
    with fake_model() as server:
        yield server


def test_a_failure_is_graded_seeded_and_reproduced_by_the_harness_and_a_success_is_not(tmp_path, fake):
    repo = make_repository(tmp_path)
    state = tmp_path / "state"
    marker = tmp_path / "harness-runs"
    with ServeProcess(state, *serve_args(repo), env=worker_env(fake, marker)) as serve:
        failing = production_run(repo, fake, serve.http_url, FAILING_TASK)
        passing = production_run(repo, fake, serve.http_url, PASSING_TASK)
        wait_for(lambda: reproduced(state, failing["trace_id"]), "the reproduction", timeout_s=300)
        wait_for(lambda: phase_events(state, "grade", passing["trace_id"]), "the passing run's grade")
    trace = failing["trace_id"]
    [graded] = phase_events(state, "grade", trace)
    assert graded.status == "failed" and graded.details["category"] == "tool_error"
    assert graded.details["signature"] == {"category": "tool_error", "tool": "lookup_order",
                                           "error_type": "OrderNotFound"}
    [seeded] = phase_events(state, "seed", trace)
    assert seeded.status == "seeded"
    seed = json.loads((state / "seeds" / trace / "seed.json").read_text())
    assert seed["task"] == FAILING_TASK and seed["templates"]["order.json"]["order_id_as_given"] == "a-1002"
    scenario = (state / "seeds" / trace / "scenario.md").read_text()
    assert FAILING_TASK in scenario and "tool `refund_order` succeeds" in scenario

    done = reproduced(state, trace)
    assert done.status == "reproduced", done
    manifest = json.loads((state / "runs" / trace / "manifest.json").read_text())
    assert manifest["status"] == "reproduced" and manifest["attempts_planned"] == 3
    assert manifest["command"] == ["python", "count_runs.py"]
    assert manifest["revision"] == git("rev-parse", "HEAD", cwd=repo).strip()
    attempts = manifest["attempts"]
    assert [a["n"] for a in attempts] == [1, 2, 3] and all(a["exit_code"] == 0 for a in attempts)
    assert all(a["reproduced"] and a["verdict"] == "failed" and a["category"] == "tool_error" for a in attempts)
    assert len({a["trace_id"] for a in attempts} | {trace}) == 4  # each attempt its own trace
    assert runs_of(marker) == ["1", "2", "3"]
    stdout = json.loads((state / "runs" / trace / "stdout.json").read_text())
    assert [s["attempt"] for s in stdout] == [1, 2, 3] and all("answer" in s["json"] for s in stdout)
    assert (state / "runs" / trace / "stderr.log").exists()
    # The attempts' own runs: graded by the same grader, as children of the reproduced run, and never reproduced.
    children = [e for e in journal(state) if e.run.parent_run_id == graded.run.run_id and e.phase == "grade"]
    assert sorted(e.trace_id for e in children) == sorted(a["trace_id"] for a in attempts)
    assert {e.run.trigger for e in children} == {"reproduction"} and {e.run.policy for e in children} == {"grade"}
    assert not any(phase_events(state, "seed", e.trace_id) for e in children)
    # The passing run was graded and never seeded or reproduced.
    assert [e.status for e in phase_events(state, "grade", passing["trace_id"])] == ["passed"]
    assert phase_events(state, "seed", passing["trace_id"]) == []


def test_a_flaky_failure_is_flaky_and_missing_evidence_blocks_seeding(tmp_path, fake):
    repo = make_repository(tmp_path)
    state = tmp_path / "state"
    marker = tmp_path / "harness-runs"
    env = worker_env(fake, marker, SUPPORT_AGENT_TEMPERATURE="0.7")
    args = serve_args(repo)
    args[args.index("--pass-env") + 1] += ",SUPPORT_AGENT_TEMPERATURE"
    with ServeProcess(state, *args, env=env) as serve:
        # The fake model tidies the order id on even seeds: attempts 1 and 3 show the bug, attempt 2 does not.
        flaky = production_run(repo, fake, serve.http_url, FAILING_TASK, SUPPORT_AGENT_TEMPERATURE="0.7")
        blind = production_run(repo, fake, serve.http_url, FAILING_TASK,
                               OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="no_content")
        wait_for(lambda: reproduced(state, flaky["trace_id"]) and phase_events(state, "seed", blind["trace_id"]),
                 "the flaky reproduction and the blind run's seed phase", timeout_s=300)
    done = reproduced(state, flaky["trace_id"])
    assert done.status == "flaky" and "2 of 3" in done.reason
    manifest = json.loads((state / "runs" / flaky["trace_id"] / "manifest.json").read_text())
    assert [a["reproduced"] for a in manifest["attempts"]] == [True, False, True]

    [blocked] = phase_events(state, "seed", blind["trace_id"])
    assert blocked.status == "blocked" and blocked.reason.startswith("missing evidence: task input")
    seed = json.loads((state / "seeds" / blind["trace_id"] / "seed.json").read_text())
    missing = {m["item"]: m["how"] for m in seed["missing"]}
    assert "task input" in missing and "arguments of tool lookup_order" in missing
    assert "{{ tool.lookup_order.arguments.order_id }}" in missing
    assert all(how for how in missing.values())
    assert reproduced(state, blind["trace_id"]) is None
    assert len(runs_of(marker)) == 3  # only the flaky run's attempts ran the harness


def test_the_harness_runs_exactly_the_planned_attempts_across_a_kill_9_and_a_replay(tmp_path, fake):
    repo = make_repository(tmp_path)
    state = tmp_path / "state"
    marker = tmp_path / "harness-runs"
    env = worker_env(fake, marker)
    # A short lease: the restarted serve (another lease owner) takes the killed one's claim over once it expires.
    serve = ServeProcess(state, *serve_args(repo, "--lease-s", "6", "--trace-wait-s", "30"), env=env).start()
    try:
        failing = production_run(repo, fake, serve.http_url, FAILING_TASK)
        wait_for(lambda: len(runs_of(marker)) >= 2, "the second attempt to start", timeout_s=300)
    finally:
        serve.kill()  # kill -9 during an attempt; the attempt's process group lives on
    with ServeProcess(state, *serve_args(repo, "--lease-s", "6", "--trace-wait-s", "30"), env=env) as serve:
        wait_for(lambda: reproduced(state, failing["trace_id"]), "the reproduction after the restart", timeout_s=300)
        # Redeliver the seeds topic into a fresh consumer group: done keys are re-published, never re-run.
        replay = CliProcess(tmp_path / "replay.log", [
            "worker", "reproduce", "--state-dir", str(state), "--consumer-group", "replay", "--metrics-port", "0",
            "--execution-policy", "reproduce", *serve_args(repo)[:2], "--otlp-endpoint", serve.http_url],
            env=env)
        replay.launch("stage.serving", 60)
        try:
            wait_for(lambda: any(e.get("event") == "stage.republished" for e in replay.events()),
                     "the replayed reproduction to be re-published", timeout_s=120)
        finally:
            replay.stop()
    assert sorted(runs_of(marker)) == ["1", "2", "3"], "a harness attempt ran twice (or not at all)"
    events = phase_events(state, "reproduce", failing["trace_id"])
    assert len(events) == 1 and events[0].status in ("reproduced", "flaky")
    assert len({e.event_id for e in journal(state)}) == len(journal(state))
