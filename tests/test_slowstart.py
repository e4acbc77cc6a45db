"""
Slow start: the pool's ramp (pure, time handed in), what each policy makes
of a ramping backend, and the balancer's timer on a L{Clock}.
"""

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python import usage

from twistedcluster.balancer import service as balancer
from twistedcluster.balancer.metrics import MetricsRoot
from twistedcluster.balancer.slowstart import SlowStart
from twistedcluster.core.cluster import Cluster
from twistedcluster.core.policies import POLICIES
from twistedcluster.core.pool import RAMP_STEPS, AdminState, Pool

SECONDS = 10.0


def pool(*names, slowStart=SECONDS, capacity=1000, connections=0):
    p = Pool()
    for n in names:
        p.register(n, "127.0.0.1", 1, capacity=capacity, connections=connections,
                   load=connections / capacity)
    p.slowStart = slowStart
    return p


def ramp(p, name):
    return p.get(name).ramp


# -- the ramp ---------------------------------------------------------------------


def test_a_backend_that_comes_up_ramps_linearly_in_steps():
    p = pool("old")
    p.register("new", "127.0.0.1", 2, capacity=1000)
    assert ramp(p, "old") == 1.0  # up before slow start applied
    assert ramp(p, "new") == 1 / RAMP_STEPS and p.ramping == 1
    p.rampTick(100.0)  # its ramp starts at the next tick
    assert ramp(p, "new") == 1 / RAMP_STEPS
    seen = []
    for k in range(1, RAMP_STEPS + 1):
        p.rampTick(100.0 + k * SECONDS / RAMP_STEPS)
        seen.append(ramp(p, "new"))
    assert seen == [max(1, k) / RAMP_STEPS for k in range(1, RAMP_STEPS + 1)]
    assert p.ramping == 0
    p.rampTick(200.0)
    assert ramp(p, "new") == 1.0


def test_off_nothing_ramps():
    p = pool("a", slowStart=0)
    p.register("b", "127.0.0.1", 2)
    p.markDown("a")
    p.markUp("a")
    assert ramp(p, "a") == ramp(p, "b") == 1.0 and p.ramping == 0


@pytest.mark.parametrize(
    "down, up",
    [
        (lambda p: p.markDown("b"), lambda p: p.markUp("b")),
        (lambda p: p.markDown("b"), lambda p: p.register("b", "127.0.0.1", 2)),
        (lambda p: p.eject("b"), lambda p: p.readmit("b")),
        (lambda p: p.setAdminState("b", AdminState.DISABLED),
         lambda p: p.setAdminState("b", AdminState.ENABLED)),
        (lambda p: p.setAdminState("b", AdminState.DRAINING),
         lambda p: p.setAdminState("b", AdminState.ENABLED)),
        (lambda p: p.setSelfDraining("b"), lambda p: p.register("b", "127.0.0.1", 2)),
    ],
    ids=["health", "re-registered", "ejected", "disabled", "drained", "self-drained"],
)
def test_coming_back_up_ramps_again_and_going_down_ends_the_ramp(down, up):
    p = pool("a", "b", "c")
    down(p)
    assert ramp(p, "b") == 1.0 and p.ramping == 0
    up(p)
    assert ramp(p, "b") == 1 / RAMP_STEPS and p.ramping == 1
    p.rampTick(0.0)
    p.rampTick(SECONDS / 2)
    assert ramp(p, "b") == 0.5
    down(p)  # mid-ramp: no longer ramping
    assert ramp(p, "b") == 1.0 and p.ramping == 0
    up(p)
    assert ramp(p, "b") == 1 / RAMP_STEPS


def test_what_does_not_bring_a_backend_up_does_not_ramp_it():
    p = pool("a", "b")
    p.register("a", "127.0.0.1", 1)  # registers again while up
    p.setWeight("b", 3)
    p.report("a", 10, 0.01)
    assert p.ramping == 0 and ramp(p, "a") == ramp(p, "b") == 1.0


def test_a_forgotten_backend_stops_ramping():
    p = pool("a")
    p.register("b", "127.0.0.1", 2)
    p.register("c", "127.0.0.1", 3)
    p.remove("b")
    p.removeMany(["c"])
    assert p.ramping == 0
    p.rampTick(1.0)


# -- what the policies make of it -------------------------------------------------


def loaded(policy, newRamp):
    """
    Three backends holding 100 connections each (reported), a newcomer
    ramped to C{newRamp}.
    """
    p = pool("old1", "old2", "old3", connections=100)
    p.register("new", "127.0.0.1", 2, capacity=1000)
    p.rampTick(0.0)
    p.rampTick(newRamp * SECONDS)
    assert ramp(p, "new") == newRamp
    return Cluster(p, policy=policy, rng=random.Random(1))


def burst(cluster, n, keyed=False):
    counts = Counter()
    for i in range(n):
        route = cluster.pick(key=f"10.0.{i // 256}.{i % 256}" if keyed else None)
        counts[route.name] += 1
    return counts


@pytest.mark.parametrize("policy", ["least-load", "p2c"])
def test_least_load_holds_a_ramping_backend_to_its_share_of_the_others_load(policy):
    full = burst(loaded(policy, 1.0), 200)["new"]
    quarter = burst(loaded(policy, 0.25), 200)["new"]
    # Even: 125 on each at the end, the newcomer drawing 125 (p2c, which
    # compares two at random, a little less).
    assert full >= (115 if policy == "least-load" else 85)
    # A quarter of the weight: a quarter of the others' load, about 38.
    assert 20 <= quarter <= 50 and quarter < full / 2


