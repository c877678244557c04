"""KafkaSink and create_topic against a real broker (fixtures from tests/conftest.py, no mocks)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from sinks.base import SIGNAL_LOGS, SIGNAL_TRACES, Batch, Record, RecordTooLarge, SinkUnavailable
from sinks.kafka import KafkaSink
from sinks.kafka_admin import create_topic
from tests.sink_support import make_batch

pytestmark = pytest.mark.kafka


def fresh_topic_name() -> str:
    """For tests that create the topic themselves (the ``kafka_topic`` fixture already creates it)."""
    return f"test-sink-{uuid.uuid4().hex[:12]}"


async def consume_until(bootstrap: str, topic: str, done: Callable[[list], bool], timeout_s: float = 30.0) -> list:
    """Read ``topic`` from the beginning until ``done(messages so far)``."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    messages: list = []
    try:
        async with asyncio.timeout(timeout_s):
            while not done(messages):
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    messages.extend(batch)
    finally:
        await consumer.stop()
    return messages


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    """Poll ``check`` until it holds; the generous bound only keeps a broken test from hanging."""
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.2)


async def test_write_lands_with_key_value_and_headers(kafka_bootstrap: str, kafka_topic: str) -> None:
    sink = KafkaSink(kafka_bootstrap, topic=kafka_topic)
    await sink.start()
    try:
        assert await sink.ready()
        batch = make_batch(1, 5)
        log_batch = Batch([Record(None, b"logs-without-trace-id", SIGNAL_LOGS, 2)], "other-source", 42)
        await sink.write(batch)
        await sink.write(log_batch)
        assert sink.inflight_bytes == 0
    finally:
        await sink.stop()

    messages = await consume_until(kafka_bootstrap, kafka_topic, lambda m: len(m) >= 6)
    by_key = {m.key: m for m in messages}
    assert len(messages) == 6 and len(by_key) == 6
    for record in batch.records:
        message = by_key[record.key]
        assert message.value == record.value
        assert list(message.headers) == batch.headers(record)
    logs = by_key[None]
    assert logs.value == b"logs-without-trace-id"
    assert list(logs.headers) == log_batch.headers(log_batch.records[0])
    # Key-partitioned: every record of one trace id lands on the same partition as the Java client would put it.
    assert len({m.partition for m in messages if m.key is not None}) > 1


@pytest.mark.parametrize("kafka_topic", [1], indirect=True)
async def test_record_over_max_request_size_is_refused_before_sending(kafka_bootstrap: str, kafka_topic: str) -> None:
    sink = KafkaSink(kafka_bootstrap, topic=kafka_topic, max_request_size=20_000, max_batch_size=16_384)
    await sink.start()
    try:
        batch = Batch([*make_batch(1, 2).records, *make_batch(2, 1, value_size=30_000).records], "src", 1)
        with pytest.raises(RecordTooLarge) as excinfo:
            await sink.write(batch)
        assert excinfo.value.key == batch.records[2].key
        assert excinfo.value.size_bytes > excinfo.value.limit_bytes == 20_000
        assert sink.inflight_bytes == 0
        await sink.write(make_batch(3, 1))  # the sink keeps working
    finally:
        await sink.stop()
    # Nothing of the refused batch was sent: only the later one-record batch is on the topic.
    messages = await consume_until(kafka_bootstrap, kafka_topic, lambda m: len(m) >= 1)
    assert [m.key for m in messages] == [make_batch(3, 1).records[0].key]


async def test_record_over_topic_limit_raises_record_too_large(kafka_bootstrap: str) -> None:
    topic = fresh_topic_name()
    await create_topic(kafka_bootstrap, topic, partitions=1, config={"max.message.bytes": "10000"})
    sink = KafkaSink(kafka_bootstrap, topic=topic)
    await sink.start()
    try:
        # Random bytes: the broker checks the *compressed* batch, so the value must not compress.
        batch = Batch([Record(b"ab" * 16, os.urandom(50_000), SIGNAL_TRACES, 1)], "src", 1)
        with pytest.raises(RecordTooLarge) as excinfo:
            await sink.write(batch)
        assert excinfo.value.key == b"ab" * 16
        await sink.write(make_batch(2, 1))
    finally:
        await sink.stop()


