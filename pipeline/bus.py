"""The small bus interface every pipeline stage runs on: consume a batch, commit, publish.

Two implementations: :mod:`pipeline.kafka_bus` (aiokafka consumer group, idempotent producer) and
:mod:`pipeline.local_bus` (the embedded SQLite log as one partition; output topics as files under the state dir).
A stage never talks to aiokafka or SQLite directly, so the same stage code runs in both shapes.

Offsets follow Kafka's convention everywhere: a committed offset is the *next* offset to read (``last processed +
1``). Partitions are plain ``int`` (the local bus has exactly one, ``0``). A consumer reads ONE input topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from sinks.local_log import decode_headers, encode_headers  # noqa: F401 - the stored form, re-exported

#: Headers as Kafka carries them: (name, value bytes), order kept, names may repeat.
Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class BusRecord:
    """One consumed record.

    ``offset``: position in its partition (local bus: the log offset, > 0, with gaps where other topics' records
    are). ``key``/``value``: raw bytes (``key`` may be ``None``). ``headers``: as produced (local bus: rebuilt from
    the log's columns with the same names, see ``sinks.base``).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = field(default_factory=tuple)

    def header(self, name: str, default: str | None = None) -> str | None:
        """Last value of header ``name`` decoded as UTF-8 (undecodable bytes replaced), else ``default``."""
        for k, v in reversed(self.headers):
            if k == name:
                return v.decode("utf-8", errors="replace")
        return default


class PartitionListener(Protocol):
    """Told when the consumer's partitions change (Kafka rebalances; the local bus assigns ``{0}`` once at start).

    ``on_revoked`` runs before the partitions move to another consumer: commit what is safe now and forget the
    partitions' state (the next owner replays from the committed offset). Both are awaited by the consumer; they
    must not wait for the stage's poll loop (that loop may itself be waiting on the consumer).
    """

    async def on_assigned(self, partitions: set[int]) -> None: ...

    async def on_revoked(self, partitions: set[int]) -> None: ...


class BusConsumer(Protocol):
    """A member of consumer group ``group_id`` reading ``topic``; offsets are committed only explicitly."""

    topic: str
    group_id: str

    async def start(self, listener: PartitionListener) -> None:
        """Join the group / open the log. Raises ``ConnectionError`` subclasses or ``OSError`` when unreachable."""
        ...

    async def poll(self, max_records: int, timeout_s: float) -> list[BusRecord]:
        """Up to ``max_records`` records in offset order per partition; ``[]`` after ``timeout_s`` without data."""
        ...

    async def commit(self, offsets: Mapping[int, int]) -> None:
        """Durably commit ``partition -> next offset to read``. Partitions no longer assigned are skipped."""
        ...

    def assignment(self) -> frozenset[int]:
        """Partitions currently owned."""
        ...

    async def stop(self) -> None: ...


class BusPublisher(Protocol):
    """Durable output. ``publish`` returns only once the record is durable (Kafka ``acks=all`` / fsynced file).

    ``max_message_bytes``: the largest record the destination accepts (``None`` = no limit); callers that may
    exceed it store the body elsewhere and publish a reference (claim check, see ``sinks.envelope_outputs``).
    """

    max_message_bytes: int | None

    async def start(self) -> None: ...

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        """Raises ``BusPublishError`` when the record cannot be stored (the caller retries)."""
        ...

    def record_size(self, key: bytes | None, value: bytes, headers: Headers = ()) -> int:
        """Encoded size of a record as the destination counts it against ``max_message_bytes``."""
        ...

    async def stop(self) -> None: ...


class BusPublishError(Exception):
    """A publish failed (broker unreachable, disk error). Retrying the same record is safe: outputs are keyed and
    idempotent downstream."""


class RecordTooLargeError(BusPublishError):
    """The destination refused the record for its size (e.g. a topic ``max.message.bytes`` below the publisher's
    ``max_message_bytes``). Retrying the same bytes cannot succeed; store the body aside instead (claim check)."""
