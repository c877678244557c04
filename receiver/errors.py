"""Receiver error types: one class per client-visible failure, each knowing its HTTP status and gRPC code.

Raised by the pure decoding modules (``receiver.decompress``, ``receiver.otlp_json`` wrapping
``normalizers.otlp_json``) and turned into responses by the servers: HTTP answers ``http_status`` with a
``google.rpc.Status`` body (``receiver.status.status_body``), gRPC aborts with ``grpc_code``. Codes are
``google.rpc.Code`` numbers (spec §"Failures"; reference otlp-receiver.md §1.4).

Only client errors live here. Every class is a ``ReceiverError``, so a caller can catch that one base and be sure
it never turns bad input into a 500.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ReceiverError",
    "BadRequest",
    "UnsupportedMediaType",
    "UnsupportedEncoding",
    "PayloadTooLarge",
    "InvalidCompressedData",
]


class ReceiverError(Exception):
    """Base of every error the receiver reports to a client.

    Attributes:
        message: human-readable English text for ``google.rpc.Status.message`` (str, unbounded here;
            ``receiver.status`` truncates it).
        http_status: HTTP status code to answer with (class attribute).
        grpc_code: ``google.rpc.Code`` number for gRPC / ``Status.code`` (class attribute).
    """

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[int] = 13  # INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ReceiverError):
    """Permanently invalid request data: HTTP 400 / INVALID_ARGUMENT; clients MUST NOT retry (spec §"Bad Data").

    Attributes:
        field: optional path of the offending field (e.g. ``resourceSpans[0].scopeSpans[1].spans[3].traceId``),
            for a ``google.rpc.BadRequest.FieldViolation``; None when the error is not about one field.
    """

    http_status: ClassVar[int] = 400
    grpc_code: ClassVar[int] = 3  # INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedMediaType(ReceiverError):
    """Content-Type (or Content-Encoding, see subclass) the receiver cannot decode: HTTP 415.

    gRPC has no media types; INVALID_ARGUMENT is the closest permanent code.
    """

    http_status: ClassVar[int] = 415
    grpc_code: ClassVar[int] = 3  # INVALID_ARGUMENT


class UnsupportedEncoding(UnsupportedMediaType):
    """Unknown or stacked ``Content-Encoding``: HTTP 415 (RFC 9110 §15.5.16).

    The OTel Collector answers 400 here (reference §1.2); 415 is the HTTP-correct status and still non-retryable.
    gRPC maps to UNIMPLEMENTED, as grpc-go does for an unknown compressor.

    Attributes:
        encoding: the Content-Encoding header value as received (str).
    """

    grpc_code: ClassVar[int] = 12  # UNIMPLEMENTED

    def __init__(self, encoding: str, message: str | None = None) -> None:
        super().__init__(message or f"unsupported Content-Encoding: {encoding!r}; supported: gzip, deflate, zlib, zstd")
        self.encoding = encoding


class PayloadTooLarge(ReceiverError):
    """Request body over the size cap, measured after decompression: HTTP 413 / RESOURCE_EXHAUSTED (non-retryable).

    spec v1.11.0 (PR #782) requires 413 and RESOURCE_EXHAUSTED; the Collector's 400 contradicts it (reference §1.4).

    Attributes:
        limit: the cap in bytes (int).
    """

    http_status: ClassVar[int] = 413
    grpc_code: ClassVar[int] = 8  # RESOURCE_EXHAUSTED

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes after decompression")
        self.limit = limit


class RecordRefused(ReceiverError):
    """The sink refused a per-trace record permanently (e.g. larger than the topic's ``max.message.bytes``):
    HTTP 413 / RESOURCE_EXHAUSTED without RetryInfo, so the exporter does not retry the same bytes."""

    http_status: ClassVar[int] = 413
    grpc_code: ClassVar[int] = 8  # RESOURCE_EXHAUSTED


class InvalidCompressedData(BadRequest):
    """Corrupt, truncated or trailing-garbage compressed body: HTTP 400 / INVALID_ARGUMENT."""
