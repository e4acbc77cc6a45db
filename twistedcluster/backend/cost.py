"""
What one connection costs this backend, measured from time alone.

A connection count says how many clients a backend holds, not how long it
takes to serve them: a backend that serves one request at a time in 8 ms
and one that does it in 2 ms look the same to a count.  The balancer's
estimate between reports therefore adds each connection it routes at the
cost this backend has shown (issue 15), and the backend reports its load on
that scale: connections x cost, the work it has queued, in seconds.

The cost is measured from the times the connection count changes, and
nothing else (no CPU time: a service may wait on a disk, a database or a
timer and still be slow): the time during which at least one connection
was open between one close and the next (the busy gap), the median of the
last L{WINDOW} gaps.  For a service that serves one connection at a time
this is its service time, whatever its queue: while it has work, one
connection closes every service time.

The median, not the mean, because closes also come in bursts that are no
service: held connections that clients close together after seconds (a
chat, a proxy, the benchmarks' bursts), or a queue of requests whose
clients gave up.  Such a burst is one long gap and many of next to
nothing; a mean would count the long wait as the cost of one connection.

Only a close of a connection the service wrote to ends a gap (the counting
wrapper tells, L{twistedcluster.backend.counting}).  A connection closed
before the service answered it took no service: a queue of 300 requests
whose clients gave up at once (it happened to the 8 ms backend of the
routing benchmark after each round-robin round, and least-load then took it
for the fastest backend for the next second), or a client refused for its
PROXY header.  Its close changes the count, and the busy time runs on to
the next close of a served connection while others are open (their service
goes on), or is dropped when none is.  (Sampling such closes at a bounded
rate instead, as this module once did, let held connections closing a
millisecond or two apart outvote the near-zero gaps that keep them at
1/capacity, and two identical backends measured costs 1.5x apart.)

A connection costs 1/capacity (the count, as before this module existed):

  - without evidence: before L{MIN_EVIDENCE} connections have closed;
  - for connections closing rarely: a median gap over C{horizon} (a
    backend that closes fewer than one connection per C{horizon} seconds
    while busy holds its connections; their count against its capacity is
    its load);
  - at least: a backend that closes more than C{capacity} connections a
    busy second serves them in parallel, and its capacity, not its speed,
    limits it (there the time per close falls as more connections are
    served at once, which would draw ever more of them to it).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from typing import Deque, List, Optional

__all__ = ["CostMeter", "DEFAULT_HORIZON", "MIN_EVIDENCE", "WINDOW"]

#: The gaps the median is taken over.
WINDOW = 32
#: Seconds per connection above which a backend is taken to hold its
#: connections: counted, not costed.
DEFAULT_HORIZON = 0.25
#: Closes needed before the measurement counts.
MIN_EVIDENCE = 8


class CostMeter:
    """
    Fed the backend's connection count each time it changes; says what a
    connection costs (L{cost}), in seconds.

    @param clock: what tells the time (C{seconds()}): the reactor, or a
        C{task.Clock} in tests.
    @param capacity: the connections the backend is sized for; 1/capacity
        is the cost without evidence, and the least cost.
    """

    def __init__(self, clock, capacity: int, horizon: float = DEFAULT_HORIZON) -> None:
        if capacity < 1 or not horizon > 0:
            raise ValueError("capacity and horizon must be positive")
        self.clock = clock
        self.floor = 1.0 / capacity
        self.horizon = horizon
        self._count = 0
        self._at = clock.seconds()
        #: Busy seconds since the last close; the last WINDOW gaps, in the
        #: order they ended and sorted.
        self._gap = 0.0
        self._gaps: Deque[float] = deque()
        self._sorted: List[float] = []
        #: Whether a gap was taken since L{cost} last answered, and what it
        #: answered then (L{moved}).
        self._fresh = False
        self._told: Optional[float] = None

    def changed(self, count: int, served: bool = True) -> None:
        """
        The connection count is now C{count}: a fall counts as closes, which
        end a gap when C{served} (the service wrote to the connections that
        closed); closes of connections it never answered only change the
        count (and drop the busy time when none is left open).
        """
        now = self.clock.seconds()
        if self._count:
            self._gap += max(0.0, now - self._at)
        self._at = now
        closed = self._count - count
        self._count = count
        if closed <= 0:
            return
        if not served:
            if not count:
                # Nothing left open: the busy time since the last answered
                # close went to connections nobody was answered on (a
                # readiness probe, a queue given up); the next gap starts
                # with the next connection.
                self._gap = 0.0
            return
        gaps, ordered = self._gaps, self._sorted
        gap = self._gap
        for _ in range(min(closed, WINDOW)):
            # The first close ends the gap; the others closed with it took
            # no busy time of their own.
            gaps.append(gap)
            insort(ordered, gap)
            if len(gaps) > WINDOW:
                del ordered[bisect_left(ordered, gaps.popleft())]
            gap = 0.0
        self._fresh = True
        self._gap = 0.0

    def measured(self) -> Optional[float]:
        """
        The median busy gap between closes, if there is evidence and the
        connections do not look held; C{None} otherwise.
        """
        ordered = self._sorted
        n = len(ordered)
        if n < MIN_EVIDENCE:
            return None
        median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        if median > self.horizon:
            return None
        return median

    def cost(self) -> float:
        """
        Seconds of this backend's time one connection takes: what it
        measured, or 1/capacity, whichever is more.
        """
        cost = self._told = self._now()
        self._fresh = False
        return cost

    def _now(self) -> float:
        measured = self.measured()
        return self.floor if measured is None or measured < self.floor else measured

    def moved(self, tolerance: float) -> bool:
        """
        Whether the cost is now more than C{tolerance} (a share) off what
        L{cost} last answered: worth telling the balancers before the next
        report is due.
        """
        if not self._fresh:
            return False
        told = self._told
        self._fresh = False
        return told is None or abs(self._now() - told) > tolerance * told
