"""Where finished envelopes enter the loop when they did not come from the assembler: uploads to
``POST /v1/envelopes`` and pulled sources (``trace-source import`` / ``sync`` / ``watch`` / ``autoloop``).

A pulled or uploaded run is complete when it arrives, so its envelope goes straight to ``trace-source.traces`` in the
form the assembler writes (``pipeline.outputs.EnvelopeOutput``): key = trace id (32 hex, ASCII), value = envelope JSON,
headers from :func:`envelope_headers`. The loop's entry stage then journals it as imported and grades it.

**Once per idempotency key.** :meth:`EnvelopeSink.put` appends a record only when none was appended under the same
envelope idempotency key, and answers a repeated key with the original result (what a repeated upload gets):

* :class:`LocalEnvelopeSink` (embedded default) — the check, the append to the local log and the key's row are one
  SQLite transaction (``sinks.local_log.LocalLogAppender.append_once``), so the traces topic holds each key exactly
  once whatever process is killed when; the file view ``<state_dir>/traces/<trace_id>.json`` (the layout the
  assembler writes) follows.
* :class:`KafkaEnvelopeSink` — an idempotent ``acks=all`` producer, the keys remembered in a small SQLite table
  under the state dir *after* the broker acknowledged. A crash between the two can publish a key twice; the
  loop's ledger (keyed by envelope key) still imports and grades it once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from sinks.file_view import atomic_write_bytes, view_path
from sinks.base import SinkUnavailable
from sinks.local_log import LOG_FILENAME, LocalLogAppender, encode_headers

TRACES_TOPIC = "trace-source.traces"

HEADER_IDEMPOTENCY_KEY = "idempotency-key"
HEADER_ENVELOPE_VERSION = "envelope-version"
HEADER_CLOSED_REASON = "closed-reason"
HEADER_SOURCE_ID = "source-id"
HEADER_CONTENT_TYPE = "content-type"
#: What brought an envelope in (``import``, ``sync``, ``upload``, ``autoloop``); the grade stage records it as the
#: run's trigger.
HEADER_TRIGGER = "trace-source-trigger"
JSON_CONTENT_TYPE = "application/json"


def envelope_headers(*, idempotency_key: str, envelope_version: int, closed_reason: str, source_id: str,
                     trigger: str | None = None) -> list[tuple[str, bytes]]:
    """Headers of an envelope record on the traces topic (without ``content-type``, which the writer adds: a
    claim-check reference has another one)."""
    headers = [(HEADER_IDEMPOTENCY_KEY, idempotency_key.encode()),
               (HEADER_ENVELOPE_VERSION, str(envelope_version).encode()),
               (HEADER_CLOSED_REASON, closed_reason.encode()),
               (HEADER_SOURCE_ID, source_id.encode())]
    if trigger:
        headers.append((HEADER_TRIGGER, trigger.encode()))
    return headers


@dataclass(frozen=True, slots=True)
class EnvelopeRecord:
    """One envelope to put on the traces topic. ``value``: its JSON (``Envelope.to_json_bytes``)."""

    trace_id: str
    idempotency_key: str
    envelope_version: int
    closed_reason: str
    source_id: str
    value: bytes
    trigger: str | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        return envelope_headers(idempotency_key=self.idempotency_key, envelope_version=self.envelope_version,
                                closed_reason=self.closed_reason, source_id=self.source_id,
                                trigger=self.trigger) + [(HEADER_CONTENT_TYPE, JSON_CONTENT_TYPE.encode())]


@dataclass(frozen=True, slots=True)
class Accepted:
    """The outcome of :meth:`EnvelopeSink.put`: ``result`` — ``{"trace_id", "idempotency_key",
    "envelope_version", "topic", "partition", "offset", "accepted_at"}`` of the record that holds the key (the
    original one when ``created`` is false)."""

    result: dict
    created: bool


class EnvelopeTooLarge(Exception):
    """The envelope is larger than the destination accepts (Kafka ``max_request_size``)."""


class EnvelopeSink(Protocol):
    """Puts envelopes on the traces topic once per idempotency key. ``put`` returns once durable; raises
    ``sinks.base.SinkUnavailable`` (retry later) or :class:`EnvelopeTooLarge`."""

    async def start(self) -> None: ...

    async def put(self, record: EnvelopeRecord) -> Accepted: ...

    async def stop(self) -> None: ...

    def describe(self) -> str: ...


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _result(record: EnvelopeRecord, topic: str, partition: int, offset: int) -> dict:
    return {"trace_id": record.trace_id, "idempotency_key": record.idempotency_key,
            "envelope_version": record.envelope_version, "topic": topic, "partition": partition, "offset": offset,
            "accepted_at": _utc_now()}


class LocalEnvelopeSink:
    """The embedded shape: ``<state_dir>/spans.db`` (created when missing, so an import works before the first
    ``serve``; the loop picks the envelopes up when it runs) plus the file view ``<state_dir>/traces/``."""

    def __init__(self, state_dir: str | Path, *, topic: str = TRACES_TOPIC) -> None:
        self.state_dir = Path(state_dir)
        self.topic = topic
        self._appender: LocalLogAppender | None = None

    async def start(self) -> None:
        if self._appender is None:
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                self._appender = await asyncio.to_thread(LocalLogAppender, self.state_dir / LOG_FILENAME)
            except (OSError, sqlite3.Error) as exc:
                raise SinkUnavailable(f"cannot open the local log {self.state_dir / LOG_FILENAME}: {exc}") from exc

    def path_for(self, trace_id: str) -> Path:
        """The file view of a trace's latest envelope."""
        return view_path(self.state_dir, self.topic, trace_id.encode())

    async def put(self, record: EnvelopeRecord) -> Accepted:
        await self.start()
        appender = self._appender
        fresh = _result(record, self.topic, 0, 0)

        def write() -> Accepted:
            offset, stored, created = appender.append_once(
                self.topic, record.trace_id, record.value, encode_headers(record.headers()),
                content_type=JSON_CONTENT_TYPE, idempotency_key=record.idempotency_key,
                result=json.dumps(fresh), source_id=record.source_id, received_at_ns=time.time_ns())
            result = {**json.loads(stored), "offset": offset}
            path = self.path_for(record.trace_id)
            # A repeated key rewrites the view only when a crash came between the append and the file.
            if created or not path.exists():
                atomic_write_bytes(path, record.value)
            return Accepted(result, created)

        try:
            return await asyncio.to_thread(write)
        except (OSError, sqlite3.Error) as exc:
            raise SinkUnavailable(f"cannot append to the local log {self.state_dir / LOG_FILENAME}: {exc}") from exc

    async def stop(self) -> None:
        appender, self._appender = self._appender, None
        if appender is not None:
            await asyncio.to_thread(appender.close)

    def describe(self) -> str:
        return f"local log {self.state_dir / LOG_FILENAME} (topic {self.topic})"


