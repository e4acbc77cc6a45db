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
was open, divided by the connections that closed, each decayed with time
constant C{timeConstant} (an exponentially weighted window).  For a service
that serves one connection at a time this is its service time, whatever its
queue.

Two cases fall back to the capacity's figure, 1/capacity a connection (the
count, as before this module existed):

  - no evidence: fewer than L{MIN_EVIDENCE} connections closed within the
    window (a new backend, or one long idle);
  - long-lived connections: connections that live on average longer than
    C{horizon} (connection-seconds over closes).  Reports see those
    connections well, and their count, against the capacity, is the load; a
    service time measured from a few closes among many held connections
    would only say how long clients keep them.

The measured cost is never below 1/capacity either: a backend that closes
more than C{capacity} connections a busy second serves them in parallel,
and its capacity, not its speed, is what limits it (there, the time per
close falls as more connections are served at once, which would draw ever
more of them to it).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["CostMeter", "DEFAULT_HORIZON", "DEFAULT_TIME_CONSTANT", "MIN_EVIDENCE"]

#: Seconds over which the evidence fades (by 1/e).
DEFAULT_TIME_CONSTANT = 10.0
#: Connections living longer than this on average are counted, not costed.
DEFAULT_HORIZON = 0.1
#: Closes (within the window, decayed) needed before the measurement counts.
MIN_EVIDENCE = 3.0


class CostMeter:
    """
    Fed the backend's connection count each time it changes; says what a
    connection costs (L{cost}), in seconds.

    @param clock: what tells the time (C{seconds()}): the reactor, or a
        C{task.Clock} in tests.
    @param capacity: the connections the backend is sized for; 1/capacity
        is the cost without evidence, and the least cost.
    """

    def __init__(
        self,
        clock,
        capacity: int,
        timeConstant: float = DEFAULT_TIME_CONSTANT,
        horizon: float = DEFAULT_HORIZON,
    ) -> None:
        if capacity < 1 or not timeConstant > 0 or not horizon > 0:
            raise ValueError("capacity, time constant and horizon must be positive")
        self.clock = clock
        self.floor = 1.0 / capacity
        self.timeConstant = timeConstant
        self.horizon = horizon
        self._count = 0
        self._at = clock.seconds()
        #: Decayed sums: time with a connection open, connection-seconds,
        #: and closes.
        self._busy = 0.0
        self._held = 0.0
        self._closed = 0.0

    def _advance(self, now: float) -> None:
        elapsed = now - self._at
        if elapsed <= 0:
            return
        self._at = now
        keep = math.exp(-elapsed / self.timeConstant)
        # The exact decayed integral of a constant over the elapsed time.
        gained = self.timeConstant * (1.0 - keep)
        count = self._count
        self._busy = self._busy * keep + (gained if count else 0.0)
        self._held = self._held * keep + count * gained
        self._closed *= keep

    def changed(self, count: int) -> None:
        """
        The connection count is now C{count}: a fall counts as closes.
        """
        self._advance(self.clock.seconds())
        if count < self._count:
            self._closed += self._count - count
        self._count = count

    def measured(self) -> Optional[float]:
        """
        Busy seconds per closed connection, if there is evidence and the
        connections are short-lived; C{None} otherwise.
        """
        self._advance(self.clock.seconds())
        closed = self._closed
        if closed < MIN_EVIDENCE or self._held > self.horizon * closed:
            return None
        return self._busy / closed

    def cost(self) -> float:
        """
        Seconds of this backend's time one connection takes: what it
        measured, or 1/capacity, whichever is more.
        """
        measured = self.measured()
        if measured is None or measured < self.floor:
            return self.floor
        return measured
