"""Running a repository's command (``pipeline.harness.run_once``) with real processes: isolation, the deadline that
kills the whole process group, and "at most once per attempt" — also across a worker killed with SIGKILL, whose
running attempt the next worker adopts instead of starting it again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipeline.harness import run_once

PY = sys.executable


def env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "ONLY_THIS": "yes"}


def count(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


async def test_output_exit_code_and_only_the_given_environment(tmp_path):
    os.environ["WORKER_SECRET"] = "must-not-leak"
    try:
        script = "import os,sys; print(sorted(k for k in os.environ if k in ('ONLY_THIS','WORKER_SECRET'))); " \
                 "print('oops', file=sys.stderr); sys.exit(3)"
        res = await run_once([PY, "-c", script], cwd=tmp_path, env=env(), timeout_s=30, directory=tmp_path / "a")
    finally:
        del os.environ["WORKER_SECRET"]
    assert res.exit_code == 3 and not res.timed_out and res.error is None and not res.adopted
    assert res.stdout.strip() == b"['ONLY_THIS']" and res.stderr.strip() == b"oops"


async def test_the_deadline_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    started = time.monotonic()
    res = await run_once([PY, "-c", script], cwd=tmp_path, env=env(), timeout_s=2, directory=tmp_path / "a")
    assert res.timed_out and res.exit_code is None
    assert time.monotonic() - started < 60  # killed at the deadline, not after the child's two minutes
    grandchild = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the harness's own child survived the deadline")


async def test_a_finished_attempt_is_never_run_again(tmp_path):
    marker = tmp_path / "ran"
    argv = [PY, "-c", f"open({str(marker)!r}, 'a').write('x\\n'); print('done')"]
    first = await run_once(argv, cwd=tmp_path, env=env(), timeout_s=30, directory=tmp_path / "a")
    again = await run_once(argv, cwd=tmp_path, env=env(), timeout_s=30, directory=tmp_path / "a")
    assert count(marker) == 1
    assert first.exit_code == again.exit_code == 0 and again.adopted and again.stdout == first.stdout


async def test_an_attempt_survives_its_worker_being_killed_and_is_adopted_not_restarted(tmp_path):
    marker = tmp_path / "ran"
    started = tmp_path / "started"
    harness = [PY, "-c", f"import time; open({str(started)!r}, 'w').write('1'); time.sleep(3); "
                         f"open({str(marker)!r}, 'a').write('x\\n')"]
    worker = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from pathlib import Path
        from pipeline.harness import run_once
        asyncio.run(run_once({harness!r}, cwd=Path({str(tmp_path)!r}), env={env()!r}, timeout_s=60,
                             directory=Path({str(tmp_path / "a")!r})))
    """)
    proc = subprocess.Popen([PY, "-c", worker])
    for _ in range(200):
        if started.exists():
            break
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the worker dies mid-attempt
    proc.wait()
    assert count(marker) == 0  # the harness is still running
    res = await run_once(harness, cwd=tmp_path, env=env(), timeout_s=60, directory=tmp_path / "a")
    assert res.adopted and res.exit_code == 0 and count(marker) == 1


async def test_setup_failure_and_a_missing_command_are_told_apart(tmp_path):
    res = await run_once([PY, "-c", "print(1)"], cwd=tmp_path, env=env(), timeout_s=30, directory=tmp_path / "a",
                         setup=[PY, "-c", "import sys; sys.exit(4)"])
    assert res.setup_exit == 4 and res.exit_code is None and "setup command exited 4" in res.error
    res = await run_once(["no-such-harness-xyz"], cwd=tmp_path, env=env(), timeout_s=30, directory=tmp_path / "b")
    assert res.exit_code == 127 and "command not found: no-such-harness-xyz" in res.error


async def test_cancelling_kills_the_attempt_and_forgets_it_so_it_starts_afresh(tmp_path):
    marker = tmp_path / "ran"
    argv = [PY, "-c", f"import time; open({str(marker)!r}, 'a').write('x\\n'); time.sleep(60)"]
    task = asyncio.create_task(run_once(argv, cwd=tmp_path, env=env(), timeout_s=120, directory=tmp_path / "a"))
    for _ in range(200):
        if count(marker):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not (tmp_path / "a" / "process.json").exists()
    quick = [PY, "-c", f"open({str(marker)!r}, 'a').write('y\\n')"]
    res = await run_once(quick, cwd=tmp_path, env=env(), timeout_s=30, directory=tmp_path / "a")
    assert res.exit_code == 0 and not res.adopted and count(marker) == 2


async def test_a_reused_pid_is_not_mistaken_for_the_attempt(tmp_path):
    # After a container restart pids start over: process.json may name a pid that now belongs to something else.
    import json
    import socket

    d = tmp_path / "a"
    d.mkdir()
    (d / "process.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                "start_ticks": 1, "started_at": time.time(),
                                                "deadline": time.time() + 60}))
    marker = tmp_path / "ran"
    res = await run_once([PY, "-c", f"open({str(marker)!r}, 'a').write('x\\n')"], cwd=tmp_path, env=env(),
                         timeout_s=30, directory=d)
    assert not res.adopted and res.exit_code == 0 and count(marker) == 1


async def test_a_secret_the_harness_prints_from_a_passed_variable_is_masked_in_what_is_kept(tmp_path, monkeypatch):
    # The reproduce stage keeps the harness's stdout and stderr as artifacts; a value of a --pass-env variable (and
    # anything a redaction rule recognizes) is masked before they are written.
    from pipeline.contract import Harness
    from pipeline.journal.jsonl import JsonlJournal
    from pipeline.reproducer import Reproducer

    secret = "s3cr3t-value-of-the-agents-api-key"
    monkeypatch.setenv("AGENT_API_KEY", secret)
    script = ("import json, os, sys; print(json.dumps({'answer': 'key is ' + os.environ['AGENT_API_KEY']})); "
              "print('Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345', file=sys.stderr)")
    harness = Harness(command=(PY, "-c", script), env={}, timeout_s=30)

    async def checkout(dest):
        dest.mkdir(parents=True, exist_ok=True)

    reproducer = Reproducer(JsonlJournal(tmp_path / "runs.jsonl"), otlp_endpoint="http://127.0.0.1:9",
                            pass_env=["AGENT_API_KEY"], trace_wait_s=0.1)
    result = await reproducer.run(harness=harness, checkout=checkout, work_dir=tmp_path / "work", attempts=1,
                                  attempt_prefix="p", run_id="r" * 32, trace_id="t" * 32, task="task", original=None)
    kept = json.dumps(result.stdout) + result.stderr
    assert secret not in kept and "abcdefghijklmnopqrstuvwxyz012345" not in kept
    assert result.stdout[0]["json"]["answer"] == "key is [REDACTED:pass-env]"
    assert "[REDACTED:" in result.stderr
