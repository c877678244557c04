"""A cap on open OTLP/HTTP connections, and the count of them for ``/metrics``.

asyncio's server accepts every connection the kernel hands it. :class:`ConnectionLimiter` wraps the protocol factory
of the aiohttp server: each accepted connection takes a slot, given back when the connection is lost; a connection
beyond ``max_connections`` is closed right after it was accepted, before anything is read from it, and counted in
``trace_source_connections_refused_total``. OTLP exporters treat a connection closed before a reply as retryable
(spec §"Failures": retry with exponential backoff), so a refused client backs off and comes back, and the receiver's
file descriptors and memory stay bounded however many idle or slow clients show up.

The wrapper forwards every :class:`asyncio.Protocol` callback unchanged (``data_received``, ``eof_received``,
flow control), so aiohttp behaves exactly as without it. Connections count once made (after the TLS handshake when
TLS is on; asyncio bounds handshakes by its own 60 s timeout).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from receiver.metrics import ReceiverMetrics


class _Counted(asyncio.Protocol):
    """Forwards to ``inner``; holds a slot from ``connection_made`` to ``connection_lost``. (With TLS, asyncio calls
    neither when the handshake fails, so counting from the factory would leak slots.)"""

    __slots__ = ("_inner", "_limiter")

    def __init__(self, inner: asyncio.Protocol, limiter: "ConnectionLimiter") -> None:
        self._inner = inner
        self._limiter = limiter

    def connection_made(self, transport) -> None:
        self._limiter.open += 1
        self._limiter.gauge.inc()
        self._inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self._limiter.open -= 1
        self._limiter.gauge.dec()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refused(asyncio.Protocol):
    """Closes the connection as soon as it is made."""

    def connection_made(self, transport) -> None:
        transport.abort()  # RST: nothing buffered to flush, and the client learns at once


class ConnectionLimiter:
    """``protocol_factory`` for ``loop.create_server`` that admits at most ``max_connections`` at a time (0 = no
    limit). ``inner``: the aiohttp ``Server`` (``web.AppRunner.server``). Each server process counts its own
    connections (under ``serve --workers`` the limit is per worker process)."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], max_connections: int, metrics: ReceiverMetrics,
                 protocol: str = "http") -> None:
        self.inner = inner
        self.max_connections = max_connections
        self.open = 0
        # inc/dec rather than a callback: under serve --workers the gauge lives in the multiprocess files
        self.gauge = metrics.open_connections.labels(protocol)
        self.refused = metrics.connections_refused.labels(protocol)

    def __call__(self) -> asyncio.Protocol:
        if self.max_connections and self.open >= self.max_connections:
            self.refused.inc()
            return _Refused()
        return _Counted(self.inner(), self)
