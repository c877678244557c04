"""Soak benchmark: the loop in its cluster shape at about half its measured capacity for a long time.

What runs, all real and each its own process: a single-node Kafka 3.9.2 broker (``tests/kafka_harness.py``), a
Postgres server (``tests/postgres_harness.py``; the ledger and the journal), ``trace-source serve --workers 1`` on
Kafka, ``trace-source worker assemble`` and ``trace-source worker grade`` (execution policy ``grade``, ledger and
journal in Postgres). The load is ``bench/payloads.py`` agent runs (24 spans per trace, 20 traces per OTLP/HTTP
protobuf request, about one in ten runs with a failing tool call), every trace and span id unique.

1. **Capacity**: requests as fast as 4 connections go for ``--capacity-s``; capacity = spans sent ÷ the time until
   the last of their traces was graded (receiver, assembler and grader together — the slowest stage decides).
2. **Soak**: ``--load-fraction`` (0.5) of that rate, paced, for ``--duration-min`` (22). Every ``--sample-s`` (5)
   the RSS (and CPU time) of every process — receiver, assembler, grade worker, broker JVM, Postgres (PSS summed over
   its processes, so shared buffers count once) — and the lag of both consumer groups (log-end minus committed
   offset, summed over partitions).
3. **Drain and check**: once both groups' lag is 0 and every trace is graded, the whole traces topic is read back:
   every acknowledged span must be in an envelope (lost otherwise), in exactly one envelope key (duplicated
   otherwise); each envelope key graded once in the ledger (``stage_runs``) and once in the journal; nothing on
   the dead-letter topic.

Memory is judged after the warm-up (``--warmup-min``, 5: the assembler fills its memory of closed traces —
``retained_bytes``, ``closed_traces_remembered`` — during the first minutes): the slope of a least-squares line
through each process's RSS, in MiB per 10 minutes. A process whose slope exceeds ``--slope-limit`` (5 MiB per
10 min) is flagged and the run exits 1; the broker's JVM is reported but not judged (its heap grows until the
collector decides to run). The results go to ``bench/results/soak-<timestamp>.json``. This is a benchmark, not a
test: nothing here is timed against a limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.common import (REPO, LoggedProcess, environment, java_children, results_path, say, start_harness_broker,
                          timestamp, write_results)
from bench.payloads import make_genai_request

_BIN = Path(sys.executable).with_name("trace-source")
PROTOBUF = "application/x-protobuf"
TOPICS = {"spans": "trace-source.spans", "traces": "trace-source.traces", "grades": "trace-source.grades",
          "dlq": "trace-source.dlq"}
GROUPS = {"assembler": ("trace-source-assembler", TOPICS["spans"]), "grader": ("trace-source-grader", TOPICS["traces"])}
PARTITIONS = 4
MIB = 2**20


class Proc(LoggedProcess):
    """A ``trace-source`` process, ready once its log has the JSON event ``ready_event``."""

    def __init__(self, name: str, argv: list[str], log_path: Path, ready_event: str, env: dict[str, str]) -> None:
        super().__init__([str(_BIN), *argv], log_path)
        self.name, self.ready_event = name, ready_event
        self.env.update(env)
        self.event: dict[str, Any] = {}

    def start(self, timeout_s: float = 90.0) -> "Proc":
        self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if self.ready_event in line:
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if event.get("event") == self.ready_event:
                            self.event = event
                            return self
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"{self.name} did not start within {timeout_s:.0f} s:\n{self.log_tail()}")


# ================================================================================================ load


@dataclass
class Load:
    """What was sent and acknowledged: per trace id (hex), its span ids (8 bytes each)."""

    url: str
    spans_per_request: int
    spans_per_trace: int
    acked: dict[str, frozenset[bytes]] = field(default_factory=dict)
    seed: int = 0
    requests_ok: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    failed: int = 0

    def next_body(self) -> tuple[bytes, dict[str, frozenset[bytes]]]:
        self.seed += 1
        req = make_genai_request(self.spans_per_request, self.spans_per_trace, seed=1_000_000 + self.seed)
        spans: dict[str, set[bytes]] = {}
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    spans.setdefault(sp.trace_id.hex(), set()).add(sp.span_id)
        return req.SerializeToString(), {k: frozenset(v) for k, v in spans.items()}

    @property
    def spans(self) -> int:
        return sum(len(v) for v in self.acked.values())

    async def post(self, session, body: bytes, spans: dict[str, frozenset[bytes]]) -> None:
        """POST until a 200 (503 and transport errors are retried after ``Retry-After``), then count it acked."""
        for _attempt in range(60):
            retry_after = 0.5
            try:
                async with session.post(self.url, data=body, headers={"Content-Type": PROTOBUF}) as resp:
                    await resp.read()
                    status: int | str = resp.status
                    with contextlib.suppress(TypeError, ValueError):
                        retry_after = min(5.0, float(resp.headers.get("Retry-After", 0.5)))
            except Exception as exc:  # noqa: BLE001 - counted and retried, as an exporter does
                status = type(exc).__name__
            if status == 200:
                self.acked.update(spans)
                self.requests_ok += 1
                return
            self.retries[str(status)] = self.retries.get(str(status), 0) + 1
            await asyncio.sleep(retry_after)
        self.failed += 1

    async def flat_out(self, seconds: float, connections: int = 4) -> None:
        import aiohttp

        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            async def connection() -> None:
                while time.monotonic() < deadline:
                    body, spans = self.next_body()
                    await self.post(session, body, spans)
            await asyncio.gather(*(connection() for _ in range(connections)))

    async def paced(self, spans_per_s: float, seconds: float, stop: asyncio.Event) -> None:
        """Requests at ``spans_per_s`` (each one started on schedule, however long the previous one took)."""
        import aiohttp

        interval = self.spans_per_request / spans_per_s
        start = time.monotonic()
        tasks: set[asyncio.Task] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            n = 0
            while not stop.is_set() and time.monotonic() - start < seconds:
                body, spans = self.next_body()
                task = asyncio.create_task(self.post(session, body, spans))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
                await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
            if tasks:
                await asyncio.gather(*tasks)


# ================================================================================================ observation


class Observer:
    """Consumer-group lag (an admin client and a group-less consumer) and the ledger / journal counts."""

    def __init__(self, bootstrap: str, database_url: str) -> None:
        self.bootstrap, self.database_url = bootstrap, database_url
        self.admin = self.consumer = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self.admin.start()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        await self.consumer.start()

    async def stop(self) -> None:
        for client in (self.consumer, self.admin):
            if client is not None:
                with contextlib.suppress(Exception):
                    await (client.close() if client is self.admin else client.stop())

    async def end_offsets(self, topic: str) -> dict[int, int]:
        from aiokafka.structs import TopicPartition

        await self.consumer._client.force_metadata_update()
        parts = sorted(self.consumer.partitions_for_topic(topic) or ())
        ends = await self.consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}

    async def lag(self) -> dict[str, int]:
        out = {}
        for name, (group, topic) in GROUPS.items():
            ends = await self.end_offsets(topic)
            committed = await self.admin.list_consumer_group_offsets(group)
            done = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic}
            out[name] = sum(max(0, end - max(0, done.get(p, 0))) for p, end in ends.items())
        return out

    def ledger(self) -> dict[str, Any]:
        import psycopg

        with psycopg.connect(self.database_url, connect_timeout=10) as conn:
            states = dict(conn.execute("SELECT state, count(*) FROM stage_runs WHERE stage = 'grade' "
                                       "GROUP BY state").fetchall())
            graded = conn.execute("SELECT count(*), count(DISTINCT envelope_key) FROM journal "
                                  "WHERE phase = 'grade'").fetchone()
            verdicts = dict(conn.execute("SELECT status, count(*) FROM journal WHERE phase = 'grade' "
                                         "GROUP BY status").fetchall())
        return {"grade_rows": states, "grade_events": graded[0], "graded_envelope_keys": graded[1],
                "verdicts": verdicts}

    def graded(self) -> int:
        return self.ledger()["grade_rows"].get("done", 0)


def memory_mb(pids: list[int], pss: bool = False) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            total += p.memory_full_info().pss if pss else p.memory_info().rss
    return round(total / MIB, 1)


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return round(total, 2)


def tree(pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    return []


def postgres_pids(port: int) -> list[int]:
    """The postmaster listening on ``port`` and its children (backends, checkpointer, WAL writer, ...)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and "-p" in cmd and str(port) in cmd:
            return tree(proc.pid)
    for proc in psutil.process_iter(["name", "ppid"]):  # started without -p on the command line: by its port
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == "postgres" and any(c.laddr.port == port for c in proc.net_connections("tcp")):
                return tree(proc.pid)
    return []


