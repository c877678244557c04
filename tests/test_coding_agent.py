"""The real coding-agent CLI of the fix stage's tests — aider from PyPI, run exactly as ``--fix-command``
(``tests/coding_agent.py``) — against the local fake model (``tests/fake_coder.py``, a fake of a paid remote
service) on a tiny git repository."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from coding_agent import AIDER, MODEL, fix_command, write_model_metadata
from fake_coder import FakeCoder

BUGGY = "def add(a, b):\n    return a - b\n\n\ndef double(x):\n    return add(x, x)\n"
FIXED = "def add(a, b):\n    return a + b\n\n\ndef double(x):\n    return add(x, x)\n"
PROMPT = "# Fix a reproduced agent failure\n\n`double(2)` returned 0 instead of 4: `add` subtracts.\n"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=T", "-c", "user.email=t@example.invalid", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


def _run_fix_command(tmp_path: Path, edits: dict[str, tuple[str, str]]) -> tuple[subprocess.CompletedProcess,
                                                                                  Path, FakeCoder]:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "--quiet", "-b", "main")
    (repo / "calc.py").write_text(BUGGY)
    (repo / "README.md").write_text("calc\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "--quiet", "-m", "calc")
    prompt = tmp_path / "prompt.md"
    prompt.write_text(PROMPT)
    (tmp_path / "home").mkdir()
    # What the fix stage gives the command: a restricted environment with the failure context in files.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
           "TRACE_SOURCE_FIX_PROMPT": str(prompt), "TRACE_SOURCE_FIX_USAGE": str(tmp_path / "usage.json")}
    with FakeCoder(edits) as model:
        command = fix_command(model.base_url, write_model_metadata(tmp_path / "model.json"))
        proc = subprocess.run(["/bin/sh", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)
    return proc, repo, model


def test_aider_applies_the_models_fix_and_reports_usage(tmp_path: Path) -> None:
    assert AIDER.exists(), "aider is missing: run `make test` or `python tests/coding_agent.py install`"
    proc, repo, model = _run_fix_command(tmp_path, {"calc.py": ("    return a - b\n", "    return a + b\n")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (repo / "calc.py").read_text() == FIXED
    # Only the fix is changed, uncommitted; aider's own files are untracked scratch (.aider*).
    changed = [line for line in _git(repo, "status", "--porcelain").splitlines() if ".aider" not in line]
    assert changed == [" M calc.py"]
    assert len(_git(repo, "log", "--oneline").splitlines()) == 1
    # The model got the failure context as the task, and nothing was fetched from the internet.
    assert any(PROMPT.strip() in str(m["content"]) for r in model.requests for m in r["messages"]
               if m["role"] == "user")
    assert "githubusercontent" not in proc.stdout + proc.stderr
    usage = json.loads((tmp_path / "usage.json").read_text())
    assert usage["model"] == MODEL and usage["requests"] == len(model.requests) >= 1
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0 and usage["cost_usd"] > 0


def test_aider_leaves_the_file_alone_when_the_edit_does_not_match(tmp_path: Path) -> None:
    proc, repo, model = _run_fix_command(tmp_path, {"calc.py": ("    return a * b\n", "    return a + b\n")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (repo / "calc.py").read_text() == BUGGY
    assert "SearchReplaceNoExactMatch" in str(model.requests[-1]["messages"][-1]["content"])  # aider said so
    assert [line for line in _git(repo, "status", "--porcelain").splitlines() if ".aider" not in line] == []
