"""serve settles the garbage collector once its start is done (daemon._settle_gc, called by serve right after
the API starts): what start built is frozen out of the cyclic collector's reach, and the youngest generation
is collected far less often, so a 1,000-pool node's scrapes set off no full collection (docs/benchmarks.md)."""

from __future__ import annotations

import gc

from poolmgr import daemon


def test_start_freezes_what_it_built_and_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    built = [object(), [1, 2], {"a": []}]  # containers that live on, like start's pools and workers
    try:
        daemon._settle_gc()
        assert gc.get_freeze_count() >= len(gc.get_referents(built)) and gc.get_threshold()[0] == 50_000
        assert gc.get_threshold()[1:] == before[1:]  # the older generations keep their thresholds
        cycle: list[object] = []
        cycle.append(cycle)  # garbage made after start is still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
