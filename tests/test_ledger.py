"""The ledger's contract, one suite for both implementations: the embedded SQLite ledger (a file in tmp_path, with a
controllable clock) and the cluster's Postgres ledger (a fresh database on the real server of tests/postgres_harness.py,
leases on the server's clock: expiry is tested with short real leases and waiting until the server's clock passes
them)."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.ledger import (
    Acquired, Completion, Finished, Held, LeaseLost, Ledger, LedgerError, LedgerRow, RowInfo, open_ledger, stage_key)
from pipeline.ledger.postgres import PostgresLedger
from pipeline.ledger.sqlite import SqliteLedger
from postgres_harness import create_database
from store_support import run_in_processes, server_now, set_schema_version

LONG = 600.0  # a lease that does not expire during a test


class Clock:
    """The SQLite ledger's clock: moves forward 1 ms per reading (like real time, so updates are ordered) and jumps
    on :meth:`advance`."""

    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Backend:
    kind: str
    target: str  # the SQLite file or the Postgres URL
    clock: Clock | None = None
    #: A lease that :meth:`wait_expired` can make expire: the SQLite clock jumps, Postgres waits for real.
    short_lease: float = 0.3
    opened: list[Ledger] = field(default_factory=list)

    def ledger(self) -> Ledger:
        """Another ledger on the same store (its own connection / pool), not started."""
        led = (SqliteLedger(self.target, clock=self.clock) if self.kind == "sqlite"
               else PostgresLedger(self.target))
        self.opened.append(led)
        return led

    async def started(self) -> Ledger:
        led = self.ledger()
        await led.start()
        return led

    async def wait_expired(self, led: Ledger, key: str) -> None:
        """Return once the row's lease has expired on the ledger's clock."""
        row = await led.get(key)
        assert row is not None and row.lease_expires_at is not None
        if self.clock is not None:
            self.clock.t = max(self.clock.t, row.lease_expires_at) + 1.0
            return
        for _ in range(600):
            if await server_now(self.target) > row.lease_expires_at:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the server's clock never passed the lease ({row.lease_expires_at})")

    def set_schema_version(self, version: int) -> None:
        """Mark the store as written by a trace-source with ledger schema ``version``."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as conn:
                conn.execute(f"PRAGMA user_version = {version}")
        else:
            set_schema_version(self.target, "ledger", version)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        b = Backend("sqlite", str(tmp_path / "ledger.db"), clock=Clock(), short_lease=60.0)
    else:
        b = Backend("postgres", request.getfixturevalue("postgres_url"))
    yield b
    for led in b.opened:
        await led.close()


@pytest.fixture
async def ledger(backend: Backend) -> Ledger:
    return await backend.started()


def info(n: int = 0, *, stage: str = "grade", trace: str | None = None) -> RowInfo:
    return RowInfo(stage=stage, trace_id=trace or f"{n:032x}", envelope_key=f"{n:064x}", config_version="v1",
                   input_topic="trace-source.traces", input_partition=n % 4, input_offset=10_000_000_000 + n)


def key(n: int = 0, stage: str = "grade") -> str:
    return stage_key(stage, f"{n:064x}", "v1")


DONE = Completion(state="done", result=b'{"verdict": "failed"}\x00\xff',
                  result_headers=(("stage-key", b"k"), ("x", b"\x00\x01"), ("x", b"again")), journal=b'[{"e": 1}]')


# -- stage key ---------------------------------------------------------------------------------------------------

def test_stage_key_is_sha256_of_the_three_lines():
    # Vectors computed with `printf 'grade\n%s\nrules-1\n' aaa…a | sha256sum`.
    assert stage_key("grade", "a" * 64, "rules-1") == "748ad9bc0cfcee53faa090f8f4253a1d7bfda2ee5fab105617fd24fc49c67f1d"
    assert stage_key("fix", "0123456789abcdef" * 4, "v2") == (
        "69a1f2c97bb9f1af6ec1d7153ac12ddb34e96c9e7d87201241a4c200db17514d")
    assert stage_key("grade", "a" * 64, "rules-2") != stage_key("grade", "a" * 64, "rules-1")
    for bad in (("", "a", "v"), ("grade", "a\nb", "v"), ("grade", "a", "")):
        with pytest.raises(ValueError):
            stage_key(*bad)


# -- claim --------------------------------------------------------------------------------------------------------