def slope_mib_per_10min(series: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per 10 minutes."""
    if len(series) < 3:
        return None
    n = len(series)
    mx = sum(t for t, _ in series) / n
    my = sum(v for _, v in series) / n
    var = sum((t - mx) ** 2 for t, _ in series)
    if var == 0:
        return None
    return round(sum((t - mx) * (v - my) for t, v in series) / var * 600, 2)


# ================================================================================================ check


async def read_envelopes(bootstrap: str) -> list[tuple[str, str, frozenset[bytes]]]:
    """Every record of the traces topic as (trace id, idempotency key, span ids of the envelope)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_bytes=64 * MIB,
                                max_partition_fetch_bytes=16 * MIB)
    await consumer.start()
    out = []
    try:
        await consumer._client.force_metadata_update()
        parts = [TopicPartition(TOPICS["traces"], p)
                 for p in sorted(consumer.partitions_for_topic(TOPICS["traces"]) or ())]
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        await consumer.seek_to_beginning(*parts)
        remaining = {tp for tp in parts if ends[tp] > 0}
        while remaining:
            batches = await consumer.getmany(timeout_ms=2000, max_records=2000)
            for tp, records in batches.items():
                for r in records:
                    doc = orjson.loads(r.value)
                    key = dict(r.headers).get("idempotency-key", b"").decode() or doc.get("idempotency_key", "")
                    out.append((doc["trace_id"], key,
                                frozenset(bytes.fromhex(s["span_id"]) for s in doc.get("spans", ()))))
                    if r.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
    finally:
        await consumer.stop()
    return out


