"""The journal's contract, one suite for both implementations: the embedded ``runs.jsonl`` (in tmp_path) and the
cluster's Postgres table (a fresh database on the real server of tests/postgres_harness.py); then what only one of
them has (the JSON-lines file's torn last line, the Postgres table's columns and schema)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from pipeline.journal import Journal, JournalError, JournalEvent, RunInfo, SourceRef, event_id, open_journal
from pipeline.journal.jsonl import JsonlJournal
from pipeline.journal.postgres import PostgresJournal
from store_support import run_in_processes, set_schema_version


@dataclass
class Backend:
    kind: str
    target: str  # the runs.jsonl path or the Postgres URL
    opened: list[Journal] = field(default_factory=list)

    async def started(self) -> Journal:
        """Another journal on the same store (its own file handle / pool), started."""
        journal = JsonlJournal(self.target) if self.kind == "jsonl" else PostgresJournal(self.target)
        self.opened.append(journal)
        await journal.start()
        return journal

    def stored_ids(self) -> list[str]:
        """Every stored event id in storage order, read without the journal's code."""
        if self.kind == "jsonl":
            lines = Path(self.target).read_bytes().splitlines() if Path(self.target).exists() else []
            return [json.loads(line)["event_id"] for line in lines]
        with psycopg.connect(self.target) as conn:
            return [r[0] for r in conn.execute("SELECT event_id FROM journal ORDER BY seq").fetchall()]


