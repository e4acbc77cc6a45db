"""
The pool across worker processes (L{twistedcluster.core.mirror}): plain
pools, no reactor.  Two worker mirrors and the main pool, synced by hand as
the channel would.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from twistedcluster.core import mirror
from twistedcluster.core.cluster import Cluster
from twistedcluster.core.pool import RAMP_STEPS, AdminState, State


class Cluster3:
    """
    A main cluster and two workers, each with its book and what it said.
    """

    def __init__(self):
        self.main = Cluster()
        self.workers = [Cluster(), Cluster()]
        for w in self.workers:
            w.pool.levelCosts(0)  # as runWorker does
        self.books = [mirror.TrafficBook(), mirror.TrafficBook()]
        self.said = [{}, {}]
        self.applied = [{}, {}]

    def sync(self):
        for i, w in enumerate(self.workers):
            mirror.fold(self.main.pool, self.books[i], mirror.trafficOf(w.pool, self.said[i]))
        for i, w in enumerate(self.workers):
            policy, entries = mirror.viewFor(self.main, self.books[i])
            mirror.applyView(w, policy, entries, self.applied[i])


def test_a_registration_and_an_admin_change_reach_every_worker():
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=10)
    c.main.pool.register("b", "127.0.0.1", 2, capacity=10)
    c.sync()
    for w in c.workers:
        assert [(b.name, b.state) for b in w.pool.snapshot()] == [("a", State.UP), ("b", State.UP)]
    c.main.pool.setAdminState("a", AdminState.DRAINING)
    c.main.pool.setWeight("b", 3)
    c.main.setPolicy("round-robin")
    c.sync()
    for w in c.workers:
        assert w.pool.get("a").state is State.DRAINING
        assert w.pool.get("b").weight == 3
        assert w.policyName == "round-robin"
        for _ in range(5):
            assert w.pick().name == "b"
    c.main.pool.markDown("b")
    c.main.pool.remove("a")
    c.sync()
    for w in c.workers:
        assert [(b.name, b.state) for b in w.pool.snapshot()] == [("b", State.DOWN)]
        assert w.pick() is None


def test_routed_and_active_are_summed_in_the_main_pool():
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=100)
    c.sync()
    routes = [[w.pick() for _ in range(3 + i)] for i, w in enumerate(c.workers)]
    c.sync()
    a = c.main.pool.get("a")
    assert (a.routed, a.active, a.addedSinceReport) == (7, 7, 7)
    w0 = c.workers[0]
    for r in routes[0][:2]:
        w0.pool.release(r.name, r.ticket)
    c.sync()
    assert (c.main.pool.get("a").active, c.main.pool.get("a").routed) == (5, 7)
    # A worker that dies: what it held is released.
    mirror.release(c.main.pool, c.books[1])
    assert c.main.pool.get("a").active == 1


def test_a_report_replaces_what_was_added():
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=100)
    c.sync()
    for w in c.workers:
        w.pick()
    c.sync()
    c.main.pool.report("a", 2, 0.02, seen=None)  # the backend saw both
    c.sync()
    for w in c.workers:
        s = w.pool.get("a")
        assert s.estimatedConnections == 2
        assert abs(s.load - 0.02) < 1e-9


def test_slow_start_share_is_mirrored():
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1)
    c.main.pool.setRamp("a", 5)
    c.sync()
    for w in c.workers:
        assert w.pool.get("a").ramp == 5 / RAMP_STEPS


def test_a_worker_ejection_is_its_own():
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1)
    c.main.pool.register("b", "127.0.0.1", 2)
    c.sync()
    assert c.workers[0].pool.eject("a")
    c.sync()
    assert c.workers[0].pool.get("a").state is State.DOWN
    assert c.workers[1].pool.get("a").state is State.UP


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 20),
    steps=st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.booleans()), max_size=80),
)
def test_capacity_holds_across_workers_when_synced_between_picks(capacity, steps):
    """
    Synced after every pick or close (what pacing past the sync interval
    gives), no backend ever holds more than its capacity across workers.
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=capacity)
    c.sync()
    held = [[], []]
    for worker, pick, close in steps:
        w = c.workers[worker]
        if pick:
            r = w.pick()
            if r is not None:
                w.pool.connected(r.name, r.ticket)
                held[worker].append(r)
        if close and held[worker]:
            r = held[worker].pop(0)
            w.pool.release(r.name, r.ticket)
        c.sync()
        assert len(held[0]) + len(held[1]) <= capacity
        assert c.main.pool.get("a").active == len(held[0]) + len(held[1])


def test_without_sync_the_overshoot_is_what_the_others_picked():
    """
    Between two syncs each worker knows only its own picks: the slack is
    what the other workers route in one interval (docs/internals.md).
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c.sync()
    picked = [sum(w.pick() is not None for _ in range(10)) for w in c.workers]
    assert picked == [4, 4]
    c.sync()
    assert all(w.pick() is None for w in c.workers)


def test_counter_deltas_add_up_to_the_totals():
    last, totals = {}, {}
    figures = {"waited": 2, "ended": {"proxy|normal": 3}, "bytes": {"a": [10, 20]}, "connect": [1, 0, 0.5, 1]}
    mirror.addDeltas(totals, mirror.counterDeltas(figures, last))
    figures["ended"]["proxy|normal"] = 5
    figures["bytes"]["a"][0] = 15  # in place, as Traffic does
    assert mirror.counterDeltas(figures, last) == {"ended": {"proxy|normal": 2}, "bytes": {"a": [5, 0]}}
    mirror.addDeltas(totals, {"ended": {"proxy|normal": 2}, "bytes": {"a": [5, 0]}})
    # A second worker's figures add to the same totals.
    mirror.addDeltas(totals, mirror.counterDeltas({"waited": 1, "ended": {"proxy|normal": 1}}, {}))
    assert totals == {"waited": 3, "ended": {"proxy|normal": 6}, "bytes": {"a": [15, 20]}, "connect": [1, 0, 0.5, 1]}
    assert mirror.counterDeltas(figures, last) == {}


def test_workers_route_least_load_on_the_main_pools_costs():
    # A 2 ms and an 8 ms backend, measured in the main pool: each worker
    # counts a connection at the same cost, so least-load fills them 4:1
    # there too (they took 1/capacity each, and split evenly).
    c = Cluster3()
    c.main.pool.register("fast", "127.0.0.1", 1, capacity=1000, cost=0.002)
    c.main.pool.register("slow", "127.0.0.1", 2, capacity=1000, connections=1, load=0.0085, cost=0.0085)
    c.sync()
    for w in c.workers:
        assert w.pool.get("fast").cost == 0.002
        assert w.pool.get("slow").cost == 0.0085
        assert w.pool.get("slow").load == 0.0085
    w = c.workers[0]
    picked = [w.pick().name for _ in range(8)]
    assert picked.count("fast") == 8, picked  # 8 x 2 ms < 1 x 8.5 ms queued + 8.5
    # Nothing changed: another sync reports nothing to the workers again.
    reports = [wk.pool.get("slow").reports for wk in c.workers]
    c.sync()
    c.sync()
    assert [wk.pool.get("slow").reports for wk in c.workers] == reports
