"""Realistic GenAI agent spans for benchmarks and load tests.

``make_genai_request(n_spans, spans_per_trace, seed)`` returns an ``ExportTraceServiceRequest`` shaped like what an
agent's OpenTelemetry SDK exporter sends: several agent runs (traces) interleaved in one batch, each an
``invoke_agent`` root with ``chat`` LLM calls and ``execute_tool`` tool calls, carrying OTel GenAI semantic-convention
attributes (``gen_ai.*``, semconv >= 1.37 message forms) with prompt/completion text of a few hundred bytes.
"""

from __future__ import annotations

import json
import random

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

_WORDS = ("the agent reads the repository file and plans a patch for the failing test then calls a tool to run "
          "pytest and inspects the traceback before answering the user with a summary of the change").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def _attr(span_or_res, key: str, value) -> None:
    kv = span_or_res.attributes.add()
    kv.key = key
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    else:
        kv.value.string_value = value


def make_genai_request(n_spans: int = 512, spans_per_trace: int = 24, seed: int = 0) -> ExportTraceServiceRequest:
    """Build one export request of ``n_spans`` spans spread over ``ceil(n_spans / spans_per_trace)`` traces."""
    rng = random.Random(seed)
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    _attr(rs.resource, "service.name", "support-agent")
    _attr(rs.resource, "service.version", "1.4.2")
    _attr(rs.resource, "telemetry.sdk.language", "python")
    _attr(rs.resource, "telemetry.sdk.name", "opentelemetry")
    _attr(rs.resource, "telemetry.sdk.version", "1.38.0")
    ss = rs.scope_spans.add()
    ss.scope.name = "opentelemetry.instrumentation.openai_v2"
    ss.scope.version = "2.1b0"
    n_traces = max(1, -(-n_spans // spans_per_trace))
    traces = [(rng.randbytes(16), rng.randbytes(8)) for _ in range(n_traces)]
    t0 = 1_763_700_000_000_000_000
    for i in range(n_spans):
        trace_id, root_id = traces[i % n_traces]
        idx = i // n_traces
        sp = ss.spans.add()
        sp.trace_id = trace_id
        sp.start_time_unix_nano = t0 + i * 1_000_000
        sp.end_time_unix_nano = sp.start_time_unix_nano + rng.randint(50, 4000) * 1_000_000
        if idx == 0:
            sp.span_id = root_id
            sp.name = "invoke_agent support-agent"
            sp.kind = Span.SPAN_KIND_INTERNAL
            _attr(sp, "gen_ai.operation.name", "invoke_agent")
            _attr(sp, "gen_ai.agent.name", "support-agent")
            _attr(sp, "gen_ai.conversation.id", f"conv-{rng.randint(1, 10**9)}")
            continue
        sp.span_id = rng.randbytes(8)
        sp.parent_span_id = root_id
        if idx % 3 == 0:
            sp.name = "execute_tool run_tests"
            _attr(sp, "gen_ai.operation.name", "execute_tool")
            _attr(sp, "gen_ai.tool.name", "run_tests")
            _attr(sp, "gen_ai.tool.call.id", f"call_{rng.randint(1, 10**12):x}")
            _attr(sp, "gen_ai.tool.call.arguments", json.dumps({"path": "tests/", "k": _text(rng, 3)}))
            _attr(sp, "gen_ai.tool.call.result", _text(rng, 40))
            if rng.random() < 0.1:
                sp.status.code = Status.STATUS_CODE_ERROR
                sp.status.message = "tool exited with status 1"
            continue
        sp.name = "chat gpt-4o-mini"
        sp.kind = Span.SPAN_KIND_CLIENT
        _attr(sp, "gen_ai.operation.name", "chat")
        _attr(sp, "gen_ai.provider.name", "openai")
        _attr(sp, "gen_ai.request.model", "gpt-4o-mini")
        _attr(sp, "gen_ai.response.model", "gpt-4o-mini-2024-07-18")
        _attr(sp, "gen_ai.request.temperature", 0.2)
        _attr(sp, "gen_ai.usage.input_tokens", rng.randint(200, 4000))
        _attr(sp, "gen_ai.usage.output_tokens", rng.randint(20, 800))
        _attr(sp, "gen_ai.response.finish_reasons", "stop")
        _attr(sp, "gen_ai.input.messages", json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": _text(rng, 60)}]}]))
        _attr(sp, "gen_ai.output.messages", json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": _text(rng, 40)}], "finish_reason": "stop"}]))
        _attr(sp, "server.address", "api.openai.com")
    return req
