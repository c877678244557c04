"""The example agent repository (``examples/support-agent``) prepared for loop tests: a copy in a git repository of
its own with a bare ``origin`` (so revisions, working copies and pushes are real), its harness wrapped to count its
runs, the example's fake model (a stand-in for a paid LLM provider), and the agent's production runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from loop_support import phase_events

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "support-agent"
FAILING_TASK = "Hi, my blender from order a-1002 arrived broken. Please refund it."
PASSING_TASK = "Hi, the kettle from order A-1001 arrived broken. Please refund it."
FAST = {"TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": "1", "TRACE_SOURCE_ASSEMBLER_COMMIT_INTERVAL_S": "0.2"}
COUNTER = """import os, subprocess, sys
with open(os.environ["HARNESS_RUNS"], "a") as f:
    f.write(os.environ.get("TRACE_SOURCE_ATTEMPT", "-") + "\\n")
sys.exit(subprocess.call([sys.executable, "-m", "support_agent.harness"]))
"""


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_repository(tmp: Path) -> Path:
    """The example as a git repository of its own with a bare ``origin``; its harness counts its runs."""
    repo = tmp / "support-agent"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info"))
    (repo / "count_runs.py").write_text(COUNTER)
    harness = json.loads((repo / "trace-source" / "harness.json").read_text())
    harness["command"] = ["python", "count_runs.py"]
    (repo / "trace-source" / "harness.json").write_text(json.dumps(harness, indent=2))
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "user.name=dev", "-c", "user.email=dev@example.invalid", "commit", "-q", "-m", "support agent", cwd=repo)
    remote = tmp / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    git("remote", "add", "origin", str(remote), cwd=repo)
    git("push", "-q", "origin", "main", cwd=repo)
    return repo


def fake_model() -> Any:
    spec = importlib.util.spec_from_file_location("support_agent_fake_model", EXAMPLE / "fake_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeModel()


def worker_env(fake: Any, runs: Path, **extra: str) -> dict[str, str]:
    """The environment serve (the worker) runs with: this interpreter's bin first on PATH, so the contract's
    ``python`` has the agent's dependencies; the fake model's URL; where the harness counts its runs."""
    return {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "OPENAI_BASE_URL": fake.base_url, "HARNESS_RUNS": str(runs), **FAST, **extra}


def production_run(repo: Path, fake: Any, otlp_url: str, task: str, **extra: str) -> dict[str, Any]:
    """The agent run as it happens in production: its own command, exporting to trace-source."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "AGENT_TASK": task,
           "OPENAI_BASE_URL": fake.base_url, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "span_only", **extra}
    proc = subprocess.run([sys.executable, "-m", "support_agent.harness"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def serve_args(repo: Path, *extra: str) -> list[str]:
    return ["--repo", str(repo), "--execution-policy", "reproduce", "--pass-env", "OPENAI_BASE_URL,HARNESS_RUNS",
            "--attempts", "3", "--trace-wait-s", "90", *extra]


def runs_of(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def reproduced(state: Path, trace_id: str):
    events = phase_events(state, "reproduce", trace_id)
    return events[-1] if events else None
