"""The Kafka test harness gives real brokers that aiokafka can use, including under faults.

Deadlines below only keep a broken test from hanging; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError

from kafka_harness import KafkaCluster, KafkaHarnessError, create_topic, ensure_kafka_jars


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Send *values* with the settings the project uses: idempotent, hence acks=all."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=value) for value in values]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def consume(
    bootstrap: str, topic: str, count: int, group_id: str | None = None
) -> list[bytes]:
    """Read *count* records from the start of *topic* (committing them if in a group)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                values.extend(record.value for record in records)
            if group_id is not None and batches:
                await consumer.commit()
    finally:
        await consumer.stop()
    return values


@contextlib.asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


def messages(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(count)]


@pytest.mark.kafka
async def test_round_trip_through_a_consumer_group(kafka_bootstrap: str, kafka_topic: str) -> None:
    sent = messages("m", 50)
    await produce(kafka_bootstrap, kafka_topic, sent)

    group = f"group-{uuid.uuid4().hex[:8]}"
    received = await consume(kafka_bootstrap, kafka_topic, len(sent), group_id=group)

    assert sorted(received) == sorted(sent)
    async with admin_client(kafka_bootstrap) as admin:
        committed = await admin.list_consumer_group_offsets(group)
    assert sum(meta.offset for meta in committed.values()) == len(sent)


@pytest.mark.kafka
@pytest.mark.parametrize("kafka_topic", [1], indirect=True)
async def test_kafka_topic_partition_count_is_parametrizable(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    async with admin_client(kafka_bootstrap) as admin:
        (topic,) = await admin.describe_topics([kafka_topic])
    assert [p["partition"] for p in topic["partitions"]] == [0]


@pytest.mark.kafka
async def test_topics_are_not_auto_created(kafka_bootstrap: str) -> None:
    topic = f"missing-{uuid.uuid4().hex[:12]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=2000)
    await producer.start()
    try:
        with pytest.raises(UnknownTopicOrPartitionError):
            await producer.send(topic, b"x")
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_single_node_keeps_data_and_address_across_restart(
    kafka_broker_factory: Callable[..., KafkaCluster],
) -> None:
    broker: KafkaCluster = await asyncio.to_thread(kafka_broker_factory, 1)
    bootstrap = broker.bootstrap_servers
    await create_topic(bootstrap, "durable")
    await produce(bootstrap, "durable", messages("before", 20))

    await asyncio.to_thread(broker.stop_node, 0)
    await asyncio.to_thread(broker.start_node, 0)

    assert broker.bootstrap_servers == bootstrap
    await produce(bootstrap, "durable", messages("after", 20))
    received = await consume(bootstrap, "durable", 40)
    assert sorted(received) == sorted(messages("before", 20) + messages("after", 20))


@pytest.mark.kafka
@pytest.mark.slow
async def test_three_nodes_survive_a_killed_node(
    kafka_broker_factory: Callable[..., KafkaCluster],
) -> None:
    cluster: KafkaCluster = await asyncio.to_thread(kafka_broker_factory, 3)
    bootstrap = cluster.bootstrap_servers
    await create_topic(bootstrap, "replicated", replication_factor=3)
    await produce(bootstrap, "replicated", messages("all-up", 30))

    await asyncio.to_thread(cluster.kill_node, 0)
    # acks=all with min.insync.replicas=2: still accepted with one replica gone.
    await produce(bootstrap, "replicated", messages("one-down", 30))
    received = await consume(bootstrap, "replicated", 60)
    assert sorted(received) == sorted(messages("all-up", 30) + messages("one-down", 30))

    await asyncio.to_thread(cluster.start_node, 0)
    async with admin_client(cluster.node_address(0)) as admin:
        brokers = (await admin.describe_cluster())["brokers"]
    assert {b["node_id"] for b in brokers} == {1, 2, 3}

    await produce(bootstrap, "replicated", messages("back", 30))
    received = await consume(bootstrap, "replicated", 90)
    assert sorted(received) == sorted(
        messages("all-up", 30) + messages("one-down", 30) + messages("back", 30)
    )


@pytest.mark.kafka
def test_jar_cache_is_reused_without_maven(monkeypatch: pytest.MonkeyPatch) -> None:
    libs = ensure_kafka_jars()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert ensure_kafka_jars() == libs
    assert any(libs.glob("kafka_2.13-*.jar"))


@pytest.mark.kafka
def test_failed_start_reports_the_reason() -> None:
    cluster = KafkaCluster(overrides={"num.partitions": "not-a-number"})
    with pytest.raises(KafkaHarnessError, match="num.partitions"):
        cluster.start()