def check(load: Load, envelopes: list[tuple[str, str, frozenset[bytes]]]) -> dict[str, Any]:
    """Lost and duplicated spans and envelopes, from what was acknowledged and what is on the traces topic."""
    records_per_key: dict[str, int] = {}
    keys_per_span: dict[tuple[str, bytes], set[str]] = {}
    for trace_id, key, spans in envelopes:
        records_per_key[key] = records_per_key.get(key, 0) + 1
        if records_per_key[key] == 1:
            for s in spans:
                keys_per_span.setdefault((trace_id, s), set()).add(key)
    lost = dup = 0
    for trace_id, spans in load.acked.items():
        for s in spans:
            keys = keys_per_span.get((trace_id, s))
            if not keys:
                lost += 1
            elif len(keys) > 1:
                dup += 1
    traces_with_versions = len({t for t, _, _ in envelopes}) - len(load.acked)
    return {"spans_acked": load.spans, "traces_acked": len(load.acked), "envelope_records": len(envelopes),
            "envelope_keys": len(records_per_key),
            "duplicate_envelope_records": sum(n - 1 for n in records_per_key.values()),
            "spans_lost": lost, "spans_in_more_than_one_envelope_key": dup,
            "unexpected_traces": max(0, traces_with_versions)}


# ================================================================================================ main


