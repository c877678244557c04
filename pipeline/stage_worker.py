"""Wiring of the loop's stages for their two shapes (the stages themselves know neither):

* :func:`run_stage_worker` — ``trace-source worker <stage>``: one consumer-group member on Kafka (ledger and journal
  in Postgres), or on the embedded log (SQLite ledger, ``runs.jsonl``) when no broker is configured; serves
  ``/metrics``, ``/healthz``, ``/readyz`` on ``--metrics-port`` and logs one ``stage.serving`` line with the port.
* :class:`EmbeddedLoop` — inside the embedded ``serve``: every stage the execution policy enables, in-process, on
  the local log, sharing one ledger, journal and publisher.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry

from pipeline.artifacts import ArtifactStore
from pipeline.bus import BusConsumer, BusPublisher
from pipeline.gc_policy import STAGE_YOUNG_THRESHOLD, freeze_startup
from pipeline.health import start_health_server
from pipeline.journal import Journal, open_journal
from pipeline.ledger import Ledger, open_ledger
from pipeline.loop_settings import LoopSettings
from pipeline.outputs import DeadLetters
from pipeline.policy import allows
from pipeline.runner import StageMetrics, StageRunner
from pipeline.stage import Stage
from pipeline.stages import ORDER, STAGES, build_stage

log = structlog.get_logger("trace_source.stages")


class SettingsError(ValueError):
    """A combination of settings that cannot work, with what to change."""


@dataclass
class Stores:
    """The ledger, journal and publisher a process's runners share (started, closed by :meth:`close`)."""

    ledger: Ledger
    journal: Journal
    publisher: BusPublisher

    async def close(self) -> None:
        await self.publisher.stop()
        await self.journal.close()
        await self.ledger.close()


async def open_stores(settings: LoopSettings) -> Stores:
    """Start the ledger and journal (Postgres when the database URL is set, else under the state dir) and the
    publisher (Kafka or the embedded log). Raises :class:`SettingsError`, ``LedgerError``, ``JournalError``,
    ``KafkaError`` or ``FileNotFoundError`` (no embedded log)."""
    url = settings.database_url()
    if settings.kafka_bootstrap_servers and not url:
        raise SettingsError(
            f"with Kafka the ledger and journal must be shared by every worker: set {settings.database_url_env} "
            "to a postgresql:// URL (or --database-url-env to the variable that holds it)")
    if settings.kafka_bootstrap_servers:
        from pipeline.kafka_bus import KafkaPublisher

        publisher: BusPublisher = KafkaPublisher(
            settings.kafka_bootstrap_servers, max_message_bytes=settings.max_message_bytes,
            compression_type=None if settings.compression == "none" else settings.compression,
            security=settings.kafka_security())
    else:
        from pipeline.local_bus import LocalBusPublisher

        publisher = LocalBusPublisher(settings.state_dir, file_topics=(settings.dlq_topic,))
    ledger = open_ledger(url, settings.state_dir)
    journal = open_journal(url, settings.state_dir)
    async with AsyncExitStack() as stack:
        await ledger.start()
        stack.push_async_callback(ledger.close)
        await journal.start()
        stack.push_async_callback(journal.close)
        await publisher.start()
        stack.pop_all()
    return Stores(ledger, journal, publisher)


def stage_consumer(settings: LoopSettings, stage: Stage) -> BusConsumer:
    """The stage's consumer: a Kafka group member, or the embedded log's topic."""
    if settings.kafka_bootstrap_servers:
        from pipeline.kafka_bus import KafkaConsumerBus

        return KafkaConsumerBus(settings.kafka_bootstrap_servers, topic=stage.input_topic,
                                group_id=settings.consumer_group or stage.group_id,
                                client_id=f"trace-source-{stage.name}",
                                max_poll_interval_ms=int(settings.max_poll_interval_s * 1000),
                                group_instance_id=settings.group_instance_id,
                                security=settings.kafka_security())
    from pipeline.local_bus import LocalLogConsumer

    return LocalLogConsumer(settings.state_dir, topic=stage.input_topic,
                            group_id=settings.consumer_group or stage.group_id)


def build_runner(settings: LoopSettings, stage: Stage, stores: Stores, metrics: StageMetrics) -> StageRunner:
    dead_letters = DeadLetters(stores.publisher, dlq_topic=settings.dlq_topic, artifact_root=settings.envelope_root)
    return StageRunner(stage, stage_consumer(settings, stage), stores.publisher, dead_letters, stores.ledger,
                       stores.journal, policy=settings.execution_policy, lease_s=settings.lease_s,
                       max_attempts=settings.max_attempts, poll_max_records=settings.poll_max_records,
                       shutdown_grace_s=settings.shutdown_grace_s, concurrency=settings.concurrency,
                       metrics=metrics)


