"""
The p2c and hash policies, with hypothesis for their invariants: p2c never
picks a non-candidate and prefers the lower load; hash keeps a key on its
backend while the pool is stable, moves about 1/n of the keys when a backend
joins or leaves, never lets a backend past its bound, and respects weights.
"""

import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage

from twistedcluster.balancer import service as balancer
from twistedcluster.balancer.proxy import ProxyFactory
from twistedcluster.balancer.redirect import RedirectFactory
from twistedcluster.core import policies
from twistedcluster.core.cluster import Cluster
from twistedcluster.core.policies import (
    DEFAULT_HASH_BALANCE,
    BoundedHash,
    LeastLoad,
    PowerOfTwo,
    checkHashBalance,
    estimatedLoad,
    makePolicy,
)
from twistedcluster.core.pool import BackendStatus, Pool, State


def status(name, **kw):
    kw.setdefault("state", State.UP)
    kw.setdefault("capacity", 100)
    return BackendStatus(name=name, host="127.0.0.1", port=1, **kw)


def keys(n, seed=0):
    r = random.Random(seed)
    return [f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}" for _ in range(n)]


def idle(names, **kw):
    return [status(n, **kw) for n in sorted(names)]


def assign(policy, candidates, ks):
    rng = random.Random(0)
    return {k: policy.choose(candidates, rng, k).name for k in ks}


# -- p2c ----------------------------------------------------------------------

candidateSpec = st.tuples(
    st.integers(min_value=0, max_value=6),  # weight
    st.integers(min_value=0, max_value=50),  # connections
    st.floats(min_value=0, max_value=2, allow_nan=False),  # reported load
)


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(candidateSpec, max_size=10), seed=st.integers(0, 2**32 - 1))
def test_p2c_never_picks_a_non_candidate(specs, seed):
    cs = [status(f"b{i}", weight=w, connections=c, load=l) for i, (w, c, l) in enumerate(specs)]
    p2c = PowerOfTwo()
    rng = random.Random(seed)
    for _ in range(20):
        chosen = p2c.choose(cs, rng)
        if chosen is None:
            assert all(c.weight == 0 for c in cs)
        else:
            assert chosen in cs and chosen.weight > 0


@settings(max_examples=200, deadline=None)
@given(
    a=st.floats(min_value=0, max_value=5, allow_nan=False),
    b=st.floats(min_value=0, max_value=5, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
)
def test_p2c_with_two_candidates_picks_the_lower(a, b, seed):
    cs = [status("a", load=a), status("b", load=b)]
    chosen = PowerOfTwo().choose(cs, random.Random(seed))
    assert estimatedLoad(chosen) <= min(a, b) + 1e-12  # _lowest's tie tolerance


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.integers(0, 1000), min_size=3, max_size=12, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_p2c_never_picks_the_most_loaded_and_favours_the_least(loads, seed):
    cs = [status(f"b{i:02d}", load=l / 100) for i, l in enumerate(loads)]
    p2c = PowerOfTwo()
    rng = random.Random(seed)
    picks = Counter(p2c.choose(cs, rng).name for _ in range(60 * len(cs)))
    ranked = sorted(cs, key=estimatedLoad)
    assert picks[ranked[-1].name] == 0
    # The least loaded wins every pair it is in: about 2/n of the picks,
    # against 1/n for an even share.
    assert picks[ranked[0].name] > picks.total() / len(cs)


def test_p2c_draws_in_proportion_to_weight():
    # Equal loads: the first drawn wins, so picks follow the weights.
    cs = [status("a", weight=1), status("b", weight=2), status("c", weight=3), status("d", weight=4)]
    p2c = PowerOfTwo()
    rng = random.Random(1)
    n = 20_000
    picks = Counter(p2c.choose(cs, rng).name for _ in range(n))
    for c in cs:
        assert abs(picks[c.name] / n - c.weight / 10) < 0.02


def test_p2c_with_very_uneven_weights_or_none_usable():
    cs = [status("heavy", weight=256)] + [status(f"l{i}", weight=1) for i in range(5)]
    p2c = PowerOfTwo()
    rng = random.Random(2)
    picks = Counter(p2c.choose(cs, rng).name for _ in range(2000))
    assert set(picks) <= {c.name for c in cs} and picks["heavy"] > 1000
    zero = [status(f"z{i}", weight=0) for i in range(4)]
    assert p2c.choose(zero, rng) is None
    one = zero + [status("one", load=0.9)]
    assert {p2c.choose(one, rng).name for _ in range(50)} == {"one"}


def test_p2c_spreads_a_burst_on_stale_reports():
    # No report while 1000 connections come in: counting what was routed
    # keeps every backend near the mean.
    pool = Pool()
    for i in range(10):
        pool.register(f"b{i}", "h", 1000 + i, capacity=10_000)
    cluster = Cluster(pool, policy="p2c", rng=random.Random(3))
    counts = Counter(cluster.pick().name for _ in range(1000))
    assert max(counts.values()) - min(counts.values()) <= 6


# -- hash: stability and movement --------------------------------------------


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 20), seed=st.integers(0, 2**32 - 1))
def test_hash_keeps_a_key_on_its_backend_while_the_pool_is_stable(n, seed):
    cs = idle(f"b{i}" for i in range(n))
    ks = keys(200, seed)
    first = assign(BoundedHash(), cs, ks)
    # Again, with another instance (nothing but the names and weights
    # decides), and in another order of asking.
    again = BoundedHash()
    rng = random.Random(seed)
    for k in reversed(ks):
        assert again.choose(cs, rng, k).name == first[k]


