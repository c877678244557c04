"""Acceptance: no span is lost while the Kafka broker is down, using only the OpenTelemetry Python SDK's own retry.

A dedicated broker is stopped under a running ``trace-source serve``; the SDK's OTLP exporter (HTTP or gRPC) exports
a batch in a background thread and gets 503 + ``Retry-After`` / UNAVAILABLE + ``RetryInfo`` while ``/readyz`` says
503; the broker comes back; the same ``export()`` call returns SUCCESS and every span is on the topic. Duplicates
are allowed (a write that timed out may still land, then the retry writes it again — OTLP is at-least-once), missing
spans are not.

How the installed exporters (1.45) retry: OTLP/HTTP retries 429/502/503/504 and connection errors, at most 6
attempts within its ``timeout``, waiting ``Retry-After`` when given (else 1, 2, 4, 8, 16 s with jitter). OTLP/gRPC
retries UNAVAILABLE (and other transient codes), at most 6 attempts within ``timeout``, with 1, 2, 4, 8, 16 s backoff
(+-20 %) unless a separate ``google.rpc.retryinfo-bin`` trailer gives the delay — it does not read the ``RetryInfo``
that trace-source puts in the standard ``grpc-status-details-bin`` status details, so over gRPC the server's hint is
ignored and the exporter's own backoff applies. Because both give up after 6 attempts, the outage must end within
them: ``--sink-timeout-s 3`` (each refused attempt takes about 3 s) and ``--retry-after-s 2`` spread the HTTP
exporter's six attempts over about 28 s, several times what the broker needs to come back.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult

from interop_support import (
    check_record_contract,
    count_spans_at_least_once,
    finished_agent_spans,
    landed_kafka,
    metric,
    readyz_status,
    span_exporter,
    wait_for,
)
from kafka_harness import create_topic
from serve_proc import ServeProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REFUSED = {"http": "503", "grpc": "UNAVAILABLE"}
OK = {"http": "200", "grpc": "OK"}


def finished_spans(n_traces: int):
    return finished_agent_spans(n_traces, "retry-agent", ("retry.agent", "1.0"))


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_sdk_retry_delivers_every_span_after_broker_outage(tmp_path: Path, kafka_broker_factory, transport):
    cluster = await asyncio.to_thread(kafka_broker_factory)
    bootstrap = cluster.bootstrap_servers
    topic = f"retry-{uuid.uuid4().hex[:10]}"
    await create_topic(bootstrap, topic, partitions=3)

    serve = ServeProcess(tmp_path / "state", "--kafka-topic", topic, "--sink-timeout-s", "3", "--retry-after-s", "2",
                         kafka_bootstrap=bootstrap)
    with serve:
        url = serve.http_url
        # Before the outage: the pipeline works and is ready.
        warm_ids, warm_spans = finished_spans(1)
        warm = span_exporter(serve, transport, timeout=30)
        assert await asyncio.to_thread(warm.export, warm_spans) == SpanExportResult.SUCCESS
        warm.shutdown()
        assert readyz_status(url) == 200

        await asyncio.to_thread(cluster.stop_node, 0)
        await asyncio.to_thread(wait_for, lambda: readyz_status(url) == 503, "/readyz to report the broker gone")

        ids, spans = finished_spans(4)
        exporter = span_exporter(serve, transport, timeout=90)
        export = asyncio.create_task(asyncio.to_thread(exporter.export, spans))
        try:
            # The exporter is being refused (and retries on its own) while the broker is down.
            await asyncio.to_thread(
                wait_for, lambda: metric(url, "trace_source_requests_total", protocol=transport, signal="traces",
                                         status=REFUSED[transport]) > 0,
                f"a {REFUSED[transport]} answer to the {transport} exporter")
            assert readyz_status(url) == 503
            assert not export.done(), "export() returned while the broker was still down"

            await asyncio.to_thread(cluster.start_node, 0)
            result = await asyncio.wait_for(export, timeout=180)
        finally:
            if not export.done():  # a failing assertion above: don't leave the retry loop running into teardown
                exporter.shutdown()
                await asyncio.gather(export, return_exceptions=True)
        assert result == SpanExportResult.SUCCESS
        exporter.shutdown()

        refused = metric(url, "trace_source_requests_total", protocol=transport, signal="traces",
                         status=REFUSED[transport])
        accepted = metric(url, "trace_source_requests_total", protocol=transport, signal="traces",
                          status=OK[transport])
        assert refused >= 1 and accepted == 2, (refused, accepted)  # the warm-up and the retried batch
        await asyncio.to_thread(wait_for, lambda: readyz_status(url) == 200, "/readyz to recover")
        records = await landed_kafka(bootstrap, topic)

    check_record_contract(records, source_id="default")
    counts = count_spans_at_least_once(records, {**warm_ids, **ids})
    duplicated = {s: c for s, c in counts.items() if c > 1}
    # At most one extra copy per refused attempt (each timed-out write may land late, then the retry lands again).
    assert all(c <= 1 + refused for c in counts.values()), duplicated
    assert all(counts[s] == 1 for s in warm_ids), "spans written before the outage were duplicated"
    print(f"{transport}: {len(ids)} spans, {int(refused)} refused attempts, {len(duplicated)} spans landed more than "
          f"once (max {max(counts.values())} copies)")