async def ensure_stage_topics(settings: LoopSettings, stage: Stage) -> None:
    """Create the stage's output topic and the DLQ if missing, with as many partitions as its input topic (unless
    ``topic_partitions``). Raises ``KafkaError``."""
    from sinks.kafka_admin import create_topic, partition_count

    security = settings.kafka_security()
    partitions = settings.topic_partitions
    if partitions is None:
        partitions = await partition_count(settings.kafka_bootstrap_servers, stage.input_topic, default=12,
                                           security=security)
    for topic in (stage.input_topic, stage.output_topic, settings.dlq_topic):
        await create_topic(settings.kafka_bootstrap_servers, topic, partitions, settings.replication_factor,
                           max_request_size=settings.max_message_bytes + 64 * 1024, security=security)


async def run_stage_worker(name: str, settings: LoopSettings, stop: asyncio.Event | None = None) -> None:
    """``trace-source worker <name>`` until ``stop`` or SIGTERM/SIGINT. Raises ``KeyError`` for an unknown stage,
    :class:`SettingsError` when the policy never reaches it, and the start-up errors of :func:`open_stores`."""
    stop = stop or asyncio.Event()
    artifacts = ArtifactStore(settings.artifact_root)
    stage = build_stage(name, settings, artifacts)
    if not stage.entry and not allows(settings.execution_policy, stage.phase):
        raise SettingsError(f"execution policy {settings.execution_policy} never reaches the {stage.phase} phase: "
                            f"run `worker {name}` with --execution-policy that includes it")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = StageMetrics()
    if settings.kafka_bootstrap_servers and settings.create_topics:
        await ensure_stage_topics(settings, stage)
    stores = await open_stores(settings)
    try:
        runner = build_runner(settings, stage, stores, metrics)
        output_ready = getattr(stores.publisher, "ready", lambda: True)
        health, port = await start_health_server(metrics.registry, lambda: runner.started.is_set() and
                                                 not stop.is_set() and output_ready(), settings.metrics_host,
                                                 settings.metrics_port)
        try:
            log.info("stage.serving", stage=name, metrics_port=port, input_topic=stage.input_topic,
                     output_topic=stage.output_topic, group_id=stage.group_id, policy=settings.execution_policy,
                     kafka=settings.kafka_bootstrap_servers, state_dir=str(settings.state_dir))
            freeze_startup(STAGE_YOUNG_THRESHOLD)  # see pipeline.gc_policy
            await runner.run(stop)
        finally:
            await health.cleanup()
    finally:
        await stores.close()
        await artifacts.close()


class EmbeddedLoop:
    """The stages inside the embedded ``serve``: the grade stage always (it journals every import), then each stage
    of :data:`pipeline.stages.ORDER` that is implemented and that the execution policy reaches. Call :meth:`start`
    after the local log exists, :meth:`stop` on shutdown. ``registry``: ``serve``'s metrics registry."""

    def __init__(self, settings: LoopSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = StageMetrics(registry)
        self.names = [n for n in ORDER if n in STAGES and (n == "grade" or allows(settings.execution_policy, n))]
        self.runners: list[StageRunner] = []
        self._stores: Stores | None = None
        self._artifacts: ArtifactStore | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._stores = await open_stores(self.settings)
        self._artifacts = artifacts = ArtifactStore(self.settings.artifact_root)
        for name in self.names:
            stage = build_stage(name, self.settings, artifacts)
            runner = build_runner(self.settings, stage, self._stores, self.metrics)
            self.runners.append(runner)
            self._tasks.append(asyncio.create_task(self._supervise(runner), name=f"stage-{name}"))
        log.info("stages.started", stages=self.names, policy=self.settings.execution_policy)

    async def _supervise(self, runner: StageRunner) -> None:
        # serve keeps receiving whatever happens to a stage: an unexpected failure restarts it (from the committed
        # offset; the ledger makes the replay harmless).
        while not self._stop.is_set():
            try:
                await runner.run(self._stop)
                return
            except Exception:
                log.exception("stage.failed_restarting", stage=runner.stage.name)
            try:
                await asyncio.wait_for(self._stop.wait(), 1.0)
            except TimeoutError:
                pass

    def ready(self) -> bool:
        return all(r.started.is_set() for r in self.runners)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stores is not None:
            await self._stores.close()
        if self._artifacts is not None:
            await self._artifacts.close()
