"""receiver.split: per-trace TracesData / LogsData records, resource and scope kept, invalid items rejected."""

import os
import random

import pytest

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from bench.payloads import make_genai_request
from receiver.split import TooManyItems, item_budget, scan, split_logs, split_traces


def _mixed_request(rng: random.Random, n_traces=5, resources=3, scopes=2, spans=10):
    req = ExportTraceServiceRequest()
    tids = [rng.randbytes(16) for _ in range(n_traces)]
    expected: dict[str, set] = {}
    for r in range(resources):
        rs = req.resource_spans.add()
        rs.schema_url = f"https://opentelemetry.io/schemas/1.{r}"
        rs.resource.attributes.add(key="service.name").value.string_value = f"svc{r}"
        for s in range(scopes):
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version, ss.schema_url = f"scope{s}", "1.0", f"scope-schema{s}"
            for i in range(spans):
                sp = ss.spans.add()
                sp.trace_id, sp.span_id, sp.name = rng.choice(tids), rng.randbytes(8), f"s{r}.{s}.{i}"
                expected.setdefault(sp.trace_id.hex(), set()).add((f"svc{r}", f"scope{s}", sp.name))
    return req, expected


def _contents(records):
    got: dict[str, set] = {}
    for rec in records:
        for rs in TracesData.FromString(rec.value).resource_spans:
            svc = rs.resource.attributes[0].value.string_value
            assert rs.schema_url == f"https://opentelemetry.io/schemas/1.{svc[3:]}"
            for ss in rs.scope_spans:
                assert ss.scope.version == "1.0" and ss.schema_url == f"scope-schema{ss.scope.name[5:]}"
                for sp in ss.spans:
                    assert sp.trace_id.hex() == rec.key.decode()
                    got.setdefault(rec.key.decode(), set()).add((svc, ss.scope.name, sp.name))
    return got


def test_mixed_request_is_split_per_trace_with_resource_and_scope_kept():
    req, expected = _mixed_request(random.Random(1))
    body = req.SerializeToString()
    result = split_traces(ExportTraceServiceRequest.FromString(body), 1_000_000, scan(body))
    assert result.accepted == 60 and result.rejected == 0 and result.error_message == ""
    assert len(result.records) == len(expected)
    assert len({r.key for r in result.records}) == len(result.records)
    assert _contents(result.records) == expected
    assert sum(r.item_count for r in result.records) == 60


def test_single_trace_request_passes_body_through_unchanged():
    req, _ = _mixed_request(random.Random(2), n_traces=1)
    body = req.SerializeToString()
    result = split_traces(ExportTraceServiceRequest.FromString(body), 1_000_000, scan(body))
    assert len(result.records) == 1 and result.records[0].value is body  # passed through, not re-encoded
    assert TracesData.FromString(body) == TracesData.FromString(result.records[0].value)


def test_invalid_spans_are_rejected_and_the_rest_kept():
    req, expected = _mixed_request(random.Random(3))
    ss = req.resource_spans[1].scope_spans[0]
    bad = [ss.spans.add() for _ in range(4)]
    bad[0].trace_id, bad[0].span_id = b"\x01" * 15, os.urandom(8)  # short trace id
    bad[1].trace_id, bad[1].span_id = bytes(16), os.urandom(8)  # all-zero trace id
    bad[2].trace_id, bad[2].span_id = os.urandom(16), b"\x00" * 8  # all-zero span id
    bad[3].trace_id, bad[3].span_id, bad[3].parent_span_id = os.urandom(16), os.urandom(8), b"\x01" * 3
    result = split_traces(req, 1_000_000)
    assert result.rejected == 4 and result.accepted == 60
    assert "trace_id must be 16 bytes" in result.error_message and "parent_span_id" in result.error_message
    assert "resource_spans[1].scope_spans[0].spans[10]" in result.error_message
    assert _contents(result.records) == expected


def test_oversized_trace_is_cut_between_spans_with_the_same_key():
    req = make_genai_request(200, spans_per_trace=200, seed=4)  # one trace of ~190 KB
    result = split_traces(req, 20_000)
    assert len(result.records) > 5 and len({r.key for r in result.records}) == 1
    assert all(len(r.value) <= 20_000 for r in result.records)
    names = [sp.span_id for r in result.records for rs in TracesData.FromString(r.value).resource_spans
             for ss in rs.scope_spans for sp in ss.spans]
    assert sorted(names) == sorted(sp.span_id for sp in req.resource_spans[0].scope_spans[0].spans)
    assert result.accepted == 200 and result.rejected == 0


def test_span_larger_than_record_limit_is_rejected_not_dropped_silently():
    req = make_genai_request(3, spans_per_trace=3, seed=5)
    req.resource_spans[0].scope_spans[0].spans[1].attributes.add(key="big").value.string_value = "x" * 50_000
    result = split_traces(req, 20_000)
    assert result.rejected == 1 and result.accepted == 2
    assert "over the 20000-byte record limit" in result.error_message


def test_logs_grouped_by_trace_and_untraced_records_kept_with_null_key():
    req = ExportLogsServiceRequest()
    sl = req.resource_logs.add().scope_logs.add()
    tid = os.urandom(16)
    for i in range(3):
        rec = sl.log_records.add()
        rec.trace_id, rec.span_id = tid, os.urandom(8)
        rec.body.string_value = f"traced {i}"
    for i in range(2):
        sl.log_records.add().body.string_value = f"untraced {i}"
    bad = sl.log_records.add()
    bad.trace_id = b"\x02" * 5
    result = split_logs(req, 1_000_000)
    assert result.accepted == 5 and result.rejected == 1
    by_key = {r.key: LogsData.FromString(r.value) for r in result.records}
    assert set(by_key) == {tid.hex().encode(), None}
    assert [lr.body.string_value for lr in by_key[None].resource_logs[0].scope_logs[0].log_records] == [
        "untraced 0", "untraced 1"]
    assert all(r.signal == "logs" for r in result.records)


def test_empty_request_yields_no_records():
    result = split_traces(ExportTraceServiceRequest(), 1_000_000, scan(b""))
    assert result.records == [] and result.accepted == 0 and result.rejected == 0


def test_scan_refuses_more_items_than_the_body_size_allows_before_decoding():
    junk = b"\x0a\x00" * 200_000  # 400 KB of empty ResourceSpans: 2 bytes each on the wire
    with pytest.raises(TooManyItems, match="split it into smaller requests"):
        scan(junk, item_budget(len(junk)))
    real = make_genai_request(512, 24, seed=6).SerializeToString()
    assert len(scan(real, item_budget(len(real))).resources) == 1


def test_unknown_fields_including_groups_are_walked_and_dropped():
    req = make_genai_request(6, 2, seed=7)
    body = req.SerializeToString()
    # An unknown field 99 as a (deprecated) group holding a varint, then an unknown length-delimited field 100.
    extra = b"\x9b\x06" + b"\x08\x01" + b"\x9c\x06" + b"\xa2\x06\x02hi"
    parsed = ExportTraceServiceRequest.FromString(body + extra)
    result = split_traces(parsed, 1_000_000, scan(body + extra))
    spans = sorted(sp.span_id for r in result.records for rs in TracesData.FromString(r.value).resource_spans
                   for ss in rs.scope_spans for sp in ss.spans)
    assert spans == sorted(sp.span_id for sp in req.resource_spans[0].scope_spans[0].spans)