def test_hash_is_stable_across_processes():
    # blake2b, not Python's salted hash(): another balancer, another seed,
    # the same answers.
    code = (
        "import random; from twistedcluster.core.policies import BoundedHash; "
        "from tests.test_hashing import idle, keys, assign; "
        "print(sorted(assign(BoundedHash(), idle(f'b{i}' for i in range(7)), keys(50)).items()))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    here = assign(BoundedHash(), idle(f"b{i}" for i in range(7)), keys(50))
    assert r.stdout.strip() == str(sorted(here.items()))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 30), seed=st.integers(0, 2**32 - 1))
def test_a_joining_backend_takes_about_1_over_n_and_only_it_gains(n, seed):
    ks = keys(3000, seed)
    before = assign(BoundedHash(), idle(f"b{i}" for i in range(n)), ks)
    after = assign(BoundedHash(), idle([*(f"b{i}" for i in range(n)), "new"]), ks)
    moved = [k for k in ks if before[k] != after[k]]
    assert all(after[k] == "new" for k in moved)
    # Its share is 1/(n+1), give or take the ring's variance (128 points).
    assert len(moved) / len(ks) < 2.0 / (n + 1) + 0.02


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 30), gone=st.integers(0, 29), seed=st.integers(0, 2**32 - 1))
def test_a_leaving_backend_moves_only_its_own_keys(n, gone, seed):
    ks = keys(3000, seed)
    names = [f"b{i}" for i in range(n)]
    leaver = names[gone % n]
    policy = BoundedHash()  # the same instance: the ring keeps the leaver
    before = assign(policy, idle(names), ks)
    after = assign(policy, idle(set(names) - {leaver}), ks)
    moved = [k for k in ks if before[k] != after[k]]
    assert moved == [k for k in ks if before[k] == leaver]
    assert len(moved) / len(ks) < 2.0 / n + 0.02
    # A fresh ring without the leaver agrees with the one that skips it.
    assert assign(BoundedHash(), idle(set(names) - {leaver}), ks) == after


def test_weights_are_respected_in_distribution():
    weights = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 2}
    cs = [status(n, weight=w) for n, w in sorted(weights.items())]
    ks = keys(40_000, 7)
    counts = Counter(assign(BoundedHash(), cs, ks).values())
    total = sum(weights.values())
    for name, w in weights.items():
        share = counts[name] / len(ks)
        # 128 ring points per unit of weight: within about 3 standard
        # deviations of the weight's share.
        assert abs(share - w / total) < 0.3 * (w / total) / math.sqrt(w)


