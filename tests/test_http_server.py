"""OTLP/HTTP behaviour of receiver.http_server, in-process against the real embedded-log sink."""

import gzip
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from bench.payloads import make_genai_request
from receiver.auth import Authenticator
from receiver.backpressure import InflightBudget
from receiver.export import ExportService
from receiver.http_server import HttpReceiver
from receiver.metrics import ReceiverMetrics
from sinks.local_log import LocalLogReader, LocalLogSink

PB = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
async def make_client(tmp_path):
    made = []

    async def make(*, tokens=None, cors=None, max_body=1 << 20, budget=64 << 20, external=lambda: 0):
        sink = LocalLogSink(tmp_path / f"state{len(made)}", fsync=False)
        await sink.start()
        metrics = ReceiverMetrics()
        service = ExportService(sink, InflightBudget(budget, external), metrics, max_record_bytes=1_000_000,
                                retry_after_s=3)
        http = HttpReceiver(service, Authenticator(tokens or {}, "default"), metrics, max_body_bytes=max_body,
                            cors_allowed_origins=cors)
        server = TestServer(http.app())
        await server.start_server(auto_decompress=False)  # as trace_source.serve runs it: we decompress, capped
        client = TestClient(server)
        await client.start_server()
        client.sink = sink
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()
        await client.sink.stop()


def _spans_in_log(sink):
    from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

    with LocalLogReader(sink.path) as reader:
        return [(rec.source_id, sp.span_id) for rec in reader.read(0, 10_000)
                for rs in TracesData.FromString(rec.value).resource_spans for ss in rs.scope_spans for sp in ss.spans]


async def test_protobuf_export_lands_and_reply_is_protobuf(make_client):
    client = await make_client()
    req = make_genai_request(64, 16, seed=1)
    resp = await client.post("/v1/traces", data=gzip.compress(req.SerializeToString()),
                             headers={**PB, "Content-Encoding": "gzip"})
    assert resp.status == 200 and resp.content_type == "application/x-protobuf"
    assert not ExportTraceServiceResponse.FromString(await resp.read()).HasField("partial_success")
    assert resp.headers["X-Request-Id"]
    assert sorted(s for _, s in _spans_in_log(client.sink)) == sorted(
        sp.span_id for sp in req.resource_spans[0].scope_spans[0].spans)


async def test_media_type_parameters_are_accepted_and_json_reply_is_json(make_client):
    client = await make_client()
    resp = await client.post("/v1/traces", data=b'{"resourceSpans":[]}',
                             headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status == 200 and resp.content_type == "application/json"
    assert json.loads(await resp.read()) == {}


@pytest.mark.parametrize("content_type", ["application/x-protobuf", "application/json"])
async def test_empty_request_is_success(make_client, content_type):
    client = await make_client()
    resp = await client.post("/v1/traces", data=b"", headers={"Content-Type": content_type})
    assert resp.status == 200
    assert _spans_in_log(client.sink) == []


async def test_unknown_media_type_is_415_and_other_methods_405(make_client):
    client = await make_client()
    resp = await client.post("/v1/traces", data=b"x", headers={"Content-Type": "text/plain"})
    assert resp.status == 415 and "supported" in await resp.text()
    resp = await client.get("/v1/traces")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"


async def test_bad_protobuf_is_400_with_status_and_bad_request_detail(make_client):
    client = await make_client()
    resp = await client.post("/v1/traces", data=b"\x0a\xff\xff\xff\x0f", headers=PB)
    assert resp.status == 400 and resp.content_type == "application/x-protobuf"
    status = status_pb2.Status.FromString(await resp.read())
    assert status.code == 3 and "cannot decode" in status.message
    assert status.details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR)


async def test_body_over_cap_is_413_raw_and_after_decompression(make_client):
    client = await make_client(max_body=64 * 1024)
    resp = await client.post("/v1/traces", data=b"\0" * (128 * 1024), headers=PB)
    assert resp.status == 413
    bomb = gzip.compress(b"\0" * (4 << 20))  # ~4 KB on the wire, 4 MiB decompressed
    resp = await client.post("/v1/traces", data=bomb, headers={**PB, "Content-Encoding": "gzip"})
    assert resp.status == 413
    assert status_pb2.Status.FromString(await resp.read()).message


async def test_unknown_content_encoding_is_415_with_status_body(make_client):
    client = await make_client()
    resp = await client.post("/v1/traces", data=b"x", headers={**PB, "Content-Encoding": "br"})
    assert resp.status == 415
    assert "br" in status_pb2.Status.FromString(await resp.read()).message


async def test_bearer_token_maps_to_source_and_bad_token_is_401(make_client):
    client = await make_client(tokens={"tok-a": "agent-a", "tok-b": "agent-b"})
    body = make_genai_request(4, 4, seed=2).SerializeToString()
    resp = await client.post("/v1/traces", data=body, headers={**PB, "Authorization": "Bearer wrong"})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert status_pb2.Status.FromString(await resp.read()).code == 16
    resp = await client.post("/v1/traces", data=body, headers=PB)
    assert resp.status == 401
    resp = await client.post("/v1/traces", data=body, headers={**PB, "Authorization": "Bearer tok-b"})
    assert resp.status == 200
    assert {source for source, _ in _spans_in_log(client.sink)} == {"agent-b"}


async def test_cors_off_by_default_and_configured_origins_allowed(make_client):
    client = await make_client()
    resp = await client.options("/v1/traces", headers={"Origin": "https://app.example.com",
                                                       "Access-Control-Request-Method": "POST"})
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
    client = await make_client(cors=["https://*.example.com"])
    resp = await client.options("/v1/traces", headers={"Origin": "https://app.example.com",
                                                       "Access-Control-Request-Method": "POST"})
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    resp = await client.post("/v1/traces", data=b"", headers={**PB, "Origin": "https://evil.test"})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_exhausted_inflight_budget_is_503_with_retry_after(make_client):
    # The sink already holds more bytes than the budget allows (as a Kafka producer does while the broker is down).
    client = await make_client(budget=1 << 20, external=lambda: 2 << 20)
    body = make_genai_request(8, 8, seed=3).SerializeToString()
    resp = await client.post("/v1/traces", data=body, headers=PB)
    assert resp.status == 503 and resp.headers["Retry-After"] == "3"
    status = status_pb2.Status.FromString(await resp.read())
    assert status.code == 14 and status.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    assert _spans_in_log(client.sink) == []


async def test_health_ready_and_metrics(make_client):
    client = await make_client()
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["ready"] is True
    await client.post("/v1/traces", data=make_genai_request(8, 8, seed=4).SerializeToString(), headers=PB)
    text = await (await client.get("/metrics")).text()
    assert 'trace_source_requests_total{protocol="http",signal="traces",status="200"} 1.0' in text
    assert 'trace_source_items_accepted_total{signal="traces"} 8.0' in text
    assert "trace_source_sink_write_seconds_bucket" in text and "trace_source_inflight_bytes" in text


async def test_request_bigger_than_budget_is_admitted_when_alone(make_client):
    # Raw body plus decompressed body exceed the budget; with nothing else in flight it must still be taken.
    client = await make_client(budget=1 << 20, max_body=4 << 20)
    req = make_genai_request(2, 2, seed=5)
    req.resource_spans[0].scope_spans[0].spans[0].name = "x" * 600_000
    resp = await client.post("/v1/traces", data=req.SerializeToString(), headers=PB)
    assert resp.status == 200
