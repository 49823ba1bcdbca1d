"""The adapter tiers a replica's routing is sized by, without Ray: the pool's counters of file reads
and host-to-ready swaps, and the replica's LRU size (``max_loras + max_cpu_loras``)."""
from __future__ import annotations

import pytest

from deltatune.serving import Engine, SamplingParams
from deltatune.serving.replicas_worker import Residency, adapters_per_replica
from tests.serving_fixtures import make_adapter, make_base

GREEDY = SamplingParams(temperature=0, max_tokens=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    base = make_base(root / "base")
    return base, {name: make_adapter(base, root / name, seed) for seed, name in enumerate("abc")}


def test_the_pool_counts_file_reads_and_swaps_from_host_memory(world):
    """1 ready + 1 in host memory: switching between two adapters swaps from memory, never re-reads a
    file; a third adapter pushes the oldest to disk, and using it again is a file read."""
    base, paths = world
    engine = Engine(str(base), max_loras=1, max_cpu_loras=1)
    residency = Residency(engine)
    for name in "ab":
        engine.add_adapter(name, paths[name])
    assert (engine.pool.file_reads, engine.pool.ready_swaps) == (2, 0)   # b ready, a in host memory
    for name in "abab":
        engine.generate([[5, 6]], adapter=name, sampling=GREEDY)
    assert (engine.pool.file_reads, engine.pool.ready_swaps) == (2, 4)
    engine.add_adapter("c", paths["c"])                                  # c ready, b in memory, a to disk
    assert {i.name: i.state for i in engine.adapters()} == {"a": "disk", "b": "cpu", "c": "ready"}
    engine.generate([[5, 6]], adapter="a", sampling=GREEDY)
    assert (engine.pool.file_reads, engine.pool.ready_swaps) == (4, 4)   # c's read, then a's read again
    report = residency.report()
    assert (report["file_reads"], report["ready_swaps"]) == (4, 4)


def test_a_replica_keeps_what_its_engine_tiers_hold():
    assert adapters_per_replica({"max_loras": 8, "max_cpu_loras": 8}) == 16
    assert adapters_per_replica({"max_loras": 2, "max_cpu_loras": 0}) == 2
    assert adapters_per_replica({}) == 8 + 64       # Engine's defaults
