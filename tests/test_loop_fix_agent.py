"""The whole loop on the example agent with real parts throughout: the agent (OpenAI SDK + OpenTelemetry) → serve →
graded → seeded → reproduced by its harness → fixed by a real coding-agent CLI (aider from PyPI, tests/coding_agent.py)
whose model — a fake, since a paid provider cannot run here — answers with the edit that fixes the bug; validated by
the example's own tests; the fix proven by re-running the reproduction; pushed to a real self-hosted forge (Gitea,
built from the Go module proxy, tests/forge_harness.py) and opened there as a draft pull request through its REST API.

Idempotency under faults: serve is SIGKILLed right after Gitea created the pull request and before the result is
recorded (a proxy in front of Gitea's API kills it before passing the answer on); the restarted serve finds the
pull request by its head branch — no second pull request, branch or coding-agent run. Redelivering the
reproductions topic into a fresh consumer group runs nothing again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from assembler_support import wait_for
from coding_agent import AIDER, fix_command, write_model_metadata
from example_repo import FAILING_TASK, fake_model, git, make_repository, production_run, worker_env
from fake_coder import FakeCoder
from loop_support import phase_events
from pipeline.forge import git_auth_env
from serve_proc import CliProcess, ServeProcess

FIX = {"support_agent/orders.py": ("    return order_id\n", "    return order_id.upper()\n")}


class KillAfterCreate:
    """A pass-through proxy for Gitea's API that, the first time a pull request is created, kills ``victim`` with
    SIGKILL after Gitea answered and before the answer reaches the caller."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.victim: int | None = None
        self.killed = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, data, headers = resp.status, resp.read(), resp.headers
                except urllib.error.HTTPError as exc:
                    status, data, headers = exc.code, exc.read(), exc.headers
                if (self.command == "POST" and self.path.rstrip("/").endswith("/pulls") and status == 201
                        and proxy.victim and not proxy.killed):
                    proxy.killed = True
                    os.kill(proxy.victim, signal.SIGKILL)
                    return  # the caller is dead; the pull request exists
                self.send_response(status)
                for k in ("Content-Type",):
                    if headers.get(k):
                        self.send_header(k, headers[k])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"

    def __enter__(self) -> KillAfterCreate:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake():
    with fake_model() as server:
        yield server


def test_aider_fixes_the_bug_and_a_draft_pull_request_opens_on_gitea_once_across_a_kill(tmp_path, fake, gitea):
    assert AIDER.exists(), "aider is missing: run `make test` or `python tests/coding_agent.py install`"
    repo = make_repository(tmp_path)
    name = gitea.create_repo(f"support-agent-{tmp_path.name[-8:].replace('_', '-')}")
    git("remote", "set-url", "origin", gitea.clone_url(name), cwd=repo)
    gitea.push(repo, name, "main:refs/heads/main")
    state = tmp_path / "state"
    agent_runs = tmp_path / "agent-runs"
    with FakeCoder(FIX) as coder, KillAfterCreate(gitea.base_url) as proxy:
        # The harness's OPENAI_BASE_URL (the agent's fake model, passed with --pass-env) is not the coding agent's:
        # unset it, or litellm would prefer it to aider's --openai-api-base.
        command = f"unset OPENAI_BASE_URL; echo run >> {agent_runs}; " + fix_command(
            coder.base_url, write_model_metadata(tmp_path / "model.json"))
        env = worker_env(fake, tmp_path / "harness-runs", TRACE_SOURCE_FORGE_TOKEN=gitea.token)
        args = ["--repo", str(repo), "--execution-policy", "fix", "--allow-external-execution",
                "--pass-env", "OPENAI_BASE_URL,HARNESS_RUNS", "--attempts", "2", "--trace-wait-s", "60",
                "--fix-command", command, "--fix-timeout-s", "600",
                "--validation-command", "python -m pytest -q -p no:cacheprovider tests",
                "--forge", "gitea", "--forge-api-url", proxy.url, "--lease-s", "8"]
        serve = ServeProcess(state, *args, env=env).start()
        proxy.victim = serve.proc.pid
        trace = production_run(repo, fake, serve.http_url, FAILING_TASK)["trace_id"]
        wait_for(lambda: serve.proc.poll() is not None, "serve killed right after the pull request was created",
                 timeout_s=600)
        assert proxy.killed
        assert not [e for e in phase_events(state, "fix", trace) if e.status == "pr_opened"]
        with ServeProcess(state, *args, env=env) as serve:
            wait_for(lambda: [e for e in phase_events(state, "fix", trace) if e.status == "pr_opened"],
                     "the fix recorded after the restart", timeout_s=300)
            replay = CliProcess(tmp_path / "replay.log", ["worker", "fix", "--state-dir", str(state),
                                                           "--consumer-group", "replay", "--metrics-port", "0",
                                                           "--otlp-endpoint", serve.http_url, *args], env=env)
            replay.launch("stage.serving", 60)
            try:
                wait_for(lambda: any(e.get("event") == "stage.republished" for e in replay.events()),
                         "the re-publication")
            finally:
                replay.stop()

    [opened] = [e for e in phase_events(state, "fix", trace) if e.status == "pr_opened"]
    pulls = gitea.api("GET", f"/repos/{name}/pulls?state=all")[1]
    assert len(pulls) == 1, "a second pull request was opened"
    pull = pulls[0]
    branch = opened.details["branch"]
    assert pull["head"]["ref"] == branch and pull["base"]["ref"] == "main"
    assert pull["html_url"] == opened.details["pr_url"] and opened.details["draft"] is True
    assert pull["head"]["sha"] == opened.details["commit"]
    branches = [b["name"] for b in gitea.api("GET", f"/repos/{name}/branches")[1]]
    assert sorted(branches) == sorted(["main", branch])
    files = [f["filename"] for f in gitea.api("GET", f"/repos/{name}/pulls/{pull['number']}/files")[1]]
    assert files == ["support_agent/orders.py"]
    assert agent_runs.read_text().split() == ["run"], "the coding agent ran more than once"

    status = json.loads((state / "fixes" / trace / "status.json").read_text())
    assert status["status"] == "pr_opened" and status["pull_request"]["verified"] is True
    [attempt] = status["attempts"]
    assert attempt["outcome"] == "proven" and attempt["usage"]["model"] == "openai/fake-coder"
    assert attempt["reproduction"] == {**attempt["reproduction"], "failing": 0, "graded": 2}
    body = (state / "fixes" / trace / "pr-details.md").read_text()
    assert pull["body"] == body and "| 2 | 2 |" in body and "| 2 | 0 |" in body
    # The branch on the forge holds exactly the model's edit.
    fetched = tmp_path / "check"
    subprocess.run(["git", "clone", "-q", "--branch", branch, gitea.clone_url(name), str(fetched)], check=True,
                   env={**os.environ, **git_auth_env(gitea.clone_url(name), gitea.token)})
    orders = (fetched / "support_agent" / "orders.py").read_text()
    assert "    return order_id.upper()\n" in orders and orders.count("upper()") == 1


