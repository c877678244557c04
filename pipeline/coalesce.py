"""Coalescing for the cluster's Postgres stores: concurrent calls of one operation on one event loop (claims,
completions of many records of a poll batch) are gathered and sent as one statement, so a worker pays one round
trip — one pooled connection, one parse, one network exchange — per group instead of one per record. The asyncio
counterpart of :mod:`pipeline.group_commit` (which gathers onto a writer thread for the embedded shape).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """``await submit(item)`` returns ``item``'s result from one ``run_batch`` call made for everything submitted
    meanwhile.

    The first ``submit`` while nothing is pending schedules a flush with ``loop.call_soon``; every item submitted
    before that callback runs (the calls made by the tasks that are ready in the same turn of the event loop) goes
    into the same group, at most ``max_batch`` items. The flush starts ``run_batch`` as a task of its own and, when
    items are left over, schedules the next flush at once (groups may be in flight concurrently).

    ``run_batch(items) -> results``: one result per item, in the items' order; an exception it raises is raised to
    every caller of that group (the same exception object). ``key(item)``: when given, a group never holds two
    items with the same key; the later one waits for the next group (sent after this one has started, not after it
    has finished). A caller cancelled before its group is sent is left out of it; one cancelled later does not
    affect the group or its other callers (its item's result is dropped). ``batches`` and ``items`` count the
    ``run_batch`` calls made and the items they carried.
    """

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[Sequence[R]]], *, max_batch: int = 500,
                 key: Callable[[T], Hashable] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.key = key
        self.batches = 0
        self.items = 0
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()  # strong references until each group is answered

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        group: list[tuple[T, asyncio.Future[R]]] = []
        keys: set[Hashable] = set()
        later: deque[tuple[T, asyncio.Future[R]]] = deque()
        queue = self._queue
        while queue and len(group) < self.max_batch:
            entry = queue.popleft()
            if entry[1].done():  # its caller was cancelled while it waited
                continue
            if self.key is not None:
                k = self.key(entry[0])
                if k in keys:
                    later.append(entry)
                    continue
                keys.add(k)
            group.append(entry)
        later.extend(queue)
        self._queue = later
        if later:
            self._scheduled = True
            loop.call_soon(self._flush, loop)
        if group:
            self.batches += 1
            self.items += len(group)
            task = loop.create_task(self._run(group))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = list(await self.run_batch([item for item, _ in group]))
            if len(results) != len(group):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(group)} items")
        except asyncio.CancelledError:  # the loop is shutting down: nobody gets an answer
            for _, future in group:
                future.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - every caller of the group hears of it
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(group, results):
            if not future.done():
                future.set_result(result)