def test_a_weight_change_moves_keys_only_to_or_from_that_backend():
    ks = keys(3000, 8)
    before = assign(BoundedHash(), idle(["a", "b", "c", "d"]), ks)
    heavier = [status("a"), status("b", weight=2), status("c"), status("d")]
    after = assign(BoundedHash(), heavier, ks)
    assert all(after[k] == "b" for k in ks if before[k] != after[k])


# -- hash: the bound ----------------------------------------------------------


def routeAll(cluster, ks):
    for k in ks:
        assert cluster.pick(key=k) is not None


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(1, 4), min_size=2, max_size=10),
    factor=st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0]),
    distinct=st.integers(1, 50),  # few distinct keys: hot clients
    n=st.integers(1, 400),
    seed=st.integers(0, 2**32 - 1),
)
def test_no_backend_goes_past_its_bound(weights, factor, distinct, n, seed):
    pool = Pool()
    for i, w in enumerate(weights):
        pool.register(f"b{i}", "h", 1000 + i, capacity=10_000)
        pool.setWeight(f"b{i}", w)
    cluster = Cluster(pool, policy="hash", rng=random.Random(seed), hashBalance=factor)
    r = random.Random(seed)
    hot = keys(distinct, seed)
    for done in range(1, n + 1):
        assert cluster.pick(key=r.choice(hot)) is not None
        # After every connection, every backend within its share of the
        # total times the factor (rounded up).
        W = sum(weights)
        for i, w in enumerate(weights):
            conns = pool.get(f"b{i}").estimatedConnections
            assert conns <= math.ceil(factor * done * w / W)


def test_bound_after_many_keys_equal_weights():
    # The brief's form: after N keys with loads accumulating, no backend
    # above ceil((1 + eps) * mean) + 1.
    pool = Pool()
    for i in range(8):
        pool.register(f"b{i}", "h", 1000 + i, capacity=10_000)
    cluster = Cluster(pool, policy="hash", rng=random.Random(0))
    ks = keys(50, 1) * 40  # 50 clients, 40 connections each
    routeAll(cluster, ks)
    mean = len(ks) / 8
    loads = [s.estimatedConnections for s in pool.snapshot()]
    assert max(loads) <= math.ceil(DEFAULT_HASH_BALANCE * mean) + 1


def test_without_a_bound_a_hot_client_stays_on_one_backend():
    pool = Pool()
    for i in range(4):
        pool.register(f"b{i}", "h", 1000 + i, capacity=10_000)
    cluster = Cluster(pool, policy="hash", hashBalance=0)
    assert len({cluster.pick(key="10.0.0.1").name for _ in range(100)}) == 1
    bounded = Cluster(Pool(), policy="hash")
    for i in range(4):
        bounded.pool.register(f"b{i}", "h", 1000 + i, capacity=10_000)
    assert len({bounded.pick(key="10.0.0.1").name for _ in range(100)}) == 4


def test_a_key_whose_backend_is_full_or_excluded_moves_on_then_comes_back():
    pool = Pool()
    for i in range(5):
        pool.register(f"b{i}", "h", 1000 + i, capacity=3)
    cluster = Cluster(pool, policy="hash", hashBalance=0)
    home = cluster.pick(key="10.1.2.3")
    assert cluster.pick(key="10.1.2.3").name == home.name
    third = cluster.pick(key="10.1.2.3")
    assert third.name == home.name  # now full: 3 of 3
    elsewhere = cluster.pick(key="10.1.2.3")
    assert elsewhere.name != home.name
    assert cluster.pick(exclude={elsewhere.name}, key="10.1.2.3").name not in {
        home.name,
        elsewhere.name,
    }
    pool.connected(third.name, third.ticket)
    pool.release(third.name, third.ticket)
    assert cluster.pick(key="10.1.2.3").name == home.name


