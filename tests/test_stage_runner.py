"""The stage runner (``pipeline.runner``) with a small test stage, over the real embedded log, SQLite ledger and
``runs.jsonl`` journal: each stage key worked once, redelivery re-publishes the stored bytes, poison and
exhausted retries go to the DLQ, leases are renewed and released, other owners wait, the policy is honoured.

The test stage ("echo") is a plug-in like the real ones: it upper-cases its input and journals one event; it can
be told to fail (transiently or for good) or to take long, per trace id, through its attributes.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from pipeline.bus import BusRecord
from pipeline.journal import RunInfo, SourceRef, utc_now
from pipeline.journal.jsonl import JsonlJournal, read_events
from pipeline.ledger import stage_key
from pipeline.ledger.sqlite import SqliteLedger
from pipeline.local_bus import LocalBusPublisher, LocalLogConsumer
from pipeline.outputs import DeadLetters
from pipeline.runner import StageRunner
from pipeline.stage import (
    HEADER_IDEMPOTENCY_KEY, HEADER_RUN, EventDraft, Identity, Outcome, TransientError, WorkItem,
    identify_record)
from sinks.local_log import LOG_FILENAME, LocalLogAppender, LocalLogReader

IN, OUT = "trace-source.traces", "trace-source.echoes"


def tid(n: int) -> str:
    return f"{n + 1:032x}"


def ekey(n: int) -> str:
    return f"{n + 1:064x}"


class EchoStage:
    name = "echo"
    phase = "grade"
    entry = False
    input_topic = IN
    output_topic = OUT
    group_id = "echo-group"
    config_version = "v1"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.transient: dict[str, int] = {}  # trace id -> transient failures left
        self.broken: set[str] = set()  # trace ids whose work raises a bug
        self.slow: dict[str, float] = {}  # trace id -> seconds of work
        self.cancelled: list[str] = []

    def identify(self, record: BusRecord) -> Identity:
        return identify_record(record)

    def select(self, record: BusRecord) -> str | None:
        return "not for me" if record.value == b"skip" else None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def work(self, item: WorkItem) -> Outcome:
        tid_ = item.trace_id
        self.calls.append(tid_)
        if self.transient.get(tid_, 0) > 0:
            self.transient[tid_] -= 1
            raise TransientError("service briefly down")
        if tid_ in self.broken:
            raise KeyError("a stage bug")
        if tid_ in self.slow:
            try:
                await asyncio.sleep(self.slow[tid_])
            except asyncio.CancelledError:
                self.cancelled.append(tid_)
                raise
        return Outcome("done", item.record.value.upper(),
                       [EventDraft("grade", "passed", details={"attempt": item.attempt})])


def run_info(policy: str = "fix") -> RunInfo:
    return RunInfo(run_id="r" * 32, policy=policy, source=SourceRef(id="src", kind="otlp-http"), trigger="otlp",
                   created_at=utc_now())


def put(state: Path, n: int, value: bytes = b"hello", *, policy: str = "fix", key: str | None = None) -> None:
    from pipeline.bus import encode_headers

    appender = LocalLogAppender(state / LOG_FILENAME)
    try:
        headers = [(HEADER_IDEMPOTENCY_KEY, (key or ekey(n)).encode()),
                   (HEADER_RUN, run_info(policy).model_dump_json().encode())]
        appender.append(IN, tid(n), value, encode_headers(headers), content_type="application/json")
    finally:
        appender.close()


def outputs(state: Path) -> list:
    with LocalLogReader(state / LOG_FILENAME) as reader:
        return reader.read(0, 10_000, topic=OUT)


def committed(state: Path, group: str = "echo-group") -> int:
    with LocalLogReader(state / LOG_FILENAME) as reader:
        return reader.committed_offset(group, IN)


def last_input(state: Path) -> int:
    with LocalLogReader(state / LOG_FILENAME) as reader:
        return reader.last_offset(topic=IN)


class Harness:
    """A runner over ``state`` with its own ledger/journal/publisher (several may share the files)."""

    def __init__(self, state: Path, stage: EchoStage | None = None, *, group: str = "echo-group",
                 policy: str = "fix", **kw) -> None:
        self.state = state
        self.stage = stage or EchoStage()
        self.stage.group_id = group
        self.ledger = SqliteLedger(state / "ledger.db")
        self.journal = JsonlJournal(state / "runs.jsonl")
        self.publisher = LocalBusPublisher(state, file_topics=("trace-source.dlq",))
        kw = {"lease_s": 5.0, "backoff_start_s": 0.01, "backoff_max_s": 0.05, "poll_timeout_s": 0.05,
              "commit_interval_s": 0.05, **kw}
        self.runner = StageRunner(self.stage, LocalLogConsumer(state, topic=IN, group_id=group, poll_interval_s=0.02),
                                  self.publisher, DeadLetters(self.publisher, artifact_root=state / "artifacts"),
                                  self.ledger, self.journal, policy=policy, **kw)
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Harness:
        await self.ledger.start()
        await self.journal.start()
        await self.publisher.start()
        self.task = asyncio.create_task(self.runner.run(self.stop))
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
        await self.publisher.stop()
        await self.ledger.close()

    async def until(self, condition, timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                if self.task is not None and self.task.done():
                    self.task.result()
                await asyncio.sleep(0.02)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    LocalLogAppender(tmp_path / LOG_FILENAME).close()  # what serve creates
    return tmp_path


async def test_each_record_is_worked_once_published_journaled_and_committed(state):
    for n in range(3):
        put(state, n, f"run {n}".encode())
    put(state, 9, b"skip")
    async with Harness(state) as h:
        await h.until(lambda: committed(state) == last_input(state))
    assert sorted(h.stage.calls) == [tid(0), tid(1), tid(2)]
    outs = outputs(state)
    assert sorted(r.value for r in outs) == [b"RUN 0", b"RUN 1", b"RUN 2"]
    headers = dict(json.loads(outs[0].headers))
    assert set(headers) >= {"idempotency-key", "stage", "stage-key", "trace-source-run", "content-type"}
    events = read_events(state / "runs.jsonl")
    assert sorted(e.trace_id for e in events) == [tid(0), tid(1), tid(2)]
    assert all(e.stage_key == stage_key("echo", e.envelope_key, "v1") and e.run.run_id == "r" * 32 for e in events)
    ledger = SqliteLedger(state / "ledger.db")
    await ledger.start()
    try:
        rows = await ledger.rows()
        assert {r.state for r in rows} == {"done"} and len(rows) == 3
        assert all(r.attempts == 1 and r.input_topic == IN for r in rows)
    finally:
        await ledger.close()


async def test_redelivery_republishes_the_stored_bytes_and_never_works_again(state):
    for n in range(3):
        put(state, n)
    async with Harness(state) as h:
        await h.until(lambda: committed(state) == last_input(state))
    first = {r.key: (r.value, r.headers) for r in outputs(state)}
    journal_before = (state / "runs.jsonl").read_bytes()
    # The whole topic again, from offset 0, in a fresh consumer group (a replay), with the same ledger.
    async with Harness(state, group="replay-group") as h2:
        await h2.until(lambda: committed(state, "replay-group") == last_input(state))
    assert h2.stage.calls == []
    outs = outputs(state)
    assert len(outs) == 6
    for r in outs:
        assert (r.value, r.headers) == first[r.key]  # byte-identical, headers included
    assert (state / "runs.jsonl").read_bytes() == journal_before  # no duplicate events
    assert h2.runner.metrics.records.labels("echo", "republished")._value.get() == 3


async def test_poison_input_goes_to_the_dlq_and_the_partition_moves_on(state):
    put(state, 0, key="not-a-key")
    put(state, 1)
    async with Harness(state) as h:
        await h.until(lambda: committed(state) == last_input(state))
    assert h.stage.calls == [tid(1)]
    [letter] = (state / "dlq").glob("*.json")
    data = json.loads(letter.read_text())
    assert "is not an envelope key" in data["headers"]["error"] and data["headers"]["error-stage"] == "echo"


async def test_a_stage_bug_dead_letters_once_journals_the_error_and_is_not_retried_on_redelivery(state):
    put(state, 0)
    stage = EchoStage()
    stage.broken.add(tid(0))
    async with Harness(state, stage) as h:
        await h.until(lambda: committed(state) == last_input(state))
    assert stage.calls == [tid(0)]
    [event] = read_events(state / "runs.jsonl")
    assert event.status == "error" and "KeyError" in event.reason
    async with Harness(state, stage, group="again") as h2:
        await h2.until(lambda: committed(state, "again") == last_input(state))
    assert stage.calls == [tid(0)] and len(list((state / "dlq").glob("*.json"))) == 1
    assert h2.runner.metrics.records.labels("echo", "skipped")._value.get() == 1


async def test_transient_errors_are_retried_then_dead_lettered_after_max_attempts(state):
    put(state, 0)
    put(state, 1)
    stage = EchoStage()
    stage.transient = {tid(0): 2, tid(1): 100}
    async with Harness(state, stage, max_attempts=4) as h:
        await h.until(lambda: committed(state) == last_input(state))
    assert stage.calls.count(tid(0)) == 3  # two failures, then done
    assert stage.calls.count(tid(1)) == 4  # max_attempts claims, then the DLQ
    assert [r.value for r in outputs(state)] == [b"HELLO"]
    [letter] = (state / "dlq").glob("*.json")
    assert "gave up after 4 attempts: TransientError: service briefly down" in \
        json.loads(letter.read_text())["headers"]["error"]


async def test_long_work_renews_its_lease_and_another_owner_waits(state):
    put(state, 0)
    stage = EchoStage()
    stage.slow[tid(0)] = 1.5
    other = EchoStage()
    async with Harness(state, stage, lease_s=0.3) as h:
        await h.until(lambda: stage.calls == [tid(0)])
        # A second worker (another owner, another group reading the same record) finds a live lease: it waits for
        # the first to finish and then re-publishes its result instead of working.
        async with Harness(state, other, group="other", lease_s=0.3) as h2:
            await h2.until(lambda: committed(state, "other") == last_input(state))
        await h.until(lambda: committed(state) == last_input(state))
    assert other.calls == []
    assert h.runner.metrics.lease_renewals.labels("echo")._value.get() >= 2
    assert h2.runner.metrics.held.labels("echo")._value.get() >= 1
    assert [r.value for r in outputs(state)] == [b"HELLO", b"HELLO"]


async def test_shutdown_cancels_long_work_after_the_grace_period_and_releases_the_claim(state):
    put(state, 0)
    stage = EchoStage()
    stage.slow[tid(0)] = 60
    h = Harness(state, stage, lease_s=30.0, shutdown_grace_s=0.2)
    async with h:
        await h.until(lambda: stage.calls == [tid(0)])
    assert stage.cancelled == [tid(0)] and committed(state) == 0
    # Released, not left to a 30 s lease: the next worker takes it at once and finishes it.
    stage.slow.clear()
    started = time.monotonic()
    async with Harness(state, stage, lease_s=30.0) as h2:
        await h2.until(lambda: committed(state) == last_input(state))
    assert h2.runner.metrics.held.labels("echo")._value.get() == 0
    assert time.monotonic() - started < 25  # not a timing assertion of speed: it did not wait out the lease
    assert [r.value for r in outputs(state)] == [b"HELLO"]


async def test_a_claim_left_by_a_dead_worker_is_taken_over_once_its_lease_expires(state):
    from pipeline.ledger import RowInfo

    put(state, 0)
    ledger = SqliteLedger(state / "ledger.db")
    await ledger.start()
    key = stage_key("echo", ekey(0), "v1")
    await ledger.claim(key, RowInfo("echo", tid(0), ekey(0), "v1"), "dead-worker", 0.5)  # then it "died"
    await ledger.close()
    async with Harness(state) as h:
        await h.until(lambda: committed(state) == last_input(state))
    assert h.stage.calls == [tid(0)]
    assert h.runner.metrics.held.labels("echo")._value.get() >= 1
    ledger = SqliteLedger(state / "ledger.db")
    await ledger.start()
    row = await ledger.get(key)
    await ledger.close()
    assert row.state == "done" and row.attempts == 2


async def test_a_run_whose_policy_stops_before_the_stage_is_skipped(state):
    put(state, 0, policy="observe")
    put(state, 1, policy="fix")
    async with Harness(state, policy="fix") as h:
        await h.until(lambda: committed(state) == last_input(state))
    assert h.stage.calls == [tid(1)]
    async with Harness(state, EchoStage(), group="narrow", policy="observe") as h2:
        await h2.until(lambda: committed(state, "narrow") == last_input(state))
    assert h2.stage.calls == []  # the worker's own policy is narrower than the run's


async def test_distinct_traces_run_concurrently_one_traces_records_in_order_and_commits_stay_contiguous(state):
    class Tracking(EchoStage):
        def __init__(self) -> None:
            super().__init__()
            self.inflight = 0
            self.peak = 0
            self.order: list[bytes] = []

        async def work(self, item: WorkItem) -> Outcome:
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            try:
                await asyncio.sleep(0.05)
                self.order.append(item.record.value)
                return await super().work(item)
            finally:
                self.inflight -= 1

    # Trace 0 has three records (three envelope versions) that must stay in order; traces 1..6 one each.
    for v in range(3):
        put(state, 0, f"t0 v{v}".encode(), key=f"{100 + v:064x}")
    for n in range(1, 7):
        put(state, n)
    stage = Tracking()
    async with Harness(state, stage, concurrency=4) as h:
        await h.until(lambda: committed(state) == last_input(state))
    assert 2 <= stage.peak <= 4
    assert [v for v in stage.order if v.startswith(b"t0")] == [b"t0 v0", b"t0 v1", b"t0 v2"]
    assert len(outputs(state)) == 9