class KafkaEnvelopeSink:
    """The cluster shape: the traces topic on Kafka (idempotent producer, ``acks=all``), keys remembered in
    ``<state_dir>/envelope-keys.db`` (one receiver's memory: replicas each keep their own, and the ledger dedupes
    what reaches the loop twice)."""

    def __init__(self, bootstrap_servers: str, state_dir: str | Path, *, topic: str = TRACES_TOPIC,
                 compression_type: str | None = "zstd", max_request_size: int = 1_048_576,
                 write_timeout_s: float = 15.0, retry_after_s: int = 2, security=None) -> None:
        self.bootstrap_servers = bootstrap_servers
        #: :class:`sinks.kafka_security.KafkaSecurity` (TLS / SASL), or None for PLAINTEXT.
        self.security = security
        self.topic = topic
        self.compression_type = compression_type
        self.max_request_size = max_request_size
        self.write_timeout_s = write_timeout_s
        self.retry_after_s = retry_after_s
        self.keys_path = Path(state_dir) / "envelope-keys.db"
        self._producer = None
        self._keys: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        from sinks.kafka_security import aiokafka_kwargs

        self.keys_path.parent.mkdir(parents=True, exist_ok=True)
        self._keys = sqlite3.connect(self.keys_path, check_same_thread=False, isolation_level=None)
        self._keys.execute("PRAGMA journal_mode=WAL")
        self._keys.execute("CREATE TABLE IF NOT EXISTS keys (topic TEXT NOT NULL, idempotency_key TEXT NOT NULL, "
                           "result TEXT NOT NULL, PRIMARY KEY (topic, idempotency_key)) WITHOUT ROWID")
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, client_id="trace-source",
                                          enable_idempotence=True, compression_type=self.compression_type,
                                          max_request_size=self.max_request_size,
                                          **aiokafka_kwargs(self.security))
        try:
            await self._producer.start()
        except (KafkaError, OSError) as exc:
            raise SinkUnavailable(f"cannot use Kafka at {self.bootstrap_servers}: {exc}",
                                  retry_after_s=self.retry_after_s) from exc

    def _stored(self, key: str) -> dict | None:
        with self._lock:
            row = self._keys.execute("SELECT result FROM keys WHERE topic = ? AND idempotency_key = ?",
                                     (self.topic, key)).fetchone()
        return None if row is None else json.loads(row[0])

    def _remember(self, key: str, result: dict) -> None:
        with self._lock:
            self._keys.execute("INSERT OR IGNORE INTO keys (topic, idempotency_key, result) VALUES (?, ?, ?)",
                               (self.topic, key, json.dumps(result)))

    async def put(self, record: EnvelopeRecord) -> Accepted:
        from aiokafka.errors import KafkaError, MessageSizeTooLargeError

        if (stored := await asyncio.to_thread(self._stored, record.idempotency_key)) is not None:
            return Accepted(stored, False)
        try:
            async with asyncio.timeout(self.write_timeout_s):
                meta = await self._producer.send_and_wait(self.topic, record.value, key=record.trace_id.encode(),
                                                          headers=record.headers())
        except MessageSizeTooLargeError as exc:
            raise EnvelopeTooLarge(f"the {len(record.value)}-byte envelope is larger than Kafka accepts "
                                   f"(max_request_size {self.max_request_size}): {exc}") from None
        except (KafkaError, TimeoutError, OSError) as exc:
            raise SinkUnavailable(f"Kafka at {self.bootstrap_servers} did not take the envelope: "
                                  f"{exc or type(exc).__name__}", retry_after_s=self.retry_after_s) from exc
        result = _result(record, self.topic, meta.partition, meta.offset)
        await asyncio.to_thread(self._remember, record.idempotency_key, result)
        return Accepted(result, True)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._keys is not None:
            self._keys.close()
            self._keys = None

    def describe(self) -> str:
        return f"kafka {self.bootstrap_servers} (topic {self.topic})"


def open_envelope_sink(*, state_dir: str | Path, kafka_bootstrap_servers: str | None = None,
                       topic: str = TRACES_TOPIC, max_request_size: int = 1_048_576,
                       security=None) -> EnvelopeSink:
    """Kafka when bootstrap servers are given (``security``: a :class:`sinks.kafka_security.KafkaSecurity` for TLS /
    SASL), else the embedded log under ``state_dir``. Not started yet."""
    if kafka_bootstrap_servers:
        return KafkaEnvelopeSink(kafka_bootstrap_servers, state_dir, topic=topic, max_request_size=max_request_size,
                                 security=security)
    return LocalEnvelopeSink(state_dir, topic=topic)