@pytest.fixture(params=["jsonl", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = (Backend("jsonl", str(tmp_path / "state" / "runs.jsonl")) if request.param == "jsonl"
         else Backend("postgres", request.getfixturevalue("postgres_url")))
    yield b
    for journal in b.opened:
        await journal.close()


@pytest.fixture
async def journal(backend: Backend) -> Journal:
    return await backend.started()


def event(n: int, *, trace: str = "a" * 32, parent: str | None = None, phase: str = "grade",
          status: str = "failed", details: dict | None = None, key: str = "k") -> JournalEvent:
    """The ``n``-th test event (the same every time it is built)."""
    at = f"2026-03-01T12:{n // 60 % 60:02d}:{n % 60:02d}.{n:06d}Z"
    return JournalEvent(
        event_id=event_id(key * 64, 0, n), at=at, trace_id=trace,
        envelope_key=f"{n:064x}", envelope_version=1, phase=phase, status=status, reason=f"reason {n}",
        artifacts=[f"grades/{trace}/grade.json"], stage_key="5" * 64, details=details or {"n": n},
        run=RunInfo(run_id=f"{n:032x}", policy="fix", source=SourceRef(id="src", kind="otlp-http"),
                    repository="acme/agent", trigger="otlp", parent_run_id=parent, created_at=at))


async def test_appends_are_idempotent_by_event_id(backend: Backend, journal: Journal):
    a, b, c = event(1), event(2), event(3)
    assert await journal.append([a, b]) == 2
    assert await journal.append([a]) == 0
    assert await journal.append([b, c, c, a]) == 1  # only c is new, and only once
    assert await journal.append([]) == 0
    assert await journal.events() == [a, b, c]
    assert backend.stored_ids() == [a.event_id, b.event_id, c.event_id]

    other = await backend.started()  # another process's view: it never saw these appends
    assert await other.append([c, event(4)]) == 1
    assert [e.event_id for e in await journal.events()] == [a.event_id, b.event_id, c.event_id, event(4).event_id]


async def test_events_come_back_exactly_in_append_order(journal: Journal):
    odd = {"nul": "before\x00after", "escaped": "\\u0000 is not a NUL", "big": 1e20, "small": 1.5e-7,
           "int": 2**63 + 1, "unicode": "grüße ✓ 🚀", "nested": {"list": [1, 2.0, None, True]}}
    appended = [event(0, details=odd)]
    for batch in range(4):
        appended += [event(1 + batch * 3 + i) for i in range(3)]
        assert await journal.append(appended[-3:]) == 3
    assert await journal.append(appended[:1]) == 1
    got = await journal.events()
    assert [e.event_id for e in got] == [e.event_id for e in appended[1:]] + [appended[0].event_id]
    assert got[-1] == appended[0] and got[-1].details == odd
    assert [e.model_dump_json() for e in got[:-1]] == [e.model_dump_json() for e in appended[1:]]


async def test_a_large_append_is_whole_and_in_order(journal: Journal):
    # More events than one Postgres INSERT takes (the journal then writes several statements in one transaction).
    events = [event(n, key="b") for n in range(2_500)]
    assert await journal.append(events) == 2_500
    last = event(2_500, key="b")
    assert await journal.append(events[1_000:1_500] + [last]) == 1
    assert [e.event_id for e in await journal.events()] == [e.event_id for e in events + [last]]


async def test_events_filter_by_trace_and_parent_run_and_keep_the_newest(journal: Journal):
    t1, t2 = "1" * 32, "2" * 32
    parent = "p" * 32
    evs = [event(0, trace=t1), event(1, trace=t2), event(2, trace=t1, parent=parent), event(3, trace=t2),
           event(4, trace=t1), event(5, trace=t2, parent=parent), event(6, trace=t1)]
    await journal.append(evs)
    assert await journal.events(trace_id=t1) == [evs[0], evs[2], evs[4], evs[6]]
    assert await journal.events(trace_id=t1, limit=2) == [evs[4], evs[6]]
    assert await journal.events(limit=3) == evs[-3:]
    assert await journal.events(limit=100) == evs
    assert await journal.events(parent_run_id=parent) == [evs[2], evs[5]]
    assert await journal.events(trace_id=t2, parent_run_id=parent) == [evs[5]]
    assert await journal.events(trace_id="3" * 32) == []


async def test_concurrent_appends_keep_each_calls_events_together_and_count_per_call(backend: Backend,
                                                                                      journal: Journal):
    await journal.append([event(0, key="x")])
    calls = [[event(n, key=k) for n in range(3)] for k in "cdefghij"]
    calls.append([event(0, key="x"), event(1, key="x")])  # one stored before, one new
    calls.append([event(1, key="x"), event(2, key="x")])  # x-1 is the previous call's, in the same group
    assert await asyncio.gather(*(journal.append(c) for c in calls)) == [3] * 8 + [1, 1]
    ids = backend.stored_ids()
    assert len(ids) == len(set(ids)) == 1 + 24 + 2
    for call in calls[:8]:  # each call's events contiguous, in its order
        start = ids.index(call[0].event_id)
        assert ids[start:start + 3] == [e.event_id for e in call]
    assert ids.index(event(1, key="x").event_id) < ids.index(event(2, key="x").event_id)
    if backend.kind == "postgres":
        assert (journal.appends.batches, journal.appends.items) == (2, 11)  # the ten calls in one group


async def test_postgres_appends_of_one_group_beyond_one_statement_and_with_a_refused_event(postgres_url: str):
    journal = PostgresJournal(postgres_url)
    await journal.start()
    try:
        calls = [[event(n, key=k) for n in range(400)] for k in "abc"]  # 1,200 rows: two statements
        assert await asyncio.gather(*(journal.append(c) for c in calls)) == [400] * 3
        assert journal.appends.batches == 1
        stored = [e.event_id for e in await journal.events()]
        assert sorted(stored) == sorted(e.event_id for c in calls for e in c)
        for call in calls:
            start = stored.index(call[0].event_id)
            assert stored[start:start + 400] == [e.event_id for e in call]

        bad = [event(1, key="d"), event(2, key="d", trace="a\x00" + "b" * 30)]  # text cannot hold NUL
        good = [[event(n, key=k) for n in range(2)] for k in "ef"]
        results = await asyncio.gather(journal.append(good[0]), journal.append(bad), journal.append(good[1]),
                                       return_exceptions=True)
        assert journal.appends.batches == 2
        assert results[0] == results[2] == 2
        assert isinstance(results[1], JournalError) and "NUL" in str(results[1])
        ids = {e.event_id for e in await journal.events()}
        assert {e.event_id for g in good for e in g} <= ids and not {e.event_id for e in bad} & ids  # bad: none
    finally:
        await journal.close()


_APPENDER = """
from pipeline.journal import JournalEvent

async def work(journal, args):
    events = [JournalEvent.model_validate_json(e) for e in args["events"]]
    new = 0
    for i in range(0, len(events), 5):
        new += await journal.append(events[i:i + 5])
    return new
"""
STORE = {"jsonl": "pipeline.journal.jsonl:JsonlJournal", "postgres": "pipeline.journal.postgres:PostgresJournal"}


async def test_processes_appending_at_once_lose_nothing_and_duplicate_nothing(backend: Backend, journal: Journal):
    shared = [event(n, key="s") for n in range(100)]  # both append these: a redelivered outcome, say
    own = [[event(n, key=k) for n in range(100)] for k in ("a", "b")]
    args = [{"store": STORE[backend.kind], "target": backend.target,
             "events": [e.model_dump_json() for e in mine + shared]} for mine in own]
    new = await asyncio.to_thread(run_in_processes, _APPENDER, args)
    assert sum(new) == 300
    ids = backend.stored_ids()
    assert len(ids) == len(set(ids)) == 300
    assert set(ids) == {e.event_id for e in shared + own[0] + own[1]}
    for mine in own:  # each process's events in the order it appended them
        position = {eid: i for i, eid in enumerate(ids)}
        assert [position[e.event_id] for e in mine] == sorted(position[e.event_id] for e in mine)
    assert len(await journal.events()) == 300


def test_open_journal_picks_the_implementation(tmp_path: Path):
    embedded = open_journal(None, tmp_path)
    assert isinstance(embedded, JsonlJournal) and embedded.path == tmp_path / "runs.jsonl"
    assert isinstance(open_journal("postgresql://u@h/db", tmp_path), PostgresJournal)


# -- the JSON-lines journal -----------------------------------------------------------------------------------------

async def test_a_torn_last_line_is_skipped_and_terminated_before_the_next_append(tmp_path: Path):
    path = tmp_path / "runs.jsonl"
    journal = JsonlJournal(path)
    await journal.start()
    first = event(1)
    await journal.append([first])
    torn = event(2).to_json_line()
    with open(path, "ab") as f:  # a crash half-way through writing the second event
        f.write(torn[: len(torn) // 2])
    assert await journal.events() == [first]
    assert await JsonlJournal(path).events() == [first]

    later = JsonlJournal(path)  # e.g. the restarted process
    await later.start()
    assert await later.append([event(3)]) == 1
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == torn[: len(torn) // 2] and lines[-1] == b""  # the fragment now ends in a newline of its own
    assert await later.events() == [first, event(3)]
    assert await later.append([event(2)]) == 1  # the torn event was never recorded: it can be appended whole
    assert [e.event_id for e in await journal.events()] == [first.event_id, event(3).event_id, event(2).event_id]
    assert await journal.append([event(3)]) == 0  # the first instance learns what the other appended


# -- the Postgres journal ----------------------------------------------------------------------------------------------

async def test_postgres_rows_carry_indexed_columns_and_the_event_as_jsonb(postgres_url: str):
    journal = PostgresJournal(postgres_url)
    await journal.start()
    try:
        e = event(7, trace="7" * 32, parent="q" * 32, phase="reproduce", status="flaky",
                  details={"attempts": 3, "note": "a\x00b"})
        await journal.append([e])
    finally:
        await journal.close()
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT event_id, trace_id, envelope_key, phase, status, at, parent_run_id, event "
                           "FROM journal").fetchone()
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'journal'")}
        jsonb_match = conn.execute("SELECT count(*) FROM journal WHERE event @> %s::jsonb",
                                   (json.dumps({"details": {"attempts": 3}, "run": {"repository": "acme/agent"}}),)
                                   ).fetchone()[0]
    assert row[:5] == (e.event_id, "7" * 32, e.envelope_key, "reproduce", "flaky") and row[6] == "q" * 32
    assert row[5] == datetime.fromisoformat(e.at)
    assert row[7]["details"] == {"attempts": 3, "note": "a\ufffdb"}  # jsonb cannot hold NUL; the body keeps it
    assert {"journal_trace", "journal_phase_status", "journal_at", "journal_parent_run"} <= indexes
    assert jsonb_match == 1


async def test_postgres_journal_schema_is_migrated_once_and_a_newer_one_refused(postgres_url: str):
    first, second = PostgresJournal(postgres_url), PostgresJournal(postgres_url)
    await asyncio.gather(first.start(), second.start())
    await first.append([event(1)])
    await first.close()
    await second.close()
    with psycopg.connect(postgres_url) as conn:
        versions = conn.execute("SELECT component, version FROM schema_migrations ORDER BY 1, 2").fetchall()
    assert versions == [("journal", 1)]
    set_schema_version(postgres_url, "journal", 2)
    with pytest.raises(JournalError, match=r"journal schema version 2; this trace-source knows up to 1"):
        await PostgresJournal(postgres_url).start()


async def test_postgres_journal_unreachable_is_a_clear_error():
    journal = PostgresJournal("postgresql://ops:hunter2-pw@127.0.0.1:1/loop", timeout_s=2)
    with pytest.raises(JournalError) as err:
        await journal.start()
    assert "postgresql://ops@127.0.0.1:1/loop" in str(err.value) and "hunter2-pw" not in str(err.value)
    with pytest.raises(JournalError, match="not started"):
        await journal.append([event(1)])


def test_status_and_reprocess_report_an_unreachable_postgres_journal_without_a_traceback(tmp_path: Path):
    from click.testing import CliRunner

    from trace_source.cli import main

    env = {"TRACE_SOURCE_DATABASE_URL": "postgresql://ops:hunter2-pw@127.0.0.1:1/loop"}
    for args in (["status"], ["reprocess", "abc"]):
        result = CliRunner().invoke(main, [*args, "--state-dir", str(tmp_path)], env=env)
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "cannot connect to Postgres at postgresql://ops@127.0.0.1:1/loop" in result.output
        assert "hunter2-pw" not in result.output
