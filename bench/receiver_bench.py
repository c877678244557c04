"""Receiver throughput benchmark: OTLP/HTTP protobuf into trace-source, next to a parse-only ceiling.

One run measures, one after the other on this machine, each target as a separate server process:

* ``reference`` - ``bench/reference_server.py``: a bare aiohttp handler that reads the body and parses it as
  ``ExportTraceServiceRequest`` (upb), then answers an empty 200. The ceiling for a one-process Python receiver.
* ``kafka`` - ``trace-source serve --kafka-bootstrap-servers ...`` into a fresh topic (``--partitions``), with the
  product's producer (idempotent, ``acks=all``). The broker is a single-node Kafka started by the bench from
  ``tests/kafka_harness.py`` unless ``--kafka-bootstrap`` names one.
* ``local`` - ``trace-source serve --state-dir <tmp>``: the embedded SQLite log, fsync on (the default).

Load: ``--connections`` keep-alive connections, each sending OTLP/HTTP protobuf requests of ``--spans-per-request``
GenAI spans (``bench.payloads.make_genai_request``; ``--payloads`` different precomputed bodies, so bodies differ)
back to back, from ``--generator-processes`` separate load-generator processes (aiohttp client). Each target gets
``--warmup`` seconds of load that are not counted, then ``--duration`` seconds that are. Only 200 responses count;
any other status or a transport error is an error. Throughput counts requests that completed inside the window.

Besides spans/s, requests/s, latency percentiles and the server's peak RSS, the bench reports the CPU (in cores)
used during the window by the server, the load generator, the broker JVM (when the bench started it) and the whole
machine, because on a 2-core machine those compete for the same cores.

``--profile TARGET`` runs only that target with the server under cProfile (enabled for the measured window only,
main thread only), writes a ``.pstats`` file and prints the top functions by own time plus a per-component summary.

Results go to ``bench/results/receiver-<timestamp>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    PROTOBUF, REPO, TOPIC_MAX_BYTES, ServerProcess, cpu_cores, delete_topic, environment, fmt, fmt_k, java_children,
    machine_cpu_s, median, note_cpu_contention, percentile, process_cpu_s, quiet_library_logs, results_path, say,
    start_harness_broker, timestamp, write_results,
)
from bench import peers, profiling

OWN_TARGETS = ("reference", "kafka", "kafka-workers", "local")
TARGETS = (*OWN_TARGETS, *peers.PEER_TARGETS)
KAFKA_TARGETS = ("kafka", "kafka-workers", "otelcol-sync", "otelcol-queue")
TARGET_TITLES = {
    "reference": "reference (parse only)",
    "kafka": "trace-source -> Kafka",
    "kafka-workers": "trace-source -> Kafka, N workers",  # N from --serve-workers (set in main)
    "local": "trace-source -> local log",
    **peers.PEER_TITLES,
}
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")


# ================================================================================================ load generator


async def _loadgen(cfg: dict[str, Any]) -> dict[str, Any]:
    """One load-generator process: ``cfg["connections"]`` loops posting bodies back to back over keep-alive."""
    import aiohttp

    with open(cfg["payloads_path"], "rb") as f:
        payloads: list[bytes] = pickle.load(f)
    url = cfg["url"]
    n_conn = cfg["connections"]
    connector = aiohttp.TCPConnector(limit=n_conn, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg["request_timeout_s"])
    headers = {"Content-Type": PROTOBUF}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        print("ready", flush=True)
        if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
            return {}
        t_begin = time.perf_counter()
        t_measure = t_begin + cfg["warmup_s"]
        t_end = t_measure + cfg["duration_s"]
        latencies: list[float] = []
        errors: dict[str, int] = {}
        counts = {"ok": 0, "bytes": 0, "warmup_ok": 0}
        cpu = {}

        async def cpu_marks() -> None:
            await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
            cpu["start"] = time.process_time()
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            cpu["end"] = time.process_time()

        async def connection(i: int) -> None:
            k = cfg["payload_offset"] + i
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                body = payloads[k % len(payloads)]
                k += 1
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        status: int | str = resp.status
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                    status = type(exc).__name__
                t1 = time.perf_counter()
                in_window = t_measure <= t1 <= t_end
                if status == 200:
                    if in_window:
                        counts["ok"] += 1
                        counts["bytes"] += len(body)
                        latencies.append((t1 - t0) * 1000.0)
                    else:
                        counts["warmup_ok"] += 1
                else:
                    if in_window:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                    if not isinstance(status, int):
                        await asyncio.sleep(0.05)  # server gone or refusing: do not spin

        await asyncio.gather(cpu_marks(), *(connection(i) for i in range(n_conn)))
    return {"ok": counts["ok"], "bytes": counts["bytes"], "warmup_ok": counts["warmup_ok"], "errors": errors,
            "latencies_ms": latencies, "cpu_s": cpu.get("end", 0.0) - cpu.get("start", 0.0)}


def _loadgen_main(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    result = asyncio.run(_loadgen(cfg))
    print(json.dumps(result), flush=True)
    return 0


class LoadGenerators:
    """``n`` load-generator processes sharing ``connections``; started, released together, then collected."""

    def __init__(self, url: str, payloads_path: Path, connections: int, processes: int, warmup_s: float,
                 duration_s: float, work_dir: Path, n_payloads: int) -> None:
        self.procs: list[subprocess.Popen] = []
        processes = max(1, min(processes, connections))
        share = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
        for i, n in enumerate(share):
            cfg = {"url": url, "payloads_path": str(payloads_path), "connections": n,
                   "payload_offset": i * max(1, n_payloads // processes), "warmup_s": warmup_s,
                   "duration_s": duration_s, "request_timeout_s": 60.0}
            cfg_path = work_dir / f"loadgen-{i}.json"
            cfg_path.write_text(json.dumps(cfg))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.receiver_bench", "--_loadgen-worker", str(cfg_path)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        for p in self.procs:
            line = _readline(p.stdout, timeout_s)
            if line.strip() != "ready":
                raise RuntimeError(f"load generator did not start (said {line!r}, exit {p.poll()})")

    def go(self) -> None:
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()

    def collect(self, timeout_s: float) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            line = _readline(p.stdout, timeout_s)
            p.wait(10)
            if not line:
                raise RuntimeError(f"load generator exited with {p.returncode} without a result")
            out.append(json.loads(line))
        return out

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _readline(stream, timeout_s: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no answer from a load generator within {timeout_s:.0f}s")
    return box[0]


# ================================================================================================ sampling


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``serve --workers``: the supervisor and its workers)."""
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


