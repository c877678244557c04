"""OpenTelemetry for the agent, configured the standard way: from the environment.

* Exporter: OTLP/HTTP protobuf (``opentelemetry-exporter-otlp-proto-http``), configured by the SDK's own variables:
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` (e.g. ``http://127.0.0.1:4319`` for ``trace-source serve``; ``/v1/traces`` is
  appended), or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``, ...
* Resource: ``service.name`` ``support-agent`` unless ``OTEL_SERVICE_NAME`` says otherwise, plus
  ``OTEL_RESOURCE_ATTRIBUTES`` (e.g. ``vcs.ref.head.revision=<commit>``).
* Spans: ``opentelemetry-instrumentation-openai-v2`` makes one ``chat <model>`` span per model request;
  ``opentelemetry-util-genai`` makes the ``invoke_agent support-agent`` span around the run and one
  ``execute_tool <name>`` span per tool call. The latest GenAI conventions are used
  (``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``): messages are span attributes, so traces alone
  carry the whole run and no logs exporter is needed.
* Content capture (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``): ON by default here (``span_only``), so
  the task, the model's messages and the tools' arguments and results are recorded, which is what a reproduction
  needs. Turn it off with ``no_content`` (or ``false``); then only names, ids, timings, tokens and errors are sent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
SERVICE_NAME = "support-agent"

_OFF = {"", "0", "false", "no", "off", "no_content"}
_ON = {"1", "true", "yes", "on"}


def configure_environment() -> bool:
    """Put the GenAI instrumentation settings in ``os.environ`` (read when it is instrumented): the latest
    conventions, and content capture on unless switched off. Returns whether content is captured."""
    opt_in = [v.strip() for v in os.environ.get(OPT_IN_ENV, "").split(",") if v.strip()]
    if "gen_ai_latest_experimental" not in opt_in:
        os.environ[OPT_IN_ENV] = ",".join([*opt_in, "gen_ai_latest_experimental"])
    value = os.environ.get(CAPTURE_ENV)
    if value is None or value.strip().lower() in _ON:
        os.environ[CAPTURE_ENV] = "span_only"
    elif value.strip().lower() in _OFF:
        os.environ[CAPTURE_ENV] = "no_content"
    return os.environ[CAPTURE_ENV].lower() != "no_content"


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    handler: object  # opentelemetry.util.genai.handler.TelemetryHandler
    capture_content: bool

    def shutdown(self) -> None:
        """Export every span still buffered, then stop (call before the process exits)."""
        self.tracer_provider.force_flush(30_000)
        self.tracer_provider.shutdown()


def setup() -> Telemetry:
    """Tracer provider with the OTLP/HTTP exporter, the OpenAI client instrumented, and the GenAI handler for the
    agent and tool spans. Call once per process, before the first OpenAI client request."""
    capture = configure_environment()
    # Imported here: the instrumentation reads the environment set just above when it loads.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    from opentelemetry.util.genai.handler import get_telemetry_handler

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    OpenAIInstrumentor().instrument(tracer_provider=provider)
    return Telemetry(provider, get_telemetry_handler(tracer_provider=provider), capture)