def test_the_ramp_opens_up_as_it_goes_and_the_newcomer_catches_up():
    cluster = loaded("least-load", 0.25)
    p = cluster.pool
    burst(cluster, 200)
    p.rampTick(SECONDS)  # all of its weight
    assert ramp(p, "new") == 1.0
    more = burst(cluster, 100)
    # Now the one that lags: it takes the next ones.
    assert more["new"] >= 80


def test_round_robin_and_least_conn_give_a_ramping_backend_its_weights_share():
    for policy in ("round-robin", "least-conn"):
        cluster = loaded(policy, 0.1)
        counts = burst(cluster, 310)
        # 0.1 / 3.1 of the turns: 10.
        assert 7 <= counts["new"] <= 13, (policy, counts)


def test_hash_bounds_a_ramping_backend_by_its_share_of_the_weight():
    cluster = loaded("hash", 0.1)
    counts = burst(cluster, 400, keyed=True)
    p = cluster.pool
    total = sum(s.estimatedConnections for s in p.snapshot())
    # Its bound: 1.25 x the total x 0.1 / 3.1 (rounded up).
    assert p.get("new").estimatedConnections <= math.ceil(1.25 * total * 0.1 / 3.1)
    assert counts["new"] > 0


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["least-load", "least-conn"]),
    steps=st.lists(
        st.tuples(st.sampled_from(["pick", "release", "tick", "report", "bounce"]),
                  st.integers(0, 5)),
        max_size=80,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_index_stays_correct_as_ramps_move(policy, steps, seed):
    """
    Whatever happens, a pick is a backend of the lowest score there is
    (the index, re-scored only for what changed, agrees with a scan).
    """
    from twistedcluster.core import policies

    score = {"least-load": policies._rampedExpected, "least-conn": policies._rampedRelayed}[policy]
    names = [f"b{i}" for i in range(6)]
    p = pool(*names[:3], capacity=50)
    for n in names[3:]:
        p.register(n, "127.0.0.1", 2, capacity=50)
    cluster = Cluster(p, policy=policy, rng=random.Random(seed))
    routes = []
    now = 0.0
    for what, k in steps:
        name = names[k]
        if what == "pick":
            candidates = list(p.candidates())
            route = cluster.pick()
            if route is None:
                assert not candidates
                continue
            low = min(score(c) for c in candidates)
            assert score(route.backend) <= low + 1e-9
            routes.append(route)
        elif what == "release" and routes:
            r = routes.pop(k % len(routes))
            p.connected(r.name, r.ticket)
            p.release(r.name, r.ticket)
        elif what == "tick":
            now += SECONDS * k / 7
            p.rampTick(now)
        elif what == "report":
            p.report(name, k, k / 50)
        elif what == "bounce":
            p.markDown(name)
            p.markUp(name)


# -- the balancer's timer ---------------------------------------------------------


def test_the_timer_ramps_backends_that_come_up_after_the_balancers_first_seconds():
    clock = Clock()
    p = pool("early", slowStart=0)
    service = SlowStart(p, SECONDS, clock)
    service.startService()
    clock.advance(1)
    p.register("soon", "127.0.0.1", 2)
    assert ramp(p, "early") == ramp(p, "soon") == 1.0  # as the balancer starts: warm
    clock.advance(SECONDS)
    assert p.slowStart == SECONDS
    p.register("late", "127.0.0.1", 3)
    assert ramp(p, "late") == 1 / RAMP_STEPS
    shares = []
    for _ in range(RAMP_STEPS + 1):
        clock.advance(SECONDS / RAMP_STEPS)
        shares.append(ramp(p, "late"))
    assert shares == sorted(shares) and shares[-1] == 1.0 and shares[len(shares) // 2] < 0.6
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_stopping_before_it_opens_leaves_nothing_behind():
    clock = Clock()
    service = SlowStart(Pool(), SECONDS, clock)
    service.startService()
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_option_default_off_and_checked():
    options = balancer.Options()
    options.parseOptions([])
    assert options["slow-start"] == 0
    options = balancer.Options()
    options.parseOptions(["--slow-start", "2.5"])
    assert options["slow-start"] == 2.5
    for bad in ("-1", "inf", "soon"):
        with pytest.raises(usage.UsageError):
            balancer.Options().parseOptions(["--slow-start", bad])


def test_the_balancer_has_the_timer_only_with_slow_start():
    from twisted.internet.testing import MemoryReactorClock

    def timers(argv):
        options = balancer.Options()
        options.parseOptions(["--listen=tcp:0", "--control=tcp:0", "--admin=tcp:0", *argv])
        top = balancer.makeService(options, MemoryReactorClock())
        return [s for s in top if isinstance(s, SlowStart)]

    assert timers([]) == []
    [timer] = timers(["--slow-start=30"])
    assert timer.seconds == 30


def test_metrics_show_the_share_of_weight():
    p = pool("a")
    p.register("b", "127.0.0.1", 2)
    from prometheus_client.parser import text_string_to_metric_families

    from twistedcluster.balancer.metrics import exposition

    text = exposition(MetricsRoot(Cluster(p), processMetrics=False)).decode()
    shares = {
        s.labels["backend"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "twistedcluster_backend_slow_start_share"
        for s in f.samples
    }
    assert shares == {"a": 1.0, "b": 1 / RAMP_STEPS}


def test_every_policy_routes_to_a_lone_ramping_backend():
    for name in POLICIES:
        p = pool()
        p.register("only", "127.0.0.1", 2)
        assert Cluster(p, policy=name).pick(key="10.0.0.1").name == "only"


def test_round_robin_gives_a_backend_its_turn_at_its_new_share_not_its_old():
    cluster = loaded("round-robin", 0.05)
    p = cluster.pool
    first = burst(cluster, 30)
    assert first["new"] <= 2
    p.rampTick(SECONDS)  # all of its weight: its turns come every 4 picks
    again = burst(cluster, 40)
    assert 8 <= again["new"] <= 12, again