def test_the_ring_is_not_rebuilt_when_a_backend_fills_up_or_is_excluded(monkeypatch):
    builds = []
    real = BoundedHash._rebuild
    monkeypatch.setattr(BoundedHash, "_rebuild", lambda self, m: (builds.append(set(m)), real(self, m)))
    policy = BoundedHash()
    names = [f"b{i:02d}" for i in range(40)]
    policy.choose(idle(names), random.Random(0), "k")
    policy.choose(idle(names[1:]), random.Random(0), "k")  # b0 full or tried
    policy.choose(idle(names[2:]), random.Random(0), "k")
    policy.choose(idle(names), random.Random(0), "k")  # back
    # A join, or a new weight, changes only that backend's points.
    ks = keys(500, 11)
    grown = [*idle(names[1:]), status("new", weight=2)]
    policy.choose(idle([*names, "new"]), random.Random(0), "k")  # joins: few of 40
    ours = assign(policy, grown, ks)
    assert builds == [set(names)]
    assert ours == assign(BoundedHash(), grown, ks)
    # Most of the ring absent: rebuilt without the absent.
    many = [f"m{i:03d}" for i in range(200)]
    policy.choose(idle(many), random.Random(0), "k")
    policy.choose(idle(many[:10]), random.Random(0), "k")
    assert builds[-1] == set(many[:10])
    assert assign(policy, idle(many[:10]), ks) == assign(BoundedHash(), idle(many[:10]), ks)


def test_hash_without_a_key_picks_a_random_point_within_the_bound():
    cs = idle(f"b{i}" for i in range(4))
    policy = BoundedHash()
    rng = random.Random(4)
    assert {policy.choose(cs, rng).name for _ in range(200)} == {c.name for c in cs}
    assert policy.choose([], rng) is None
    assert policy.choose([status("z", weight=0)], rng) is None
    assert policy.choose([status("z", weight=0), status("a")], rng, "k").name == "a"


# -- the factor, the factory, the cluster, the listeners ----------------------


@pytest.mark.parametrize("bad", [0.5, -1, float("nan"), float("inf"), "x"])
def test_the_factor_is_0_or_at_least_1(bad):
    with pytest.raises(ValueError):
        checkHashBalance(bad)


def test_make_policy_takes_the_factor_and_others_ignore_it():
    assert makePolicy("hash").hashBalance == DEFAULT_HASH_BALANCE
    assert makePolicy("hash", hashBalance=2).hashBalance == 2.0
    assert isinstance(makePolicy("least-load", hashBalance=2), LeastLoad)
    assert isinstance(makePolicy("p2c"), PowerOfTwo)


def test_the_cluster_keeps_the_factor_and_says_when_its_policy_is_keyed():
    c = Cluster(hashBalance=1.5)
    assert not c.keyed
    c.setPolicy("hash")
    assert c.keyed and c._policy.hashBalance == 1.5
    c.setPolicy("p2c")
    assert not c.keyed


def test_other_policies_never_see_the_key(monkeypatch):
    c = Cluster(policy="round-robin")
    c.pool.register("a", "h", 1)
    seen = []
    monkeypatch.setattr(c._policy, "choose", lambda cs, rng, *rest: seen.append(rest) or cs[0])
    c.pick(key="10.0.0.1")
    assert seen == [()]


def test_balancer_option_hash_balance():
    o = balancer.Options()
    o.parseOptions(["--policy=hash", "--hash-balance=1.5"])
    assert o["hash-balance"] == 1.5
    o = balancer.Options()
    o.parseOptions([])
    assert o["hash-balance"] == DEFAULT_HASH_BALANCE
    with pytest.raises(usage.UsageError, match="must be 0 .no bound. or >= 1"):
        balancer.Options().parseOptions(["--hash-balance=0.9"])


def hashCluster():
    # No bound: every key goes to its own point's backend, however many
    # connections came before.
    c = Cluster(policy="hash", hashBalance=0)
    for i in range(6):
        c.pool.register(f"b{i}", "127.0.0.1", 9000 + i, capacity=1000)
    return c


