"""pipeline.coalesce.Coalescer on its own (the Postgres ledger's use of it is tested in tests/test_ledger.py)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.coalesce import Coalescer


class Recorder:
    """A batch function that records its groups and answers ``item * 10``, or raises ``error`` when set; ``gate``
    (when set) holds every group until it is opened."""

    def __init__(self) -> None:
        self.groups: list[list] = []
        self.error: BaseException | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: list) -> list:
        self.groups.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [(item[0] if isinstance(item, tuple) else item) * 10 for item in items]


async def test_concurrent_submits_go_out_as_one_group_with_results_in_order():
    batch = Recorder()
    co = Coalescer(batch)
    assert await asyncio.gather(*(co.submit(n) for n in range(50))) == [n * 10 for n in range(50)]
    assert batch.groups == [list(range(50))]
    assert (co.batches, co.items) == (1, 50)
    assert await co.submit(7) == 70  # alone: a group of one
    assert (co.batches, co.items) == (2, 51)


async def test_groups_are_capped_at_max_batch():
    batch = Recorder()
    co = Coalescer(batch, max_batch=20)
    assert await asyncio.gather(*(co.submit(n) for n in range(45))) == [n * 10 for n in range(45)]
    assert [len(g) for g in batch.groups] == [20, 20, 5]
    assert [n for g in batch.groups for n in g] == list(range(45))


async def test_an_item_whose_key_is_already_in_the_group_waits_for_the_next_one():
    batch = Recorder()
    co = Coalescer(batch, key=lambda item: item[1])
    items = [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "c")]
    assert await asyncio.gather(*(co.submit(i) for i in items)) == [10, 20, 30, 40, 50]
    assert batch.groups == [[(1, "a"), (2, "b"), (5, "c")], [(3, "a")], [(4, "a")]]


async def test_an_error_reaches_every_caller_of_its_group_only():
    batch = Recorder()
    co = Coalescer(batch)
    batch.error = ValueError("database gone")
    results = await asyncio.gather(*(co.submit(n) for n in range(5)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and str(r) == "database gone" for r in results)
    batch.error = None
    assert await asyncio.gather(*(co.submit(n) for n in range(3))) == [0, 10, 20]


async def test_a_wrong_number_of_results_is_an_error_for_the_group():
    async def short(items: list) -> list:
        return items[:-1]

    co = Coalescer(short)
    results = await asyncio.gather(*(co.submit(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "2 results for 3 items" in str(r) for r in results)


async def test_cancelled_callers_do_not_disturb_the_others():
    batch = Recorder()
    batch.gate = asyncio.Event()
    co = Coalescer(batch)
    tasks = [asyncio.create_task(co.submit(n)) for n in range(6)]
    await asyncio.sleep(0)  # every task has submitted; the flush is scheduled behind this test's turn
    tasks[1].cancel()  # before its group is sent: left out of it
    for _ in range(10):  # the flush runs, then its task starts run_batch
        if batch.groups:
            break
        await asyncio.sleep(0)
    assert batch.groups == [[0, 2, 3, 4, 5]]
    tasks[2].cancel()  # while its group is in flight: the group goes on
    batch.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError) and isinstance(results[2], asyncio.CancelledError)
    assert [results[n] for n in (0, 3, 4, 5)] == [0, 30, 40, 50]
    assert (co.batches, co.items) == (1, 5)


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        Coalescer(Recorder(), max_batch=0)
