"""``trace-source serve``: wire settings to a sink and the two OTLP servers, run until SIGTERM/SIGINT.

Shutdown order (graceful): mark not-ready, stop accepting new connections, let in-flight requests finish within
``shutdown_grace_s`` (each answers only after its data is durable), then stop the sink, which flushes.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from receiver.auth import Authenticator
from receiver.backpressure import InflightBudget
from receiver.connections import ConnectionLimiter
from receiver.envelopes import EnvelopeUpload
from receiver.export import ExportService
from receiver.grpc_server import GrpcReceiver
from receiver.http_server import HttpReceiver
from receiver.metrics import ReceiverMetrics
from sinks.base import Sink
from trace_source.settings import ServeSettings

log = structlog.get_logger("trace_source.serve")


def kafka_request_size(settings: ServeSettings) -> int:
    """Producer ``max_request_size`` and topic ``max.message.bytes`` (bytes): the largest record plus room for its
    key, headers and batch overhead, never below Kafka's 1 MiB default."""
    return max(settings.max_record_bytes + 64 * 1024, 1048576)


def build_sink(settings: ServeSettings) -> Sink:
    """Kafka when bootstrap servers are configured, else the embedded durable log under ``state_dir``."""
    if settings.kafka_bootstrap_servers:
        from sinks.kafka import KafkaSink

        return KafkaSink(
            settings.kafka_bootstrap_servers,
            topic=settings.kafka_topic,
            compression_type=None if settings.kafka_compression == "none" else settings.kafka_compression,
            linger_ms=settings.kafka_linger_ms,
            max_request_size=kafka_request_size(settings),
            write_timeout_s=settings.sink_timeout_s,
            retry_after_s=settings.retry_after_s,
            security=settings.kafka_security(),
        )
    from sinks.local_log import LocalLogSink

    return LocalLogSink(settings.state_dir, fsync=settings.local_log_fsync)


def build_envelope_sink(settings: ServeSettings):
    """Where ``POST /v1/envelopes`` puts envelopes: the traces topic on Kafka, or the embedded log (and its file
    view) under ``state_dir``."""
    from sinks.envelopes import open_envelope_sink

    return open_envelope_sink(state_dir=settings.state_dir, kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
                              max_request_size=kafka_request_size(settings),
                              security=settings.kafka_security() if settings.kafka_bootstrap_servers else None)


async def _start_embedded_assembler(settings: ServeSettings, metrics: ReceiverMetrics):
    """Embedded default (no broker): run the assembler in-process over the local log, unless
    ``TRACE_SOURCE_ASSEMBLER_IN_PROCESS=false``. Its metrics join the receiver's ``/metrics``."""
    if settings.kafka_bootstrap_servers:
        return None
    from pipeline.settings import AssemblerSettings
    from pipeline.worker import EmbeddedAssembler

    from sinks.base import SPANS_TOPIC

    # The local log is always written under SPANS_TOPIC (build_sink), whatever TRACE_SOURCE_KAFKA_TOPIC says.
    assembler_settings = AssemblerSettings(state_dir=settings.state_dir, input_topic=SPANS_TOPIC)
    if not assembler_settings.in_process:
        return None
    assembler = EmbeddedAssembler(assembler_settings, metrics.registry)
    await assembler.start()
    return assembler


async def _start_embedded_loop(settings: ServeSettings, loop_settings, metrics: ReceiverMetrics, http_port: int):
    """Embedded default: the loop's stages in-process after the assembler (``EmbeddedLoop``), unless
    ``--no-in-process-stages`` (then ``trace-source worker <stage>`` processes do the work). The harness of a
    reproduction exports its traces back to this serve, unless ``--otlp-endpoint`` names another receiver."""
    if settings.kafka_bootstrap_servers or loop_settings is None or not loop_settings.in_process_stages:
        return None
    from pipeline.stage_worker import EmbeddedLoop

    if not loop_settings.otlp_endpoint:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        # With TLS the harness must also trust the certificate: OTEL_EXPORTER_OTLP_CERTIFICATE via --pass-env.
        scheme = "https" if settings.tls_cert_file is not None else "http"
        loop_settings = loop_settings.model_copy(update={"otlp_endpoint": f"{scheme}://{host}:{http_port}"})
    loop = EmbeddedLoop(loop_settings, metrics.registry)
    await loop.start()
    return loop


