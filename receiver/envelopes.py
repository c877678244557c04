"""``POST /v1/envelopes``: client-side uploads of finished trace-source envelopes (``trace-source import --upload``,
``sync --upload``), put on ``trace-source.traces`` so the loop imports and grades them like any other run.

Request: ``Content-Type: application/json`` (``Content-Encoding`` gzip / deflate / zstd accepted, the body cap applied
after decompression), the envelope JSON as the body, ``Idempotency-Key: <the envelope's idempotency_key>`` and, when
the receiver has tokens, ``Authorization: Bearer <token>``.

The receiver authenticates, validates the body against the published schema (``trace-source.envelope/v1``, the
pydantic model the JSON Schema is generated from), recomputes the idempotency key from the trace id and spans and
puts the envelope on the traces topic once per key (``sinks.envelopes``). Answers (JSON):

====== ===================== ===================================================================================
status ``error``             when
====== ===================== ===================================================================================
201                          accepted: ``{"trace_id", "idempotency_key", "envelope_version", "topic", "partition",
                             "offset", "accepted_at", "duplicate": false}``, durable (local log committed / Kafka
                             ``acks=all``)
200                          a key accepted before: the original result with ``"duplicate": true`` (header
                             ``Idempotent-Replayed: true``); nothing is written
400    ``bad idempotency     the header is missing, not 64 hex, differs from the envelope's key, or the envelope's
       key``                 key is not the one its trace id and spans give (both keys named)
400    ``upload rejected``   not JSON, or not a valid envelope (each violation with its location)
401    ``receiver auth       no or an unknown bearer token
       failure``
413 / 415                    body over the cap; not ``application/json`` or an unknown encoding
503                          the log or broker cannot take it now: ``Retry-After`` says when to retry
====== ===================== ===================================================================================
"""

from __future__ import annotations

import json
import re

import structlog
from aiohttp import web
from pydantic import ValidationError

from normalizers.envelope import SCHEMA_VERSION, Envelope, key_mismatch
from receiver.auth import Authenticator
from receiver.decompress import decompress
from receiver.errors import PayloadTooLarge, ReceiverError
from sinks.base import SinkUnavailable
from sinks.envelopes import EnvelopeRecord, EnvelopeSink, EnvelopeTooLarge

log = structlog.get_logger(__name__)

PATH = "/v1/envelopes"
TRIGGER = "upload"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

BAD_KEY = "bad idempotency key"
REJECTED = "upload rejected"
AUTH = "receiver auth failure"


def _error(status: int, kind: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": kind, "message": message, **extra}, status=status)


class EnvelopeUpload:
    """The handler; ``sink``: where envelopes go (started by the caller); ``max_body_bytes``: the cap after
    decompression (413)."""

    def __init__(self, sink: EnvelopeSink, auth: Authenticator, *, max_body_bytes: int) -> None:
        self.sink = sink
        self.auth = auth
        self.max_body_bytes = max_body_bytes

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("POST", PATH, self.post)

    async def post(self, request: web.Request) -> web.Response:
        source_id = self.auth.source_for(request.headers.get("Authorization"))
        if source_id is None:
            return _error(401, AUTH, "missing or invalid bearer token for POST /v1/envelopes")
        if request.content_type != "application/json":
            return _error(415, REJECTED, f"unsupported media type {request.content_type!r}; send application/json")
        header_key = (request.headers.get("Idempotency-Key") or "").strip()
        if not header_key:
            return _error(400, BAD_KEY, "the Idempotency-Key header is required: the envelope's idempotency_key")
        if not _HEX64.match(header_key):
            return _error(400, BAD_KEY, f"Idempotency-Key {header_key[:80]!r} is not an envelope key "
                                        "(64 lowercase hex characters)")
        try:
            if request.content_length is not None and request.content_length > self.max_body_bytes:
                raise PayloadTooLarge(self.max_body_bytes)
            raw = await request.read()
            body = decompress(raw, request.headers.get("Content-Encoding"), self.max_body_bytes)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, REJECTED, f"body exceeds the limit of {self.max_body_bytes} bytes")
        except ReceiverError as exc:
            return _error(exc.http_status, REJECTED, exc.message)
        try:
            envelope = Envelope.model_validate_json(body)
        except ValidationError as exc:
            if (mismatch := key_mismatch(exc)) is not None:
                return _error(400, BAD_KEY, "the envelope's idempotency_key is not the one its trace id and spans "
                              f"give: it says {mismatch.given}, recomputed {mismatch.expected}",
                              given=mismatch.given, expected=mismatch.expected)
            violations = [{"location": ".".join(str(p) for p in e["loc"]) or "(envelope)", "message": e["msg"]}
                          for e in exc.errors()[:20]]
            first = violations[0]
            return _error(400, REJECTED, f"not a valid {SCHEMA_VERSION} envelope: {first['location']}: "
                          f"{first['message']} ({exc.error_count()} violation(s))", violations=violations)
        if envelope.idempotency_key != header_key:
            return _error(400, BAD_KEY, f"Idempotency-Key {header_key} differs from the envelope's idempotency_key "
                                        f"{envelope.idempotency_key}")
        record = EnvelopeRecord(trace_id=envelope.trace_id, idempotency_key=envelope.idempotency_key,
                                envelope_version=envelope.envelope_version,
                                closed_reason=envelope.completeness.closed_reason, source_id=envelope.source.id,
                                value=envelope.to_json_bytes(), trigger=TRIGGER)
        try:
            accepted = await self.sink.put(record)
        except SinkUnavailable as exc:
            log.warning("envelope.unavailable", trace_id=envelope.trace_id, error=str(exc),
                        retry_after_s=exc.retry_after_s)
            return web.json_response({"error": "unavailable", "message": str(exc)}, status=503,
                                     headers={"Retry-After": str(exc.retry_after_s)})
        except EnvelopeTooLarge as exc:
            return _error(413, REJECTED, str(exc))
        log.info("envelope.uploaded", trace_id=envelope.trace_id, key=envelope.idempotency_key,
                 duplicate=not accepted.created, source=envelope.source.id, token_source=source_id)
        body_out = json.dumps({**accepted.result, "duplicate": not accepted.created})
        if accepted.created:
            return web.Response(status=201, body=body_out, content_type="application/json")
        return web.Response(status=200, body=body_out, content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
