"""Fault tests: the receiver, the assembler and the grade stage under broker and worker failures, end to end.

A real three-node Kafka 3.9.2 KRaft cluster (every topic replication factor 3, ``min.insync.replicas`` 2), a real
Postgres (ledger and journal), ``trace-source serve`` on Kafka and one ``trace-source worker assemble`` and one
``trace-source worker grade`` process. Two threads export agent runs without pause through the OpenTelemetry Python
SDK's own exporters — OTLP/HTTP and OTLP/gRPC, with their own retry — while the test breaks things:

* ``test_broker_failures_under_load``: the leader of a partition of the spans topic is SIGKILLed and started again;
  the group coordinator's node is restarted (SIGTERM, start); a node is frozen with SIGSTOP (it keeps its sockets but
  answers nothing: an unreachable broker, as a network partition or a long GC pause looks to clients) and then
  resumed with SIGCONT.
* ``test_worker_failures_and_rebalances_under_load``: the assembler is SIGKILLed mid-work and started again; a
  second assembler joins the group while traces are open and later leaves it (two rebalances); the grade worker is
  SIGKILLed mid-batch and started again.

Then, once every trace is graded, from what the exporters had acknowledged and what is on the topics and in
Postgres: every acknowledged span is in exactly one envelope key; one envelope key per trace and version; every
envelope key graded exactly once (one ledger row, ``done``; one ``grade`` journal event) and any re-published grade
record is byte-identical to the first; nothing dead-lettered; every export returned SUCCESS and serve answered only
200/OK or the retryable 503/UNAVAILABLE (a client that gave up, 499/CANCELLED, is allowed too: it is not an error
it saw). Copies of one envelope key on the traces topic are allowed — a replay after a crash re-emits a trace under
its key and the ledger works it once — and are counted.

The faults run once by default; ``--fault-iterations N`` (or ``TRACE_SOURCE_FAULT_ITERATIONS``) repeats each fault
sequence N times in the same test. Seed, reproduce and fix workers killed mid-work (harness runs and pull requests
happening once) are covered by ``test_loop_example.py``, ``test_loop_fix_agent.py`` and ``test_loop_cluster.py``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import psycopg
import pytest
from opentelemetry.sdk.trace.export import SpanExportResult

from assembler_support import header, read_topic_sync, wait_for
from interop_support import finished_agent_spans, span_exporter
from kafka_harness import KafkaCluster
from serve_proc import CliProcess, ServeProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]

ALLOWED_STATUSES = {"200", "503", "499", "OK", "UNAVAILABLE", "CANCELLED"}


def iterations(config: pytest.Config) -> int:
    return max(1, int(config.getoption("--fault-iterations")
                      or os.environ.get("TRACE_SOURCE_FAULT_ITERATIONS") or 1))


@pytest.fixture(scope="module")
def cluster():
    """Three combined broker+controller nodes; every node running again before each test."""
    kafka = KafkaCluster(3)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture
def three_nodes(cluster: KafkaCluster) -> KafkaCluster:
    for i in range(cluster.node_count):
        cluster.ensure_running(i)
    return cluster


# --------------------------------------------------------------------------------------------- the pipeline


class Pipeline:
    """serve on Kafka + worker assemble + worker grade on topics and groups of their own."""

    def __init__(self, tmp: Path, bootstrap: str, database_url: str) -> None:
        run = uuid.uuid4().hex[:8]
        self.tmp, self.bootstrap, self.database_url = tmp, bootstrap, database_url
        self.topics = {k: f"f-{run}-{k}" for k in ("spans", "traces", "grades", "dlq", "index")}
        self.groups = {"assemble": f"f-{run}-assembler", "grade": f"f-{run}-grader"}
        self.env = {"TRACE_SOURCE_DATABASE_URL": database_url, "TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": "1",
                    "TRACE_SOURCE_ASSEMBLER_COMMIT_INTERVAL_S": "0.2"}
        self.serve = ServeProcess(tmp / "receiver", "--kafka-topic", self.topics["spans"], "--kafka-create-topics",
                                  "--kafka-partitions", "4", "--sink-timeout-s", "5", "--retry-after-s", "1",
                                  env=self.env, kafka_bootstrap=bootstrap)
        self.workers: dict[str, CliProcess] = {}

    def worker(self, name: str) -> CliProcess:
        common = ["--kafka-bootstrap-servers", self.bootstrap, "--metrics-port", "0",
                  "--artifact-dir", str(self.tmp / "artifacts")]
        if name.startswith("assemble"):
            argv = ["worker", "assemble", *common, "--input-topic", self.topics["spans"], "--traces-topic",
                    self.topics["traces"], "--dlq-topic", self.topics["dlq"], "--traces-index-topic",
                    self.topics["index"], "--group-id", self.groups["assemble"]]
            ready = "assembler.serving"
        else:
            argv = ["worker", "grade", *common, "--traces-topic", self.topics["traces"], "--grades-topic",
                    self.topics["grades"], "--dlq-topic", self.topics["dlq"], "--execution-policy", "grade",
                    "--consumer-group", self.groups["grade"], "--lease-s", "6",
                    "--state-dir", str(self.tmp / f"{name}-state")]
            ready = "stage.serving"
        proc = self.workers.get(name) or CliProcess(self.tmp / f"{name}.log", argv, env=self.env)
        self.workers[name] = proc
        proc.launch(ready, 120)
        return proc

    def __enter__(self) -> "Pipeline":
        self.serve.start(60)
        self.worker("assemble")
        self.worker("grade")
        return self

    def __exit__(self, *exc) -> None:
        for proc in [*self.workers.values(), self.serve]:
            try:
                proc.stop(30)
            except Exception:  # noqa: BLE001 - teardown: kill what did not stop
                proc.kill()


class ExporterLoad:
    """Two threads (OTLP/HTTP and OTLP/gRPC SDK exporters) exporting new agent runs until stopped."""

    def __init__(self, serve: ServeProcess) -> None:
        self.serve = serve
        self.acked: dict[str, str] = {}  # span id -> trace id, of exports that returned SUCCESS
        self.failed = 0
        self.exports = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in ("http", "grpc")]

    def _run(self, transport: str) -> None:
        exporter = span_exporter(self.serve, transport, timeout=150)
        try:
            while not self.stop.is_set():
                ids, spans = finished_agent_spans(3, f"fault-agent-{transport}", ("fault.agent", "1.0"))
                result = exporter.export(spans)
                with self.lock:
                    self.exports[transport] += 1
                    if result == SpanExportResult.SUCCESS:
                        self.acked.update(ids)
                    else:
                        self.failed += 1
                time.sleep(0.05)
        finally:
            exporter.shutdown()

    def __enter__(self) -> "ExporterLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(240)

    def spans(self) -> int:
        with self.lock:
            return len(self.acked)


def keep_loading(load: ExporterLoad, seconds: float) -> None:
    """Let the exporters run ``seconds`` more, and check that they are getting through at all."""
    before = load.spans()
    time.sleep(seconds)
    wait_for(lambda: load.spans() > before, "the exporters to have more spans acknowledged", timeout_s=180)


# --------------------------------------------------------------------------------------------- Kafka helpers


async def _metadata(bootstrap: str):
    """The cluster's metadata (aiokafka ``ClusterMetadata``: leaders, replicas and ISR of every partition)."""
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        return await client.fetch_all_metadata()
    finally:
        await client.close()