def expected(host):
    c = hashCluster()
    return c._policy.choose(c.pool.eligible(), random.Random(0), host).port


def test_the_redirect_listener_routes_on_the_clients_address():
    c = hashCluster()
    factory = RedirectFactory(c, Clock())
    for host in keys(20, 9):
        for _ in range(2):
            proto = factory.buildProtocol(None)
            t = StringTransport(peerAddress=IPv4Address("TCP", host, 4321))
            proto.makeConnection(t)
            assert t.value() == f"127.0.0.1 {expected(host)}\r\n".encode()


def test_the_proxy_routes_on_the_clients_address():
    c = hashCluster()
    mr = MemoryReactorClock()
    factory = ProxyFactory(c, mr)
    hosts = keys(20, 10)
    for host in hosts:
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 4321)))
    assert [client[1] for client in mr.tcpClients] == [expected(h) for h in hosts]


def test_ring_points_are_stable_and_nested_by_weight():
    one = policies._ringPoints("b1", 1)
    two = policies._ringPoints("b1", 2)
    assert len(one) == policies.RING_POINTS_PER_WEIGHT and two[: len(one)] == one


# -- hash: the ring follows the pool, one backend at a time --------------------


def ringOf(policy):
    """
    The ring as (point, backend) pairs, whatever the buckets and slots.
    """
    names = policy._names
    return sorted(
        (entry >> policies._INDEX_BITS, names[entry & policies._INDEX_MASK])
        for bucket in policy._buckets
        for entry in bucket
    )


