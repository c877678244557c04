"""Grade stage throughput next to the assembler's, measured in the same run on the same traces.

One workload — the receiver's own output for bench/payloads.py GenAI agent runs (``--requests`` × ``--spans-per-
request`` spans, ``--spans-per-trace`` per trace; each record once more, as exporter retries) — measured four ways:

1. **assembler, in-process**: ``pipeline.buffers`` + ``pipeline.envelope_builder`` build every envelope
   (everything the assembler does except I/O): envelopes per CPU-second.
2. **rules, in-process**: ``pipeline.grading.rules.grade_envelope`` over the same envelopes.
3. **assembler worker**: one ``trace-source worker assemble`` process on an embedded log preloaded with the span
   records (buffers, envelopes, the log and the traces file view, commits) — the stage before grading.
4. **grade worker**: one ``trace-source worker grade`` process on an embedded log preloaded with the envelopes
   (SQLite ledger, ``runs.jsonl`` journal, ``grade.json`` artifacts, results appended to the log — everything the
   stage does).

For the workers: envelopes/s and CPU-seconds from their first output to their last (start-up is not counted),
peak RSS.

``--cluster`` measures instead one ``trace-source worker grade`` in the cluster shape: a single-node Kafka broker
(``tests/kafka_harness.py``) whose traces topic holds the envelopes, the ledger and journal in a Postgres server
(``tests/postgres_harness.py``), the worker's shipped defaults (concurrency, poll size, pool). Each run grades all
envelopes with a fresh consumer group, grades topic and database; ``--rounds`` runs per ``--source`` (a checkout
whose code the worker runs, e.g. a ``git worktree`` of an older commit, for an A/B on one machine), interleaved
A, B, A, B, ... It reports per run the worker's CPU per envelope and the Postgres transactions it committed per
envelope (``pg_stat_database.xact_commit``, less the bench's own count queries), and the median per source.

It prints envelopes/s and envelopes per CPU-second for each, and the ratios grade / assembler: the grade stage must
not be the slowest stage. Results: ``bench/results/grade-<timestamp>.json`` (or ``--output``). No timing is an
assertion anywhere; on a shared 2-core machine use the per-CPU-second figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.assembler_bench import make_records
from bench.common import REPO, environment, results_path, say, timestamp, write_results

_BIN = Path(sys.executable).with_name("trace-source")
_CLI = "import sys; from trace_source.cli import main; sys.argv[0] = 'trace-source'; sys.exit(main())"


def build_envelopes(records) -> tuple[list, float, float]:
    """All envelopes of ``records``, with the CPU and wall seconds the build took (the assembler's work)."""
    from normalizers.redact import Redactor
    from pipeline.buffers import AssemblerCore, decode_record
    from pipeline.envelope_builder import build_envelope

    clock = [0.0]
    core = AssemblerCore(quiet_period_s=1.0, max_wait_s=300.0, clock=lambda: clock[0], remembered=10**6,
                         retained_bytes=0)
    core.assign([0])
    redactor = Redactor()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in records:
        core.ingest(r, decode_record(r).traces)
    clock[0] = 10.0
    envelopes = [build_envelope(c, assembled_at_ns=1, redactor=redactor) for c in core.due()]
    for e in envelopes:
        e.to_json_bytes()
    return envelopes, time.process_time() - cpu0, time.perf_counter() - wall0


def grade_all(envelopes) -> tuple[dict, float, float]:
    from pipeline.grading.rules import grade_envelope

    cpu0, wall0 = time.process_time(), time.perf_counter()
    verdicts: dict[str, int] = {}
    for e in envelopes:
        g = grade_envelope(e)
        g.to_json_bytes()
        verdicts[g.verdict] = verdicts.get(g.verdict, 0) + 1
    return verdicts, time.process_time() - cpu0, time.perf_counter() - wall0


def preload(state: Path, envelopes) -> None:
    from pipeline.bus import encode_headers
    from sinks.local_log import LOG_FILENAME, LocalLogAppender

    state.mkdir(parents=True, exist_ok=True)
    appender = LocalLogAppender(state / LOG_FILENAME)
    try:
        for e in envelopes:
            appender.append("trace-source.traces", e.trace_id, e.to_json_bytes(), encode_headers([
                ("idempotency-key", e.idempotency_key.encode()), ("envelope-version", b"1"),
                ("content-type", b"application/json")]), content_type="application/json")
    finally:
        appender.close()


def preload_spans(state: Path, records) -> None:
    from pipeline.bus import encode_headers
    from sinks.local_log import LOG_FILENAME, LocalLogAppender

    state.mkdir(parents=True, exist_ok=True)
    appender = LocalLogAppender(state / LOG_FILENAME)
    try:
        appender.append_many([("trace-source.spans", r.key.decode(), r.value, encode_headers(r.headers),
                               "application/x-protobuf", "bench", 1) for r in records])
    finally:
        appender.close()


def measure_worker(argv: list[str], log_path: Path, count, n: int, timeout_s: float, *,
                   command: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    """Run ``trace-source <argv>`` (or ``command + argv``) until ``count()`` reaches ``n``; envelopes/s and CPU from
    its first output on."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*(command or [str(_BIN)]), *argv], stdout=log, stderr=log, env=env)
    ps = psutil.Process(proc.pid)
    peak_rss = 0
    first = None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            peak_rss = max(peak_rss, ps.memory_info().rss)
            done = count()
            if done and first is None:
                t = ps.cpu_times()
                first = (time.perf_counter(), t.user + t.system, done)
            if done >= n:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:2]} exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:2]}: only {done} of {n} within {timeout_s} s")
            time.sleep(0.05)
        t = ps.cpu_times()
        wall, cpu_s = time.perf_counter() - first[0], t.user + t.system - first[1]
    finally:
        proc.terminate()
        proc.wait(30)
    k = n - first[2]
    return {"envelopes": k, "wall_s": round(wall, 3), "cpu_s": round(cpu_s, 3),
            "envelopes_per_s": round(k / wall, 1) if wall > 0 else None,
            "envelopes_per_cpu_s": round(k / cpu_s, 1) if cpu_s > 0 else None,
            "peak_rss_mb": round(peak_rss / 2**20, 1)}


def run_assembler_worker(state: Path, n: int, timeout_s: float) -> dict:
    traces = state / "traces"
    return measure_worker(["worker", "assemble", "--state-dir", str(state), "--metrics-port", "0",
                           "--quiet-period-s", "0.2", "--log-level", "warning"], state.parent / "assembler.log",
                          lambda: len(list(traces.glob("*.json"))) if traces.is_dir() else 0, n, timeout_s)


def run_stage(state: Path, n: int, timeout_s: float) -> dict:
    """One grade worker over the preloaded log until every envelope has its grade event."""
    journal = state / "runs.jsonl"
    return measure_worker(["worker", "grade", "--state-dir", str(state), "--metrics-port", "0", "--execution-policy",
                           "grade", "--poll-max-records", "200", "--log-level", "warning"],
                          state.parent / "grade-worker.log",
                          lambda: journal.read_bytes().count(b'"phase":"grade"') if journal.exists() else 0,
                          n, timeout_s)


async def preload_topic(bootstrap: str, topic: str, envelopes, partitions: int) -> None:
    from aiokafka import AIOKafkaProducer

    from sinks.kafka_admin import create_topic

    await create_topic(bootstrap, topic, partitions, max_request_size=16 * 2**20)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 2**20, acks="all",
                                linger_ms=20)
    await producer.start()
    try:
        sent = [await producer.send(topic, e.to_json_bytes(), key=e.trace_id.encode(), headers=[
            ("idempotency-key", e.idempotency_key.encode()), ("envelope-version", b"1"),
            ("content-type", b"application/json")]) for e in envelopes]
        for delivery in sent:
            await delivery
    finally:
        await producer.stop()


def run_cluster_worker(source: Path, bootstrap: str, admin_url: str, n: int, run: int, work: Path,
                       timeout_s: float) -> dict:
    """One ``worker grade`` with ``source``'s code on Kafka + Postgres until all ``n`` envelopes are done."""
    import psycopg

    from tests import postgres_harness

    database = f"grade_bench_{run}"
    url = postgres_harness.create_database(admin_url, database)
    queries = [0]
    conn = psycopg.connect(url, autocommit=True)

    def done() -> int:
        queries[0] += 1
        try:
            return conn.execute("SELECT count(*) FROM stage_runs WHERE state = 'done'").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0

    def commits() -> int:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            return admin.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                                 (database,)).fetchone()[0]

    argv = ["worker", "grade", "--kafka-bootstrap-servers", bootstrap, "--consumer-group", f"grade-bench-{run}",
            "--grades-topic", f"grade-bench.grades-{run}", "--artifact-dir", str(work / f"artifacts-{run}"),
            "--state-dir", str(work / f"state-{run}"), "--metrics-port", "0", "--execution-policy", "grade",
            "--log-level", "warning"]
    env = {**os.environ, "TRACE_SOURCE_DATABASE_URL": url, "PYTHONPATH": str(source)}
    # -P: the working directory does not go first on sys.path, so PYTHONPATH decides which code runs.
    command = [sys.executable, "-P", "-c", _CLI]
    try:
        before = commits()
        result = measure_worker(argv, work / f"grade-worker-{run}.log", done, n, timeout_s, command=command,
                                env=env)
    finally:
        conn.close()
    time.sleep(1.5)  # a backend publishes its statistics when it exits (the worker's and the count connection's)
    xacts = commits() - before - queries[0]
    result["ms_cpu_per_envelope"] = round(1000 * result["cpu_s"] / result["envelopes"], 3)
    result["pg_transactions_per_envelope"] = round(xacts / n, 2)
    return result


def cluster(args: argparse.Namespace, envelopes) -> dict:
    """``--cluster``: see the module docstring."""
    import asyncio

    from bench.common import median, start_harness_broker
    from tests import postgres_harness

    sources = [Path(s).resolve() for s in (args.source or [str(REPO)])]
    broker, _ = start_harness_broker("server")
    pg = postgres_harness.PostgresServer()
    runs: list[dict] = []
    try:
        pg.start()
        say(f"[postgres] ready on port {pg.port}; preloading {len(envelopes)} envelopes ...")
        asyncio.run(preload_topic(broker.bootstrap_servers, "trace-source.traces", envelopes, args.partitions))
        with tempfile.TemporaryDirectory(prefix="grade-bench-cluster-") as tmp:
            for r in range(args.rounds):
                for source in sources:
                    run = len(runs)
                    result = run_cluster_worker(source, broker.bootstrap_servers, pg.url, len(envelopes), run,
                                                Path(tmp), args.timeout)
                    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
                    result.update(round=r, source=str(source), commit=commit)
                    runs.append(result)
                    say(f"[round {r}] {source}: {result['ms_cpu_per_envelope']} ms CPU/envelope, "
                        f"{result['pg_transactions_per_envelope']} Postgres transactions/envelope, "
                        f"{result['envelopes_per_s']} envelopes/s")
    finally:
        pg.stop()
        broker.stop()
    summary = {str(s): {"median_ms_cpu_per_envelope": median([r["ms_cpu_per_envelope"] for r in runs
                                                               if r["source"] == str(s)]),
                        "median_pg_transactions_per_envelope": median([r["pg_transactions_per_envelope"]
                                                                       for r in runs if r["source"] == str(s)])}
               for s in sources}
    return {"runs": runs, "by_source": summary}


def _save(args: argparse.Namespace, doc: dict, name: str) -> Path | None:
    """Write ``doc`` to ``--output`` or ``bench/results/<name>-<timestamp>.json``; with ``--json`` also print it and
    return ``None`` (nothing else to print), else the path written."""
    path = results_path(args.output, f"{name}-{timestamp()}.json")
    write_results(path, doc)
    if args.json:
        print(json.dumps(doc))
        return None
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grade_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="Export requests in the workload.")
    parser.add_argument("--spans-per-request", type=int, default=512)
    parser.add_argument("--spans-per-trace", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=600.0, help="Longest wait for the grade worker (s).")
    parser.add_argument("--output", type=Path, default=None, help="Results JSON (default bench/results/).")
    parser.add_argument("--json", action="store_true", help="Print the results JSON instead of the table.")
    parser.add_argument("--cluster", action="store_true",
                        help="Measure only the grade worker, on Kafka + Postgres (see above).")
    parser.add_argument("--source", action="append", metavar="DIR",
                        help="--cluster: a checkout whose code the worker runs (repeat for an A/B; default: this one).")
    parser.add_argument("--rounds", type=int, default=1, help="--cluster: runs per --source, interleaved.")
    parser.add_argument("--partitions", type=int, default=4, help="--cluster: partitions of the traces topic.")
    args = parser.parse_args(argv)

    say(f"workload: {args.requests} requests x {args.spans_per_request} spans, {args.spans_per_trace} per trace")
    records, spans = make_records(args.requests, args.spans_per_request, args.spans_per_trace)
    build_envelopes(records[:8])  # warm-up: imports and first calls stay out of the timings
    envelopes, asm_cpu, asm_wall = build_envelopes(records)
    n = len(envelopes)
    grade_all(envelopes[:8])
    verdicts, rules_cpu, rules_wall = grade_all(envelopes)
    if args.cluster:
        doc = {"benchmark": "grade-cluster", "at": timestamp(), "environment": environment(),
               "workload": {"envelopes": n, "spans": spans, "spans_per_trace": args.spans_per_trace,
                            "verdicts": verdicts, "partitions": args.partitions}, "results": cluster(args, envelopes)}
        path = _save(args, doc, "grade-cluster")
        if path is None:
            return 0
        print(f"\n{n} envelopes, one `worker grade` on Kafka + Postgres per run")
        print(f"  {'source':40} {'round':>5} {'ms CPU/env':>10} {'pg xact/env':>11} {'envelopes/s':>11}")
        for r in doc["results"]["runs"]:
            print(f"  {r['source'][-40:]:40} {r['round']:>5} {r['ms_cpu_per_envelope']:>10} "
                  f"{r['pg_transactions_per_envelope']:>11} {r['envelopes_per_s'] or 0:>11}")
        for source, m in doc["results"]["by_source"].items():
            print(f"  median {source}: {m['median_ms_cpu_per_envelope']} ms CPU per envelope, "
                  f"{m['median_pg_transactions_per_envelope']} Postgres transactions per envelope")
        print(f"results: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        return 0
    with tempfile.TemporaryDirectory(prefix="grade-bench-") as tmp:
        say(f"assembler worker over {len(records)} span records ...")
        preload_spans(Path(tmp) / "spans", records)
        assembler = run_assembler_worker(Path(tmp) / "spans", n, args.timeout)
        state = Path(tmp) / "state"
        preload(state, envelopes)
        say(f"grade worker over {n} envelopes ...")
        stage = run_stage(state, n, args.timeout)
    results = {
        "assembler": {"envelopes_per_s": round(n / asm_wall, 1), "envelopes_per_cpu_s": round(n / asm_cpu, 1),
                      "spans_per_cpu_s": round(spans / asm_cpu)},
        "rules": {"envelopes_per_s": round(n / rules_wall, 1), "envelopes_per_cpu_s": round(n / rules_cpu, 1)},
        "assembler_worker": assembler, "stage": stage}
    results["ratios"] = {
        "rules_per_cpu_s / assembler_per_cpu_s": round(results["rules"]["envelopes_per_cpu_s"]
                                                        / results["assembler"]["envelopes_per_cpu_s"], 2),
        "grade_worker / assembler_worker (per CPU-s)": (
            round(stage["envelopes_per_cpu_s"] / assembler["envelopes_per_cpu_s"], 2)
            if stage["envelopes_per_cpu_s"] and assembler["envelopes_per_cpu_s"] else None),
        "grade_worker / assembler_worker (envelopes/s)": (
            round(stage["envelopes_per_s"] / assembler["envelopes_per_s"], 2)
            if stage["envelopes_per_s"] and assembler["envelopes_per_s"] else None)}
    doc = {"benchmark": "grade", "at": timestamp(), "environment": environment(),
           "workload": {"envelopes": n, "spans": spans, "spans_per_trace": args.spans_per_trace,
                        "verdicts": verdicts}, "results": results}
    path = _save(args, doc, "grade")
    if path is None:
        return 0
    print(f"\n{n} envelopes ({spans} spans; verdicts {verdicts}), one process each, same machine, same run")
    print(f"  {'':34} {'envelopes/s':>12} {'per CPU-s':>10}")
    print(f"  {'assembler build (in-process)':34} {results['assembler']['envelopes_per_s']:>12,} "
          f"{results['assembler']['envelopes_per_cpu_s']:>10,}")
    print(f"  {'rules grader (in-process)':34} {results['rules']['envelopes_per_s']:>12,} "
          f"{results['rules']['envelopes_per_cpu_s']:>10,}")
    for label, r in (("assembler worker (embedded)", assembler), ("grade worker (embedded)", stage)):
        print(f"  {label:34} {r['envelopes_per_s'] or 0:>12,} {r['envelopes_per_cpu_s'] or 0:>10,}   "
              f"peak RSS {r['peak_rss_mb']} MB")
    for k, v in results["ratios"].items():
        print(f"  {k}: {v}")
    print(f"results: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
