"""Wiring of the assembler for its two shapes: ``trace-source worker assemble`` and the embedded ``serve``.

* :func:`build_local_assembler` — over the embedded log in ``state_dir``; envelopes to ``<state_dir>/traces/``,
  dead letters to ``<state_dir>/dlq/``; restarts recognize emitted traces through the traces directory.
* :func:`run_kafka_worker` / :func:`run_worker` — a consumer-group member on Kafka, envelopes to the traces topic,
  claim checks into ``artifact_dir``; serves ``/metrics``, ``/healthz``, ``/readyz`` on ``metrics_port`` and logs
  one ``assembler.serving`` line with the bound port.
* :class:`EmbeddedAssembler` — the in-process task ``serve`` starts and stops.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack

import structlog
from prometheus_client import CollectorRegistry

from normalizers.redact import Redactor
from pipeline.assembler import Assembler, TracesDirLookup
from pipeline.gc_policy import ASSEMBLER_YOUNG_THRESHOLD, BetweenChunks, freeze_startup
from pipeline.health import start_health_server
from pipeline.local_bus import LocalBusPublisher, LocalLogConsumer
from pipeline.metrics import AssemblerMetrics
from pipeline.outputs import EnvelopeOutput
from pipeline.settings import AssemblerSettings

log = structlog.get_logger("trace_source.assembler")


def _redactor(settings: AssemblerSettings) -> Redactor | None:
    return Redactor() if settings.redaction else None


def build_local_assembler(settings: AssemblerSettings, metrics: AssemblerMetrics | None = None,
                          **kwargs) -> Assembler:
    """Assembler over the embedded log (``<state_dir>/spans.db``) writing files under ``state_dir``.
    ``kwargs`` go to :class:`pipeline.assembler.Assembler` (``clock``, ``wall_ns``)."""
    # Envelopes go to the log (the grade stage consumes them) and to the file view <state_dir>/traces/.
    publisher = LocalBusPublisher(settings.state_dir, file_topics=(settings.traces_topic, settings.dlq_topic))
    output = EnvelopeOutput(publisher, topic=settings.traces_topic, dlq_topic=settings.dlq_topic,
                            artifact_root=settings.artifact_root)
    consumer = LocalLogConsumer(settings.state_dir, topic=settings.input_topic, group_id=settings.group_id)
    lookup = TracesDirLookup(publisher.path_for(settings.traces_topic, b"x").parent)
    return Assembler(consumer, output, settings, metrics=metrics, lookup=lookup, redactor=_redactor(settings),
                     **kwargs)


class EmbeddedAssembler:
    """The assembler as a background task of the embedded ``serve`` (call :meth:`start` after the local log sink
    started, :meth:`stop` on shutdown). ``registry``: the receiver's metrics registry, so ``serve``'s ``/metrics``
    shows the assembler too."""

    def __init__(self, settings: AssemblerSettings, registry: CollectorRegistry | None = None,
                 restart_delay_s: float = 1.0) -> None:
        self.settings = settings
        self.metrics = AssemblerMetrics(registry)
        self.assembler = build_local_assembler(settings, self.metrics)
        self.restart_delay_s = restart_delay_s
        self._started_once = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedded-assembler")
        started = asyncio.create_task(self.assembler.started.wait())
        await asyncio.wait({self._task, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._task.done():
            self._task.result()  # raise the start-up error

    async def _run(self) -> None:
        # serve must keep receiving whatever happens here: an unexpected failure (e.g. the log locked for longer
        # than SQLite's busy timeout) restarts the assembler, which replays from its committed offset.
        while True:
            try:
                await self.assembler.run(self._stop)
                return
            except Exception:
                if self.assembler.started.is_set():
                    self._started_once = True
                if not self._started_once:
                    raise  # the first start failed: serve reports it
                log.exception("assembler.failed_restarting", restart_delay_s=self.restart_delay_s)
            try:
                await asyncio.wait_for(self._stop.wait(), self.restart_delay_s)
                return
            except TimeoutError:
                await self.assembler.output.publisher.stop()
                self.assembler = build_local_assembler(self.settings, self.metrics)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop polling, commit the watermark. Open traces stay in the log and are assembled on the next start."""
        self._stop.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            log.warning("assembler.stop_timeout", timeout_s=timeout_s)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.assembler.output.publisher.stop()


