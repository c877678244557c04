"""OTLP/gRPC behaviour of receiver.grpc_server, in-process against the real embedded-log sink."""

import os

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from bench.payloads import make_genai_request
from receiver.auth import Authenticator
from receiver.backpressure import InflightBudget
from receiver.export import ExportService
from receiver.grpc_server import GrpcReceiver
from receiver.metrics import ReceiverMetrics
from sinks.local_log import LocalLogReader, LocalLogSink


@pytest.fixture
async def make_server(tmp_path):
    made = []

    async def make(*, tokens=None, max_message=4 << 20, budget=64 << 20, external=lambda: 0):
        sink = LocalLogSink(tmp_path / f"state{len(made)}", fsync=False)
        await sink.start()
        metrics = ReceiverMetrics()
        service = ExportService(sink, InflightBudget(budget, external), metrics, max_record_bytes=1_000_000,
                                retry_after_s=4)
        server, port = GrpcReceiver(service, Authenticator(tokens or {}, "default"), metrics,
                                    max_message_bytes=max_message).build("127.0.0.1", 0)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 64 << 20)])
        made.append((server, channel, sink))
        return trace_service_pb2_grpc.TraceServiceStub(channel), channel, sink

    yield make
    for server, channel, sink in made:
        await channel.close()
        await server.stop(None)
        await sink.stop()


def _details(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    return status_pb2.Status.FromString(raw)


def _landed(sink):
    with LocalLogReader(sink.path) as reader:
        return [(rec.source_id, sp.span_id) for rec in reader.read(0, 10_000)
                for rs in TracesData.FromString(rec.value).resource_spans for ss in rs.scope_spans for sp in ss.spans]


async def test_export_lands_with_gzip(make_server):
    stub, _, sink = await make_server()
    req = make_genai_request(100, 10, seed=1)
    resp = await stub.Export(req, compression=grpc.Compression.Gzip)
    assert not resp.HasField("partial_success")
    assert sorted(s for _, s in _landed(sink)) == sorted(sp.span_id for sp in req.resource_spans[0].scope_spans[0].spans)


async def test_invalid_spans_give_partial_success(make_server):
    stub, _, sink = await make_server()
    req = make_genai_request(10, 10, seed=2)
    req.resource_spans[0].scope_spans[0].spans[3].trace_id = b"short"
    resp = await stub.Export(req)
    assert resp.partial_success.rejected_spans == 1 and "trace_id" in resp.partial_success.error_message
    assert len(_landed(sink)) == 9


async def test_undecodable_request_is_invalid_argument_with_bad_request(make_server):
    _, channel, _ = await make_server()
    call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"\x0a\xff\xff\xff\x0f")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(err.value).details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR)


async def test_missing_token_is_unauthenticated_and_token_maps_source(make_server):
    stub, _, sink = await make_server(tokens={"s3cret": "agent-x"})
    req = make_genai_request(4, 4, seed=3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Export(req)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.Export(req, metadata=(("authorization", "Bearer s3cret"),))
    assert {s for s, _ in _landed(sink)} == {"agent-x"}


async def test_budget_exhausted_is_unavailable_with_retry_info(make_server):
    stub, _, sink = await make_server(budget=1 << 20, external=lambda: 2 << 20)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Export(make_genai_request(8, 8, seed=4))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_details_pb2.RetryInfo()
    _details(err.value).details[0].Unpack(info)
    assert info.retry_delay.seconds == 4
    assert _landed(sink) == []


async def test_message_over_receive_cap_is_resource_exhausted(make_server):
    stub, _, _ = await make_server(max_message=256 * 1024)
    req = make_genai_request(2, 2, seed=5)
    req.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="big").value.string_value = "x" * (512 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Export(req)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_logs_service_export(make_server):
    _, channel, sink = await make_server()
    req = logs_service_pb2.ExportLogsServiceRequest()
    rec = req.resource_logs.add().scope_logs.add().log_records.add()
    rec.trace_id, rec.span_id, rec.event_name = os.urandom(16), os.urandom(8), "gen_ai.client.inference.operation.details"
    resp = await logs_service_pb2_grpc.LogsServiceStub(channel).Export(req)
    assert not resp.HasField("partial_success")
    with LocalLogReader(sink.path) as reader:
        records = reader.read(0, 10)
    assert [(r.signal, r.key) for r in records] == [("logs", rec.trace_id.hex())]


async def test_unavailable_carries_retry_info_trailer_for_otel_python_exporter(make_server):
    stub, _, _ = await make_server(budget=1 << 20, external=lambda: 2 << 20)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Export(make_genai_request(8, 8, seed=6))
    raw = dict(err.value.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")
    assert error_details_pb2.RetryInfo.FromString(raw).retry_delay.seconds == 4
