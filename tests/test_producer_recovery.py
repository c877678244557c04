"""The Kafka producer recovers from aiokafka's fatal states, against a real broker.

* **Burnt sequence numbers.** A batch the broker refuses for good (here ``MESSAGE_TOO_LARGE``: the topic's
  ``max.message.bytes`` is below the producer's limit) leaves a gap in the idempotent producer's sequence, and every
  later batch for that partition fails with ``OutOfOrderSequenceNumber`` — shown first with a bare aiokafka producer
  in the same run, so the test reproduces the real failure, not an imitation. The sink replaces its producer and the
  next writes land; ``serve`` keeps answering 200 to a real exporter after the 413.
* **A dead sender task.** An unexpected error inside aiokafka's sender (raised from its real drain step) kills the
  background task; the sink is not ready until a new producer is in service, writes meanwhile are refused (never
  acknowledged), and every write that was acknowledged is on the topic exactly once.
* The stage workers' ``KafkaPublisher`` recovers the same way.
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from pathlib import Path

import pytest
import requests
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from interop_support import (assert_each_span_exactly_once, landed_kafka, make_agent_traces, metric,
                              span_exporter)
from kafka_harness import create_topic
from pipeline.bus import RecordTooLargeError
from pipeline.kafka_bus import KafkaPublisher
from serve_proc import ServeProcess
from sinks.base import SIGNAL_TRACES, Batch, Record, RecordTooLarge, SinkUnavailable
from sinks.kafka import KafkaSink
from tests.sink_support import make_batch
from tests.test_kafka_sink import consume_until, eventually

pytestmark = pytest.mark.kafka

TOPIC_LIMIT = 10_000


def incompressible(n: int) -> bytes:
    """Random bytes: the broker checks the *compressed* batch against max.message.bytes."""
    return os.urandom(n)


async def small_topic(bootstrap: str) -> str:
    topic = f"recovery-{uuid.uuid4().hex[:10]}"
    await create_topic(bootstrap, topic, partitions=1, configs={"max.message.bytes": str(TOPIC_LIMIT)})
    return topic


async def test_bare_aiokafka_producer_is_stuck_after_a_refused_batch(kafka_bootstrap: str) -> None:
    """The failure mode the sink must survive, reproduced with aiokafka alone."""
    topic = await small_topic(kafka_bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        await (await producer.send(topic, b"first", key=b"k"))
        with pytest.raises(Exception):
            await (await producer.send(topic, incompressible(50_000), key=b"k"))
        for _ in range(2):
            with pytest.raises(OutOfOrderSequenceNumber):
                await asyncio.wait_for(await producer.send(topic, b"later", key=b"k"), 30)
    finally:
        await producer.stop()


async def test_sink_replaces_its_producer_after_a_refused_batch(kafka_bootstrap: str) -> None:
    topic = await small_topic(kafka_bootstrap)
    sink = KafkaSink(kafka_bootstrap, topic=topic)
    await sink.start()
    try:
        await sink.write(make_batch(1, 2))
        with pytest.raises(RecordTooLarge):
            await sink.write(Batch([Record(b"big", incompressible(50_000), SIGNAL_TRACES, 1)], "src", 1))
        for batch_id in range(2, 6):
            await sink.write(make_batch(batch_id, 2))  # each acknowledged: none fails with OutOfOrderSequence
        assert sink._slot.replacements == 1
        assert await sink.ready()
    finally:
        await sink.stop()
    keys = {f"{b:016x}{i:016x}".encode() for b in range(1, 6) for i in range(2)}
    landed = await consume_until(kafka_bootstrap, topic, lambda msgs: len(msgs) >= len(keys))
    assert sorted(m.key for m in landed) == sorted(keys)  # each exactly once, the refused record never


async def test_sink_replaces_its_producer_after_the_sender_task_dies(kafka_bootstrap: str, kafka_topic: str) -> None:
    sink = KafkaSink(kafka_bootstrap, topic=kafka_topic, linger_ms=50)
    await sink.start()
    acknowledged: list[Batch] = []
    refused = 0
    try:
        await sink.write(make_batch(0, 3))
        acknowledged.append(make_batch(0, 3))
        producer = sink._slot.producer
        accumulator = producer._message_accumulator
        real_drain = accumulator.drain_by_nodes

        def failing_drain(*args, **kwargs):
            if not any(accumulator._batches.values()):
                return real_drain(*args, **kwargs)
            accumulator.drain_by_nodes = real_drain
            raise RuntimeError("injected: the sender's drain step failed")  # with records queued

        accumulator.drain_by_nodes = failing_drain  # the real sender task's next drain raises, and the task dies
        # Hold the replacement until we have looked at readiness (timing control only; the broker is real).
        release = asyncio.Event()
        real_open = sink._slot.open

        async def held_open():
            await release.wait()
            return await real_open()

        sink._slot.open = held_open

        async def writer(batch_id: int) -> None:
            nonlocal refused
            batch = make_batch(batch_id, 3)
            try:
                await sink.write(batch)
                acknowledged.append(batch)
            except SinkUnavailable:
                refused += 1

        await asyncio.gather(*(writer(i) for i in range(1, 6)))
        assert refused == 5  # the records queued when the sender died were failed, never acknowledged
        assert not await sink.ready()
        assert "sender task died" in sink.not_ready_reason
        release.set()

        async def replaced() -> bool:
            return sink._slot.replacements == 1 and await sink.ready()
        await eventually(replaced)
        assert sink._slot.producer is not producer
        for batch_id in range(10, 13):
            await sink.write(make_batch(batch_id, 3))
            acknowledged.append(make_batch(batch_id, 3))
    finally:
        await sink.stop()
    keys = sorted(r.key for b in acknowledged for r in b.records)
    landed = await consume_until(kafka_bootstrap, kafka_topic, lambda msgs: len(msgs) >= len(keys))
    assert sorted(m.key for m in landed) == keys  # every acknowledged record once, none of the refused ones


async def test_publisher_replaces_its_producer_after_a_refused_batch(kafka_bootstrap: str) -> None:
    topic = await small_topic(kafka_bootstrap)
    publisher = KafkaPublisher(kafka_bootstrap, max_message_bytes=1_048_576, compression_type=None)
    await publisher.start()
    try:
        await publisher.publish(topic, b"k", b"first")
        with pytest.raises(RecordTooLargeError):
            await publisher.publish(topic, b"k", incompressible(50_000))
        for i in range(3):
            await publisher.publish(topic, b"k", f"after-{i}".encode())
        assert publisher._slot.replacements == 1 and publisher.ready()
    finally:
        await publisher.stop()
    landed = await consume_until(kafka_bootstrap, topic, lambda msgs: len(msgs) >= 4)
    assert [m.value for m in landed] == [b"first", b"after-0", b"after-1", b"after-2"]


async def test_serve_answers_413_then_keeps_taking_spans(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Through the real receiver and exporter: one trace too large for the topic gets 413; the traces after it, on
    the same partition, are acknowledged (200) and land once each."""
    topic = await small_topic(kafka_bootstrap)
    with ServeProcess(tmp_path / "serve", "--kafka-topic", topic, "--max-record-bytes", "200000",
                      kafka_bootstrap=kafka_bootstrap) as serve:
        provider = TracerProvider(resource=Resource.create({"service.name": "recovery"}))
        provider.add_span_processor(SimpleSpanProcessor(span_exporter(serve, "http")))
        tracer = provider.get_tracer("recovery")
        try:
            before = await asyncio.to_thread(make_agent_traces, provider, ("recovery", "1"), 1)
            with tracer.start_as_current_span("too big", attributes={
                    "blob": base64.b64encode(incompressible(60_000)).decode()}):
                pass
            after = await asyncio.to_thread(make_agent_traces, provider, ("recovery", "1"), 3)
        finally:
            provider.shutdown()
        assert metric(serve.http_url, "trace_source_requests_total", status="413") == 1
        assert metric(serve.http_url, "trace_source_requests_total", status="503") == 0
        assert requests.get(f"{serve.http_url}/readyz", timeout=10).status_code == 200
    assert_each_span_exactly_once(await landed_kafka(kafka_bootstrap, topic), {**before, **after})
