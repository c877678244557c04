"""Acceptance: the OpenTelemetry JS SDK's OTLP/HTTP JSON exporter against ``trace-source serve`` run as a process.

``tests/interop/js/send_spans.mjs`` runs ``@opentelemetry/exporter-trace-otlp-http`` (pinned in
``tests/interop/js/package-lock.json``; ``make test`` runs ``npm ci`` there) with ``@opentelemetry/sdk-trace-base``.
That exporter sends OTLP/JSON: its Node ``OTLPTraceExporter`` hard-codes ``Content-Type: application/json`` and the
``JsonTraceSerializer`` (hex ids, int64 as strings, enums as numbers); protobuf is a different package
(``exporter-trace-otlp-proto``). The script does not trust that default: it records the headers of every HTTP request
the process really made (``node:diagnostics_channel``), and the test checks them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from interop_support import (
    assert_each_span_exactly_once,
    attributes,
    check_record_contract,
    landed_kafka,
    landed_local,
    metric,
)
from serve_proc import ServeProcess

JS_DIR = Path(__file__).resolve().parent / "interop" / "js"
SCRIPT = JS_DIR / "send_spans.mjs"
N_TRACES, SPANS_PER_TRACE = 4, 5


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("Node.js (`node`) is not on PATH; the JS interop test needs Node.js 20.6+ and npm", pytrace=False)
    if not (JS_DIR / "node_modules" / "@opentelemetry" / "exporter-trace-otlp-http").is_dir():
        pytest.fail(f"the OpenTelemetry JS SDK is not installed: run `make test`, or `npm ci` in {JS_DIR}",
                    pytrace=False)
    return found


def run_js(serve: ServeProcess, *, compression: str, processor: str, token: str | None = None,
           expect_exit: int = 0) -> dict:
    proc = subprocess.run(
        [node(), str(SCRIPT), "--url", f"{serve.http_url}/v1/traces", "--traces", str(N_TRACES),
         "--spans-per-trace", str(SPANS_PER_TRACE), "--compression", compression, "--processor", processor,
         *(["--token", token] if token else [])],
        cwd=JS_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == expect_exit, (
        f"send_spans.mjs exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}\n"
        f"serve log:\n{serve.log_tail()}")
    return json.loads(proc.stdout)


def check_js_run(out: dict, serve: ServeProcess, compression: str) -> dict[str, str]:
    """What the JS side reports: all exports succeeded, every request was OTLP/JSON to /v1/traces and got a 200.
    Returns span id -> trace id of every span created."""
    spans = out["spans"]
    assert len(spans) == N_TRACES * SPANS_PER_TRACE
    assert out["exports"] and all(e["code"] == 0 for e in out["exports"]), out["exports"]
    assert out["flushError"] is None
    assert sum(e["spans"] for e in out["exports"]) == len(spans)
    assert out["requests"], "no HTTP request observed"
    for req in out["requests"]:
        assert req["method"] == "POST" and req["path"] == "/v1/traces", req
        assert req["contentType"] == "application/json", req
        assert req["contentEncoding"] == (None if compression == "none" else compression), req
        assert req["status"] == 200, req
    # The server agrees: that many HTTP requests answered 200, no gRPC.
    assert metric(serve.http_url, "trace_source_requests_total", protocol="http", signal="traces",
                  status="200") == len(out["requests"])
    assert metric(serve.http_url, "trace_source_requests_total", protocol="grpc") == 0
    return {s["spanId"]: s["traceId"] for s in spans}


def check_spans(records, out: dict) -> None:
    ids = {s["spanId"]: s["traceId"] for s in out["spans"]}
    by_id = assert_each_span_exactly_once(records, ids)
    for sent in out["spans"]:
        landed = by_id[sent["spanId"]]
        span = landed.span
        assert span.name == sent["name"]
        assert span.parent_span_id.hex() == sent["parentSpanId"]
        resource = attributes(landed.resource_spans.resource.attributes)
        assert resource["service.name"] == "interop-js-agent" and resource["service.version"] == "1.2.3"
        assert (landed.scope_spans.scope.name, landed.scope_spans.scope.version) == ("interop-js", "0.1.0")
        attrs = attributes(span.attributes)
        # OTLP/JSON decoding: int64 (sent as JSON strings), doubles, enums as numbers, unicode.
        if span.name.startswith("chat"):
            assert span.kind == Span.SPAN_KIND_CLIENT
            assert attrs["gen_ai.usage.input_tokens"] >= 100 and isinstance(attrs["gen_ai.usage.input_tokens"], int)
            assert attrs["gen_ai.request.temperature"] == pytest.approx(0.2)
            (event,) = span.events
            assert event.name == "gen_ai.content.prompt"
            assert attributes(event.attributes)["gen_ai.prompt"].endswith("ünïcødé ✓")
        elif span.name.startswith("invoke_agent"):
            assert span.kind == Span.SPAN_KIND_SERVER and not span.parent_span_id
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 1_600_000_000 * 10**9
    errors = [ls.span for ls in by_id.values() if ls.span.status.code == Status.STATUS_CODE_ERROR]
    assert len(errors) == N_TRACES, [s.name for s in errors]  # the first tool call of every trace
    for span in errors:
        assert span.status.message == "tool timed out" and span.name.startswith("execute_tool")
        assert [e.name for e in span.events] == ["exception"]


@pytest.mark.parametrize("compression,processor", [("none", "batch"), ("gzip", "simple")])
def test_js_sdk_json_spans_land_exactly_once_in_embedded_log(tmp_path: Path, compression, processor):
    before = time.time_ns()
    with ServeProcess(tmp_path / "state") as serve:
        out = run_js(serve, compression=compression, processor=processor)
        check_js_run(out, serve, compression)
        records = landed_local(serve.state_dir)
    check_record_contract(records, source_id="default", received_between=(before, time.time_ns()))
    assert {r.signal for r in records} == {"traces"}
    check_spans(records, out)


@pytest.mark.kafka
@pytest.mark.parametrize("compression,processor", [("gzip", "batch")])
async def test_js_sdk_json_spans_land_exactly_once_on_kafka(tmp_path: Path, kafka_bootstrap: str, kafka_topic: str,
                                                           compression, processor):
    before = time.time_ns()
    with ServeProcess(tmp_path / "state", "--kafka-topic", kafka_topic, kafka_bootstrap=kafka_bootstrap) as serve:
        # Blocking subprocess in an async test: nothing else runs on this loop meanwhile.
        out = run_js(serve, compression=compression, processor=processor)
        check_js_run(out, serve, compression)
        records = await landed_kafka(kafka_bootstrap, kafka_topic)
    check_record_contract(records, source_id="default", received_between=(before, time.time_ns()))
    assert {r.signal for r in records} == {"traces"}
    assert {r.key for r in records} == {s["traceId"] for s in out["spans"]}
    check_spans(records, out)


def test_js_sdk_bearer_token(tmp_path: Path):
    """The exporter's ``headers`` option carries the bearer token: the right one lands under its source id, a wrong
    one is answered 401, which the JS exporter does not retry, and nothing of it lands."""
    with ServeProcess(tmp_path / "state", "--auth-tokens", "tok-js=agent-js") as serve:
        good = run_js(serve, compression="none", processor="batch", token="tok-js")
        check_js_run(good, serve, "none")
        bad = run_js(serve, compression="none", processor="simple", token="tok-other", expect_exit=1)
        assert bad["exports"] and all(e["code"] != 0 for e in bad["exports"]), bad["exports"]
        assert "Unauthorized" in bad["flushError"]
        assert bad["requests"] and all(r["status"] == 401 for r in bad["requests"]), bad["requests"]
        assert len(bad["requests"]) == len(bad["exports"])  # one request per export: 401 is not retried
        records = landed_local(serve.state_dir)
        assert metric(serve.http_url, "trace_source_requests_total", protocol="http", status="401") == len(
            bad["requests"])
    check_record_contract(records, source_id="agent-js")
    check_spans(records, good)  # exactly the good run's spans, none of the refused run's
