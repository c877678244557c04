"""The assembler's memory of closed traces on Kafka, rebuilt on partition assignment: no restart gap for late data.

In memory the assembler remembers recently closed traces (``pipeline.buffers``: version, span ids and end times, log
ids), so late data becomes version N+1 of the whole trace. A restarted worker, or the new owner of a moved partition,
starts with that memory empty; embedded, ``TracesDirLookup`` refills it from ``<state_dir>/traces/``. On Kafka this
module does the same from a **compacted index topic** (``trace-source.traces-index``):

* after each envelope is published (and before its input offsets may be committed), one index record is written:
  key = trace id, value = JSON ``{"v": version, "p": partition, "o": offset, "r": root ended, "s": [[span id, end
  ns, status], ...], "l": [[span id, time ns, observed ns, severity, event name], ...]}`` — the facts the in-memory
  memory holds, plus where the envelope is on the traces topic. It goes to the **same partition number as the input
  record's**, so the owner of input partition *p* finds its traces' entries on index partition *p* whatever
  partitioner the span producers used (the OpenTelemetry Collector hashes with FNV-1a, aiokafka with murmur2).
  The topic is created with ``cleanup.policy=compact,delete``: Kafka keeps the latest entry per trace, for the
  retention period.
* on assignment of input partitions, the newest ``max_entries`` entries of those index partitions are read (in a
  background task: heartbeats continue, the assembler waits for it before looking anything up);
* when data for a trace the assembler does not remember arrives, :meth:`KafkaClosedTraces.load` answers from that
  index: a replay of what was emitted is recognized and dropped (no duplicate envelope); data that adds to it
  reopens it as version N+1, and only then is the previous envelope fetched from the traces topic (claim checks
  through the artifact store) so the new version holds the whole trace.

Memory: at most ``max_entries`` entries (``closed_traces_remembered``), each the size of its span and log ids.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

import orjson
import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from normalizers.envelope import Envelope
from pipeline.buffers import ClosedInfo, TraceFacts, _adds
from pipeline.bus import BusPublishError
from pipeline.outputs import Published, resolve_envelope
from sinks.kafka_security import KafkaSecurity, aiokafka_kwargs, start_or_explain

log = structlog.get_logger(__name__)

TRACES_INDEX_TOPIC = "trace-source.traces-index"
#: Topic configs of the index: keep the latest entry per trace id, and nothing older than the retention period.
INDEX_TOPIC_CONFIG = {"cleanup.policy": "compact,delete", "min.compaction.lag.ms": "60000"}


class _Entry:
    """One index entry: what :class:`~pipeline.buffers.ClosedInfo` remembers, and where the envelope is."""

    __slots__ = ("version", "partition", "offset", "root_ended", "spans", "logs")

    def __init__(self, data: dict) -> None:
        """From the decoded JSON of an index record (raises ``KeyError``/``ValueError``/``TypeError`` on another
        shape)."""
        self.version = int(data["v"])
        self.partition = int(data["p"])
        self.offset = int(data["o"])
        self.root_ended = bool(data["r"])
        self.spans = {s: (int(end), str(status)) for s, end, status in data["s"]}
        self.logs = {(str(a), int(b), int(c), int(d), str(e)) for a, b, c, d, e in data["l"]}

    @classmethod
    def of(cls, info: ClosedInfo, partition: int, offset: int) -> _Entry:
        """The entry of a trace just published: built from its facts, not by decoding the record written for it."""
        entry = cls.__new__(cls)
        entry.version, entry.partition, entry.offset = info.version, partition, offset
        entry.root_ended, entry.spans, entry.logs = info.root_ended, info.spans, info.logs
        return entry

    def to_json_bytes(self) -> bytes:
        """The index record's value: UTF-8 JSON in the shape of the module docstring."""
        return orjson.dumps({"v": self.version, "p": self.partition, "o": self.offset, "r": self.root_ended,
                             "s": [[s, end, status] for s, (end, status) in self.spans.items()],
                             "l": [list(lid) for lid in self.logs]})