async def test_a_new_key_is_acquired_with_its_row(ledger: Ledger):
    claim = await ledger.claim(key(7), info(7), "worker-a", 30.0)
    assert isinstance(claim, Acquired)
    row = claim.row
    assert (row.stage_key, row.stage, row.trace_id, row.envelope_key, row.config_version) == (
        key(7), "grade", f"{7:032x}", f"{7:064x}", "v1")
    assert (row.state, row.lease_owner, row.attempts, row.generation) == ("claimed", "worker-a", 1, 0)
    assert (row.input_topic, row.input_partition, row.input_offset) == ("trace-source.traces", 3, 10_000_000_007)
    assert (row.result, row.result_headers, row.error, row.journal) == (None, (), None, None)
    assert row.lease_expires_at - row.updated_at == pytest.approx(30.0, abs=0.01)
    assert row.created_at == row.updated_at
    assert await ledger.get(key(7)) == row
    assert await ledger.get(key(8)) is None


async def test_a_live_lease_is_held_and_its_owner_may_claim_again(ledger: Ledger):
    first = await ledger.claim(key(), info(), "worker-a", LONG)
    held = await ledger.claim(key(), info(), "worker-b", LONG)
    assert isinstance(held, Held)
    assert held.expires_at == first.row.lease_expires_at and held.row.lease_owner == "worker-a"
    assert (await ledger.get(key())).attempts == 1  # a held claim is not an attempt
    again = await ledger.claim(key(), info(), "worker-a", LONG)  # e.g. a redelivery to the same worker
    assert isinstance(again, Acquired)
    assert (again.row.lease_owner, again.row.attempts) == ("worker-a", 2)
    assert again.row.lease_expires_at >= first.row.lease_expires_at


async def test_an_expired_lease_is_taken_over_and_attempts_count(backend: Backend, ledger: Ledger):
    await ledger.claim(key(), info(), "worker-a", backend.short_lease)
    await backend.wait_expired(ledger, key())
    taken = await ledger.claim(key(), info(), "worker-b", LONG)
    assert isinstance(taken, Acquired)
    assert (taken.row.state, taken.row.lease_owner, taken.row.attempts) == ("claimed", "worker-b", 2)
    assert taken.row.created_at < taken.row.updated_at


async def test_a_finished_row_is_not_worked_again_and_returns_its_result(ledger: Ledger):
    await ledger.claim(key(), info(), "worker-a", LONG)
    done = await ledger.complete(key(), "worker-a", DONE)
    assert (done.state, done.lease_owner, done.lease_expires_at, done.error) == ("done", None, None, None)
    assert (done.result, done.result_headers, done.journal) == (DONE.result, DONE.result_headers, DONE.journal)
    for owner in ("worker-a", "worker-b"):
        claim = await ledger.claim(key(), info(), owner, LONG)
        assert isinstance(claim, Finished)
        assert claim.row == done  # nothing changed, not even attempts
    blocked = Completion(state="blocked", result=None, journal=b"[]")
    await ledger.claim(key(1), info(1), "worker-a", LONG)
    row = await ledger.complete(key(1), "worker-a", blocked)
    assert (row.state, row.result, row.result_headers) == ("blocked", None, ())
    assert isinstance(await ledger.claim(key(1), info(1), "worker-b", LONG), Finished)


async def test_fail_makes_the_row_terminal_with_its_error(ledger: Ledger):
    await ledger.claim(key(), info(), "worker-a", LONG)
    row = await ledger.fail(key(), "worker-a", "PoisonInput: not JSON")
    assert (row.state, row.error, row.lease_owner, row.lease_expires_at) == ("failed", "PoisonInput: not JSON", None,
                                                                             None)
    claim = await ledger.claim(key(), info(), "worker-b", LONG)
    assert isinstance(claim, Finished) and claim.row.state == "failed"


async def test_renew_extends_only_the_owners_lease(ledger: Ledger):
    first = (await ledger.claim(key(), info(), "worker-a", 10.0)).row
    await ledger.renew(key(), "worker-a", 100.0)
    renewed = await ledger.get(key())
    assert renewed.lease_expires_at - renewed.updated_at == pytest.approx(100.0, abs=0.01)
    assert renewed.lease_expires_at > first.lease_expires_at + 80
    assert renewed.attempts == 1
    with pytest.raises(LeaseLost, match="worker-a"):
        await ledger.renew(key(), "worker-b", 100.0)
    with pytest.raises(LeaseLost, match="nobody"):
        await ledger.renew(key(99), "worker-a", 100.0)