class Sampler:
    """Samples the server's RSS (summed over its processes) every ``interval_s`` (peak kept) from start to stop, in
    a thread."""

    def __init__(self, pids: list[int], interval_s: float = 0.1) -> None:
        import psutil

        self.procs = [psutil.Process(pid) for pid in pids]
        self.interval_s = interval_s
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in self.procs))
            except psutil.Error:
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds(pids: list[int]) -> float | None:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return None
        total += process_cpu_s(t)
    return total


class CpuWindow:
    """CPU seconds of groups of processes and of the whole machine between :meth:`begin` and :meth:`end`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start: dict[str, float | None] = {}
        self.result: dict[str, float | None] = {}

    def _snapshot(self) -> dict[str, Any]:
        import psutil

        snap: dict[str, Any] = {name: _cpu_seconds(pids) if pids else None for name, pids in self.groups.items()}
        snap["_machine"] = psutil.cpu_times()
        snap["_t"] = time.perf_counter()
        return snap

    def begin(self) -> None:
        self.start = self._snapshot()

    def end(self) -> None:
        end = self._snapshot()
        wall = end["_t"] - self.start["_t"]
        spent: dict[str, float | None] = {}
        for name in self.groups:
            a, b = self.start.get(name), end.get(name)
            spent[name] = None if a is None or b is None else b - a
        (busy0, steal0, iowait0), (busy1, steal1, iowait1) = (machine_cpu_s(self.start["_machine"]),
                                                              machine_cpu_s(end["_machine"]))
        self.result = cpu_cores(spent, wall, busy1 - busy0, steal1 - steal0, iowait1 - iowait0)


# ================================================================================================ one target


@dataclass
class TargetResult:
    target: str
    spans_per_s: float = 0.0
    requests_per_s: float = 0.0
    mib_per_s: float = 0.0
    ok_requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    cpu_cores: dict[str, float | None] = field(default_factory=dict)
    window_s: float = 0.0
    server: str = ""
    round: int = 1
    spans_per_server_cpu_s: float | None = None
    ratio_to_reference: float | None = None
    cpu_efficiency_ratio_to_reference: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_load(server: ServerProcess, args: argparse.Namespace, payloads_path: Path, work_dir: Path,
             extra_cpu_groups: dict[str, list[int]], on_window=None) -> TargetResult:
    """Drive ``server`` with the load generators for warm-up + duration and summarize the measured window.

    ``on_window(begin: bool)`` is called right when the measured window begins and ends (used by --profile).
    """
    result = TargetResult(server.name)
    gens = LoadGenerators(server.url, payloads_path, args.connections, args.generator_processes, args.warmup,
                          args.duration, work_dir, args.payloads)
    try:
        gens.wait_ready()
        server_pids = process_tree(server.pid)
        cpu = CpuWindow({"server": server_pids, "generator": gens.pids(), **extra_cpu_groups})
        with Sampler(server_pids) as sampler:
            t_go = time.perf_counter()
            gens.go()
            time.sleep(max(0.0, t_go + args.warmup - time.perf_counter()))
            if on_window:
                on_window(True)
            cpu.begin()
            time.sleep(max(0.0, t_go + args.warmup + args.duration - time.perf_counter()))
            cpu.end()
            if on_window:
                on_window(False)
            outs = gens.collect(timeout_s=120.0)
        result.peak_rss_mb = round(sampler.peak_rss / 2**20, 1)
    finally:
        gens.kill()
    if server.proc is not None and server.proc.poll() is not None:
        result.notes.append(f"server exited during the run with {server.proc.returncode}")
    latencies = sorted(x for o in outs for x in o["latencies_ms"])
    result.window_s = args.duration
    result.ok_requests = sum(o["ok"] for o in outs)
    for o in outs:
        for k, v in o["errors"].items():
            result.errors[k] = result.errors.get(k, 0) + v
    result.requests_per_s = round(result.ok_requests / args.duration, 1)
    result.spans_per_s = round(result.ok_requests * args.spans_per_request / args.duration, 0)
    result.mib_per_s = round(sum(o["bytes"] for o in outs) / 2**20 / args.duration, 1)
    result.latency_ms = {"p50": percentile(latencies, 50, 2), "p90": percentile(latencies, 90, 2),
                         "p99": percentile(latencies, 99, 2), "max": round(latencies[-1], 2) if latencies else None,
                         "mean": round(sum(latencies) / len(latencies), 2) if latencies else None}
    result.cpu_cores = cpu.result
    gen_cpu = sum(o["cpu_s"] for o in outs) / args.duration
    result.cpu_cores["generator_self_reported"] = round(gen_cpu, 3)
    if result.cpu_cores.get("server"):
        result.spans_per_server_cpu_s = round(result.spans_per_s / result.cpu_cores["server"], 0)
    return result


# ================================================================================================ targets


def _serve_cmd(args: argparse.Namespace, state_dir: Path, extra: list[str], pstats: Path | None) -> list[str]:
    serve_args = ["serve", "--port", "0", "--grpc-port", "0", "--state-dir", str(state_dir), *extra]
    if pstats is not None:
        return profiling.command(pstats, args.profile_clock, "trace_source.cli", *serve_args)
    return [str(Path(sys.executable).with_name("trace-source")), *serve_args]


def _reference_cmd(args: argparse.Namespace, pstats: Path | None) -> list[str]:
    if pstats is not None:
        return profiling.command(pstats, args.profile_clock, "bench.reference_server", "--port", "0")
    return [sys.executable, "-m", "bench.reference_server", "--port", "0"]


class KafkaForBench:
    """The broker for the kafka target: the harness's single node started here, or ``--kafka-bootstrap``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.broker = None
        self.bootstrap: str = args.kafka_bootstrap or ""
        self.topic = f"trace-source.bench-{timestamp()}"
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        if not self.bootstrap:
            self.broker, jvm_options = start_harness_broker(self.args.broker_jvm)
            self.bootstrap = self.broker.bootstrap_servers
            self.info = {"started_by_bench": True, "version": self.broker.version, "jvm_options": jvm_options}
        else:
            self.info = {"started_by_bench": False}
        from sinks.kafka_admin import create_topic

        asyncio.run(create_topic(self.bootstrap, self.topic, self.args.partitions,
                                 max_request_size=TOPIC_MAX_BYTES))
        self.info.update(bootstrap=self.bootstrap, topic=self.topic, partitions=self.args.partitions)
        say(f"[kafka] topic {self.topic} created ({self.args.partitions} partitions)")

    def cpu_groups(self) -> dict[str, list[int]]:
        return {"broker": java_children()} if self.broker is not None else {}

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        elif self.bootstrap and self.args.kafka_bootstrap:
            with contextlib.suppress(Exception):
                asyncio.run(delete_topic(self.bootstrap, self.topic))


