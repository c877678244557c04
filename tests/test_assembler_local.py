"""The assembler loop (``pipeline.assembler.Assembler``) in-process over the local bus: output failures are retried
while the watermark holds the trace's offsets, an envelope that cannot be built dead-letters the trace's records,
and a restart resumes from the committed offset."""

from __future__ import annotations

import asyncio
import json

import pytest

from pipeline import assembler as assembler_mod
from pipeline.bus import BusPublishError
from pipeline.local_bus import LocalFilePublisher
from pipeline.settings import AssemblerSettings
from pipeline.worker import build_local_assembler
from sinks.base import Batch, Record
from sinks.local_log import LOG_FILENAME, LocalLogReader, LocalLogSink
from test_assembler_core import record, span, tid


async def write(state, *records) -> None:
    sink = LocalLogSink(state, fsync=False)
    await sink.start()
    try:
        for rec in records:
            await sink.write(Batch([Record(rec.key, rec.value, "traces", 1)], "src", 1))
    finally:
        await sink.stop()


def committed(state) -> int:
    with LocalLogReader(state / LOG_FILENAME) as reader:
        return reader.committed_offset("trace-source-assembler", "trace-source.spans")


def settings(state, **kw) -> AssemblerSettings:
    return AssemblerSettings(state_dir=state, quiet_period_s=0.2, commit_interval_s=0.05, tick_s=0.05, **kw)


async def run_until(asm, condition, timeout_s: float = 20.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(asm.run(stop))
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task


class FlakyPublisher(LocalFilePublisher):
    """Fails the first ``failures`` publishes, recording the committed offset at each failure."""

    def __init__(self, root, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.seen_committed: list[int] = []

    async def publish(self, topic, key, value, headers=()):
        if self.failures > 0:
            self.failures -= 1
            self.seen_committed.append(committed(self.root))
            raise BusPublishError("disk on fire")
        await super().publish(topic, key, value, headers)


async def test_failed_output_is_retried_and_the_watermark_holds(tmp_path, monkeypatch):
    state = tmp_path / "s"
    await write(state, record(0, span(0, 1, parent=0)), record(0, span(0, 0)), record(0, span(1, 0)))
    monkeypatch.setattr(assembler_mod, "_BACKOFF_START_S", 0.05)
    asm = build_local_assembler(settings(state))
    flaky = FlakyPublisher(state, failures=3)
    asm.output.publisher = flaky
    await run_until(asm, lambda: (state / "traces" / f"{tid(0)}.json").exists()
                    and (state / "traces" / f"{tid(1)}.json").exists() and committed(state) == 3)
    assert flaky.failures == 0 and all(c == 0 for c in flaky.seen_committed)  # nothing committed past a failure
    assert asm.metrics.publish_errors._value.get() == 3


async def test_envelope_that_cannot_be_built_dead_letters_its_records(tmp_path, monkeypatch):
    state = tmp_path / "s"
    await write(state, record(0, span(0, 0)), record(0, span(1, 0)))
    real = assembler_mod.build_envelope

    def broken(closed, **kw):
        if closed.trace_id == tid(0):
            raise ValueError("normalizer bug")
        return real(closed, **kw)

    monkeypatch.setattr(assembler_mod, "build_envelope", broken)
    asm = build_local_assembler(settings(state))
    await run_until(asm, lambda: committed(state) == 2 and (state / "traces" / f"{tid(1)}.json").exists())
    [letter] = (state / "dlq").glob("*.json")
    data = json.loads(letter.read_text())
    assert "normalizer bug" in data["headers"]["error"] and data["headers"]["original-key"] == tid(0)
    assert not (state / "traces" / f"{tid(0)}.json").exists()


async def test_restart_resumes_from_the_committed_offset(tmp_path):
    state = tmp_path / "s"
    await write(state, record(0, span(0, 0)))
    asm = build_local_assembler(settings(state))
    await run_until(asm, lambda: committed(state) == 1)
    first = (state / "traces" / f"{tid(0)}.json").stat().st_mtime_ns
    await write(state, record(0, span(1, 0)))
    with LocalLogReader(state / LOG_FILENAME) as reader:  # the log also holds the first envelope now
        last = reader.last_offset(topic="trace-source.spans")
    asm = build_local_assembler(settings(state))
    await run_until(asm, lambda: committed(state) == last)
    assert (state / "traces" / f"{tid(1)}.json").exists()
    assert (state / "traces" / f"{tid(0)}.json").stat().st_mtime_ns == first  # not read again


def test_no_embedded_log_is_a_clear_error(tmp_path):
    asm = build_local_assembler(settings(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no embedded log"):
        asyncio.run(asm.run(asyncio.Event()))


async def test_embedded_assembler_restarts_after_an_unexpected_failure(tmp_path, monkeypatch):
    import sqlite3

    from pipeline.local_bus import LocalLogConsumer
    from pipeline.worker import EmbeddedAssembler

    state = tmp_path / "s"
    await write(state, record(0, span(0, 0)))
    real_poll = LocalLogConsumer.poll
    calls = {"n": 0}

    async def poll(self, max_records, timeout_s):
        calls["n"] += 1
        if calls["n"] == 2:
            raise sqlite3.OperationalError("database is locked")
        return await real_poll(self, max_records, timeout_s)

    monkeypatch.setattr(LocalLogConsumer, "poll", poll)
    embedded = EmbeddedAssembler(settings(state), restart_delay_s=0.05)
    await embedded.start()
    try:
        async with asyncio.timeout(20):
            while not (state / "traces" / f"{tid(0)}.json").exists():
                await asyncio.sleep(0.05)
    finally:
        await embedded.stop()
    assert calls["n"] > 2
