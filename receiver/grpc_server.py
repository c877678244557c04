"""OTLP/gRPC server (``grpc.aio``): ``TraceService/Export`` and ``LogsService/Export``.

Follows the OTLP specification §"OTLP/gRPC": INVALID_ARGUMENT (with ``google.rpc.BadRequest``) for data that cannot
be decoded, UNAUTHENTICATED without a valid bearer token, UNAVAILABLE with ``google.rpc.RetryInfo`` when the sink
cannot take the data now (the client retries after ``retry_delay``), and ``partial_success`` in the response when
some spans were invalid. The receive cap (``grpc.max_receive_message_length``) is set explicitly — grpcio's 4 MiB
default is below the spec's recommended 64 MiB — and grpc answers RESOURCE_EXHAUSTED above it. gzip-compressed
requests are decompressed by grpc itself.

The handlers take the request as raw bytes (no deserializer) so the protobuf is parsed exactly once, by the same
code as the HTTP path.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from receiver.auth import Authenticator
from receiver.errors import ReceiverError
from receiver.export import ExportService, parse_protobuf
from receiver.metrics import ReceiverMetrics
from receiver.status import export_response_body
from sinks.base import SIGNAL_LOGS, SIGNAL_TRACES, SinkUnavailable

log = structlog.get_logger(__name__)

_SERVICES = {
    "opentelemetry.proto.collector.trace.v1.TraceService": SIGNAL_TRACES,
    "opentelemetry.proto.collector.logs.v1.LogsService": SIGNAL_LOGS,
}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_RETRY_INFO_KEY = "google.rpc.retryinfo-bin"
_GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}
_MAX_MESSAGE_CHARS = 8192


def _status_trailer(code: grpc.StatusCode, message: str, detail=None) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=code.value[0], message=message)
    trailers = []
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
        if isinstance(detail, error_details_pb2.RetryInfo):
            # The OpenTelemetry Python exporter reads the delay only from this trailer, not from the status details.
            trailers.append((_RETRY_INFO_KEY, detail.SerializeToString()))
    return ((_STATUS_DETAILS_KEY, status.SerializeToString()), *trailers)


class GrpcReceiver:
    """Builds and runs the ``grpc.aio`` server. ``max_message_bytes``: receive cap (int, bytes); ``idle_timeout_s``:
    idle connections are closed (GOAWAY) and handshakes must finish within it; ``max_connections``: open
    connections (0 = no limit). A call the client cancelled (or whose deadline passed) is counted as
    ``CANCELLED`` / ``DEADLINE_EXCEEDED`` and logged at info level, not as an error."""

    def __init__(self, service: ExportService, auth: Authenticator, metrics: ReceiverMetrics, *,
                 max_message_bytes: int, idle_timeout_s: float = 60.0, max_connections: int = 0) -> None:
        self.service = service
        self.auth = auth
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.server: grpc.aio.Server | None = None

    def build(self, host: str, port: int,
              credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
        """Create the server bound to ``host:port``; returns it and the bound port (``port`` 0 = any free port).
        ``credentials``: TLS (``receiver.tls.ServerTls.grpc_credentials``); ``None`` = plaintext."""
        idle_ms = int(self.idle_timeout_s * 1000)
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            # gRPC's counterparts of the HTTP server's timeouts and connection limit (grpc core channel args).
            ("grpc.max_connection_idle_ms", idle_ms),
            ("grpc.server_handshake_timeout_ms", idle_ms),
        ]
        if self.max_connections:
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        server = grpc.aio.server(options=options)
        for service_name, signal in _SERVICES.items():
            handler = grpc.unary_unary_rpc_method_handler(self._handler(signal))
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, {"Export": handler}),))
        bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None
                 else server.add_insecure_port(f"{host}:{port}"))
        if bound == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        self.server = server
        return server, bound

    def _handler(self, signal: str):
        async def export(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._export(signal, request, context)
        return export

    async def _abort(self, context, signal: str, code: grpc.StatusCode, message: str, detail=None):
        self.metrics.requests.labels("grpc", signal, code.name).inc()
        message = message[:_MAX_MESSAGE_CHARS]
        await context.abort(code, message, trailing_metadata=_status_trailer(code, message, detail))

    async def _export(self, signal: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        received_at_ns = time.time_ns()
        metadata = dict(context.invocation_metadata() or ())
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]
        source_id = self.auth.source_for(metadata.get("authorization"))
        if source_id is None:
            await self._abort(context, signal, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        self.metrics.received_bytes.labels("grpc").inc(len(raw))
        reserved = 0
        try:
            self.service.reserve(len(raw))  # raises when refused: nothing reserved, nothing to release
            reserved = len(raw)
            message, wire = parse_protobuf(signal, raw)
            outcome = await self.service.export(signal, message, source_id, received_at_ns, wire, "otlp-grpc")
        except SinkUnavailable as exc:
            log.warning("export refused, client should retry", request_id=request_id, reason=str(exc))
            detail = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=exc.retry_after_s))
            await self._abort(context, signal, grpc.StatusCode.UNAVAILABLE, str(exc), detail)
        except ReceiverError as exc:
            log.info("export rejected", request_id=request_id, reason=exc.message)
            code = _GRPC_CODES.get(exc.grpc_code, grpc.StatusCode.INVALID_ARGUMENT)
            detail = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=getattr(exc, "field", None) or "request",
                                                            description=exc.message[:1024])]) \
                if code is grpc.StatusCode.INVALID_ARGUMENT else None
            await self._abort(context, signal, code, exc.message, detail)
        except asyncio.CancelledError:
            # grpc cancels the handler when the client cancels or its deadline passes: the client's doing.
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            self.metrics.requests.labels("grpc", signal, code).inc()
            log.info("client went away", request_id=request_id, detail=f"call {code.lower()} before the answer")
            raise
        except Exception:  # a bug, never bad input
            log.exception("internal error while exporting", request_id=request_id)
            await self._abort(context, signal, grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self.service.release(reserved)
        self.metrics.requests.labels("grpc", signal, "OK").inc()
        return export_response_body(signal, outcome.rejected, outcome.error_message, "application/x-protobuf")
