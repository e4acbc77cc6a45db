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
        self.shares = mirror.CapacityShares()
        # Views say what changed since the last, as the supervisor's do;
        # the workers tell what changed in their pools, as runWorker does.
        self.senders = [mirror.ViewSender(), mirror.ViewSender()]
        self.changes = self.main.pool.follow()
        self.workerChanges = [w.pool.follow() for w in self.workers]
        for i in range(2):
            self.shares.join(i)
        #: The workers' redirect answers as the main pool counts them:
        #: (name, ticket), to settle or expire as the main process would.
        self.handedOff = []

    def settle(self, name, ticket, settled):
        # As the main process's redirect factory does with a settled one
        # (after HANDOFF_SETTLE with one that is not).
        self.handedOff.append((name, ticket))
        if settled:
            self.main.pool.connected(name, ticket, served=False)

    def traffic(self, i):
        names = set(self.workerChanges[i])
        self.workerChanges[i].clear()
        mirror.keepRamps(self.workers[i].pool, self.applied[i], names)
        return mirror.trafficOf(self.workers[i].pool, self.said[i], self.applied[i], names)

    def views(self, plan):
        """
        The view each worker is to be sent now, as the supervisor makes
        them: (number, (policy, entries, removed)), or None.
        """
        for changes in (self.changes, self.shares.moved):
            for v in self.senders:
                v.touch(changes)
            changes.clear()
        out = []
        for i in range(len(self.workers)):
            view = self.senders[i].next(self.main, self.books[i], plan[i])
            if view is not None:
                _, entries, removed = view
                changed = None if removed is None else {e[0] for e in entries}.union(removed)
                view = (self.shares.sent(i, plan[i], changed), view)
            out.append(view)
        return out

    def apply(self, i, view):
        policy, entries, removed = view
        mirror.applyView(self.workers[i], policy, entries, self.applied[i], removed)

    def fold(self, i):
        mirror.fold(self.main.pool, self.books[i], self.traffic(i), self.settle)

    def sync(self):
        """
        Every message delivered at once: traffic, views, their shares, and
        each worker's word that it applied its view.
        """
        for i in range(len(self.workers)):
            self.fold(i)
        for book in self.books:  # as the supervisor does when backends come or go
            mirror.forgetGone(self.main.pool, book)
        plan = self.shares.plan(self.main.pool, dict(enumerate(self.books)))
        for i, sent in enumerate(self.views(plan)):
            if sent is not None:
                number, view = sent
                self.apply(i, view)
                self.shares.applied(i, number)


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


def test_without_sync_each_worker_fills_only_its_share():
    """
    Between two syncs each worker knows only its own picks, so it fills only
    its share of the capacity: a burst at both at once cannot overshoot
    (before shares, each took all 4).  Waiting clients move the free room
    to the worker that has them.
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c.sync()
    picked = [sum(w.pick() is not None for _ in range(10)) for w in c.workers]
    assert picked == [2, 2]
    c.sync()
    assert all(w.pick() is None for w in c.workers)
    # Worker 0 has 3 clients waiting: it gets 3 of the 4.
    c2 = Cluster3()
    c2.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c2.shares.demand[0] = 3
    c2.sync()
    assert [w.pool.get("a").quota for w in c2.workers] == [3, 1]
    assert sum(c2.workers[0].pick() is not None for _ in range(10)) == 3
    # Worker 0 has used its share (the plan is cached), then 2 clients
    # wait there: the idle worker's share moves to it, once applied.
    c3 = Cluster3()
    c3.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c3.sync()
    assert sum(c3.workers[0].pick() is not None for _ in range(10)) == 2
    for _ in range(3):
        c3.sync()
    settled = [w.pool.get("a").quota for w in c3.workers]
    assert sum(c3.workers[0].pick() is not None for _ in range(10)) == settled[0] - 2
    for _ in range(3):
        c3.sync()
    assert [w.pool.get("a").quota for w in c3.workers] == settled
    c3.shares.demand[0] = 2
    c3.sync()
    c3.sync()
    assert [w.pool.get("a").quota for w in c3.workers] == [4, 0]
    assert sum(c3.workers[0].pick() is not None for _ in range(10)) == 4 - settled[0]


def test_a_shrunk_share_counts_until_the_worker_has_applied_it():
    """
    The room taken from one worker is given to another only once the first
    has said it applied the smaller share: until then it may still fill
    the larger one.
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c.sync()
    assert [w.pool.get("a").quota for w in c.workers] == [2, 2]
    # Worker 0 has clients waiting: the plan takes worker 1's share...
    c.shares.demand[0] = 4
    plan = c.shares.plan(c.main.pool, dict(enumerate(c.books)))
    assert plan == {0: {"a": 2}, 1: {"a": 0}}  # ... but gives it to no one yet
    for i in range(2):
        c.shares.sent(i, plan[i])
    # Worker 1 had not read that view: it fills its old share meanwhile.
    assert sum(c.workers[1].pick() is not None for _ in range(3)) == 2
    mirror.fold(c.main.pool, c.books[1], mirror.trafficOf(c.workers[1].pool, c.said[1]))
    plan = c.shares.plan(c.main.pool, dict(enumerate(c.books)))
    assert plan[0] == {"a": 2}
    # Once it has applied it, what it does not hold goes to worker 0.
    c.shares.applied(1, 2)
    plan = c.shares.plan(c.main.pool, dict(enumerate(c.books)))
    assert plan == {0: {"a": 2}, 1: {"a": 2}}  # worker 1 holds 2 now: nothing is free