async def test_a_worker_that_lost_its_lease_is_fenced_off(backend: Backend, ledger: Ledger):
    await ledger.claim(key(), info(), "worker-a", backend.short_lease)
    await backend.wait_expired(ledger, key())
    assert isinstance(await ledger.claim(key(), info(), "worker-b", LONG), Acquired)
    before = await ledger.get(key())
    with pytest.raises(LeaseLost, match="worker-b"):
        await ledger.renew(key(), "worker-a", LONG)
    with pytest.raises(LeaseLost):
        await ledger.complete(key(), "worker-a", DONE)
    with pytest.raises(LeaseLost):
        await ledger.fail(key(), "worker-a", "late")
    await ledger.release(key(), "worker-a")  # a no-op for a non-owner
    assert await ledger.get(key()) == before
    row = await ledger.complete(key(), "worker-b", DONE)
    assert (row.state, row.result) == ("done", DONE.result)
    with pytest.raises(LeaseLost, match="done"):  # a terminal row has no lease to renew
        await ledger.renew(key(), "worker-b", LONG)


async def test_release_makes_the_row_claimable_at_once(ledger: Ledger):
    await ledger.claim(key(), info(), "worker-a", LONG)
    await ledger.release(key(), "worker-a")
    row = await ledger.get(key())
    assert (row.state, row.lease_owner) == ("claimed", None)
    assert row.lease_expires_at == pytest.approx(row.updated_at, abs=0.01)
    taken = await ledger.claim(key(), info(), "worker-b", LONG)
    assert isinstance(taken, Acquired) and (taken.row.lease_owner, taken.row.attempts) == ("worker-b", 2)
    with pytest.raises(LeaseLost):
        await ledger.complete(key(), "worker-a", DONE)


async def test_reopen_only_touches_terminal_rows_and_keeps_the_old_result(ledger: Ledger):
    assert await ledger.reopen(key(), "blocker fixed") is None
    await ledger.claim(key(), info(), "worker-a", LONG)
    claimed = await ledger.get(key())
    assert await ledger.reopen(key(), "blocker fixed") == claimed  # not terminal: unchanged
    await ledger.complete(key(), "worker-a", DONE)

    reopened = await ledger.reopen(key(), "repository contract added")
    assert (reopened.state, reopened.generation, reopened.lease_owner) == ("reopened", 1, None)
    assert reopened.error == "reopened: repository contract added"
    assert (reopened.result, reopened.result_headers, reopened.journal) == (
        DONE.result, DONE.result_headers, DONE.journal)
    assert await ledger.reopen(key(), "twice") == reopened  # reopened is not terminal: a second reopen does nothing

    again = await ledger.claim(key(), info(), "worker-b", LONG)
    assert isinstance(again, Acquired)
    assert (again.row.state, again.row.attempts, again.row.generation) == ("claimed", 2, 1)
    assert (await ledger.get(key())).result == DONE.result  # kept until replaced
    new = Completion(state="blocked", result=b"second", result_headers=(("h", b"2"),), journal=b"[2]")
    row = await ledger.complete(key(), "worker-b", new)
    assert (row.state, row.result, row.result_headers, row.journal, row.error, row.generation) == (
        "blocked", b"second", (("h", b"2"),), b"[2]", None, 1)

    await ledger.claim(key(1), info(1), "worker-a", LONG)
    await ledger.fail(key(1), "worker-a", "poison")
    assert (await ledger.reopen(key(1), "fixed the parser")).state == "reopened"


async def test_rows_are_newest_first_and_filter_by_trace_and_stage(ledger: Ledger):
    trace = "f" * 32
    order = []
    for n, stage in enumerate(("grade", "seed", "grade", "reproduce")):
        t = trace if n != 2 else "e" * 32
        await ledger.claim(key(n, stage), info(n, stage=stage, trace=t), "w", LONG)
        order.append(key(n, stage))
    await ledger.complete(key(0, "grade"), "w", DONE)  # the most recently updated now
    newest_first = [order[0], order[3], order[2], order[1]]

    assert [r.stage_key for r in await ledger.rows()] == newest_first
    assert [r.stage_key for r in await ledger.rows(limit=2)] == newest_first[:2]
    assert [r.stage_key for r in await ledger.rows(trace_id=trace)] == [order[0], order[3], order[1]]
    assert [r.stage_key for r in await ledger.rows(stage="grade")] == [order[0], order[2]]
    assert [r.stage_key for r in await ledger.rows(trace_id=trace, stage="grade")] == [order[0]]
    assert await ledger.rows(trace_id="0" * 32) == []
    rows = await ledger.rows()
    assert all(isinstance(r, LedgerRow) for r in rows) and rows[0] == await ledger.get(order[0])
    assert [r.updated_at for r in rows] == sorted((r.updated_at for r in rows), reverse=True)


