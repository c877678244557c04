"""Exactly once under faults, cluster shape, with the real broker and real Postgres: two `trace-source worker grade`
processes on a 4-partition traces topic, one SIGKILLed mid-batch and restarted, then the whole topic redelivered
from offset 0 into a fresh consumer group — each stage key done once in the ledger, one `graded` journal event per
envelope key, re-published results byte-identical."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict

import psycopg
import pytest

from assembler_support import metric_value, read_topic_sync, wait_for
from kafka_harness import create_topic
from loop_support import failing_envelope, passing_envelope
from normalizers.envelope import Envelope
from pipeline.kafka_bus import KafkaPublisher
from serve_proc import CliProcess

pytestmark = pytest.mark.kafka

# Enough envelopes that two graders are still busy when one is killed: it must die mid-way for the test to mean
# anything (asserted below), and the graders got fast enough to finish 240 within one poll of the test.
N = 1200


async def publish(bootstrap: str, topic: str, envelopes: list[Envelope]) -> None:
    publisher = KafkaPublisher(bootstrap)
    await publisher.start()
    try:
        await asyncio.gather(*(publisher.publish(topic, e.trace_id.encode(), e.to_json_bytes(), [
            ("idempotency-key", e.idempotency_key.encode()), ("envelope-version", b"1"),
            ("content-type", b"application/json")]) for e in envelopes))
    finally:
        await publisher.stop()


def grader(tmp_path, name: str, bootstrap: str, db_url: str, topics: dict[str, str], *extra: str) -> CliProcess:
    return CliProcess(tmp_path / f"{name}.log", [
        "worker", "grade", "--kafka-bootstrap-servers", bootstrap, "--state-dir", str(tmp_path / name),
        "--artifact-dir", str(tmp_path / "artifacts"), "--metrics-port", "0", "--poll-max-records", "5",
        "--traces-topic", topics["traces"], "--grades-topic", topics["grades"], "--dlq-topic", topics["dlq"],
        "--execution-policy", "grade", *extra], env={"TRACE_SOURCE_DATABASE_URL": db_url})


def graded_count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT count(*) FROM journal WHERE phase = 'grade'").fetchone()[0]


def graded_events(db_url: str) -> list[dict]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT event FROM journal WHERE phase = 'grade' ORDER BY seq").fetchall()
    return [r[0] if isinstance(r[0], dict) else json.loads(r[0]) for r in rows]


def test_two_workers_a_sigkill_and_a_full_replay_grade_each_envelope_once(tmp_path, kafka_bootstrap, postgres_url):
    run = tmp_path.name[-12:].replace("_", "-")
    topics = {k: f"t-{run}-{k}" for k in ("traces", "grades", "dlq")}
    asyncio.run(create_topic(kafka_bootstrap, topics["traces"], partitions=4))
    envelopes = [failing_envelope(i) if i % 3 == 0 else passing_envelope(i) for i in range(N)]
    asyncio.run(publish(kafka_bootstrap, topics["traces"], envelopes))
    keys = {e.idempotency_key for e in envelopes}

    a = grader(tmp_path, "a", kafka_bootstrap, postgres_url, topics)
    b = grader(tmp_path, "b", kafka_bootstrap, postgres_url, topics)
    a.launch("stage.serving", 60)
    b.launch("stage.serving", 60)
    try:
        wait_for(lambda: graded_count(postgres_url) >= 30, "the first grades", timeout_s=120, interval_s=0.05)
        a.kill()  # mid-batch: its claims stay leased until they expire (or b takes its partitions over)
        assert graded_count(postgres_url) < N, "the kill should land mid-way; raise N if this machine is fast"
        a = grader(tmp_path, "a", kafka_bootstrap, postgres_url, topics, "--lease-s", "5")
        a.launch("stage.serving", 60)
        wait_for(lambda: len(graded_events(postgres_url)) >= N, f"{N} grades", timeout_s=240)
    finally:
        a.stop()
        b.stop()

    events = graded_events(postgres_url)
    per_key = Counter(e["envelope_key"] for e in events)
    assert set(per_key) == keys and set(per_key.values()) == {1}  # one graded event per envelope key
    with psycopg.connect(postgres_url) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM stage_runs WHERE stage = 'grade' "
                                   "GROUP BY state").fetchall())
    assert states == {"done": N}
    verdicts = Counter(e["status"] for e in events)
    assert verdicts == {"failed": N // 3, "passed": N - N // 3}

    first = read_topic_sync(kafka_bootstrap, topics["grades"])
    replay = grader(tmp_path, "replay", kafka_bootstrap, postgres_url, topics, "--consumer-group", f"replay-{run}")
    serving = replay.launch("stage.serving", 60)
    try:
        wait_for(lambda: metric_value(serving["metrics_port"], "trace_source_stage_records_total", stage="grade",
                                      outcome="republished") == N, "every envelope re-published", timeout_s=180)
        assert metric_value(serving["metrics_port"], "trace_source_stage_records_total", stage="grade",
                            outcome="worked") == 0
    finally:
        replay.stop()
    assert Counter(e["envelope_key"] for e in graded_events(postgres_url)) == per_key  # the journal is unchanged
    values: dict[bytes, set[bytes]] = defaultdict(set)
    for rec in read_topic_sync(kafka_bootstrap, topics["grades"]):
        values[rec.key].add(rec.value)
    assert len(values) == N and all(len(v) == 1 for v in values.values())  # byte-identical re-publication
    assert len(read_topic_sync(kafka_bootstrap, topics["grades"])) >= len(first) + N