class KafkaClosedTraces:
    """Lookup for :class:`pipeline.assembler.Assembler` on Kafka (see the module docstring).

    ``publisher``: the assembler's ``pipeline.kafka_bus.KafkaPublisher`` (index records go through it);
    ``artifact_root``: where claim-checked envelopes are; ``max_entries``: entries kept in memory.
    """

    def __init__(self, bootstrap_servers: str, *, index_topic: str, traces_topic: str, input_topic: str,
                 publisher, artifact_root: str | Path, max_entries: int, security: KafkaSecurity | None = None,
                 client_id: str = "trace-source-assembler-index") -> None:
        self.bootstrap_servers = bootstrap_servers
        self.index_topic = index_topic
        self.traces_topic = traces_topic
        self.input_topic = input_topic
        self.publisher = publisher
        self.artifact_root = Path(artifact_root)
        self.max_entries = max_entries
        self.security = security
        self._kwargs = dict(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
                            client_id=client_id, **aiokafka_kwargs(security))
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._reader: AIOKafkaConsumer | None = None
        self._loading: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one reader consumer, used by loads and fetches in turn
        self.enabled = True
        #: Entries read at the last assignment, and envelopes fetched since start (for logs and tests).
        self.loaded = 0
        self.fetched = 0

    async def start(self) -> None:
        """Connect the reader. Raises ``KafkaError``. Disables itself (with a warning) when the index topic has
        fewer partitions than the input topic, which would make the partition-for-partition layout impossible."""
        reader = AIOKafkaConsumer(**self._kwargs)
        await start_or_explain(reader.start, self.bootstrap_servers, self.security)
        self._reader = reader
        await reader._client.force_metadata_update()
        index = reader.partitions_for_topic(self.index_topic) or set()
        inputs = reader.partitions_for_topic(self.input_topic) or set()
        if len(index) < len(inputs):
            self.enabled = False
            log.warning("assembler.restart_memory_disabled", index_topic=self.index_topic,
                        index_partitions=len(index), input_partitions=len(inputs),
                        reason="the index topic needs at least as many partitions as the input topic")

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()

    # -- assignment ---------------------------------------------------------------------------------------------

    def on_assigned(self, partitions: set[int]) -> None:
        """Start reading the index partitions of ``partitions`` (in the background; :meth:`ready` waits)."""
        if not self.enabled or not partitions:
            return
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        self._loading = asyncio.create_task(self._load(set(partitions)), name="assembler-index-load")

    async def ready(self) -> None:
        """Wait until the last assignment's entries are in. A failed read is logged and leaves the memory as it
        is (late data then comes out as before: an envelope of its own)."""
        task = self._loading
        if task is None or task.done():
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return  # replaced by a newer assignment's load
            raise

    async def _load(self, partitions: set[int]) -> None:
        try:
            async with self._lock:
                entries = await self._read_tail(partitions)
        except (KafkaError, OSError, ValueError) as exc:
            log.warning("assembler.index_load_failed", partitions=sorted(partitions), error=repr(exc))
            return
        for trace_id, entry in entries:
            self._put(trace_id, entry)
        self.loaded = len(entries)
        log.info("assembler.index_loaded", partitions=sorted(partitions), entries=len(entries),
                 index_topic=self.index_topic)

    async def _read_tail(self, partitions: set[int]) -> list[tuple[str, _Entry]]:
        reader = self._reader
        assert reader is not None
        tps = [TopicPartition(self.index_topic, p) for p in sorted(partitions)]
        reader.assign(tps)
        begin = await reader.beginning_offsets(tps)
        end = await reader.end_offsets(tps)
        per_partition = max(1, self.max_entries // len(tps))
        for tp in tps:
            reader.seek(tp, max(begin[tp], end[tp] - per_partition))
        out: list[tuple[str, _Entry]] = []
        pending = {tp for tp in tps if end[tp] > begin[tp]}
        while pending:
            batches = await reader.getmany(*pending, timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                for m in records:
                    if m.key is not None and m.value is not None:
                        out.append((m.key.decode(), _Entry(orjson.loads(m.value))))
            pending = {tp for tp in pending if await reader.position(tp) < end[tp]}
        return out

    def _put(self, trace_id: str, entry: _Entry) -> None:
        self._entries.pop(trace_id, None)
        self._entries[trace_id] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    # -- lookup -------------------------------------------------------------------------------------------------

    def may_have(self, trace_id: str) -> bool:
        return trace_id in self._entries

    async def load(self, trace_id: str, facts: TraceFacts | None = None) -> ClosedInfo | None:
        """What is known of ``trace_id``'s last envelope; the envelope itself (``prior``) is fetched only when
        ``facts`` (the new record's) add to it, i.e. when it will be reopened as version N+1."""
        entry = self._entries.get(trace_id)
        if entry is None:
            return None
        info = ClosedInfo(version=entry.version, spans=dict(entry.spans), logs=set(entry.logs),
                          root_ended=entry.root_ended)
        if facts is None or _adds(info.spans, info.logs, facts):
            try:
                info.prior = await self._fetch(entry)
            except (KafkaError, OSError, ValueError, LookupError) as exc:
                # Without the earlier envelope the new version would hold only the new data under a version
                # number that claims more; better say nothing and let it be its own envelope, as before.
                log.warning("assembler.index_fetch_failed", trace_id=trace_id, error=repr(exc))
                return None
        return info

    async def _fetch(self, entry: _Entry) -> Envelope:
        async with self._lock:
            reader = self._reader
            assert reader is not None
            tp = TopicPartition(self.traces_topic, entry.partition)
            reader.assign([tp])
            reader.seek(tp, entry.offset)
            async with asyncio.timeout(30):
                while True:
                    batches = await reader.getmany(tp, timeout_ms=1000, max_records=1)
                    for m in batches.get(tp, []):
                        if m.offset != entry.offset:
                            raise LookupError(f"{self.traces_topic}/{entry.partition}@{entry.offset} is gone")
                        self.fetched += 1
                        return await asyncio.to_thread(resolve_envelope, m.value or b"", tuple(m.headers or ()),
                                                       self.artifact_root)

    # -- after a publish ----------------------------------------------------------------------------------------

    async def published(self, env: Envelope, published: Published, input_partition: int) -> None:
        """Record ``env`` (just published, durable) in the index: to Kafka, on ``input_partition``, and in memory.
        Raises ``pipeline.bus.BusPublishError`` (the caller retries before committing past the trace)."""
        if not self.enabled:
            return
        if published.partition is None or published.offset is None:
            raise BusPublishError("the traces topic did not report where the envelope landed")
        entry = _Entry.of(ClosedInfo.from_envelope(env), published.partition, published.offset)
        await self.publisher.publish(self.index_topic, env.trace_id.encode(), entry.to_json_bytes(),
                                     partition=input_partition)
        self._put(env.trace_id, entry)
