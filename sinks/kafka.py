"""Kafka sink: per-trace batches produced with an idempotent ``acks=all`` aiokafka producer.

``write()`` returns once the leader acknowledged every record with all in-sync replicas (``acks=all``, forced by
``enable_idempotence=True``), so a 2xx to the exporter means the spans are replicated. The wire form is the one the
OpenTelemetry Collector's Kafka exporter writes with ``encoding: otlp_proto`` and partitioning by trace id: key =
trace id as 32 lowercase hex characters, value = OTLP protobuf bytes of one trace, headers from
:meth:`sinks.base.Batch.headers`.

Broker down: aiokafka never fails an idempotent producer's batch on its own (it retries until the broker is back;
batches do not expire), and ``send()`` itself may wait for metadata or for room in a full partition batch. Every
``write()`` is therefore bounded by ``write_timeout_s`` and raises :class:`sinks.base.SinkUnavailable` past it,
while the records already handed over stay queued inside the producer and are delivered when the broker returns.
:attr:`KafkaSink.inflight_bytes` counts exactly those bytes, so the receiver can refuse new work instead of letting
them pile up.

Fatal producer states (a refused batch burns the idempotent producer's sequence numbers; a dead sender task) are
handled by :class:`sinks.kafka_producer.ManagedProducer`: the producer is replaced, writes meanwhile raise
:class:`sinks.base.SinkUnavailable` and :meth:`KafkaSink.ready` is False until the new one passed the probe.

Security (TLS, SASL): ``security`` (:class:`sinks.kafka_security.KafkaSecurity`); credentials or certificates the
cluster refuses make :meth:`KafkaSink.start` fail at once with :class:`sinks.kafka_security.KafkaSecurityError`
instead of retrying, and while running they are named in :attr:`KafkaSink.not_ready_reason`.
"""

from __future__ import annotations

import asyncio
import random

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition

from sinks.base import SPANS_TOPIC, Batch, RecordTooLarge, SinkUnavailable
from sinks.kafka_producer import ManagedProducer
from sinks.kafka_security import KafkaSecurity, KafkaSecurityError, aiokafka_kwargs, diagnose

log = structlog.get_logger(__name__)

CLIENT_ID = "trace-source"