def leader_index(cluster: KafkaCluster, topic: str, partition: int = 0) -> int:
    """0-based index of the node leading ``topic``/``partition`` (node ids are index + 1)."""
    from aiokafka.structs import TopicPartition

    metadata = asyncio.run(_metadata(cluster.bootstrap_servers))
    return metadata.leader_for_partition(TopicPartition(topic, partition)) - 1


def fully_replicated(cluster: KafkaCluster) -> bool:
    """True when every partition's in-sync replicas are all its replicas (the controller's view, via metadata)."""
    metadata = asyncio.run(_metadata(cluster.bootstrap_servers))
    return all(set(m.isr) == set(m.replicas) for parts in metadata._partitions.values() for m in parts.values())


def wait_replicated(cluster: KafkaCluster) -> None:
    wait_for(lambda: fully_replicated(cluster), "every partition to be fully replicated again", timeout_s=120)


# --------------------------------------------------------------------------------------------- the checks


def graded_keys(database_url: str, grade_group_keys: set[str]) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT envelope_key FROM stage_runs WHERE stage = 'grade' AND state = 'done'").fetchall()
    return {r[0] for r in rows} & grade_group_keys


def envelope_keys_of(pipeline: Pipeline, trace_ids: set[str]) -> dict[str, set[str]]:
    """trace id -> envelope keys on the traces topic, for the given traces."""
    out: dict[str, set[str]] = {}
    for r in read_topic_sync(pipeline.bootstrap, pipeline.topics["traces"]):
        trace_id = r.key.decode()
        if trace_id in trace_ids:
            out.setdefault(trace_id, set()).add(header(r, "idempotency-key"))
    return out


