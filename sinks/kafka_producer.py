"""An idempotent aiokafka producer that is replaced when it can no longer deliver.

aiokafka's idempotent producer has states it never leaves on its own:

* **A failed batch burns its sequence numbers.** aiokafka assigns a partition's sequence numbers when it drains a
  batch; when the broker then refuses that batch for good (``MESSAGE_TOO_LARGE`` for a topic whose
  ``max.message.bytes`` is below the batch, an authorization error, ``OUT_OF_ORDER_SEQUENCE_NUMBER``,
  ``UNKNOWN_PRODUCER_ID``, a fenced epoch …), the numbers are not given back, so every later batch for that partition
  carries a sequence the broker does not expect and fails with ``OutOfOrderSequenceNumber`` — forever. (The Java
  client bumps its epoch in that case; aiokafka 0.14 does not.)
* **A dead sender task.** An unexpected error in the background sender fails what was queued and leaves a producer
  whose ``send()`` raises that error from then on.

:class:`ManagedProducer` watches for both: any failed delivery future (idempotent batches never expire, so a failure
is always a broker refusal or a dead sender) and the sender task's state. It then takes the producer out of service
(writes are refused with a retryable error, readiness turns false), lets it flush what it can within
``close_timeout_s``, fails whatever is left (so no caller waits on a delivery that can never come, and nothing is
reported stored that was not acknowledged), and starts a new producer — a new producer id with fresh sequences —
retrying with backoff until it is up.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from sinks.kafka_security import KafkaSecurity, KafkaSecurityError, start_or_explain

log = structlog.get_logger(__name__)

_RETRY_START_S = 0.25
_RETRY_MAX_S = 5.0


class ProducerReplaced(KafkaError):
    """Failed onto deliveries still queued in a producer that was taken out of service."""


def sender_failure(producer: AIOKafkaProducer) -> str | None:
    """Why ``producer``'s background sender stopped, or ``None`` while it runs (or before ``start``)."""
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is None or not task.done():
        return None
    if task.cancelled():
        return "the producer's sender task was cancelled"
    return f"the producer's sender task died: {task.exception()!r}"


class ManagedProducer:
    """Holds the current producer of one component.

    ``new_producer``: builds an unstarted ``AIOKafkaProducer`` (idempotent, with security arguments applied).
    ``check``: optional async health check of a freshly started producer, ``None`` when healthy, else the problem;
    a replacement is only put in service once it passes. ``close_timeout_s``: how long a retired producer may flush.
    """

    def __init__(self, new_producer: Callable[[], AIOKafkaProducer], *, bootstrap_servers: str,
                 security: KafkaSecurity | None, close_timeout_s: float,
                 check: Callable[[AIOKafkaProducer], Awaitable[str | None]] | None = None) -> None:
        self._new = new_producer
        self.bootstrap_servers = bootstrap_servers
        self.security = security
        self.close_timeout_s = close_timeout_s
        self._check = check
        self.producer: AIOKafkaProducer | None = None
        #: Why there is no producer in service right now (``None`` when there is one).
        self.problem: str | None = "not started"
        #: Producers replaced since start (a metric and a test hook).
        self.replacements = 0
        self._replacing: asyncio.Task[None] | None = None
        self._stopping = False
        self._served = asyncio.Event()

    async def open(self) -> AIOKafkaProducer:
        """Build and start one producer (not yet in service). Raises ``KafkaError`` / ``OSError``
        (:class:`sinks.kafka_security.KafkaSecurityError` for credentials or certificates the cluster refuses)."""
        producer = self._new()
        try:
            await start_or_explain(producer.start, self.bootstrap_servers, self.security)
        except BaseException:
            await self.close(producer)
            raise
        return producer

    def serve(self, producer: AIOKafkaProducer) -> None:
        """Put a started producer in service."""
        self.producer = producer
        self.problem = None
        self._served.set()

    async def wait_usable(self, timeout_s: float) -> AIOKafkaProducer | None:
        """:meth:`usable`, waiting up to ``timeout_s`` for a replacement in progress (usually well under a second),
        so a write that arrives meanwhile need not be refused."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            producer = self.usable()
            if producer is not None or self._replacing is None or self._replacing.done():
                return producer
            try:
                async with asyncio.timeout_at(deadline):
                    await self._served.wait()
            except TimeoutError:
                return self.usable()

    def usable(self) -> AIOKafkaProducer | None:
        """The producer in service if it can deliver; ``None`` (see :attr:`problem`) while one is being replaced.
        Notices a dead sender task here and starts the replacement."""
        producer = self.producer
        if producer is None:
            return None
        died = sender_failure(producer)
        if died is not None:
            self.retire(producer, died)
            return None
        return producer

    def delivery_failed(self, producer: AIOKafkaProducer, exc: BaseException) -> None:
        """A delivery of ``producer`` failed with ``exc``: its partition's sequence numbers are burnt, replace it."""
        self.retire(producer, sender_failure(producer) or f"a batch was refused ({exc!r}), which leaves a gap in "
                                                          f"the idempotent producer's sequence numbers")

    def retire(self, producer: AIOKafkaProducer, reason: str) -> None:
        """Take ``producer`` out of service (if it still is) and start replacing it in the background."""
        if producer is not self.producer or self._stopping:
            return
        self.producer = None
        self._served.clear()
        self.problem = f"replacing the Kafka producer: {reason}"
        log.warning("kafka.producer_retired", bootstrap_servers=self.bootstrap_servers, reason=reason)
        self._replacing = asyncio.create_task(self._replace(producer, reason), name="kafka-producer-replace")

    async def _replace(self, old: AIOKafkaProducer, reason: str) -> None:
        await self.close(old)
        delay = _RETRY_START_S
        while not self._stopping:
            try:
                new = await self.open()
            except KafkaSecurityError as exc:  # e.g. the password was rotated on the broker: say so, keep trying
                self.problem = f"replacing the Kafka producer: {exc}"
            except (KafkaError, OSError) as exc:
                self.problem = f"replacing the Kafka producer ({reason}): {exc!r}"
            else:
                problem = await self._check(new) if self._check is not None else None
                if problem is None:
                    self.serve(new)
                    self.replacements += 1
                    log.info("kafka.producer_replaced", bootstrap_servers=self.bootstrap_servers,
                             replacements=self.replacements)
                    return
                self.problem = f"replacing the Kafka producer: {problem}"
                await self.close(new)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def close(self, producer: AIOKafkaProducer) -> None:
        """Flush ``producer`` for up to ``close_timeout_s`` and close it; deliveries still pending then fail with
        :class:`ProducerReplaced` (idempotent batches never expire, so without this they would wait forever)."""
        try:
            async with asyncio.timeout(self.close_timeout_s):
                await producer.stop()
        except TimeoutError:
            log.warning("kafka.producer_close_abandons_records", bootstrap_servers=self.bootstrap_servers)
            await producer.client.close()
        except (KafkaError, OSError) as exc:
            log.warning("kafka.producer_close_failed", bootstrap_servers=self.bootstrap_servers, error=repr(exc))
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None:
            accumulator.fail_all(ProducerReplaced("the Kafka producer was closed before the broker acknowledged "
                                                  "this record"))

    async def stop(self) -> None:
        """Stop replacing, close the producer in service."""
        self._stopping = True
        if self._replacing is not None:
            self._replacing.cancel()
            await asyncio.gather(self._replacing, return_exceptions=True)
        producer, self.producer = self.producer, None
        self.problem = "stopped"
        if producer is not None:
            await self.close(producer)
