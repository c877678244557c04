"""Log records without a trace id but with ``prompt.id`` (Claude Code events, semconv §2.7): keyed by the synthetic
trace id of ``session.id`` + ``prompt.id`` in the receiver, assembled into one envelope per prompt.

Real parts only: the receiver's splitter on real protobuf requests, the assembler core with a fake clock, the real
envelope builder and Claude Code dialect reader. The end-to-end path (OTel SDK -> ``trace-source serve`` -> trace
files) is ``test_claude_code_logs_embedded.py``.
"""

from __future__ import annotations

import hashlib

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, LogsData, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from normalizers.canonical import attributes as decode_attributes
from normalizers.envelope import Envelope
from normalizers.redact import Redactor
from pipeline.buffers import CLOSED_MAX_WAIT, CLOSED_PROMPT_QUIET, AssemblerCore, decode_record
from pipeline.bus import BusRecord
from pipeline.envelope_builder import build_envelope
from receiver.split import scan, split_logs
from sinks.base import prompt_trace_id, prompt_trace_id_of, prompt_trace_id_of_dict

T0 = 1_700_000_000_000_000_000
SESSION = "5a1f4c9e-0d7b-4a53-9a0e-3b8d2f6c1e11"
P1 = "0b6a2d1e-7c4f-4e8a-b1d3-9f2e5a7c6d01"
P2 = "7e3c9b5a-2f1d-4c6e-8a0b-1d4f7e9c2b02"
CC_SCOPE = "com.anthropic.claude_code.events"


def kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def cc_event(name: str, seq: int, prompt_id: str | None = P1, session: str | None = SESSION, trace_id: bytes = b"",
             **attrs) -> LogRecord:
    """A Claude Code event as Claude Code sends it: full name in the body, short name in ``event.name``."""
    common = {"event.name": name, "event.sequence": seq, "event.timestamp": "2023-11-14T22:13:20.000Z",
              "user.id": "u-1", "terminal.type": "vscode"}
    if session is not None:
        common["session.id"] = session
    if prompt_id is not None:
        common["prompt.id"] = prompt_id
    return LogRecord(time_unix_nano=T0 + seq * 3 * 10**9, observed_time_unix_nano=T0 + seq * 3 * 10**9 + 7,
                     trace_id=trace_id, body=AnyValue(string_value=f"claude_code.{name}"),
                     attributes=[kv(k, v) for k, v in {**common, **attrs}.items()])


def logs_request(*groups: list[LogRecord], scope: str = CC_SCOPE) -> ExportLogsServiceRequest:
    """One resource (service.name=claude-code); one scope per group of records."""
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource=Resource(attributes=[kv("service.name", "claude-code"), kv("service.version", "2.0.14")]),
        scope_logs=[ScopeLogs(scope=InstrumentationScope(name=scope, version="2.0.14"), log_records=g)
                    for g in groups])])


def split(req: ExportLogsServiceRequest):
    body = req.SerializeToString()
    return split_logs(ExportLogsServiceRequest.FromString(body), 1_000_000, scan(body)), body


def hexid(session: str, prompt: str) -> str:
    return prompt_trace_id(session, prompt).hex()


# -- the synthetic id --------------------------------------------------------------------------------------------------

def test_prompt_trace_id_is_the_documented_hash():
    expected = hashlib.sha256(b"claude-code-prompt:" + SESSION.encode() + b"\0" + P1.encode()).digest()[:16]
    assert prompt_trace_id(SESSION, P1) == expected and len(expected) == 16
    assert prompt_trace_id(SESSION, P1) != prompt_trace_id(SESSION, P2)
    # The separator keeps (session, prompt) pairs apart that concatenate alike.
    assert prompt_trace_id("ab", "c") != prompt_trace_id("a", "bc")
    assert prompt_trace_id("", P1) != prompt_trace_id(SESSION, P1)


def test_attribute_readers_agree_on_protobuf_and_decoded_attributes():
    cases = [
        [kv("session.id", SESSION), kv("prompt.id", P1)],
        [kv("prompt.id", P1)],  # OTEL_METRICS_INCLUDE_SESSION_ID=false: prompt.id alone still groups
        [kv("session.id", SESSION)],  # no prompt: not keyed
        [kv("session.id", SESSION), kv("prompt.id", "")],
        [kv("session.id", SESSION), kv("prompt.id", 42)],  # only string values count
        [kv("session.id", 7), kv("prompt.id", P1)],
        [kv("prompt.id", 42), kv("prompt.id", P2), kv("session.id", SESSION)],  # repeated key: the last wins
        [kv("prompt.id", P2), kv("prompt.id", 42)],
        [],
    ]
    got = [prompt_trace_id_of(c) for c in cases]
    assert got == [prompt_trace_id_of_dict(decode_attributes(c)) for c in cases]
    assert got == [prompt_trace_id(SESSION, P1), prompt_trace_id("", P1), None, None, None, prompt_trace_id("", P1),
                   prompt_trace_id(SESSION, P2), None, None]


