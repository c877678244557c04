"""Assembler throughput benchmark: ``trace-source worker assemble`` on Kafka with 1 and 2 consumers, next to the
receiver's rate measured in the same run.

Default mode (``--mode e2e``), in one run on this machine:

1. Kafka: a single-node broker started from ``tests/kafka_harness.py`` (unless ``--kafka-bootstrap`` names one) and
   a fresh spans topic with ``--partitions`` partitions.
2. Load: ``trace-source serve`` into that topic, fed a fixed workload over OTLP/HTTP protobuf
   (``bench.payloads.make_genai_request``: GenAI agent runs of ``--spans-per-trace`` spans, ``--spans-per-request``
   spans per request, ``--spans`` in total) from ``--connections`` keep-alive connections, every request sent once
   (retried on 503). The receiver's spans/s while loading is reported next to the assembler's.
3. Assembly: for each count in ``--workers`` (default 1, then 2) a fresh consumer group and fresh traces/DLQ topics
   over the same preloaded input: that many ``trace-source worker assemble`` processes are started together, and the
   bench consumes the traces topic until every expected trace has an envelope. Measured window: from the first
   partition assignment (worker log) to the Kafka timestamp of the last trace's first envelope, so process start-up
   and the consumer-group join are not counted. Each trace must yield exactly one envelope; a missing, extra or
   duplicate envelope, or one whose span count differs from what was sent, is an error (exit 1).

Reported: spans/s and envelopes/s, the scaling ratio against 1 worker, spans per worker CPU-second (robust on a
busy machine), CPU cores used in each window by the measured processes, the broker, the bench itself and every
other process, peak RSS per process, and the partition split between workers.

``--mode micro``: the in-process CPU cost per span (no Kafka, no processes) of parsing, buffering and building
envelopes, next to a parse-only reference; then each step of the envelope build in µs per span and the *floors* (the
least CPU any assembler producing today's envelope spends on parsing, reading attribute values, JSON and zstd),
against the per-span budget of the 45,000 spans per CPU-second target.

Results go to ``bench/results/assembler-<timestamp>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import profiling
from bench.common import (
    PROTOBUF, REPO, RESULTS_DIR, TOPIC_MAX_BYTES, LoggedProcess, ServerProcess, cpu_cores, delete_topic, environment,
    fmt, fmt_k, java_children, machine_cpu_s, median, note_cpu_contention, percentile, process_cpu_s,
    quiet_library_logs, results_path, say, start_harness_broker, timestamp, write_results,
)

TRACE_SOURCE = Path(sys.executable).with_name("trace-source")


# ================================================================================================ micro mode
#
# Input: the receiver's own output — bench/payloads.py export requests split per trace by receiver.split — each
# span written twice (once more as an exporter retry would). Stages, each timed on the same records:
#   reference — parse every record value as TracesData (upb): the least any consumer must do;
#   buffer    — pipeline.buffers: decode ids/times, dedupe, buffer, close (no envelope);
#   envelope  — buffer plus pipeline.envelope_builder (canonical spans, redaction, agent-run view, idempotency key,
#               validation) and Envelope.to_json_bytes: everything the assembler does except I/O.
# Then build_steps: the envelope build step by step, and the floors (see its docstring).


def make_records(n_requests: int, spans_per_request: int, spans_per_trace: int):
    from bench.payloads import make_genai_request
    from pipeline.bus import BusRecord
    from receiver.split import split_traces

    out: list = []
    spans = 0
    for seed in range(n_requests):
        req = make_genai_request(spans_per_request, spans_per_trace, seed)
        for rec in split_traces(req, 1_000_000).records:
            out.append(BusRecord("trace-source.spans", 0, len(out) + 1, rec.key, rec.value,
                                 (("signal", b"traces"), ("source-id", b"bench"), ("received-at", b"1"))))
        spans += spans_per_request
    # Exporter retries: every record once more, after the originals.
    out += [BusRecord(r.topic, 0, len(out) + i + 1, r.key, r.value, r.headers) for i, r in enumerate(out)]
    return out, spans


def run_reference(records) -> None:
    from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

    for r in records:
        TracesData.FromString(r.value)


def closed_traces(records) -> list:
    """The traces of ``records`` as the assembler's buffers close them (``pipeline.buffers.ClosedTrace``)."""
    from pipeline.buffers import AssemblerCore, decode_record

    clock = [0.0]
    core = AssemblerCore(quiet_period_s=1.0, max_wait_s=300.0, clock=lambda: clock[0], remembered=10**6,
                         retained_bytes=0)
    core.assign([0])
    for r in records:
        core.ingest(r, decode_record(r).traces)
    clock[0] = 10.0
    return core.due()


def run_assembler(records, build: bool) -> int:
    from normalizers.redact import Redactor
    from pipeline.envelope_builder import build_envelope

    redactor = Redactor()
    closed = closed_traces(records)
    if build:
        for c in closed:
            build_envelope(c, assembled_at_ns=1, redactor=redactor).to_json_bytes()
    return len(closed)


