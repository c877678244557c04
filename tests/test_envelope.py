"""The upload envelope model: JSON round trip, the committed JSON Schema, the idempotency key, validation errors."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from normalizers.agent_run import AgentRun, LlmCall, Usage
from normalizers.canonical import CanonicalLogEvent, CanonicalSpan, Scope, SpanEvent
from normalizers.envelope import (
    SCHEMA_PATH, SCHEMA_VERSION, Completeness, Envelope, RedactionReport, Source, envelope_idempotency_key,
    envelope_json_schema, main, repository_from, schema_file_text)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = 1_700_000_000_000_000_000  # unix ns, above 2**53 on purpose


def span(span_id: str, end: int = T0 + 5, status: str = "UNSET", parent: str = "", trace_id: str = TRACE,
         **kw) -> CanonicalSpan:
    return CanonicalSpan(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=f"op {span_id}",
                         start_time_unix_nano=T0, end_time_unix_nano=end, status_code=status, **kw)


def envelope(spans: list[CanonicalSpan], **kw) -> Envelope:
    fields = dict(
        idempotency_key=envelope_idempotency_key(TRACE, spans), trace_id=TRACE,
        source=Source(id="default", kind="otlp-http"), received_at_unix_nano=T0, assembled_at_unix_nano=T0 + 10,
        completeness=Completeness(root_seen=True, closed_reason="root-ended-and-quiet"), spans=spans)
    fields.update(kw)
    return Envelope(**fields)


def full_envelope() -> Envelope:
    root = span("00f067aa0ba902b7", status="OK", attributes={
        "gen_ai.input.messages": '[{"role":"user","parts":[{"type":"text","content":"hi"}]}]',
        "gen_ai.usage.input_tokens": 12, "ratio": 0.5, "flags": [True, False], "nested": {"a": [1, {"b": None}]}},
        events=[SpanEvent(name="exception", time_unix_nano=T0 + 3, attributes={"exception.type": "ValueError"})],
        resource={"service.name": "agent"}, scope=Scope(name="openai", version="1.2"))
    child = span("b7ad6b7169203331", parent="00f067aa0ba902b7", status="ERROR", status_message="boom")
    log = CanonicalLogEvent(trace_id=TRACE, span_id="b7ad6b7169203331", time_unix_nano=T0 + 4,
                            event_name="gen_ai.choice", body={"message": {"content": "hello"}})
    return envelope(
        [root, child], envelope_version=2, repository="acme/support-agent", resource={"service.name": "agent"},
        log_events=[log], agent_run=AgentRun(dialects=["genai"], agent_name="support", task_input="hi",
                                             llm_calls=[LlmCall(span_id="b7ad6b7169203331", model="gpt-4o",
                                                                input_tokens=12)],
                                             usage=Usage(input_tokens=12, llm_call_count=1)),
        redaction=RedactionReport(masking_applied=True, masked={"openai-api-key": 2}, dropped_by_deny_list=1))


# -- JSON round trip and the committed schema --------------------------------------------------------------------------

def test_json_round_trip_keeps_every_field():
    env = full_envelope()
    data = env.to_json_bytes()
    assert isinstance(data, bytes)
    back = Envelope.from_json_bytes(data)
    assert back == env
    assert back.spans[0].end_time_unix_nano == T0 + 5  # no float rounding of large ns values
    raw = json.loads(data)
    assert raw["schema_version"] == SCHEMA_VERSION == "trace-source.envelope/v1"
    assert raw["spans"][0]["attributes"]["nested"] == {"a": [1, {"b": None}]}


def test_defaults_of_a_minimal_envelope():
    env = envelope([span("00f067aa0ba902b7")])
    assert env.envelope_version == 1
    assert env.repository is None
    assert env.agent_run == AgentRun()
    assert env.redaction == RedactionReport(masking_applied=False, masked={}, dropped_by_allow_list=0,
                                            dropped_by_deny_list=0)
    assert Envelope.from_json_bytes(env.to_json_bytes().decode()) == env  # str input accepted too


def test_committed_schema_file_is_up_to_date():
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_file_text(), (
        "normalizers/schema/envelope.v1.schema.json is stale: run `python -m normalizers.envelope --write-schema`"
        " (and check docs/envelope.md 'Versioning' for whether the change needs a new schema version)")


def test_schema_describes_the_model():
    schema = envelope_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["schema_version"]["const"] == SCHEMA_VERSION
    assert props["trace_id"]["pattern"] == "^[0-9a-f]{32}$"
    assert set(schema["required"]) == {"idempotency_key", "trace_id", "source", "received_at_unix_nano",
                                       "assembled_at_unix_nano", "completeness"}
    reasons = schema["$defs"]["Completeness"]["properties"]["closed_reason"]["enum"]
    assert reasons == ["root-ended-and-quiet", "quiet", "max-wait", "evicted"]
    # every top-level field is documented in the schema and in docs/envelope.md
    doc = (SCHEMA_PATH.parents[2] / "docs" / "envelope.md").read_text(encoding="utf-8")
    for name, prop in props.items():
        assert "description" in prop or "$ref" in prop, name
        assert f"`{name}`" in doc, f"docs/envelope.md does not document {name}"


def test_envelope_json_validates_against_the_published_schema():
    import jsonschema
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(json.loads(full_envelope().to_json_bytes()))
    bad = json.loads(full_envelope().to_json_bytes())
    bad["completeness"]["closed_reason"] = "shutdown"
    assert not validator.is_valid(bad)


def test_write_schema_command(tmp_path, capsys):
    target = tmp_path / "out" / "schema.json"
    assert main(["--write-schema", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == schema_file_text()
    assert main(["--bogus"]) == 2
    assert "usage" in capsys.readouterr().err


# -- idempotency key ---------------------------------------------------------------------------------------------------

def test_key_matches_the_documented_byte_layout():
    spans = [span("b7ad6b7169203331", end=T0 + 20, status="ERROR"), span("00f067aa0ba902b7", end=T0, status="OK")]
    layout = (f"{TRACE}\n00f067aa0ba902b7 {T0} OK\nb7ad6b7169203331 {T0 + 20} ERROR\n").encode()
    assert envelope_idempotency_key(TRACE, spans) == hashlib.sha256(layout).hexdigest()


def test_key_test_vector_from_the_docs():
    spans = [span("00f067aa0ba902b7", end=1700000000000000000, status="OK")]
    assert envelope_idempotency_key("4bf92f3577b34da6a3ce929d0e0e4736", spans) == (
        "bcd67bbeb144d6a6782dbfad369bd7708243b5a20e9d868074e4e100ca99bacc")
    assert envelope_idempotency_key(TRACE, []) == hashlib.sha256(f"{TRACE}\n".encode()).hexdigest()


def test_key_ignores_span_order_duplicates_and_redactable_content():
    a, b, c = span("00f067aa0ba902b7"), span("b7ad6b7169203331"), span("0000000000000001")
    key = envelope_idempotency_key(TRACE, [a, b, c])
    assert envelope_idempotency_key(TRACE, [c, a, b]) == key
    assert envelope_idempotency_key(TRACE, [a, b, b, c, a]) == key
    changed = a.model_copy(update={"name": "renamed", "attributes": {"k": "[REDACTED:password]"},
                                   "status_message": "masked"})
    assert envelope_idempotency_key(TRACE, [changed, b, c]) == key


@pytest.mark.parametrize("change", [
    {"end_time_unix_nano": T0 + 6},
    {"status_code": "ERROR"},
    {"span_id": "00f067aa0ba902b8"},
])
def test_key_changes_with_end_time_status_or_span_id(change):
    a, b = span("00f067aa0ba902b7"), span("b7ad6b7169203331")
    key = envelope_idempotency_key(TRACE, [a, b])
    assert envelope_idempotency_key(TRACE, [a.model_copy(update=change), b]) != key


def test_key_changes_with_an_added_span_and_with_the_trace_id():
    a = span("00f067aa0ba902b7")
    assert envelope_idempotency_key(TRACE, [a]) != envelope_idempotency_key(TRACE, [a, span("b7ad6b7169203331")])
    assert envelope_idempotency_key(TRACE, [a]) != envelope_idempotency_key("0" * 32, [a])


def test_end_times_sort_numerically_not_as_text():
    # "9..." > "10..." as text; the documented layout sorts numbers numerically.
    spans = [span("00f067aa0ba902b7", end=10), span("00f067aa0ba902b7", end=9)]
    layout = f"{TRACE}\n00f067aa0ba902b7 9 UNSET\n00f067aa0ba902b7 10 UNSET\n".encode()
    assert envelope_idempotency_key(TRACE, spans) == hashlib.sha256(layout).hexdigest()


@pytest.mark.parametrize("trace_id", [TRACE.upper(), TRACE[:-1], "", "x" * 32])
def test_key_rejects_a_non_canonical_trace_id(trace_id):
    with pytest.raises(ValueError, match="32 lowercase hex"):
        envelope_idempotency_key(trace_id, [])


# -- validation errors -------------------------------------------------------------------------------------------------

def _bad(**change) -> str:
    raw = json.loads(full_envelope().to_json_bytes())
    for path, value in change.items():
        node = raw
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[leaf] = value
    with pytest.raises(ValidationError) as exc:
        Envelope.from_json_bytes(json.dumps(raw).encode())
    return str(exc.value)


@pytest.mark.parametrize("change, fragment", [
    ({"schema_version": "trace-source.envelope/v2"}, "schema_version"),
    ({"trace_id": TRACE.upper()}, "trace_id"),
    ({"idempotency_key": "abc"}, "idempotency_key"),
    ({"envelope_version": 0}, "envelope_version"),
    ({"received_at_unix_nano": -1}, "received_at_unix_nano"),
    ({"source__kind": "OTLP HTTP"}, "source.kind"),
    ({"source__id": ""}, "source.id"),
    ({"repository": "https://github.com/acme/agent"}, "repository"),
    ({"completeness__closed_reason": "shutdown"}, "completeness.closed_reason"),
    ({"unexpected": 1}, "unexpected"),
    ({"completeness__extra": True}, "completeness.extra"),
    ({"redaction__dropped_by_allow_list": -2}, "redaction.dropped_by_allow_list"),
])
def test_invalid_fields_are_rejected_by_name(change, fragment):
    assert fragment in _bad(**change)


def test_a_key_that_does_not_match_the_spans_is_rejected():
    message = _bad(idempotency_key="0" * 64)
    assert "does not match" in message and envelope_idempotency_key(TRACE, full_envelope().spans) in message
    # a span whose end time changed after the key was computed is caught the same way
    assert "does not match" in _bad(spans__1__end_time_unix_nano=T0 + 99)


def test_spans_of_another_trace_and_duplicate_span_ids_are_rejected():
    other = span("00f067aa0ba902b7", trace_id="0" * 32)
    with pytest.raises(ValidationError, match="belongs to trace"):
        envelope([other], idempotency_key=envelope_idempotency_key(TRACE, [other]))
    dup = [span("00f067aa0ba902b7"), span("00f067aa0ba902b7", end=T0 + 9)]
    with pytest.raises(ValidationError, match="duplicate span id"):
        envelope(dup)


def test_log_events_must_share_the_trace_id_or_have_none():
    spans = [span("00f067aa0ba902b7")]
    ok = envelope(spans, log_events=[CanonicalLogEvent(event_name="claude_code.api_request"),
                                     CanonicalLogEvent(trace_id=TRACE)])
    assert len(ok.log_events) == 2
    with pytest.raises(ValidationError, match="log event belongs to trace"):
        envelope(spans, log_events=[CanonicalLogEvent(trace_id="0" * 32)])


def test_malformed_json_is_a_validation_error():
    with pytest.raises(ValidationError):
        Envelope.from_json_bytes(b"{not json")


# -- repository --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("configured, resource, expected", [
    ("acme/configured", {"vcs.repository.url.full": "https://github.com/acme/agent"}, "acme/configured"),
    (None, {"vcs.repository.url.full": "https://github.com/acme/agent"}, "acme/agent"),
    (None, {"vcs.repository.url.full": "https://github.com/acme/agent.git/"}, "acme/agent"),
    (None, {"vcs.repository.url.full": "git@github.com:acme/agent.git"}, "acme/agent"),
    (None, {"vcs.repository.url.full": "ssh://git@gitlab.example.com/group/sub/agent.git"}, "group/sub/agent"),
    # A port is part of the host, not of the path (self-hosted forges often listen on one).
    (None, {"vcs.repository.url.full": "http://127.0.0.1:3000/acme/agent.git"}, "acme/agent"),
    (None, {"vcs.repository.url.full": "ssh://git@git.example.com:2222/acme/agent.git"}, "acme/agent"),
    (None, {"vcs.repository.url.full": "https://user:pw@git.example.com:8443/acme/agent"}, "acme/agent"),
    (None, {"vcs.owner.name": "acme", "vcs.repository.name": "agent"}, "acme/agent"),
    (None, {"vcs.repository.url.full": "https://github.com/"}, None),
    (None, {"vcs.repository.url.full": 42}, None),
    (None, {"vcs.repository.name": "agent"}, None),
    (None, {}, None),
])
def test_repository_from_configuration_or_resource(configured, resource, expected):
    assert repository_from(configured, resource) == expected


def test_resolved_repositories_validate():
    repo = repository_from(None, {"vcs.repository.url.full": "git@github.com:acme/agent.git"})
    assert envelope([span("00f067aa0ba902b7")], repository=repo).repository == "acme/agent"


def test_the_example_in_the_docs_is_a_valid_envelope():
    doc = (SCHEMA_PATH.parents[2] / "docs" / "envelope.md").read_text(encoding="utf-8")
    example = doc.split("## Example", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    env = Envelope.from_json_bytes(example.encode())
    assert env.repository == repository_from(None, env.resource)
    assert env.redaction.masked == {"openai-api-key": 1}


# -- byte-for-byte regression over the whole envelope build -----------------------------------------------------------
# OTLP -> canonical -> redaction -> agent-run view -> Envelope JSON on generated GenAI traces (secrets, shared
# resources, events, links, tool calls joined from messages, log events, several redaction configs). The digests were
# taken before the envelope build was optimized for speed: optimizations must not change a byte. A deliberate
# change of the output updates them (print `_golden_digests()`). Deliberate changes so far: spans gained
# `parent_is_remote` and completeness `root_is_local` (local roots behind a propagated traceparent).

def _otlp_traces(seed: int) -> tuple[bytes, bytes]:
    """One trace as (TracesData bytes, LogsData bytes)."""
    import random

    from opentelemetry.proto.logs.v1.logs_pb2 import LogsData
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status, TracesData

    rng = random.Random(seed)
    words = ("the agent reads the file and plans a patch then calls a tool to run pytest and answers the user "
             "Password: hunter2 token=abc key sk-proj-Ab3dEf7hIjAb3dEf7hIjAb3dEf7hIj "
             "Bearer mF_9.B5f-4.1JqMabcdefghij0123 AKIAIOSFODNN7EXAMPLE postgres://app:s3cr3t@db/x "
             "https://x.io/?sig=abcdef é ✓ \u017fecret=abcdefgh1").split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    def put(target, key, value):
        kv = target.add()
        kv.key = key
        if isinstance(value, bool):
            kv.value.bool_value = value
        elif isinstance(value, int):
            kv.value.int_value = value
        elif isinstance(value, float):
            kv.value.double_value = value
        elif isinstance(value, list):
            for x in value:
                kv.value.array_value.values.add().string_value = x
        else:
            kv.value.string_value = value

    trace_id = rng.randbytes(16)
    traces, logs = TracesData(), LogsData()
    rs = traces.resource_spans.add()
    put(rs.resource.attributes, "service.name", "support-agent")
    put(rs.resource.attributes, "deployment.api_key", "resource-secret-value")
    put(rs.resource.attributes, "vcs.repository.url.full", "https://github.com/acme/agent.git")
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = "opentelemetry.instrumentation.openai_v2", "2.1b0"
    put(ss.scope.attributes, "scope.secret", "x")
    root = rng.randbytes(8)
    t0 = 1_763_700_000_000_000_000
    for i in range(rng.randint(3, 12)):
        sp = ss.spans.add()
        sp.trace_id, sp.span_id = trace_id, root if i == 0 else rng.randbytes(8)
        sp.start_time_unix_nano = t0 + i * 1_000_000
        sp.end_time_unix_nano = sp.start_time_unix_nano + rng.randint(1, 4000) * 1_000_000
        if i == 0:
            sp.name = "invoke_agent support-agent"
            put(sp.attributes, "gen_ai.operation.name", "invoke_agent")
            put(sp.attributes, "gen_ai.agent.name", "support-agent")
            put(sp.attributes, "gen_ai.conversation.id", f"conv-{seed}")
            if rng.random() < 0.5:
                sp.status.code = Status.STATUS_CODE_ERROR
                sp.status.message = "failed: " + text(3)
            continue
        sp.parent_span_id = root
        call_id = f"call_{i}"
        if i % 3 == 0:
            sp.name = "execute_tool run_tests"
            put(sp.attributes, "gen_ai.operation.name", "execute_tool")
            put(sp.attributes, "gen_ai.tool.name", "run_tests")
            put(sp.attributes, "gen_ai.tool.call.id", call_id)
            put(sp.attributes, "gen_ai.tool.call.arguments", json.dumps({"path": "tests/", "password": text(2)}))
            put(sp.attributes, "gen_ai.tool.call.result", text(12))
            if rng.random() < 0.3:
                ev = sp.events.add()
                ev.name, ev.time_unix_nano = "exception", sp.start_time_unix_nano + 1
                put(ev.attributes, "exception.type", "RuntimeError")
                put(ev.attributes, "exception.message", text(4))
                sp.status.code = Status.STATUS_CODE_ERROR
            continue
        sp.name, sp.kind = "chat gpt-4o-mini", Span.SPAN_KIND_CLIENT
        put(sp.attributes, "gen_ai.operation.name", "chat")
        put(sp.attributes, "gen_ai.provider.name", "openai")
        put(sp.attributes, "gen_ai.request.model", "gpt-4o-mini")
        put(sp.attributes, "gen_ai.usage.input_tokens", rng.randint(1, 4000))
        put(sp.attributes, "gen_ai.usage.output_tokens", rng.randint(1, 800))
        put(sp.attributes, "gen_ai.request.temperature", 0.2)
        put(sp.attributes, "gen_ai.response.finish_reasons", ["tool_calls" if i % 3 == 2 else "stop"])
        put(sp.attributes, "http.request.header.authorization", "Basic abc")
        put(sp.attributes, "gen_ai.input.messages", json.dumps(
            [{"role": "system", "parts": [{"type": "text", "content": text(5)}]},
             {"role": "user", "parts": [{"type": "text", "content": text(30)}]}], ensure_ascii=rng.random() < 0.5))
        out = [{"type": "text", "content": text(20)}]
        if i % 3 == 2:
            out.append({"type": "tool_call", "id": f"call_{i + 1}", "name": "run_tests",
                        "arguments": json.dumps({"path": "tests/"})})
        put(sp.attributes, "gen_ai.output.messages", json.dumps(
            [{"role": "assistant", "parts": out, "finish_reason": "stop"}]))
        if rng.random() < 0.3:
            lk = sp.links.add()
            lk.trace_id, lk.span_id = rng.randbytes(16), rng.randbytes(8)
            put(lk.attributes, "client_secret", "zzzzzzzz")
        if rng.random() < 0.5:
            rl = logs.resource_logs.add() if not logs.resource_logs else logs.resource_logs[0]
            sl = rl.scope_logs.add() if not rl.scope_logs else rl.scope_logs[0]
            rec = sl.log_records.add()
            rec.trace_id, rec.span_id, rec.time_unix_nano = trace_id, sp.span_id, sp.end_time_unix_nano
            rec.event_name = "gen_ai.choice"
            rec.body.kvlist_value.values.add(key="finish_reason").value.string_value = "stop"
            msg = rec.body.kvlist_value.values.add(key="message").value.kvlist_value
            msg.values.add(key="content").value.string_value = text(6)
    return traces.SerializeToString(), logs.SerializeToString()


def _golden_envelope(seed: int) -> bytes:
    from normalizers.agent_run import build_agent_run
    from normalizers.canonical import log_events_from_logs_data, spans_from_traces_data
    from normalizers.redact import RedactionConfig, Redactor

    configs = [RedactionConfig(), RedactionConfig(disabled_rules=frozenset({"jwt", "secret-attribute", "password"})),
               RedactionConfig(allow_attributes=("gen_ai.*", "service.*")),
               RedactionConfig(deny_attributes=("gen_ai.input.*", "*.authorization")),
               RedactionConfig(mask_secrets=False)]
    traces, logs = _otlp_traces(seed)
    spans = sorted(spans_from_traces_data(traces), key=lambda s: (s.start_time_unix_nano, s.span_id))
    events = log_events_from_logs_data(logs)
    redacted = Redactor(configs[seed % len(configs)]).redact(spans, events)
    trace_id = spans[0].trace_id
    resource = dict(redacted.spans[0].resource)
    return Envelope(
        idempotency_key=envelope_idempotency_key(trace_id, redacted.spans), trace_id=trace_id,
        source=Source(id="bench", kind="otlp-grpc"), repository=repository_from(None, resource),
        received_at_unix_nano=T0, assembled_at_unix_nano=T0 + 1,
        completeness=Completeness(root_seen=True, closed_reason="root-ended-and-quiet"), resource=resource,
        spans=redacted.spans, log_events=redacted.log_events,
        agent_run=build_agent_run(redacted.spans, redacted.log_events), redaction=redacted.report).to_json_bytes()


def _golden_digests() -> str:
    return hashlib.sha256(b"".join(hashlib.sha256(_golden_envelope(s)).digest() for s in range(40))).hexdigest()


def test_envelope_bytes_are_unchanged_on_generated_traces():
    sample = json.loads(_golden_envelope(3))
    assert sample["redaction"]["masked"] and sample["agent_run"]["llm_calls"] and sample["log_events"]
    assert _golden_digests() == GOLDEN_DIGEST


GOLDEN_DIGEST = "f606b3c8ed67ffd73d4cd1ad832bc89b26c9a3d52dfa59b7cb6054d8c07ad669"


def test_key_of_a_log_only_trace_covers_its_log_events_and_span_keys_ignore_logs():
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    first = CanonicalLogEvent(time_unix_nano=1, event_name="claude_code.user_prompt")
    later = CanonicalLogEvent(time_unix_nano=2, event_name="claude_code.api_request")
    one = envelope_idempotency_key(trace_id, [], [first])
    assert one == envelope_idempotency_key(trace_id, [], [first, first])  # a duplicate event changes nothing
    assert envelope_idempotency_key(trace_id, [], [first, later]) not in (one, envelope_idempotency_key(trace_id, []))
    expected = hashlib.sha256(f"{trace_id}\nlog  1 0 0 claude_code.user_prompt\n".encode()).hexdigest()
    assert one == expected
    span = CanonicalSpan(trace_id=trace_id, span_id="00f067aa0ba902b7", name="s", end_time_unix_nano=5)
    assert envelope_idempotency_key(trace_id, [span], [first]) == envelope_idempotency_key(trace_id, [span])


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats()
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    | st.tuples(inner, inner), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(attrs=st.dictionaries(st.text(max_size=8), _json_values, max_size=5), extra=_json_values)
def test_envelope_json_is_what_pydantic_writes(attrs, extra):
    env = full_envelope()
    env.spans[0].attributes.update(attrs)
    env.agent_run.llm_calls.append(LlmCall(span_id="x", output_messages=[
        {"role": "assistant", "parts": [{"type": "uri", "uri": "https://example.com/ü", "modality": extra}]}]))
    assert env.to_json_bytes() == env.model_dump_json().encode()


@pytest.mark.parametrize("odd", [2**64, {1: "non-string key"}, {"set"}, b"bytes", "lone \ud800 surrogate"])
def test_values_orjson_does_not_write_like_pydantic_fall_back_to_pydantic(odd):
    env = full_envelope()
    env.spans[0].attributes["odd"] = odd
    try:
        expected = env.model_dump_json().encode()
    except Exception as exc:  # noqa: BLE001 - then to_json_bytes must fail the same way
        with pytest.raises(type(exc)):
            env.to_json_bytes()
    else:
        assert env.to_json_bytes() == expected
