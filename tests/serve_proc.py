"""Run ``trace-source`` commands as real processes for tests and benchmarks.

:class:`CliProcess` starts a ``trace-source`` subcommand with stdout/stderr appended to a log file, waits for a JSON
log event that says it is up, and stops it with SIGTERM (graceful) or SIGKILL (crash). :class:`ServeProcess` runs
``serve`` on free ports (``--port 0 --grpc-port 0``) and reads the bound ports from its ``serving`` event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_BIN = Path(sys.executable).with_name("trace-source")


class CliProcess:
    """``trace-source <argv>`` in a subprocess; ``env``: extra environment (``TRACE_SOURCE_*`` from the caller's
    environment are dropped so a developer's settings cannot leak into tests)."""

    def __init__(self, log_path: Path, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = Path(log_path)
        self.argv = argv
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_SOURCE_")}
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    def launch(self, ready_event: str, timeout_s: float) -> dict:
        """Start the process and return the first ``ready_event`` JSON log event of this run.

        Raises ``RuntimeError`` if the process exits first and ``TimeoutError`` (after killing it) if the event
        does not come within ``timeout_s``; both carry the log's tail.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        since = self.log_path.stat().st_size if self.log_path.exists() else 0  # restarts append to the same log
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(_BIN), *self.argv], stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trace-source {self.argv[0]} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            for event in self.events(since):
                if event.get("event") == ready_event:
                    return event
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"trace-source {self.argv[0]} did not start in {timeout_s}s:\n{self.log_tail()}")

    def events(self, offset: int = 0) -> list[dict]:
        """The JSON log events written since byte ``offset`` of the log (other lines are skipped)."""
        out = []
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return out

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: no shutdown work at all (crash-safety tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()


class ServeProcess(CliProcess):
    """``trace-source serve`` with its state under ``state_dir``. ``extra_args``: more CLI flags."""

    def __init__(self, state_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 kafka_bootstrap: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        args = ["serve", "--port", "0", "--grpc-port", "0", "--state-dir", str(self.state_dir), *extra_args]
        if kafka_bootstrap:
            args += ["--kafka-bootstrap-servers", kafka_bootstrap]
        super().__init__(self.state_dir.parent / f"{self.state_dir.name}-serve.log", args, env)
        self.http_port = self.grpc_port = 0

    @property
    def http_url(self) -> str:
        scheme = "https" if "--tls-cert-file" in self.argv else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 30.0) -> "ServeProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        event = self.launch("serving", timeout_s)
        self.http_port, self.grpc_port = event["http_port"], event.get("grpc_port") or 0
        return self

    def __enter__(self) -> "ServeProcess":
        return self.start()