def wait_all_graded(pipeline: Pipeline, load: ExporterLoad) -> None:
    trace_ids = set(load.acked.values())

    def done() -> bool:
        keys = envelope_keys_of(pipeline, trace_ids)
        if set(keys) != trace_ids:
            return False
        wanted = set().union(*keys.values())
        return graded_keys(pipeline.database_url, wanted) == wanted

    wait_for(done, f"all {len(trace_ids)} acknowledged traces to be assembled and graded", timeout_s=300)


def server_statuses(serve: ServeProcess) -> Counter:
    """trace_source_requests_total by status, from serve's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{serve.http_url}/metrics", timeout=10).read().decode()
    out: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "trace_source_requests_total":
                out[sample.labels.get("status", "?")] += sample.value
    return out


def check_end_to_end(pipeline: Pipeline, load: ExporterLoad) -> dict:
    """The promises of the loop, from what was acknowledged and what is on the topics and in Postgres."""
    assert load.failed == 0, f"{load.failed} exports did not succeed"
    assert load.acked, "nothing was acknowledged"
    statuses = server_statuses(pipeline.serve)
    assert set(statuses) <= ALLOWED_STATUSES, f"exporters saw non-retryable answers: {dict(statuses)}"

    spans_of: dict[str, set[str]] = {}
    for span_id, trace_id in load.acked.items():
        spans_of.setdefault(trace_id, set()).add(span_id)
    traces = read_topic_sync(pipeline.bootstrap, pipeline.topics["traces"])
    copies: Counter = Counter()
    key_of_version: dict[tuple[str, int], set[str]] = {}
    keys_of_span: dict[str, set[str]] = {}
    for r in traces:
        trace_id = r.key.decode()
        if trace_id not in spans_of:
            continue
        doc = orjson.loads(r.value)
        key = doc["idempotency_key"]
        copies[key] += 1
        key_of_version.setdefault((trace_id, doc.get("envelope_version", 1)), set()).add(key)
        for span in doc["spans"]:
            keys_of_span.setdefault(span["span_id"], set()).add(key)
    lost = [s for s in load.acked if s not in keys_of_span]
    assert not lost, f"{len(lost)} acknowledged spans are in no envelope, e.g. {lost[:3]}"
    spread = {s: k for s, k in keys_of_span.items() if s in load.acked and len(k) > 1}
    assert not spread, f"{len(spread)} spans are in more than one envelope key, e.g. {list(spread.items())[:2]}"
    assert all(len(keys) == 1 for keys in key_of_version.values()), \
        {v: k for v, k in key_of_version.items() if len(k) > 1}

    keys = set(copies)
    with psycopg.connect(pipeline.database_url) as conn:
        ledger = conn.execute("SELECT envelope_key, state FROM stage_runs WHERE stage = 'grade'").fetchall()
        journal = conn.execute("SELECT envelope_key, count(*) FROM journal WHERE phase = 'grade' "
                               "GROUP BY envelope_key").fetchall()
    rows = Counter(k for k, _ in ledger if k in keys)
    assert set(rows) == keys and set(rows.values()) == {1}, "an envelope key without, or with two, ledger rows"
    assert {s for k, s in ledger if k in keys} == {"done"}
    events = {k: n for k, n in journal if k in keys}
    assert set(events) == keys and set(events.values()) == {1}, "an envelope key without, or with two, grade events"

    first: dict[str, bytes] = {}
    grades = read_topic_sync(pipeline.bootstrap, pipeline.topics["grades"])
    for r in grades:
        stage_key = header(r, "stage-key") or r.key.decode()
        assert first.setdefault(stage_key, r.value) == r.value, "a re-published grade differs from the first"
    assert not read_topic_sync(pipeline.bootstrap, pipeline.topics["dlq"]), "something was dead-lettered"
    return {"spans": len(load.acked), "traces": len(spans_of), "envelope_keys": len(keys),
            "envelope_copies": sum(copies.values()) - len(keys), "grade_records": len(grades),
            "statuses": dict(statuses), "exports": dict(load.exports)}


# --------------------------------------------------------------------------------------------- the tests


def run_faults(tmp_path, cluster: KafkaCluster, postgres_url: str, pytestconfig,
               sequence: Callable[[Pipeline, ExporterLoad], None]) -> dict:
    """Run the pipeline under exporter load, apply ``sequence`` ``--fault-iterations`` times, stop the load, wait
    until every acked trace is graded and return :func:`check_end_to_end`'s summary."""
    with Pipeline(tmp_path, cluster.bootstrap_servers, postgres_url) as pipeline:
        with ExporterLoad(pipeline.serve) as load:
            keep_loading(load, 3)
            for _ in range(iterations(pytestconfig)):
                sequence(pipeline, load)
        wait_all_graded(pipeline, load)
        return check_end_to_end(pipeline, load)


