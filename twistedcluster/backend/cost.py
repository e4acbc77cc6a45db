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
was open between one close and the next, averaged over the closes (a moving
average, each close weighing L{WEIGHT}).  For a service that serves one
connection at a time this is its service time, whatever its queue: while
it has work, one connection closes every service time.

Each gap counts for at most L{STRETCH} times the estimate so far (at
first, 1/capacity): so held connections that close together after a long
time, as clients of a chat or a proxy do, count as the burst of closes
they are (next to nothing each), not as the long time before it; a real
change of service time still takes over within a few dozen closes.

A connection costs 1/capacity (the count, as before this module existed):

  - without evidence: before L{MIN_EVIDENCE} connections have closed;
  - for connections closing rarely: when the gaps between closes, taken
    whole, average more than C{horizon} (a backend that closes fewer than
    one connection per C{horizon} seconds while busy holds its
    connections; their count against its capacity is its load);
  - at least: a backend that closes more than C{capacity} connections a
    busy second serves them in parallel, and its capacity, not its speed,
    limits it (there the time per close falls as more connections are
    served at once, which would draw ever more of them to it).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["CostMeter", "DEFAULT_HORIZON", "MIN_EVIDENCE", "STRETCH", "WEIGHT"]

#: What one close weighs in the moving average.
WEIGHT = 1.0 / 32
#: A gap counts for at most this many times the estimate so far.
STRETCH = 4.0
#: Seconds per connection above which a backend is taken to hold its
#: connections: counted, not costed.
DEFAULT_HORIZON = 0.25
#: Closes needed before the measurement counts.
MIN_EVIDENCE = 8
#: The longest gap counted whole (an hour).
_LONGEST = 3600.0
#: Closes after which each weighs WEIGHT.
_RAMP = round(1 / WEIGHT)


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
        #: Busy seconds since the last close; closes seen (up to 1/WEIGHT);
        #: the estimate; the average of the gaps taken whole.
        self._gap = 0.0
        self._closes = 0
        self._estimate = self.floor
        self._whole = 0.0

    def changed(self, count: int) -> None:
        """
        The connection count is now C{count}: a fall counts as closes.
        """
        now = self.clock.seconds()
        if self._count:
            self._gap += max(0.0, now - self._at)
        self._at = now
        closed = self._count - count
        self._count = count
        if closed <= 0:
            return
        estimate, whole, gap = self._estimate, self._whole, self._gap
        for k in range(min(closed, _RAMP)):
            # The first close ends the gap; the others closed with it took
            # no busy time of their own.  The first closes weigh more (a
            # plain average of the first 1/WEIGHT), so a backend that gets
            # few connections learns its cost from few.
            seen = self._closes = min(_RAMP, self._closes + 1)
            weight = max(WEIGHT, 1.0 / seen)
            estimate += weight * (min(gap, STRETCH * max(estimate, self.floor)) - estimate)
            whole += weight * (min(gap, _LONGEST) - whole)
            gap = 0.0
        if closed > _RAMP:
            fade = (1.0 - WEIGHT) ** (closed - _RAMP)
            estimate *= fade
            whole *= fade
        self._estimate, self._whole = estimate, whole
        self._gap = 0.0

    def measured(self) -> Optional[float]:
        """
        Busy seconds per closed connection, if there is evidence and the
        connections do not look held; C{None} otherwise.
        """
        if self._closes < MIN_EVIDENCE or self._whole > self.horizon:
            return None
        return self._estimate

    def cost(self) -> float:
        """
        Seconds of this backend's time one connection takes: what it
        measured, or 1/capacity, whichever is more.
        """
        measured = self.measured()
        if measured is None or measured < self.floor:
            return self.floor
        return measured
