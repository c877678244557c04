"""The benchmark's ceiling: a bare aiohttp server that only parses OTLP/HTTP protobuf trace requests.

``POST /v1/traces`` reads the body, decodes it as ``ExportTraceServiceRequest`` (the upb protobuf backend, as
``trace-source serve`` does) and answers 200 with an empty body (an empty ``ExportTraceServiceResponse`` encodes to
zero bytes) and ``Content-Type: application/x-protobuf``. Nothing is validated, split or stored; a body that does
not decode gets a 400 so a broken load generator cannot pass unnoticed.

It is set up like ``trace-source serve``'s HTTP server so the comparison is apples to apples: one process, the
plain asyncio event loop started by ``asyncio.run`` (serve does not use uvloop), an ``aiohttp.web.AppRunner`` with
``auto_decompress=False`` and no access log, ``client_max_size`` of 64 MiB, and a ``TCPSite`` with
``reuse_address``.

Run: ``python -m bench.reference_server --port 0``. Once listening it prints one JSON line to stderr,
``{"event": "serving", "http_port": N, ...}`` (the same event and field ``trace-source serve`` logs), and it stops
on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

MAX_BODY_BYTES = 64 * 1024 * 1024  # trace-source serve's default --max-body-bytes
PROTOBUF = "application/x-protobuf"


async def export_traces(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        ExportTraceServiceRequest.FromString(body)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the client's fault here
        return web.Response(status=400, text=f"cannot decode ExportTraceServiceRequest: {exc}")
    return web.Response(status=200, body=b"", content_type=PROTOBUF)


def make_app() -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v1/traces", export_traces)
    return app


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(), auto_decompress=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # the real port when --port 0
    print(json.dumps({"event": "serving", "http": f"http://{host}:{http_port}", "http_port": http_port,
                      "server": "reference (parse only)"}), file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=4319, help="port to listen on, 0 = a free port "
                                                                "(default: %(default)s)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
