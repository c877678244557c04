"""OTLP protobuf -> canonical spans and log events: every AnyValue type, and models built without validation
(``normalizers.canonical.trusted``) that are indistinguishable from validated ones."""

from __future__ import annotations

import base64

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status, TracesData

from normalizers.canonical import (
    CanonicalLogEvent, CanonicalSpan, Scope, SpanEvent, SpanLink, any_value, attributes, log_events_from_logs_data,
    spans_from_traces_data)

TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


def _set(kv: KeyValue, key: str, value) -> None:
    kv.key = key
    _any(kv.value, value)


def _any(v: AnyValue, value) -> None:
    if isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int):
        v.int_value = value
    elif isinstance(value, float):
        v.double_value = value
    elif isinstance(value, bytes):
        v.bytes_value = value
    elif isinstance(value, str):
        v.string_value = value
    elif isinstance(value, list):
        v.array_value.SetInParent()
        for x in value:
            _any(v.array_value.values.add(), x)
    elif isinstance(value, dict):
        v.kvlist_value.SetInParent()
        for k, x in value.items():
            _set(v.kvlist_value.values.add(), k, x)


ATTRS = {"s": "text", "empty": "", "i": -7, "zero": 0, "big": 2**62, "f": 0.25, "b": True, "no": False,
         "raw": b"\x00\xff", "list": ["a", 1, [2.5, None], {"k": "v"}], "map": {"x": {"y": [True]}, "e": {}},
         "empty_list": []}


def _add_attrs(repeated, attrs: dict) -> None:
    for k, v in attrs.items():
        _set(repeated.add(), k, v)


def _traces() -> TracesData:
    data = TracesData()
    for r in range(2):
        rs = data.resource_spans.add()
        _add_attrs(rs.resource.attributes, {"service.name": f"svc-{r}", "n": r})
        for sc in range(2):
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = f"scope-{sc}", "1.0"
            _add_attrs(ss.scope.attributes, {"scope.attr": sc})
            for i in range(3):
                sp = ss.spans.add()
                sp.trace_id = TRACE
                sp.span_id = bytes([r, sc, i, 0, 0, 0, 0, 1])
                if i:
                    sp.parent_span_id = bytes([r, sc, 0, 0, 0, 0, 0, 1])
                sp.name = f"op {i}"
                sp.flags = (0x01, 0x301, 0x101)[i]  # sampled; remote parent; local parent
                sp.kind = (Span.SPAN_KIND_CLIENT, Span.SPAN_KIND_INTERNAL, Span.SPAN_KIND_UNSPECIFIED)[i]
                sp.start_time_unix_nano, sp.end_time_unix_nano = 1_700_000_000_000_000_000 + i, 0 if i == 2 else 2**63
                if i == 1:
                    sp.status.code, sp.status.message = Status.STATUS_CODE_ERROR, "boom"
                _add_attrs(sp.attributes, ATTRS if i == 0 else {"only": i})
                _set(sp.attributes.add(), "only", "repeated key: last wins")
                ev = sp.events.add()
                ev.name, ev.time_unix_nano = "exception", 5
                _add_attrs(ev.attributes, {"exception.type": "ValueError"})
                sp.events.add().name = "bare"
                lk = sp.links.add()
                lk.trace_id, lk.span_id = TRACE, b"\x01" * 8
                _add_attrs(lk.attributes, {"link": [1, 2]})
    # A span without ids, times or attributes, in a resource and scope without attributes.
    data.resource_spans.add().scope_spans.add().spans.add()
    return data


def _logs() -> LogsData:
    data = LogsData()
    rl = data.resource_logs.add()
    _add_attrs(rl.resource.attributes, {"service.name": "svc"})
    sl = rl.scope_logs.add()
    sl.scope.name = "logs"
    for i, body in enumerate(["text", {"content": "hi", "role": "user"}, None, [1, "x"]]):
        rec = sl.log_records.add()
        rec.trace_id, rec.span_id = (TRACE, b"\x02" * 8) if i % 2 else (b"", b"")
        rec.time_unix_nano, rec.observed_time_unix_nano = i, 10 + i
        rec.severity_number, rec.severity_text = i, "INFO" if i else ""
        if i == 0:
            rec.event_name = "gen_ai.user.message"
        _add_attrs(rec.attributes, {"event.name": "gen_ai.choice", "i": i})
        if body is not None:
            _any(rec.body, body)
    sl.log_records.add()  # all defaults
    return data


def _validated_span(sp, resource: dict, scope: Scope) -> CanonicalSpan:
    """The same span as ``spans_from_traces_data`` builds it, but through pydantic validation."""
    return CanonicalSpan(
        trace_id=sp.trace_id.hex(), span_id=sp.span_id.hex(), parent_span_id=sp.parent_span_id.hex(),
        parent_is_remote=None if not sp.flags & 0x100 else bool(sp.flags & 0x200), name=sp.name,
        kind={1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}.get(sp.kind, "UNSPECIFIED"),
        start_time_unix_nano=sp.start_time_unix_nano, end_time_unix_nano=sp.end_time_unix_nano,
        status_code={1: "OK", 2: "ERROR"}.get(sp.status.code, "UNSET"), status_message=sp.status.message,
        attributes={kv.key: any_value(kv.value) for kv in sp.attributes},
        events=[SpanEvent(name=e.name, time_unix_nano=e.time_unix_nano,
                          attributes={kv.key: any_value(kv.value) for kv in e.attributes}) for e in sp.events],
        links=[SpanLink(trace_id=lk.trace_id.hex(), span_id=lk.span_id.hex(),
                        attributes={kv.key: any_value(kv.value) for kv in lk.attributes}) for lk in sp.links],
        resource=resource, scope=scope)


