"""Serving processes keep the start-up heap out of the collector's scans and collect less often."""

from __future__ import annotations

import gc

from shared.runtime import GC_THRESHOLDS, collect_less_often, freeze_startup_heap


def test_freeze_moves_the_start_up_heap_out_of_the_scans() -> None:
    """After `freeze_startup_heap` the objects alive then are in the permanent generation."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    kept = [object() for _ in range(10)]
    freeze_startup_heap()
    assert gc.get_freeze_count() >= len(kept)


def test_collect_less_often_raises_the_thresholds() -> None:
    """A serving process collects young objects every 20,000 allocations, not every 700."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # Python's default
        collect_less_often()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > 700
    finally:
        gc.set_threshold(*before)
