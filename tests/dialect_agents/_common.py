"""Shared set-up for the dialect agent scripts (run as subprocesses by ``tests/test_dialects_real.py``).

Each script gets a fresh process, hence a fresh global ``TracerProvider`` / ``LoggerProvider``, configured here with
the real OTLP/HTTP protobuf exporters of ``opentelemetry-exporter-otlp-proto-http`` pointed at ``trace-source
serve``. Environment (set by the test):

* ``TRACE_SOURCE_OTLP_URL``: base URL of ``serve`` (``http://127.0.0.1:<port>``); ``/v1/traces`` and ``/v1/logs``
  are appended;
* ``FAKE_LLM_BASE_URL``: the OpenAI-compatible fake model (``tests/fake_llm.py``), ``http://127.0.0.1:<port>/v1``;
* ``DIALECT_MODEL`` / ``DIALECT_ERROR_MODEL``: model names for the good run and for the run the fake model fails.

A script runs its scenarios one after the other inside :meth:`Harness.scenario`, which notes the trace ids of the
spans ended meanwhile, then calls :meth:`Harness.finish`: flush, shut down, and print one JSON line to stdout::

    {"scenarios": {"<name>": {"trace_ids": [...], "spans": N, "error": "..." | null, "output": "..." | null}},
     "span_exports": [...], "log_exports": [...]}

``span_exports`` / ``log_exports`` list every export result (``"SUCCESS"``/``"FAILURE"``) so the test can prove the
exporters really delivered. Task, tool and answer constants come from ``tests/fake_llm.py`` (same folder parent).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ -> fake_llm

import fake_llm  # noqa: E402  (constants shared with the test)
from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

TASK = fake_llm.TASK
TOOL_NAME = fake_llm.TOOL_NAME
TOOL_RESULT = fake_llm.TOOL_RESULT
WEATHER_TOOL = fake_llm.WEATHER_TOOL

OTLP_URL = os.environ.get("TRACE_SOURCE_OTLP_URL", "http://127.0.0.1:4319").rstrip("/")
LLM_BASE_URL = os.environ.get("FAKE_LLM_BASE_URL", "http://127.0.0.1:8000/v1")
MODEL = os.environ.get("DIALECT_MODEL", "gpt-fake-mini")
ERROR_MODEL = os.environ.get("DIALECT_ERROR_MODEL", "gpt-fake-error")


def get_weather(city: str) -> str:
    """The tool every agent calls: deterministic, no I/O."""
    return TOOL_RESULT if city.lower() == "paris" else f"no data for {city}"


def tool_loop(client: Any, model: str, task: str, tool: Callable[..., str],
              first_call: Callable[[str, list[dict]], dict] | None = None, *, offer_tools: bool = True,
              max_turns: int = 4, catch: bool = False,
              run_tool: Callable[[dict, Callable[..., str]], str] | None = None) -> str:
    """The agent every OpenAI-client script runs: task -> model -> tools -> model ... -> answer.

    ``client``: an (instrumented) ``openai.OpenAI``; ``first_call(model, messages)``: replaces the first model call
    (e.g. streamed) and returns the assistant message as a dict; ``offer_tools``: send the weather tool's definition;
    ``max_turns``: model calls at most, then ``""`` is returned (no answer); ``catch``: a raising tool's error goes
    back to the model as the tool's result (``"error: <Type>: <message>"``) instead of escaping; ``run_tool(call,
    tool)``: runs one tool call (an OpenAI ``tool_calls`` item) and returns its result, e.g. inside a span (default:
    ``tool(**arguments)``). Returns the final answer text.
    """
    run_tool = run_tool or (lambda call, fn: fn(**json.loads(call["function"]["arguments"])))
    extra = {"tools": [WEATHER_TOOL]} if offer_tools else {}
    messages: list[dict] = [{"role": "user", "content": task}]
    for turn in range(max_turns):
        if turn == 0 and first_call is not None:
            assistant = first_call(model, messages)
        else:
            reply = client.chat.completions.create(model=model, messages=messages, **extra)
            assistant = reply.choices[0].message.model_dump(exclude_none=True)
        messages.append(assistant)
        if not assistant.get("tool_calls"):
            return assistant.get("content") or ""
        for call in assistant["tool_calls"]:
            try:
                result = run_tool(call, tool)
            except Exception as exc:
                if not catch:
                    raise
                result = f"error: {type(exc).__name__}: {exc}"
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return ""


class _CountingSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, results: list[str]) -> None:
        self.inner, self.results = inner, results

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.results.append(result.name)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Recorder(SpanProcessor):
    """Notes (trace id, span id, name) of every ended span, for the per-scenario trace ids."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.get_span_context()
        with self._lock:
            self.ended.append((f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", span.name))

    def mark(self) -> int:
        with self._lock:
            return len(self.ended)

    def since(self, mark: int) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self.ended[mark:])


class Harness:
    """Tracer (and optionally logger) provider with real OTLP/HTTP exporters, installed as the globals."""

    def __init__(self, service_name: str, *, logs: bool = False, export: bool = True) -> None:
        """``export=False``: no OTLP exporter of our own (the instrumentation brings its own span processor and
        exporter, e.g. Langfuse); the recorder still notes every span for the scenario trace ids."""
        self.resource = Resource.create({"service.name": service_name, "deployment.environment": "dialect-test"})
        self.span_exports: list[str] = []
        self.log_exports: list[str] = []
        self.recorder = _Recorder()
        self.tracer_provider = TracerProvider(resource=self.resource)
        # The recorder runs first so a span's trace id is noted even if the export below is slow.
        self.tracer_provider.add_span_processor(self.recorder)
        if export:
            self.tracer_provider.add_span_processor(BatchSpanProcessor(self.counting(
                OTLPSpanExporter(endpoint=f"{OTLP_URL}/v1/traces", timeout=10))))
        trace.set_tracer_provider(self.tracer_provider)
        self.logger_provider = None
        if logs:
            from opentelemetry._logs import set_logger_provider
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter

            results = self.log_exports

            class _CountingLogExporter(LogRecordExporter):
                def __init__(self, inner: Any) -> None:
                    self.inner = inner

                def export(self, batch: Any) -> Any:
                    result = self.inner.export(batch)
                    results.append(result.name)
                    return result

                def shutdown(self) -> None:
                    self.inner.shutdown()

                def force_flush(self, timeout_millis: int = 30000) -> bool:
                    return True

            self.logger_provider = LoggerProvider(resource=self.resource)
            self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(_CountingLogExporter(
                OTLPLogExporter(endpoint=f"{OTLP_URL}/v1/logs", timeout=10))))
            set_logger_provider(self.logger_provider)
        self.scenarios: dict[str, dict[str, Any]] = {}

    def counting(self, exporter: SpanExporter) -> SpanExporter:
        """Wrap ``exporter`` so its export results land in the report's ``span_exports``."""
        return _CountingSpanExporter(exporter, self.span_exports)

    @contextlib.contextmanager
    def scenario(self, name: str, *, expect_error: bool = False) -> Iterator[dict[str, Any]]:
        """Run one agent turn; exceptions are recorded (and swallowed only when ``expect_error``)."""
        mark = self.recorder.mark()
        info: dict[str, Any] = {"error": None, "output": None}
        try:
            yield info
        except Exception as exc:  # noqa: BLE001 - the error run is supposed to fail
            info["error"] = f"{type(exc).__name__}: {exc}"
            if not expect_error:
                info["traceback"] = traceback.format_exc()
        ended = self.recorder.since(mark)
        info["trace_ids"] = sorted({t for t, _, _ in ended})
        info["spans"] = [{"trace_id": t, "span_id": s, "name": n} for t, s, n in ended]
        self.scenarios[name] = info

    def run_all(self, scenarios: dict[str, Callable[[], Any]]) -> None:
        """Run each scenario (name -> function returning the agent's answer; a raise is recorded as the run's error),
        then :meth:`finish`."""
        for name, run in scenarios.items():
            with self.scenario(name, expect_error=True) as info:
                info["output"] = run()
        self.finish()

    def finish(self) -> None:
        """Flush and shut down every provider, then print the JSON report on stdout."""
        self.tracer_provider.force_flush(30_000)
        self.tracer_provider.shutdown()
        if self.logger_provider is not None:
            self.logger_provider.force_flush(30_000)
            self.logger_provider.shutdown()
        print(json.dumps({"scenarios": self.scenarios, "span_exports": self.span_exports,
                          "log_exports": self.log_exports}))
        sys.stdout.flush()