async def test_create_topic_is_idempotent_and_sets_max_message_bytes(kafka_bootstrap: str) -> None:
    topic = fresh_topic_name()
    assert await create_topic(kafka_bootstrap, topic, partitions=2, max_request_size=2_000_000) is True
    assert await create_topic(kafka_bootstrap, topic, partitions=2) is False

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        (topic_meta,) = await admin.describe_topics([topic])
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})]
        )
    finally:
        await admin.close()
    assert len(topic_meta["partitions"]) == 2
    # resources: (error_code, error_message, resource_type, resource_name, config_entries)
    entries = {entry[0]: entry[1] for entry in response.resources[0][4]}
    assert entries["max.message.bytes"] == "2000000"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_start_gives_up_with_a_clear_error_when_unreachable() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    sink = KafkaSink(address, start_timeout_s=1.0)
    with pytest.raises(SinkUnavailable, match=address):
        await sink.start()
    assert not await sink.ready()


async def test_start_names_a_missing_topic(kafka_bootstrap: str) -> None:
    topic = fresh_topic_name()
    sink = KafkaSink(kafka_bootstrap, topic=topic, start_timeout_s=1.0)
    with pytest.raises(SinkUnavailable, match=f"topic {topic} does not exist"):
        await sink.start()


@pytest.mark.slow
async def test_broker_down_fails_fast_bounds_memory_and_recovers(kafka_broker_factory) -> None:
    cluster = await asyncio.to_thread(kafka_broker_factory)
    bootstrap = cluster.bootstrap_servers
    kafka_topic = fresh_topic_name()
    await create_topic(bootstrap, kafka_topic, partitions=3)
    batch_bytes = 5 * 20_000
    sink = KafkaSink(
        bootstrap,
        topic=kafka_topic,
        write_timeout_s=2.0,
        max_inflight_bytes=3 * batch_bytes,
        probe_interval_s=0.5,
    )
    await sink.start()
    acked: list[Batch] = [make_batch(0, 5, value_size=20_000)]
    try:
        await sink.write(acked[0])

        await asyncio.to_thread(cluster.stop_node, 0)
        outcomes = []
        for b in range(1, 16):
            try:
                await sink.write(make_batch(b, 5, value_size=20_000))
                outcomes.append("ok")
            except SinkUnavailable as exc:
                outcomes.append(str(exc))
                # Records handed over stay queued in the producer, but never much beyond the bound.
                assert sink.inflight_bytes <= sink.max_inflight_bytes + batch_bytes + 5 * 1000
        assert "ok" not in outcomes
        assert any("did not acknowledge" in o for o in outcomes)
        assert any("waiting for acknowledgement" in o for o in outcomes)  # refused at once past the bound

        async def not_ready() -> bool:
            return not await sink.ready()

        await eventually(not_ready)

        await asyncio.to_thread(cluster.start_node, 0)

        async def write_succeeds() -> bool:
            batch = make_batch(100 + len(acked), 5, value_size=20_000)
            try:
                await sink.write(batch)
            except SinkUnavailable:
                return False
            acked.append(batch)
            return True

        await eventually(write_succeeds)
        await eventually(sink.ready)

        async def nothing_inflight() -> bool:  # the records queued while the broker was down got delivered too
            return sink.inflight_bytes == 0

        await eventually(nothing_inflight)
    finally:
        await sink.stop()

    # Every acknowledged record is on the topic (records of failed writes may be there too).
    wanted = {r.key for batch in acked for r in batch.records}
    await consume_until(bootstrap, kafka_topic, lambda messages: wanted <= {m.key for m in messages})