def best_of(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


#: The issue-11 target for one assembler worker, spans per CPU-second; its budget per span is 1e6 / this in µs.
ASSEMBLER_TARGET_SPANS_PER_CPU_S = 45_000


def build_steps(records, spans: int, rounds: int) -> dict[str, Any]:
    """CPU µs per span (``time.process_time``, best of ``rounds``) of each step of building the envelopes of
    ``records``, in the order the assembler runs them, and the *floors*: the least CPU any assembler producing
    today's envelope must spend on the steps that do not depend on how the view is computed.

    Steps: decode + canonical spans (``envelope_builder.collect``), redaction, agent-run view, the rest of
    ``build_envelope`` (idempotency key, envelope validation), JSON (``Envelope.to_json_bytes``) and zstd level 3
    (the envelope producer's default codec, through cramjam as aiokafka calls it). Floors: protobuf parse alone
    (upb), reading every attribute value out of the parsed messages into dicts (``canonical.attributes`` on every
    span, event, link, resource and scope, no models), and the JSON and zstd steps themselves (orjson and zstd are
    already the fastest encoders available to Python). Kafka consume and produce come on top (``--mode e2e``), and so
    does the cyclic garbage collector, paused while a step is timed."""
    import cramjam
    from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

    from normalizers.agent_run import build_agent_run
    from normalizers.canonical import attributes
    from normalizers.redact import Redactor
    from pipeline.envelope_builder import build_envelope, collect

    closed = closed_traces(records)
    redactor = Redactor()
    collected = [collect(c) for c in closed]
    redacted = [redactor.redact(s, logs) for s, logs in collected]
    envelopes = [build_envelope(c, assembled_at_ns=1, redactor=redactor) for c in closed]
    documents = [e.to_json_bytes() for e in envelopes]
    values = [r.value for c in closed for r in c.records]
    parsed = [TracesData.FromString(v) for v in values]

    def read_attributes() -> None:
        for data in parsed:
            for rs in data.resource_spans:
                attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    attributes(ss.scope.attributes)
                    for sp in ss.spans:
                        attributes(sp.attributes)
                        for e in sp.events:
                            attributes(e.attributes)
                        for lk in sp.links:
                            attributes(lk.attributes)

    def per_span(fn) -> float:
        # The cyclic collector is paused while a step runs: each step keeps all its results alive, so collections
        # would traverse a growing heap and charge it to whichever step runs then. `worker assemble` collects
        # between chunks instead (pipeline/gc_policy.py); --mode e2e measures that.
        best = math.inf
        for _ in range(rounds):
            gc.collect()
            gc.disable()
            try:
                t0 = time.process_time()
                fn()
                best = min(best, time.process_time() - t0)
            finally:
                gc.enable()
        return round(best * 1e6 / spans, 2)

    steps = {
        "decode + canonical spans": per_span(lambda: [collect(c) for c in closed]),
        "redaction": per_span(lambda: [Redactor().redact(s, logs) for s, logs in collected]),
        "agent-run view": per_span(lambda: [build_agent_run(r.spans, r.log_events) for r in redacted]),
        "build_envelope (all of the above + key, validation)":
            per_span(lambda: [build_envelope(c, assembled_at_ns=1, redactor=Redactor()) for c in closed]),
        "JSON (to_json_bytes)": per_span(lambda: [e.to_json_bytes() for e in envelopes]),
        "zstd level 3": per_span(lambda: [cramjam.zstd.compress(d, level=3) for d in documents]),
    }
    floors = {
        "protobuf parse (upb)": per_span(lambda: [TracesData.FromString(v) for v in values]),
        "attribute values into dicts": per_span(read_attributes),
        "JSON (to_json_bytes)": steps["JSON (to_json_bytes)"],
        "zstd level 3": steps["zstd level 3"],
    }
    total = steps["build_envelope (all of the above + key, validation)"] + steps["JSON (to_json_bytes)"] + \
        steps["zstd level 3"]
    return {"us_per_span": steps, "floor_us_per_span": floors, "total_us_per_span": round(total, 2),
            "floor_total_us_per_span": round(sum(floors.values()), 2),
            "target_spans_per_cpu_s": ASSEMBLER_TARGET_SPANS_PER_CPU_S,
            "target_budget_us_per_span": round(1e6 / ASSEMBLER_TARGET_SPANS_PER_CPU_S, 2),
            "envelope_bytes_per_span": round(sum(map(len, documents)) / spans)}


def run_micro(args: argparse.Namespace) -> int:
    rounds = args.rounds or 3
    records, spans = make_records(args.requests, args.spans_per_request, args.spans_per_trace)
    run_assembler(records[:4], build=True)  # warm-up: lazy imports and first-call costs stay out of the timings
    results = {}
    for name, fn in (("reference", lambda: run_reference(records)),
                     ("buffer", lambda: run_assembler(records, build=False)),
                     ("envelope", lambda: run_assembler(records, build=True))):
        seconds = best_of(rounds, fn)
        results[name] = {"seconds": round(seconds, 4), "spans_per_s": round(spans / seconds)}
    for r in results.values():
        r["x_of_reference"] = round(results["reference"]["seconds"] / r["seconds"], 4)
    steps = build_steps(records, spans, rounds)
    summary = {"records": len(records), "unique_spans": spans, "traces": run_assembler(records, False),
               "results": results, "steps": steps}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{len(records)} records (half of them retries), {spans} unique spans, {summary['traces']} traces; "
          f"best of {rounds}, in-process, one thread")
    for name, r in results.items():
        print(f"  {name:10} {r['spans_per_s']:>10,} spans/s   {r['x_of_reference'] * 100:6.1f}% of reference")
    print(f"\nenvelope steps, CPU µs per span (envelope JSON {steps['envelope_bytes_per_span']:,} bytes per span):")
    for name, us in steps["us_per_span"].items():
        print(f"  {name:54} {us:7.2f}")
    print(f"  {'total: build_envelope + JSON + zstd':54} {steps['total_us_per_span']:7.2f}"
          f"   = {1e6 / steps['total_us_per_span']:,.0f} spans per CPU-s before Kafka I/O")
    print("floors (steps any assembler of today's envelope must do, cheapest known in CPython), CPU µs per span:")
    for name, us in steps["floor_us_per_span"].items():
        print(f"  {name:54} {us:7.2f}")
    print(f"  {'sum of the floors':54} {steps['floor_total_us_per_span']:7.2f}"
          f"   vs the budget of the {steps['target_spans_per_cpu_s']:,} spans per CPU-s target: "
          f"{steps['target_budget_us_per_span']:.2f} µs per span with Kafka I/O")
    return 0


# ================================================================================================ sampling


class Timeline:
    """Samples, every ``interval_s`` in a thread, the cumulative CPU seconds and RSS of the watched processes and
    the machine's busy/steal CPU seconds, stamped with ``time.time()``. CPU used between two instants is then read
    by linear interpolation between samples (error: well under one interval's worth)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self._procs: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.times: list[float] = []
        self.machine: list[tuple[float, float]] = []  # (busy s, steal s), cumulative
        self.cpu: dict[int, list[tuple[float, float]]] = {}  # pid -> [(t, cpu s)]
        self.rss: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="timeline")

    def watch(self, pid: int) -> None:
        import psutil

        with self._lock:
            with contextlib.suppress(psutil.Error):
                self._procs[pid] = psutil.Process(pid)
        self.sample()

    def sample(self) -> None:
        import psutil

        t = time.time()
        busy, steal, _iowait = machine_cpu_s(psutil.cpu_times())
        with self._lock:
            self.times.append(t)
            self.machine.append((busy, steal))
            for pid, proc in list(self._procs.items()):
                try:
                    with proc.oneshot():
                        ct = proc.cpu_times()
                        rss = proc.memory_info().rss
                except psutil.Error:
                    del self._procs[pid]  # exited: its last sample stands
                    continue
                self.cpu.setdefault(pid, []).append((t, process_cpu_s(ct)))
                self.rss.setdefault(pid, []).append((t, rss))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> "Timeline":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _at(series: list[tuple[float, float]], t: float) -> float | None:
        if not series:
            return None
        ts = [s[0] for s in series]
        i = bisect.bisect_left(ts, t)
        if i == 0:
            return series[0][1]
        if i >= len(series):
            return series[-1][1]
        (t0, v0), (t1, v1) = series[i - 1], series[i]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1

    def cpu_s(self, pids: list[int], t0: float, t1: float) -> float | None:
        """CPU seconds the processes ``pids`` used between ``t0`` and ``t1`` (None if one was never sampled)."""
        total = 0.0
        with self._lock:
            for pid in pids:
                series = self.cpu.get(pid)
                a, b = self._at(series or [], t0), self._at(series or [], t1)
                if a is None or b is None:
                    return None
                total += b - a
        return total

    def machine_s(self, t0: float, t1: float) -> tuple[float, float]:
        """(busy, steal) CPU seconds of the whole machine between ``t0`` and ``t1``."""
        with self._lock:
            busy = [(t, m[0]) for t, m in zip(self.times, self.machine)]
            steal = [(t, m[1]) for t, m in zip(self.times, self.machine)]
        return ((self._at(busy, t1) or 0.0) - (self._at(busy, t0) or 0.0),
                (self._at(steal, t1) or 0.0) - (self._at(steal, t0) or 0.0))

    def peak_rss_mb(self, pid: int) -> float:
        with self._lock:
            return round(max((r for _, r in self.rss.get(pid, [])), default=0) / 2**20, 1)


def cpu_breakdown(timeline: Timeline, groups: dict[str, list[int]], t0: float, t1: float) -> dict[str, float | None]:
    """CPU cores (CPU seconds / wall seconds) used between ``t0`` and ``t1`` by each group of processes, by the
    whole machine (``machine_busy``, ``machine_steal``) and by everything else (``others``)."""
    spent = {name: timeline.cpu_s(pids, t0, t1) if pids else None for name, pids in groups.items()}
    busy, steal = timeline.machine_s(t0, t1)
    return cpu_cores(spent, max(t1 - t0, 1e-9), busy, steal)


# ================================================================================================ Kafka


class Broker:
    """The bench's Kafka: a single node from ``tests/kafka_harness.py`` (JVM flags of ``kafka-server-start.sh`` by
    default, and Kafka's default ``group.initial.rebalance.delay.ms`` so workers started together form one group
    generation), or ``--kafka-bootstrap``. Topics created here are deleted at the end on an existing cluster."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.harness = None
        self.bootstrap: str = args.kafka_bootstrap or ""
        self.info: dict[str, Any] = {}
        self.topics: list[str] = []

    def start(self) -> None:
        if self.bootstrap:
            self.info = {"started_by_bench": False, "bootstrap": self.bootstrap}
            return
        overrides = {"group.initial.rebalance.delay.ms": str(self.args.rebalance_delay_ms)}
        self.harness, jvm_options = start_harness_broker(self.args.broker_jvm, overrides)
        self.bootstrap = self.harness.bootstrap_servers
        self.info = {"started_by_bench": True, "version": self.harness.version, "bootstrap": self.bootstrap,
                     "jvm_options": jvm_options, "overrides": overrides}

    def pids(self) -> list[int]:
        if self.harness is None:
            return []
        return java_children()

    async def create_topic(self, topic: str, partitions: int, max_bytes: int = TOPIC_MAX_BYTES) -> None:
        from sinks.kafka_admin import create_topic

        await create_topic(self.bootstrap, topic, partitions, max_request_size=max_bytes)
        self.topics.append(topic)

    def stop(self) -> None:
        if self.harness is not None:
            self.harness.stop()
            self.harness = None
        elif self.topics:
            for topic in self.topics:
                with contextlib.suppress(Exception):
                    asyncio.run(delete_topic(self.bootstrap, topic))


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


