"""Prometheus metrics of the assembler (prometheus-client).

In the embedded ``serve`` they join the receiver's registry (served at its ``/metrics``); ``worker assemble``
serves its own registry on ``--metrics-port``. Names follow Prometheus conventions (``_total`` counters, bytes).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class AssemblerMetrics:
    """Counters and gauges; ``registry=None`` creates a private registry (tests, several assemblers per process).

    Labels: ``reason`` (close reason: ``root-ended-and-quiet`` | ``max-wait`` | ``evicted``), ``kind`` (``span`` |
    ``log``), ``signal`` (``traces`` | ``logs``), ``cause`` (``undecodable`` | ``envelope-build-failed``).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        p = "trace_source_assembler_"
        self.records = Counter(p + "records_total", "Input records consumed.", ["signal"], registry=r)
        self.envelopes = Counter(p + "envelopes_total", "Envelopes emitted (durable), by close reason.",
                                 ["reason"], registry=r)
        self.late_versions = Counter(p + "late_versions_total",
                                     "Traces reopened by late data (each yields envelope version N+1).", registry=r)
        self.duplicates = Counter(p + "duplicates_dropped_total",
                                  "Spans / log records dropped as duplicates (exporter retries, replays).",
                                  ["kind"], registry=r)
        self.untraced_logs = Counter(p + "untraced_log_records_total",
                                     "Log records with neither a trace id nor a prompt.id (not assembled).", registry=r)
        self.dlq = Counter(p + "dlq_records_total", "Records sent to the dead-letter topic.", ["cause"], registry=r)
        self.claim_checks = Counter(p + "claim_checks_total",
                                    "Envelopes stored in the artifact store (over the message limit).", registry=r)
        self.publish_errors = Counter(p + "publish_errors_total",
                                      "Failed output writes (retried until they succeed).", registry=r)
        self.envelope_bytes = Histogram(p + "envelope_bytes", "Envelope JSON size.", registry=r,
                                        buckets=(1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 1e8))
        self.build_seconds = Histogram(p + "envelope_build_seconds", "Time to build one envelope.", registry=r,
                                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
        self.open_traces = Gauge(p + "open_traces", "Traces being buffered.", registry=r)
        self.buffered_bytes = Gauge(p + "buffered_bytes", "OTLP bytes of open traces (the memory bound).",
                                    registry=r)
        self.retained_bytes = Gauge(p + "retained_bytes", "OTLP bytes kept of recently closed traces.", registry=r)
        self.committed_offset = Gauge(p + "committed_offset", "Last committed offset (next to read), per partition.",
                                      ["partition"], registry=r)

    def bind(self, open_traces: Callable[[], float], buffered: Callable[[], float],
             retained: Callable[[], float]) -> None:
        """Read the gauges from the assembler's state at scrape time."""
        self.open_traces.set_function(open_traces)
        self.buffered_bytes.set_function(buffered)
        self.retained_bytes.set_function(retained)

    def render(self) -> bytes:
        return generate_latest(self.registry)
