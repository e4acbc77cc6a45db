"""
What one balancer knows of a backend's connections, over any interleaving of
routing, accepting, closing and reporting: a model backend and a model
control channel around the real pool and cluster.

The backend accepts connections whenever it likes (a busy backend leaves them
in its accept queue), measures and reports whenever it likes, and reports
travel and are answered with delays; other clients may connect to it
directly.  Whatever the order, the balancer never routes it past its
capacity, never counts fewer than its own live connections to it, and once
everything has settled counts exactly what the backend holds.
"""

import random
from typing import List, Optional

from hypothesis import example, given, settings
from hypothesis import strategies as st

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.pool import Pool

CAPACITY = 5


class Model:
    def __init__(self, handOffs: bool) -> None:
        self.pool = Pool()
        self.pool.register("b", "127.0.0.1", 9000, capacity=CAPACITY)
        self.cluster = Cluster(self.pool, rng=random.Random(0))
        self.handOffs = handOffs
        # The balancer's connections: ticket -> accepted by the backend yet?
        self.routed = {}
        self.connecting: List[int] = []  # tickets not yet connected
        self.others = 0  # the backend's connections from other clients
        # The registration's answer gave the backend its first mark.
        self.backendMark: Optional[int] = self.pool.mark("b")
        #: What had reached the backend when each mark was sent.
        self.covers = {self.backendMark: set()}
        self.reports: List[tuple] = []  # in flight to the balancer
        self.answers: List[int] = []  # marks in flight to the backend
        self.lastSeen: Optional[int] = None  # echoed by the last report delivered
        #: Tickets some delivered report has seen.
        self.cancelled = set()

    @property
    def backendCount(self) -> int:
        return self.others + sum(self.routed.values())

    # -- events ------------------------------------------------------------

    def route(self) -> None:
        chosen = self.cluster.pick()
        if chosen is None:
            assert self.pool.get("b").full
            return
        self.connecting.append(chosen.ticket)
        if self.handOffs:
            self.pool.handOff("b", chosen.ticket)

    def connect(self) -> None:
        # A connect completes: the connection is in the backend's accept
        # queue.  (A handed-off client connects by itself; the redirect
        # listener tells the pool once it has had time to.)
        if self.connecting:
            ticket = self.connecting.pop(0)
            self.pool.connected("b", ticket, served=not self.handOffs)
            self.routed[ticket] = False

    def failConnect(self) -> None:
        if self.connecting and not self.handOffs:
            self.pool.connectFailed("b", self.connecting.pop(0))

    def accept(self) -> None:
        for ticket, accepted in self.routed.items():
            if not accepted:
                self.routed[ticket] = True
                return

    def close(self, i: int) -> None:
        if self.routed:
            ticket = sorted(self.routed)[i % len(self.routed)]
            del self.routed[ticket]
            if not self.handOffs:
                self.pool.release("b", ticket)

    def otherConnects(self) -> None:
        self.others += 1

    def otherCloses(self) -> None:
        self.others = max(0, self.others - 1)

    def measure(self) -> None:
        self.reports.append((self.backendCount, self.backendMark))

    def deliverReport(self) -> None:
        if self.reports:
            count, seen = self.reports.pop(0)
            self.lastSeen = seen
            self.cancelled |= self.covers[seen]
            self.pool.report("b", count, count / CAPACITY, seen)
            mark = self.pool.mark("b")
            self.covers[mark] = set(self.routed)
            self.answers.append(mark)

    def deliverAnswer(self) -> None:
        if self.answers:
            mark = self.answers.pop(0)
            # Every connection that had reached the backend before the mark
            # left is in its accept queue by the time the backend reads the
            # mark, and accepted before it next measures.
            for ticket in self.covers[mark]:
                if ticket in self.routed:
                    self.routed[ticket] = True
            self.backendMark = mark

    def settle(self) -> None:
        """
        Everything in flight arrives, every connection is accepted, and two
        report rounds go by.
        """
        while self.connecting:
            self.connect()
        for ticket in self.routed:
            self.routed[ticket] = True
        while self.reports or self.answers:
            self.deliverReport()
            self.deliverAnswer()
        for _ in range(2):
            self.measure()
            self.deliverReport()
            self.deliverAnswer()


EVENTS = st.one_of(
    st.just(("route",)),
    st.just(("connect",)),
    st.just(("failConnect",)),
    st.just(("accept",)),
    st.tuples(st.just("close"), st.integers(0, 20)),
    st.just(("otherConnects",)),
    st.just(("otherCloses",)),
    st.just(("measure",)),
    st.just(("deliverReport",)),
    st.just(("deliverAnswer",)),
)


_REPORT_ROUND = [("measure",), ("deliverReport",), ("deliverAnswer",)]


@settings(max_examples=600, deadline=None)
@given(st.lists(EVENTS, max_size=80), st.booleans())
# A report round while a client named by a redirect answer has not connected
# yet: it must not cancel that answer's load.
@example([("route",), *_REPORT_ROUND, *_REPORT_ROUND], True)
# The same while a proxied connect is still under way.
@example([("route",), *_REPORT_ROUND, *_REPORT_ROUND, ("connect",), *_REPORT_ROUND], False)
def test_capacity_holds_and_the_estimate_is_exact_once_settled(events, handOffs):
    model = Model(handOffs)
    for kind, *args in events:
        getattr(model, kind)(*args)
        ours = len(model.routed) + len(model.connecting)
        status = model.pool.get("b")
        # Never fewer than its own live connections...
        assert status.estimatedConnections >= ours
        # ...so what it routes never takes the backend past capacity,
        # whatever the reports say.
        assert ours <= CAPACITY
    model.settle()
    status = model.pool.get("b")
    assert status.estimatedConnections == model.backendCount
    assert status.addedSinceReport == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=60))
def test_a_report_cancels_only_what_the_backend_had_seen(events):
    # Right after a report, what the balancer adds to it is exactly its own
    # open connections that had not reached the backend before the mark
    # that report (or an earlier one) echoed.
    model = Model(handOffs=False)
    for kind, *args in events:
        reports = model.pool.get("b").reports
        getattr(model, kind)(*args)
        if model.pool.get("b").reports > reports:
            open_ = list(model.routed) + model.connecting
            unseen = [t for t in open_ if t not in model.cancelled]
            assert model.pool.get("b").addedSinceReport == len(unseen)
