"""Run ``trace-source serve`` as a real process for tests and benchmarks.

Starts the console script with ``--port 0 --grpc-port 0`` (free ports), waits for the ``serving`` JSON log line and
reads the bound ports from it. stderr goes to a log file under the state dir so a failing test can show it.
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


class ServeProcess:
    """``trace-source serve`` in a subprocess. ``extra_args``: more CLI flags; ``env``: extra environment."""

    def __init__(self, state_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 kafka_bootstrap: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.args = ["--port", "0", "--grpc-port", "0", "--state-dir", str(self.state_dir), *extra_args]
        if kafka_bootstrap:
            self.args += ["--kafka-bootstrap-servers", kafka_bootstrap]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_SOURCE_")}
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-serve.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 30.0) -> "ServeProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        since = log.tell()  # a restart on the same state dir appends: only this run's lines count
        self.proc = subprocess.Popen([str(_BIN), "serve", *self.args], stdout=log, stderr=log, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trace-source serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            with open(self.log_path, "rb") as f:
                f.seek(since)
                lines = f.read().decode(errors="replace").splitlines()
            for line in lines:
                if '"serving"' in line:
                    event = json.loads(line)
                    self.http_port, self.grpc_port = event["http_port"], event.get("grpc_port") or 0
                    return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"trace-source serve did not start in {timeout_s}s:\n{self.log_tail()}")

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

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()