def test_reprocess_after_a_publishing_blocker_publishes_the_proven_fix_and_reuses_branch_and_pull_request(
        tmp_path, fake, gitea):
    from test_loop_fix import FIXER

    repo = make_repository(tmp_path)
    name = gitea.create_repo(f"support-agent-{tmp_path.name[-8:].replace('_', '-')}")
    git("remote", "set-url", "origin", gitea.clone_url(name), cwd=repo)
    gitea.push(repo, name, "main:refs/heads/main")
    state = tmp_path / "state"
    fixer_runs = tmp_path / "fixer-runs"
    (tmp_path / "fixer.py").write_text(FIXER)
    base_env = worker_env(fake, tmp_path / "harness-runs", FIXER_MODE="fix", FIXER_RUNS=str(fixer_runs))
    args = ["--repo", str(repo), "--execution-policy", "fix", "--allow-external-execution",
            "--pass-env", "OPENAI_BASE_URL,HARNESS_RUNS,FIXER_MODE,FIXER_RUNS", "--attempts", "1",
            "--trace-wait-s", "60", "--fix-command", f"python {tmp_path / 'fixer.py'}",
            "--forge", "gitea", "--forge-api-url", gitea.api_url]
    os.environ.pop("TRACE_SOURCE_FORGE_TOKEN", None)

    def fix_events(trace):
        return [e for e in phase_events(state, "fix", trace) if not e.status.startswith("attempt_")]

    with ServeProcess(state, *args, env=base_env) as serve:  # no forge token: proven, not published
        trace = production_run(repo, fake, serve.http_url, FAILING_TASK)["trace_id"]
        wait_for(lambda: fix_events(trace), "the fix phase's outcome", timeout_s=300)
    [blocked] = fix_events(trace)
    assert blocked.status == "blocked" and "forge token missing" in blocked.reason
    assert fixer_runs.read_text().split() == ["1"]

    env = {**base_env, "TRACE_SOURCE_FORGE_TOKEN": gitea.token}
    with ServeProcess(state, *args, env=env):
        for round_ in (1, 2):  # the blocker fixed; then once more, on purpose
            done = subprocess.run([str(_trace_source()), "reprocess", trace[:12], "--state-dir", str(state)],
                                  capture_output=True, text=True, env=env)
            assert done.returncode == 0 and "phase fix" in done.stdout, done.stderr
            wait_for(lambda: len(fix_events(trace)) == 1 + round_, f"reprocess {round_}", timeout_s=300)
    statuses = [e.status for e in fix_events(trace)]
    assert statuses == ["blocked", "pr_opened", "pr_opened"]
    first, second = fix_events(trace)[1:]
    assert first.details["pr_url"] == second.details["pr_url"] and first.details["branch"] == second.details["branch"]
    assert len(gitea.api("GET", f"/repos/{name}/pulls?state=all")[1]) == 1
    assert sorted(b["name"] for b in gitea.api("GET", f"/repos/{name}/branches")[1]) == sorted(
        ["main", first.details["branch"]])
    assert fixer_runs.read_text().split() == ["1"], "the proven fix was made again instead of reused"


def _trace_source():
    import sys
    from pathlib import Path

    return Path(sys.executable).with_name("trace-source")