# -- schema ---------------------------------------------------------------------------------------------------------

async def test_start_is_idempotent_and_keeps_the_rows(backend: Backend, ledger: Ledger):
    await ledger.claim(key(), info(), "worker-a", LONG)
    await ledger.close()
    again = await backend.started()
    other = await backend.started()
    assert (await other.get(key())).lease_owner == "worker-a"
    assert isinstance(await again.claim(key(), info(), "worker-b", LONG), Held)


async def test_a_store_written_by_a_newer_release_is_refused(backend: Backend, ledger: Ledger):
    await ledger.close()
    backend.set_schema_version(99)
    with pytest.raises(LedgerError, match=r"schema version 99.*knows up to 1 \(upgrade trace-source\)"):
        await backend.started()


async def test_concurrent_starts_migrate_once(backend: Backend):
    ledgers = [backend.ledger() for _ in range(6)]
    await asyncio.gather(*(led.start() for led in ledgers))
    claims = await asyncio.gather(*(led.claim(key(), info(), f"w{i}", LONG) for i, led in enumerate(ledgers)))
    assert sum(isinstance(c, Acquired) for c in claims) == 1


# -- concurrency ------------------------------------------------------------------------------------------------------

async def test_many_concurrent_claimers_of_one_key_get_exactly_one_lease(backend: Backend, ledger: Ledger):
    others = [await backend.started() for _ in range(3)]  # several connections / pools, and tasks on each
    ledgers = [ledger, *others]

    async def race(n: int) -> Acquired:
        claims = await asyncio.gather(*(ledgers[i % 4].claim(key(n), info(n), f"worker-{i}", LONG)
                                        for i in range(24)))
        winners = [c for c in claims if isinstance(c, Acquired)]
        assert len(winners) == 1
        assert all(isinstance(c, Held) and c.row.lease_owner == winners[0].row.lease_owner
                   for c in claims if c is not winners[0])
        return winners[0]

    for n in range(5):
        first = await race(n)  # a new key: everyone inserts at once
        assert (await ledger.get(key(n))).attempts == 1
        await ledger.release(key(n), first.row.lease_owner)
        second = await race(n)  # a released row: everyone may take it, one does
        assert second.row.attempts == 2
        await ledger.complete(key(n), second.row.lease_owner, DONE)
        await ledger.reopen(key(n), "again")
        third = await race(n)  # a reopened row, likewise
        assert (third.row.attempts, third.row.generation) == (3, 1)


_CLAIMER = """
from pipeline.ledger import Acquired, RowInfo, stage_key

async def work(led, args):
    async def one(n):
        info = RowInfo(stage="grade", trace_id=f"{n:032x}", envelope_key=f"{n:064x}", config_version="v1")
        claim = await led.claim(stage_key("grade", f"{n:064x}", "v1"), info, args["owner"], 600.0)
        return n if isinstance(claim, Acquired) else None
    won = await asyncio.gather(*(one(n) for n in range(args["keys"])))
    claims = getattr(led, "claims", None)  # the Postgres ledger's coalescer: inserts sent for these claims
    return [[n for n in won if n is not None], claims.batches if claims is not None else None]
"""
STORE = {"sqlite": "pipeline.ledger.sqlite:SqliteLedger", "postgres": "pipeline.ledger.postgres:PostgresLedger"}


async def test_claimers_in_several_processes_acquire_each_key_once(backend: Backend, ledger: Ledger):
    keys = 40
    for n in range(0, keys, 2):  # half the keys exist, released: a race to take them over, not to insert
        await ledger.claim(key(n), info(n), "earlier", LONG)
        await ledger.release(key(n), "earlier")
    args = [{"store": STORE[backend.kind], "target": backend.target, "owner": f"proc-{i}", "keys": keys}
            for i in range(4)]
    results = await asyncio.to_thread(run_in_processes, _CLAIMER, args)
    won = [per_process for per_process, _ in results]
    if backend.kind == "postgres":  # each process's concurrent claims went out as fewer insert statements
        assert all(batches < keys for _, batches in results), results
    all_won = sorted(n for per_process in won for n in per_process)
    assert all_won == list(range(keys))  # every key acquired, none twice
    rows = await ledger.rows(limit=keys + 1)
    assert len(rows) == keys
    assert {r.stage_key: r.attempts for r in rows} == {key(n): 2 if n % 2 == 0 else 1 for n in range(keys)}
    owner_of = {r.stage_key: r.lease_owner for r in rows}
    for i, per_process in enumerate(won):
        assert all(owner_of[key(n)] == f"proc-{i}" for n in per_process)


