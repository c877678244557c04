"""receiver.otlp_json: OTLP/JSON in (lenient) and out (spec), and "only BadRequest escapes" for any body."""

from __future__ import annotations

import base64
import json
import re
import os

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from receiver.errors import BadRequest, ReceiverError
from receiver.otlp_json import MAX_MESSAGE_DEPTH, message_to_json, parse_json_request

TRACE_ID = bytes.fromhex("5B8EFFF798038103D269B633813FC60C")
SPAN_ID = bytes.fromhex("EEE19B7EC3C1B174")

# The example from the OTLP spec / brief, verbatim: uppercase hex, enum as number, int64 as string and as number.
SPEC_EXAMPLE = (
    b'{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"x"}}]},'
    b'"scopeSpans":[{"scope":{"name":"s"},"spans":[{"traceId":"5B8EFFF798038103D269B633813FC60C",'
    b'"spanId":"EEE19B7EC3C1B174","name":"n","kind":2,"startTimeUnixNano":"1544712660000000000",'
    b'"endTimeUnixNano":1544712661000000000,"attributes":[{"key":"n","value":{"intValue":"42"}}]}]}]}]}'
)


def spans_json(*spans: dict, resource: dict | None = None) -> bytes:
    rs: dict = {"scopeSpans": [{"scope": {"name": "s"}, "spans": list(spans)}]}
    if resource is not None:
        rs["resource"] = resource
    return json.dumps({"resourceSpans": [rs]}).encode()


def only_span(req: ExportTraceServiceRequest) -> Span:
    return req.resource_spans[0].scope_spans[0].spans[0]


def hexify_ids(doc: dict) -> dict:
    """Independent of the module under test: json_format's base64 ids -> hex, as the spec wants on the wire."""

    def fix(obj: dict) -> None:
        for key in ("traceId", "spanId", "parentSpanId"):
            if key in obj:
                obj[key] = base64.b64decode(obj[key]).hex().upper()

    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                fix(span)
                for link in span.get("links", []):
                    fix(link)
    for rl in doc.get("resourceLogs", []):
        for sl in rl.get("scopeLogs", []):
            for record in sl.get("logRecords", []):
                fix(record)
    return doc


def sample_trace_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "agent"
    rs.schema_url = "https://opentelemetry.io/schemas/1.26.0"
    ss = rs.scope_spans.add()
    ss.scope.name = "openinference"
    for i in range(5):
        span = ss.spans.add(
            trace_id=os.urandom(16),
            span_id=os.urandom(8),
            parent_span_id=os.urandom(8) if i else b"",
            name=f"chat {i}",
            kind=Span.SPAN_KIND_CLIENT,
            start_time_unix_nano=1_700_000_000_000_000_000 + i,
            end_time_unix_nano=18_446_744_073_709_551_615,  # fixed64 max: must survive JSON as a string
            flags=0x101,
        )
        span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = -(2**63)
        span.attributes.add(key="blob").value.bytes_value = b"\x00\xff\xfe"
        span.attributes.add(key="ratio").value.double_value = 0.25
        arr = span.attributes.add(key="list").value.array_value
        arr.values.add().string_value = "a"
        arr.values.add().kvlist_value.values.add(key="k").value.bool_value = True
        event = span.events.add(time_unix_nano=5, name="gen_ai.choice")
        event.attributes.add(key="index").value.int_value = 0
        span.links.add(trace_id=os.urandom(16), span_id=os.urandom(8), flags=1)
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = "boom ü ✓"
    return req


def sample_logs_request() -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    record = req.resource_logs.add().scope_logs.add().log_records.add(
        time_unix_nano=1, severity_number=9, severity_text="INFO", trace_id=TRACE_ID, span_id=SPAN_ID,
        event_name="gen_ai.user.message",
    )
    record.body.bytes_value = b"\x01\x02"
    record.attributes.add(key="k").value.string_value = "v"
    return req


# --- input ----------------------------------------------------------------------------------------------------


def test_spec_example() -> None:
    req = parse_json_request(SPEC_EXAMPLE, ExportTraceServiceRequest)
    rs = req.resource_spans[0]
    assert rs.resource.attributes[0].key == "service.name"
    assert rs.resource.attributes[0].value.string_value == "x"
    assert rs.scope_spans[0].scope.name == "s"
    span = rs.scope_spans[0].spans[0]
    assert span.trace_id == TRACE_ID and span.span_id == SPAN_ID and span.parent_span_id == b""
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.start_time_unix_nano == 1544712660000000000
    assert span.end_time_unix_nano == 1544712661000000000
    assert span.attributes[0].value.int_value == 42


