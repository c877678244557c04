"""The operations endpoint every worker serves: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz``
(ready: started and able to work). ``serve`` has its own on the OTLP/HTTP port; workers run this one on
``--metrics-port``."""

from __future__ import annotations

from typing import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


async def start_health_server(registry: CollectorRegistry, ready: Callable[[], bool], host: str,
                              port: int) -> tuple[web.AppRunner, int]:
    """Start the server; returns its runner (``await runner.cleanup()`` stops it) and the bound port (``port=0``
    picks a free one). Raises ``OSError`` when the port is taken."""

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.Response(text="ready\n" if ok else "not ready\n", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