def test_broker_failures_under_load(tmp_path, three_nodes, postgres_url, pytestconfig):
    cluster = three_nodes

    def sequence(pipeline: Pipeline, load: ExporterLoad) -> None:
        # The leader of a partition of the spans topic crashes under load, and comes back.
        victim = leader_index(cluster, pipeline.topics["spans"], 0)
        cluster.kill_node(victim)
        keep_loading(load, 6)
        cluster.start_node(victim)
        wait_replicated(cluster)
        keep_loading(load, 2)

        # The group coordinator's node (leader of the single __consumer_offsets partition) is restarted.
        coordinator = leader_index(cluster, "__consumer_offsets", 0)
        cluster.stop_node(coordinator)
        keep_loading(load, 4)
        cluster.start_node(coordinator)
        wait_replicated(cluster)
        keep_loading(load, 2)

        # A node stops answering (SIGSTOP keeps its sockets open but reads nothing), then comes back.
        frozen = leader_index(cluster, pipeline.topics["traces"], 0)
        cluster.freeze_node(frozen)
        try:
            keep_loading(load, 8)
        finally:
            cluster.thaw_node(frozen)
        wait_replicated(cluster)
        keep_loading(load, 2)

    print(f"broker failures: {run_faults(tmp_path, cluster, postgres_url, pytestconfig, sequence)}")


def test_worker_failures_and_rebalances_under_load(tmp_path, three_nodes, postgres_url, pytestconfig):
    def sequence(pipeline: Pipeline, load: ExporterLoad) -> None:
        # The assembler crashes with traces open and published-but-uncommitted envelopes, and restarts.
        pipeline.workers["assemble"].kill()
        keep_loading(load, 2)
        pipeline.worker("assemble")
        keep_loading(load, 3)

        # A second assembler joins while traces are open (partitions move), then leaves (they move back).
        pipeline.worker("assemble-2")
        keep_loading(load, 6)
        pipeline.workers["assemble-2"].stop(30)
        keep_loading(load, 3)

        # The grade worker crashes mid-batch; its claims wait out their lease, then are taken over.
        pipeline.workers["grade"].kill()
        keep_loading(load, 2)
        pipeline.worker("grade")
        keep_loading(load, 3)

    print(f"worker failures: {run_faults(tmp_path, three_nodes, postgres_url, pytestconfig, sequence)}")