def test_json_format_output_with_hex_ids_round_trips() -> None:
    original = sample_trace_request()
    doc = hexify_ids(json_format.MessageToDict(original))
    assert parse_json_request(json.dumps(doc).encode(), ExportTraceServiceRequest) == original


def test_logs_round_trip_and_ids() -> None:
    original = sample_logs_request()
    doc = hexify_ids(json_format.MessageToDict(original))
    assert doc["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["traceId"] == TRACE_ID.hex().upper()
    parsed = parse_json_request(json.dumps(doc).encode(), ExportLogsServiceRequest)
    assert parsed == original
    record = parsed.resource_logs[0].scope_logs[0].log_records[0]
    assert record.trace_id == TRACE_ID and record.body.bytes_value == b"\x01\x02"


def test_message_to_json_round_trips() -> None:
    for original in (sample_trace_request(), sample_logs_request()):
        assert parse_json_request(message_to_json(original), type(original)) == original


def test_ids_are_case_insensitive_hex() -> None:
    body = spans_json({"traceId": TRACE_ID.hex(), "spanId": SPAN_ID.hex().upper(), "parentSpanId": "aBcDeF0123456789"})
    span = only_span(parse_json_request(body, ExportTraceServiceRequest))
    assert (span.trace_id, span.span_id, span.parent_span_id) == (TRACE_ID, SPAN_ID, bytes.fromhex("abcdef0123456789"))


def test_link_ids_are_hex() -> None:
    body = spans_json({"links": [{}, {"traceId": TRACE_ID.hex(), "spanId": SPAN_ID.hex()}]})
    link = only_span(parse_json_request(body, ExportTraceServiceRequest)).links[1]
    assert (link.trace_id, link.span_id) == (TRACE_ID, SPAN_ID)


def test_empty_and_null_ids() -> None:
    span = only_span(parse_json_request(spans_json({"traceId": "", "spanId": None}), ExportTraceServiceRequest))
    assert span.trace_id == b"" and span.span_id == b""


def test_wrong_length_hex_is_not_an_error_here() -> None:
    span = only_span(parse_json_request(spans_json({"traceId": "abcd", "spanId": "00" * 9}), ExportTraceServiceRequest))
    assert span.trace_id == b"\xab\xcd" and span.span_id == bytes(9)


def test_other_bytes_fields_stay_base64() -> None:
    body = spans_json(
        {"attributes": [{"key": "b", "value": {"bytesValue": base64.b64encode(b"\x00\xffhi").decode()}}]},
        resource={"attributes": [{"key": "r", "value": {"bytesValue": "AAE="}}]},
    )
    req = parse_json_request(body, ExportTraceServiceRequest)
    assert only_span(req).attributes[0].value.bytes_value == b"\x00\xffhi"
    assert req.resource_spans[0].resource.attributes[0].value.bytes_value == b"\x00\x01"


def test_snake_case_keys() -> None:
    doc = {
        "resource_spans": [
            {
                "schema_url": "u",
                "scope_spans": [
                    {
                        "spans": [
                            {
                                "trace_id": TRACE_ID.hex(),
                                "span_id": SPAN_ID.hex(),
                                "parent_span_id": SPAN_ID.hex(),
                                "start_time_unix_nano": 7,
                                "dropped_attributes_count": 2,
                                "attributes": [{"key": "k", "value": {"string_value": "v"}}],
                                "links": [{"trace_id": TRACE_ID.hex(), "span_id": SPAN_ID.hex()}],
                            }
                        ]
                    }
                ],
            }
        ]
    }
    req = parse_json_request(json.dumps(doc).encode(), ExportTraceServiceRequest)
    span = only_span(req)
    assert req.resource_spans[0].schema_url == "u"
    assert (span.trace_id, span.span_id, span.parent_span_id) == (TRACE_ID, SPAN_ID, SPAN_ID)
    assert span.start_time_unix_nano == 7 and span.dropped_attributes_count == 2
    assert span.attributes[0].value.string_value == "v"
    assert span.links[0].trace_id == TRACE_ID


def test_snake_case_log_records() -> None:
    doc = {"resource_logs": [{"scope_logs": [{"log_records": [{"trace_id": TRACE_ID.hex(), "span_id": SPAN_ID.hex()}]}]}]}
    record = parse_json_request(json.dumps(doc).encode(), ExportLogsServiceRequest).resource_logs[0].scope_logs[0].log_records[0]
    assert (record.trace_id, record.span_id) == (TRACE_ID, SPAN_ID)


def test_enums_as_names_or_numbers() -> None:
    body = spans_json(
        {"kind": "SPAN_KIND_SERVER", "status": {"code": "STATUS_CODE_ERROR"}},
        {"kind": 3, "status": {"code": 1}},
        {"kind": 99},  # unknown number: proto3 enums are open, kept as is
    )
    spans = parse_json_request(body, ExportTraceServiceRequest).resource_spans[0].scope_spans[0].spans
    assert spans[0].kind == Span.SPAN_KIND_SERVER and spans[0].status.code == Status.STATUS_CODE_ERROR
    assert spans[1].kind == Span.SPAN_KIND_CLIENT and spans[1].status.code == Status.STATUS_CODE_OK
    assert spans[2].kind == 99


def test_unknown_enum_name_is_ignored() -> None:
    """json_format quirk: with ignore_unknown_fields, an unknown enum *name* leaves the field at 0."""
    span = only_span(parse_json_request(spans_json({"kind": "SPAN_KIND_BOGUS", "name": "x"}), ExportTraceServiceRequest))
    assert span.kind == 0 and span.name == "x"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1544712661000000001", 1544712661000000001),
        (1544712661000000001, 1544712661000000001),  # exact: json.loads keeps big ints as int
        ("18446744073709551615", 2**64 - 1),
        ("1500", 1500),
        (1500.0, 1500),
        ("1.5e3", 1500),
    ],
)
def test_64_bit_ints_as_strings_or_numbers(value, expected: int) -> None:
    span = only_span(parse_json_request(spans_json({"startTimeUnixNano": value}), ExportTraceServiceRequest))
    assert span.start_time_unix_nano == expected


