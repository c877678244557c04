"""``serve --workers N``: N receiver processes on the same HTTP and gRPC ports, so a receiver uses every core.

The parent process (a supervisor, no request handling) reserves the two ports (``SO_REUSEPORT``, so ``--port 0``
still picks one port for all), creates the Kafka topic once when asked to, and starts N ``serve`` processes
(``multiprocessing`` spawn). Each binds both ports with ``SO_REUSEPORT`` — the kernel spreads new connections over
the listening processes — and has its own Kafka producer, so each answers only after its own records are
acknowledged (the same promise as one process). Once every worker is serving, the parent logs the one ``serving``
line (ports, worker count, pids) and releases its reservations.

**Metrics**: one ``/metrics`` view. The workers run prometheus-client in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, a temporary directory of the parent's): whichever worker answers ``/metrics``
reports the counters and histograms summed over all workers, and the in-flight gauge summed over live workers.

**Shutdown**: SIGTERM/SIGINT to the parent goes to every worker; each drains its in-flight requests
(``shutdown_grace_s``) and flushes its producer, and the parent exits when all have. A worker that dies on its own
takes the others down (exit code 1): the process manager restarts the whole receiver, and exporters retry.

**Only with Kafka.** The embedded default (no broker) always runs one process: the SQLite log has one writer and
the in-process assembler must be the only one consuming it. ``--workers`` above 1 is then ignored (with a warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import structlog

from trace_source.settings import ServeSettings

log = structlog.get_logger("trace_source.serve")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, lowered to the cgroup (v2 ``cpu.max``, v1 CFS) quota rounded
    up, as a container's CPU limit sets it."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def worker_count(settings: ServeSettings) -> int:
    """How many serve processes to run: ``settings.workers`` (default: :func:`available_cpus`) with Kafka; always
    1 for the embedded log."""
    if not settings.kafka_bootstrap_servers:
        if settings.workers and settings.workers > 1:
            log.warning("workers ignored", workers=settings.workers, reason=(
                "the embedded log (no Kafka) has one writer and one in-process assembler: serve runs one process"))
        return 1
    return settings.workers or available_cpus()


def _reserve(host: str, port: int) -> socket.socket:
    """A bound (not listening) ``SO_REUSEPORT`` socket on ``host:port`` (port 0: a free one): the workers bind the
    same port next to it; it receives no connections itself."""
    family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies (even by SIGKILL), so no worker outlives it holding the
    port; it then shuts down gracefully like on any SIGTERM."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(settings: ServeSettings, index: int, ready) -> None:
    """One worker process (spawned): the ordinary ``serve`` on the reserved ports, sharing them."""
    from trace_source.logging import configure
    from trace_source.serve import run

    _die_with_parent()
    from aiokafka.errors import KafkaError

    from sinks.base import SinkUnavailable

    configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings, worker=index, on_ready=lambda: ready.put(index)))
    except (OSError, SinkUnavailable, KafkaError) as exc:  # start-up failures, as `serve` reports them
        log.error("worker cannot start", worker=index, error=str(exc))
        raise SystemExit(1) from None


def supervise(settings: ServeSettings, n: int) -> int:
    """Run ``n`` workers until SIGTERM/SIGINT (see the module docstring); returns the exit code."""
    if settings.kafka_create_topics:
        from sinks.kafka_admin import create_topic
        from trace_source.serve import kafka_request_size

        created = asyncio.run(create_topic(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                           settings.kafka_partitions, settings.kafka_replication_factor,
                                           max_request_size=kafka_request_size(settings)))
        log.info("topic checked", topic=settings.kafka_topic, created=created)
    reserved = [_reserve(settings.host, settings.port)]
    http_port = reserved[0].getsockname()[1]
    grpc_port = None
    if settings.grpc_enabled:
        reserved.append(_reserve(settings.host, settings.grpc_port))
        grpc_port = reserved[1].getsockname()[1]
    shared = settings.model_copy(update={"port": http_port, "grpc_port": grpc_port or settings.grpc_port,
                                         "kafka_create_topics": False, "workers": 1})
    metrics_dir = tempfile.mkdtemp(prefix="trace-source-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(shared, i, ready), name=f"trace-source-serve-{i}")
             for i in range(n)]
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    code = 0
    try:
        for p in procs:
            p.start()
        started: set[int] = set()
        deadline = time.monotonic() + 120.0
        while len(started) < n and not stopping:
            if any(p.exitcode is not None for p in procs) or time.monotonic() > deadline:
                log.error("worker start failed", workers=n, serving=sorted(started),
                          exit_codes=[p.exitcode for p in procs])
                code = 1
                break
            try:
                started.add(ready.get(timeout=0.2))
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
                continue
        for sock in reserved:
            sock.close()
        reserved.clear()
        if not stopping and not code:
            log.info("serving", http=f"http://{settings.host}:{http_port}",
                     grpc=f"{settings.host}:{grpc_port}" if grpc_port else None, http_port=http_port,
                     grpc_port=grpc_port, workers=n, pids=[p.pid for p in procs], sink="kafka")
        while not stopping and not code:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                log.error("worker exited, stopping the others", worker=dead[0].name, exit_code=dead[0].exitcode)
                code = 1
            time.sleep(0.2)
    finally:
        log.info("shutting down", workers=n)
        for p in procs:
            if p.exitcode is None and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            if p.pid is None:
                continue
            p.join(settings.shutdown_grace_s + 20.0)
            if p.exitcode is None:
                p.kill()
                p.join()
        for sock in reserved:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("stopped", workers=n, exit_codes=[p.exitcode for p in procs])
    return code or (1 if any(p.exitcode not in (0, None) for p in procs) else 0)