def run_target(target: str, args: argparse.Namespace, payloads_path: Path, work_dir: Path,
               kafka: KafkaForBench | None, pstats: Path | None = None, round_no: int = 1) -> TargetResult:
    cpu_groups: dict[str, list[int]] = {}
    server: ServerProcess | None = None
    if target in ("otelcol-sync", "otelcol-queue"):
        assert kafka is not None
        server = peers.collector_process(target, work_dir, round_no, kafka.bootstrap, kafka.topic)
        cpu_groups = kafka.cpu_groups()
    elif target == "phoenix":
        server = peers.phoenix_process(work_dir, round_no)
    elif target == "reference":
        cmd = _reference_cmd(args, pstats)
    elif target in ("kafka", "kafka-workers"):
        assert kafka is not None
        extra = ["--kafka-bootstrap-servers", kafka.bootstrap, "--kafka-topic", kafka.topic,
                 "--workers", str(args.serve_workers if target == "kafka-workers" else 1)]
        if args.compression:
            extra += ["--kafka-compression", args.compression]
        cmd = _serve_cmd(args, work_dir / f"state-kafka-{round_no}", extra, pstats)
        cpu_groups = kafka.cpu_groups()
    else:
        cmd = _serve_cmd(args, work_dir / f"state-local-{round_no}", [], pstats)
    if server is None:
        server = ServerProcess(TARGET_TITLES[target], cmd, work_dir / f"{target}-{round_no}-server.log")
    t0 = time.monotonic()
    server.start()
    say(f"[{target}] server up (pid {server.pid}) in {time.monotonic() - t0:.1f} s"
        f"{'; ' + server.serving['sink'] if 'sink' in server.serving else ''}; "
        f"load: {args.warmup:g} s warm-up + {args.duration:g} s measured ...")

    def on_window(begin: bool) -> None:
        if pstats is not None:
            profiling.send(server, begin)

    try:
        result = run_load(server, args, payloads_path, work_dir, cpu_groups, on_window)
    finally:
        code = server.stop()
    result.target = target
    result.server = server.serving.get("sink") or server.serving.get("server", "")
    if code not in (0, None) or result.error_count:
        result.notes.append(f"server exit code {code}; log tail:\n{server.log_tail(15)}")
    c = result.cpu_cores
    say(f"[{target}] {result.spans_per_s:,.0f} spans/s, {result.requests_per_s:,.1f} req/s, "
        f"p50 {result.latency_ms['p50']} ms, p99 {result.latency_ms['p99']} ms, {result.error_count} errors, "
        f"peak RSS {result.peak_rss_mb} MB, {fmt_k(result.spans_per_server_cpu_s)} spans per server CPU-s; CPU cores: server {fmt(c.get('server'))}, "
        f"generator {fmt(c.get('generator'))}, broker {fmt(c.get('broker'))}, "
        f"other processes {fmt(c.get('others'))}, machine {fmt(c.get('machine_busy'))}/{os.cpu_count()} "
        f"(steal {fmt(c.get('machine_steal'))})")
    if result.errors:
        say(f"[{target}] errors by status: {result.errors}")
    note_cpu_contention(c, f"[{target}]", result.notes,
                        f"other processes used {{others:.2f}} of {os.cpu_count()} cores during the window: this "
                        f"target competed for CPU, compare spans per server CPU-s rather than spans/s")
    return result


