"""When the cyclic garbage collector runs in the worker processes, and why not CPython's default.

CPython frees almost everything by reference counting; the cyclic collector only finds reference cycles. It runs a
*young* collection whenever container allocations minus deallocations since the last one exceed a threshold (700
by default), and every collection traverses every young object that is still alive. The workers allocate a whole
envelope's worth of objects per trace (thousands of dicts, lists, models), so with the default a collection ran
about once per envelope and traversed the envelopes in flight, only to find them all alive.

Two shapes, two policies:

* **Stage workers** (``worker grade`` and the others: one envelope per record): :func:`freeze_startup` — the objects
  made during start-up (modules, schemas, settings) leave every later collection (``gc.freeze``) and the young
  threshold rises to :data:`STAGE_YOUNG_THRESHOLD`. Measured: a grade worker's collector time for 880 envelopes fell
  from 0.46–0.56 s to ~0.07 s, 8–11 % less CPU per envelope.
* **The assembler worker** (``worker assemble``: builds up to 64 envelopes per chunk, publishes them, drops them):
  a higher threshold alone did not help, because a deallocation of *any* container counts against the threshold —
  freeing the previous chunk hides the next chunk's allocations, so collections still fired mid-chunk with 17–23k
  live young objects each (3–4 ms apiece, ~1 s of collector time per 100k spans, ~9 % of the worker's CPU). With
  :class:`BetweenChunks` the assembler runs the young collection itself right after a chunk is published and
  freed, when only ~2k young objects are alive: ~0.1 s per 100k spans. The automatic threshold
  (:data:`ASSEMBLER_YOUNG_THRESHOLD`) stays as the safety net for long stretches without chunks.

Memory cannot grow without bound under either policy: only objects in reference cycles wait for the collector, the
automatic thresholds still apply, and :class:`BetweenChunks` runs a full collection at least every
``full_interval_s``.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

#: Young-generation threshold in stage workers (CPython's default: 700).
STAGE_YOUNG_THRESHOLD = 50_000
#: Young-generation threshold in the assembler worker: a safety net; :class:`BetweenChunks` does the regular work.
ASSEMBLER_YOUNG_THRESHOLD = 200_000


def freeze_startup(young_threshold: int) -> None:
    """Call once start-up is done: move every object alive now to the permanent generation (never traversed again)
    and set the young threshold to ``young_threshold`` allocations (the older generations keep CPython's 10, 10)."""
    gc.freeze()
    gc.set_threshold(young_threshold, 10, 10)


class BetweenChunks:
    """Collects at the points where a batch-at-a-time worker holds the least: call :meth:`after_chunk` once a chunk's
    objects are released. Each call runs a young collection (generation 0); every ``middle_every``-th call collects
    generation 1 as well; and a full collection runs when ``full_interval_s`` seconds (``clock``, monotonic) passed
    since the last one, so cycles that reached the oldest generation are still freed.

    ``collections`` counts the calls per generation collected (index 0, 1, 2).
    """

    def __init__(self, *, middle_every: int = 10, full_interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if middle_every < 1 or full_interval_s <= 0:
            raise ValueError("middle_every must be >= 1 and full_interval_s > 0")
        self.middle_every = middle_every
        self.full_interval_s = full_interval_s
        self.clock = clock
        self.collections = [0, 0, 0]
        self._chunks = 0
        self._last_full = clock()

    def after_chunk(self) -> int:
        """Run this chunk's collection; returns the generation collected (0, 1 or 2)."""
        self._chunks += 1
        now = self.clock()
        if now - self._last_full >= self.full_interval_s:
            generation = 2
            self._last_full = now
        else:
            generation = 1 if self._chunks % self.middle_every == 0 else 0
        gc.collect(generation)
        self.collections[generation] += 1
        return generation