def _same_model(a, b) -> None:
    """``a`` and ``b`` are equal models in every observable way: type, values, field order, fields set, extras."""
    assert type(a) is type(b)
    assert a == b
    assert list(a.__dict__) == list(b.__dict__)
    assert a.model_fields_set == b.model_fields_set
    assert a.__pydantic_extra__ == b.__pydantic_extra__ and a.__pydantic_private__ == b.__pydantic_private__
    assert a.model_dump_json() == b.model_dump_json()
    assert repr(a.model_dump()) == repr(b.model_dump())
    for name, value in a.__dict__.items():
        other = b.__dict__[name]
        if hasattr(value, "model_fields_set"):
            _same_model(value, other)
        elif isinstance(value, list) and value and hasattr(value[0], "model_fields_set"):
            for x, y in zip(value, other, strict=True):
                _same_model(x, y)


def test_any_value_covers_every_type():
    assert attributes(_traces().resource_spans[0].scope_spans[0].spans[0].attributes) == {
        **ATTRS, "raw": base64.b64encode(b"\x00\xff").decode(), "only": "repeated key: last wins"}
    assert any_value(AnyValue()) is None


def test_spans_match_validated_models_field_by_field():
    data = _traces()
    got = spans_from_traces_data(data.SerializeToString())
    assert got == spans_from_traces_data(data)
    expected = []
    for rs in data.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            scope = Scope(name=ss.scope.name, version=ss.scope.version,
                          attributes={kv.key: any_value(kv.value) for kv in ss.scope.attributes})
            expected.extend(_validated_span(sp, resource, scope) for sp in ss.spans)
    assert len(got) == len(expected) == 13
    for a, b in zip(got, expected):
        _same_model(a, b)
        assert CanonicalSpan.model_validate_json(a.model_dump_json()) == a  # valid as published
    assert got[-1].trace_id == got[-1].span_id == "" and got[-1].kind == "UNSPECIFIED"


def test_log_events_match_validated_models_field_by_field():
    data = _logs()
    got = log_events_from_logs_data(data.SerializeToString())
    rl = data.resource_logs[0]
    resource = {kv.key: any_value(kv.value) for kv in rl.resource.attributes}
    scope = Scope(name="logs", version="", attributes={})
    expected = []
    for rec in rl.scope_logs[0].log_records:
        attrs = {kv.key: any_value(kv.value) for kv in rec.attributes}
        expected.append(CanonicalLogEvent(
            trace_id=rec.trace_id.hex(), span_id=rec.span_id.hex(), time_unix_nano=rec.time_unix_nano,
            observed_time_unix_nano=rec.observed_time_unix_nano,
            event_name=rec.event_name or str(attrs.get("event.name", "")), severity_number=rec.severity_number,
            severity_text=rec.severity_text, body=any_value(rec.body), attributes=attrs, resource=resource,
            scope=scope))
    assert len(got) == 5
    for a, b in zip(got, expected):
        _same_model(a, b)
    assert [e.event_name for e in got] == ["gen_ai.user.message", "gen_ai.choice", "gen_ai.choice", "gen_ai.choice",
                                           ""]


@pytest.mark.parametrize("model", [CanonicalSpan, SpanEvent, SpanLink, Scope, CanonicalLogEvent])
def test_unvalidated_models_stay_ordinary_pydantic_models(model):
    # What the rest of the code does with canonical models: copy with updates, assign, compare, round-trip.
    data = _traces()
    span = spans_from_traces_data(data)[0]
    item = {CanonicalSpan: span, SpanEvent: span.events[0], SpanLink: span.links[0], Scope: span.scope,
            CanonicalLogEvent: log_events_from_logs_data(_logs())[1]}[model]
    copy = item.model_copy(update={"attributes": {"new": 1}})
    assert copy.attributes == {"new": 1} and item.attributes != {"new": 1}
    assert copy.model_fields_set == item.model_fields_set
    assert model.model_validate_json(item.model_dump_json()) == item


def test_parent_is_remote_follows_the_otlp_span_flags():
    from normalizers.canonical import parent_is_remote

    assert parent_is_remote(0) is None and parent_is_remote(0x01) is None  # exporter did not say
    assert parent_is_remote(0x200) is None  # IS_REMOTE without HAS_IS_REMOTE means nothing
    assert parent_is_remote(0x100) is False and parent_is_remote(0x101) is False
    assert parent_is_remote(0x300) is True and parent_is_remote(0x301) is True
    spans = spans_from_traces_data(_traces())
    local_roots = [s for s in spans if s.is_local_root]
    assert local_roots and all(s.parent_span_id and s.parent_is_remote for s in local_roots)
    assert all(s.is_run_root for s in local_roots) and not any(s.is_root for s in local_roots)