# -- receiver: keying --------------------------------------------------------------------------------------------------

def test_untraced_records_are_keyed_by_prompt_and_kept_unchanged():
    traced_tid = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
    first = [cc_event("user_prompt", 1, prompt="Fix it"), cc_event("api_request", 2, P1, input_tokens=10),
             cc_event("user_prompt", 3, P2, prompt="Again"), cc_event("auth", 4, prompt_id=None),
             cc_event("api_request", 5, P1, trace_id=traced_tid)]
    second = [cc_event("tool_result", 6, P2, tool_name="Bash", success="true"),
              cc_event("api_error", 7, P1, trace_id=bytes(16), status_code="529", error="Overloaded")]
    req = logs_request(first, second)
    result, _ = split(req)
    assert (result.accepted, result.rejected) == (7, 0)
    by_key: dict = {}
    for rec in result.records:
        data = LogsData.FromString(rec.value)
        assert rec.signal == "logs" and rec.item_count == sum(
            len(sl.log_records) for rl in data.resource_logs for sl in rl.scope_logs)
        for rl in data.resource_logs:
            assert rl.resource == req.resource_logs[0].resource
            for sl in rl.scope_logs:
                assert sl.scope.name == CC_SCOPE
                by_key.setdefault(rec.key, []).extend(sl.log_records)
    k1, k2 = hexid(SESSION, P1).encode(), hexid(SESSION, P2).encode()
    seqs = {k: [decode_attributes(lr.attributes)["event.sequence"] for lr in v] for k, v in by_key.items()}
    # A record with its own trace id stays under it even with a prompt.id (the real trace wins); an all-zero
    # trace id means "no trace" (OTLP) and is keyed by prompt; a record without prompt.id keeps the null key.
    assert seqs == {k1: [1, 2, 7], k2: [3, 6], None: [4], traced_tid.hex().encode(): [5]}
    # Copied byte for byte: the trace id stays as sent (empty / zeros), nothing is re-encoded.
    sent = {decode_attributes(lr.attributes)["event.sequence"]: lr for g in (first, second) for lr in g}
    for records in by_key.values():
        for lr in records:
            assert lr == sent[decode_attributes(lr.attributes)["event.sequence"]]
    assert [lr.trace_id for lr in by_key[k1]] == [b"", b"", bytes(16)]


def test_a_request_of_one_prompt_is_passed_through():
    req = logs_request([cc_event("user_prompt", 1), cc_event("api_request", 2), cc_event("tool_result", 3)])
    result, body = split(req)
    assert len(result.records) == 1 and result.records[0].value is body
    assert result.records[0].key == hexid(SESSION, P1).encode()


def test_untraced_records_without_prompt_id_keep_the_null_key():
    mentions = cc_event("auth", 3, prompt_id=None, note="prompt.id")  # the bytes appear, not as an attribute key
    mentions.body.string_value = "no prompt.id here"
    nested = cc_event("auth", 4, prompt_id=None)
    nested.attributes.add(key="ctx").value.kvlist_value.values.add(key="prompt.id").value.string_value = P1
    req = logs_request([cc_event("auth", 1, prompt_id=None), cc_event("mcp_server_connection", 2, prompt_id=None),
                        mentions, nested])
    result, _ = split(req)
    assert [(r.key, r.item_count) for r in result.records] == [(None, 4)]


# -- assembler --------------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bus_records(req: ExportLogsServiceRequest, first_offset: int) -> list[BusRecord]:
    """What the receiver writes for ``req``: one bus record per key, as the embedded log would hand them back."""
    result, _ = split(req)
    return [BusRecord(topic="trace-source.spans", partition=0, offset=first_offset + i, key=r.key, value=r.value,
                      headers=(("signal", b"logs"), ("source-id", b"laptop"), ("transport", b"otlp-http"),
                               ("received-at", str(T0 + i).encode())))
            for i, r in enumerate(result.records)]