def test_unknown_fields_are_ignored() -> None:
    body = json.dumps(
        {
            "resourceSpans": [
                {
                    "futureField": {"deep": [1, 2, {"x": None}]},
                    "scopeSpans": [{"spans": [{"name": "n", "newThing": 1, "links": [{"mystery": True}]}]}],
                }
            ],
            "extra": "ignored",
        }
    ).encode()
    assert only_span(parse_json_request(body, ExportTraceServiceRequest)).name == "n"


def test_bom_and_whitespace() -> None:
    assert parse_json_request(b"\xef\xbb\xbf \n{}\n", ExportTraceServiceRequest) == ExportTraceServiceRequest()


def test_empty_object_is_empty_request() -> None:
    assert parse_json_request(b"{}", ExportLogsServiceRequest) == ExportLogsServiceRequest()


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("span", "path", "reason"),
    [
        ({"traceId": "zz" * 16}, "traceId", "not hex"),
        ({"spanId": "abc"}, "spanId", "not hex"),  # odd length
        ({"spanId": "ab cd ef 01 23 45 67 89"}, "spanId", "not hex"),  # bytes.fromhex would take this
        ({"parentSpanId": "é" * 16}, "parentSpanId", "not hex"),
        ({"traceId": base64.b64encode(TRACE_ID).decode()}, "traceId", "not hex"),  # proto3 JSON's base64 is wrong
        ({"spanId": 12}, "spanId", "expected a hex string, got a number"),
        ({"spanId": ["ab"]}, "spanId", "expected a hex string, got an array"),
    ],
)
def test_bad_ids_name_the_field(span: dict, path: str, reason: str) -> None:
    doc = {"resourceSpans": [{"scopeSpans": [{}, {"spans": [{}, {}, {}, span]}]}]}
    with pytest.raises(BadRequest) as info:
        parse_json_request(json.dumps(doc).encode(), ExportTraceServiceRequest)
    field = f"resourceSpans[0].scopeSpans[1].spans[3].{path}"
    assert info.value.message == f"{field}: {reason}"
    assert info.value.field == field and info.value.http_status == 400


