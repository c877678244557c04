"""Run one real-instrumentation agent script (``tests/dialect_agents/*.py``, ``tests/interop/js/*.mjs``) as its own
process against ``trace-source serve`` and the fake model, and read the JSON report it prints (format:
``tests/dialect_agents/_common.py``). Shared by the dialect tests and the grading corpus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serve_proc import ServeProcess

SCRIPT_TIMEOUT_S = 180


@dataclass
class AgentOutput:
    """What one agent process reported and how long it took."""

    scenarios: dict[str, dict[str, Any]]
    span_exports: list[str]
    log_exports: list[str]
    seconds: float
    stderr: str


def executable(name: str) -> str:
    """``python`` -> this interpreter; other names from PATH (the test fails when missing)."""
    if name == "python":
        return sys.executable
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not on PATH; the Vercel AI SDK dialect test needs Node.js 20.6+ and npm",
                    pytrace=False)
    return found


def run_agent_script(command: tuple[str, ...], serve: ServeProcess, llm_base_url: str, *, model: str,
                     error_model: str, env: dict[str, str] | None = None, label: str = "") -> AgentOutput:
    """Run ``command`` (``("python" | "node", script, ...)``) with the harness variables of ``_common.py`` set and no
    ``OTEL_*`` / ``TRACELOOP_*`` / ``LANGFUSE_*`` variables of the caller; asserts it exits 0 with a report."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACELOOP_", "LANGFUSE_"))}
    child_env.update({
        "TRACE_SOURCE_OTLP_URL": serve.http_url,
        "FAKE_LLM_BASE_URL": llm_base_url,
        "DIALECT_MODEL": model,
        "DIALECT_ERROR_MODEL": error_model,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    })
    cmd = [executable(command[0]), *command[1:]]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=child_env, cwd=Path(command[1]).parent, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    seconds = time.monotonic() - started
    context = (f"{' '.join(cmd)} exited {proc.returncode} after {seconds:.1f}s\nstdout: {proc.stdout[-4000:]}\n"
               f"stderr: {proc.stderr[-6000:]}\nserve log:\n{serve.log_tail()}")
    assert proc.returncode == 0, context
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, context
    out = json.loads(lines[-1])
    print(f"[{label or Path(command[1]).stem}] agent process {seconds:.2f}s")
    return AgentOutput(out["scenarios"], out["span_exports"], out["log_exports"], seconds, proc.stderr)
