"""
Measured costs within measurement noise of each other count as one.

Least-load routes on least expected delay: a backend's connections, plus
the new one, each at its measured cost (L{twistedcluster.backend.cost}).
Two identical backends never measure exactly the same cost (2.21 and
2.31 ms, say), and with nothing queued the cheaper one then wins every
pick: at low load it took twice the other's share, and in one run 914
connections against 30.  That is least expected delay taken literally,
with no harm to latency, but no operator reads it as balanced.

So the pool routes on a cost I{level}: the first cost measured becomes a
level; a cost within L{DEFAULT_TOLERANCE} of an existing level joins it
(the nearest one); a backend keeps its level while its measurements stay
within that tolerance of it (hysteresis: noise does not move it from one
level to the next and back).  Identical backends therefore share one cost
and tie, and ties are broken at random; a routed cost is never more than
the tolerance off what the backend measured.  Pure book-keeping, no I/O.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Dict, List, Optional

__all__ = ["CostLevels", "DEFAULT_TOLERANCE"]

#: Costs within this share of a level count as that level.  The median of
#: 32 gaps (L{twistedcluster.backend.cost}) moves by a few percent from one
#: report to the next on an unchanged service.
DEFAULT_TOLERANCE = 0.1


class CostLevels:
    """
    The cost levels in use in one pool, each with the number of backends
    on it.
    """

    def __init__(self, tolerance: float = DEFAULT_TOLERANCE) -> None:
        if not 0 <= tolerance < 1:
            raise ValueError("the tolerance must be in [0, 1)")
        self.tolerance = tolerance
        self._levels: List[float] = []
        self._users: Dict[float, int] = {}

    def __len__(self) -> int:
        return len(self._levels)

    def _within(self, measured: float, level: float) -> bool:
        return abs(measured - level) <= self.tolerance * level

    def place(self, current: Optional[float], measured: float) -> float:
        """
        The level of a backend that was on C{current} (C{None}: none yet)
        and now measures C{measured}: C{current} while the measurement is
        within the tolerance of it, else the nearest level it is within,
        else a new level at C{measured}.
        """
        if current is not None:
            if self._within(measured, current):
                return current
            self.release(current)
        levels = self._levels
        i = bisect_left(levels, measured)
        best: Optional[float] = None
        for j in (i - 1, i):
            if 0 <= j < len(levels) and self._within(measured, levels[j]):
                if best is None or abs(levels[j] - measured) < abs(best - measured):
                    best = levels[j]
        if best is None:
            best = measured
            insort(levels, best)
            self._users[best] = 0
        self._users[best] += 1
        return best

    def release(self, level: Optional[float]) -> None:
        """
        A backend left C{level} (C{None}: it had none).
        """
        if level is None:
            return
        left = self._users[level] - 1
        if left:
            self._users[level] = left
        else:
            del self._users[level]
            del self._levels[bisect_left(self._levels, level)]
