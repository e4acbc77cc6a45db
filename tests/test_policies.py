"""
Routing policies, with hypothesis for the invariants: never a backend that is
not up, weights respected, no herding on stale reports.
"""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.policies import (
    POLICIES,
    LeastConn,
    LeastLoad,
    RoundRobin,
    UnknownPolicy,
    makePolicy,
)
from twistedcluster.core.pool import AdminState, BackendStatus, Pool, State


def status(name, **kw):
    kw.setdefault("state", State.UP)
    kw.setdefault("capacity", 100)
    return BackendStatus(name=name, host="127.0.0.1", port=1, **kw)


def test_least_load_picks_lowest_estimated_load():
    cs = [status("a", load=0.5), status("b", load=0.2), status("c", load=0.3)]
    assert LeastLoad().choose(cs, random.Random(0)).name == "b"


def test_least_load_adds_what_was_routed_since_the_report():
    # b reported less, but 40 connections went to it since: a is lighter.
    cs = [status("a", load=0.3), status("b", load=0.1, addedSinceReport=40)]
    assert LeastLoad().choose(cs, random.Random(0)).name == "a"


def test_least_load_respects_weight():
    cs = [status("a", load=0.3, weight=1), status("b", load=0.5, weight=2)]
    assert LeastLoad().choose(cs, random.Random(0)).name == "b"


def test_ties_are_broken_at_random():
    cs = [status("a"), status("b"), status("c")]
    picks = Counter(LeastLoad().choose(cs, random.Random(i)).name for i in range(300))
    assert set(picks) == {"a", "b", "c"}


def test_least_conn_uses_balancer_observed_connections():
    cs = [status("a", active=5, load=0.0), status("b", active=1, load=0.9)]
    assert LeastConn().choose(cs, random.Random(0)).name == "b"


def test_round_robin_is_smooth_and_weighted():
    cs = [status("a", weight=5), status("b", weight=1), status("c", weight=1)]
    rr = RoundRobin()
    seq = "".join(rr.choose(cs, random.Random(0)).name for _ in range(7))
    assert Counter(seq) == {"a": 5, "b": 1, "c": 1}
    assert "aaa" not in seq


def test_empty_candidates_give_none():
    for name in POLICIES:
        assert makePolicy(name).choose([], random.Random(0)) is None


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_backend_with_weight_zero_is_never_chosen(policy):
    # Alone, or beside others: the one-candidate shortcut keeps the rule.
    alone = [status("z", weight=0)]
    assert makePolicy(policy).choose(alone, random.Random(0)) is None
    cs = [status("z", weight=0), status("a", load=0.9, active=9)]
    chooser = makePolicy(policy)
    assert {chooser.choose(cs, random.Random(i)).name for i in range(20)} == {"a"}


def test_unknown_policy_names_the_choices():
    with pytest.raises(UnknownPolicy, match="least-load"):
        makePolicy("fastest")


def test_cluster_set_policy_keeps_old_on_error():
    c = Cluster()
    with pytest.raises(UnknownPolicy):
        c.setPolicy("nope")
    assert c.policyName == "least-load"
    c.setPolicy("round-robin")
    assert c.policyName == "round-robin"


def test_a_backend_at_capacity_gets_no_more():
    pool = Pool()
    pool.register("a", "h", 1, capacity=2, connections=1)
    pool.register("b", "h", 2, capacity=100)
    c = Cluster(pool, policy="round-robin", rng=random.Random(1))
    picks = [c.pick().name for _ in range(6)]
    assert picks.count("a") == 1  # 1 reported + 1 routed = capacity
    pool.report("a", connections=0, load=0.0)  # its connections closed
    assert "a" in [c.pick().name for _ in range(2)]


def test_static_backends_are_loaded_by_what_the_balancer_relays():
    pool = Pool()
    pool.register("s", "h", 1, capacity=4, static=True)
    ticket = pool.acquire("s")
    pool.acquire("s")
    st_ = pool.get("s")
    assert (st_.connections, st_.load, st_.addedSinceReport) == (2, 0.5, 0)
    pool.release("s", ticket)
    assert pool.get("s").load == 0.25