def session_requests() -> list[ExportLogsServiceRequest]:
    """Two prompts of one session in three exports (prompt 1 spans two of them), plus a session-level event."""
    return [
        logs_request([
            cc_event("user_prompt", 1, P1, prompt="Fix the failing test in utils.py", prompt_length=32),
            cc_event("api_request", 2, P1, model="claude-sonnet-4-5", input_tokens=1200, output_tokens=300,
                     cache_read_tokens=5000, cache_creation_tokens=100, cost_usd=0.012, duration_ms=2100),
            cc_event("tool_result", 3, P1, tool_name="Read", tool_use_id="toolu_01", success="true",
                     duration_ms=15),
            cc_event("auth", 4, prompt_id=None),
        ]),
        logs_request([
            cc_event("tool_result", 5, P1, tool_name="Bash", tool_use_id="toolu_02", success="false",
                     error_type="exit_code", duration_ms=900),
            cc_event("api_request", 6, P1, model="claude-sonnet-4-5", input_tokens=1500, output_tokens=200,
                     duration_ms=1800),
            cc_event("assistant_response", 7, P1, response="Fixed the off-by-one in utils.py", model="x"),
            cc_event("user_prompt", 8, P2, prompt="Now run the whole suite"),
        ]),
        logs_request([
            cc_event("api_request", 9, P2, model="claude-sonnet-4-5", input_tokens=900, output_tokens=120),
            cc_event("tool_result", 10, P2, tool_name="Bash", tool_use_id="toolu_03", success="true"),
            cc_event("api_error", 11, P2, model="claude-sonnet-4-5", status_code="529", error="Overloaded",
                     attempt=1, duration_ms=300),
        ]),
    ]


def test_prompts_assemble_into_one_envelope_each_after_the_prompt_quiet_period():
    clock = FakeClock()
    core = AssemblerCore(quiet_period_s=5.0, prompt_quiet_period_s=30.0, max_wait_s=300.0, clock=clock)
    core.assign([0])
    offset, untraced = 1, 0
    for req in session_requests():
        for rec in bus_records(req, offset):
            decoded = decode_record(rec)
            untraced += decoded.untraced_logs
            assert all(f.prompt_keyed for f in decoded.traces.values())
            core.ingest(rec, decoded.traces)
            offset += 1
        clock.now += 2
    assert untraced == 1  # the session-level auth event: no trace id, no prompt.id
    assert core.open_traces == 2
    clock.now += 5.0
    assert core.due() == []  # no root can end: the span rule's quiet period does not close a prompt
    clock.now += 30.0
    closed = sorted(core.due(), key=lambda c: c.trace_id)
    assert [(c.trace_id, c.reason, c.prompt_keyed, c.root_ended) for c in closed] == sorted(
        [(hexid(SESSION, P1), CLOSED_PROMPT_QUIET, True, False), (hexid(SESSION, P2), CLOSED_PROMPT_QUIET, True, False)])
    envs = {}
    for c in closed:
        env = build_envelope(c, assembled_at_ns=T0 + 10**9, redactor=Redactor())
        envs[env.trace_id] = Envelope.from_json_bytes(env.to_json_bytes())
        core.acknowledge(c)

    one, two = envs[hexid(SESSION, P1)], envs[hexid(SESSION, P2)]
    for env, prompt, n in ((one, P1, 6), (two, P2, 4)):
        assert env.spans == [] and env.completeness.root_seen is False
        assert len(env.log_events) == n
        assert all(e.trace_id == "" and e.attributes["prompt.id"] == prompt for e in env.log_events)
        assert [e.attributes["event.sequence"] for e in env.log_events] == sorted(
            e.attributes["event.sequence"] for e in env.log_events)
        assert env.resource["service.name"] == "claude-code"
        assert env.source.id == "laptop" and env.source.kind == "otlp-http"
        run = env.agent_run
        assert run.dialects == ["claude-code"] and run.session_id == SESSION and run.agent_name == "claude-code"

    run = one.agent_run
    assert run.task_input == "Fix the failing test in utils.py"
    assert run.final_output == "Fixed the off-by-one in utils.py"
    assert [(c.input_tokens, c.output_tokens) for c in run.llm_calls] == [(1200, 300), (1500, 200)]
    assert (run.usage.input_tokens, run.usage.output_tokens, run.usage.cache_read_input_tokens,
            run.usage.cache_creation_input_tokens, run.usage.llm_call_count) == (2700, 500, 5000, 100, 2)
    assert [(t.name, t.call_id, t.error) for t in run.tool_calls] == [
        ("Read", "toolu_01", None), ("Bash", "toolu_02", "exit_code")]
    assert [(e.type, e.fatal) for e in run.errors] == [("exit_code", False)]  # a failed tool is evidence only

    run = two.agent_run
    assert run.task_input == "Now run the whole suite" and run.final_output is None
    assert [(c.input_tokens, c.output_tokens) for c in run.llm_calls] == [(900, 120)]
    assert [(t.name, t.error) for t in run.tool_calls] == [("Bash", None)]
    # An api_error not followed by an api_request in its prompt: the run stalled (semconv §4).
    assert [(e.type, e.message, e.fatal) for e in run.errors] == [("claude_code.api_error", "529: Overloaded", True)]


