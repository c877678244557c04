"""receiver.status: google.rpc.Status failure bodies and Export*ServiceResponse success bodies, both encodings."""

from __future__ import annotations

import json
import time

import pytest
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from receiver.status import MAX_MESSAGE_BYTES, export_response_body, status_body

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


def decode_status(body: bytes, content_type: str) -> status_pb2.Status:
    if content_type == JSON:
        return json_format.Parse(body, status_pb2.Status())  # needs the Any @type names to resolve
    return status_pb2.Status.FromString(body)


def details(status: status_pb2.Status) -> dict[str, object]:
    out: dict[str, object] = {}
    for packed in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if packed.Is(cls.DESCRIPTOR):
                msg = cls()
                assert packed.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    assert len(out) == len(status.details)
    return out


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_plain_status(content_type: str) -> None:
    body = status_body(code_pb2.INTERNAL, "pipeline exploded", content_type)
    status = decode_status(body, content_type)
    assert status.code == 13 and status.message == "pipeline exploded" and not status.details


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_bad_request_details(content_type: str) -> None:
    field = "resourceSpans[0].scopeSpans[1].spans[3].traceId"
    body = status_body(code_pb2.INVALID_ARGUMENT, f"{field}: not hex", content_type, bad_request_field=field)
    status = decode_status(body, content_type)
    assert status.code == 3 and status.message == f"{field}: not hex"
    bad = details(status)["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [(field, f"{field}: not hex")]
    assert status.details[0].type_url == "type.googleapis.com/google.rpc.BadRequest"


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_retry_info_details(content_type: str) -> None:
    body = status_body(code_pb2.UNAVAILABLE, "sink is full, retry later", content_type, retry_after_s=7)
    status = decode_status(body, content_type)
    assert status.code == 14
    assert details(status)["RetryInfo"].retry_delay.seconds == 7


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_both_details(content_type: str) -> None:
    body = status_body(code_pb2.RESOURCE_EXHAUSTED, "slow down", content_type, bad_request_field="x", retry_after_s=0)
    found = details(decode_status(body, content_type))
    assert set(found) == {"BadRequest", "RetryInfo"}


def test_json_shape_is_spec_json() -> None:
    body = status_body(3, "bad", "Application/JSON; charset=utf-8", bad_request_field="f", retry_after_s=2)
    assert b" " not in body
    assert json.loads(body) == {
        "code": 3,
        "message": "bad",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "f", "description": "bad"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"},
        ],
    }


def test_media_type_parameters_and_aliases() -> None:
    expected = status_pb2.Status(code=16, message="no token").SerializeToString()
    for content_type in (PROTOBUF, "APPLICATION/X-PROTOBUF", "application/x-protobuf; proto=x", "application/protobuf"):
        assert status_body(code_pb2.UNAUTHENTICATED, "no token", content_type) == expected


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/grpc", "application/jsonx"])
def test_unknown_media_type_is_a_caller_bug(content_type: str) -> None:
    with pytest.raises(ValueError):
        status_body(3, "x", content_type)
    with pytest.raises(ValueError):
        export_response_body("traces", 0, "", content_type)


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_long_messages_are_truncated(content_type: str) -> None:
    started = time.perf_counter()
    body = status_body(3, "é" * 5_000_000, content_type, bad_request_field="f" * 100_000, retry_after_s=1)
    assert time.perf_counter() - started < 1.0
    assert len(body) < 32 * 1024  # spec: MUST bound responses, 4 MiB recommended
    status = decode_status(body, content_type)
    assert status.message.endswith("…(truncated)")
    assert len(status.message.encode()) <= MAX_MESSAGE_BYTES
    assert status.message.startswith("é" * 100)  # cut on a character boundary
    violation = details(status)["BadRequest"].field_violations[0]
    assert len(violation.field.encode()) <= 1024 and violation.description == status.message


def test_message_at_the_limit_is_kept_whole() -> None:
    text = "a" * MAX_MESSAGE_BYTES
    assert decode_status(status_body(3, text, PROTOBUF), PROTOBUF).message == text


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_unpaired_surrogates_are_replaced(content_type: str) -> None:
    status = decode_status(status_body(3, "bad \ud800 name", content_type, bad_request_field="\udcff"), content_type)
    assert status.message == "bad ? name"


def test_negative_retry_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        status_body(14, "x", PROTOBUF, retry_after_s=-1)


@settings(max_examples=200, deadline=None)
@given(
    code=st.integers(0, 16),
    message=st.text(max_size=300),
    field=st.none() | st.text(max_size=50),
    retry=st.none() | st.integers(0, 10**6),
    content_type=st.sampled_from([PROTOBUF, JSON]),
)
def test_status_round_trip_property(code, message, field, retry, content_type) -> None:
    status = decode_status(status_body(code, message, content_type, bad_request_field=field, retry_after_s=retry), content_type)
    clean = message.encode("utf-8", "replace").decode()
    assert status.code == code and status.message == clean
    found = details(status)
    assert ("BadRequest" in found) == (field is not None)
    assert ("RetryInfo" in found) == (retry is not None)
    if retry is not None:
        assert found["RetryInfo"].retry_delay.seconds == retry


# --- export responses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["traces", "logs"])
def test_full_success_is_empty_and_cached(kind: str) -> None:
    assert export_response_body(kind, 0, "", PROTOBUF) == b""
    assert export_response_body(kind, 0, "", JSON) == b"{}"
    assert export_response_body(kind, 0, "", "application/json; charset=utf-8") is export_response_body(kind, 0, "", JSON)


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_partial_success_traces(content_type: str) -> None:
    body = export_response_body("traces", 3, "3 spans have a trace id that is not 16 bytes", content_type)
    if content_type == JSON:
        assert json.loads(body) == {
            "partialSuccess": {"rejectedSpans": "3", "errorMessage": "3 spans have a trace id that is not 16 bytes"}
        }
        resp = json_format.Parse(body, ExportTraceServiceResponse())
    else:
        resp = ExportTraceServiceResponse.FromString(body)
    assert resp.HasField("partial_success")
    assert resp.partial_success.rejected_spans == 3


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_partial_success_logs(content_type: str) -> None:
    body = export_response_body("logs", 2, "", content_type)
    if content_type == JSON:
        assert json.loads(body) == {"partialSuccess": {"rejectedLogRecords": "2"}}
        resp = json_format.Parse(body, ExportLogsServiceResponse())
    else:
        resp = ExportLogsServiceResponse.FromString(body)
    assert resp.partial_success.rejected_log_records == 2 and resp.partial_success.error_message == ""


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
def test_warning_only(content_type: str) -> None:
    """rejected = 0 with a message is a warning; partial_success must be present (spec)."""
    body = export_response_body("traces", 0, "attribute values were truncated", content_type)
    if content_type == JSON:
        assert json.loads(body) == {"partialSuccess": {"errorMessage": "attribute values were truncated"}}
    else:
        resp = ExportTraceServiceResponse.FromString(body)
        assert resp.HasField("partial_success") and resp.partial_success.rejected_spans == 0


def test_long_error_message_is_truncated() -> None:
    body = export_response_body("traces", 1, "x" * 10_000_000, PROTOBUF)
    resp = ExportTraceServiceResponse.FromString(body)
    assert len(body) < MAX_MESSAGE_BYTES + 64
    assert resp.partial_success.error_message.endswith("…(truncated)")


def test_export_response_caller_bugs() -> None:
    with pytest.raises(ValueError):
        export_response_body("metrics", 0, "", PROTOBUF)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        export_response_body("traces", -1, "", PROTOBUF)