poolOps = st.lists(
    st.tuples(
        st.sampled_from(["register", "down", "up", "weight", "remove", "eject", "readmit", "drain"]),
        st.integers(0, 11),
        st.integers(0, 4),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=poolOps, seed=st.integers(0, 2**32 - 1))
def test_the_incremental_ring_equals_a_fresh_one(ops, seed):
    from twistedcluster.core.pool import AdminState

    pool = Pool()
    for i in range(4):
        pool.register(f"b{i}", "h", 1000 + i, capacity=10_000)
    cluster = Cluster(pool, policy="hash", rng=random.Random(seed))
    policy = cluster._policy
    ks = keys(60, seed)
    for op, i, w in ops:
        name = f"b{i}"
        known = name in pool
        if op == "register":
            pool.register(name, "h", 1000 + i, capacity=10_000)
        elif not known:
            continue
        elif op == "down":
            pool.markDown(name)
        elif op == "up":
            pool.markUp(name)
        elif op == "weight":
            pool.setWeight(name, w)
        elif op == "remove":
            pool.remove(name)
        elif op == "eject":
            pool.eject(name)
        elif op == "readmit":
            pool.readmit(name)
        elif op == "drain":
            pool.setAdminState(name, AdminState.DRAINING if w % 2 else AdminState.ENABLED)
        cluster.pick(key=ks[i])  # the ring follows, change by change
        fresh = Cluster(pool, policy="hash", rng=random.Random(seed))
        fresh.pick(key=ks[0])
        assert policy._members == fresh._policy._members
        assert ringOf(policy) == ringOf(fresh._policy)
        # And so the same picks (uncounted, so both see the same loads).
        for k in ks[:10]:
            a, b = cluster.pickUncounted(key=k), fresh.pickUncounted(key=k)
            assert (a and a.name) == (b and b.name)


def test_a_pick_reads_no_candidate_but_those_it_walks_past(monkeypatch):
    from twistedcluster.core.pool import Candidates

    pool = Pool()
    for i in range(2000):
        pool.register(f"b{i:04d}", "h", 1000 + i, capacity=10_000)
    cluster = Cluster(pool, policy="hash", rng=random.Random(0))
    cluster.pick(key="10.0.0.1")  # builds the ring, once

    def whole(self):
        raise AssertionError("a pick read every candidate")

    monkeypatch.setattr(Candidates, "__iter__", whole)
    monkeypatch.setattr(Candidates, "__getitem__", whole)
    rebuilds = []
    real = BoundedHash._rebuild
    monkeypatch.setattr(BoundedHash, "_rebuild", lambda self, m: (rebuilds.append(len(m)), real(self, m)))
    for k in keys(300, 2):
        assert cluster.pick(key=k) is not None
    # Membership changes: one backend's points each, no rebuild.
    pool.register("newcomer", "h", 1, capacity=10_000)
    pool.markDown("b0001")
    pool.setWeight("b0002", 3)
    pool.remove("b0003")
    for k in keys(300, 3):
        assert cluster.pick(key=k) is not None
    assert rebuilds == []
    assert ringOf(cluster._policy) == ringOf(fresh(pool))


def fresh(pool):
    c = Cluster(pool, policy="hash")
    c.pickUncounted(key="10.0.0.1")
    return c._policy


def test_a_reader_far_behind_the_pools_changes_takes_the_whole_ring():
    pool = Pool()
    for i in range(10):
        pool.register(f"b{i}", "h", 1000 + i, capacity=10_000)
    cluster = Cluster(pool, policy="hash")
    cluster.pick(key="k")
    for _ in range(700):  # more than the pool keeps of its log
        pool.markDown("b1")
        pool.markUp("b1")
    pool.markDown("b2")
    cluster.pick(key="k")
    assert ringOf(cluster._policy) == ringOf(fresh(pool))
    assert "b2" not in cluster._policy._members


def test_the_ring_grows_and_shrinks_its_buckets_without_moving_a_key():
    pool = Pool()
    cluster = Cluster(pool, policy="hash")
    ks = keys(200, 4)
    for i in range(300):  # one at a time: the buckets split as it grows
        pool.register(f"b{i:03d}", "h", 1000 + i, capacity=10**6)
        cluster.pickUncounted(key="k")
    policy = cluster._policy
    grown = len(policy._buckets)
    assert grown >= 512
    assert ringOf(policy) == ringOf(fresh(pool))
    before = {k: cluster.pickUncounted(key=k).name for k in ks}
    for i in range(290):
        pool.markDown(f"b{i:03d}")
        cluster.pickUncounted(key="k")
    assert len(policy._buckets) <= grown // 4
    assert ringOf(policy) == ringOf(fresh(pool))
    for k in ks:
        if before[k] >= "b290":
            assert cluster.pickUncounted(key=k).name == before[k]


def test_when_few_backends_have_room_a_pick_walks_a_bounded_stretch():
    pool = Pool()
    for i in range(400):
        pool.register(f"b{i:03d}", "h", 1000 + i, capacity=1)
    cluster = Cluster(pool, policy="hash", hashBalance=0)
    routes = [cluster.pick(key=k) for k in keys(397, 5)]
    assert all(routes)  # 397 of 400 now full
    left = {s.name for s in pool.candidates()}
    assert len(left) == 3
    walked = []
    real = BoundedHash._clockwise

    def counting(self, point):
        for entry in real(self, point):
            walked.append(entry)
            yield entry

    BoundedHash._clockwise = counting
    try:
        for k in keys(3, 6):
            route = cluster.pick(key=k)
            assert route.name in left
    finally:
        BoundedHash._clockwise = real
    assert len(walked) <= 3 * policies._MAX_WALK
    assert cluster.pick(key="10.9.9.9") is None  # all full: at once


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    loads=st.lists(st.integers(0, 30), min_size=12, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_pick_on_the_pools_candidates_equals_one_on_a_plain_list(weights, loads, seed):
    pool = Pool()
    for i, w in enumerate(weights):
        pool.register(f"b{i}", "h", 1000 + i, capacity=25, connections=loads[i])
        pool.setWeight(f"b{i}", w)
    live = BoundedHash()
    plain = BoundedHash()
    rngA, rngB = random.Random(seed), random.Random(seed)
    for k in keys(50, seed):
        a = live.choose(pool.candidates(), rngA, k)
        b = plain.choose(list(pool.candidates()), rngB, k)
        assert (a and a.name) == (b and b.name)