class KafkaSink:
    """:class:`sinks.base.Sink` producing to ``topic`` on the cluster at ``bootstrap_servers``.

    Arguments (sizes in bytes, times as named):

    - ``bootstrap_servers``: ``"host:port[,host:port...]"``.
    - ``compression_type``: ``"zstd"`` (default), ``"gzip"``, ``"lz4"``, ``"snappy"`` or ``None``.
    - ``linger_ms``: how long the producer waits to fill a partition batch; small, since ``write()`` waits for it.
    - ``max_request_size``: largest encoded record accepted; larger ones raise :class:`sinks.base.RecordTooLarge`.
      Keep the topic's ``max.message.bytes`` at least as large (``kafka_admin.create_topic`` does).
    - ``max_batch_size``: bytes per partition batch (records beyond it start a new batch; a single larger record
      gets a batch of its own). Must not exceed ``max_request_size``, because the broker checks whole batches
      against ``max.message.bytes`` and aiokafka, unlike the Java client, does not split a rejected batch.
    - ``request_timeout_ms``: per Kafka request (also how long the broker may wait for in-sync replicas).
    - ``write_timeout_s``: deadline of one ``write()``, including metadata waits inside ``send()``.
    - ``max_inflight_bytes``: once this many bytes wait for acknowledgement, ``write()`` refuses at once.
    - ``retry_after_s``: the ``retry_after_s`` carried by the :class:`sinks.base.SinkUnavailable` raised.
    - ``start_timeout_s``: how long ``start()`` keeps trying to reach the cluster.
    - ``probe_interval_s`` / ``probe_timeout_s``: cadence and per-broker timeout of the readiness probe.
    - ``security``: TLS / SASL settings (``None`` = PLAINTEXT).
    """

    name = "kafka"

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic: str = SPANS_TOPIC,
        compression_type: str | None = "zstd",
        linger_ms: int = 5,
        max_request_size: int = 1048576,
        max_batch_size: int = 262144,
        request_timeout_ms: int = 15000,
        write_timeout_s: float = 5.0,
        max_inflight_bytes: int = 64 * 1024 * 1024,
        retry_after_s: int = 2,
        start_timeout_s: float = 15.0,
        probe_interval_s: float = 2.0,
        probe_timeout_s: float = 1.0,
        security: KafkaSecurity | None = None,
    ) -> None:
        if max_batch_size > max_request_size:
            raise ValueError(f"max_batch_size ({max_batch_size}) must not exceed max_request_size ({max_request_size})")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.compression_type = compression_type
        self.linger_ms = linger_ms
        self.max_request_size = max_request_size
        self.max_batch_size = max_batch_size
        self.request_timeout_ms = request_timeout_ms
        self.write_timeout_s = write_timeout_s
        self.max_inflight_bytes = max_inflight_bytes
        self.retry_after_s = retry_after_s
        self.start_timeout_s = start_timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.security = security
        self._slot = ManagedProducer(self._new_producer, bootstrap_servers=bootstrap_servers, security=security,
                                     close_timeout_s=write_timeout_s, check=self._check)
        self._inflight_bytes = 0
        self._ready = False
        self._not_ready_reason: str | None = "not started"
        self._started = False
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_now = asyncio.Event()

    @property
    def inflight_bytes(self) -> int:
        """Encoded record bytes handed to the producer and not yet acknowledged or failed.

        Includes records of writes that already raised :class:`sinks.base.SinkUnavailable` on their deadline:
        they stay queued in the producer until the broker takes them (the exporter's retry may then duplicate
        them; the assembler drops duplicate spans).
        """
        return self._inflight_bytes

    async def start(self) -> None:
        """Connect, obtain a producer id, and check that ``topic`` exists with a leader for every partition.

        Retries with backoff for up to ``start_timeout_s``, then raises :class:`sinks.base.SinkUnavailable`
        naming the bootstrap servers and the last error. Raises
        :class:`sinks.kafka_security.KafkaSecurityError` at once when the cluster refuses the credentials or the
        certificates (retrying cannot help).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        attempt = 0
        problem: str | None = "no answer from the cluster"
        while True:
            attempt += 1
            producer = None
            try:
                async with asyncio.timeout_at(deadline):
                    producer = await self._slot.open()
                    problem = await self._check(producer)
            except TimeoutError:
                pass  # cut short by the deadline: the previous attempt's problem is the informative one
            except KafkaSecurityError:
                raise
            except (KafkaError, OSError) as exc:
                problem = str(exc) or type(exc).__name__  # aiokafka's str() already names the error class
            if problem is None:
                break
            if producer is not None:
                await self._slot.close(producer)
            remaining = deadline - loop.time()
            log.warning("kafka.start_retry", bootstrap_servers=self.bootstrap_servers, attempt=attempt, error=problem)
            if remaining <= 0:
                raise SinkUnavailable(
                    f"cannot use Kafka at {self.bootstrap_servers} (topic {self.topic}) within "
                    f"{self.start_timeout_s:g} s ({attempt} attempts): {problem}",
                    retry_after_s=self.retry_after_s,
                )
            await asyncio.sleep(min(remaining, 0.25 * 2 ** min(attempt, 3)))
        self._slot.serve(producer)
        self._started = True
        self._ready = True
        self._not_ready_reason = None
        self._probe_task = asyncio.create_task(self._probe_loop(), name="kafka-sink-probe")
        log.info("kafka.started", bootstrap_servers=self.bootstrap_servers, topic=self.topic, attempts=attempt,
                 security=(self.security or KafkaSecurity()).describe())

    async def write(self, batch: Batch) -> None:
        """Produce every record of ``batch`` to ``topic`` and return once all are acknowledged (``acks=all``).

        Raises :class:`sinks.base.RecordTooLarge` before sending anything if a record's encoded size exceeds
        ``max_request_size`` (or later, if the broker rejects a record as too large for the topic). Raises
        :class:`sinks.base.SinkUnavailable` if the sink is not started, ``max_inflight_bytes`` is reached, the
        deadline ``write_timeout_s`` passes, or Kafka reports an error. After ``SinkUnavailable`` some records of
        the batch may still land later.
        """
        if not self._started:
            raise SinkUnavailable(f"Kafka sink for {self.bootstrap_servers} is not started")
        if not batch.records:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.write_timeout_s
        producer = await self._slot.wait_usable(self.write_timeout_s / 2)
        if producer is None:
            self._ready = False
            raise SinkUnavailable(f"Kafka at {self.bootstrap_servers}: {self._slot.problem}",
                                  retry_after_s=self.retry_after_s)
        if self._inflight_bytes >= self.max_inflight_bytes:
            self._probe_now.set()
            raise SinkUnavailable(
                f"{self._inflight_bytes} bytes are still waiting for acknowledgement from Kafka at "
                f"{self.bootstrap_servers} (limit {self.max_inflight_bytes})",
                retry_after_s=self.retry_after_s,
            )
        prepared = []
        for record in batch.records:
            headers = batch.headers(record)
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, headers)
            if size > self.max_request_size:
                raise RecordTooLarge(
                    f"record for key {record.key!r} is {size} bytes encoded, over Kafka max_request_size "
                    f"{self.max_request_size}",
                    key=record.key,
                    size_bytes=size,
                    limit_bytes=self.max_request_size,
                )
            prepared.append((record, headers, size))

        deliveries: list[asyncio.Future] = []
        try:
            # send() can wait for metadata (unknown topic, broker unreachable) or for room in a full partition
            # batch; cancelling it on the deadline withdraws only the record it was adding.
            async with asyncio.timeout_at(deadline):
                for record, headers, size in prepared:
                    delivery = await producer.send(self.topic, value=record.value, key=record.key, headers=headers)
                    self._track(delivery, size)
                    deliveries.append(delivery)
            # asyncio.wait, unlike gather/wait_for, never cancels the delivery futures: a cancelled future would
            # drop out of inflight_bytes while its record still sits in the producer.
            _, pending = await asyncio.wait(deliveries, timeout=max(0.0, deadline - loop.time()))
        except TimeoutError:
            pending = {d for d in deliveries if not d.done()}
            not_sent = len(prepared) - len(deliveries)
        except MessageSizeTooLargeError as exc:  # aiokafka's own size check, which ours above mirrors
            record, _, size = prepared[len(deliveries)]
            raise self._too_large(exc, record.key, size) from exc
        except KafkaError as exc:
            self._probe_now.set()
            self._slot.usable()  # send() raises the dead sender's error: notice it now
            raise SinkUnavailable(
                f"Kafka at {self.bootstrap_servers} refused records for topic {self.topic}: {exc!r}",
                retry_after_s=self.retry_after_s,
            ) from exc
        else:
            not_sent = 0
        if pending or not_sent:
            self._probe_now.set()
            raise SinkUnavailable(
                f"Kafka at {self.bootstrap_servers} did not acknowledge {len(pending) + not_sent} of "
                f"{len(prepared)} records for topic {self.topic} within {self.write_timeout_s:g} s",
                retry_after_s=self.retry_after_s,
            )
        failures = [d.exception() for d in deliveries if d.exception() is not None]
        if failures:
            self._slot.delivery_failed(producer, failures[0])
        for delivery, (record, _, size) in zip(deliveries, prepared, strict=True):
            exc = delivery.exception()
            if isinstance(exc, MessageSizeTooLargeError):
                raise self._too_large(exc, record.key, size) from exc
            if exc is not None:
                self._probe_now.set()
                raise SinkUnavailable(
                    f"Kafka at {self.bootstrap_servers} failed to store records for topic {self.topic}: {exc!r}",
                    retry_after_s=self.retry_after_s,
                ) from exc

    async def ready(self) -> bool:
        """True while a producer is in service and the last readiness probe reached the cluster and found a leader
        for every partition.

        The probe runs every ``probe_interval_s`` and right after a failed write, so this turns False within about
        one probe interval after the cluster becomes unreachable and True again after it returns. Why it is False:
        :attr:`not_ready_reason`.
        """
        return self._started and self._ready and self._slot.usable() is not None

    @property
    def not_ready_reason(self) -> str | None:
        """Why :meth:`ready` is False (the producer being replaced, the probe's finding with the cause of failed
        connections, e.g. a refused password), or ``None``."""
        if self._started and self._slot.usable() is None:
            return self._slot.problem
        return None if self._ready else self._not_ready_reason

    async def stop(self) -> None:
        """Stop probing, give queued records up to ``write_timeout_s`` to be acknowledged, and close the producer.

        Records still unacknowledged after that are abandoned; their writes already failed with
        :class:`sinks.base.SinkUnavailable`, so no exporter was told they were stored.
        """
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None
        self._ready = False
        self._started = False
        await self._slot.stop()
        log.info("kafka.stopped", bootstrap_servers=self.bootstrap_servers, inflight_bytes=self._inflight_bytes)

    def describe(self) -> str:
        return f"kafka {self.bootstrap_servers} (topic {self.topic}, compression {self.compression_type or 'none'})"

    # -- internals -----------------------------------------------------------------------------------------

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=CLIENT_ID,
            enable_idempotence=True,
            compression_type=self.compression_type,
            linger_ms=self.linger_ms,
            max_request_size=self.max_request_size,
            max_batch_size=self.max_batch_size,
            # Below aiokafka's 40 s so a connection to a hung broker is dropped and retried sooner; it does not
            # bound write(), which has its own deadline.
            request_timeout_ms=self.request_timeout_ms,
            **aiokafka_kwargs(self.security),
        )

    async def _check(self, producer: AIOKafkaProducer) -> str | None:
        return await _probe(producer, self.topic, self.probe_timeout_s)

    def _track(self, delivery: asyncio.Future, size: int) -> None:
        self._inflight_bytes += size

        def settled(fut: asyncio.Future) -> None:
            self._inflight_bytes -= size
            if not fut.cancelled():
                fut.exception()  # mark retrieved: a write that timed out never looks at it

        delivery.add_done_callback(settled)

    def _too_large(self, exc: MessageSizeTooLargeError, key: bytes | None, size: int) -> RecordTooLarge:
        return RecordTooLarge(
            f"Kafka at {self.bootstrap_servers} rejected the {size}-byte record for key {key!r} as too large for "
            f"topic {self.topic} (producer limit {self.max_request_size}; check the topic's max.message.bytes): "
            f"{exc}",
            key=key,
            size_bytes=size,
            limit_bytes=self.max_request_size,
        )

    async def _probe_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.probe_interval_s):
                    await self._probe_now.wait()
            except TimeoutError:
                pass
            self._probe_now.clear()
            producer = self._slot.usable()
            if producer is None:
                problem = self._slot.problem
            else:
                problem = await _probe(producer, self.topic, self.probe_timeout_s)
                if problem is not None and problem.startswith("no broker answered"):
                    # aiokafka logs why it cannot connect but reports only "not ready": name the cause
                    found = await diagnose(self.bootstrap_servers, self.security, timeout_s=self.probe_timeout_s * 3)
                    if found is not None:
                        problem = f"{problem}: {found}"
            if (problem is None) != self._ready or problem != self._not_ready_reason:
                if problem is None:
                    log.info("kafka.ready", bootstrap_servers=self.bootstrap_servers, topic=self.topic)
                else:
                    log.warning("kafka.not_ready", bootstrap_servers=self.bootstrap_servers, reason=problem)
            self._ready = problem is None
            self._not_ready_reason = problem


async def _probe(producer: AIOKafkaProducer, topic: str, timeout_s: float) -> str | None:
    """Ask the known brokers, in random order, for ``topic``'s metadata; ``None`` if healthy, else the problem.

    Each broker gets ``timeout_s``; the first answer decides. Healthy means the topic exists and every partition
    has a leader.
    """
    client = producer.client
    node_ids = [broker.nodeId for broker in client.cluster.brokers()]
    random.shuffle(node_ids)
    errors = []
    for node_id in node_ids:
        try:
            async with asyncio.timeout(timeout_s):
                response = await client.send(node_id, MetadataRequest([topic], allow_auto_topic_creation=False))
        except (KafkaError, OSError, TimeoutError) as exc:
            errors.append(f"broker {node_id}: {type(exc).__name__}")
            continue
        metadata = ClusterMetadata()
        metadata.update_metadata(response)
        partitions = metadata.partitions_for_topic(topic)
        if not partitions:
            return f"topic {topic} does not exist"
        leaderless = sorted(
            p for p in partitions if metadata.leader_for_partition(TopicPartition(topic, p)) in (None, -1)
        )
        if leaderless:
            return f"partitions {leaderless} of topic {topic} have no leader"
        return None
    return "no broker answered (" + ", ".join(errors or ["no brokers known"]) + ")"