# -- coalescing (Postgres: concurrent claims and completions of one process share statements) ------------------------

@pytest.fixture
async def postgres_ledgers(postgres_url: str):
    """Opens started ledgers on the test database (each call another ledger object, as another process would have);
    all are closed at teardown."""
    opened: list[PostgresLedger] = []

    async def open_one() -> PostgresLedger:
        led = PostgresLedger(postgres_url)
        await led.start()
        opened.append(led)
        return led

    yield open_one
    for led in opened:
        await led.close()


async def test_concurrent_claims_of_many_keys_share_one_insert_and_each_gets_its_result(postgres_ledgers):
    other, led = await postgres_ledgers(), await postgres_ledgers()
    new, done, held = range(0, 20), range(20, 40), range(40, 60)
    for n in done:
        await other.claim(key(n), info(n), "worker-a", LONG)
    finished = {n: await other.complete(key(n), "worker-a", DONE) for n in done}
    for n in held:
        assert isinstance(await other.claim(key(n), info(n), "worker-b", LONG), Acquired)
    expiry = {n: (await other.get(key(n))).lease_expires_at for n in held}

    claims = await asyncio.gather(*(led.claim(key(n), info(n), "worker-a", LONG) for n in range(60)))
    assert (led.claims.batches, led.claims.items) == (1, 60)  # 60 claims, one INSERT
    for n in new:
        assert isinstance(claims[n], Acquired), claims[n]
        row = claims[n].row
        assert (row.stage_key, row.lease_owner, row.attempts, row.state) == (key(n), "worker-a", 1, "claimed")
        assert (row.input_partition, row.input_offset) == (n % 4, 10_000_000_000 + n)
        assert row.lease_expires_at - row.updated_at == pytest.approx(LONG, abs=0.01)
        assert await led.get(key(n)) == row
    for n in done:
        assert isinstance(claims[n], Finished) and claims[n].row == finished[n]
    for n in held:
        assert isinstance(claims[n], Held), claims[n]
        assert (claims[n].row.lease_owner, claims[n].expires_at) == ("worker-b", expiry[n])
        assert (await led.get(key(n))).attempts == 1

    # The same key twice at once: never in one statement; one owner acquires it, the other finds it held.
    pair = await asyncio.gather(led.claim(key(99), info(99), "worker-a", LONG),
                                led.claim(key(99), info(99), "worker-c", LONG))
    assert sorted(type(c).__name__ for c in pair) == ["Acquired", "Held"]
    assert (led.claims.batches, led.claims.items) == (3, 62)


async def test_concurrent_completions_share_one_update_and_a_lost_lease_still_names_the_holder(postgres_ledgers):
    led, other = await postgres_ledgers(), await postgres_ledgers()
    await asyncio.gather(*(led.claim(key(n), info(n), "worker-a", LONG) for n in range(10)))
    await led.release(key(5), "worker-a")
    assert isinstance(await other.claim(key(5), info(5), "worker-b", LONG), Acquired)  # key 5: lost to b
    before = led.completions.batches
    completions = [Completion(state="done" if n % 2 else "blocked", result=None if n == 4 else bytes([n, 0, 255]),
                              result_headers=(("n", str(n).encode()),), journal=None if n == 6 else b"[%d]" % n)
                   for n in range(10)]
    results = await asyncio.gather(*(led.complete(key(n), "worker-a", completions[n]) for n in range(10)),
                                   return_exceptions=True)
    assert led.completions.batches == before + 1  # ten completions, one UPDATE
    with pytest.raises(LeaseLost, match=r"no longer claimed by worker-a: now worker-b \(claimed\)"):
        raise results[5]
    for n in (0, 1, 2, 3, 4, 6, 7, 8, 9):
        row, c = results[n], completions[n]
        assert isinstance(row, LedgerRow), row
        assert (row.stage_key, row.state, row.result, row.result_headers, row.journal) == (
            key(n), c.state, c.result, c.result_headers, c.journal)
        assert (row.lease_owner, row.lease_expires_at, row.error, row.attempts) == (None, None, None, 1)
        assert await led.get(key(n)) == row
    kept = await led.get(key(5))
    assert (kept.state, kept.lease_owner, kept.result) == ("claimed", "worker-b", None)

    # Twice at once for one key: one completes, the other finds the row done.
    await led.claim(key(20), info(20), "worker-a", LONG)
    twice = await asyncio.gather(led.complete(key(20), "worker-a", DONE), led.complete(key(20), "worker-a", DONE),
                                 return_exceptions=True)
    assert sum(isinstance(r, LedgerRow) for r in twice) == 1
    lost = next(r for r in twice if not isinstance(r, LedgerRow))
    assert isinstance(lost, LeaseLost) and "now None (done)" in str(lost)