async def run(settings: ServeSettings, stop: asyncio.Event | None = None, *, loop_settings=None,
              worker: int | None = None, on_ready=None, on_serving=None) -> None:
    """Serve until ``stop`` is set or the process gets SIGTERM/SIGINT. ``loop_settings``: a
    :class:`pipeline.loop_settings.LoopSettings` for the embedded default's in-process stages (``None``: the
    receiver and assembler only). ``worker``: this process's index under ``serve --workers``
    (:mod:`trace_source.workers`): both ports are bound with ``SO_REUSEPORT``, the ready line is ``worker
    serving``, and ``on_ready()`` is called once serving. ``on_serving(http_port, grpc_port)``: called once
    serving, with the bound ports (``autoloop`` records them)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    sink = build_sink(settings)
    if settings.kafka_bootstrap_servers and settings.kafka_create_topics:
        from sinks.kafka_admin import create_topic

        created = await create_topic(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                     settings.kafka_partitions, settings.kafka_replication_factor,
                                     max_request_size=kafka_request_size(settings),
                                     security=settings.kafka_security())
        log.info("topic checked", topic=settings.kafka_topic, created=created)
    await sink.start()

    budget = InflightBudget(settings.max_inflight_bytes, external=lambda: getattr(sink, "inflight_bytes", 0))
    metrics = ReceiverMetrics(inflight_bytes_fn=lambda: budget.used_bytes)
    assembler = await _start_embedded_assembler(settings, metrics)
    service = ExportService(sink, budget, metrics, max_record_bytes=settings.max_record_bytes,
                            retry_after_s=settings.retry_after_s)
    auth = Authenticator(settings.token_map(), settings.source_id)

    tls = None
    if settings.tls_cert_file is not None:
        from receiver.tls import ServerTls

        tls = ServerTls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file,
                        min_version=settings.tls_min_version, reload_interval_s=settings.tls_reload_interval_s)

    envelope_sink = build_envelope_sink(settings)
    await envelope_sink.start()
    http = HttpReceiver(service, auth, metrics, max_body_bytes=settings.max_body_bytes,
                        cors_allowed_origins=settings.cors_allowed_origins, read_timeout_s=settings.read_timeout_s,
                        envelopes=EnvelopeUpload(envelope_sink, auth, max_body_bytes=settings.max_body_bytes))
    # keepalive_timeout: aiohttp's one timer for idle keep-alive connections and for a request's headers to arrive.
    # lingering_time: after an early answer (408, 413) aiohttp keeps reading the unread body so the client sees the
    # answer rather than a reset; 2 s instead of its 10 s, so a slow client cannot hold the connection that long.
    runner = web.AppRunner(http.app(), auto_decompress=False, access_log=None,
                           shutdown_timeout=settings.shutdown_grace_s, keepalive_timeout=settings.idle_timeout_s,
                           lingering_time=2.0)
    await runner.setup()
    # Our own listener instead of a TCPSite, so the connection limit sits in front of aiohttp's protocol factory.
    # Under --workers every worker binds the same ports (SO_REUSEPORT; see trace_source.workers).
    listener = await loop.create_server(
        ConnectionLimiter(runner.server, settings.max_connections, metrics), settings.host, settings.port,
        ssl=tls.http_context() if tls else None, reuse_address=True, reuse_port=worker is not None, backlog=1024)
    http_port = listener.sockets[0].getsockname()[1]  # the real port when --port 0
    ops_runner = ops_port = None
    if settings.ops_port is not None:
        ops_runner = web.AppRunner(http.ops_app(), access_log=None)
        await ops_runner.setup()
        ops_site = web.TCPSite(ops_runner, settings.host, settings.ops_port, reuse_address=True,
                               reuse_port=worker is not None)
        await ops_site.start()
        ops_port = ops_site._server.sockets[0].getsockname()[1]

    grpc_server = None
    grpc_port = None
    if settings.grpc_enabled:
        grpc_server, grpc_port = GrpcReceiver(service, auth, metrics, max_message_bytes=settings.max_body_bytes,
                                              idle_timeout_s=settings.idle_timeout_s,
                                              max_connections=settings.max_connections).build(
            settings.host, settings.grpc_port, tls.grpc_credentials() if tls else None)
        await grpc_server.start()
    watcher = asyncio.create_task(tls.watch(), name="tls-reload") if tls else None

    try:
        stages = await _start_embedded_loop(settings, loop_settings, metrics, http_port)
    except BaseException:
        listener.close()
        if watcher is not None:
            watcher.cancel()
        if ops_runner is not None:
            await ops_runner.cleanup()
        await asyncio.gather(runner.cleanup(), *([grpc_server.stop(0)] if grpc_server is not None else []))
        if assembler is not None:
            await assembler.stop()
        await envelope_sink.stop()
        await sink.stop()
        raise

    refresh = asyncio.create_task(metrics.refresh_forever()) if metrics.multiprocess else None
    # One machine-readable line tests and scripts wait for; humans read the same fields. Under --workers the
    # supervisor writes it once every worker is up.
    scheme = "https" if tls else "http"
    log.info("serving" if worker is None else "worker serving", worker=worker,
             http=f"{scheme}://{settings.host}:{http_port}",
             grpc=f"{settings.host}:{grpc_port}" if grpc_port else None,
             sink=sink.describe(), auth=auth.enabled, http_port=http_port, grpc_port=grpc_port, ops_port=ops_port,
             tls=tls is not None, mtls=bool(tls and tls.mtls),
             stages=stages.names if stages is not None else [],
             policy=loop_settings.execution_policy if loop_settings is not None else None)
    if on_ready is not None:
        on_ready()
    if on_serving is not None:
        on_serving(http_port, grpc_port)
    try:
        await stop.wait()
    finally:
        if refresh is not None:
            refresh.cancel()
        if watcher is not None:
            watcher.cancel()
        log.info("shutting down", grace_s=settings.shutdown_grace_s, worker=worker)
        http.shutting_down = True
        listener.close()  # stop accepting; runner.cleanup() then drains the open connections
        # Both servers stop accepting at once and drain their in-flight requests concurrently.
        await asyncio.gather(runner.cleanup(), *(
            [grpc_server.stop(settings.shutdown_grace_s)] if grpc_server is not None else []))
        if ops_runner is not None:
            await ops_runner.cleanup()  # last: probes see /readyz 503 while the others drain
        if stages is not None:
            await stages.stop()
        if assembler is not None:
            await assembler.stop()
        await envelope_sink.stop()
        await sink.stop()
        log.info("stopped")