# ================================================================================================ workload


@dataclass
class Workload:
    bodies: list[bytes]
    expected: dict[str, int]  # trace id (hex) -> spans
    spans: int
    body_bytes_mean: int


def build_workload(args: argparse.Namespace) -> Workload:
    """``ceil(--spans / --spans-per-request)`` export requests, seeds 0..n-1 (the same workload every run)."""
    from bench.payloads import make_genai_request

    n = max(1, math.ceil(args.spans / args.spans_per_request))
    bodies: list[bytes] = []
    expected: dict[str, int] = {}
    for seed in range(n):
        req = make_genai_request(args.spans_per_request, args.spans_per_trace, seed)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    tid = sp.trace_id.hex()
                    expected[tid] = expected.get(tid, 0) + 1
        bodies.append(req.SerializeToString())
    spans = sum(expected.values())
    return Workload(bodies, expected, spans, round(sum(map(len, bodies)) / len(bodies)))


# ================================================================================================ receiver phase


@dataclass
class ReceiverResult:
    spans: int = 0
    requests: int = 0
    window_s: float = 0.0
    spans_per_s: float = 0.0
    envelopes_per_s: float | None = None  # traces made durable per second (for the table)
    requests_per_s: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    failed_requests: int = 0
    cpu_cores: dict[str, float | None] = field(default_factory=dict)
    spans_per_cpu_s: float | None = None
    peak_rss_mb: float = 0.0
    input_records: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def send_all(url: str, bodies: list[bytes], connections: int) -> dict[str, Any]:
    """Every body POSTed once (retried on 503 / transport errors, up to 30 attempts), ``connections`` at a time."""
    import aiohttp

    next_i = iter(range(len(bodies)))
    latencies: list[float] = []
    retries: Counter[str] = Counter()
    failed = 0
    headers = {"Content-Type": PROTOBUF}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout) as session:
        async def connection() -> None:
            nonlocal failed
            for i in next_i:
                for _attempt in range(30):
                    t0 = time.perf_counter()
                    retry_after = 0.2
                    try:
                        async with session.post(url, data=bodies[i], headers=headers) as resp:
                            await resp.read()
                            status: int | str = resp.status
                            with contextlib.suppress(TypeError, ValueError):
                                retry_after = min(2.0, float(resp.headers.get("Retry-After", 0.2)))
                    except Exception as exc:  # noqa: BLE001 - counted and retried
                        status = type(exc).__name__
                    if status == 200:
                        latencies.append((time.perf_counter() - t0) * 1000)
                        break
                    retries[str(status)] += 1
                    await asyncio.sleep(retry_after)
                else:
                    failed += 1

        t_begin = time.time()
        await asyncio.gather(*(connection() for _ in range(connections)))
        t_end = time.time()
    return {"t_begin": t_begin, "t_end": t_end, "latencies_ms": sorted(latencies), "retries": dict(retries),
            "failed": failed}


async def run_receiver_phase(args, broker: Broker, workload: Workload, topic: str, timeline: Timeline,
                             work_dir: Path, stamp: str) -> ReceiverResult:
    cmd = [str(TRACE_SOURCE), "serve", "--port", "0", "--grpc-port", "0", "--state-dir", str(work_dir / "serve"),
           "--kafka-bootstrap-servers", broker.bootstrap, "--kafka-topic", topic, "--workers", "1"]
    server = ServerProcess("trace-source serve", cmd, work_dir / "serve.log")
    await asyncio.to_thread(server.start)
    timeline.watch(server.pid)
    timeline.watch(os.getpid())
    say(f"[receiver] serve up (pid {server.pid}; {server.serving.get('sink', '')}); sending {len(workload.bodies)} "
        f"requests of {args.spans_per_request} spans over {args.connections} connections ...")
    result = ReceiverResult(spans=workload.spans, requests=len(workload.bodies))
    try:
        out = await send_all(server.url, workload.bodies, args.connections)
        timeline.sample()
    finally:
        code = await asyncio.to_thread(server.stop)
        if args.keep_logs:
            keep = RESULTS_DIR / f"assembler-{stamp}-logs"
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(work_dir / "serve.log", keep / "serve.log")
    t0, t1 = out["t_begin"], out["t_end"]
    result.window_s = round(t1 - t0, 3)
    ok = result.requests - out["failed"]
    ok_spans = round(workload.spans * ok / result.requests)
    result.spans_per_s = round(ok_spans / result.window_s)
    result.requests_per_s = round(ok / result.window_s, 1)
    result.envelopes_per_s = round(len(workload.expected) * ok / result.requests / result.window_s)
    lat = out["latencies_ms"]
    result.latency_ms = {"p50": percentile(lat, 50, 1), "p99": percentile(lat, 99, 1), "max": percentile(lat, 100, 1)}
    result.retries = out["retries"]
    result.failed_requests = out["failed"]
    result.cpu_cores = cpu_breakdown(timeline, {"serve": [server.pid], "broker": broker.pids(),
                                                "bench": [os.getpid()]}, t0, t1)
    if result.cpu_cores.get("serve"):
        result.spans_per_cpu_s = round(result.spans_per_s / result.cpu_cores["serve"])
    result.peak_rss_mb = timeline.peak_rss_mb(server.pid)
    if out["failed"]:
        result.errors.append(f"{out['failed']} requests failed after 30 attempts: {out['retries']}")
    if code not in (0, None):
        result.errors.append(f"serve exited with {code}:\n{server.log_tail(15)}")
    if out["retries"]:
        result.notes.append(f"requests retried (backpressure or transport errors): {out['retries']}")
    result.input_records = await end_offsets(broker.bootstrap, topic)
    c = result.cpu_cores
    say(f"[receiver] {result.spans_per_s:,} spans/s ({result.requests_per_s} req/s) over {result.window_s:.1f} s, "
        f"p50 {result.latency_ms['p50']} ms, p99 {result.latency_ms['p99']} ms, peak RSS {result.peak_rss_mb} MB, "
        f"{fmt_k(result.spans_per_cpu_s)} spans per serve CPU-s; CPU cores: serve {fmt(c.get('serve'))}, broker "
        f"{fmt(c.get('broker'))}, bench {fmt(c.get('bench'))}, other {fmt(c.get('others'))}")
    records = sum(result.input_records.values())
    say(f"[receiver] input topic {topic}: {records:,} records (per partition: "
        f"{', '.join(f'{p}: {n:,}' for p, n in sorted(result.input_records.items()))}); {len(workload.expected):,} "
        f"traces expected")
    if records < len(workload.expected):
        result.errors.append(f"input topic holds {records} records, fewer than the {len(workload.expected)} traces")
    return result


