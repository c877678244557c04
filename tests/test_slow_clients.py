"""Slow and vanishing clients against ``trace-source serve`` (a real process).

* A client that announces a large body and sends a few bytes gets 408 after ``--read-timeout-s`` and is
  disconnected; the bytes it reserved are released, so real exporters keep getting 200.
* Clients that close mid-body are counted as ``status="499"`` (client closed the request) — never 500 — and leave
  no error-level log line or traceback.
* ``--max-connections``: connections beyond it are closed on arrival and counted; idle connections and connections
  whose headers never finish (slowloris) are closed after ``--idle-timeout-s``.
* Real exporters whose timeout is shorter than the server's answer (the broker is down, the sink waits
  ``--sink-timeout-s``): their requests end as 499 (HTTP) and CANCELLED / DEADLINE_EXCEEDED (gRPC), not as
  errors, and once the broker is back the same exporters deliver.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult

from interop_support import (assert_each_span_exactly_once, count_spans_at_least_once, finished_agent_spans,
                              landed_kafka, landed_local, metric, span_exporter, wait_for)
from kafka_harness import create_topic
from serve_proc import ServeProcess

MiB = 1024 * 1024


def finished_spans(n: int):
    return finished_agent_spans(n, "slow-clients", ("slow.clients", "1"))


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def announce(port: int, length: int, sent: bytes) -> socket.socket:
    """An OTLP/HTTP request announcing ``length`` body bytes, of which only ``sent`` follow."""
    sock = connect(port)
    sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                 b"Content-Length: %d\r\n\r\n" % length + sent)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def no_errors_logged(serve: ServeProcess) -> None:
    log = serve.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "ConnectionResetError" not in log
    assert not [e for e in serve.events() if e.get("event") == "internal error while exporting"]


def export_ok(serve: ServeProcess, transport: str = "http") -> dict[str, str]:
    ids, spans = finished_spans(1)
    exporter = span_exporter(serve, transport, timeout=30)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    return ids


def test_slow_body_gets_408_and_its_reservation_back(tmp_path: Path) -> None:
    # Four announced 60 MiB bodies would hold 240 MiB of a 256 MiB in-flight budget until they finish.
    with ServeProcess(tmp_path / "state", "--read-timeout-s", "1") as serve:
        slow = [announce(serve.http_port, 60 * MiB, b"0123456789") for _ in range(4)]
        wait_for(lambda: metric(serve.http_url, "trace_source_inflight_bytes") >= 4 * 60 * MiB,
                 "the slow requests to hold their reservations")
        answers = [read_until_closed(s) for s in slow]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
        assert metric(serve.http_url, "trace_source_requests_total", status="408") == 4
        assert metric(serve.http_url, "trace_source_inflight_bytes") == 0
        sent = export_ok(serve)
        no_errors_logged(serve)
        records = landed_local(serve.state_dir)
    assert_each_span_exactly_once(records, sent)


def test_clients_closing_mid_body_are_their_own_outcome(tmp_path: Path) -> None:
    n = 300
    with ServeProcess(tmp_path / "state") as serve:
        for i in range(n):
            sock = announce(serve.http_port, 100_000, b"\x0a" * (i % 50 + 1))
            sock.close()
        wait_for(lambda: metric(serve.http_url, "trace_source_requests_total", status="499") == n,
                 f"{n} requests counted as 499")
        assert metric(serve.http_url, "trace_source_requests_total", status="500") == 0
        sent = export_ok(serve)
        no_errors_logged(serve)
        records = landed_local(serve.state_dir)
    assert_each_span_exactly_once(records, sent)


def keep_alive_request(sock: socket.socket) -> None:
    """One complete request on ``sock``, keeping the connection open (proves the server admitted it)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        assert chunk, "closed instead of answering"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")


def test_connection_limit_and_idle_timeout(tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "state", "--max-connections", "20", "--idle-timeout-s", "2",
                      "--no-grpc-enabled") as serve:
        # a slowloris (headers that never finish) and 19 idle keep-alive connections fill the 20 slots
        slowloris = connect(serve.http_port)
        slowloris.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        idle = [connect(serve.http_port) for _ in range(19)]
        for sock in idle:
            keep_alive_request(sock)
        refused = [connect(serve.http_port) for _ in range(10)]
        for sock in refused:
            assert read_until_closed(sock) == b""  # closed without an answer
        # the idle ones and the slowloris are closed by the server after the idle timeout, without an answer
        for sock in [slowloris, *idle]:
            assert read_until_closed(sock) == b""
        wait_for(lambda: metric(serve.http_url, "trace_source_open_connections") <= 1, "idle connections closed")
        assert metric(serve.http_url, "trace_source_connections_refused_total") == 10
        sent = export_ok(serve)
        no_errors_logged(serve)
        records = landed_local(serve.state_dir)
    assert_each_span_exactly_once(records, sent)


@pytest.mark.kafka
async def test_exporters_that_time_out_before_the_answer(tmp_path: Path, kafka_broker_factory):
    cluster = await asyncio.to_thread(kafka_broker_factory)
    topic = f"slow-{uuid.uuid4().hex[:10]}"
    await create_topic(cluster.bootstrap_servers, topic, partitions=1)
    gone = {"http": ("499",), "grpc": ("CANCELLED", "DEADLINE_EXCEEDED")}
    with ServeProcess(tmp_path / "state", "--kafka-topic", topic, "--sink-timeout-s", "4",
                      kafka_bootstrap=cluster.bootstrap_servers) as serve:
        await asyncio.to_thread(cluster.stop_node, 0)
        ids, spans = finished_spans(2)
        for transport in ("http", "grpc"):
            impatient = span_exporter(serve, transport, timeout=1.5)  # gives up before the sink's 4 s deadline
            try:
                assert await asyncio.to_thread(impatient.export, spans) is SpanExportResult.FAILURE
            finally:
                impatient.shutdown()

            def counted() -> bool:
                return sum(metric(serve.http_url, "trace_source_requests_total", protocol=transport, status=s)
                           for s in gone[transport]) >= 1
            await asyncio.to_thread(wait_for, counted, f"the abandoned {transport} request counted as {gone}")
        for status in ("500", "INTERNAL", "UNKNOWN"):
            assert metric(serve.http_url, "trace_source_requests_total", status=status) == 0
        no_errors_logged(serve)

        await asyncio.to_thread(cluster.start_node, 0)
        for transport in ("http", "grpc"):
            patient = span_exporter(serve, transport, timeout=60)
            try:
                assert await asyncio.to_thread(patient.export, spans) is SpanExportResult.SUCCESS
            finally:
                patient.shutdown()
    count_spans_at_least_once(await landed_kafka(cluster.bootstrap_servers, topic), ids)
