"""The embedded durable log: group commit, ordering, reader API, crash safety, failure reporting."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sinks.base import SIGNAL_LOGS, SIGNAL_TRACES, SPANS_TOPIC, VALUE_CONTENT_TYPE, Batch, Record, SinkUnavailable
from sinks.local_log import LocalLogReader, LocalLogSink
from tests.sink_support import make_batch

REPO_ROOT = Path(__file__).resolve().parents[1]


def ids(key: str) -> tuple[int, int]:
    return int(key[:16], 16), int(key[16:], 16)


def read_all(reader: LocalLogReader, page: int = 50) -> list:
    out, after = [], 0
    while chunk := reader.read(after, page):
        out.extend(chunk)
        after = chunk[-1].offset
    return out


async def test_concurrent_writes_are_group_committed_and_read_back_once_in_order(tmp_path: Path) -> None:
    sink = LocalLogSink(tmp_path)
    await sink.start()
    writes = 300
    batches = {b: make_batch(b, records=1 + b % 5) for b in range(writes)}

    # A reader tailing the log while it is written must only ever see a gap-free prefix: offsets are assigned
    # by one writer in commit order.
    seen_while_writing: list[int] = []
    done = threading.Event()

    def tail() -> None:
        with LocalLogReader(sink.path) as reader:
            after = 0
            while not done.is_set() or reader.last_offset() > after:
                for record in reader.read(after, 37):
                    seen_while_writing.append(record.offset)
                    after = record.offset

    tailer = asyncio.create_task(asyncio.to_thread(tail))
    await asyncio.gather(*(sink.write(batch) for batch in batches.values()))
    done.set()
    await tailer
    await sink.stop()

    total = sum(len(b.records) for b in batches.values())
    assert seen_while_writing == list(range(1, total + 1))
    # Group commit: the 300 writes were queued while the writer was busy, so they shared transactions.
    assert sink.commits < writes

    with LocalLogReader(sink.path) as reader:
        records = read_all(reader)
        assert reader.last_offset() == total
    assert [r.offset for r in records] == list(range(1, total + 1))
    assert sorted(ids(r.key) for r in records) == sorted(
        (b, i) for b, batch in batches.items() for i in range(len(batch.records))
    )
    # Each batch is one contiguous run, in its own record order.
    by_batch: dict[int, list[tuple[int, int]]] = {}
    for r in records:
        b, i = ids(r.key)
        by_batch.setdefault(b, []).append((r.offset, i))
    for b, entries in by_batch.items():
        offsets = [o for o, _ in entries]
        assert offsets == list(range(offsets[0], offsets[0] + len(entries)))
        assert [i for _, i in entries] == list(range(len(batches[b].records)))
    # Every column round-trips.
    first = records[0]
    b, i = ids(first.key)
    assert first.value == batches[b].records[i].value
    assert (first.topic, first.signal, first.source_id, first.content_type) == (
        SPANS_TOPIC,
        SIGNAL_TRACES,
        "test-source",
        VALUE_CONTENT_TYPE,
    )
    assert first.received_at_ns == batches[b].received_at_ns


async def test_null_keys_topics_and_group_offsets(tmp_path: Path) -> None:
    spans = LocalLogSink(tmp_path)
    await spans.start()
    await spans.write(Batch([Record(None, b"log-record", SIGNAL_LOGS, 1)], "src", 1))
    await spans.write(make_batch(1, 2))
    await spans.stop()
    other = LocalLogSink(tmp_path, topic="other-topic")
    await other.start()
    await other.write(make_batch(2, 1))
    await other.stop()

    with LocalLogReader(tmp_path / "spans.db") as reader:
        everything = reader.read(0, 100)
        assert [r.offset for r in everything] == [1, 2, 3, 4]
        assert everything[0].key is None and everything[0].signal == SIGNAL_LOGS
        assert [r.offset for r in reader.read(0, 100, topic=SPANS_TOPIC)] == [1, 2, 3]
        assert [r.offset for r in reader.read(1, 1, topic=SPANS_TOPIC)] == [2]
        assert [r.offset for r in reader.read(0, 100, topic="other-topic")] == [4]
        assert reader.last_offset() == 4
        assert reader.last_offset(topic=SPANS_TOPIC) == 3
        assert reader.last_offset(topic="nothing-here") == 0

        assert reader.committed_offset("assembler", SPANS_TOPIC) == 0
        reader.commit_offset("assembler", SPANS_TOPIC, 2)
        reader.commit_offset("assembler", SPANS_TOPIC, 3)
        reader.commit_offset("grader", SPANS_TOPIC, 1)
    with LocalLogReader(tmp_path / "spans.db") as reader:  # committed offsets are durable
        assert reader.committed_offset("assembler", SPANS_TOPIC) == 3
        assert reader.committed_offset("grader", SPANS_TOPIC) == 1
        assert reader.committed_offset("assembler", "other-topic") == 0


def test_reader_never_creates_a_log(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        LocalLogReader(tmp_path / "spans.db")
    assert not (tmp_path / "spans.db").exists()


async def test_write_outside_start_stop_is_refused(tmp_path: Path) -> None:
    sink = LocalLogSink(tmp_path)
    with pytest.raises(SinkUnavailable, match="not running"):
        await sink.write(make_batch(0, 1))
    await sink.start()
    assert await sink.ready()
    await sink.stop()
    assert not await sink.ready()
    with pytest.raises(SinkUnavailable, match="not running"):
        await sink.write(make_batch(0, 1))


async def test_start_reports_an_unusable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SinkUnavailable, match="a-file"):
        await LocalLogSink(blocker / "state").start()


async def test_queue_bound_refuses_writes_beyond_it(tmp_path: Path) -> None:
    sink = LocalLogSink(tmp_path, max_queued_bytes=50_000)
    await sink.start()
    # All 40 writes queue up in the same event-loop step, before any commit can be acknowledged, so the
    # bytes waiting for commit exceed the bound after five 10 kB batches.
    results = await asyncio.gather(
        *(sink.write(make_batch(b, 1, value_size=10_000)) for b in range(40)), return_exceptions=True
    )
    await sink.stop()
    refused = [r for r in results if isinstance(r, SinkUnavailable)]
    assert refused and "behind" in str(refused[0])
    assert all(r is None or isinstance(r, SinkUnavailable) for r in results)
    assert sink.queued_bytes == 0
    accepted = {b for b, r in enumerate(results) if r is None}
    with LocalLogReader(sink.path) as reader:
        assert {ids(r.key)[0] for r in read_all(reader)} == accepted


async def test_full_log_fails_writes_clearly_and_recovers(tmp_path: Path) -> None:
    sink = LocalLogSink(tmp_path, max_db_bytes=256 * 1024)
    await sink.start()
    acked = []
    with pytest.raises(SinkUnavailable) as excinfo:
        for b in range(1000):
            await sink.write(make_batch(b, 4, value_size=4000))
            acked.append(b)
    assert "not writable" in str(excinfo.value) and "full" in str(excinfo.value)
    assert acked and not await sink.ready()
    # The failed batch left nothing behind; everything acknowledged is there.
    with LocalLogReader(sink.path) as reader:
        assert sorted({ids(r.key)[0] for r in read_all(reader)}) == acked

    # Space freed by someone else (later: retention), the next write succeeds and readiness returns.
    with sqlite3.connect(sink.path) as conn:
        conn.execute('DELETE FROM records WHERE "offset" <= 20')
    await sink.write(make_batch(5000, 1))
    assert await sink.ready()
    await sink.stop()


# Writes batches from several concurrent tasks and prints "acked <batch id>" right after each write returns.
CRASH_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from tests.sink_support import make_batch
    from sinks.local_log import LocalLogSink

    async def main(state_dir, fsync):
        sink = LocalLogSink(state_dir, fsync=fsync)
        await sink.start()

        async def writer(w):
            for i in range(10**9):
                batch_id = w * 1_000_000 + i
                await sink.write(make_batch(batch_id, 3))
                print(f"acked {batch_id}", flush=True)

        await asyncio.gather(*(writer(w) for w in range(8)))

    asyncio.run(main(sys.argv[1], sys.argv[2] == "fsync"))
    """
)


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_sigkill_right_after_acks_loses_nothing(tmp_path: Path, fsync: bool) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, str(tmp_path), "fsync" if fsync else "no-fsync"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("acked "):
                acked.append(int(line.split()[1]))
                if len(acked) == 400:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        # Acks already written to the pipe before the kill count too.
        acked.extend(int(line.split()[1]) for line in proc.stdout if line.startswith("acked "))
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert len(acked) >= 400

    with LocalLogReader(tmp_path / "spans.db") as reader:
        stored: dict[int, list[int]] = {}
        for record in read_all(reader, page=500):
            batch_id, index = ids(record.key)
            stored.setdefault(batch_id, []).append(index)
    missing = [b for b in acked if stored.get(b) != [0, 1, 2]]
    assert not missing, f"{len(missing)} acknowledged batches lost or incomplete, e.g. {missing[:5]}"
    # Transactions are atomic: batches in flight at the kill are entirely present or entirely absent.
    assert all(indexes == [0, 1, 2] for indexes in stored.values())
