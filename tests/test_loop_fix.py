"""The fix phase on the example agent, embedded default, with real parts: the example repository in git with a real
git remote (a bare repository), a scripted fix command (a plain program standing in for a coding agent: the
end-to-end test with a real coding-agent CLI is in tests/test_loop_fix_agent.py), the example's own tests as the
validation command, the reproduction re-run with the patched code, and ``--pr-command`` opening the pull request.

Negative paths end in the right status with the right artifacts: external execution not allowed, a fix that changes
nothing, one that breaks validation, one that passes validation but not the reproduction (never published), no
remote, no forge token. Idempotency: redelivering the reproductions topic into a fresh consumer group runs no new
fix attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assembler_support import wait_for
from example_repo import FAILING_TASK, fake_model, git, make_repository, production_run, runs_of, worker_env
from loop_support import phase_events
from serve_proc import CliProcess, ServeProcess

#: A stand-in coding agent: applies one edit to the repository, chosen by FIXER_MODE, and counts its runs.
FIXER = r'''
import json, os, pathlib, sys
with open(os.environ["FIXER_RUNS"], "a") as f:
    f.write(os.environ.get("TRACE_SOURCE_FIX_ATTEMPT", "?") + "\n")
prompt = pathlib.Path(os.environ["TRACE_SOURCE_FIX_PROMPT"]).read_text()
assert "OrderNotFound" in prompt and "lookup_order" in prompt, "the failure context is in the prompt"
orders = pathlib.Path("support_agent/orders.py")
mode = os.environ["FIXER_MODE"]
if mode == "fix":
    orders.write_text(orders.read_text().replace("    return order_id\n", "    return order_id.upper()\n", 1))
elif mode == "break":
    orders.write_text(orders.read_text().replace("def normalize_order_id", "def normalise_order_id", 1))
elif mode == "cosmetic":
    orders.write_text("# Order lookups.\n" + orders.read_text())
pathlib.Path(os.environ["TRACE_SOURCE_FIX_USAGE"]).write_text(json.dumps(
    {"model": "scripted", "input_tokens": 10, "output_tokens": 2}))
'''

#: A stand-in for `gh pr create`: records its environment and prints the pull request's URL.
PR_COMMAND = r'''
import json, os
with open(os.environ["PR_LOG"], "a") as f:
    f.write(json.dumps({k: os.environ[k] for k in ("TRACE_SOURCE_FIX_BRANCH", "TRACE_SOURCE_PR_TITLE",
                                                   "TRACE_SOURCE_PR_BODY", "TRACE_SOURCE_PR_BASE")}) + "\n")
print("Creating draft pull request...")
print("https://forge.example.invalid/acme/support-agent/pull/7")
'''


@pytest.fixture(scope="module")
def fake():
    with fake_model() as server:
        yield server


class Setup:
    def __init__(self, tmp_path: Path, fake, mode: str, *, remote: bool = True) -> None:
        self.repo = make_repository(tmp_path)
        if not remote:
            git("remote", "remove", "origin", cwd=self.repo)
        self.origin = tmp_path / "origin.git"
        self.state = tmp_path / "state"
        self.fixer_runs = tmp_path / "fixer-runs"
        self.harness_runs = tmp_path / "harness-runs"
        self.pr_log = tmp_path / "pr-log"
        (tmp_path / "fixer.py").write_text(FIXER)
        (tmp_path / "pr.py").write_text(PR_COMMAND)
        self.env = worker_env(fake, self.harness_runs, FIXER_MODE=mode, FIXER_RUNS=str(self.fixer_runs),
                              PR_LOG=str(self.pr_log))
        self.args = ["--repo", str(self.repo), "--execution-policy", "fix",
                     "--pass-env", "OPENAI_BASE_URL,HARNESS_RUNS,FIXER_MODE,FIXER_RUNS,PR_LOG",
                     "--attempts", "2", "--trace-wait-s", "60", "--max-fix-attempts", "2",
                     "--fix-command", f"{sys.executable} {tmp_path / 'fixer.py'}",
                     "--validation-command", f"{sys.executable} -m pytest -q -p no:cacheprovider tests",
                     "--pr-command", f"{sys.executable} {tmp_path / 'pr.py'}"]
        self.fake = fake

    def run(self, *extra: str, allow: bool = True, timeout_s: float = 420) -> tuple[str, list]:
        args = [*self.args, *extra, *(["--allow-external-execution"] if allow else [])]
        with ServeProcess(self.state, *args, env=self.env) as serve:
            trace = production_run(self.repo, self.fake, serve.http_url, FAILING_TASK)["trace_id"]
            wait_for(lambda: self.final(trace), "the fix phase's outcome", timeout_s=timeout_s)
        return trace, phase_events(self.state, "fix", trace)

    def final(self, trace: str):
        events = [e for e in phase_events(self.state, "fix", trace) if not e.status.startswith("attempt_")]
        return events[-1] if events else None

    def status(self, trace: str) -> dict:
        return json.loads((self.state / "fixes" / trace / "status.json").read_text())

    def remote_branches(self) -> list[str]:
        out = subprocess.run(["git", "branch", "--list", "trace-source/*"], cwd=self.origin, capture_output=True,
                             text=True, check=True).stdout
        return [b.strip() for b in out.splitlines()]


def test_a_proven_fix_is_pushed_to_its_branch_and_opened_as_a_pull_request(tmp_path, fake):
    s = Setup(tmp_path, fake, "fix")
    trace, events = s.run()
    assert [e.status for e in events] == ["attempt_proven", "pr_opened"]
    final = events[-1]
    assert final.details["pr_url"] == "https://forge.example.invalid/acme/support-agent/pull/7"
    branch = final.details["branch"]
    [fix_key] = {e.stage_key for e in events}
    assert branch == f"trace-source/fix-{fix_key[:12]}"
    assert s.remote_branches() == [branch]
    commit = git("rev-parse", branch, cwd=s.origin).strip()
    assert commit == final.details["commit"]
    assert git("diff", "--name-only", f"{commit}~1", commit, cwd=s.origin).split() == ["support_agent/orders.py"]
    assert "return order_id.upper()" in git("show", f"{commit}:support_agent/orders.py", cwd=s.origin)
    message = git("log", "-1", "--format=%an <%ae>%n%B", commit, cwd=s.origin)
    assert message.startswith("trace-source <") and f"Trace-Id: {trace}" in message
    assert git("rev-parse", "main", cwd=s.origin).strip() != commit  # never pushed to the default branch

    status = s.status(trace)
    assert status["status"] == "pr_opened" and status["files"] == ["support_agent/orders.py"]
    [attempt] = status["attempts"]
    assert attempt["outcome"] == "proven" and attempt["validation_exit_code"] == 0
    assert attempt["reproduction"]["failing"] == 0 and attempt["reproduction"]["graded"] == 2
    assert attempt["usage"] == {"model": "scripted", "input_tokens": 10, "output_tokens": 2}
    body = (s.state / "fixes" / trace / "pr-details.md").read_text()
    assert "| before" in body and "| 2 | 2 |" in body and "| after" in body and "| 2 | 0 |" in body
    assert "support_agent/orders.py" in body and "OrderNotFound" in body
    [pr] = [json.loads(line) for line in s.pr_log.read_text().splitlines()]
    assert pr["TRACE_SOURCE_FIX_BRANCH"] == branch and pr["TRACE_SOURCE_PR_BASE"] == "main"
    assert Path(pr["TRACE_SOURCE_PR_BODY"]).read_text() == body
    assert runs_of(s.fixer_runs) == ["1"]
    shown = subprocess.run([str(Path(sys.executable).with_name("trace-source")), "status", "--state-dir",
                            str(s.state), trace], capture_output=True, text=True)
    assert "pull request: https://forge.example.invalid/acme/support-agent/pull/7" in shown.stdout

    # Redeliver the reproductions topic into a fresh consumer group: no new attempt, no second pull request.
    replay = CliProcess(tmp_path / "replay.log", [
        "worker", "fix", "--state-dir", str(s.state), "--consumer-group", "replay", "--metrics-port", "0",
        *s.args, "--allow-external-execution"], env=s.env)
    replay.launch("stage.serving", 60)
    try:
        wait_for(lambda: any(e.get("event") == "stage.republished" for e in replay.events()), "the re-publication")
    finally:
        replay.stop()
    assert runs_of(s.fixer_runs) == ["1"] and len(s.pr_log.read_text().splitlines()) == 1
    assert len([e for e in phase_events(s.state, "fix", trace) if e.status == "pr_opened"]) == 1


def test_without_external_execution_the_run_is_blocked_with_the_context_to_fix_it_by_hand(tmp_path, fake):
    s = Setup(tmp_path, fake, "fix")
    trace, events = s.run(allow=False)
    assert [e.status for e in events] == ["blocked"] and "external execution not allowed" in events[0].reason
    status = s.status(trace)
    assert "--allow-external-execution" in status["how"]
    assert set(status["context"]) == {"grade", "scenario", "seed", "reproduction"}
    assert all(Path(p).exists() for p in status["context"].values())
    assert runs_of(s.fixer_runs) == [] and s.remote_branches() == []


def test_a_fix_command_that_changes_nothing_exhausts_the_budget(tmp_path, fake):
    s = Setup(tmp_path, fake, "nothing")
    trace, events = s.run()
    assert [e.status for e in events] == ["attempt_no_change", "attempt_no_change", "budget_exhausted"]
    status = s.status(trace)
    assert [a["outcome"] for a in status["attempts"]] == ["no_change", "no_change"] and status["patch"] is None
    assert runs_of(s.fixer_runs) == ["1", "2"] and s.remote_branches() == []
    assert (s.state / "fixes" / trace / "pr-details.md").exists()


def test_a_fix_that_breaks_validation_ends_validation_failed_with_its_patch(tmp_path, fake):
    s = Setup(tmp_path, fake, "break")
    trace, events = s.run("--max-fix-attempts", "1")
    assert [e.status for e in events] == ["attempt_validation_failed", "validation_failed"]
    [attempt] = s.status(trace)["attempts"]
    assert attempt["validation_exit_code"] != 0 and "normalize_order_id" in attempt["validation_output"]
    patch = (s.state / "fixes" / trace / "repo.patch").read_text()
    assert "normalise_order_id" in patch
    assert s.remote_branches() == []


def test_a_fix_that_passes_validation_but_not_the_reproduction_is_not_published(tmp_path, fake):
    s = Setup(tmp_path, fake, "cosmetic")
    trace, events = s.run("--max-fix-attempts", "1")
    assert [e.status for e in events] == ["attempt_still_failing", "budget_exhausted"]
    [attempt] = s.status(trace)["attempts"]
    assert attempt["validation_exit_code"] == 0 and attempt["reproduction"]["failing"] == 2
    assert s.remote_branches() == [] and not s.pr_log.exists()


def test_a_proven_fix_without_a_remote_or_a_forge_token_is_blocked_with_the_patch(tmp_path, fake):
    s = Setup(tmp_path / "a", fake, "fix", remote=False)
    trace, events = s.run()
    assert events[-1].status == "blocked" and "no remote 'origin'" in events[-1].reason
    status = s.status(trace)
    assert status["commit"] and "git" in status["how"] and status["patch"] == f"fixes/{trace}/repo.patch"
    assert "return order_id.upper()" in (s.state / status["patch"]).read_text()

    t = Setup(tmp_path / "b", fake, "fix")
    t.args = [a for a in t.args if a not in ("--pr-command", t.args[t.args.index("--pr-command") + 1])]
    os.environ.pop("TRACE_SOURCE_FORGE_TOKEN", None)
    trace, events = t.run("--forge", "gitea", "--forge-api-url", "http://127.0.0.1:9/api/v1")
    assert events[-1].status == "blocked" and "forge token missing" in events[-1].reason
    assert "TRACE_SOURCE_FORGE_TOKEN" in t.status(trace)["how"]
    assert t.remote_branches() == []