def test_pick_excludes_tried_backends():
    pool = Pool()
    pool.register("a", "h", 1)
    pool.register("b", "h", 2)
    c = Cluster(pool, rng=random.Random(1))
    assert c.pick(exclude={"a"}).name == "b"
    assert c.pick(exclude={"a", "b"}) is None


# -- properties ---------------------------------------------------------------

backendSpec = st.tuples(
    st.sampled_from(list(State)),
    st.integers(min_value=0, max_value=5),  # weight
    st.integers(min_value=1, max_value=50),  # capacity
    st.floats(min_value=0, max_value=3, allow_nan=False),  # reported load
)


def buildPool(specs):
    pool = Pool()
    for i, (state, weight, capacity, load) in enumerate(specs):
        name = f"b{i}"
        pool.register(name, "127.0.0.1", 1000 + i, capacity=capacity, load=load)
        pool.setWeight(name, weight)
        if state is State.DOWN:
            pool.markDown(name)
        elif state is State.DRAINING:
            pool.setAdminState(name, AdminState.DRAINING)
        elif state is State.DISABLED:
            pool.setAdminState(name, AdminState.DISABLED)
    return pool


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(backendSpec, min_size=0, max_size=8),
    policy=st.sampled_from(sorted(POLICIES)),
    n=st.integers(min_value=1, max_value=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_never_routes_to_a_backend_that_is_not_up(specs, policy, n, seed):
    pool = buildPool(specs)
    routable = {
        s.name for s in pool.snapshot() if s.state is State.UP and s.weight > 0
    }
    cluster = Cluster(pool, policy=policy, rng=random.Random(seed))
    for _ in range(n):
        chosen = cluster.pick()
        if chosen is None:
            # Only when every routable backend is at capacity.
            assert all(pool.get(name).full for name in routable)
        else:
            assert chosen.name in routable
            assert not chosen.backend.full


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(min_value=2, max_value=8),
    capacity=st.integers(min_value=300, max_value=1000),
    n=st.integers(min_value=1, max_value=300),
    seed=st.integers(0, 2**32 - 1),
)
def test_least_load_does_not_herd_on_stale_reports(k, capacity, n, seed):
    # All backends reported idle once; no new report arrives while n
    # connections come in.  Trusting the report alone would send all n to one
    # backend; counting what was routed since spreads them evenly.
    pool = Pool()
    for i in range(k):
        pool.register(f"b{i}", "h", 1000 + i, capacity=capacity, load=0.0)
    cluster = Cluster(pool, rng=random.Random(seed))
    counts = Counter(cluster.pick().name for _ in range(n))
    spread = [counts.get(f"b{i}", 0) for i in range(k)]
    assert max(spread) - min(spread) <= 1


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=6),
    rounds=st.integers(min_value=1, max_value=20),
    policy=st.sampled_from(["least-load", "round-robin"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_weights_are_respected(weights, rounds, policy, seed):
    # Over whole rounds of sum(weights) connections with stale reports, each
    # backend gets its weight's share (to within one connection).
    pool = Pool()
    for i, w in enumerate(weights):
        pool.register(f"b{i}", "h", 1000 + i, capacity=1000)
        pool.setWeight(f"b{i}", w)
    cluster = Cluster(pool, policy=policy, rng=random.Random(seed))
    total = sum(weights) * rounds
    counts = Counter(cluster.pick().name for _ in range(total))
    for i, w in enumerate(weights):
        assert abs(counts[f"b{i}"] - w * rounds) <= 1


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=6),
    rounds=st.integers(min_value=1, max_value=10),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_robin_on_the_index_keeps_shares_when_a_backend_comes_back(weights, rounds, seed):
    # A backend that leaves and comes back starts where the others are, not
    # with a credit of every pick it missed.
    pool = Pool()
    for i, w in enumerate(weights):
        pool.register(f"b{i}", "h", 1000 + i, capacity=1000)
        pool.setWeight(f"b{i}", w)
    cluster = Cluster(pool, policy="round-robin", rng=random.Random(seed))
    pool.markDown("b0")
    for _ in range(sum(weights) * 3):
        assert cluster.pick().name != "b0"
    pool.markUp("b0")
    counts = Counter(cluster.pick().name for _ in range(sum(weights) * rounds))
    assert counts["b0"] <= weights[0] * rounds + 1


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_takes_the_pools_live_candidates(policy):
    pool = Pool()
    for name in "abc":
        pool.register(name, "h", 1, capacity=10)
    pool.markDown("b")
    cluster = Cluster(pool, policy=policy, rng=random.Random(0))
    picked = {cluster.pick(exclude={"a"}).name for _ in range(5)}
    assert picked == {"c"}


@pytest.mark.parametrize("policy", ["least-load", "least-conn"])
def test_short_connections_to_equal_backends_are_split_at_random(policy):
    # One connection at a time, each closed before the next: both backends
    # are tied at every pick, so each must win about half of the ties (an
    # index whose tie-break keys stick would give one nearly all of them).
    for seed in range(20):
        cluster = Cluster(policy=policy, rng=random.Random(seed))
        for name in ("a", "b"):
            cluster.pool.register(name, "h", 1, capacity=1000)
        wins = Counter()
        for _ in range(100):
            route = cluster.pick()
            cluster.pool.connected(route.name, route.ticket)
            cluster.pool.release(route.name, route.ticket)
            wins[route.name] += 1
        assert 25 <= wins["a"] <= 75, (seed, wins)


# -- costs: least expected delay ---------------------------------------------------


def test_a_backend_without_a_reported_cost_costs_a_capacity_share():
    assert status("a", capacity=250).cost == pytest.approx(0.004)


def test_least_load_counts_the_new_connection_at_the_backends_cost():
    # An idle backend that takes 8 ms loses to one that takes 2 ms with two
    # queued (6 ms with the new one); with three queued (8 ms) it is a tie,
    # with four the idle slow one wins.  Least-conn would pick the idle one.
    for queued, expected in ((2, {"fast"}), (4, {"slow"})):
        cs = [
            status("slow", cost=0.008),
            status("fast", cost=0.002, connections=queued, load=queued * 0.002),
        ]
        picks = {LeastLoad().choose(cs, random.Random(i)).name for i in range(50)}
        assert picks == expected


def test_least_load_adds_routed_connections_at_the_backends_cost():
    # Both reported 1 connection; 3 more went to the fast one since: 4 x 2
    # ms (+2 for the new one) is under 1 x 8 ms (+8); 8 x 2 ms (+2) is not.
    cs = [
        status("slow", cost=0.008, connections=1, load=0.008),
        status("fast", cost=0.002, connections=1, load=0.002, addedSinceReport=3),
    ]
    assert LeastLoad().choose(cs, random.Random(0)).name == "fast"
    cs[1] = status("fast", cost=0.002, connections=1, load=0.002, addedSinceReport=7)
    assert LeastLoad().choose(cs, random.Random(0)).name == "slow"


def test_least_load_shares_connections_in_inverse_proportion_to_cost():
    # Connections that stay: least-load fills each backend to the same
    # work, so costs 2, 2 and 8 ms take shares 4:4:1 (what hand-set
    # weights 4:4:1 did).
    pool = Pool()
    for name, cost in (("a", 0.002), ("b", 0.002), ("c", 0.008)):
        pool.register(name, "127.0.0.1", 1, capacity=1000, cost=cost)
    cluster = Cluster(pool, "least-load", random.Random(3))
    for _ in range(90):
        cluster.pick()
    routed = {s.name: s.routed for s in pool.snapshot()}
    assert routed == {"a": 40, "b": 40, "c": 10}


def test_equal_costs_route_as_counts_did():
    # Backends of one cost: least-load is what it was (least connections
    # per capacity), whatever the cost.
    for cost in (None, 0.002):
        pool = Pool()
        for name, held in (("a", 5), ("b", 0), ("c", 2)):
            pool.register(name, "127.0.0.1", 1, capacity=100, connections=held,
                          load=held * (cost or 0.01), cost=cost)
        cluster = Cluster(pool, "least-load", random.Random(1))
        for _ in range(8):
            cluster.pick()
        assert [s.estimatedConnections for s in pool.snapshot()] == [5, 5, 5]