def test_bad_link_and_log_ids() -> None:
    with pytest.raises(BadRequest, match=r"^resourceSpans\[0\]\.scopeSpans\[0\]\.spans\[0\]\.links\[1\]\.spanId: not hex$"):
        parse_json_request(spans_json({"links": [{}, {"spanId": "xyz0"}]}), ExportTraceServiceRequest)
    doc = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "0"}]}]}]}
    with pytest.raises(BadRequest, match=r"^resourceLogs\[0\]\.scopeLogs\[0\]\.logRecords\[0\]\.traceId: not hex$"):
        parse_json_request(json.dumps(doc).encode(), ExportLogsServiceRequest)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "invalid JSON: Expecting value at line 1 column 1"),
        (b"{", "invalid JSON"),
        (b'{"resourceSpans": [}', "invalid JSON"),
        (b"[]", "must be a JSON object, got an array"),
        (b"null", "must be a JSON object, got null"),
        (b'"x"', "must be a JSON object, got a string"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"a": "\xc3\x28"}', "not valid UTF-8"),
        # Refused by the container-density bound before the depth check is reached; either message is right.
        (b"[" * 100_000, "nested too deeply|JSON objects/arrays"),
        (b'{"a":' * 100_000, "nested too deeply|JSON objects/arrays"),
        (b'{"resourceSpans": ' + b"1" * 5000 + b"}", "invalid JSON"),  # int digit limit
        (b'{"resourceSpans": 5}', "resourceSpans"),
        (b'{"resourceSpans": [null]}', "null is not allowed"),
        (b'{"resourceSpans": [5]}', "invalid OTLP/JSON"),
        (spans_json({"name": 5}), "name"),
        (spans_json({"startTimeUnixNano": "soon"}), "startTimeUnixNano"),
        (spans_json({"startTimeUnixNano": "-1"}), "out of range"),
        (spans_json({"startTimeUnixNano": "18446744073709551616"}), "out of range"),
        (spans_json({"flags": 1.5}), "flags"),
        (spans_json({"status": 5}), "status"),
        (spans_json({"attributes": [{"key": "a", "value": {"stringValue": "x", "intValue": "1"}}]}), "oneof"),
        (spans_json({"attributes": [{"key": "a", "value": {"boolValue": "yes"}}]}), "boolValue"),
        (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"\\ud800"}]}]}]}', "Unpaired surrogate"),
    ],
)
def test_bad_input_is_bad_request(body: bytes, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_json_request(body, ExportTraceServiceRequest)
    assert re.search(needle, info.value.message)


def test_parse_error_gets_a_field_path() -> None:
    with pytest.raises(BadRequest) as info:
        parse_json_request(spans_json({}, {"attributes": [{"key": "a", "value": {"doubleValue": "abc"}}]}), ExportTraceServiceRequest)
    assert info.value.field == "resourceSpans[0].scopeSpans[0].spans[1].attributes[0].value.doubleValue"
    assert info.value.message.startswith("invalid OTLP/JSON: resourceSpans[0].scopeSpans[0].spans[1]")


def test_huge_bad_value_gives_bounded_message() -> None:
    with pytest.raises(BadRequest) as info:
        parse_json_request(json.dumps({"resourceSpans": {"x": "y" * 100_000}}).encode(), ExportTraceServiceRequest)
    assert len(info.value.message) < 2000


# --- nesting depth: parity with the binary decoder ------------------------------------------------------------


def nested(levels: int, kind: str) -> dict:
    value: dict = {"stringValue": "leaf"}
    for _ in range(levels):
        if kind == "kvlist":
            value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
        else:
            value = {"arrayValue": {"values": [value]}}
    return value


@pytest.mark.parametrize(("kind", "deepest_ok"), [("kvlist", 31), ("array", 47)])
def test_anyvalue_nesting_limit_matches_binary_decoder(kind: str, deepest_ok: int) -> None:
    ok = parse_json_request(spans_json({"attributes": [{"key": "a", "value": nested(deepest_ok, kind)}]}), ExportTraceServiceRequest)
    # Whatever JSON accepts must still decode after re-encoding as protobuf (upb's limit is 100 messages).
    assert ExportTraceServiceRequest.FromString(ok.SerializeToString()) == ok
    with pytest.raises(BadRequest, match=f"nested deeper than {MAX_MESSAGE_DEPTH} messages"):
        parse_json_request(spans_json({"attributes": [{"key": "a", "value": nested(deepest_ok + 1, kind)}]}), ExportTraceServiceRequest)


def test_very_deep_anyvalue_is_bad_request() -> None:
    # Built as text: json.dumps would itself hit the recursion limit.
    prefix = '{"resourceSpans":[{"scopeSpans":[{"spans":[{"attributes":[{"key":"a","value":'
    text = prefix + '{"arrayValue":{"values":[' * 2000 + '{"intValue":1}' + "]}}" * 2000 + "}]}]}]}]}"
    with pytest.raises(BadRequest, match="nested|JSON objects/arrays"):
        parse_json_request(text.encode(), ExportTraceServiceRequest)


def test_dense_json_is_refused_before_it_is_decoded() -> None:
    body = b'{"x":[' + b"{}," * 400_000 + b"{}]}"  # 1.2 MB that json.loads would turn into 400k dicts
    with pytest.raises(BadRequest, match="holds 400003 JSON objects/arrays"):
        parse_json_request(body, ExportTraceServiceRequest)


# --- output ---------------------------------------------------------------------------------------------------


def test_message_to_json_is_spec_json() -> None:
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=TRACE_ID, span_id=SPAN_ID, kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=1544712660000000000
    )
    span.links.add(trace_id=TRACE_ID, span_id=SPAN_ID)
    out = message_to_json(req)
    assert b" " not in out
    doc = json.loads(out)
    span_doc = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span_doc == {
        "traceId": TRACE_ID.hex(),
        "spanId": SPAN_ID.hex(),
        "kind": 2,  # enums MUST be integers
        "startTimeUnixNano": "1544712660000000000",  # 64-bit as decimal string
        "links": [{"traceId": TRACE_ID.hex(), "spanId": SPAN_ID.hex()}],
    }