async def ensure_output_topics(settings: AssemblerSettings) -> None:
    """Create the traces and DLQ topics if missing, with as many partitions as the input topic (unless
    ``topic_partitions``) and ``max.message.bytes`` above ``max_message_bytes``; and the compacted traces index with
    exactly as many partitions as the input topic (its layout is partition for partition). Raises ``KafkaError``."""
    from sinks.kafka_admin import create_topic, partition_count

    security = settings.kafka_security()
    partitions = settings.topic_partitions
    if partitions is None:
        partitions = await partition_count(settings.kafka_bootstrap_servers, settings.input_topic, default=12,
                                           security=security)
    for topic in (settings.traces_topic, settings.dlq_topic):
        await create_topic(settings.kafka_bootstrap_servers, topic, partitions, settings.replication_factor,
                           max_request_size=settings.max_message_bytes + 64 * 1024, security=security)
    if settings.traces_index_topic:
        from pipeline.closed_index import INDEX_TOPIC_CONFIG

        inputs = await partition_count(settings.kafka_bootstrap_servers, settings.input_topic, default=partitions,
                                       security=security)
        await create_topic(settings.kafka_bootstrap_servers, settings.traces_index_topic, inputs,
                           settings.replication_factor, dict(INDEX_TOPIC_CONFIG), security=security)


async def run_worker(settings: AssemblerSettings, stop: asyncio.Event | None = None) -> None:
    """``trace-source worker assemble``: Kafka when bootstrap servers are set, else the embedded log (then only
    one assembler may run per state dir, and ``serve`` should run with ``in_process`` off). Runs until ``stop`` or
    SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = AssemblerMetrics()
    async with AsyncExitStack() as stack:
        if settings.kafka_bootstrap_servers:
            from pipeline.kafka_bus import KafkaConsumerBus, KafkaPublisher

            security = settings.kafka_security()
            publisher = KafkaPublisher(
                settings.kafka_bootstrap_servers, max_message_bytes=settings.max_message_bytes,
                compression_type=None if settings.compression == "none" else settings.compression,
                security=security)
            await publisher.start()
            stack.push_async_callback(publisher.stop)
            if settings.create_topics:
                await ensure_output_topics(settings)
            output = EnvelopeOutput(publisher, topic=settings.traces_topic, dlq_topic=settings.dlq_topic,
                                    artifact_root=settings.artifact_root)
            consumer = KafkaConsumerBus(settings.kafka_bootstrap_servers, topic=settings.input_topic,
                                        group_id=settings.group_id, client_id="trace-source-assembler",
                                        group_instance_id=settings.group_instance_id, security=security)
            lookup = None
            if settings.traces_index_topic:
                from pipeline.closed_index import KafkaClosedTraces

                lookup = KafkaClosedTraces(
                    settings.kafka_bootstrap_servers, index_topic=settings.traces_index_topic,
                    traces_topic=settings.traces_topic, input_topic=settings.input_topic, publisher=publisher,
                    artifact_root=settings.artifact_root, max_entries=settings.closed_traces_remembered,
                    security=security)
                await lookup.start()
                stack.push_async_callback(lookup.stop)
            assembler = Assembler(consumer, output, settings, metrics=metrics, redactor=_redactor(settings),
                                  lookup=lookup, collector=BetweenChunks())
        else:
            assembler = build_local_assembler(settings, metrics, collector=BetweenChunks())
            stack.push_async_callback(assembler.output.publisher.stop)
        output_ready = getattr(assembler.output.publisher, "ready", lambda: True)
        runner, port = await start_health_server(metrics.registry,
                                                 lambda: assembler.started.is_set() and output_ready(),
                                                 settings.metrics_host, settings.metrics_port)
        stack.push_async_callback(runner.cleanup)
        log.info("assembler.serving", metrics_port=port, input_topic=settings.input_topic,
                 traces_topic=settings.traces_topic, group_id=settings.group_id,
                 kafka=settings.kafka_bootstrap_servers, state_dir=str(settings.state_dir))
        freeze_startup(ASSEMBLER_YOUNG_THRESHOLD)
        await assembler.run(stop)
