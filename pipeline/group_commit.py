"""Group commit for the embedded shape's durable writes (journal appends, log appends): calls from concurrent tasks
are queued to one writer thread, which takes everything queued at once and writes it with one lock, one transaction
and one fsync, then answers every caller. Throughput then grows with concurrency instead of being capped at one
fsync (and one thread hand-off) per record — the same technique as the receiver's embedded log sink
(``sinks.local_log.LocalLogSink``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupWriter(Generic[T, R]):
    """``await submit(item)`` returns once ``write_batch`` wrote ``item`` (with whatever else was queued then).

    ``write_batch(items) -> results``: runs on the writer thread, returns one result per item, in order; an
    exception it raises is raised to every caller of that group. The thread starts on the first ``submit`` and ends
    with :meth:`close` (items already queued are written first).
    """

    def __init__(self, name: str, write_batch: Callable[[list[T]], list[R]], max_batch: int = 512) -> None:
        self.name = name
        self.write_batch = write_batch
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[T, asyncio.Future, asyncio.AbstractEventLoop] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((item, future, loop))
        return await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            group = [self._queue.get()]
            while len(group) < self.max_batch:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in group
            entries = [g for g in group if g is not None]
            if not entries:
                continue
            try:
                results: list = list(self.write_batch([item for item, _, _ in entries]))
                errors: list[BaseException | None] = [None] * len(entries)
            except BaseException as exc:  # noqa: BLE001 - every caller of the group hears of it
                results = [None] * len(entries)
                errors = [exc] * len(entries)
            for (_, future, loop), result, error in zip(entries, results, errors):
                try:
                    loop.call_soon_threadsafe(_settle, future, result, error)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
