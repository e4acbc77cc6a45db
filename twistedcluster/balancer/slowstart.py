"""
Slow start (``--slow-start SECONDS``): the timer that moves the pool's ramps
on.  What a ramp is lives in the pure core (L{Pool.rampTick}); this service
only supplies the time.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twistedcluster.core.pool import RAMP_STEPS, Pool

__all__ = ["DEFAULT_SLOW_START", "SlowStart", "checkSlowStart"]

log = Logger()

#: Off by default, as in HAProxy and Envoy: least-load already keeps a
#: newcomer to its share; slow start is for backends that must warm up.
DEFAULT_SLOW_START = 0.0
#: The shortest time between two ramp steps.
_MIN_STEP = 0.01


def checkSlowStart(value: str) -> float:
    """
    Seconds of slow start: 0 (off) or more; else C{ValueError}.
    """
    seconds = float(value)
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"must be 0 (off) or more seconds, not {value}")
    return seconds


checkSlowStart.coerceDoc = "0 (off) or more seconds."  # type: ignore[attr-defined]


class SlowStart(Service):
    """
    Ramps up backends that come up, in L{RAMP_STEPS} steps over C{seconds}.

    As HAProxy's ``slowstart``, it never applies to backends that come up
    as the balancer starts: they register in its first C{seconds} (a
    restarted balancer finds its backends warm), so it only applies from
    then on, and says so in the log.
    """

    def __init__(self, pool: Pool, seconds: float, clock) -> None:
        self.pool = pool
        self.seconds = seconds
        self.clock = clock
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._opening = None

    def startService(self) -> None:
        super().startService()
        self._opening = self.clock.callLater(self.seconds, self._open)
        self._loop.start(max(self.seconds / RAMP_STEPS, _MIN_STEP), now=False)

    def stopService(self):
        if self._opening is not None and self._opening.active():
            self._opening.cancel()
        self._opening = None
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _open(self) -> None:
        self._opening = None
        self.pool.slowStart = self.seconds
        log.info(
            "slow start: backends that come up from now on take {seconds} s to get their full share",
            seconds=self.seconds,
        )

    def _tick(self) -> None:
        self.pool.rampTick(self.clock.seconds())
