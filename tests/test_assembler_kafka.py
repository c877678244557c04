"""Acceptance, cluster shape: real OTel SDK exporters -> ``trace-source serve`` (Kafka) -> ``trace-source worker
assemble`` processes (consumer group) -> envelopes on the traces topic, against a real Kafka 3.9.2 broker.

* 1 and 2 workers on a 4-partition spans topic, every span exported twice (exporter-retry duplicates): every trace
  yields exactly one envelope key, and its envelope holds each span once;
* SIGKILL the worker while traces are open, finish the traces, restart: no trace lost, re-emitted envelopes keep
  their keys; the same when one of two workers is killed and the survivor takes its partitions over;
* poison input -> DLQ with the error and the original bytes; an envelope above the message limit -> claim check;
  ``trace-source traces`` reads the topic back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from assembler_support import (
    AgentClient, WorkerProcess, header, metric_value, read_topic_sync, wait_for)
from kafka_harness import create_topic
from normalizers.envelope import Envelope
from pipeline.outputs import CLAIM_CHECK_CONTENT_TYPE, resolve_envelope
from serve_proc import ServeProcess

pytestmark = pytest.mark.kafka

_BIN = Path(sys.executable).with_name("trace-source")


@pytest.fixture
async def topics(kafka_bootstrap: str) -> dict[str, str]:
    """A fresh 4-partition spans topic and names for the outputs (the worker creates those)."""
    suffix = uuid.uuid4().hex[:10]
    names = {"input_topic": f"spans-{suffix}", "traces_topic": f"traces-{suffix}", "dlq_topic": f"dlq-{suffix}",
             "group_id": f"assembler-{suffix}"}
    await create_topic(kafka_bootstrap, names["input_topic"], partitions=4)
    return names


@pytest.fixture
def serve(tmp_path: Path, kafka_bootstrap: str, topics):
    with ServeProcess(tmp_path / "serve", "--kafka-topic", topics["input_topic"],
                      kafka_bootstrap=kafka_bootstrap) as proc:
        yield proc


def worker(tmp_path: Path, name: str, kafka_bootstrap: str, topics: dict, **flags) -> WorkerProcess:
    return WorkerProcess(tmp_path / f"{name}.log", kafka_bootstrap_servers=kafka_bootstrap,
                         state_dir=tmp_path / name, quiet_period_s=1, commit_interval_s=0.2,
                         **{**topics, **flags})


def envelopes_by_trace(bootstrap: str, topic: str, artifact_dir: Path | None = None) -> dict[str, list]:
    """trace id -> [(idempotency-key header, Envelope)] of every record on the traces topic."""
    out: dict[str, list] = defaultdict(list)
    for rec in read_topic_sync(bootstrap, topic):
        env = resolve_envelope(rec.value, rec.headers, artifact_dir)
        assert rec.key.decode() == env.trace_id
        assert header(rec, "idempotency-key") == env.idempotency_key
        out[env.trace_id].append((header(rec, "idempotency-key"), env))
    return out


def assert_complete(got: dict[str, list], expected: dict[str, set[str]]) -> None:
    for trace_id, span_ids in expected.items():
        assert trace_id in got, f"no envelope for trace {trace_id}"
        keys = {k for k, _ in got[trace_id]}
        assert len(keys) == 1, f"trace {trace_id}: {len(keys)} different envelope keys"
        for _, env in got[trace_id]:
            assert sorted(s.span_id for s in env.spans) == sorted(span_ids)
            assert env.completeness.root_seen and env.completeness.closed_reason == "root-ended-and-quiet"


@pytest.mark.parametrize("n_workers", [1, 2])
def test_exporters_to_envelopes_with_one_and_two_workers(tmp_path, kafka_bootstrap, topics, serve, n_workers):
    workers = [worker(tmp_path, f"w{i}", kafka_bootstrap, topics).start() for i in range(n_workers)]
    try:
        wait_for(lambda: set().union(*(w.assigned() for w in workers)) == {0, 1, 2, 3}
                 and all(w.assigned() for w in workers), "all 4 partitions assigned, to every worker")
        expected: dict[str, set[str]] = {}
        for transport in ("http", "grpc"):
            client = AgentClient(serve, transport)
            expected.update(client.complete_traces(6))
            client.resend_all()  # every span twice: exporter-retry duplicates
            client.close()
        wait_for(lambda: set(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"])) >= set(expected),
                 "an envelope for every trace")
        assert sum(metric_value(w.metrics_port, "trace_source_assembler_duplicates_dropped_total", kind="span")
                   for w in workers) >= sum(len(s) for s in expected.values())
        got = envelopes_by_trace(kafka_bootstrap, topics["traces_topic"])
        assert_complete(got, expected)
        env = got[next(iter(expected))][0][1]
        assert env.source.kind in ("otlp-http", "otlp-grpc") and env.agent_run.agent_name == "planner"
        assert len(env.agent_run.llm_calls) == 2 and len(env.agent_run.tool_calls) == 2
        # Envelopes were spread over the partitions and every worker emitted some.
        if n_workers == 2:
            assert all(metric_value(w.metrics_port, "trace_source_assembler_envelopes_total") > 0 for w in workers)
    finally:
        for w in workers:
            w.stop()


def test_sigkill_while_traces_are_open_loses_nothing_and_keeps_keys(tmp_path, kafka_bootstrap, topics, serve):
    # Static membership, as a StatefulSet pod would restart: the partitions come back without waiting for the
    # killed member's session to expire.
    w = worker(tmp_path, "w", kafka_bootstrap, topics, max_wait_s=600, group_instance_id="assembler-0").start()
    client = AgentClient(serve, "grpc")
    try:
        done = client.complete_traces(4)
        wait_for(lambda: set(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"])) >= set(done),
                 "envelopes of the finished traces")
        open_ids, roots = client.open_traces(5)
        client.resend_all()  # duplicates of everything so far, after the open traces' first records
        wait_for(lambda: metric_value(w.metrics_port, "trace_source_assembler_open_traces") == 5,
                 "the worker buffering the 5 open traces")
        before = envelopes_by_trace(kafka_bootstrap, topics["traces_topic"])
        w.kill()
        for root in roots:
            root.end()  # exported now, while no assembler runs
        w.start()
        expected = {**done, **open_ids}
        wait_for(lambda: set(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"])) >= set(expected),
                 "an envelope for every trace after the restart")
        got = envelopes_by_trace(kafka_bootstrap, topics["traces_topic"])
        assert_complete(got, expected)
        for trace_id in done:  # emitted before the kill; any re-emission has the same key
            assert {k for k, _ in got[trace_id]} == {k for k, _ in before[trace_id]}
    finally:
        client.close()
        w.stop()


def test_killed_worker_partitions_move_to_the_survivor(tmp_path, kafka_bootstrap, topics, serve):
    w1 = worker(tmp_path, "w1", kafka_bootstrap, topics, max_wait_s=600).start()
    w2 = worker(tmp_path, "w2", kafka_bootstrap, topics, max_wait_s=600).start()
    client = AgentClient(serve, "http")
    try:
        wait_for(lambda: w1.assigned() and w2.assigned() and w1.assigned() | w2.assigned() == {0, 1, 2, 3},
                 "partitions shared by both workers")
        open_ids, roots = client.open_traces(8)
        wait_for(lambda: sum(metric_value(w.metrics_port, "trace_source_assembler_open_traces")
                             for w in (w1, w2)) == 8, "the workers buffering the 8 open traces")
        w1.kill()
        for root in roots:
            root.end()
        # The survivor gets w1's partitions once the group notices (session timeout) and replays them.
        wait_for(lambda: w2.assigned() == {0, 1, 2, 3}, "the survivor owning every partition", timeout_s=60)
        wait_for(lambda: set(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"])) >= set(open_ids),
                 "an envelope for every trace", timeout_s=60)
        assert_complete(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"]), open_ids)
    finally:
        client.close()
        w1.kill()
        w2.stop()


def test_poison_goes_to_dlq_and_large_envelopes_are_claim_checked(tmp_path, kafka_bootstrap, topics, serve):
    w = worker(tmp_path, "w", kafka_bootstrap, topics, max_message_bytes=4096).start()
    client = AgentClient(serve, "http")
    try:
        garbage = b"\x0a\xff\xff\xff\xff\x0f not protobuf"

        async def produce() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(topics["input_topic"], garbage, key=b"f" * 32,
                                             headers=[("signal", b"traces"), ("source-id", b"x")])
            finally:
                await producer.stop()

        asyncio.run(produce())
        expected = client.complete_traces(2)
        artifacts = tmp_path / "w" / "artifacts"
        wait_for(lambda: set(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"], artifacts)) >= set(expected),
                 "claim-checked envelopes")
        records = read_topic_sync(kafka_bootstrap, topics["traces_topic"])
        assert records and all(header(r, "content-type") == CLAIM_CHECK_CONTENT_TYPE for r in records)
        for r in records:
            ref = json.loads(r.value)
            path = artifacts / ref["claim_check"]["path"]
            assert path.name == f"{header(r, 'idempotency-key')}.json"
            assert Envelope.from_json_bytes(path.read_bytes()).trace_id == r.key.decode()
        assert_complete(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"], artifacts), expected)
        [dead] = wait_for(lambda: read_topic_sync(kafka_bootstrap, topics["dlq_topic"]), "a dead letter")
        assert dead.value == garbage and "not an OTLP TracesData" in header(dead, "error")
        assert header(dead, "source-topic") == topics["input_topic"] and header(dead, "original-key") == "f" * 32
        assert metric_value(w.metrics_port, "trace_source_assembler_dlq_records_total", cause="undecodable") == 1

        # The CLI reads the topic back, resolving the claim checks.
        listing = subprocess.run([str(_BIN), "traces", "--kafka-bootstrap-servers", kafka_bootstrap, "--topic",
                                  topics["traces_topic"], "--artifact-dir", str(artifacts), "--json"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
        rows = [json.loads(line) for line in listing.splitlines()]
        assert {r["trace_id"] for r in rows} == set(expected)
        assert all(r["agent"] == "planner" and r["llm_calls"] == 2 and r["status"] == "errors" for r in rows)
        shown = subprocess.run([str(_BIN), "traces", "--kafka-bootstrap-servers", kafka_bootstrap, "--topic",
                                topics["traces_topic"], "--artifact-dir", str(artifacts), "show",
                                next(iter(expected))[:10]], capture_output=True, text=True, timeout=60, check=True)
        assert "execute_tool search step-0" in shown.stdout and "tool timed out" in shown.stdout
    finally:
        client.close()
        w.stop()


def test_topic_limit_below_ours_falls_back_to_claim_check(tmp_path, kafka_bootstrap, topics, serve):
    """The traces topic exists with max.message.bytes far below the worker's limit: the broker refuses the
    envelope, and the worker claim-checks it instead of retrying forever."""
    asyncio.run(create_topic(kafka_bootstrap, topics["traces_topic"], partitions=4,
                             configs={"max.message.bytes": "2048"}))
    w = worker(tmp_path, "w", kafka_bootstrap, topics, compression="none").start()
    client = AgentClient(serve, "grpc")
    try:
        expected = client.complete_traces(2)
        artifacts = tmp_path / "w" / "artifacts"
        wait_for(lambda: set(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"], artifacts)) >= set(expected),
                 "claim-checked envelopes")
        assert_complete(envelopes_by_trace(kafka_bootstrap, topics["traces_topic"], artifacts), expected)
        assert metric_value(w.metrics_port, "trace_source_assembler_claim_checks_total") == 2
    finally:
        client.close()
        w.stop()
