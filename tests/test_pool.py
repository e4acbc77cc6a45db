"""
The pool: states, admin settings that survive reconnects, accounting.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistedcluster.core.pool import (
    DEFAULT_WEIGHT,
    AdminState,
    InvalidWeight,
    Pool,
    State,
    UnknownBackend,
    allowedEjections,
    names,
)
from twistedcluster.core.policies import estimatedLoad


def poolOf(*ns):
    pool = Pool()
    for i, n in enumerate(ns):
        pool.register(n, "127.0.0.1", 9000 + i, capacity=10)
    return pool


def test_registered_backend_is_up_and_eligible():
    pool = poolOf("a", "b")
    assert [s.state for s in pool.snapshot()] == [State.UP, State.UP]
    assert names(pool.eligible()) == ("a", "b")


def test_down_drained_disabled_and_self_draining_are_not_eligible():
    pool = poolOf("a", "b", "c", "d", "e")
    pool.markDown("a")
    pool.setAdminState("b", AdminState.DRAINING)
    pool.setAdminState("c", AdminState.DISABLED)
    pool.setSelfDraining("d")
    assert names(pool.eligible()) == ("e",)
    states = {s.name: s.state for s in pool.snapshot()}
    assert states == {
        "a": State.DOWN,
        "b": State.DRAINING,
        "c": State.DISABLED,
        "d": State.DRAINING,
        "e": State.UP,
    }


def test_weight_zero_is_not_eligible_but_still_up():
    pool = poolOf("a", "b")
    pool.setWeight("a", 0)
    assert names(pool.eligible()) == ("b",)
    assert pool.get("a").state is State.UP


def test_admin_state_and_weight_survive_reregistration():
    pool = poolOf("a")
    pool.setAdminState("a", AdminState.DRAINING)
    pool.setWeight("a", 7)
    pool.markDown("a")
    pool.register("a", "127.0.0.2", 9100, capacity=5)
    s = pool.get("a")
    assert (s.state, s.weight, s.host, s.port, s.capacity) == (
        State.DRAINING,
        7,
        "127.0.0.2",
        9100,
        5,
    )


def test_self_draining_is_cleared_by_a_new_registration():
    pool = poolOf("a")
    pool.setSelfDraining("a")
    pool.register("a", "127.0.0.1", 9000)
    assert pool.get("a").state is State.UP


def test_unknown_backend_and_bad_weight_raise_clear_errors():
    pool = poolOf("a")
    with pytest.raises(UnknownBackend, match="no backend named 'zz'"):
        pool.setAdminState("zz", AdminState.DRAINING)
    with pytest.raises(InvalidWeight, match="out of range"):
        pool.setWeight("a", 257)
    with pytest.raises(InvalidWeight):
        pool.setWeight("a", -1)
    assert pool.get("a").weight == 1


def test_routing_accounting():
    pool = poolOf("a")
    first = pool.acquire("a")
    second = pool.acquire("a")
    assert second == first + 1
    s = pool.get("a")
    assert (s.active, s.routed, s.addedSinceReport) == (2, 2, 2)
    pool.connected("a", first)
    assert pool.connectFailed("a", second) == 1
    s = pool.get("a")
    assert (s.active, s.routed, s.addedSinceReport, s.failures) == (1, 1, 1, 1)
    pool.report("a", connections=4, load=0.4)
    s = pool.get("a")
    assert (s.connections, s.load, s.addedSinceReport) == (4, 0.4, 0)
    pool.release("a", first)
    pool.release("a", first)  # never below zero
    assert pool.get("a").active == 0


def test_abandoned_connect_is_not_a_failure():
    pool = poolOf("a")
    ticket = pool.acquire("a")
    assert pool.connectFailed("a", ticket, countFailure=False) == 0
    assert pool.get("a").routed == 0


def test_a_connection_the_backend_failed_counts_without_touching_accounting():
    pool = poolOf("a")
    assert pool.connectFailed("a", pool.acquire("a")) == 1
    ticket = pool.acquire("a")
    pool.connected("a", ticket, served=False)
    assert pool.backendFailed("a") == 2  # made, then closed before a byte
    s = pool.get("a")
    assert (s.active, s.routed, s.addedSinceReport, s.failures) == (1, 1, 1, 2)
    pool.release("a", ticket)
    first = pool.snapshot()
    pool.backendServed("a")
    assert pool.get("a").failures == 0
    cleared = pool.snapshot()
    pool.backendServed("a")  # nothing to clear: no change, snapshot kept
    assert pool.snapshot() is cleared
    assert pool.backendFailed("gone") == 0 and pool.backendServed("gone") is None
    assert first[0].failures == 2


def test_snapshot_is_cached_until_a_change():
    pool = poolOf("a")
    first = pool.snapshot()
    assert pool.snapshot() is first
    pool.report("a", 1, 0.1)
    assert pool.snapshot() is not first
    assert pool.snapshot()[0].connections == 1


def test_connections_closed_since_the_report_are_not_phantom_load():
    # Many short connections between two reports: none is open, so the
    # backend is neither full nor loaded in the balancer's eyes.
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    for _ in range(50):
        pool.release("a", pool.acquire("a"))
    s = pool.get("a")
    assert (s.addedSinceReport, s.full, s.routed) == (0, False, 50)
    assert [b.name for b in pool.eligible()] == ["a"]


def test_a_connection_counted_in_the_report_and_closed_since_lowers_the_estimate():
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    ticket = pool.acquire("a")
    pool.connected("a", ticket)
    pool.report("a", connections=1, load=0.1)  # the report counts it
    pool.release("a", ticket)
    assert pool.get("a").addedSinceReport == -1


def test_a_handed_off_connection_stays_added_until_a_report_sees_it():
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    ticket = pool.acquire("a")
    pool.handOff("a", ticket)
    s = pool.get("a")
    assert (s.active, s.addedSinceReport, s.routed) == (0, 1, 1)
    # Its client may not have connected yet: no mark covers it.
    early = pool.mark("a")
    pool.report("a", connections=0, load=0.0, seen=early)
    assert pool.get("a").addedSinceReport == 1
    pool.connected("a", ticket, served=False)  # it has had time to connect
    pool.report("a", connections=0, load=0.0, seen=early)  # measured before
    assert pool.get("a").addedSinceReport == 1
    pool.report("a", connections=1, load=0.1, seen=pool.mark("a"))
    assert pool.get("a").addedSinceReport == 0


def test_a_redirect_answer_shows_in_every_view_of_the_pool_at_once():
    # A worker's redirect answer (Pool.answered) is counted in the status,
    # the snapshot and the changes a follower collects (what the worker
    # tells the main process, mirror.trafficOf): a status read between the
    # pick and the answer, or a snapshot, kept the old count before.
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    changes = pool.follow()
    ticket = pool.acquire("a")
    before, snapshot = pool.get("a"), pool.snapshot()
    assert before.answered == 0 and snapshot[0].answered == 0
    changes.clear()
    pool.answered("a", ticket)
    assert pool.get("a").answered == 1
    assert pool.snapshot()[0].answered == 1
    assert "a" in changes


def test_a_ticket_of_a_forgotten_backend_does_not_touch_its_successor():
    # A backend is forgotten while a connection to it is open; one of the
    # same name joins; the old connection's close must not count against
    # the new one.
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    old = pool.acquire("a")
    pool.connected("a", old)
    pool.markDown("a")
    pool.remove("a")
    pool.register("a", "h", 1, capacity=10)
    new = pool.acquire("a")
    assert new != old
    pool.release("a", old)
    s = pool.get("a")
    assert (s.active, s.addedSinceReport, s.estimatedConnections) == (1, 1, 1)


def test_a_backend_forgotten_and_added_again_is_another_incarnation():
    pool = Pool()
    assert pool.incarnation("a") is None
    pool.register("a", "h", 1, capacity=10)
    first = pool.incarnation("a")
    pool.register("a", "h", 1, capacity=10, connections=3)  # again: the same one
    assert pool.incarnation("a") == first
    pool.markDown("a")
    pool.removeMany(["a"])
    assert pool.incarnation("a") is None
    pool.register("a", "h", 1, capacity=10)
    second = pool.incarnation("a")
    pool.remove("a")
    pool.register("a", "h", 1, capacity=10)
    assert len({first, second, pool.incarnation("a")}) == 3


def test_a_forgotten_hand_off_stops_counting():
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    ticket = pool.acquire("a")
    pool.handOff("a", ticket)
    pool.forgetHandOff("a", ticket)
    assert pool.get("a").addedSinceReport == 0
    pool.forgetHandOff("a", ticket)  # twice is harmless
    assert pool.get("a").addedSinceReport == 0


def test_a_failed_connect_after_a_report_does_not_lower_the_estimate():
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    ticket = pool.acquire("a")
    pool.report("a", connections=0, load=0.0)  # it never reached the backend
    pool.connectFailed("a", ticket)
    assert pool.get("a").addedSinceReport == 0
    # Without a report in between, the failed connect is taken back.
    ticket = pool.acquire("a")
    pool.connectFailed("a", ticket)
    assert pool.get("a").addedSinceReport == 0


# -- the caches never go stale ---------------------------------------------

NAMES = ("a", "b", "c", "d")

_OPS = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(NAMES), st.integers(1, 5), st.booleans()),
    st.tuples(st.just("acquire"), st.sampled_from(NAMES)),
    st.tuples(st.just("connected"), st.sampled_from(NAMES), st.integers(0, 8)),
    st.tuples(st.just("release"), st.sampled_from(NAMES), st.integers(0, 8)),
    st.tuples(st.just("handOff"), st.sampled_from(NAMES), st.integers(0, 8)),
    st.tuples(st.just("forgetHandOff"), st.sampled_from(NAMES), st.integers(0, 8)),
    st.tuples(st.just("connectFailed"), st.sampled_from(NAMES), st.integers(0, 8)),
    st.tuples(
        st.just("report"),
        st.sampled_from(NAMES),
        st.integers(0, 6),
        st.floats(0, 2),
        st.none() | st.integers(0, 8),
    ),
    st.tuples(st.just("markDown"), st.sampled_from(NAMES)),
    st.tuples(st.just("markUp"), st.sampled_from(NAMES)),
    st.tuples(st.just("eject"), st.sampled_from(NAMES)),
    st.tuples(st.just("readmit"), st.sampled_from(NAMES)),
    st.tuples(st.just("setWeight"), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("setAdminState"), st.sampled_from(NAMES), st.sampled_from(list(AdminState))),
    st.tuples(st.just("setSelfDraining"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(NAMES)),
)


def _inService(pool):
    # Recounted from the members: what the pool keeps as it goes must match.
    base = [m for m in pool._members.values()
            if m.healthy and m.admin is AdminState.ENABLED and not m.selfDraining]
    return len(base), sum(m.ejected for m in base)


def _apply(pool, op):
    kind, name, *args = op
    if kind == "register":
        capacity, static = args
        pool.register(name, "127.0.0.1", 9000, capacity=capacity, static=static)
        return
    tolerant = ("readmit", "connected", "release", "handOff", "forgetHandOff", "connectFailed")
    if name not in pool and kind not in tolerant:
        return
    getattr(pool, kind)(name, *args)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_OPS, st.booleans()), max_size=40))
def test_snapshots_always_match_the_members(steps):
    pool = Pool()
    for op, look in steps:
        _apply(pool, op)
        if not look:
            continue  # several changes may pile up before the next read
        # Read the caches between changes, as routing does.
        snapshot = pool.snapshot()
        fresh = tuple(m.status() for _, m in sorted(pool._members.items()))
        assert snapshot == fresh
        assert pool.eligible() == tuple(
            s for s in fresh if s.state is State.UP and s.weight > 0 and not s.full
        )
        for s in fresh:
            assert pool.get(s.name) == s
        assert (pool.inService, pool.ejected) == _inService(pool)
        # The live candidates and the index by load follow every change.
        candidates = pool.candidates()
        assert sorted(candidates, key=lambda s: s.name) == list(pool.eligible())
        assert len(candidates) == len(pool.eligible())
        assert [candidates[i] for i in range(len(candidates))] == list(candidates)
        lowest = pool.lowest(estimatedLoad, random.Random(0))
        if not candidates:
            assert lowest is None
        else:
            assert estimatedLoad(lowest) <= min(map(estimatedLoad, candidates)) + 1e-9
            assert lowest in candidates


def test_only_backends_with_an_operator_setting_are_admin_settings():
    # What a state file must keep: not every name that ever registered.
    pool = Pool()
    for n in ("plain", "drained", "weighted", "reset"):
        pool.register(n, "127.0.0.1", 9000)
    pool.setAdminState("drained", AdminState.DRAINING)
    pool.setWeight("weighted", 7)
    pool.setWeight("reset", 3)
    pool.setWeight("reset", DEFAULT_WEIGHT)
    pool.restore("restored", "10.0.0.1", 9001, AdminState.DISABLED, 1)
    assert sorted(pool.adminSettings()) == ["drained", "restored", "weighted"]
    assert pool.adminSettings()["weighted"] == {
        "host": "127.0.0.1", "port": 9000, "admin": "enabled", "weight": 7,
    }
    pool.remove("drained")
    assert sorted(pool.adminSettings()) == ["restored", "weighted"]


def test_forgettable_means_down_self_registered_and_unset():
    pool = Pool()
    for n in ("up", "down", "drained", "weighted"):
        pool.register(n, "127.0.0.1", 9000)
    pool.register("static", "127.0.0.1", 9001, static=True)
    for n in ("down", "drained", "weighted", "static"):
        pool.markDown(n)
    pool.setAdminState("drained", AdminState.DRAINING)
    pool.setWeight("weighted", 0)
    assert [n for n in ("up", "down", "drained", "weighted", "static")
            if pool.forgettable(n)] == ["down"]
    assert not pool.forgettable("never-heard-of")


def test_remove_many_at_once():
    pool = poolOf("a", "b", "c", "d")
    pool.setWeight("b", 5)
    seen = []
    pool.watch(lambda: seen.append(1))
    pool.snapshot()
    pool.removeMany(["b", "d", "not-there"])
    assert names(pool.snapshot()) == ("a", "c") and len(pool) == 2
    assert names(pool.eligible()) == ("a", "c")
    assert pool.adminSettings() == {} and seen == [1]
    pool.register("b", "127.0.0.1", 9009)  # comes back as new
    assert pool.get("b").weight == DEFAULT_WEIGHT


# -- the share of backends the passive health check may take out ---------------


@pytest.mark.parametrize(
    "base, percent, allowed",
    [
        (0, 50, 0),
        (1, 50, 0),  # never the last one in service
        (2, 50, 1),
        (3, 50, 1),  # 2 would leave 1 in, fewer than half of 3
        (4, 50, 2),
        (5, 50, 2),
        (10, 10, 1),
        (20, 10, 2),
        (3, 0, 1),  # as Envoy: one may always go, when another stays
        (2, 99, 1),
        (1, 100, 1),  # 100: no guard, the last one too
        (4, 100, 4),
    ],
)
def test_allowed_ejections(base, percent, allowed):
    assert allowedEjections(base, percent) == allowed


def guarded(*ns, percent=50):
    pool = poolOf(*ns)
    pool.maxEjectedPercent = percent
    return pool


def test_an_ejection_that_would_leave_too_few_in_is_refused():
    pool = guarded("a", "b", "c", "d")
    assert pool.eject("a") and pool.eject("b")
    assert not pool.eject("c")
    assert pool.get("c").state is State.UP
    assert (pool.ejected, pool.inService) == (2, 4)
    # Ejecting one already out changes nothing and is no refusal.
    assert pool.eject("a")
    pool.readmit("a")
    assert pool.eject("c")
    assert names(s for s in pool.snapshot() if s.state is State.UP) == ("a", "d")


def test_the_last_backend_in_service_is_never_ejected_unless_the_guard_is_off():
    pool = guarded("a")
    assert not pool.eject("a")
    assert pool.get("a").state is State.UP
    pool.maxEjectedPercent = 100
    assert pool.eject("a")
    assert pool.get("a").state is State.DOWN


def test_only_backends_taking_new_connections_count_for_the_share():
    # Drained, disabled, self-draining or down: the operator or the backend
    # took them out already, so they cannot make room for ejections.
    pool = guarded("a", "b", "c", "d", "e")
    pool.setAdminState("a", AdminState.DRAINING)
    pool.setAdminState("b", AdminState.DISABLED)
    pool.setSelfDraining("c")
    assert pool.inService == 2
    assert pool.eject("d")
    assert not pool.eject("e")
    pool.markDown("d")  # an ejected backend whose channel closed: not in
    assert (pool.ejected, pool.inService) == (0, 1)
    assert not pool.eject("e")


def test_when_backends_leave_service_the_longest_ejected_come_back_first():
    # Two of four out (the share), then the two left in go down: without
    # this the cluster would be down until the ejections time out, however
    # sound the ejected are (a hostile client may have taken them out).
    pool = guarded("a", "b", "c", "d")
    assert pool.eject("b") and pool.eject("a")
    pool.markDown("c")
    assert names(s for s in pool.snapshot() if s.state is State.UP) == ("b", "d")
    # Two in service: one may stay out.
    pool.setAdminState("d", AdminState.DRAINING)
    assert names(s for s in pool.snapshot() if s.state is State.UP) == ("b",)
    pool.markDown("b")
    assert names(s for s in pool.snapshot() if s.state is State.UP) == ("a",)
    assert (pool.ejected, pool.inService) == (0, 1)


def test_a_registration_does_not_readmit_an_ejected_backend():
    # A registration proves the control channel, not the service: a backend
    # whose service resets every connection re-registers as readily as a
    # healthy one.  It is tried again when its time out is over.
    pool = guarded("a", "b")
    pool.backendFailed("a")
    assert pool.eject("a")
    pool.register("a", "127.0.0.1", 9000, capacity=10)
    s = pool.get("a")
    assert (s.state, s.failures) == (State.DOWN, 0)
    pool.readmit("a")
    assert pool.get("a").state is State.UP


_HEALTH = st.one_of(
    st.tuples(st.just("fail"), st.sampled_from(NAMES)),
    st.tuples(st.just("readmit"), st.sampled_from(NAMES)),
    st.tuples(st.just("register"), st.sampled_from(NAMES)),
    st.tuples(st.just("remove"), st.sampled_from(NAMES)),
    st.tuples(st.just("markDown"), st.sampled_from(NAMES)),
    st.tuples(st.just("markUp"), st.sampled_from(NAMES)),
    st.tuples(st.just("drain"), st.sampled_from(NAMES)),
    st.tuples(st.just("enable"), st.sampled_from(NAMES)),
)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 100), st.lists(_HEALTH, max_size=60))
def test_never_more_than_the_allowed_share_is_ejected(percent, steps):
    """
    Whatever the order of failures (each asking to eject), readmissions,
    backends joining, leaving, going down and being drained, the ejected
    stay within the share, and with the guard on (under 100) one backend in
    service is always left.
    """
    pool = Pool()
    pool.maxEjectedPercent = percent
    for kind, name in steps:
        if kind == "register":
            pool.register(name, "127.0.0.1", 9000, capacity=10)
        elif name not in pool:
            continue
        elif kind == "fail":
            allowed = pool.eject(name)
            assert allowed == pool._members[name].ejected
        elif kind in ("drain", "enable"):
            state = AdminState.DRAINING if kind == "drain" else AdminState.ENABLED
            pool.setAdminState(name, state)
        else:
            getattr(pool, kind)(name)
        base, ejected = _inService(pool)
        assert (pool.inService, pool.ejected) == (base, ejected)
        assert ejected <= allowedEjections(base, percent)
        if percent < 100 and base:
            assert ejected < base


# -- candidates and the index by load ------------------------------------------


def test_candidates_leave_out_the_excluded_and_index_by_position():
    pool = poolOf("a", "b", "c", "d")
    pool.markDown("b")
    view = pool.candidates(exclude={"c"})
    assert sorted(names(view)) == ["a", "d"]
    assert len(view) == 2 and sorted(names([view[0], view[1]])) == ["a", "d"]
    assert view.get("c") is None and view.get("b") is None
    assert view.get("a") == pool.get("a")
    with pytest.raises(IndexError):
        view[2]


def test_lowest_skips_the_excluded_and_keeps_them_for_later():
    pool = poolOf("a", "b", "c")
    pool.report("a", 0, 0.1)
    pool.report("b", 0, 0.2)
    pool.report("c", 0, 0.3)
    rng = random.Random(0)
    assert pool.lowest(estimatedLoad, rng, exclude={"a"}).name == "b"
    assert pool.lowest(estimatedLoad, rng).name == "a"
    pool.setWeight("a", 0)
    assert pool.lowest(estimatedLoad, rng).name == "b"
    pool.removeMany(["b"])
    assert pool.lowest(estimatedLoad, rng).name == "c"


def test_lowest_breaks_ties_at_random():
    pool = poolOf("a", "b", "c")
    seen = set()
    for seed in range(50):
        fresh = poolOf("a", "b", "c")
        seen.add(fresh.lowest(estimatedLoad, random.Random(seed)).name)
    assert seen == {"a", "b", "c"}
    assert pool.lowest(estimatedLoad, random.Random(0)) is not None


def test_the_index_is_rebuilt_from_its_valid_entries_when_mostly_stale():
    pool = poolOf(*[f"b{i}" for i in range(3)])
    rng = random.Random(0)
    for _ in range(500):
        chosen = pool.lowest(estimatedLoad, rng)
        pool.release(chosen.name, pool.acquire(chosen.name))
    index = pool._indexes[estimatedLoad]
    assert len(index.heap) <= 2 * len(index.current) + 64 + 1


def test_a_reported_cost_is_kept_until_the_next_report():
    pool = Pool()
    pool.register("a", "127.0.0.1", 1, capacity=100, cost=0.004)
    assert pool.get("a").cost == 0.004
    pool.report("a", 3, 0.012, cost=0.005)
    assert pool.get("a").cost == 0.005
    # A report without one (a backend that does not measure): 1/capacity.
    pool.report("a", 3, 0.03)
    assert pool.get("a").cost == pytest.approx(0.01)
    pool.register("a", "127.0.0.1", 1, capacity=50)
    assert pool.get("a").cost == pytest.approx(0.02)


def test_a_static_backend_costs_a_capacity_share():
    pool = Pool()
    pool.register("s", "127.0.0.1", 1, capacity=10, static=True, cost=0.5)
    assert pool.get("s").cost == pytest.approx(0.1)


def test_routed_connections_add_to_the_estimate_at_the_backends_cost():
    pool = Pool()
    pool.register("a", "127.0.0.1", 1, capacity=1000, connections=2, load=0.016, cost=0.008)
    tickets = [pool.acquire("a") for _ in range(3)]
    assert estimatedLoad(pool.get("a")) == pytest.approx(5 * 0.008)
    pool.release("a", tickets[0])
    assert estimatedLoad(pool.get("a")) == pytest.approx(4 * 0.008)


def test_a_short_connection_open_at_a_report_with_an_older_mark_counts_once():
    # The report's mark predates the connection, so while it is open it may
    # or may not be in the report (counted twice, to be safe); once it
    # closes, having been open when the report came, the report counted it.
    pool = Pool()
    pool.register("a", "h", 1, capacity=10)
    mark = pool.mark("a")
    ticket = pool.acquire("a")
    pool.connected("a", ticket)
    pool.report("a", connections=1, load=0.1, seen=mark)
    assert pool.get("a").estimatedConnections == 2
    pool.release("a", ticket)
    assert pool.get("a").estimatedConnections == 0
    # One that reaches the backend after a report is not taken as in it.
    later = pool.acquire("a")
    pool.connected("a", later)
    pool.report("a", connections=1, load=0.1, seen=mark)
    other = pool.acquire("a")
    pool.connected("a", other)
    pool.release("a", other)
    assert pool.get("a").estimatedConnections == 2
    pool.release("a", later)
    assert pool.get("a").estimatedConnections == 0


def test_a_status_says_the_state_the_member_is_in():
    # _Member.status() works the state out inline (the routing path builds
    # one per routed connection): it must agree with _Member.state.
    from itertools import product

    from twistedcluster.core.pool import _Member

    for healthy, ejected, admin, selfDraining, static in product(
        (True, False), (True, False), list(AdminState), (True, False), (True, False)
    ):
        m = _Member(name="a", host="h", port=1, capacity=10, healthy=healthy, ejected=ejected,
                    admin=admin, selfDraining=selfDraining, static=static, active=3, connections=5, load=0.5)
        s = m.status()
        assert s.state is m.state
        assert s.addedSinceReport == m.addedSinceReport
        assert (s.connections, s.load) == ((3, 0.3) if static else (5, 0.5))
