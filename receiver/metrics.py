"""Prometheus metrics of the receiver (prometheus-client), served at ``/metrics`` on the HTTP port.

Names follow Prometheus conventions (``_total`` counters, base units: bytes, seconds). One registry per
:class:`ReceiverMetrics` so tests and several servers in one process do not collide.
"""

from __future__ import annotations

import asyncio
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The *_created series double the exposition size and no dashboard of ours reads them.
disable_created_metrics()


class ReceiverMetrics:
    """The receiver's counters, histograms and gauges.

    Labels: ``protocol`` (``http`` | ``grpc``), ``signal`` (``traces`` | ``logs``), ``status`` (HTTP status code as
    text; for gRPC the status code name), ``sink`` (``kafka`` | ``local-log``).

    Under ``serve --workers`` (``PROMETHEUS_MULTIPROC_DIR`` set, see :mod:`trace_source.workers`) the values live
    in that directory, one file set per process, and :meth:`render` reports them summed over all workers; the
    in-flight gauge is then refreshed once a second (:meth:`refresh_forever`) and summed over live workers.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, inflight_bytes_fn=None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("trace_source_requests_total", "Export requests answered, by outcome.",
                                ["protocol", "signal", "status"], registry=r)
        self.items_accepted = Counter("trace_source_items_accepted_total",
                                      "Spans / log records accepted and written durably.", ["signal"], registry=r)
        self.items_rejected = Counter("trace_source_items_rejected_total",
                                      "Spans / log records rejected as invalid (reported as partial success).",
                                      ["signal"], registry=r)
        self.received_bytes = Counter("trace_source_received_bytes_total",
                                      "Request body bytes as received on the wire (before decompression).",
                                      ["protocol"], registry=r)
        self.decoded_bytes = Counter("trace_source_decoded_bytes_total",
                                     "Request body bytes after decompression.", ["protocol"], registry=r)
        self.records_written = Counter("trace_source_sink_records_total",
                                       "Per-trace records written to the sink.", ["sink", "signal"], registry=r)
        self.sink_errors = Counter("trace_source_sink_errors_total",
                                   "Sink writes that failed (the client was told to retry).", ["sink"], registry=r)
        self.sink_latency = Histogram(
            "trace_source_sink_write_seconds", "Time from handing a request's records to the sink to durability.",
            ["sink"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.inflight_bytes = Gauge("trace_source_inflight_bytes",
                                    "Bytes held by requests in flight plus bytes waiting in the sink.", registry=r,
                                    multiprocess_mode="livesum")
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._inflight_fn = inflight_bytes_fn
        if inflight_bytes_fn is not None and not self.multiprocess:
            self.inflight_bytes.set_function(inflight_bytes_fn)

    def render(self) -> bytes:
        """Prometheus text exposition format (``content_type``)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        self._refresh()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def _refresh(self) -> None:
        if self._inflight_fn is not None:
            self.inflight_bytes.set(self._inflight_fn())

    async def refresh_forever(self, interval_s: float = 1.0) -> None:
        """Multiprocess mode: keep this process's in-flight gauge current for the other workers' ``/metrics``."""
        while True:
            self._refresh()
            await asyncio.sleep(interval_s)