async def wait_drained(observer: Observer, traces: int, timeout_s: float) -> float:
    """Wait until both groups have no lag and ``traces`` grade rows are done; returns when (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lag = await observer.lag()
        if not any(lag.values()) and observer.graded() >= traces:
            return time.monotonic()
        await asyncio.sleep(1.0)
    raise TimeoutError(f"not drained within {timeout_s:.0f} s: lag {await observer.lag()}, "
                       f"graded {observer.graded()} of {traces}")


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import postgres_harness

    broker, _ = start_harness_broker("server", {"group.initial.rebalance.delay.ms": "0"})
    pg = postgres_harness.PostgresServer()
    procs: list[Proc] = []
    try:
        pg.start()
        database_url = postgres_harness.create_database(pg.url, "soak")
        say(f"[postgres] ready on port {pg.port}")
        from sinks.kafka_admin import create_topic

        for topic in TOPICS.values():
            await create_topic(broker.bootstrap_servers, topic, PARTITIONS, max_request_size=16 * MIB)
        kafka = ["--kafka-bootstrap-servers", broker.bootstrap_servers]
        env = {"TRACE_SOURCE_DATABASE_URL": database_url}
        serve = Proc("receiver", ["serve", "--port", "0", "--grpc-port", "0", "--workers", "1", *kafka,
                                  "--state-dir", str(work / "serve")], work / "serve.log", "serving", {}).start()
        procs.append(serve)
        procs.append(Proc("assembler", ["worker", "assemble", *kafka, "--metrics-port", "0",
                                        "--artifact-dir", str(work / "artifacts")],
                          work / "assembler.log", "assembler.serving", env).start())
        procs.append(Proc("grader", ["worker", "grade", *kafka, "--metrics-port", "0", "--execution-policy", "grade",
                                     "--artifact-dir", str(work / "artifacts"), "--state-dir", str(work / "grade")],
                          work / "grader.log", "stage.serving", env).start())
        url = f"http://127.0.0.1:{serve.event['http_port']}/v1/traces"
        observer = Observer(broker.bootstrap_servers, database_url)
        await observer.start()
        load = Load(url, args.spans_per_request, args.spans_per_trace)

        say(f"[capacity] {args.capacity_s:.0f} s flat out (4 connections), then until every trace is graded ...")
        t0 = time.monotonic()
        await load.flat_out(args.capacity_s)
        sent_s = time.monotonic() - t0
        t_done = await wait_drained(observer, len(load.acked), 900)
        capacity = load.spans / (t_done - t0)
        rate = capacity * args.load_fraction
        say(f"[capacity] {load.spans:,} spans ({len(load.acked):,} traces) in {sent_s:.0f} s, all graded after "
            f"{t_done - t0:.0f} s: capacity {capacity:,.0f} spans/s; soaking at {rate:,.0f} spans/s for "
            f"{args.duration_min:g} min")
        capacity_info = {"spans": load.spans, "traces": len(load.acked), "send_s": round(sent_s, 1),
                         "graded_after_s": round(t_done - t0, 1), "spans_per_s": round(capacity)}

        pids = {p.name: (lambda p=p: tree(p.pid)) for p in procs}
        pids["broker_jvm"] = java_children
        pids["postgres"] = lambda: postgres_pids(pg.port)
        samples: list[dict[str, Any]] = []
        stop = asyncio.Event()
        soak_t0 = time.monotonic()
        duration_s = args.duration_min * 60

        async def sampler() -> None:
            while not stop.is_set():
                t = round(time.monotonic() - soak_t0, 1)
                row: dict[str, Any] = {"t_s": t, "spans_acked": load.spans}
                for name, get in pids.items():
                    ps = get()
                    row[f"{name}_mb"] = memory_mb(ps, pss=name == "postgres")
                    row[f"{name}_cpu_s"] = cpu_s(ps)
                with contextlib.suppress(Exception):
                    row["lag"] = await observer.lag()
                samples.append(row)
                if len(samples) % 24 == 1:
                    say(f"[soak {t / 60:5.1f} min] acked {load.spans:,} spans; lag {row.get('lag')}; RSS MB " +
                        ", ".join(f"{n} {row[f'{n}_mb']}" for n in pids))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.sample_s)

        before = {"spans": load.spans, "traces": len(load.acked)}
        sampling = asyncio.create_task(sampler())
        await load.paced(rate, duration_s, stop)
        soak_s = time.monotonic() - soak_t0
        say("[drain] waiting for both groups to catch up and every trace to be graded ...")
        await wait_drained(observer, len(load.acked), 900)
        stop.set()
        await sampling
        ledger = observer.ledger()
        dlq = sum((await observer.end_offsets(TOPICS["dlq"])).values())
        grades = sum((await observer.end_offsets(TOPICS["grades"])).values())
        await observer.stop()
        say("[check] reading the traces topic back ...")
        checked = check(load, await read_envelopes(broker.bootstrap_servers))
        checked.update({"grade_records": grades, "dlq_records": dlq, **ledger,
                        "requests_ok": load.requests_ok, "requests_failed": load.failed,
                        "request_retries": load.retries})
        return {"capacity": capacity_info,
                "soak": {"rate_spans_per_s": round(rate), "duration_s": round(soak_s, 1),
                         "spans": load.spans - before["spans"], "traces": len(load.acked) - before["traces"],
                         "achieved_spans_per_s": round((load.spans - before["spans"]) / soak_s)},
                "samples": samples, "check": checked, "processes": list(pids)}
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop(30)
        with contextlib.suppress(Exception):
            pg.stop()
        broker.stop()


def summarize(doc: dict[str, Any], warmup_s: float, slope_limit: float) -> list[str]:
    """Per process start/end and slope after the warm-up; returns the processes over the slope limit."""
    samples = doc["samples"]
    warm = [s for s in samples if s["t_s"] >= warmup_s]
    flagged = []
    memory = {}
    for name in doc["processes"]:
        series = [(s["t_s"], s[f"{name}_mb"]) for s in warm if s.get(f"{name}_mb")]
        cpu = [s[f"{name}_cpu_s"] for s in samples if s.get(f"{name}_cpu_s") is not None]
        slope = slope_mib_per_10min(series)
        judged = name != "broker_jvm"
        over = judged and slope is not None and slope > slope_limit
        if over:
            flagged.append(name)
        memory[name] = {"start_mb": samples[0][f"{name}_mb"] if samples else None,
                        "warm_mb": series[0][1] if series else None, "end_mb": series[-1][1] if series else None,
                        "max_mb": max((v for _, v in series), default=None),
                        "slope_mib_per_10min_after_warmup": slope, "judged": judged, "flagged": over,
                        "cpu_s_during_soak": round(cpu[-1] - cpu[0], 1) if len(cpu) > 1 else None}
    lags = {g: max((s.get("lag", {}).get(g, 0) for s in samples), default=0) for g in GROUPS}
    doc["memory"], doc["max_lag"] = memory, lags
    doc["verdict"] = {"memory_flat": not flagged, "flagged": flagged,
                      "nothing_lost": doc["check"]["spans_lost"] == 0 and doc["check"]["requests_failed"] == 0,
                      "nothing_duplicated": doc["check"]["spans_in_more_than_one_envelope_key"] == 0}
    traces = max(1, doc["soak"]["traces"])
    for name, per in (("assembler", "trace"), ("grader", "envelope")):
        cpu = memory.get(name, {}).get("cpu_s_during_soak")
        if cpu is not None:
            memory[name][f"cpu_ms_per_{per}"] = round(cpu / traces * 1000, 2)
    return flagged


def print_report(doc: dict[str, Any]) -> None:
    c, s, k = doc["capacity"], doc["soak"], doc["check"]
    print(f"\ncapacity {c['spans_per_s']:,} spans/s (whole loop); soaked at {s['rate_spans_per_s']:,} spans/s "
          f"(achieved {s['achieved_spans_per_s']:,}) for {s['duration_s'] / 60:.1f} min: {s['spans']:,} spans in "
          f"{s['traces']:,} traces")
    print(f"acked in all {k['spans_acked']:,} spans / {k['traces_acked']:,} traces in {k['requests_ok']:,} requests "
          f"({k['requests_failed']} failed, retries {k['request_retries'] or 'none'}); envelopes: "
          f"{k['envelope_records']:,} records, {k['envelope_keys']:,} keys ({k['duplicate_envelope_records']} "
          f"duplicate records); grades on the topic {k['grade_records']:,}; ledger grade rows {k['grade_rows']}; "
          f"journal grade events {k['grade_events']:,} for {k['graded_envelope_keys']:,} keys {k['verdicts']}")
    print(f"lost spans {k['spans_lost']}, spans in more than one envelope key "
          f"{k['spans_in_more_than_one_envelope_key']}, dead-lettered {k['dlq_records']}")
    print(f"\n{'process':12} {'start MB':>9} {'warm MB':>8} {'end MB':>8} {'max MB':>8} {'MiB/10min':>10}  "
          f"{'CPU s':>7}  judged")
    for name, m in doc["memory"].items():
        print(f"{name:12} {m['start_mb']!s:>9} {m['warm_mb']!s:>8} {m['end_mb']!s:>8} {m['max_mb']!s:>8} "
              f"{m['slope_mib_per_10min_after_warmup']!s:>10}  {m['cpu_s_during_soak']!s:>7}  "
              f"{'FLAGGED' if m['flagged'] else ('yes' if m['judged'] else 'no (JVM heap)')}")
    print(f"max lag (records): {doc['max_lag']}")
    for name, per in (("assembler", "trace"), ("grader", "envelope")):
        if f"cpu_ms_per_{per}" in doc["memory"].get(name, {}):
            print(f"{name}: {doc['memory'][name][f'cpu_ms_per_{per}']} ms of CPU per {per}")
    print(f"verdict: {doc['verdict']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-min", type=float, default=22.0, help="Length of the paced soak (minutes).")
    p.add_argument("--warmup-min", type=float, default=5.0, help="Start of the soak left out of the memory slope.")
    p.add_argument("--capacity-s", type=float, default=60.0, help="Flat-out sending of the capacity phase (s).")
    p.add_argument("--load-fraction", type=float, default=0.5, help="Soak rate as a fraction of the capacity.")
    p.add_argument("--spans-per-request", type=int, default=480)
    p.add_argument("--spans-per-trace", type=int, default=24)
    p.add_argument("--sample-s", type=float, default=5.0, help="Sampling interval of RSS, CPU and lag (s).")
    p.add_argument("--slope-limit", type=float, default=5.0,
                   help="RSS slope after the warm-up (MiB per 10 min) above which a process is flagged.")
    p.add_argument("--output", type=Path, default=None, help="Results JSON (default bench/results/).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = asyncio.run(soak(args, Path(tmp)))
    doc = {"benchmark": "soak", "at": timestamp(), "environment": environment(),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **result}
    flagged = summarize(doc, args.warmup_min * 60, args.slope_limit)
    path = results_path(args.output, f"soak-{timestamp()}.json")
    write_results(path, doc)
    print_report(doc)
    print(f"results: {path}")
    ok = not flagged and doc["verdict"]["nothing_lost"] and doc["verdict"]["nothing_duplicated"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
