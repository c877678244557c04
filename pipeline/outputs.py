"""Where envelopes and dead letters leave the assembler, over a ``pipeline.bus.BusPublisher``.

**Envelopes** — topic ``trace-source.traces``: key = trace id (32 hex, ASCII), value = envelope JSON
(``Envelope.to_json_bytes``), headers :data:`HEADER_IDEMPOTENCY_KEY` (64 hex), ``envelope-version``,
``closed-reason``, ``source-id``, ``content-type: application/json``. Compression is the producer's (zstd).
Embedded (``pipeline.local_bus.LocalFilePublisher``) the same record becomes ``<state_dir>/traces/<trace_id>.json``.

**Claim check** — a record larger than the publisher's ``max_message_bytes`` is never dropped: the body is written
atomically to ``<artifact_root>/envelopes/<idempotency_key>.json`` and the topic gets a small JSON reference
(:data:`CLAIM_CHECK_CONTENT_TYPE`; same key and headers) of the form::

    {"claim_check": {"path": "envelopes/<key>.json", "uri": "file:///...", "sha256": "<hex>", "size_bytes": N,
                     "content_type": "application/json"},
     "trace_id": "...", "idempotency_key": "...", "envelope_version": N, "schema_version": "..."}

``path`` is relative to the artifact store root, which every reader is configured with (a shared volume in the
cluster shape). :func:`resolve_envelope` turns either form back into an :class:`Envelope`.

**Dead letters** — topic ``trace-source.dlq``: key = ``<topic>:<partition>:<offset>`` of the original record (so a
replay re-publishes the same key), value = the original bytes, headers = the original headers plus ``error``,
``error-stage``, ``original-key``, ``source-topic``, ``source-partition``, ``source-offset``. An oversized dead
letter is claim-checked to ``<artifact_root>/dlq/<key>.bin`` the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from normalizers.envelope import Envelope
from pipeline.bus import BusPublisher, BusRecord, Headers, RecordTooLargeError
from pipeline.local_bus import JSON_CONTENT_TYPE, atomic_write_bytes, file_name
from sinks.envelopes import (  # noqa: F401 - one definition of the traces topic's record form, re-exported
    HEADER_CLOSED_REASON, HEADER_CONTENT_TYPE, HEADER_ENVELOPE_VERSION, HEADER_IDEMPOTENCY_KEY, TRACES_TOPIC,
    envelope_headers)

DLQ_TOPIC = "trace-source.dlq"
HEADER_CLAIM_CHECK = "claim-check"
HEADER_ERROR = "error"
CLAIM_CHECK_CONTENT_TYPE = "application/vnd.trace-source.claim-check+json"


@dataclass(frozen=True, slots=True)
class Published:
    """Outcome of one publish: ``size_bytes`` of the full body, ``claim_check`` path if it was stored aside;
    ``partition``/``offset`` of the record when the publisher reports them (Kafka)."""

    size_bytes: int
    claim_check: str | None = None
    partition: int | None = None
    offset: int | None = None


def _located(published: Published, delivered) -> Published:
    """``published`` with the partition and offset of ``delivered`` (a Kafka ``RecordMetadata``), if it has them."""
    partition, offset = getattr(delivered, "partition", None), getattr(delivered, "offset", None)
    if partition is None or offset is None:
        return published
    return Published(published.size_bytes, published.claim_check, partition, offset)


class DeadLetters:
    """Publishes dead letters to ``dlq_topic`` (claim-checked into ``artifact_root`` when too large). Used by the
    assembler (through :class:`EnvelopeOutput`) and by every loop stage runner.

    ``dead_letter`` returns once durable; it raises ``pipeline.bus.BusPublishError`` or ``OSError`` (artifact store)
    and may simply be retried: the DLQ key is the original record's position, so a retry is the same record.
    """

    def __init__(self, publisher: BusPublisher, *, dlq_topic: str = DLQ_TOPIC, artifact_root: str | Path) -> None:
        self.publisher = publisher
        self.dlq_topic = dlq_topic
        self.artifact_root = Path(artifact_root)

    async def dead_letter(self, rec: BusRecord, error: str, stage: str = "assembler") -> Published:
        """Publish ``rec`` (original bytes and headers) with ``error`` and the ``stage`` that gave up on it."""
        key = f"{rec.topic}:{rec.partition}:{rec.offset}".encode()
        headers: list[tuple[str, bytes]] = [(k, v) for k, v in rec.headers if k != HEADER_CONTENT_TYPE]
        original_type = rec.header(HEADER_CONTENT_TYPE, "application/octet-stream") or "application/octet-stream"
        headers += [
            (HEADER_ERROR, error.encode("utf-8", errors="replace")[:4096]),
            ("error-stage", stage.encode()),
            ("original-key", rec.key or b""),
            ("source-topic", rec.topic.encode()),
            ("source-partition", str(rec.partition).encode()),
            ("source-offset", str(rec.offset).encode()),
        ]
        plain = headers + [(HEADER_CONTENT_TYPE, original_type.encode())]
        if not self._too_large(key, rec.value, plain):
            try:
                await self.publisher.publish(self.dlq_topic, key, rec.value, plain)
                return Published(len(rec.value))
            except RecordTooLargeError:
                pass
        claim = f"dlq/{file_name(key)}.bin"
        ref = await self._store(claim, rec.value, original_type)
        await self.publisher.publish(self.dlq_topic, key, json.dumps(ref).encode(), headers + [
            (HEADER_CONTENT_TYPE, CLAIM_CHECK_CONTENT_TYPE.encode()), (HEADER_CLAIM_CHECK, claim.encode())])
        return Published(len(rec.value), claim)

    def _too_large(self, key: bytes, value: bytes, headers: Headers) -> bool:
        limit = self.publisher.max_message_bytes
        return limit is not None and self.publisher.record_size(key, value, headers) > limit

    async def _store(self, relpath: str, data: bytes, content_type: str) -> dict:
        path = self.artifact_root / relpath
        await asyncio.to_thread(atomic_write_bytes, path, data)
        return {"claim_check": {"path": relpath, "uri": path.resolve().as_uri(),
                                "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
                                "content_type": content_type}}


class EnvelopeOutput(DeadLetters):
    """Publishes envelopes to ``topic`` and dead letters to ``dlq_topic`` with claim checks into ``artifact_root``.

    ``publish``/``dead_letter`` return once durable; they raise ``pipeline.bus.BusPublishError`` or ``OSError``
    (artifact store) and may simply be retried: every write is keyed and idempotent.
    """

    def __init__(self, publisher: BusPublisher, *, topic: str = TRACES_TOPIC, dlq_topic: str = DLQ_TOPIC,
                 artifact_root: str | Path) -> None:
        super().__init__(publisher, dlq_topic=dlq_topic, artifact_root=artifact_root)
        self.topic = topic

    async def publish(self, envelope: Envelope) -> Published:
        key = envelope.trace_id.encode("ascii")
        value = envelope.to_json_bytes()
        headers = envelope_headers(idempotency_key=envelope.idempotency_key,
                                   envelope_version=envelope.envelope_version,
                                   closed_reason=envelope.completeness.closed_reason, source_id=envelope.source.id)
        if not self._too_large(key, value, headers):
            try:
                delivered = await self.publisher.publish(self.topic, key, value,
                                                         headers + [(HEADER_CONTENT_TYPE, JSON_CONTENT_TYPE.encode())])
                return _located(Published(len(value)), delivered)
            except RecordTooLargeError:
                pass  # the topic's own limit is lower than ours: claim check after all
        claim = f"envelopes/{envelope.idempotency_key}.json"
        ref = await self._store(claim, value, JSON_CONTENT_TYPE)
        ref.update(trace_id=envelope.trace_id, idempotency_key=envelope.idempotency_key,
                   envelope_version=envelope.envelope_version, schema_version=envelope.schema_version)
        delivered = await self.publisher.publish(self.topic, key, json.dumps(ref).encode(), headers + [
            (HEADER_CONTENT_TYPE, CLAIM_CHECK_CONTENT_TYPE.encode()), (HEADER_CLAIM_CHECK, claim.encode())])
        return _located(Published(len(value), claim), delivered)


class ClaimCheckError(Exception):
    """A claim-check reference whose body is missing or does not match its checksum."""


def resolve_envelope(value: bytes, headers: Headers, artifact_root: str | Path | None) -> Envelope:
    """The envelope carried by a traces-topic record: parsed from ``value``, or, for a claim-check reference, read
    from ``artifact_root`` and checked against its sha256. Raises :class:`ClaimCheckError`, ``OSError`` or
    ``pydantic.ValidationError``."""
    content_type = next((v.decode() for k, v in reversed(list(headers)) if k == HEADER_CONTENT_TYPE), "")
    if content_type != CLAIM_CHECK_CONTENT_TYPE:
        return Envelope.from_json_bytes(value)
    ref = json.loads(value)["claim_check"]
    if artifact_root is None:
        raise ClaimCheckError(f"envelope stored in the artifact store at {ref['path']}; no artifact dir given")
    data = (Path(artifact_root) / ref["path"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ClaimCheckError(f"{ref['path']}: sha256 does not match the reference")
    return Envelope.from_json_bytes(data)
