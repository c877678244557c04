"""The cluster shape's bus: an aiokafka consumer group member and an idempotent producer.

Consumer (``/work/shared/reference/kafka-and-helm.md`` §3): ``enable_auto_commit=False`` (offsets move only when
the stage commits its low-watermark), ``auto_offset_reset="earliest"`` (a new group reads what is already on the
topic instead of silently skipping it), and a rebalance listener that forwards revocations/assignments to the
stage, which commits what is safe and drops the revoked partitions' state before they move.

Producer: ``enable_idempotence=True`` (forces ``acks=all``; retries never duplicate within a session), compression
(zstd by default), ``max_request_size`` = the output's message limit. ``publish`` waits for the acknowledgement.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition

from pipeline.bus import BusPublishError, BusRecord, Headers, PartitionListener, RecordTooLargeError

log = structlog.get_logger(__name__)


class _Listener(ConsumerRebalanceListener):
    """Adapts aiokafka's ``TopicPartition`` callbacks to :class:`pipeline.bus.PartitionListener` (ints)."""

    def __init__(self, topic: str, listener: PartitionListener) -> None:
        self.topic = topic
        self.listener = listener

    async def on_partitions_revoked(self, revoked) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self.topic}
        if parts:
            await self.listener.on_revoked(parts)

    async def on_partitions_assigned(self, assigned) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == self.topic}
        if parts:
            await self.listener.on_assigned(parts)


class KafkaConsumerBus:
    """:class:`pipeline.bus.BusConsumer` for ``topic`` in consumer group ``group_id``.

    ``session_timeout_ms``/``heartbeat_interval_ms``: group liveness (heartbeats run in aiokafka's background task,
    so they continue while the stage builds envelopes in a thread). ``max_poll_interval_ms``: the consumer leaves
    the group when ``poll`` is not called for this long (e.g. output down for minutes); it rejoins on the next
    ``poll``. ``rebalance_timeout_ms``: how long the group waits for members to finish ``on_revoked``.
    """

    def __init__(self, bootstrap_servers: str, *, topic: str, group_id: str, client_id: str = "trace-source",
                 session_timeout_ms: int = 10000, heartbeat_interval_ms: int = 3000,
                 max_poll_interval_ms: int = 300000, rebalance_timeout_ms: int = 30000,
                 group_instance_id: str | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group_id = group_id
        self._kwargs = dict(
            bootstrap_servers=bootstrap_servers, group_id=group_id, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms, rebalance_timeout_ms=rebalance_timeout_ms,
            group_instance_id=group_instance_id)
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self, listener: PartitionListener) -> None:
        """Connect and subscribe. Raises ``aiokafka.errors.KafkaError`` when the cluster cannot be reached."""
        consumer = AIOKafkaConsumer(**self._kwargs)
        consumer.subscribe([self.topic], listener=_Listener(self.topic, listener))
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        log.info("kafka_bus.consumer_started", topic=self.topic, group_id=self.group_id,
                 bootstrap_servers=self.bootstrap_servers)

    async def poll(self, max_records: int, timeout_s: float) -> list[BusRecord]:
        batches = await self._require().getmany(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[BusRecord] = []
        for tp, msgs in batches.items():
            for m in msgs:
                out.append(BusRecord(topic=tp.topic, partition=tp.partition, offset=m.offset, key=m.key,
                                     value=m.value if m.value is not None else b"",
                                     headers=tuple(m.headers or ())))
        return out

    async def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit owned partitions' offsets; a commit refused because the group is rebalancing is logged and
        skipped (the revocation callback commits, or the next owner replays: at-least-once either way)."""
        consumer = self._require()
        owned = consumer.assignment()
        tps = {TopicPartition(self.topic, p): o for p, o in offsets.items()
               if TopicPartition(self.topic, p) in owned}
        if not tps:
            return
        try:
            await consumer.commit(tps)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("kafka_bus.commit_skipped", topic=self.topic, group_id=self.group_id, error=str(exc))

    def assignment(self) -> frozenset[int]:
        if self._consumer is None:
            return frozenset()
        return frozenset(tp.partition for tp in self._consumer.assignment() if tp.topic == self.topic)

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()  # leaves the group: partitions move at once instead of after the session timeout

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaConsumerBus is not started")
        return self._consumer


class KafkaPublisher:
    """:class:`pipeline.bus.BusPublisher` producing with an idempotent ``acks=all`` producer.

    ``max_message_bytes``: the largest record (as aiokafka estimates it, uncompressed) this publisher sends; keep the
    output topics' ``max.message.bytes`` at least this large. ``publish_timeout_s`` bounds one ``publish``.
    """

    def __init__(self, bootstrap_servers: str, *, compression_type: str | None = "zstd",
                 max_message_bytes: int = 1048576, linger_ms: int = 5, request_timeout_ms: int = 15000,
                 publish_timeout_s: float = 30.0, client_id: str = "trace-source") -> None:
        self.bootstrap_servers = bootstrap_servers
        self.max_message_bytes = max_message_bytes
        self.publish_timeout_s = publish_timeout_s
        self._kwargs = dict(
            bootstrap_servers=bootstrap_servers, client_id=client_id, enable_idempotence=True,
            compression_type=compression_type, linger_ms=linger_ms, max_request_size=max_message_bytes,
            # aiokafka does not split a batch the broker rejects as too large, so a batch must fit the limit too.
            max_batch_size=min(262144, max_message_bytes), request_timeout_ms=request_timeout_ms)
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Connect. Raises ``aiokafka.errors.KafkaError`` when the cluster cannot be reached."""
        producer = AIOKafkaProducer(**self._kwargs)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        producer = self._producer
        if producer is None:
            raise BusPublishError("KafkaPublisher is not started")
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                delivery = await producer.send(topic, value=value, key=key, headers=list(headers))
                await delivery
        except TimeoutError as exc:
            raise BusPublishError(f"Kafka at {self.bootstrap_servers} did not acknowledge a record for {topic} "
                                  f"within {self.publish_timeout_s:g} s") from exc
        except MessageSizeTooLargeError as exc:
            raise RecordTooLargeError(f"Kafka at {self.bootstrap_servers} refused a record of {len(value)} bytes "
                                      f"for {topic} as too large: {exc!r}") from exc
        except KafkaError as exc:
            raise BusPublishError(f"Kafka at {self.bootstrap_servers} refused a record for {topic}: {exc!r}") from exc

    def record_size(self, key: bytes | None, value: bytes, headers: Headers = ()) -> int:
        return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                async with asyncio.timeout(self.publish_timeout_s):
                    await producer.stop()
            except TimeoutError:
                log.warning("kafka_bus.producer_stop_timeout", bootstrap_servers=self.bootstrap_servers)


async def read_kafka_record(bootstrap_servers: str, topic: str, partition: int, offset: int,
                            timeout_s: float = 15.0) -> BusRecord | None:
    """The record at ``topic``/``partition``/``offset`` (no consumer group), or ``None`` when it is gone
    (retention, compaction) or not there. Raises ``KafkaError`` when the cluster cannot be reached."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                client_id="trace-source-reprocess")
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500, max_records=1)
            for m in batches.get(tp, []):
                if m.offset != offset:
                    return None  # the requested offset no longer exists; Kafka moved to the next one
                return BusRecord(topic=topic, partition=partition, offset=m.offset, key=m.key,
                                 value=m.value if m.value is not None else b"", headers=tuple(m.headers or ()))
        return None
    finally:
        await consumer.stop()
