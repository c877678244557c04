"""Running a reproduction: N attempts of the repository's harness, each in a fresh working copy, each waited for
until its own trace is graded — used by the reproduce stage, and by the fix stage to prove a patch.

Per attempt: a working copy at the revision (made by the caller's ``checkout``), the harness run at most once
(:func:`pipeline.harness.run_once`, adopted after a worker crash), then the journal is polled for the grade of the
trace the attempt exported (its resource attributes carry the attempt id, see :mod:`pipeline.reproduction`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog

from pipeline.contract import Harness
from pipeline.grading.model import FailureSignature
from pipeline.grading.signature import same_failure
from pipeline.harness import run_once
from pipeline.journal import Journal
from pipeline.reproduction import Attempt, Scrubber, harness_env

log = structlog.get_logger(__name__)


@dataclass
class AttemptsResult:
    attempts: list[Attempt]
    stdout: list[dict[str, Any]]  # per attempt: {"attempt": n, "json": ... | "text": ...}
    stderr: str


class Reproducer:
    """``journal``: where attempts' grades appear; ``trace_wait_s``: how long after an attempt its grade is waited
    for; ``otlp_endpoint``: given to the harness; ``pass_env``: variables passed from the worker's environment."""

    def __init__(self, journal: Journal, *, otlp_endpoint: str, pass_env: list[str], trace_wait_s: float,
                 poll_s: float = 1.0) -> None:
        self.journal = journal
        self.otlp_endpoint = otlp_endpoint
        self.pass_env = pass_env
        self.trace_wait_s = trace_wait_s
        self.poll_s = poll_s
        self.scrubber = Scrubber([os.environ[k] for k in pass_env if os.environ.get(k)])

    async def run(self, *, harness: Harness, checkout: Callable[[Path], Awaitable[None]], work_dir: Path,
                  attempts: int, attempt_prefix: str, run_id: str, trace_id: str, task: str,
                  original: FailureSignature | None, extra_env: dict[str, str] | None = None) -> AttemptsResult:
        """Run the attempts one after another (a repository's harness is rarely safe to run concurrently)."""
        out: list[Attempt] = []
        stdout: list[dict[str, Any]] = []
        stderr: list[str] = []
        for n in range(1, attempts + 1):
            attempt_id = f"{attempt_prefix}-a{n}"
            directory = work_dir / f"attempt-{n}"
            copy = directory / "repo"
            proc_dir = directory / "process"
            if not (proc_dir / "process.json").exists() and not (proc_dir / "result.json").exists():
                await checkout(copy)
            env = harness_env(os.environ, harness.env, self.pass_env, task=task, attempt=n, attempt_id=attempt_id,
                              parent_run_id=run_id, reproduction_of=trace_id, otlp_endpoint=self.otlp_endpoint,
                              extra=extra_env)
            result = await run_once(harness.command, cwd=copy / harness.workdir, env=env,
                                    timeout_s=harness.timeout_s, directory=proc_dir, setup=harness.setup)
            attempt = Attempt(n=n, attempt_id=attempt_id, exit_code=result.exit_code, timed_out=result.timed_out,
                              error=result.error, duration_s=result.duration_s, adopted=result.adopted)
            if result.exit_code is not None and result.setup_exit in (None, 0):
                await self._await_grade(attempt, run_id, original)
            log.info("reproduce.attempt", trace_id=trace_id, attempt=n, exit_code=attempt.exit_code,
                     timed_out=attempt.timed_out, verdict=attempt.verdict, reproduced=attempt.reproduced)
            out.append(attempt)
            stdout.append({"attempt": n, **_stdout_doc(self.scrubber.text(result.stdout.decode("utf-8", "replace")))})
            stderr.append(f"===== attempt {n} (exit {attempt.exit_code}{', timed out' if attempt.timed_out else ''})"
                          f" =====\n{self.scrubber.text(result.stderr.decode('utf-8', 'replace'))}")
        return AttemptsResult(out, stdout, "\n".join(stderr))

    async def _await_grade(self, attempt: Attempt, run_id: str, original: FailureSignature | None) -> None:
        deadline = time.monotonic() + self.trace_wait_s
        while True:
            events = await self.journal.events(parent_run_id=run_id)
            graded = [e for e in events if e.phase == "grade" and e.details.get("attempt_id") == attempt.attempt_id
                      and e.status != "error"]
            if graded:
                # Several traces of one attempt: it reproduces if one of them shows the failure.
                best = next((e for e in graded if _matches(e.details, original)), graded[0])
                attempt.trace_id = best.trace_id
                attempt.verdict = best.details.get("verdict", best.status)
                attempt.category = best.details.get("category")
                attempt.signature = best.details.get("signature")
                attempt.summary = best.reason
                attempt.reproduced = _matches(best.details, original)
                return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(self.poll_s)


def _matches(details: dict[str, Any], original: FailureSignature | None) -> bool:
    if original is None or details.get("verdict") != "failed" or not details.get("signature"):
        return False
    return same_failure(original, FailureSignature.model_validate(details["signature"]))


def _stdout_doc(text: str) -> dict[str, Any]:
    stripped = text.strip()
    if stripped:
        try:
            return {"json": json.loads(stripped)}
        except ValueError:
            pass
    return {"text": text}