# ================================================================================================ main


def summarize(rounds: list[TargetResult]) -> TargetResult:
    """One row per target: medians over rounds (each figure separately), errors summed, peak RSS the maximum."""
    if len(rounds) == 1:
        return rounds[0]
    r0 = rounds[0]
    out = TargetResult(r0.target, server=r0.server, round=0, window_s=r0.window_s)
    for name in ("spans_per_s", "requests_per_s", "mib_per_s", "spans_per_server_cpu_s", "ratio_to_reference",
                 "cpu_efficiency_ratio_to_reference"):
        setattr(out, name, median([getattr(r, name) for r in rounds]))
    out.ok_requests = sum(r.ok_requests for r in rounds)
    for r in rounds:
        for k, v in r.errors.items():
            out.errors[k] = out.errors.get(k, 0) + v
        out.notes += r.notes
    out.latency_ms = {k: median([r.latency_ms.get(k) for r in rounds]) for k in r0.latency_ms}
    out.cpu_cores = {k: median([r.cpu_cores.get(k) for r in rounds]) for k in r0.cpu_cores}
    out.peak_rss_mb = max(r.peak_rss_mb for r in rounds)
    return out


def _print_table(results: list[TargetResult], rounds: int) -> None:
    header = (f"{'target':<31} {'spans/s':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
              f"{'RSS MB':>6} {'x% of ceiling':>13} | {'spans/CPU-s':>11} {'x% eff.':>7} | "
              f"{'srv':>4} {'gen':>4} {'kafka':>5} {'other':>5}")
    say("\n" + (f"median of {rounds} rounds per figure" if rounds > 1 else ""))
    say(header)
    say("-" * len(header))
    for r in results:
        ratio = "-" if r.ratio_to_reference is None else f"{100 * r.ratio_to_reference:.0f}%"
        eff = "-" if r.cpu_efficiency_ratio_to_reference is None else f"{100 * r.cpu_efficiency_ratio_to_reference:.0f}%"
        if r.target == "reference":
            ratio = eff = "ceiling"
        c = r.cpu_cores
        per_cpu = "-" if not r.spans_per_server_cpu_s else f"{r.spans_per_server_cpu_s:,.0f}"
        say(f"{TARGET_TITLES[r.target]:<31} {r.spans_per_s:>9,.0f} {r.requests_per_s:>7,.1f} "
            f"{fmt(r.latency_ms.get('p50'), 1):>7} {fmt(r.latency_ms.get('p99'), 1):>7} {r.error_count:>6} "
            f"{r.peak_rss_mb:>6.0f} {ratio:>13} | {per_cpu:>11} {eff:>7} | "
            f"{fmt(c.get('server')):>4} {fmt(c.get('generator')):>4} {fmt(c.get('broker')):>5} "
            f"{fmt(c.get('others')):>5}")
    say(f"x% of ceiling: spans/s relative to the reference. spans/CPU-s: spans/s divided by the server's CPU use, "
        f"and x% eff. that relative to the reference (less sensitive to other load on the machine). Last four "
        f"columns: CPU cores used in the window by the server, the load generator, the broker JVM (when started "
        f"by the bench) and all other processes (this machine has {os.cpu_count()} cores).")