def test_message_to_json_for_responses() -> None:
    assert message_to_json(ExportTraceServiceResponse()) == b"{}"
    resp = ExportTraceServiceResponse()
    resp.partial_success.rejected_spans = 3
    resp.partial_success.error_message = "ü"
    assert json.loads(message_to_json(resp)) == {"partialSuccess": {"rejectedSpans": "3", "errorMessage": "ü"}}


# --- property tests -------------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=512) | st.text(max_size=256).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes_raise_only_bad_request(body: bytes) -> None:
    for message_type in (ExportTraceServiceRequest, ExportLogsServiceRequest):
        try:
            parse_json_request(body, message_type)
        except BadRequest:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
SPAN_KEYS = ["traceId", "spanId", "parentSpanId", "name", "kind", "startTimeUnixNano", "attributes", "links", "events", "status", "flags", "trace_id"]
VALUE_KEYS = ["stringValue", "intValue", "doubleValue", "boolValue", "bytesValue", "arrayValue", "kvlistValue", "values", "key", "value"]


def any_value_docs(depth: int = 6):
    leaf = st.fixed_dictionaries({}, optional={k: json_values for k in VALUE_KEYS[:5]})
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.builds(lambda vs: {"arrayValue": {"values": vs}}, st.lists(inner, max_size=3)),
            st.builds(lambda kvs: {"kvlistValue": {"values": [{"key": k, "value": v} for k, v in kvs]}}, st.lists(st.tuples(st.text(max_size=5), inner), max_size=3)),
        ),
        max_leaves=40,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    span=st.dictionaries(st.sampled_from(SPAN_KEYS), json_values, max_size=6),
    attr=any_value_docs(),
    junk=json_values,
)
def test_plausible_documents_raise_only_bad_request(span: dict, attr: dict, junk) -> None:
    span = dict(span)
    span.setdefault("attributes", [{"key": "a", "value": attr}])
    for doc in (
        {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]},
        {"resourceSpans": junk},
        {"resourceSpans": [{"scopeSpans": junk}]},
        {"resourceLogs": [{"scopeLogs": [{"logRecords": [dict(span, body=attr)]}]}]},
    ):
        body = json.dumps(doc, allow_nan=True).encode()
        for message_type in (ExportTraceServiceRequest, ExportLogsServiceRequest):
            try:
                msg = parse_json_request(body, message_type)
            except BadRequest:
                continue
            # Anything accepted is a valid message that survives the binary round trip.
            assert message_type.FromString(msg.SerializeToString()) == msg


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(0, 120), kind=st.sampled_from(["kvlist", "array"]))
def test_deep_anyvalues_raise_only_bad_request(depth: int, kind: str) -> None:
    for body in (
        spans_json({"attributes": [{"key": "a", "value": nested(depth, kind)}]}),
        json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": nested(depth, kind)}]}]}]}).encode(),
    ):
        for message_type in (ExportTraceServiceRequest, ExportLogsServiceRequest):
            try:
                msg = parse_json_request(body, message_type)
            except ReceiverError as exc:
                assert isinstance(exc, BadRequest)
                continue
            assert message_type.FromString(msg.SerializeToString()) == msg
