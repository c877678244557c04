"""No restart gap in the assembler on Kafka: late data after a restart becomes version N+1 of the whole trace.

Real OTel SDK exporters -> ``trace-source serve`` (Kafka) -> ``trace-source worker assemble`` (a real process):

1. a complete agent run is assembled into envelope version 1, and the worker commits its offsets past the run;
2. the worker is SIGKILLed; a late span of that run arrives while no assembler runs;
3. a new worker starts. With the traces index (the default) it reads the index on assignment, recognizes the run,
   fetches its envelope and emits version 2 holding every span. Without it (``--traces-index-topic ""``, the
   control) the late span comes out as an envelope of its own — the gap this closes.

And a replay: a worker killed before it could commit re-reads the run's records after the restart; with the index
it recognizes them as already emitted and publishes nothing twice.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry import trace as otel_trace

from assembler_support import AgentClient, WorkerProcess, read_topic_sync, wait_for
from kafka_harness import create_topic
from pipeline.outputs import resolve_envelope
from serve_proc import ServeProcess

pytestmark = pytest.mark.kafka


def envelopes(bootstrap: str, topic: str, trace_id: str) -> list:
    return [resolve_envelope(r.value, r.headers, None) for r in read_topic_sync(bootstrap, topic)
            if r.key.decode() == trace_id]


def committed_to_end(bootstrap: str, group: str, topic: str) -> bool:
    """Whether ``group`` committed every partition of ``topic`` up to its last record."""
    end: dict[int, int] = {}
    for rec in read_topic_sync(bootstrap, topic):
        end[rec.partition] = max(end.get(rec.partition, 0), rec.offset + 1)

    async def committed() -> dict:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
    offsets = {tp.partition: meta.offset for tp, meta in asyncio.run(committed()).items() if tp.topic == topic}
    return bool(end) and all(offsets.get(p, -1) >= e for p, e in end.items())


@pytest.fixture
async def topics(kafka_bootstrap: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:10]
    names = {"input_topic": f"spans-{suffix}", "traces_topic": f"traces-{suffix}", "dlq_topic": f"dlq-{suffix}",
             "group_id": f"assembler-{suffix}", "traces_index_topic": f"index-{suffix}"}
    await create_topic(kafka_bootstrap, names["input_topic"], partitions=2)
    return names


def late_child(client: AgentClient, trace_id: str, root_span_id: str) -> str:
    """Export one more span of the run ``trace_id``, a child of its root; returns its span id."""
    parent = otel_trace.SpanContext(int(trace_id, 16), int(root_span_id, 16), is_remote=False,
                                    trace_flags=otel_trace.TraceFlags(1))
    ctx = otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(parent))
    with client.tracer.start_as_current_span("late tool call", context=ctx, attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "late"}) as span:
        return format(span.get_span_context().span_id, "016x")


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "control-without-index"])
def test_late_data_after_a_restart_is_version_2_of_the_whole_trace(tmp_path, kafka_bootstrap, topics,
                                                                  with_index):
    names = dict(topics)
    if not with_index:
        names["traces_index_topic"] = ""
    with ServeProcess(tmp_path / "serve", "--kafka-topic", names["input_topic"],
                      kafka_bootstrap=kafka_bootstrap) as serve:
        client = AgentClient(serve, "http")
        w = WorkerProcess(tmp_path / "w.log", kafka_bootstrap_servers=kafka_bootstrap, state_dir=tmp_path / "w",
                          quiet_period_s=1, commit_interval_s=0.2, group_instance_id="assembler-0",
                          max_wait_s=5, **names)  # a rootless fragment closes at max-wait
        try:
            w.start()
            run = client.complete_traces(1)
            (trace_id, span_ids), = run.items()
            wait_for(lambda: len(envelopes(kafka_bootstrap, names["traces_topic"], trace_id)) == 1, "version 1")
            (v1,) = envelopes(kafka_bootstrap, names["traces_topic"], trace_id)
            assert v1.envelope_version == 1 and {s.span_id for s in v1.spans} == span_ids
            wait_for(lambda: committed_to_end(kafka_bootstrap, names["group_id"], names["input_topic"]),
                     "offsets committed past the run")
            w.kill()

            root = next(s.span_id for s in v1.spans if not s.parent_span_id)
            late = late_child(client, trace_id, root)
            w.start()
            wait_for(lambda: len(envelopes(kafka_bootstrap, names["traces_topic"], trace_id)) == 2,
                     "an envelope for the late span")
            newest = envelopes(kafka_bootstrap, names["traces_topic"], trace_id)[-1]
            if with_index:
                assert newest.envelope_version == 2
                assert {s.span_id for s in newest.spans} == span_ids | {late}  # the whole trace
                assert newest.idempotency_key != v1.idempotency_key
                assert [e for e in w.events() if e.get("event") == "assembler.index_loaded" and e["entries"] >= 1]
            else:  # the gap: a fragment holding just the late span, as version 1
                assert newest.envelope_version == 1
                assert {s.span_id for s in newest.spans} == {late}
        finally:
            client.close()
            w.stop()


def test_replay_after_a_crash_publishes_nothing_twice(tmp_path, kafka_bootstrap, topics):
    with ServeProcess(tmp_path / "serve", "--kafka-topic", topics["input_topic"],
                      kafka_bootstrap=kafka_bootstrap) as serve:
        client = AgentClient(serve, "grpc")
        # commits every 10 minutes: a crash leaves everything to be replayed
        w = WorkerProcess(tmp_path / "w.log", kafka_bootstrap_servers=kafka_bootstrap, state_dir=tmp_path / "w",
                          quiet_period_s=1, commit_interval_s=600, group_instance_id="assembler-0", **topics)
        try:
            w.start()
            runs = client.complete_traces(3)
            wait_for(lambda: {r.key.decode() for r in read_topic_sync(kafka_bootstrap, topics["traces_topic"])}
                     == set(runs), "version 1 of every run")
            w.kill()
            w.start()
            marker = client.complete_traces(1)  # assembled after the replay of the 3 runs' records
            wait_for(lambda: set(marker) <= {r.key.decode() for r in
                                             read_topic_sync(kafka_bootstrap, topics["traces_topic"])},
                     "the run sent after the restart")
            keys = [r.key.decode() for r in read_topic_sync(kafka_bootstrap, topics["traces_topic"])]
            assert sorted(keys) == sorted([*runs, *marker])  # each run once: the replay was recognized
        finally:
            client.close()
            w.stop()
