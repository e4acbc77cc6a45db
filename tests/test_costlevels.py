"""
Cost levels (twistedcluster.core.costlevels): measured costs within noise of
each other count as one, so identical backends tie and share idle picks.
"""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.costlevels import DEFAULT_TOLERANCE, CostLevels
from twistedcluster.core.pool import Pool


def test_a_cost_within_the_tolerance_joins_the_level():
    levels = CostLevels(0.1)
    assert levels.place(None, 0.00221) == 0.00221
    assert levels.place(None, 0.00231) == 0.00221
    assert len(levels) == 1


def test_a_cost_outside_the_tolerance_makes_its_own_level():
    levels = CostLevels(0.1)
    assert levels.place(None, 0.002) == 0.002
    assert levels.place(None, 0.008) == 0.008
    assert len(levels) == 2


def test_the_nearest_level_wins():
    levels = CostLevels(0.1)
    levels.place(None, 1.0)
    levels.place(None, 1.15)
    assert levels.place(None, 1.09) == 1.15
    assert levels.place(None, 1.06) == 1.0


def test_a_backend_keeps_its_level_while_within_the_tolerance():
    levels = CostLevels(0.1)
    level = levels.place(None, 2.0)
    for measured in (2.1, 1.85, 2.19, 1.81):
        level = levels.place(level, measured)
        assert level == 2.0
    level = levels.place(level, 2.3)
    assert level == 2.3
    assert len(levels) == 1  # 2.0 had no other user


def test_a_level_lasts_while_anyone_uses_it():
    levels = CostLevels(0.1)
    a = levels.place(None, 5.0)
    b = levels.place(None, 5.2)
    assert a == b == 5.0
    levels.release(a)
    assert levels.place(None, 4.8) == 5.0
    levels.release(b)
    levels.release(5.0)
    assert len(levels) == 0
    assert levels.place(None, 4.8) == 4.8


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.floats(1e-4, 10.0)), max_size=60))
def test_a_routed_cost_is_never_further_than_the_tolerance_from_the_measured_one(moves):
    levels = CostLevels()
    current = {}
    for backend, measured in moves:
        level = levels.place(current.get(backend), measured)
        current[backend] = level
        assert abs(level - measured) <= DEFAULT_TOLERANCE * level * (1 + 1e-9)
    # Every level in use is counted, and none other is left.
    assert len(levels) == len(set(current.values()))


def test_identical_backends_share_idle_picks_evenly():
    # Each connection closes before the next comes, so every pick finds both
    # idle: without levels the one that measured 2.21 ms took every one.
    pool = Pool()
    pool.register("a", "127.0.0.1", 1, capacity=100, cost=0.00221)
    pool.register("b", "127.0.0.1", 2, capacity=100, cost=0.00231)
    cluster = Cluster(pool, "least-load", random.Random(5))
    picks = Counter()
    for _ in range(400):
        route = cluster.pick()
        picks[route.backend.name] += 1
        pool.connected(route.backend.name, route.ticket)
        pool.release(route.backend.name, route.ticket)
    assert 150 <= picks["a"] <= 250, picks


def test_a_clearly_slower_backend_still_loses_idle_picks():
    pool = Pool()
    pool.register("fast", "127.0.0.1", 1, capacity=100, cost=0.002)
    pool.register("slow", "127.0.0.1", 2, capacity=100, cost=0.0025)
    cluster = Cluster(pool, "least-load", random.Random(5))
    for _ in range(50):
        route = cluster.pick()
        assert route.backend.name == "fast"
        pool.connected("fast", route.ticket)
        pool.release("fast", route.ticket)


def test_the_routed_load_is_on_the_levels_scale():
    pool = Pool()
    pool.register("a", "127.0.0.1", 1, capacity=100, cost=0.002)
    pool.register("b", "127.0.0.1", 2, capacity=100, connections=4, load=4 * 0.0021, cost=0.0021)
    b = pool.get("b")
    assert b.cost == 0.002
    assert b.load == pytest.approx(4 * 0.002)


def test_a_removed_backend_gives_up_its_level():
    pool = Pool()
    pool.register("a", "127.0.0.1", 1, capacity=100, cost=0.002)
    pool.remove("a")
    pool.register("b", "127.0.0.1", 2, capacity=100, cost=0.0021)
    assert pool.get("b").cost == 0.0021
