"""Running a command of the agent's repository — the harness for a reproduction attempt, later the coding agent
and the validation command of a fix — safely and at most once per attempt.

* **Isolation.** The command runs in the working copy it is given, with exactly the environment it is given (the
  caller builds it from an allow-list), stdin ``/dev/null`` (a harness that wants a prompt gets EOF, never hangs on
  a terminal), stdout and stderr to files.
* **Deadline.** It runs in a session of its own; at the deadline its whole process group gets ``SIGKILL``.
* **At most once.** Each attempt has a directory holding ``process.json`` (pid, host, deadline), ``stdout``,
  ``stderr`` and, once it ended, ``result.json`` written by :mod:`pipeline.attempt_wrapper`. The wrapper survives
  the worker: a worker that takes an attempt over after a crash finds the result (and uses it), or the process still
  running on this host (and waits for it), and starts the command again only when neither is true.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_WRAPPER = Path(__file__).with_name("attempt_wrapper.py")
_POLL_S = 0.2


@dataclass
class ProcessResult:
    """How one run of a command ended. ``exit_code``: ``None`` when it timed out or could not start; ``-N`` for
    signal ``N``. ``error``: why it could not start or its setup failed. ``adopted``: it was started by a worker
    that died, and this one only waited for it."""

    exit_code: int | None
    timed_out: bool
    duration_s: float
    stdout: bytes
    stderr: bytes
    error: str | None = None
    setup_exit: int | None = None
    adopted: bool = False

    @property
    def started(self) -> bool:
        return self.error is None or self.setup_exit not in (None, 0)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), ``None`` when unknown:
    with the pid it identifies a process even after pids are reused (a restarted container starts them over)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _same_process(info: dict) -> bool:
    """``info`` (process.json) describes a process alive on this host right now — not another one that happens to
    have its pid."""
    if info.get("host") != socket.gethostname() or not _alive(info["pid"]):
        return False
    recorded, now = info.get("start_ticks"), _start_ticks(info["pid"])
    return recorded is None or now is None or recorded == now


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie (exited, not yet reaped) counts as gone: a child of ours is reaped
    here, another process's zombie is recognized by its ``/proc`` state."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return True


_alive = process_alive


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _finished(directory: Path, started_at: float, timed_out: bool, adopted: bool) -> ProcessResult:
    result = {}
    if (directory / "result.json").exists():
        result = json.loads((directory / "result.json").read_text())
    timed_out = timed_out or (directory / "timed_out").exists()
    ended = result.get("ended_at") or time.time()
    stderr = _read(directory / "stderr")
    error = result.get("error")
    if not result and not timed_out:  # the wrapper itself failed (it writes the result last)
        error = "the attempt wrapper ended without a result: " + stderr.decode("utf-8", "replace").strip()[-500:]
    return ProcessResult(exit_code=None if timed_out else result.get("exit_code"), timed_out=timed_out,
                         duration_s=round(max(0.0, ended - started_at), 3), stdout=_read(directory / "stdout"),
                         stderr=stderr, error=error,
                         setup_exit=result.get("setup_exit"), adopted=adopted)


async def run_once(argv: list[str] | tuple[str, ...], *, cwd: Path, env: dict[str, str], timeout_s: float,
                   directory: Path, setup: list[str] | tuple[str, ...] | None = None) -> ProcessResult:
    """Run ``argv`` (after ``setup``, if given) in ``cwd`` with ``env``, at most once for ``directory`` (see the
    module docstring); returns how it ended. Cancelling the call kills the process group and forgets the attempt
    (the next worker starts it afresh). Raises ``OSError`` when the attempt directory cannot be written."""
    directory = directory.resolve()  # the wrapper runs in ``cwd``: every path it is given must be absolute
    directory.mkdir(parents=True, exist_ok=True)
    process_file = directory / "process.json"
    if (directory / "result.json").exists() or (directory / "timed_out").exists():
        info = json.loads(process_file.read_text()) if process_file.exists() else {}
        return _finished(directory, info.get("started_at", time.time()), False, adopted=True)
    # "adopted" above: a worker that died after the attempt ended; its result is used as it is.
    if process_file.exists():
        info = json.loads(process_file.read_text())
        if _same_process(info):
            log.info("harness.adopting", pid=info["pid"], directory=str(directory))
            adopted = await _wait(None, info["pid"], directory, info["started_at"], info["deadline"], adopted=True)
            if adopted is not None:
                return adopted
        # The process is gone without a result (killed with its host, or on another host): start it again.
        log.warning("harness.lost_attempt_restarting", directory=str(directory))
    for name in ("stdout", "stderr", "result.json", "timed_out"):
        (directory / name).unlink(missing_ok=True)
    wrapper = [sys.executable, "-I", str(_WRAPPER), str(directory / "result.json")]
    if setup:
        wrapper += ["--setup", *setup]
    wrapper += ["--", *argv]
    started_at = time.time()
    with open(directory / "stdout", "wb") as out, open(directory / "stderr", "wb") as err:
        proc = await asyncio.create_subprocess_exec(*wrapper, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=out, stderr=err, start_new_session=True)
    deadline = started_at + timeout_s * (2 if setup else 1)
    tmp = process_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "start_ticks": _start_ticks(proc.pid),
                               "started_at": started_at, "deadline": deadline, "argv": list(argv)}))
    os.replace(tmp, process_file)
    return await _wait(proc, proc.pid, directory, started_at, deadline, adopted=False)


async def _wait(proc: asyncio.subprocess.Process | None, pid: int, directory: Path, started_at: float,
                deadline: float, *, adopted: bool) -> ProcessResult | None:
    """Wait for the attempt's result (``proc``: our child; ``None``: adopted by pid). ``None`` when an adopted
    process vanished without writing a result."""
    try:
        while True:
            if proc is not None:
                try:
                    await asyncio.wait_for(proc.wait(), max(0.0, min(_POLL_S * 5, deadline - time.time())))
                    return _finished(directory, started_at, False, adopted)
                except TimeoutError:
                    pass
            else:
                if (directory / "result.json").exists():
                    return _finished(directory, started_at, False, adopted)
                if not _alive(pid):
                    await asyncio.sleep(_POLL_S)  # the wrapper writes its result just before it exits
                    if not (directory / "result.json").exists():
                        return None
                    return _finished(directory, started_at, False, adopted)
                await asyncio.sleep(_POLL_S)
            if time.time() >= deadline:
                _kill_group(pid)
                (directory / "timed_out").write_text(str(time.time()))
                if proc is not None:
                    await proc.wait()
                return _finished(directory, started_at, True, adopted)
    except asyncio.CancelledError:
        # Given up (shutdown past its grace): kill it and forget the attempt, so the next worker starts it afresh.
        _kill_group(pid)
        if proc is not None:
            await asyncio.shield(proc.wait())
        (directory / "process.json").unlink(missing_ok=True)
        raise
