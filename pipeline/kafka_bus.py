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
from aiokafka.structs import RecordMetadata, TopicPartition

from pipeline.bus import BusPublishError, BusRecord, Headers, PartitionListener, RecordTooLargeError
from sinks.kafka_producer import ManagedProducer
from sinks.kafka_security import KafkaSecurity, aiokafka_kwargs, start_or_explain

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
    ``security``: TLS / SASL settings (``None`` = PLAINTEXT).
    """

    def __init__(self, bootstrap_servers: str, *, topic: str, group_id: str, client_id: str = "trace-source",
                 session_timeout_ms: int = 10000, heartbeat_interval_ms: int = 3000,
                 max_poll_interval_ms: int = 300000, rebalance_timeout_ms: int = 30000,
                 group_instance_id: str | None = None, security: KafkaSecurity | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group_id = group_id
        self.security = security
        self._kwargs = dict(
            bootstrap_servers=bootstrap_servers, group_id=group_id, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms, rebalance_timeout_ms=rebalance_timeout_ms,
            group_instance_id=group_instance_id)
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self, listener: PartitionListener) -> None:
        """Connect and subscribe. Raises ``aiokafka.errors.KafkaError`` when the cluster cannot be reached
        (:class:`sinks.kafka_security.KafkaSecurityError` when it refuses our credentials or certificates)."""
        consumer = AIOKafkaConsumer(**self._kwargs, **aiokafka_kwargs(self.security))
        consumer.subscribe([self.topic], listener=_Listener(self.topic, listener))
        try:
            await start_or_explain(consumer.start, self.bootstrap_servers, self.security)
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
    ``security``: TLS / SASL settings (``None`` = PLAINTEXT). A producer that can no longer deliver (a refused batch,
    a dead sender task) is replaced (:class:`sinks.kafka_producer.ManagedProducer`); ``publish`` raises
    :class:`pipeline.bus.BusPublishError` meanwhile, which callers retry.
    """

    def __init__(self, bootstrap_servers: str, *, compression_type: str | None = "zstd",
                 max_message_bytes: int = 1048576, linger_ms: int = 5, request_timeout_ms: int = 15000,
                 publish_timeout_s: float = 30.0, client_id: str = "trace-source",
                 security: KafkaSecurity | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.max_message_bytes = max_message_bytes
        self.publish_timeout_s = publish_timeout_s
        self.security = security
        kwargs = dict(
            bootstrap_servers=bootstrap_servers, client_id=client_id, enable_idempotence=True,
            compression_type=compression_type, linger_ms=linger_ms, max_request_size=max_message_bytes,
            # aiokafka does not split a batch the broker rejects as too large, so a batch must fit the limit too.
            max_batch_size=min(262144, max_message_bytes), request_timeout_ms=request_timeout_ms)
        self._slot = ManagedProducer(lambda: AIOKafkaProducer(**kwargs, **aiokafka_kwargs(security)),
                                     bootstrap_servers=bootstrap_servers, security=security,
                                     close_timeout_s=publish_timeout_s)

    async def start(self) -> None:
        """Connect. Raises ``aiokafka.errors.KafkaError`` when the cluster cannot be reached
        (:class:`sinks.kafka_security.KafkaSecurityError` when it refuses our credentials or certificates)."""
        self._slot.serve(await self._slot.open())

    def ready(self) -> bool:
        """False while a producer that could no longer deliver is being replaced."""
        return self._slot.usable() is not None

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers = (), *,
                      partition: int | None = None) -> RecordMetadata:
        """Produce one record and wait for ``acks=all``; returns its ``RecordMetadata`` (partition, offset).
        ``partition``: a fixed partition instead of the key's (murmur2) one."""
        producer = await self._slot.wait_usable(self.publish_timeout_s / 2)
        if producer is None:
            raise BusPublishError(f"Kafka at {self.bootstrap_servers}: {self._slot.problem}")
        delivery = None
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                delivery = await producer.send(topic, value=value, key=key, headers=list(headers),
                                               partition=partition)
                return await delivery
        except TimeoutError as exc:
            raise BusPublishError(f"Kafka at {self.bootstrap_servers} did not acknowledge a record for {topic} "
                                  f"within {self.publish_timeout_s:g} s") from exc
        except KafkaError as exc:
            if delivery is not None:  # a batch the broker refused: the producer's sequence has a gap now
                self._slot.delivery_failed(producer, exc)
            else:
                self._slot.usable()  # send() raises a dead sender's error: notice it
            if isinstance(exc, MessageSizeTooLargeError):
                raise RecordTooLargeError(f"Kafka at {self.bootstrap_servers} refused a record of {len(value)} "
                                          f"bytes for {topic} as too large: {exc!r}") from exc
            raise BusPublishError(f"Kafka at {self.bootstrap_servers} refused a record for {topic}: {exc!r}") from exc

    def record_size(self, key: bytes | None, value: bytes, headers: Headers = ()) -> int:
        return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))

    async def stop(self) -> None:
        await self._slot.stop()


async def read_kafka_record(bootstrap_servers: str, topic: str, partition: int, offset: int,
                            timeout_s: float = 15.0, security: KafkaSecurity | None = None) -> BusRecord | None:
    """The record at ``topic``/``partition``/``offset`` (no consumer group), or ``None`` when it is gone
    (retention, compaction) or not there. Raises ``KafkaError`` when the cluster cannot be reached."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                                client_id="trace-source-reprocess", **aiokafka_kwargs(security))
    await start_or_explain(consumer.start, bootstrap_servers, security)
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
