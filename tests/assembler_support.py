"""Helpers for the assembler's end-to-end tests: ``trace-source worker assemble`` as a real process, reading the
traces topic back, and agent traces made with the real OpenTelemetry SDK (complete, or with the root left open)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from interop_support import RecordingSpanExporter, make_agent_traces, span_exporter
from tests.serve_proc import CliProcess

_BIN = Path(sys.executable).with_name("trace-source")
RESOURCE = {"service.name": "assembler-e2e-agent"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess(CliProcess):
    """``trace-source worker assemble`` in a subprocess, flags given as keyword arguments (``quiet_period_s=1``)."""

    def __init__(self, log_path: Path, *, env: dict[str, str] | None = None, **flags) -> None:
        args = ["worker", "assemble"]
        for name, value in {"metrics_port": 0, "metrics_host": "127.0.0.1", **flags}.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        super().__init__(log_path, args, env)
        self.metrics_port = 0

    def start(self, timeout_s: float = 60.0) -> "WorkerProcess":
        since = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.launch("assembler.started", timeout_s)
        serving = [e for e in self.events(since) if e.get("event") == "assembler.serving"]
        if serving:
            self.metrics_port = serving[-1]["metrics_port"]
        return self

    def assigned(self) -> set[int]:
        """Partitions the worker owns according to its last assigned/revoked log lines."""
        owned: set[int] = set()
        for e in self.events():
            if e.get("event") == "assembler.assigned":
                owned |= set(e["partitions"])
            elif e.get("event") == "assembler.revoked":
                owned -= set(e["partitions"])
        return owned


def metric_value(port: int, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` with ``labels`` on ``http://127.0.0.1:port/metrics``."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def read_topic(bootstrap: str, topic: str) -> list:
    """Every record on ``topic`` right now (all partitions, from the beginning), in no particular order."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


def read_topic_sync(bootstrap: str, topic: str) -> list:
    return asyncio.run(read_topic(bootstrap, topic))


def header(rec, name: str) -> str | None:
    return next((v.decode() for k, v in (rec.headers or ()) if k == name), None)


class AgentClient:
    """The real OTel SDK with a SimpleSpanProcessor exporting to ``serve`` (``transport`` http or grpc).

    ``finished``: every span exported so far (ReadableSpan), to re-export as exporter-retry duplicates.
    """

    def __init__(self, serve, transport: str = "http", scope=("assembler.e2e", "1.0")) -> None:
        self.memory = InMemorySpanExporter()
        self.exporter = RecordingSpanExporter(span_exporter(serve, transport))
        self.provider = TracerProvider(resource=Resource.create(RESOURCE), shutdown_on_exit=False)
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.scope = scope
        self.tracer = self.provider.get_tracer(*scope)

    def complete_traces(self, n: int) -> dict[str, set[str]]:
        """``n`` finished agent runs; returns trace id -> span ids."""
        return _by_trace(make_agent_traces(self.provider, self.scope, n))

    def open_traces(self, n: int) -> tuple[dict[str, set[str]], list]:
        """``n`` agent runs whose children are finished (exported) but whose root span is still open; returns
        (trace id -> span ids including the root's, the open root spans to ``end()`` later)."""
        ids: dict[str, set[str]] = {}
        roots = []
        for t in range(n):
            root = self.tracer.start_span(f"invoke_agent open-{t}", kind=SpanKind.SERVER, attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "opener"})
            ctx = otel_trace.set_span_in_context(root)
            trace_id = format(root.get_span_context().trace_id, "032x")
            ids[trace_id] = {format(root.get_span_context().span_id, "016x")}
            for s in range(2):
                with self.tracer.start_as_current_span(f"chat step-{s}", context=ctx, kind=SpanKind.CLIENT,
                                                       attributes={"gen_ai.operation.name": "chat",
                                                                   "gen_ai.request.model": "gpt-4o"}) as chat:
                    ids[trace_id].add(format(chat.get_span_context().span_id, "016x"))
            roots.append(root)
        return ids, roots

    def resend_all(self) -> None:
        """Export every finished span once more, as an exporter retry would."""
        self.exporter.inner.export(self.memory.get_finished_spans())

    def close(self) -> None:
        self.provider.shutdown()


def _by_trace(span_to_trace: dict[str, str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for span_id, trace_id in span_to_trace.items():
        out.setdefault(trace_id, set()).add(span_id)
    return out


def wait_for(condition, what: str, timeout_s: float = 60.0, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)
