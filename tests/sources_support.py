"""Helpers for the trace-source tests: trace files written by the real OpenTelemetry encoders (the JS SDK's
``@opentelemetry/otlp-transformer`` JSON and protobuf serializers, the Python SDK's ``encode_spans``), the
``trace-source`` CLI as a subprocess, and reading back what reached the traces topic of an embedded state dir."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from normalizers.envelope import Envelope
from sinks.local_log import LOG_FILENAME, LocalLogReader, decode_headers

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "interop" / "js"
BIN = Path(sys.executable).with_name("trace-source")
TRACES_TOPIC = "trace-source.traces"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``trace-source ARGS`` (no TRACE_SOURCE_* from the caller's environment), output captured as text."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_SOURCE_")}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


def js_otlp_files(out: Path, runs: list[dict], fmt: str = "json") -> dict:
    """Agent runs written by the OpenTelemetry JS SDK's encoders (tests/interop/js/write_otlp_files.mjs):
    ``{"files": [...], "traces": [trace id per run]}``."""
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "@opentelemetry" / "otlp-transformer").is_dir():
        pytest.fail("Node.js and tests/interop/js/node_modules (npm ci, done by `make test`) are needed",
                    pytrace=False)
    proc = subprocess.run([node, str(JS_DIR / "write_otlp_files.mjs"), "--out", str(out), "--runs", json.dumps(runs),
                           "--format", fmt], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(proc.stdout)


def python_protobuf_runs(path: Path, failing: list[bool], *, length_prefixed: bool = False) -> list[str]:
    """Agent runs made with the OpenTelemetry Python SDK and encoded by its OTLP exporter's own encoder
    (``opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans``) into ``path``: one
    ``ExportTraceServiceRequest`` message, or (``length_prefixed``) one message per run each prefixed with its
    size as a 4-byte big-endian integer, as the Collector's file exporter writes ``format: proto``. Returns the
    trace ids."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "python-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("sources-test")
    ids, chunks = [], []
    for i, fail in enumerate(failing):
        memory.clear()
        with tracer.start_as_current_span("invoke_agent support", attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support-py",
                "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [
                    {"type": "text", "content": f"Refund order B-{i}"}]}])}) as root:
            ids.append(f"{root.get_span_context().trace_id:032x}")
            with tracer.start_as_current_span("execute_tool refund", attributes={
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "refund",
                    "gen_ai.tool.call.arguments": json.dumps({"order": f"B-{i}"})}) as tool:
                if fail:
                    tool.record_exception(TimeoutError("payments API timed out"))
                    tool.set_status(Status(StatusCode.ERROR, "payments API timed out"))
            if fail:
                root.set_status(Status(StatusCode.ERROR, "refund failed"))
        chunks.append(encode_spans(memory.get_finished_spans()).SerializeToString())
    provider.shutdown()
    if length_prefixed:
        path.write_bytes(b"".join(struct.pack(">I", len(c)) + c for c in chunks))
    else:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        merged = ExportTraceServiceRequest()
        for c in chunks:
            merged.MergeFromString(c)
        path.write_bytes(merged.SerializeToString())
    return ids


def topic_envelopes(state_dir: Path, topic: str = TRACES_TOPIC) -> list[tuple[str, str, dict[str, str]]]:
    """Every record of ``topic`` in the embedded log: (trace id, idempotency-key header, headers)."""
    out = []
    with LocalLogReader(Path(state_dir) / LOG_FILENAME) as reader:
        after = 0
        while rows := reader.read(after, 1000, topic=topic):
            for r in rows:
                headers = {k: v.decode() for k, v in decode_headers(r.headers)}
                out.append((r.key, headers.get("idempotency-key", ""), headers))
            after = rows[-1].offset
    return out


def keys_on_topic(state_dir: Path) -> Counter:
    """How many records of the traces topic carry each idempotency key."""
    return Counter(key for _, key, _ in topic_envelopes(state_dir))


def envelope_file(state_dir: Path, trace_id: str) -> Envelope:
    return Envelope.from_json_bytes((Path(state_dir) / "traces" / f"{trace_id}.json").read_bytes())


TRACES_TOPIC = "trace-source.traces"


async def read_topic(bootstrap: str, trace_ids: set[str]) -> list[tuple[str, dict[str, str]]]:
    """(trace id, headers) of every record of the Kafka traces topic that belongs to ``trace_ids``."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(TRACES_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=2000)
            if not batch:
                break
            for records in batch.values():
                for r in records:
                    key = r.key.decode()
                    if key in trace_ids:
                        out.append((key, {k: v.decode() for k, v in r.headers}))
    finally:
        await consumer.stop()
    return out
