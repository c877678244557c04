"""pipeline.gc_policy: the collector schedule of the worker processes (no timing is asserted)."""

from __future__ import annotations

import gc
import weakref

import pytest

from pipeline.gc_policy import BetweenChunks


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref:
    """A reference cycle nobody else holds: only the cyclic collector can free it."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def automatic_gc_off():
    """No automatic collection during the test, so only BetweenChunks can free a cycle."""
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def test_schedule_young_then_middle_then_full_by_time():
    now = [0.0]
    collector = BetweenChunks(middle_every=3, full_interval_s=10.0, clock=lambda: now[0])
    generations = []
    for _ in range(7):
        now[0] += 1.0
        generations.append(collector.after_chunk())
    assert generations == [0, 0, 1, 0, 0, 1, 0]
    now[0] = 10.5  # 10 s since the collector was made (its last full collection counts from there)
    assert collector.after_chunk() == 2
    now[0] = 11.0
    assert collector.after_chunk() == 1  # the 9th chunk; the full interval counts from the last full collection
    now[0] = 20.0
    assert collector.after_chunk() == 0
    assert collector.collections == [6, 3, 1]


def test_a_young_cycle_is_freed_after_the_chunk(automatic_gc_off):
    collector = BetweenChunks()
    ref = _cycle()
    assert ref() is not None  # reference counting alone cannot free it
    collector.after_chunk()
    assert ref() is None


def test_a_cycle_promoted_to_the_oldest_generation_is_freed_by_the_full_collection(automatic_gc_off):
    now = [0.0]
    collector = BetweenChunks(middle_every=1, full_interval_s=60.0, clock=lambda: now[0])
    holder = [_Node()]
    holder[0].other = _Node()
    ref = weakref.ref(holder[0])
    collector.after_chunk()  # generation 0 and 1: the still-referenced objects move to the oldest generation
    holder[0].other.other = holder[0]  # now a cycle, and the last outside reference goes
    holder.clear()
    collector.after_chunk()  # young and middle collections do not look at the oldest generation
    assert ref() is not None
    now[0] = 61.0
    assert collector.after_chunk() == 2
    assert ref() is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        BetweenChunks(middle_every=0)
    with pytest.raises(ValueError):
        BetweenChunks(full_interval_s=0)
