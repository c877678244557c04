"""TLS and mTLS on the OTLP endpoints of ``trace-source serve`` (a real process), with the real OpenTelemetry
exporters: Python over HTTP and gRPC, and the JS SDK's HTTP exporter configured the standard way
(``OTEL_EXPORTER_OTLP_CERTIFICATE`` / ``_CLIENT_CERTIFICATE`` / ``_CLIENT_KEY``).

* TLS: both endpoints serve only TLS with the configured certificate; bearer-token auth works over it (a wrong
  token gets 401 / UNAUTHENTICATED).
* mTLS: a client with a certificate from the configured CA gets through; one without a certificate, or with one
  from another CA, is refused during the handshake and nothing of it lands.
* Rotation: replacing the certificate files (as cert-manager does) changes what new connections get on both
  ports, without a restart.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest
import requests
from cryptography import x509
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from interop_support import (RecordingSpanExporter, assert_each_span_exactly_once, landed_local, make_agent_traces,
                              wait_for)
from prometheus_client.parser import text_string_to_metric_families
from serve_proc import ServeProcess
from test_interop_js import JS_DIR, SCRIPT, node
from tls_support import CertFiles, renew

TOKEN = "tls-token"


@pytest.fixture(autouse=True)
def _no_requests_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (set on many machines, this one included) override
    a session's CA file, so the Python HTTP exporter would ignore its ``certificate_file`` and not trust our CA."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def tls_args(pki, *, mtls: bool = False, reload_s: float | None = None) -> list[str]:
    args = ["--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
            "--auth-tokens", f"{TOKEN}=tls-agent"]
    if mtls:
        args += ["--tls-client-ca-file", str(pki.ca)]
    if reload_s is not None:
        args += ["--tls-reload-interval-s", str(reload_s)]
    return args


def http_exporter(serve, pki, client: CertFiles | None = None, token: str = TOKEN, timeout: float = 10):
    return HttpSpanExporter(endpoint=f"{serve.http_url}/v1/traces", certificate_file=str(pki.ca),
                            client_certificate_file=str(client.cert) if client else None,
                            client_key_file=str(client.key) if client else None,
                            headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def grpc_exporter(serve, pki, client: CertFiles | None = None, token: str = TOKEN, timeout: float = 10):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None)
    return GrpcSpanExporter(endpoint=serve.grpc_target, insecure=False, credentials=credentials,
                            headers={"authorization": f"Bearer {token}"}, timeout=timeout)


def export(exporter, n_traces: int = 2) -> tuple[dict[str, str], list[SpanExportResult]]:
    """Create agent runs and export them with ``exporter``; (span id -> trace id, every export result)."""
    recording = RecordingSpanExporter(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": "tls-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(recording))
    try:
        ids = make_agent_traces(provider, ("otlp.tls", "1"), n_traces)
    finally:
        provider.shutdown()
    return ids, [result for result, _ in recording.results]


def export_one(exporter) -> SpanExportResult:
    """Export a single span (one request plus the exporter's retries within its timeout)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "tls-agent"}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("otlp.tls").start_as_current_span("refused?"):
        pass
    try:
        return exporter.export(memory.get_finished_spans())
    finally:
        exporter.shutdown()
        provider.shutdown()


def metric(serve, pki, name: str, **labels: str) -> float:
    text = requests.get(f"{serve.http_url}/metrics", verify=str(pki.ca), timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def peer_serial(port: int, ca: Path, alpn: str) -> int:
    """Serial number of the certificate a new TLS connection to ``port`` is given."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_tls_on_both_endpoints_with_bearer_tokens(pki, tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "state", *tls_args(pki)) as serve:
        assert serve.http_url.startswith("https://")
        sent_http, results = export(http_exporter(serve, pki))
        assert results and all(r is SpanExportResult.SUCCESS for r in results)
        sent_grpc, results = export(grpc_exporter(serve, pki))
        assert results and all(r is SpanExportResult.SUCCESS for r in results)
        # the token is still checked over TLS
        assert export_one(http_exporter(serve, pki, token="wrong")) is SpanExportResult.FAILURE
        assert export_one(grpc_exporter(serve, pki, token="wrong")) is SpanExportResult.FAILURE
        assert metric(serve, pki, "trace_source_requests_total", protocol="http", status="401") >= 1
        assert metric(serve, pki, "trace_source_requests_total", protocol="grpc", status="UNAUTHENTICATED") >= 1
        # no plaintext on the TLS ports
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{serve.http_port}/healthz", timeout=5)
        # the server certificate is the configured one, on both ports
        expected = x509.load_pem_x509_certificate(pki.server.cert.read_bytes()).serial_number
        assert peer_serial(serve.http_port, pki.ca, "http/1.1") == expected
        assert peer_serial(serve.grpc_port, pki.ca, "h2") == expected
        records = landed_local(serve.state_dir)
    by_id = assert_each_span_exactly_once(records, {**sent_http, **sent_grpc})
    assert {ls.record.source_id for ls in by_id.values()} == {"tls-agent"}


def test_mtls_refuses_clients_without_a_valid_certificate(pki, tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "state", *tls_args(pki, mtls=True), "--ops-port", "0") as serve:
        sent_http, results = export(http_exporter(serve, pki, client=pki.client))
        assert results and all(r is SpanExportResult.SUCCESS for r in results)
        sent_grpc, results = export(grpc_exporter(serve, pki, client=pki.client))
        assert results and all(r is SpanExportResult.SUCCESS for r in results)
        for client in (None, pki.other_client):
            for make in (http_exporter, grpc_exporter):
                assert export_one(make(serve, pki, client=client, timeout=1)) is SpanExportResult.FAILURE, client
        # TLS 1.3: the server checks the client certificate after the client's handshake is done, so the refusal
        # shows up as a closed connection (SSLError is a ConnectionError too)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{serve.http_url}/healthz", verify=str(pki.ca), timeout=5)
        ok = requests.get(f"{serve.http_url}/healthz", verify=str(pki.ca), timeout=5,
                          cert=(str(pki.client.cert), str(pki.client.key)))
        assert ok.status_code == 200
        # probes and scrapes without a client certificate: the plain ops port
        ops = next(e["ops_port"] for e in serve.events() if e.get("event") == "serving")
        assert requests.get(f"http://127.0.0.1:{ops}/readyz", timeout=5).json()["ready"] is True
        assert "trace_source_requests_total" in requests.get(f"http://127.0.0.1:{ops}/metrics", timeout=5).text
        assert requests.post(f"http://127.0.0.1:{ops}/v1/traces", data=b"", timeout=5).status_code == 404
        records = landed_local(serve.state_dir)
    assert_each_span_exactly_once(records, {**sent_http, **sent_grpc})  # nothing from the refused clients


def run_js(serve, env: dict[str, str], traces: int = 2, spans_per_trace: int = 3,
           timeout_ms: int = 30000) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [node(), str(SCRIPT), "--url", f"{serve.http_url}/v1/traces", "--traces", str(traces),
         "--spans-per-trace", str(spans_per_trace), "--processor", "batch", "--token", TOKEN,
         "--timeout-ms", str(timeout_ms)],
        cwd=JS_DIR, capture_output=True, text=True, timeout=120, env={**clean, **env})


def test_js_exporter_over_tls_and_mtls(pki, tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "state", *tls_args(pki, mtls=True)) as serve:
        proc = run_js(serve, {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
                              "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client.cert),
                              "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client.key)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout)
        assert out["exports"] and all(e["code"] == 0 for e in out["exports"])
        # trusts the server, but has no client certificate
        refused = run_js(serve, {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)}, traces=1, spans_per_trace=1,
                         timeout_ms=2000)
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert all(e["code"] == 1 for e in json.loads(refused.stdout)["exports"])
        records = landed_local(serve.state_dir)
    assert_each_span_exactly_once(records, {s["spanId"]: s["traceId"] for s in out["spans"]})


def test_rotated_certificate_is_used_for_new_connections(pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-reload-interval-s", "0.2",
            "--auth-tokens", f"{TOKEN}=tls-agent"]
    with ServeProcess(tmp_path / "state", *args) as serve:
        first = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        assert peer_serial(serve.http_port, pki.ca, "http/1.1") == first
        assert peer_serial(serve.grpc_port, pki.ca, "h2") == first
        # A renewed certificate from the same CA, written the way a Secret volume update lands (rename into place).
        renewed = renew(pki, tmp_path / "renewed")
        second = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number
        os.replace(renewed.key, key)
        os.replace(renewed.cert, cert)
        wait_for(lambda: peer_serial(serve.http_port, pki.ca, "http/1.1") == second, "HTTP serving the new cert")
        wait_for(lambda: peer_serial(serve.grpc_port, pki.ca, "h2") == second, "gRPC serving the new cert")
        sent, results = export(http_exporter(serve, pki))
        assert all(r is SpanExportResult.SUCCESS for r in results)
        sent_grpc, results = export(grpc_exporter(serve, pki))
        assert all(r is SpanExportResult.SUCCESS for r in results)
        assert [e for e in serve.events() if e.get("event") == "tls.reloaded"]
        records = landed_local(serve.state_dir)
    assert_each_span_exactly_once(records, {**sent, **sent_grpc})