def peer_ratios(results: list[TargetResult]) -> list[dict[str, Any]]:
    """trace-source (each own target that writes durably) divided by each comparable peer, per round, and the
    median over rounds: spans/s, spans per server CPU-s, and p99 latency (below 1 = trace-source is faster)."""
    out = []
    # Like with like: the Kafka targets against every peer; the embedded log only against Phoenix's local store.
    pairs = (("kafka", peers.PEER_TARGETS), ("kafka-workers", peers.PEER_TARGETS), ("local", ("phoenix",)))
    for own, compared in pairs:
        for peer in compared:
            per_round = []
            for r in results:
                if r.target != own:
                    continue
                p = next((x for x in results if x.target == peer and x.round == r.round), None)
                if p is None:
                    continue
                per_round.append({
                    "round": r.round,
                    "spans_per_s": round(r.spans_per_s / p.spans_per_s, 3) if p.spans_per_s else None,
                    "spans_per_cpu_s": (round(r.spans_per_server_cpu_s / p.spans_per_server_cpu_s, 3)
                                        if r.spans_per_server_cpu_s and p.spans_per_server_cpu_s else None),
                    "p99_latency": (round(r.latency_ms["p99"] / p.latency_ms["p99"], 3)
                                    if r.latency_ms.get("p99") and p.latency_ms.get("p99") else None)})
            if per_round:
                out.append({"trace_source": own, "peer": peer, "peer_durable_before_reply": peers.PEER_TARGETS[peer],
                            "rounds": per_round,
                            **{k: median([x[k] for x in per_round]) for k in ("spans_per_s", "spans_per_cpu_s",
                                                                              "p99_latency")}})
    return out