def test_late_prompt_data_reopens_as_version_two_with_the_whole_prompt():
    clock = FakeClock()
    core = AssemblerCore(quiet_period_s=5.0, prompt_quiet_period_s=10.0, max_wait_s=300.0, clock=clock)
    core.assign([0])
    (rec,) = bus_records(logs_request([cc_event("user_prompt", 1, prompt="Hi"), cc_event("api_request", 2)]), 1)
    core.ingest(rec, decode_record(rec).traces)
    clock.now += 10
    (first,) = core.due()
    core.acknowledge(first)
    # A retry of the same export adds nothing; a new record of the prompt reopens it.
    core.ingest(rec, decode_record(rec).traces)
    assert core.open_traces == 0
    (late,) = bus_records(logs_request([cc_event("tool_result", 3, tool_name="Edit", success="true")]), 2)
    core.ingest(late, decode_record(late).traces)
    clock.now += 10
    (second,) = core.due()
    assert (second.trace_id, second.version) == (first.trace_id, 2)
    env = build_envelope(second, assembled_at_ns=T0, redactor=None)
    assert [e.event_name for e in env.log_events] == ["user_prompt", "api_request", "tool_result"]
    assert env.agent_run.task_input == "Hi" and [t.name for t in env.agent_run.tool_calls] == ["Edit"]


def test_a_prompt_that_keeps_producing_closes_at_max_wait():
    clock = FakeClock()
    core = AssemblerCore(quiet_period_s=5.0, prompt_quiet_period_s=30.0, max_wait_s=60.0, clock=clock)
    core.assign([0])
    for i in range(6):  # one record every 10 s: never 30 s quiet
        (rec,) = bus_records(logs_request([cc_event("api_request", i + 1, input_tokens=1)]), i + 1)
        core.ingest(rec, decode_record(rec).traces)
        assert core.due() == []
        clock.now += 10
    (closed,) = core.due()  # 60 s after the first record
    assert closed.reason == CLOSED_MAX_WAIT and len(closed.records) == 6


def test_a_record_holding_several_prompts_and_traces_is_attributed_per_event():
    """A record written by another producer (not split by prompt): every envelope gets only its own events."""
    traced = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
    data = LogsData.FromString(logs_request([
        cc_event("user_prompt", 1, P1, prompt="one"), cc_event("user_prompt", 2, P2, prompt="two"),
        cc_event("api_request", 3, P1, trace_id=bytes(16), input_tokens=5),
        cc_event("api_request", 4, P2, trace_id=traced, input_tokens=7),
        cc_event("auth", 5, prompt_id=None)]).SerializeToString())
    rec = BusRecord(topic="trace-source.spans", partition=0, offset=1, key=None, value=data.SerializeToString(),
                    headers=(("signal", b"logs"),))
    decoded = decode_record(rec)
    assert decoded.untraced_logs == 1
    assert {t: (len(f.logs), f.prompt_keyed) for t, f in decoded.traces.items()} == {
        hexid(SESSION, P1): (2, True), hexid(SESSION, P2): (1, True), traced.hex(): (1, False)}
    clock = FakeClock()
    core = AssemblerCore(quiet_period_s=5.0, prompt_quiet_period_s=5.0, max_wait_s=300.0, clock=clock)
    core.assign([0])
    core.ingest(rec, decoded.traces)
    clock.now += 5
    closed = {c.trace_id: c for c in core.due()}
    assert set(closed) == {hexid(SESSION, P1), hexid(SESSION, P2)}  # the traced one waits for its spans
    one = build_envelope(closed[hexid(SESSION, P1)], assembled_at_ns=T0)
    assert [(e.attributes["event.sequence"], e.trace_id) for e in one.log_events] == [(1, ""), (3, "")]
    assert one.agent_run.task_input == "one" and one.agent_run.usage.input_tokens == 5
    two = build_envelope(closed[hexid(SESSION, P2)], assembled_at_ns=T0)
    assert [e.attributes["event.sequence"] for e in two.log_events] == [2]