def test_a_redirect_answer_that_counts_nothing_is_not_bound_by_the_share():
    """
    Capacity 1 and two workers: one has the share, the other none.  The
    other's clients wait for it (nothing to pick, room elsewhere); an answer
    past its source's share, which counts nothing, still names the backend.
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=1)
    c.sync()
    quotas = [w.pool.get("a").quota for w in c.workers]
    assert sorted(quotas) == [0, 1]
    none = c.workers[quotas.index(0)]
    assert none.pick() is None and none.roomElsewhere()
    assert none.pickBeyondShare(counted=False).name == "a"
    assert none.pool.get("a").routed == 0
    # One process has no shares: nothing is ever room elsewhere.
    assert not c.main.roomElsewhere()


def test_redirect_answers_count_across_workers_until_a_report_sees_them():
    """
    A worker holds its redirect answers as connections, within its share,
    until their clients have had time to connect; handed off then, they
    count in the main pool (so in every worker's view) until a report has
    seen them, and in the worker while a view made before the main process
    counted them is applied.  Before, the main pool never counted them and
    the next view wiped them from the worker: two workers named a backend
    of capacity 5 to 17-21 clients in a burst.
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c.sync()
    w0, w1 = c.workers
    assert [w.pool.get("a").quota for w in c.workers] == [2, 2]
    answers = []
    for _ in range(2):
        r = w0.pick()
        w0.pool.answered(r.name, r.ticket)
        answers.append(r)
    assert w0.pick() is None  # its share is used
    c.sync()
    main = c.main.pool.get("a")
    # Not relayed (as one process's answers are not), but counted, as
    # worker 0's: within its share.
    assert (main.routed, main.active, main.estimatedConnections) == (2, 0, 2)
    assert c.books[0].holding("a") == 2
    assert [w.pool.get("a").estimatedConnections for w in c.workers] == [2, 2]
    # Handed off: no longer the worker's, but counted as answers are.
    for r in answers:
        w0.pool.handOff(r.name, r.ticket)
    assert w0.pool.get("a").active == 0 and w0.pick() is None  # still its share's
    # A view the main process made before it counted them: still counted.
    policy, entries = mirror.viewFor(c.main, c.books[0], {"a": 2})
    mirror.applyView(w0, policy, entries, c.applied[0])
    assert w0.pool.get("a").estimatedConnections == 2
    assert w0.pick() is None
    c.sync()
    main = c.main.pool.get("a")
    assert (main.routed, main.active, main.estimatedConnections) == (2, 0, 2)
    assert c.books[0].holding("a") == 0 and len(c.handedOff) == 2
    for w in c.workers:
        assert w.pool.get("a").estimatedConnections == 2
    c.sync()
    assert sum(w.pool.get("a").quota for w in c.workers) == 2
    held = [r for w in c.workers for r in [w.pick() for _ in range(5)] if r is not None]
    assert len(held) == 2
    # The clients connected and a report saw them and the two held: the
    # answers count no more on their own, nor twice.
    c.sync()
    c.main.pool.report("a", 4, 1.0, seen=c.main.pool.mark("a"))
    main = c.main.pool.get("a")
    assert (main.connections, main.estimatedConnections) == (4, 4)


def test_a_worker_that_dies_hands_off_the_answers_it_held():
    """
    Their clients were answered and may be on their way: they count in the
    main pool as answers do, until a report sees them or they expire.
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c.sync()
    w0 = c.workers[0]
    r = w0.pick()
    w0.pool.answered(r.name, r.ticket)
    held = w0.pick()
    c.sync()
    assert c.books[0].holding("a") == 2
    gone = []
    mirror.release(c.main.pool, c.books[0], lambda name, ticket, settled: gone.append((name, settled)))
    main = c.main.pool.get("a")
    assert (main.active, main.estimatedConnections, gone) == (0, 1, [("a", False)])
    assert held is not None
    # Not settled: its client may still be on its way, and a report that
    # does not count it does not end it (it settles in the main process's
    # redirect factory first).  Taken as settled, it would count nowhere.
    c.main.pool.report("a", 0, 0.0, seen=c.main.pool.mark("a"))
    assert c.main.pool.get("a").estimatedConnections == 1


def test_a_backend_forgotten_and_added_again_starts_from_nothing_in_the_books():
    """
    A worker held connections on a backend the main pool then forgot; one
    of the same name joins again.  What the worker held on the old one is
    not its holding on the new one (it would have counted in the view's
    base and the shares until the worker next spoke of it), and what it
    routes to the new one counts from its first word (its totals there
    start again from nothing, below the old ones: it was lost until they
    passed them).
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    c.sync()
    w0 = c.workers[0]
    assert all(w0.pick() is not None for _ in range(2))
    c.sync()
    assert c.books[0].holding("a") == 2
    c.main.pool.markDown("a")
    c.main.pool.remove("a")
    c.sync()  # the workers drop it too
    assert "a" not in w0.pool
    c.main.pool.register("a", "127.0.0.1", 1, capacity=4)
    mirror.forgetGone(c.main.pool, c.books[0])
    assert c.books[0].holding("a") == 0
    c.sync()
    assert w0.pick() is not None
    c.sync()
    main = c.main.pool.get("a")
    assert (main.active, c.books[0].holding("a")) == (1, 1)


def test_a_backend_removed_and_added_again_between_two_views_starts_again_in_the_worker():
    """
    The main pool forgets a backend and adds one of the same name before
    the worker has seen a view without it: the view's incarnation says it
    is another, so the worker starts it again from nothing, as the main
    pool's book does; figures the worker sent of the old one count for
    nothing.  (Without the incarnation, the worker's old answers counted
    as pending against its share for good: it never picked there again.)
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=10)
    c.sync()
    w0 = c.workers[0]
    for _ in range(4):
        r = w0.pick()
        w0.pool.answered(r.name, r.ticket)
        w0.pool.handOff(r.name, r.ticket)
    stale = mirror.trafficOf(w0.pool, c.said[0], c.applied[0])
    c.main.pool.markDown("a")
    c.main.pool.remove("a")
    c.main.pool.register("a", "127.0.0.1", 1, capacity=10)
    mirror.fold(c.main.pool, c.books[0], stale)  # crossed the change
    assert c.main.pool.get("a").estimatedConnections == 0
    c.sync()
    assert (w0.pool.get("a").handedOff, w0.pool.get("a").quota) == (0, 5)
    assert w0.pick() is not None
    c.sync()
    assert c.main.pool.get("a").active == 1


def test_an_answer_counts_though_a_connect_failed_in_the_same_sync_interval():
    """
    A worker's routed total falls when a connect fails: an answer given in
    the same sync interval is still counted (it was lost when answers were
    taken out of the routed total's growth).
    """
    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=2)
    c.sync()
    w0 = c.workers[0]
    r = w0.pick()
    c.sync()
    w0.pool.connectFailed(r.name, r.ticket)
    answer = w0.pick()
    w0.pool.answered(answer.name, answer.ticket)
    c.sync()
    main = c.main.pool.get("a")
    assert (main.estimatedConnections, c.books[0].holding("a")) == (1, 1)
    w0.pool.handOff(answer.name, answer.ticket)
    c.sync()
    assert len(c.handedOff) == 1
    assert c.main.pool.get("a").estimatedConnections == 1


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(1, 12),
    others=st.integers(0, 4),
    steps=st.lists(
        st.tuples(
            st.sampled_from(
                ["pick", "close", "push", "view", "flush", "message", "want", "answer", "settle", "fail"]
            ),
            st.integers(0, 1),
            st.integers(0, 3),
        ),
        max_size=120,
    ),
)
def test_capacity_holds_across_workers_whatever_the_message_delays(capacity, others, steps):
    """
    Messages either way delivered late and in any interleaving with picks,
    closes, redirect answers and changing demand (each channel in order, as
    a socket is): the workers together never hold and name more than the
    capacity the backend's own report leaves; and once every message is
    through, a worker with clients waiting gets the whole of the free room.
    """
    from collections import deque

    c = Cluster3()
    c.main.pool.register("a", "127.0.0.1", 1, capacity=capacity)
    c.main.pool.report("a", others, others / capacity)  # another balancer's clients
    toWorker = [deque(), deque()]
    toMain = [deque(), deque()]
    applied = [0, 0]
    held = [[], []]
    answered = [0, 0]  # no report comes: the answers count to the end
    answering = [[], []]  # held as connections until they settle

    def push():
        plan = c.shares.plan(c.main.pool, dict(enumerate(c.books)))
        for i, sent in enumerate(c.views(plan)):
            if sent is not None:
                toWorker[i].append(sent)

    def view(i):
        if toWorker[i]:
            number, sent = toWorker[i].popleft()
            c.apply(i, sent)
            applied[i] = number

    def flush(i, waiting):
        toMain[i].append((c.traffic(i), applied[i], waiting))

    def message(i):
        if toMain[i]:
            traffic, number, waiting = toMain[i].popleft()
            mirror.fold(c.main.pool, c.books[i], traffic, lambda name, ticket, settled: None)
            c.shares.applied(i, number)
            c.shares.demand[i] = waiting

    waiting = [0, 0]
    for what, i, n in steps:
        w = c.workers[i]
        if what == "pick" and "a" in w.pool:
            r = w.pick()
            if r is not None:
                w.pool.connected(r.name, r.ticket)
                held[i].append(r)
        elif what == "close" and held[i]:
            r = held[i].pop(0)
            w.pool.release(r.name, r.ticket)
        elif what == "answer" and "a" in w.pool:
            r = w.pick()
            if r is not None:
                w.pool.answered(r.name, r.ticket)
                answering[i].append(r)
                answered[i] += 1
        elif what == "fail" and "a" in w.pool:
            r = w.pick()  # a connect that fails: its routed total falls again
            if r is not None:
                w.pool.connectFailed(r.name, r.ticket)
        elif what == "settle" and answering[i]:
            r = answering[i].pop(0)
            w.pool.handOff(r.name, r.ticket)
        elif what == "push":
            push()
        elif what == "view":
            view(i)
        elif what == "flush":
            flush(i, waiting[i])
        elif what == "message":
            message(i)
        elif what == "want":
            waiting[i] = n
        assert len(held[0]) + len(held[1]) + sum(answered) <= max(0, capacity - others)

    # Everything through, worker 0 with clients waiting: it can fill the rest.
    waiting = [20, 0]  # more than there is room for
    for _ in range(4):
        for i in range(2):
            while toWorker[i]:
                view(i)
            flush(i, waiting[i])
            while toMain[i]:
                message(i)
        push()
        for i in range(2):
            while toWorker[i]:
                view(i)
    while c.workers[0].pick() is not None:
        pass
    # Worker 0's answers it still holds are in its active count.
    total = c.workers[0].pool.get("a").active + len(held[1]) + sum(answered) - len(answering[0])
    assert total == max(0, capacity - others) or print(c.workers[0].pool.get("a"))


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


def _fullPlan(shares, pool, books):
    """
    What C{shares} would plan now working every backend out again, with the
    same shares in force and demand: what its incremental plan must equal.
    """
    import copy

    twin = copy.copy(shares)
    twin._planned, twin._tight, twin._dirty, twin.moved = {}, set(), set(), set()
    twin._out, twin._plannedFor, twin._pool, twin._changes = {}, [], pool, set()
    return twin.plan(pool, books)


def _mirrored(w):
    return [(b.name, b.host, b.port, b.state, b.weight, b.ramp, b.capacity, b.quota) for b in w.pool.snapshot()]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "register", "report", "remove", "down", "drain", "enable", "weight", "pick", "close",
                    "policy", "tick", "eject",
                ]
            ),
            st.integers(0, 4),
            st.integers(0, 12),
        ),
        max_size=60,
    ),
    demand=st.tuples(st.integers(0, 6), st.integers(0, 6)),
)
def test_views_and_shares_that_say_only_what_changed_equal_whole_ones(steps, demand):
    """
    Each plan works out only the backends that changed, and each view after
    the first says only what changed (at thousands of backends, whole ones
    each sync interval kept every process busy): after any changes, the
    shares equal a plan of every backend, what each worker was sent equals
    a whole view of the pool, and each worker's pool equals one given whole
    views, slow start's step included after the worker readmitted one
    itself.  (Clients waiting, which move only the backends where a worker
    used its share, by design, stay as they are.)
    """
    c = Cluster3()
    c.shares.demand.update(enumerate(demand))
    c.main.pool.slowStart = 20.0
    now = [0.0]
    twins = [Cluster(), Cluster()]
    twinApplied = [{}, {}]
    held = [[], []]
    for what, k, n in steps:
        name = f"b{k}"
        pool = c.main.pool
        if what == "register":
            pool.register(name, "127.0.0.1", 1000 + k + n, capacity=1 + n)
        elif what == "tick":
            now[0] += n
            pool.rampTick(now[0])
        elif name not in pool and what not in ("pick", "close", "policy"):
            continue
        elif what == "report":
            pool.report(name, n, n / 10)
        elif what == "remove":
            pool.remove(name) if n % 2 else pool.removeMany([name])
        elif what == "down":
            pool.markDown(name)
        elif what == "drain":
            pool.setAdminState(name, AdminState.DRAINING)
        elif what == "enable":
            pool.markUp(name)
            pool.setAdminState(name, AdminState.ENABLED)
        elif what == "weight":
            pool.setWeight(name, n)
        elif what == "pick":
            r = c.workers[k % 2].pick()
            if r is not None:
                c.workers[k % 2].pool.connected(r.name, r.ticket)
                held[k % 2].append(r)
        elif what == "close" and held[k % 2]:
            r = held[k % 2].pop(0)
            if r.name in c.workers[k % 2].pool:
                c.workers[k % 2].pool.release(r.name, r.ticket)
        elif what == "policy":
            c.main.setPolicy(["least-load", "round-robin"][n % 2])
        elif what == "eject" and name in c.workers[n % 2].pool:
            # Its passive health check ejects and readmits it: back at full
            # weight in a pool without slow start, unless given its step.
            w = c.workers[n % 2].pool
            if w.eject(name):
                w.readmit(name)
        for i in range(2):
            c.fold(i)
        for book in c.books:
            mirror.forgetGone(c.main.pool, book)
        books = dict(enumerate(c.books))
        plan = c.shares.plan(c.main.pool, books)
        assert plan == _fullPlan(c.shares, c.main.pool, books)
        for i, sent in enumerate(c.views(plan)):
            if sent is not None:
                number, view = sent
                c.apply(i, view)
                c.shares.applied(i, number)
            policy, whole = mirror.viewFor(c.main, c.books[i], plan[i])
            assert c.senders[i].sent == {e[0]: e for e in whole}
            mirror.applyView(twins[i], policy, whole, twinApplied[i])
            assert _mirrored(c.workers[i]) == _mirrored(twins[i])
            assert c.workers[i].policyName == policy
