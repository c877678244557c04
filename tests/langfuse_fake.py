"""A local HTTP server answering in the documented shape of Langfuse's public REST API — a fake only because
Langfuse cloud (a paid remote service) cannot run here.

Endpoints (Basic auth: public key / secret key, else 401 ``{"message": ...}``):

* ``GET /api/public/traces?page=&limit=&orderBy=timestamp.asc&fromTimestamp=`` -> ``{"data": [trace...],
  "meta": {"page", "limit", "totalItems", "totalPages"}}``; list items carry observation *ids*, as the API's
  ``TraceWithDetails`` does; ``fromTimestamp`` is inclusive.
* ``GET /api/public/traces/{traceId}`` -> ``TraceWithFullDetails``: the trace with full observation objects
  (``GENERATION`` with ``model`` and ``usageDetails``, ``SPAN``, ``TOOL``, ``EVENT``; ``level``,
  ``statusMessage``, ``parentObservationId``). ``detail_delay_s`` slows it; a trace id in ``hold`` is not answered
  until :meth:`release` (to kill a reader at a known point of a page).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from datetime import datetime, timedelta, timezone

from aiohttp import web


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def make_trace(n: int, timestamp: datetime, *, fail: bool) -> dict:
    """A support-bot run: a generation (tokens counted), a tool call that fails when ``fail``, an event."""
    tid = f"lf-{n:05d}"
    t = timestamp
    observations = [
        {"id": f"{tid}-gen", "traceId": tid, "type": "GENERATION", "name": "plan", "model": "gpt-4o-mini",
         "startTime": iso(t), "endTime": iso(t + timedelta(milliseconds=800)), "level": "DEFAULT",
         "input": [{"role": "user", "content": f"Where is parcel P-{n}?"}],
         "output": {"role": "assistant", "content": "Checking the carrier."},
         "usageDetails": {"input": 20 + n, "output": 7, "total": 27 + n}, "parentObservationId": None},
        {"id": f"{tid}-tool", "traceId": tid, "type": "TOOL", "name": "track_parcel",
         "startTime": iso(t + timedelta(milliseconds=900)), "endTime": iso(t + timedelta(milliseconds=1500)),
         "input": {"parcel": f"P-{n}"}, "output": None if fail else {"status": "in transit"},
         "level": "ERROR" if fail else "DEFAULT", "statusMessage": "carrier API returned 502" if fail else None,
         "parentObservationId": f"{tid}-gen"},
        {"id": f"{tid}-evt", "traceId": tid, "type": "EVENT", "name": "answered",
         "startTime": iso(t + timedelta(milliseconds=1600)), "endTime": None, "level": "DEFAULT",
         "parentObservationId": None},
    ]
    return {"id": tid, "timestamp": iso(t), "name": "support-bot", "input": {"question": f"Where is parcel P-{n}?"},
            "output": None if fail else "It is in transit.", "sessionId": f"s-{n % 3}", "userId": "u-1",
            "tags": ["prod"], "release": "1.2.0", "latency": 1.6, "observations": observations}


class FakeLangfuse:
    """Serves ``traces`` (a list of full trace dicts, mutable while running) on a free port in a thread."""

    def __init__(self, traces: list[dict], *, public_key: str = "pk-lf-test", secret_key: str = "sk-lf-test",
                 detail_delay_s: float = 0.0) -> None:
        self.traces = traces
        self.auth = "Basic " + base64.b64encode(f"{public_key}:{secret_key}".encode()).decode()
        self.detail_delay_s = detail_delay_s
        self.hold: set[str] = set()
        self._released: asyncio.Event | None = None
        self.requests: list[str] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == self.auth

    async def _list(self, request: web.Request) -> web.Response:
        self.requests.append(str(request.rel_url))
        if not self._authorized(request):
            return web.json_response({"message": "Invalid credentials"}, status=401)
        page, limit = int(request.query.get("page", 1)), int(request.query.get("limit", 50))
        rows = sorted(self.traces, key=lambda t: t["timestamp"])
        if since := request.query.get("fromTimestamp"):
            floor = datetime.fromisoformat(since.replace("Z", "+00:00"))
            rows = [t for t in rows if datetime.fromisoformat(t["timestamp"].replace("Z", "+00:00")) >= floor]
        chunk = rows[(page - 1) * limit: page * limit]
        data = [{**{k: v for k, v in t.items() if k != "observations"},
                 "observations": [o["id"] for o in t["observations"]], "scores": [],
                 "htmlPath": f"/trace/{t['id']}", "totalCost": 0.0} for t in chunk]
        return web.json_response({"data": data, "meta": {"page": page, "limit": limit, "totalItems": len(rows),
                                                          "totalPages": -(-len(rows) // limit)}})

    async def _detail(self, request: web.Request) -> web.Response:
        self.requests.append(str(request.rel_url))
        if not self._authorized(request):
            return web.json_response({"message": "Invalid credentials"}, status=401)
        if self.detail_delay_s:
            await asyncio.sleep(self.detail_delay_s)
        if request.match_info["trace_id"] in self.hold:
            await self._released.wait()
        found = next((t for t in self.traces if t["id"] == request.match_info["trace_id"]), None)
        if found is None:
            return web.json_response({"message": "Trace not found"}, status=404)
        return web.json_response({**found, "scores": [], "htmlPath": f"/trace/{found['id']}", "totalCost": 0.0})

    def start(self) -> "FakeLangfuse":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._released = asyncio.Event()
            app = web.Application()
            app.router.add_get("/api/public/traces", self._list)
            app.router.add_get("/api/public/traces/{trace_id}", self._detail)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def release(self) -> None:
        """Answer the held requests (and every later one)."""
        self._loop.call_soon_threadsafe(self._released.set)

    def stop(self) -> None:
        if self._loop is not None:
            self.release()
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "FakeLangfuse":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def many_traces(n: int, start: datetime | None = None, *, same_timestamp_every: int = 4) -> list[dict]:
    """``n`` runs; groups of ``same_timestamp_every`` share one timestamp (pages split such groups)."""
    start = start or datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    return [make_trace(i, start + timedelta(seconds=i // same_timestamp_every), fail=i % 3 == 0) for i in range(n)]


def wait(condition, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (value := condition()) is None or value is False:
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)
    return value
