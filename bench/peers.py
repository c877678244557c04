"""Peers of trace-source in the receiver benchmark: what users would run instead, measured with the same load
generator against the same broker in the same run.

* ``otelcol-sync`` / ``otelcol-queue`` — the OpenTelemetry Collector (``bench/collector``: ``otlpreceiver`` +
  contrib ``kafkaexporter``, every collector module at one release) writing what trace-source writes: OTLP protobuf
  per trace (``encoding: otlp_proto``, ``partition_traces_by_id``), ``required_acks: -1``, zstd. ``-sync`` has its
  sending queue off, so it answers an export only after Kafka acknowledged it — trace-source's promise.
  ``-queue`` keeps the exporter's default queue (1000 batches, 10 consumers): it answers when the batch is queued
  in memory, before anything is durable, and refuses with 503 when the queue is full.
* ``phoenix`` — Arize Phoenix (``arize-phoenix`` from PyPI, in its own virtualenv under the cache), a Python
  LLM-observability server with an OTLP/HTTP ingest at ``/v1/traces`` that stores spans in SQLite. It answers once
  the request is parsed and handed to a background task that queues the spans for its database writer: before
  they are stored. Its own logging is set to warnings (as trace-source's access log is off).

The collector is built from the Go module proxy into ``~/.cache/trace-source/bin/otelcol-bench`` (``make otelcol``,
or on first use here: a few minutes); without Go the bench says so and skips those targets. Phoenix is used when
``~/.cache/trace-source/phoenix-venv`` holds it (``make phoenix``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import REPO, ServerProcess, say

CACHE = Path.home() / ".cache" / "trace-source"
COLLECTOR_SRC = REPO / "bench" / "collector"
COLLECTOR_BIN = CACHE / "bin" / "otelcol-bench"
PHOENIX_VENV = CACHE / "phoenix-venv"

#: Peer targets, and whether each answers only once the spans are durable (the promise trace-source makes).
PEER_TARGETS = {"otelcol-sync": True, "otelcol-queue": False, "phoenix": False}
PEER_TITLES = {
    "otelcol-sync": "OTel Collector -> Kafka, sync",
    "otelcol-queue": "OTel Collector -> Kafka, queue",
    "phoenix": "Arize Phoenix (SQLite)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_collector() -> tuple[Path | None, str]:
    """The collector binary, built from ``bench/collector`` when missing or older than its sources; ``(None,
    why)`` when it cannot be had (no Go, or the build failed)."""
    sources = [COLLECTOR_SRC / n for n in ("main.go", "go.mod", "go.sum")]
    if COLLECTOR_BIN.exists() and COLLECTOR_BIN.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return COLLECTOR_BIN, "cached"
    go = shutil.which("go")
    if go is None:
        return None, "Go is not installed (needed to build the OpenTelemetry Collector from the module proxy)"
    say(f"[otelcol] building the OpenTelemetry Collector ({COLLECTOR_SRC.relative_to(REPO)}) into {COLLECTOR_BIN} "
        f"from the Go module proxy (the first build takes minutes) ...")
    COLLECTOR_BIN.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run([go, "build", "-trimpath", "-o", str(COLLECTOR_BIN), "."], cwd=COLLECTOR_SRC,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"go build failed:\n{proc.stderr[-2000:]}"
    return COLLECTOR_BIN, f"built in {time.monotonic() - t0:.0f} s"


def collector_config(path: Path, http_port: int, grpc_port: int, bootstrap: str, topic: str, queue: bool) -> Path:
    """The collector's configuration (JSON is YAML): OTLP in, Kafka out as trace-source writes it."""
    import json

    kafka: dict = {
        "brokers": bootstrap.split(","),
        "traces": {"topic": topic, "encoding": "otlp_proto"},
        "partition_traces_by_id": True,
        "producer": {"required_acks": -1, "compression": "zstd", "max_message_bytes": 1_000_000},
    }
    if not queue:
        kafka["sending_queue"] = {"enabled": False}
    config = {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{http_port}"},
                                             "grpc": {"endpoint": f"127.0.0.1:{grpc_port}"}}}},
        "exporters": {"kafka": kafka},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["kafka"]}},
                    "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}}},
    }
    path.write_text(json.dumps(config, indent=2))
    return path


class PeerProcess(ServerProcess):
    """A peer server; ready once ``POST /v1/traces`` with an empty protobuf body answers 200 (a peer writes no
    ``serving`` log line)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, http_port: int, env: dict | None = None) -> None:
        super().__init__(name, cmd, log_path)
        self.serving = {"http_port": http_port}
        if env:
            self.env.update(env)

    def start(self, timeout_s: float = 120.0) -> "PeerProcess":
        return super().start(timeout_s)  # type: ignore[return-value]

    def ready(self) -> bool:
        req = urllib.request.Request(self.url, data=b"", method="POST",
                                     headers={"Content-Type": "application/x-protobuf"})
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(req, timeout=2) as resp:
                return resp.status == 200
        return False


def collector_process(target: str, work_dir: Path, round_no: int, bootstrap: str, topic: str) -> PeerProcess:
    http_port, grpc_port = free_port(), free_port()
    config = collector_config(work_dir / f"{target}-{round_no}.json", http_port, grpc_port, bootstrap, topic,
                              queue=target == "otelcol-queue")
    return PeerProcess(PEER_TITLES[target], [str(COLLECTOR_BIN), "--config", f"file:{config}"],
                       work_dir / f"{target}-{round_no}-server.log", http_port,
                       env={"GOMAXPROCS": str(os.cpu_count() or 1)})


def phoenix_available() -> tuple[bool, str]:
    python = PHOENIX_VENV / "bin" / "python"
    if not python.exists():
        return False, f"Arize Phoenix is not installed ({PHOENIX_VENV}; `make phoenix` installs it from PyPI)"
    probe = subprocess.run([str(python), "-c", "import phoenix, sys; print(phoenix.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"Arize Phoenix does not import: {probe.stderr.strip()[-500:]}"
    return True, probe.stdout.strip()


def phoenix_process(work_dir: Path, round_no: int) -> PeerProcess:
    http_port, grpc_port = free_port(), free_port()
    home = work_dir / f"phoenix-{round_no}"
    home.mkdir(parents=True, exist_ok=True)
    env = {"PHOENIX_WORKING_DIR": str(home), "PHOENIX_PORT": str(http_port), "PHOENIX_HOST": "127.0.0.1",
           "PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_TELEMETRY_ENABLED": "false",
           "PHOENIX_LOGGING_LEVEL": "warning", "PHOENIX_DB_LOGGING_LEVEL": "warning"}
    return PeerProcess(PEER_TITLES["phoenix"], [str(PHOENIX_VENV / "bin" / "python"), "-m", "phoenix.server.main",
                                                "serve"], work_dir / f"phoenix-{round_no}-server.log", http_port,
                       env=env)


def available(target: str) -> tuple[bool, str]:
    """Whether ``target`` can run here, and what was found (or why not)."""
    if target.startswith("otelcol"):
        binary, why = ensure_collector()
        return binary is not None, why
    if target == "phoenix":
        return phoenix_available()
    return True, ""


if __name__ == "__main__":  # `python -m bench.peers otelcol`: build the collector (make otelcol)
    binary, why = ensure_collector()
    print(binary or "", why, file=sys.stderr if binary is None else sys.stdout)
    sys.exit(0 if binary else 1)
