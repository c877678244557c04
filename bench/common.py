"""What the receiver and assembler benchmarks share: paths, the bench's Kafka broker, server processes, CPU and
memory accounting, number formatting and the results file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
PROTOBUF = "application/x-protobuf"
# max.message.bytes of the topics the benches create (and the producer's max_request_size): 1 MB plus headroom.
TOPIC_MAX_BYTES = 1_000_000 + 64 * 1024

# JVM flags of a broker started by bin/kafka-server-start.sh (KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS), used
# with --broker-jvm server. The test harness's own flags (C1-only JIT, SerialGC) favour start-up time over
# throughput.
SERVER_JVM_OPTIONS = (
    "-Xms1g", "-Xmx1g", "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true",
)


def say(msg: str) -> None:
    print(msg, flush=True)


# ================================================================================================ Kafka


def start_harness_broker(broker_jvm: str, overrides: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    """A single-node broker from ``tests/kafka_harness.py``, with the JVM flags of ``kafka-server-start.sh`` when
    ``broker_jvm`` is ``"server"`` (else the harness's own). Returns the started broker (``.bootstrap_servers``,
    ``.version``) and its JVM flags."""
    sys.path.insert(0, str(REPO))
    from tests import kafka_harness

    say(f"[kafka] starting a single-node Kafka {kafka_harness.KAFKA_VERSION} broker (tests/kafka_harness.py, "
        f"JVM flags: {broker_jvm}) ...")
    t0 = time.monotonic()
    saved = kafka_harness.JVM_OPTIONS
    if broker_jvm == "server":
        kafka_harness.JVM_OPTIONS = SERVER_JVM_OPTIONS  # read when the harness builds the java command line
    try:
        broker = kafka_harness.KafkaBroker(overrides=overrides)
        broker.start()
    finally:
        kafka_harness.JVM_OPTIONS = saved
    say(f"[kafka] broker ready at {broker.bootstrap_servers} in {time.monotonic() - t0:.1f} s")
    return broker, list(SERVER_JVM_OPTIONS if broker_jvm == "server" else saved)


def java_children() -> list[int]:
    """PIDs of JVMs started (directly or not) by this process: the broker(s) of the Kafka harness."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)
            if "java" in (p.name() or "").lower()]


async def delete_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


# ================================================================================================ processes


class LoggedProcess:
    """A child process started as ``cmd`` in the repository, stdout+stderr into ``log_path``, without the
    ``TRACE_SOURCE_*`` variables of this environment (so only ``cmd`` configures it)."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_SOURCE_")}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=log, env=self.env)

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None (killed) when it has not exited within ``timeout_s``."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then :meth:`wait`."""
        if self.proc is None:
            return None
        self.terminate()
        return self.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


class ServerProcess(LoggedProcess):
    """A server started as ``cmd``; ready once its log (stdout+stderr) has the JSON ``serving`` event."""

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        super().__init__(cmd, log_path)
        self.name = name
        self.serving: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.serving['http_port']}/v1/traces"

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{self.name} did not start within {timeout_s:.0f}s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """Whether the server is up: its log has the ``serving`` event (kept in :attr:`serving`)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"serving"' in line:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "serving":
                        self.serving = event
                        return True
        return False


# ================================================================================================ CPU and memory


def process_cpu_s(cpu_times) -> float:
    """User + system seconds of a ``psutil`` process ``cpu_times()``."""
    return cpu_times.user + cpu_times.system


def machine_cpu_s(cpu_times) -> tuple[float, float, float]:
    """(busy, steal, iowait) cumulative CPU seconds of the machine from ``psutil.cpu_times()``; I/O wait counts as
    idle."""
    iowait = getattr(cpu_times, "iowait", 0.0)
    return sum(cpu_times) - (cpu_times.idle + iowait), getattr(cpu_times, "steal", 0.0), iowait


def cpu_cores(groups_cpu_s: dict[str, float | None], wall_s: float, busy_s: float, steal_s: float,
              iowait_s: float | None = None) -> dict[str, float | None]:
    """CPU cores (CPU seconds / wall seconds) of each group of processes (None where unknown), of the whole machine
    (``machine_busy``, ``machine_steal``, ``machine_iowait`` when given) and of everything else (``others``)."""
    out: dict[str, float | None] = {name: None if s is None else round(s / wall_s, 3)
                                    for name, s in groups_cpu_s.items()}
    out["machine_busy"] = round(busy_s / wall_s, 3)
    out["machine_steal"] = round(steal_s / wall_s, 3)
    if iowait_s is not None:
        out["machine_iowait"] = round(iowait_s / wall_s, 3)
    ours = sum(v for k, v in out.items() if k in groups_cpu_s and v is not None)
    out["others"] = round(max(0.0, out["machine_busy"] - ours), 3)
    return out


def note_cpu_contention(cores: dict[str, float | None], label: str, notes: list[str], message: str) -> None:
    """When other processes used more than a quarter of a core in the window: add ``message`` (``{others}``: their
    cores) to ``notes`` and print it as a warning."""
    if (cores.get("others") or 0) > 0.25:
        note = message.format(others=cores["others"])
        notes.append(note)
        say(f"{label} warning: {note}")


# ================================================================================================ figures


def percentile(sorted_values: list[float], q: float, digits: int) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of ascending values, rounded to ``digits``."""
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return round(sorted_values[idx], digits)


def median(values: list[float | None]) -> float | None:
    """The median of the values that are not None, rounded to 3 digits (None if there are none)."""
    vals = [v for v in values if v is not None]
    return None if not vals else round(statistics.median(vals), 3)


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_k(x: float | None) -> str:
    return "-" if not x else f"{x:,.0f}"


# ================================================================================================ results


def environment() -> dict[str, Any]:
    """The machine, the interpreter, the libraries that matter for throughput and the git state."""
    import aiohttp
    import google.protobuf
    import psutil
    from google.protobuf.internal import api_implementation

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    git = {}
    with contextlib.suppress(Exception):
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout.strip()
        git["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                           text=True, check=True).stdout.strip())
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model, "memory_gb": round(psutil.virtual_memory().total /
            2**30, 1), "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
            "platform": platform.platform(), "aiohttp": aiohttp.__version__,
            "protobuf": google.protobuf.__version__, "protobuf_backend": api_implementation.Type(), "git": git}


def quiet_library_logs() -> None:
    """Only warnings from structlog users (sinks.kafka_admin) and aiokafka in the bench's own output."""
    import logging

    import structlog

    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def timestamp() -> str:
    """The run's stamp in result file names and topic names."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def results_path(output: Path | None, name: str) -> Path:
    """``output``, or ``bench/results/<name>`` (the folder created)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return output or RESULTS_DIR / name


def write_results(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    say(f"\nresults: {path}")
