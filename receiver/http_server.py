"""OTLP/HTTP server (aiohttp): ``POST /v1/traces`` and ``POST /v1/logs``, plus ``/healthz``, ``/readyz``, ``/metrics``.

Follows the OTLP specification (opentelemetry-proto ``docs/specification.md``, v1.11.0) §"OTLP/HTTP":

* ``application/x-protobuf`` and ``application/json`` bodies; the response carries the request's content type.
* ``Content-Encoding``: gzip, deflate (zlib-wrapped, as the OpenTelemetry Collector reads it), zlib, zstd; the body
  cap applies after decompression (413 above it).
* 200 with ``ExportTraceServiceResponse`` (``partial_success`` only when items were rejected); 400 with a
  ``google.rpc.Status`` (+ ``BadRequest``) for bad data; 401 without a valid bearer token; 405 for other methods;
  415 for other media types or encodings; 503 with ``Retry-After`` (+ ``RetryInfo``) when the sink cannot take the
  data or the in-flight budget is spent. A 200 is sent only once the sink reports the data durable.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import time
import uuid

import structlog
from aiohttp import web

from receiver.auth import Authenticator
from receiver.decompress import SUPPORTED_ENCODINGS, decompress
from receiver.errors import BadRequest, PayloadTooLarge, ReceiverError, UnsupportedEncoding, UnsupportedMediaType
from receiver.export import REQUEST_TYPES, ExportService, parse_protobuf
from receiver.metrics import ReceiverMetrics
from receiver.otlp_json import parse_json_request
from receiver.status import export_response_body, status_body
from sinks.base import SIGNAL_LOGS, SIGNAL_TRACES, SinkUnavailable

log = structlog.get_logger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# Some clients send the newer ``application/protobuf`` name; treat it like ``application/x-protobuf``.
_MEDIA_TYPES = {PROTOBUF: PROTOBUF, "application/protobuf": PROTOBUF, JSON: JSON}
_PATHS = {"/v1/traces": SIGNAL_TRACES, "/v1/logs": SIGNAL_LOGS}

# google.rpc.Code values used in Status bodies (ReceiverError subclasses carry their own).
_DEADLINE_EXCEEDED, _INTERNAL, _UNAVAILABLE, _UNAUTHENTICATED = 4, 13, 14, 16
#: ``status`` label of a request whose client went away before the answer (nginx's 499 "client closed request").
CLIENT_CLOSED = "499"
_ACCEPT_ENCODING = ", ".join(sorted(SUPPORTED_ENCODINGS))
# Bodies above this are decoded on a worker thread so one huge request does not stall the event loop.
_OFFLOAD_BYTES = 1 << 20


class HttpReceiver:
    """Builds the aiohttp application. ``max_body_bytes`` caps the body before and after decompression (int, bytes);
    ``cors_allowed_origins`` are exact origins or ``fnmatch`` patterns (``https://*.example.com``); empty = CORS off;
    ``read_timeout_s``: deadline for reading a body (408 and disconnect past it).

    A client that goes away before its answer (it closed the connection mid-body, or its exporter timed out while
    the sink was still making the data durable) is counted as status ``499`` (nginx's "client closed request")
    and logged at info level: it is the client's doing, not a server error, and an operator alerting on 5xx must
    not be paged by exporters timing out under load. The exporter retries; data it sent before the cut may have
    been stored, which the assembler's dedupe absorbs.
    """

    def __init__(self, service: ExportService, auth: Authenticator, metrics: ReceiverMetrics, *,
                 max_body_bytes: int, cors_allowed_origins: list[str] | None = None,
                 cors_allowed_headers: list[str] | None = None, cors_max_age_s: int = 7200,
                 read_timeout_s: float = 60.0, envelopes=None) -> None:
        self.service = service
        #: ``POST /v1/envelopes`` (a :class:`receiver.envelopes.EnvelopeUpload`), when serve offers uploads.
        self.envelopes = envelopes
        self.auth = auth
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.cors_origins = list(cors_allowed_origins or [])
        self.cors_headers = cors_allowed_headers or ["Content-Type", "Content-Encoding", "Authorization",
                                                     "X-Requested-With"]
        self.cors_max_age_s = cors_max_age_s
        self.shutting_down = False
        # Large bodies are decoded one at a time off the loop: a decode may hold up to the cap (a bomb) or, for JSON,
        # several times the body, and it runs before the budget knows the decoded size, so parallel decodes on the
        # thread pool would multiply that peak by the pool size.
        self._offload_slot = asyncio.Semaphore(1)

    def app(self) -> web.Application:
        # client_max_size bounds the raw (still compressed) body aiohttp will buffer; the decompressed size is
        # capped separately in receiver.decompress.
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._cors_middleware])
        for path in _PATHS:
            app.router.add_route("POST", path, self._export)
            app.router.add_route("OPTIONS", path, self._preflight)
            app.router.add_route("*", path, self._method_not_allowed)
        if self.envelopes is not None:
            self.envelopes.add_routes(app)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    def ops_app(self) -> web.Application:
        """Just ``/healthz``, ``/readyz`` and ``/metrics``: for a separate plain-HTTP port that probes and scrapers
        can reach when the OTLP port requires client certificates (mTLS)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    # --- CORS -------------------------------------------------------------------------------------------------

    def _origin_allowed(self, origin: str | None) -> bool:
        return bool(origin) and any(o == origin or fnmatch.fnmatchcase(origin, o) for o in self.cors_origins)

    @web.middleware
    async def _cors_middleware(self, request: web.Request, handler):
        response = await handler(request)
        origin = request.headers.get("Origin")
        if self.cors_origins and self._origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        return response

    async def _preflight(self, request: web.Request) -> web.Response:
        if not self.cors_origins:
            return await self._method_not_allowed(request)
        if not self._origin_allowed(request.headers.get("Origin")):
            return web.Response(status=403, text="CORS origin not allowed")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": ", ".join(self.cors_headers),
            "Access-Control-Max-Age": str(self.cors_max_age_s),
        })

    # --- export -----------------------------------------------------------------------------------------------

    async def _method_not_allowed(self, request: web.Request) -> web.Response:
        return web.Response(status=405, text="405 method not allowed, supported: [POST]",
                            headers={"Allow": "POST"})

    async def _export(self, request: web.Request) -> web.Response:
        received_at_ns = time.time_ns()
        signal = _PATHS[request.path]
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
        media = _MEDIA_TYPES.get(request.content_type)
        # Errors before we know the media type are answered as protobuf, the OTLP default encoding.
        reply_type = media or PROTOBUF
        reserved = 0
        try:
            if media is None:
                raise UnsupportedMediaType(
                    f"unsupported media type {request.content_type!r}, supported: [{JSON}, {PROTOBUF}]")
            source_id = self.auth.source_for(request.headers.get("Authorization"))
            if source_id is None:
                return self._reply(request, signal, 401, status_body(
                    _UNAUTHENTICATED, "missing or invalid bearer token", reply_type), reply_type, request_id,
                    {"WWW-Authenticate": 'Bearer realm="trace-source"'})
            length = request.content_length
            if length is not None and length > self.max_body_bytes:
                raise PayloadTooLarge(self.max_body_bytes)
            self.service.reserve(max(length or 0, 0))  # raises when refused: nothing reserved, nothing to release
            reserved = max(length or 0, 0)
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise PayloadTooLarge(self.max_body_bytes) from None
            except TimeoutError:
                return self._body_timeout(request, signal, reply_type, request_id)
            self.metrics.received_bytes.labels("http").inc(len(raw))
            encoding = request.headers.get("Content-Encoding")
            if len(raw) > _OFFLOAD_BYTES:
                async with self._offload_slot:
                    body = await asyncio.to_thread(decompress, raw, encoding, self.max_body_bytes)
            else:
                body = decompress(raw, encoding, self.max_body_bytes)
            extra = len(body) + len(raw) - reserved
            self.service.reserve(extra, held=reserved)
            reserved += extra
            self.metrics.decoded_bytes.labels("http").inc(len(body))
            wire = None
            if not body:  # an empty request is a success with nothing to write (OTLP: empty envelopes)
                message = REQUEST_TYPES[signal]()
            elif media is PROTOBUF:
                message, wire = parse_protobuf(signal, body)
            else:
                parse = functools.partial(parse_json_request, body, REQUEST_TYPES[signal])
                if len(body) > _OFFLOAD_BYTES:
                    async with self._offload_slot:
                        message = await asyncio.to_thread(parse)
                else:
                    message = parse()
            outcome = await self.service.export(signal, message, source_id, received_at_ns, wire)
            return self._reply(request, signal, 200, export_response_body(
                signal, outcome.rejected, outcome.error_message, reply_type), reply_type, request_id)
        except SinkUnavailable as exc:
            log.warning("export refused, client should retry", request_id=request_id, reason=str(exc))
            return self._reply(request, signal, 503, status_body(_UNAVAILABLE, str(exc), reply_type,
                                                                 retry_after_s=exc.retry_after_s),
                               reply_type, request_id, {"Retry-After": str(exc.retry_after_s)})
        except ReceiverError as exc:
            log.info("export rejected", request_id=request_id, status=exc.http_status, reason=exc.message)
            if type(exc) is UnsupportedMediaType:  # no encoding to answer in: plain text, like the Collector
                return self._reply(request, signal, 415, exc.message.encode(), "text/plain", request_id)
            headers = {"Accept-Encoding": _ACCEPT_ENCODING} if isinstance(exc, UnsupportedEncoding) else None
            field = (getattr(exc, "field", None) or "body") if isinstance(exc, BadRequest) else None
            return self._reply(request, signal, exc.http_status, status_body(
                exc.grpc_code, exc.message, reply_type, bad_request_field=field), reply_type, request_id, headers)
        except (ConnectionResetError, web.RequestPayloadError) as exc:  # the client went away mid-body
            return self._gone(request, signal, request_id, f"connection lost while reading the body: {exc}")
        except Exception:  # a bug, never bad input: answer 500 rather than dropping the connection
            log.exception("internal error while exporting", request_id=request_id)
            return self._reply(request, signal, 500, status_body(_INTERNAL, "internal error", reply_type),
                               reply_type, request_id)
        finally:
            self.service.release(reserved)

    def _reply(self, request: web.Request, signal: str, status: int, body: bytes, content_type: str,
               request_id: str, headers: dict[str, str] | None = None) -> web.Response:
        response = web.Response(status=status, body=body, content_type=content_type, headers=headers)
        response.headers["X-Request-Id"] = request_id
        transport = request.transport
        if transport is None or transport.is_closing():
            # Nobody is listening any more (e.g. the exporter's timeout fired while the sink worked).
            return self._gone(request, signal, request_id, f"client left before the answer ({status})")
        self.metrics.requests.labels("http", signal, str(status)).inc()
        return response

    def _gone(self, request: web.Request, signal: str, request_id: str, what: str) -> web.Response:
        self.metrics.requests.labels("http", signal, CLIENT_CLOSED).inc()
        log.info("client went away", request_id=request_id, detail=what)
        return web.Response(status=499)  # never sent: the connection is gone

    def _body_timeout(self, request: web.Request, signal: str, reply_type: str, request_id: str) -> web.Response:
        log.info("request body too slow, disconnecting", request_id=request_id, read_timeout_s=self.read_timeout_s)
        response = self._reply(request, signal, 408, status_body(_DEADLINE_EXCEEDED, (
            f"request body not received within {self.read_timeout_s:g} s"), reply_type), reply_type, request_id,
            {"Connection": "close"})
        response.force_close()
        return response

    # --- operations -------------------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        sink = self.service.sink
        ready = not self.shutting_down and await sink.ready()
        body = {"ready": ready, "sink": sink.describe(), "shutting_down": self.shutting_down}
        reason = None if ready else getattr(sink, "not_ready_reason", None)
        if reason:
            body["reason"] = reason  # e.g. the broker refused our password; operators see it in the probe output
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})