async def test_a_claim_cancelled_while_waiting_for_its_group_is_left_out_and_the_others_go_on(postgres_ledgers):
    led = await postgres_ledgers()
    tasks = [asyncio.create_task(led.claim(key(n), info(n), "worker-a", LONG)) for n in range(8)]
    await asyncio.sleep(0)  # every claim is queued; the group is sent after this test's turn
    tasks[3].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert all(isinstance(results[n], Acquired) for n in range(8) if n != 3)
    assert await led.get(key(3)) is None  # never sent
    assert (led.claims.batches, led.claims.items) == (1, 7)


async def test_a_failed_group_raises_ledger_error_to_every_caller(postgres_server_factory):
    server = await asyncio.to_thread(postgres_server_factory)
    led = PostgresLedger(create_database(server.url, "groups"), timeout_s=2)
    await led.start()
    try:
        await asyncio.gather(*(led.claim(key(n), info(n), "w", LONG) for n in range(5)))
        await asyncio.to_thread(server.stop)
        claims = await asyncio.gather(*(led.claim(key(n), info(n), "w", LONG) for n in range(10, 20)),
                                      return_exceptions=True)
        assert led.claims.batches == 2  # all ten in the one group that failed
        assert all(isinstance(c, LedgerError) and f"127.0.0.1:{server.port}/groups" in str(c) for c in claims), claims
        completes = await asyncio.gather(*(led.complete(key(n), "w", DONE) for n in range(5)), return_exceptions=True)
        assert led.completions.batches == 1
        assert all(isinstance(c, LedgerError) for c in completes), completes
    finally:
        await led.close()


# -- opening ------------------------------------------------------------------------------------------------------------

def test_open_ledger_picks_the_implementation(tmp_path: Path):
    assert isinstance(open_ledger(None, tmp_path), SqliteLedger)
    assert isinstance(open_ledger("postgresql://u@h/db", tmp_path), PostgresLedger)
    assert isinstance(open_ledger("postgres://u@h/db", tmp_path), PostgresLedger)
    with pytest.raises(ValueError, match="postgresql://"):
        open_ledger("mysql://u@h/db", tmp_path)


async def test_an_unreachable_database_is_a_clear_error_without_the_password(postgres_url: str):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    led = PostgresLedger(f"postgresql://trace:s3cr3t-pw@127.0.0.1:{port}/ledger", timeout_s=3)
    with pytest.raises(LedgerError) as err:
        await led.start()
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "trace@" in message and "/ledger" in message
    assert "refused" in message.lower() and "s3cr3t-pw" not in message

    wrong = postgres_url.replace("postgresql://postgres:", "postgresql://postgres:wrong-", 1)
    assert wrong != postgres_url
    with pytest.raises(LedgerError) as err:
        await PostgresLedger(wrong).start()
    assert "password authentication failed" in str(err.value)
    password = wrong.split("postgres:", 1)[1].split("@", 1)[0]
    assert password not in str(err.value)

    with pytest.raises(LedgerError) as err:  # libpq's own complaint about the URL would quote the password
        await PostgresLedger(f"postgresql://trace:s3cr3t%zz-pw@127.0.0.1:{port}/ledger").start()
    assert "percent-encoded" in str(err.value) and "s3cr3t" not in str(err.value)


async def test_a_ledger_used_before_start_or_after_its_server_is_gone_raises_ledger_error(postgres_server_factory):
    server = await asyncio.to_thread(postgres_server_factory)
    led = PostgresLedger(create_database(server.url, "gone"), timeout_s=2)
    with pytest.raises(LedgerError, match="not started"):
        await led.get(key())
    await led.start()
    try:
        assert isinstance(await led.claim(key(), info(), "w", LONG), Acquired)
        await asyncio.to_thread(server.stop)
        with pytest.raises(LedgerError, match=f"127.0.0.1:{server.port}/gone"):
            await led.claim(key(1), info(1), "w", LONG)
    finally:
        await led.close()