def _print_ratios(ratios: list[dict[str, Any]]) -> None:
    say("\ntrace-source / peer (same run; medians of the per-round ratios; > 1 = trace-source does more, "
        "p99 < 1 = trace-source answers sooner):")
    say(f"{'trace-source target':<31} {'peer':<31} {'spans/s':>8} {'spans/CPU-s':>11} {'p99':>6}  peer replies")
    for r in ratios:
        when = "after durable (same promise)" if r["peer_durable_before_reply"] else "BEFORE durable"
        say(f"{TARGET_TITLES[r['trace_source']]:<31} {TARGET_TITLES[r['peer']]:<31} {fmt(r['spans_per_s']):>8} "
            f"{fmt(r['spans_per_cpu_s']):>11} {fmt(r['p99_latency']):>6}  {when}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.receiver_bench",
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds of measured load per target (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of load before each measurement, not counted (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=8,
                        help="concurrent keep-alive connections, each sending one request at a time "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every target this many times, interleaved (reference, kafka, local, "
                             "reference, ...); the table shows medians, the JSON every round (default: %(default)s)")
    parser.add_argument("--generator-processes", type=int, default=1,
                        help="load-generator processes sharing the connections; the generator's own CPU use is "
                             "reported in the 'gen' column (default: %(default)s)")
    parser.add_argument("--spans-per-request", type=int, default=512,
                        help="spans in each OTLP request (default: %(default)s)")
    parser.add_argument("--payloads", type=int, default=8,
                        help="different precomputed request bodies, sent round robin (default: %(default)s)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of: reference (parse-only ceiling), kafka (trace-source into "
                             "Kafka, one process), kafka-workers (serve --workers --serve-workers), "
                             "local (trace-source into the embedded log), and the peers otelcol-sync (the "
                             "OpenTelemetry Collector into Kafka, sending queue off: replies after the Kafka ack), "
                             "otelcol-queue (its default queue: replies before durability), phoenix (Arize Phoenix, "
                             "OTLP into SQLite); a peer that is not installed is skipped with the reason "
                             "(default: %(default)s)")
    parser.add_argument("--serve-workers", type=int, default=2,
                        help="worker processes of the kafka-workers target (serve --workers N, SO_REUSEPORT); the "
                             "kafka target runs one (default: %(default)s)")
    parser.add_argument("--kafka-bootstrap", default=None, metavar="HOST:PORT",
                        help="use this Kafka cluster instead of starting a single-node broker with "
                             "tests/kafka_harness.py; a fresh topic is created on it and deleted afterwards")
    parser.add_argument("--partitions", type=int, default=6,
                        help="partitions of the benchmark topic (default: %(default)s)")
    parser.add_argument("--compression", choices=COMPRESSIONS, default=None,
                        help="passed to serve as --kafka-compression (default: serve's own default)")
    parser.add_argument("--broker-jvm", choices=("server", "harness"), default="server",
                        help="JVM flags of the broker the bench starts: 'server' = those of kafka-server-start.sh "
                             "(1 GiB heap, G1, full JIT); 'harness' = the test harness's start-up-optimised flags "
                             "(C1 JIT only, SerialGC) (default: %(default)s)")
    parser.add_argument("--profile", choices=TARGETS, default=None, metavar="TARGET",
                        help="instead of the comparison, run only TARGET (kafka, local or reference) with its "
                             "server under cProfile during the measured window; writes a .pstats file next to the "
                             "JSON results and prints the top functions")
    profiling.add_arguments(parser, top=25)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results file (default: bench/results/receiver-<timestamp>.json, "
                             "or profile-<target>-<timestamp>.json with --profile)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Internal modes (subprocesses of the bench itself); not part of --help.
    if argv[:1] == ["--_loadgen-worker"]:
        return _loadgen_main(argv[1])

    args = build_parser().parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.profile:
        targets = [args.profile]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        build_parser().error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0 or args.spans_per_request < 1:
        build_parser().error("--connections and --spans-per-request must be >= 1, --duration > 0, --warmup >= 0")

    if args.rounds < 1 or (args.profile and args.rounds != 1):
        build_parser().error("--rounds must be >= 1 (and 1 with --profile)")
    if args.profile in (*peers.PEER_TARGETS, "kafka-workers"):
        build_parser().error("--profile takes reference, kafka or local (one process)")
    if args.serve_workers < 2:
        build_parser().error("--serve-workers must be >= 2 (the kafka target is the one-process figure)")
    TARGET_TITLES["kafka-workers"] = f"trace-source -> Kafka, {args.serve_workers} wkr"
    sys.path.insert(0, str(REPO))
    quiet_library_logs()
    skipped: dict[str, str] = {}
    for target in [t for t in targets if t in peers.PEER_TARGETS]:
        ok, why = peers.available(target)
        if not ok:
            skipped[target] = why
            say(f"[{target}] skipped: {why}")
        elif why:
            say(f"[{target}] {why}")
    targets = [t for t in targets if t not in skipped]
    from bench.payloads import make_genai_request

    stamp = timestamp()
    out_path = results_path(args.output, f"profile-{args.profile}-{stamp}.json" if args.profile
                            else f"receiver-{stamp}.json")
    env = environment()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="trace-source-bench-") as tmp:
        work_dir = Path(tmp)
        payloads = [make_genai_request(args.spans_per_request, seed=i).SerializeToString()
                    for i in range(args.payloads)]
        payloads_path = work_dir / "payloads.pickle"
        payloads_path.write_bytes(pickle.dumps(payloads))
        body_kib = sum(map(len, payloads)) / len(payloads) / 1024
        say(f"receiver bench: {', '.join(targets)}; {args.spans_per_request} spans/request (~{body_kib:.0f} KiB "
            f"protobuf, {args.payloads} different bodies), {args.connections} connections from "
            f"{args.generator_processes} generator process(es), {args.warmup:g} s warm-up + {args.duration:g} s "
            f"per target; {os.cpu_count()} CPUs, load average {env['load_average_at_start'][0]:.2f}")
        results: list[TargetResult] = []
        kafka_info: dict[str, Any] = {}
        profile: dict[str, Any] | None = None
        kafka = None
        phases = [(n, t) for n in range(1, args.rounds + 1) for t in targets]
        try:
            if set(targets) & set(KAFKA_TARGETS):  # one broker for every round; idle while other targets run
                kafka = KafkaForBench(args)
                kafka.start()
                kafka_info = kafka.info
            for i, (n, target) in enumerate(phases, 1):
                say(f"[{target}] phase {i}/{len(phases)}: {TARGET_TITLES[target]}"
                    f"{f' (round {n}/{args.rounds})' if args.rounds > 1 else ''}")
                pstats_path = out_path.with_suffix(".pstats") if args.profile else None
                result = run_target(target, args, payloads_path, work_dir, kafka, pstats_path, n)
                result.round = n
                results.append(result)
                if pstats_path is not None:
                    if pstats_path.exists():
                        profile = profiling.report(pstats_path, args.top, args.duration, args.profile_clock)
                    else:
                        say(f"[{target}] no profile was written ({pstats_path})")
        finally:
            if kafka is not None:
                kafka.stop()

    for r in results:  # ratios against the reference of the same round
        ref = next((x for x in results if x.target == "reference" and x.round == r.round), None)
        if ref is None or r.target == "reference":
            continue
        if ref.spans_per_s > 0:
            r.ratio_to_reference = round(r.spans_per_s / ref.spans_per_s, 3)
        if ref.spans_per_server_cpu_s and r.spans_per_server_cpu_s:
            r.cpu_efficiency_ratio_to_reference = round(r.spans_per_server_cpu_s / ref.spans_per_server_cpu_s, 3)
    summary = [summarize([r for r in results if r.target == t]) for t in targets]
    if not args.profile:
        _print_table(summary, args.rounds)
    ratios = peer_ratios(results)
    if ratios and not args.profile:
        _print_ratios(ratios)
    doc = {
        "benchmark": "receiver", "started_at": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "config": {"duration_s": args.duration, "warmup_s": args.warmup, "connections": args.connections,
                   "generator_processes": args.generator_processes, "spans_per_request": args.spans_per_request,
                   "payloads": args.payloads, "body_bytes_mean": round(body_kib * 1024),
                   "compression": args.compression or "serve default", "profile": args.profile},
        "environment": env, "kafka": kafka_info,
        "summary": [{**r.__dict__, "title": TARGET_TITLES[r.target], "error_count": r.error_count}
                    for r in summary],
        "rounds": [{**r.__dict__, "title": TARGET_TITLES[r.target], "error_count": r.error_count}
                   for r in results],
        "profile": profile,
        "peer_ratios": ratios,
        "skipped_targets": skipped,
    }
    write_results(out_path, doc)
    # Peers are measured as they behave (a queue that fills answers 503): only trace-source's own targets fail the run.
    return 1 if any(r.error_count or r.ok_requests == 0 for r in results if r.target in OWN_TARGETS) else 0


if __name__ == "__main__":
    sys.exit(main())