# ================================================================================================ assembler phases


class WorkerProc(LoggedProcess):
    """One ``trace-source worker assemble`` process; its JSON log is read incrementally."""

    def __init__(self, index: int, cmd: list[str], log_path: Path) -> None:
        super().__init__(cmd, log_path)
        self.index = index
        self._offset = 0
        self._partial = b""
        self.metrics_port: int | None = None
        self.assigned: list[tuple[float, list[int]]] = []  # (unix s, partitions)
        self.revoked: list[tuple[float, list[int]]] = []
        self.emitted = 0
        self.emitted_spans = 0
        self.last_emitted = 0.0
        self.problems: Counter[str] = Counter()  # warning/error events by name
        self.emitted_at: list[float] = []
        self.peak_open_traces = 0.0
        self.peak_buffered_mb = 0.0
        self.threads_at_start: tuple[float, float] | None = None  # thread_cpu_s at the first assignment
        self.threads_at_end: tuple[float, float] | None = None

    def thread_split(self) -> dict[str, float] | None:
        """CPU seconds between the first assignment and the end: the main thread (event loop: Kafka consume and
        produce, decoding, buffers, publishing, logging) and all other threads (envelope building)."""
        if self.threads_at_start is None or self.threads_at_end is None:
            return None
        return {"event_loop_thread": round(self.threads_at_end[0] - self.threads_at_start[0], 2),
                "other_threads": round(self.threads_at_end[1] - self.threads_at_start[1], 2)}

    def read_log(self) -> None:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.startswith(b"{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            event = e.get("event")
            if event == "assembler.emitted":
                self.emitted += 1
                self.emitted_spans += e.get("spans", 0)
                self.last_emitted = _ts(e)
                self.emitted_at.append(self.last_emitted)
            elif event == "assembler.serving":
                self.metrics_port = e.get("metrics_port")
            elif event == "assembler.assigned":
                self.assigned.append((_ts(e), list(e.get("partitions", []))))
            elif event == "assembler.revoked":
                self.revoked.append((_ts(e), list(e.get("partitions", []))))
            elif e.get("level") in ("warning", "error", "critical"):
                self.problems[f"{e.get('level')}: {event}"] += 1

    def partitions(self, until: float | None = None) -> list[int]:
        """Partitions owned at ``until`` (unix s; default: now) according to the assigned/revoked log lines."""
        owned: set[int] = set()
        events = [(t, 0, ps) for t, ps in self.revoked] + [(t, 1, ps) for t, ps in self.assigned]
        for t, is_assign, parts in sorted(events):
            if until is not None and t > until:
                break
            parts = parts if is_assign else [-1 - p for p in parts]
            for p in parts:
                if p >= 0:
                    owned.add(p)
                else:
                    owned.discard(-1 - p)
        return sorted(owned)

    def bursts(self, t0: float) -> dict[str, Any]:
        """How evenly envelopes came out: the longest pause between two envelopes (from ``t0``, the window start)
        and the most envelopes logged within one second."""
        times = sorted(self.emitted_at)
        if not times:
            return {}
        gaps = [b - a for a, b in zip([t0, *times], times)]
        per_s = Counter(int(t - t0) for t in times)
        return {"longest_pause_s": round(max(gaps), 2), "max_envelopes_in_1s": max(per_s.values()),
                "seconds_with_envelopes": len(per_s)}

    async def watch_gauges(self) -> None:
        m = await scrape_metrics(self.metrics_port)
        self.peak_open_traces = max(self.peak_open_traces, m.get("open_traces", 0.0))
        self.peak_buffered_mb = max(self.peak_buffered_mb, m.get("buffered_bytes", 0.0) / 2**20)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        return super().log_tail(lines)


def thread_cpu_s(pid: int) -> tuple[float, float] | None:
    """(main thread, all other threads) cumulative CPU seconds of process ``pid``."""
    import psutil

    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return None
    main = sum(t.user_time + t.system_time for t in threads if t.id == pid)
    return main, sum(t.user_time + t.system_time for t in threads if t.id != pid)


def _ts(event: dict) -> float:
    with contextlib.suppress(KeyError, ValueError, TypeError):
        return datetime.fromisoformat(event["timestamp"]).timestamp()
    return time.time()


class OutputWatcher:
    """Consumes the traces topic from the beginning and notes, per trace id, the Kafka timestamp of its first
    envelope; counts duplicates, unexpected keys and close reasons."""

    def __init__(self, bootstrap: str, topic: str, expected: dict[str, int]) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.expected = expected
        self.first_ms: dict[str, int] = {}
        self.duplicates = 0
        self.unexpected: set[str] = set()
        self.reasons: Counter[str] = Counter()
        self.missing = len(expected)
        self.complete = asyncio.Event()
        self._consumer = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                          max_partition_fetch_bytes=4 * 2**20, fetch_max_bytes=16 * 2**20)
        await self._consumer.start()
        await self._consumer._client.force_metadata_update()
        parts = self._consumer.partitions_for_topic(self.topic) or set()
        if not parts:
            raise RuntimeError(f"traces topic {self.topic} has no partitions")
        tps = [TopicPartition(self.topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            for msgs in batches.values():
                for m in msgs:
                    key = (m.key or b"").decode(errors="replace")
                    if key not in self.expected:
                        self.unexpected.add(key)
                        continue
                    if key in self.first_ms:
                        self.duplicates += 1
                        continue
                    self.first_ms[key] = m.timestamp
                    self.missing -= 1
                    reason = next((v.decode() for k, v in (m.headers or ()) if k == "closed-reason"), "?")
                    self.reasons[reason] += 1
            if self.missing == 0:
                self.complete.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


async def scrape_metrics(port: int | None) -> dict[str, float]:
    """The worker's ``trace_source_assembler_*`` samples summed over labels (except ``reason``/``kind``)."""
    if not port:
        return {}
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
    except Exception as exc:  # noqa: BLE001 - metrics are informative only
        return {"scrape_error": str(exc)}  # type: ignore[dict-item]
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith("trace_source_assembler_") or s.name.endswith(("_bucket", "_created")):
                continue
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k in ("reason", "kind"))
            name = s.name.removeprefix("trace_source_assembler_") + (f"{{{label}}}" if label else "")
            out[name] = out.get(name, 0.0) + s.value
    return out


async def verify_output(bootstrap: str, topic: str, expected: dict[str, int], artifact_dir: Path) -> dict[str, Any]:
    """Re-read the whole traces topic (after the workers stopped) and check every envelope's span count."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from pipeline.outputs import CLAIM_CHECK_CONTENT_TYPE

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 2**20, fetch_max_bytes=16 * 2**20)
    await consumer.start()
    counts: Counter[str] = Counter()
    wrong_spans: list[str] = []
    versions: Counter[int] = Counter()
    claim_checks = 0
    records = 0
    envelope_bytes = 0
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for msgs in (await consumer.getmany(timeout_ms=500, max_records=2000)).values():
                for m in msgs:
                    records += 1
                    key = (m.key or b"").decode(errors="replace")
                    counts[key] += 1
                    value = m.value or b""
                    ctype = next((v.decode() for k, v in (m.headers or ()) if k == "content-type"), "")
                    if ctype == CLAIM_CHECK_CONTENT_TYPE:
                        claim_checks += 1
                        value = (artifact_dir / json.loads(value)["claim_check"]["path"]).read_bytes()
                    envelope_bytes += len(value)
                    doc = json.loads(value)
                    versions[doc.get("envelope_version", 0)] += 1
                    n = len(doc.get("spans", ()))
                    if key in expected and n != expected[key] and len(wrong_spans) < 20:
                        wrong_spans.append(f"{key}: {n} spans, {expected[key]} sent")
                    elif key in expected and n != expected[key]:
                        wrong_spans.append("...")
    finally:
        await consumer.stop()
    return {"records": records, "distinct_traces": len(counts),
            "missing": sum(1 for k in expected if k not in counts),
            "unexpected": sum(1 for k in counts if k not in expected),
            "duplicates": sum(n - 1 for n in counts.values() if n > 1),
            "wrong_span_counts": wrong_spans, "versions": {str(k): v for k, v in versions.items()},
            "claim_checks": claim_checks,
            "envelope_bytes_mean": round(envelope_bytes / records) if records else 0}


@dataclass
class PhaseResult:
    workers: int
    round: int = 1
    spans: int = 0
    envelopes: int = 0
    window_s: float = 0.0
    startup_s: float | None = None  # launch -> first assignment (process start + group join; not in the window)
    wall_s: float = 0.0  # launch -> last envelope
    spans_per_s: float = 0.0
    envelopes_per_s: float = 0.0
    scaling: float | None = None  # spans/s relative to the 1-worker phase of the same round
    cpu_cores: dict[str, float | None] = field(default_factory=dict)
    spans_per_cpu_s: float | None = None  # spans / CPU seconds of all workers in the window
    efficiency: float | None = None  # spans_per_cpu_s relative to the 1-worker phase of the same round
    per_worker: list[dict[str, Any]] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    duplicates_during_run: int = 0
    verification: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None


def profiled_window_s(workers: list[WorkerProc], watcher: OutputWatcher) -> float:
    """Seconds from the first assignment to the last first envelope (the profiled window), for the report."""
    starts = [w.assigned[0][0] for w in workers if w.assigned]
    ends = list(watcher.first_ms.values())
    return round(max(ends) / 1000 - min(starts), 1) if starts and ends else 0.0


async def run_assembler_phase(args, broker: Broker, workload: Workload, input_topic: str, n: int, round_no: int,
                              timeline: Timeline, work_dir: Path, stamp: str) -> PhaseResult:
    res = PhaseResult(workers=n, round=round_no, spans=workload.spans, envelopes=len(workload.expected))
    tag = f"r{round_no}-{n}w"
    traces_topic = f"{input_topic}.traces-{tag}"
    dlq_topic = f"{input_topic}.dlq-{tag}"
    group = f"trace-source-assembler-bench-{stamp}-{tag}"
    for topic in (traces_topic, dlq_topic):
        await broker.create_topic(topic, args.partitions)
    phase_dir = work_dir / tag
    phase_dir.mkdir()
    artifact_dir = phase_dir / "artifacts"
    # A fresh traces index too: the workload's trace ids repeat in every phase, and an index left by an earlier
    # phase (or run, on a reused --kafka-bootstrap cluster) would make the workers drop them as already emitted.
    flags = {"kafka-bootstrap-servers": broker.bootstrap, "input-topic": input_topic, "traces-topic": traces_topic,
             "traces-index-topic": f"{traces_topic}-index", "dlq-topic": dlq_topic, "group-id": group,
             "quiet-period-s": args.quiet_period, "metrics-host": "127.0.0.1", "metrics-port": 0,
             "log-level": args.worker_log_level, "log-format": "json", "state-dir": phase_dir / "state",
             "artifact-dir": artifact_dir}
    for opt in args.worker_option:
        k, _, v = opt.partition("=")
        flags[k.strip().removeprefix("--").replace("_", "-")] = v
    cmd = ["worker", "assemble"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    pstats = phase_dir / "profile.pstats" if args.profile else None
    cmd = (profiling.command(pstats, args.profile_clock, "trace_source.cli", *cmd) if pstats
           else [str(TRACE_SOURCE), *cmd])
    watcher = OutputWatcher(broker.bootstrap, traces_topic, workload.expected)
    await watcher.start()
    workers = [WorkerProc(i, cmd, phase_dir / f"worker-{i}.log") for i in range(n)]
    label = f"[{n} worker{'s' if n > 1 else ''}{f', round {round_no}' if args.rounds > 1 else ''}]"
    say(f"{label} starting {n} x trace-source worker assemble (group {group}, quiet period {args.quiet_period:g} s) "
        f"-> {traces_topic} ...")
    t_launch = time.time()
    for w in workers:
        w.launch()
    for w in workers:
        timeline.watch(w.pid)
    expected_n = len(workload.expected)
    deadline = time.monotonic() + args.timeout
    last_progress, last_missing, last_change = time.monotonic(), expected_n, time.monotonic()
    last_gauges = 0.0
    profiling_window = False
    try:
        while not watcher.complete.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(watcher.complete.wait(), 0.25)
            for w in workers:
                w.read_log()
            if pstats and not profiling_window and workers[0].assigned:
                profiling.send(workers[0], True)  # the window opens at the first assignment (within ~0.25 s)
                profiling_window = True
            for w in workers:
                if w.assigned and w.threads_at_start is None:
                    w.threads_at_start = thread_cpu_s(w.pid)
            dead = [w for w in workers if w.exited() is not None]
            if dead and not watcher.complete.is_set():
                for w in dead:
                    res.errors.append(f"worker {w.index} exited with {w.exited()} before the end:\n{w.log_tail()}")
                break
            now = time.monotonic()
            if watcher.missing != last_missing:
                last_missing, last_change = watcher.missing, now
            if now > deadline or (now - last_change > args.stall_timeout and any(w.assigned for w in workers)):
                why = "timeout" if now > deadline else f"no new envelope for {args.stall_timeout:g} s"
                res.errors.append(f"{why}: {expected_n - watcher.missing:,} of {expected_n:,} traces have an "
                                  f"envelope")
                break
            if now - last_gauges >= 1:  # peaks of the open-trace gauges (how much is buffered before closing)
                last_gauges = now
                await asyncio.gather(*(w.watch_gauges() for w in workers if w.metrics_port))
            if now - last_progress >= 5:
                last_progress = now
                started = min((w.assigned[0][0] for w in workers if w.assigned), default=None)
                done = expected_n - watcher.missing
                rate = f", {done / (time.time() - started):,.0f} envelopes/s" if started and done else ""
                say(f"{label} {time.time() - t_launch:5.1f} s: {done:,}/{expected_n:,} envelopes{rate}; "
                    f"partitions: {'; '.join(f'w{w.index} {w.partitions()}' for w in workers)}")
        timeline.sample()
        for w in workers:
            w.threads_at_end = thread_cpu_s(w.pid)
        if profiling_window:
            profiling.send(workers[0], False)
        if watcher.complete.is_set():
            await asyncio.sleep(args.settle)  # late duplicates (e.g. a rebalance replay) would show up now
        for w in workers:
            w.read_log()
        metrics = [await scrape_metrics(w.metrics_port) for w in workers]
    finally:
        t_stop = time.time()  # rebalances after this are the workers leaving the group on SIGTERM
        if pstats:
            await asyncio.sleep(1.0)  # the profiler writes its file on SIGUSR2
        for w in workers:
            w.terminate()
        codes = [await asyncio.to_thread(w.wait, 30.0) for w in workers]
        await watcher.stop()
    if pstats:
        if pstats.exists():
            keep = results_path(None, f"profile-assembler-{stamp}.pstats")
            shutil.copy(pstats, keep)
            res.profile = profiling.report(keep, args.top, profiled_window_s(workers, watcher), args.profile_clock,
                                           "the worker (event loop and envelope-building threads)")
        else:
            res.errors.append(f"no profile was written ({pstats})")
    for w in workers:
        w.read_log()
    if args.keep_logs:
        keep = RESULTS_DIR / f"assembler-{stamp}-logs"
        keep.mkdir(parents=True, exist_ok=True)
        for w in workers:
            shutil.copy(w.log_path, keep / f"{tag}-worker-{w.index}.log")

    # -- the measured window: first assignment -> the last trace's first envelope (Kafka CreateTime) ----------------
    first_assigned = [w.assigned[0][0] for w in workers if w.assigned]
    t0 = min(first_assigned) if first_assigned else t_launch
    done = [watcher.first_ms[k] for k in workload.expected if k in watcher.first_ms]
    t1 = max(done) / 1000 if done else time.time()
    res.startup_s = round(t0 - t_launch, 2) if first_assigned else None
    res.window_s = round(t1 - t0, 3)
    res.wall_s = round(t1 - t_launch, 2)
    got_spans = sum(workload.expected[k] for k in watcher.first_ms)
    res.spans_per_s = round(got_spans / res.window_s) if res.window_s > 0 else 0
    res.envelopes_per_s = round(len(watcher.first_ms) / res.window_s) if res.window_s > 0 else 0
    worker_pids = [w.pid for w in workers]
    res.cpu_cores = cpu_breakdown(timeline, {"workers": worker_pids, "broker": broker.pids(),
                                             "bench": [os.getpid()]}, t0, t1)
    worker_cpu_s = timeline.cpu_s(worker_pids, t0, t1)
    if worker_cpu_s:
        res.spans_per_cpu_s = round(got_spans / worker_cpu_s)
    res.reasons = dict(watcher.reasons)
    res.duplicates_during_run = watcher.duplicates
    for w, m, code in zip(workers, metrics, codes):
        cpu = timeline.cpu_s([w.pid], t0, t1)
        res.per_worker.append({
            "worker": w.index, "pid": w.pid, "partitions": w.partitions(until=t_stop),
            "assignments": [{"at": round(t - t0, 2), "partitions": p} for t, p in w.assigned if t <= t_stop],
            "revocations": [{"at": round(t - t0, 2), "partitions": p} for t, p in w.revoked if t <= t_stop],
            "envelopes": w.emitted, "spans": w.emitted_spans,
            "last_envelope_at_s": round(w.last_emitted - t0, 2) if w.last_emitted else None,
            "cpu_s": None if cpu is None else round(cpu, 2),
            "cpu_cores": None if cpu is None else round(cpu / max(res.window_s, 1e-9), 3),
            "peak_open_traces": int(w.peak_open_traces), "peak_buffered_mb": round(w.peak_buffered_mb, 1),
            **w.bursts(t0),
            "build_s": None if "envelope_build_seconds_sum" not in m else round(m["envelope_build_seconds_sum"], 2),
            "peak_rss_mb": timeline.peak_rss_mb(w.pid), "exit_code": code, "thread_cpu_s": w.thread_split(),
            "log_problems": dict(w.problems), "metrics": m})
        if code not in (0, None):
            res.errors.append(f"worker {w.index} exit code {code}:\n{w.log_tail()}")
    rebalanced = any(sum(t <= t_stop for t, _ in w.assigned) > 1 or any(t <= t_stop for t, _ in w.revoked)
                     for w in workers)
    if rebalanced:
        res.notes.append("the group rebalanced during the run (more than one assignment per worker): replayed "
                         "records and re-emitted envelopes count against the figures")
    retries = sum(int(pw["metrics"].get("publish_errors_total", 0) or 0) for pw in res.per_worker)
    if retries:
        res.notes.append(f"{retries:,} failed envelope publishes were retried by the workers "
                         f"(trace_source_assembler_publish_errors_total; see log_problems per worker)")
    if n > 1 and len(first_assigned) == n and max(first_assigned) - min(first_assigned) > 1.0:
        res.notes.append(f"workers got their first partitions {max(first_assigned) - min(first_assigned):.1f} s "
                         f"apart")

    # -- correctness ---------------------------------------------------------------------------------------------
    if watcher.missing:
        res.errors.append(f"{watcher.missing:,} of {expected_n:,} traces got no envelope")
    if watcher.unexpected:
        res.errors.append(f"{len(watcher.unexpected)} envelopes for trace ids that were not sent")
    if watcher.duplicates:
        res.errors.append(f"{watcher.duplicates} duplicate envelopes (same trace id) while measuring"
                          f"{' (the group rebalanced)' if rebalanced else ''}")
    if not args.no_verify:
        say(f"{label} verifying every envelope on {traces_topic} (span counts) ...")
        v = await verify_output(broker.bootstrap, traces_topic, workload.expected, artifact_dir)
        res.verification = v
        if v["duplicates"] > watcher.duplicates:
            res.errors.append(f"{v['duplicates'] - watcher.duplicates} more duplicate envelopes after the workers "
                              f"were stopped")
        if v["wrong_span_counts"]:
            res.errors.append(f"envelopes with a wrong span count: {v['wrong_span_counts'][:5]}")
    c = res.cpu_cores
    say(f"{label} {len(watcher.first_ms):,}/{expected_n:,} envelopes, {res.spans_per_s:,} spans/s, "
        f"{res.envelopes_per_s:,} envelopes/s over {res.window_s:.1f} s (+{res.startup_s} s start-up and group "
        f"join, not counted), {fmt_k(res.spans_per_cpu_s)} spans per worker CPU-s; CPU cores: workers "
        f"{fmt(c.get('workers'))}, broker {fmt(c.get('broker'))}, bench {fmt(c.get('bench'))}, other "
        f"{fmt(c.get('others'))}, machine {fmt(c.get('machine_busy'))}/{os.cpu_count()}")
    for pw in res.per_worker:
        say(f"{label}   worker {pw['worker']}: partitions {pw['partitions']}, {pw['envelopes']:,} envelopes, "
            f"{pw['spans']:,} spans, last at {pw['last_envelope_at_s']} s, {fmt(pw['cpu_cores'])} cores "
            f"({pw['cpu_s']} CPU-s: {fmt_threads(pw['thread_cpu_s'])}; {pw['build_s']} s wall in build_envelope), "
            f"peak RSS {pw['peak_rss_mb']} MB; "
            f"up to {pw['peak_open_traces']:,} open traces ({pw['peak_buffered_mb']} MB OTLP), longest pause between "
            f"envelopes {pw.get('longest_pause_s')} s, up to {pw.get('max_envelopes_in_1s')} envelopes in 1 s, "
            f"{int(pw['metrics'].get('publish_errors_total', 0) or 0):,} publish retries")
    for e in res.errors:
        say(f"{label} ERROR: {e}")
    for note in res.notes:
        say(f"{label} note: {note}")
    note_cpu_contention(c, label, res.notes, "other processes used {others:.2f} cores during the window: compare "
                                             "spans per worker CPU-s rather than spans/s")
    return res


# ================================================================================================ report


def fmt_threads(split: dict[str, float] | None) -> str:
    if not split:
        return "thread split unknown"
    return f"event loop {split['event_loop_thread']}, envelope building {split['other_threads']}"


def summarize(phases: list[PhaseResult], worker_counts: list[int]) -> list[dict[str, Any]]:
    """Per worker count: the median of each figure over rounds (one round: the figures themselves)."""
    out = []
    for n in worker_counts:
        rows = [p for p in phases if p.workers == n]
        if not rows:
            continue
        cores = {k: median([r.cpu_cores.get(k) for r in rows]) for k in rows[0].cpu_cores}
        out.append({
            "workers": n, "rounds": len(rows),
            "spans_per_s": median([r.spans_per_s for r in rows]),
            "envelopes_per_s": median([r.envelopes_per_s for r in rows]),
            "window_s": median([r.window_s for r in rows]),
            "scaling": median([r.scaling for r in rows]),
            "spans_per_cpu_s": median([r.spans_per_cpu_s for r in rows]),
            "efficiency": median([r.efficiency for r in rows]),
            "cpu_cores": cores,
            "peak_rss_mb": [max(r.per_worker[i]["peak_rss_mb"] for r in rows) for i in range(n)],
            "errors": sum(len(r.errors) for r in rows)})
    return out


def print_table(receiver: ReceiverResult, summary: list[dict[str, Any]], workload: Workload, rounds: int) -> None:
    header = (f"{'phase':<22} {'spans/s':>8} {'env/s':>6} {'window s':>8} {'x 1 wkr':>7} | {'spans/CPU-s':>11} "
              f"{'eff.':>5} | {'proc':>4} {'kafka':>5} {'bench':>5} {'other':>5} | {'peak RSS MB':<13} {'check':<5}")
    say("")
    say(f"{workload.spans:,} spans in {len(workload.expected):,} traces ({len(workload.bodies)} requests of "
        f"~{workload.body_bytes_mean / 1024:.0f} KiB)" + (f"; median of {rounds} rounds" if rounds > 1 else ""))
    say(header)
    say("-" * len(header))
    c = receiver.cpu_cores
    say(f"{'receiver (serve->Kafka)':<22} {receiver.spans_per_s:>8,.0f} {receiver.envelopes_per_s or 0:>6,.0f} "
        f"{receiver.window_s:>8.1f} {'':>7} | {fmt_k(receiver.spans_per_cpu_s):>11} {'':>5} | "
        f"{fmt(c.get('serve')):>4} {fmt(c.get('broker')):>5} {fmt(c.get('bench')):>5} {fmt(c.get('others')):>5} | "
        f"{receiver.peak_rss_mb:<13.0f} {'ok' if not receiver.errors else 'ERROR':<5}")
    for s in summary:
        c = s["cpu_cores"]
        name = f"assembler, {s['workers']} worker{'s' if s['workers'] > 1 else ''}"
        scaling = "1.00" if s["workers"] == 1 else fmt(s["scaling"])
        eff = "1.00" if s["workers"] == 1 else fmt(s["efficiency"])
        rss = "/".join(f"{x:.0f}" for x in s["peak_rss_mb"])
        say(f"{name:<22} {s['spans_per_s']:>8,.0f} {s['envelopes_per_s']:>6,.0f} {s['window_s']:>8.1f} "
            f"{scaling:>7} | {fmt_k(s['spans_per_cpu_s']):>11} {eff:>5} | {fmt(c.get('workers')):>4} "
            f"{fmt(c.get('broker')):>5} {fmt(c.get('bench')):>5} {fmt(c.get('others')):>5} | {rss:<13} "
            f"{'ok' if not s['errors'] else 'ERROR':<5}")
    say(f"env/s: envelopes (= traces) per second; the receiver's column counts traces made durable. x 1 wkr: spans/s "
        f"relative to 1 worker (the scaling ratio). spans/CPU-s: spans divided by the CPU seconds of the measured "
        f"process(es) (serve, or all workers), and eff. that relative to 1 worker (1.00 = no CPU lost to scaling out). "
        f"CPU cores used in the window by: proc = the measured process(es), kafka = the broker JVM (if the bench "
        f"started it), bench = this process (load generator / traces-topic reader), other = everything else on this "
        f"{os.cpu_count()}-core machine. peak RSS per process (worker 0/worker 1).")


# ================================================================================================ main (e2e)


def run_e2e(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    quiet_library_logs()
    worker_counts = [int(x) for x in args.workers.split(",") if x.strip()]
    stamp = timestamp()
    out_path = results_path(args.output, f"assembler-{stamp}.json")
    env = environment()
    with contextlib.suppress(Exception):  # the code under test may be uncommitted work: say which files differ
        env["worktree_changes"] = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline", "normalizers", "receiver", "sinks", "trace_source"],
            cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    started = time.time()
    say(f"assembler bench: ~{args.spans:,} spans ({args.spans_per_trace} per trace, {args.spans_per_request} per "
        f"request), {args.partitions} partitions, workers {worker_counts}"
        f"{f', {args.rounds} rounds' if args.rounds > 1 else ''}, quiet period {args.quiet_period:g} s; "
        f"{os.cpu_count()} CPUs, load average {env['load_average_at_start'][0]:.2f}")
    t0 = time.monotonic()
    say("[workload] generating requests ...")
    workload = build_workload(args)
    say(f"[workload] {len(workload.bodies)} requests, {workload.spans:,} spans, {len(workload.expected):,} traces, "
        f"{workload.body_bytes_mean / 1024:.0f} KiB per request ({time.monotonic() - t0:.1f} s)")
    broker = Broker(args)
    timeline = Timeline().start()
    input_topic = f"trace-source.bench-assembler-{stamp}"
    receiver: ReceiverResult | None = None
    phases: list[PhaseResult] = []
    fatal: str | None = None
    try:
        broker.start()
        timeline.watch(os.getpid())
        for pid in broker.pids():
            timeline.watch(pid)
        with tempfile.TemporaryDirectory(prefix="trace-source-asmbench-") as tmp:
            work_dir = Path(tmp)

            async def run_all() -> None:
                nonlocal receiver
                await broker.create_topic(input_topic, args.partitions)
                say(f"[kafka] topic {input_topic} created ({args.partitions} partitions)")
                receiver = await run_receiver_phase(args, broker, workload, input_topic, timeline, work_dir, stamp)
                if receiver.errors:
                    raise RuntimeError("loading the input failed: " + "; ".join(receiver.errors))
                for r in range(1, args.rounds + 1):
                    for n in worker_counts:
                        phases.append(await run_assembler_phase(args, broker, workload, input_topic, n, r, timeline,
                                                                work_dir, stamp))

            try:
                asyncio.run(run_all())
            except Exception as exc:  # noqa: BLE001 - reported, results so far still written
                fatal = f"{type(exc).__name__}: {exc}"
                say(f"ERROR: {fatal}")
    finally:
        timeline.stop()
        broker.stop()

    for p in phases:  # ratios against the 1-worker phase of the same round
        base = next((b for b in phases if b.workers == 1 and b.round == p.round), None)
        if base is not None and base.spans_per_s:
            p.scaling = round(p.spans_per_s / base.spans_per_s, 3)
        if base is not None and base.spans_per_cpu_s and p.spans_per_cpu_s:
            p.efficiency = round(p.spans_per_cpu_s / base.spans_per_cpu_s, 3)
    summary = summarize(phases, worker_counts)
    if receiver is not None and summary:
        print_table(receiver, summary, workload, args.rounds)
        for s in summary:
            if receiver.spans_per_s:
                per_cpu = 100 * (s["spans_per_cpu_s"] or 0) / (receiver.spans_per_cpu_s or 1)
                say(f"assembler with {s['workers']} worker(s): {100 * s['spans_per_s'] / receiver.spans_per_s:.0f}% "
                    f"of the receiver's rate ({per_cpu:.0f}% per CPU-s)")
    errors = ([fatal] if fatal else []) + (receiver.errors if receiver else []) + [e for p in phases for e in p.errors]
    doc = {
        "benchmark": "assembler", "mode": "e2e",
        "started_at": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "config": {"spans": args.spans, "spans_per_request": args.spans_per_request,
                   "spans_per_trace": args.spans_per_trace, "partitions": args.partitions,
                   "connections": args.connections, "workers": worker_counts, "rounds": args.rounds,
                   "quiet_period_s": args.quiet_period, "worker_log_level": args.worker_log_level,
                   "worker_options": args.worker_option, "rebalance_delay_ms": args.rebalance_delay_ms,
                   "broker_jvm": args.broker_jvm, "profile": args.profile},
        "environment": env, "kafka": {**broker.info, "input_topic": input_topic},
        "workload": {"requests": len(workload.bodies), "spans": workload.spans, "traces": len(workload.expected),
                     "body_bytes_mean": workload.body_bytes_mean},
        "receiver": asdict(receiver) if receiver else None,
        "summary": summary,
        "phases": [asdict(p) for p in phases],
        "errors": errors,
    }
    write_results(out_path, doc)
    if errors:
        say(f"{len(errors)} error(s); see above and the JSON")
    return 1 if errors or not phases else 0


# ================================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="python -m bench.assembler_bench", description="\n\n".join(parts[:6]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("e2e", "micro"), default="e2e",
                        help="e2e = Kafka, serve and worker processes as described above; micro = the in-process "
                             "CPU cost per span of parse / buffer / envelope (no Kafka) (default: %(default)s)")
    w = parser.add_argument_group("workload (both modes)")
    w.add_argument("--spans-per-request", type=int, default=512,
                   help="spans per OTLP export request (default: %(default)s)")
    w.add_argument("--spans-per-trace", type=int, default=24,
                   help="spans per agent run (trace); each trace lies in one request (default: %(default)s)")
    e = parser.add_argument_group("e2e mode")
    e.add_argument("--spans", type=int, default=200_000,
                   help="spans to load (rounded up to whole requests); the same workload every run "
                        "(default: %(default)s)")
    e.add_argument("--workers", default="1,2",
                   help="comma-separated worker counts, one assembler phase each, in this order; scaling is "
                        "relative to the 1-worker phase (default: %(default)s)")
    e.add_argument("--partitions", type=int, default=4,
                   help="partitions of the spans topic (and of the traces/DLQ topics); a worker count above it "
                        "leaves workers idle (default: %(default)s)")
    e.add_argument("--rounds", type=int, default=None,
                   help="e2e: run every worker count this many times, interleaved; the table shows medians, the "
                        "JSON every phase (default: 1). micro: best of N (default: 3)")
    e.add_argument("--connections", type=int, default=8,
                   help="concurrent keep-alive connections loading the receiver (default: %(default)s)")
    e.add_argument("--quiet-period", type=float, default=0.05,
                   help="the workers' --quiet-period-s: how long a trace whose root ended waits for more data. On a "
                        "preloaded backlog a worker ingests for this long before the first trace is due, and then "
                        "closes everything it ingested meanwhile in one batch; 0.05 s keeps batches near one poll "
                        "(--poll-max-records), 0.5 s or more makes thousands of traces close at once (see "
                        "bench/README.md) (default: %(default)s)")
    e.add_argument("--worker-option", action="append", default=[], metavar="NAME=VALUE",
                   help="extra `worker assemble` flag, repeatable, e.g. --worker-option redaction=false or "
                        "--worker-option poll-max-records=1000")
    e.add_argument("--worker-log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="the workers' --log-level; 'info' (as shipped) logs one line per envelope, which the bench "
                        "also uses for the per-worker envelope and span counts (default: %(default)s)")
    e.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one assembler phase may take before it fails (default: %(default)s)")
    e.add_argument("--stall-timeout", type=float, default=60.0,
                   help="fail a phase when no new envelope arrives for this long after the first assignment "
                        "(default: %(default)s)")
    e.add_argument("--settle", type=float, default=1.0,
                   help="seconds to keep watching the traces topic after the last expected envelope, to catch "
                        "duplicates (default: %(default)s)")
    e.add_argument("--no-verify", action="store_true",
                   help="skip re-reading every envelope after each phase to check its span count (done after the "
                        "workers stopped, so it never counts against the figures)")
    e.add_argument("--kafka-bootstrap", default=None, metavar="HOST:PORT",
                   help="use this Kafka cluster instead of starting a single-node broker with "
                        "tests/kafka_harness.py; the bench's topics are created there and deleted afterwards")
    e.add_argument("--broker-jvm", choices=("server", "harness"), default="server",
                   help="JVM flags of the broker the bench starts: 'server' = those of kafka-server-start.sh (1 GiB "
                        "heap, G1, full JIT); 'harness' = the test harness's start-up-optimised flags "
                        "(default: %(default)s)")
    e.add_argument("--rebalance-delay-ms", type=int, default=3000,
                   help="group.initial.rebalance.delay.ms of the broker the bench starts (Kafka's default; the test "
                        "harness uses 0): workers started together then join one group generation instead of the "
                        "first one taking every partition and giving half back (default: %(default)s)")
    e.add_argument("--keep-logs", action="store_true",
                   help="copy the serve and worker logs (JSON lines, one per envelope at info) to "
                        "bench/results/assembler-<timestamp>-logs/")
    e.add_argument("--output", type=Path, default=None,
                   help="JSON results file (default: bench/results/assembler-<timestamp>.json)")
    e.add_argument("--profile", action="store_true",
                   help="one phase with one worker (implies --workers 1 --rounds 1), the worker under cProfile from "
                        "its first partition assignment to the last envelope: its event loop and the threads that "
                        "build envelopes; prints the top functions and writes "
                        "bench/results/profile-assembler-<timestamp>.pstats (python -m pstats)")
    profiling.add_arguments(e, top=30)
    m = parser.add_argument_group("micro mode")
    m.add_argument("--requests", type=int, default=8, help="export requests to split and assemble "
                                                          "(default: %(default)s)")
    m.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spans_per_request < 1 or args.spans_per_trace < 1:
        parser.error("--spans-per-request and --spans-per-trace must be >= 1")
    if args.mode == "micro":
        return run_micro(args)
    args.rounds = args.rounds or 1
    if args.profile:
        args.workers, args.rounds = "1", 1
    try:
        counts = [int(x) for x in args.workers.split(",") if x.strip()]
    except ValueError:
        parser.error("--workers takes comma-separated integers, e.g. 1,2")
    if not counts or min(counts) < 1:
        parser.error("--workers needs at least one count >= 1")
    if args.spans < 1 or args.partitions < 1 or args.connections < 1 or args.quiet_period <= 0 or args.rounds < 1:
        parser.error("--spans, --partitions, --connections, --rounds must be >= 1 and --quiet-period > 0")
    for opt in args.worker_option:
        if "=" not in opt:
            parser.error(f"--worker-option takes NAME=VALUE, got {opt!r}")
    return run_e2e(args)


if __name__ == "__main__":
    raise SystemExit(main())
