"""
The passive health check: take a backend out for a while when the proxy's
own connections to it keep failing, and bring it back later.

Beside L{twistedcluster.balancer.healthcheck} (the active checks of static
backends): here nothing is sent to find out, the proxy reports what its
clients' connections met.  A failure is a connect that failed, or a
connection the backend ended before sending a byte (L{blames}); after
C{ejectAfter} in a row the backend is ejected for C{ejectFor} seconds, unless
the pool's share of ejections (C{--max-ejected-percent}) is used up.

The decisions (is a backend to blame, may it be ejected) are pure functions
and the pool's; this module keeps the timers and the log.
"""

from __future__ import annotations

from typing import Dict, Optional

from twisted.logger import Logger

from twistedcluster.core.pool import Pool
from twistedcluster.summary import Summary, window

log = Logger()

DEFAULT_EJECT_AFTER = 3
DEFAULT_EJECT_FOR = 10.0
#: Seconds after its connect within which a backend that closes or resets
#: the connection before sending a byte is counted as failing (as long as
#: the connect timeout, by default, to prove itself).
DEFAULT_EARLY_CLOSE_WINDOW = 3.0


def blames(clean: bool, clientDone: bool, elapsed: float, window: float) -> bool:
    """
    Whether a backend that ended a connection before sending anything is to
    blame (else it counts as having served): for a reset, and for a clean
    close before the client's end-of-file, within C{window} seconds of the
    connect.  A service that only reads may close once the client has sent
    everything; past the window the backend served a while.

    @param clean: the backend closed (rather than reset) the connection.
    @param clientDone: the client had sent its end-of-file.
    @param elapsed: seconds since the connect.
    """
    if elapsed >= window:
        return False
    return not (clean and clientDone)


class PassiveHealth:
    """
    Counts the proxy's failed connections against their backends and takes
    out those that fail too often.

    @param ejectAfter: failures in a row that take a backend out; 0 never.
    @param ejectFor: seconds a backend stays out before it is tried again.
    @param earlyCloseWindow: see L{blames}; 0 counts failed connects only.
    @ivar ejectionsSkipped: backends kept in, in total, that failed enough
        to be taken out, because too many were out already.
    @ivar ejections: backends taken out, in total; C{readmissions}: tried
        again after C{ejectFor}.
    """

    ejections = 0
    readmissions = 0

    def __init__(
        self,
        pool: Pool,
        clock,
        ejectAfter: int = DEFAULT_EJECT_AFTER,
        ejectFor: float = DEFAULT_EJECT_FOR,
        earlyCloseWindow: float = DEFAULT_EARLY_CLOSE_WINDOW,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.ejectAfter = ejectAfter
        self.ejectFor = ejectFor
        self.earlyCloseWindow = earlyCloseWindow
        self.ejectionsSkipped = 0
        self._readmissions: Dict[str, object] = {}
        self._skipped = Summary(clock, self._reportSkipped)

    def served(self, name: str) -> None:
        """
        The backend proved itself on a connection: its failures in a row
        are over.
        """
        self.pool.backendServed(name)

    def endedEarly(
        self, name: str, clean: bool, clientDone: bool, madeAt: float, why: Optional[str] = None
    ) -> None:
        """
        The backend ended a connection made at C{madeAt} before sending
        anything, while its client was still there (see L{blames}).

        @param why: what it said, when it said something (a TLS alert).
        """
        if not blames(clean, clientDone, self.clock.seconds() - madeAt, self.earlyCloseWindow):
            self.pool.backendServed(name)
            return
        failures = self.pool.backendFailed(name)
        log.warn(
            "proxy: backend {backend} {how} a connection before sending anything "
            "({failures} in a row){why}",
            backend=name,
            how="closed" if clean else "reset",
            failures=failures,
            why=f": {why}" if why else "",
        )
        self.failed(name, failures)

    def failed(self, name: str, failures: int) -> None:
        """
        C{failures} connections in a row to C{name} failed (connects, and
        connections it ended before sending anything): take it out for a
        while once there are too many.
        """
        if not self.ejectAfter or failures < self.ejectAfter:
            return
        pool = self.pool
        if name in self._readmissions or name not in pool:
            return
        if not pool.eject(name):
            self.ejectionsSkipped += 1
            self._skipped.count(name)
            return
        self.ejections += 1
        log.warn(
            "proxy: backend {backend}: {failures} connects in a row failed; "
            "taken out for {seconds} s",
            backend=name,
            failures=failures,
            seconds=self.ejectFor,
        )
        self._readmissions[name] = self.clock.callLater(self.ejectFor, self._readmit, name)

    def _readmit(self, name: str) -> None:
        del self._readmissions[name]
        if name in self.pool:
            self.readmissions += 1
            self.pool.readmit(name)
            log.info("proxy: backend {backend} is tried again", backend=name)

    def _reportSkipped(self, counts: Dict[str, int], seconds: float) -> None:
        pool = self.pool
        log.warn(
            "proxy: backend(s) {backends} failed enough to be taken out but "
            "kept in, {count} time(s) {window}: {ejected} of {inService} "
            "backends in service are out already, the most "
            "--max-ejected-percent {percent} allows (a client that makes "
            "backends fail must not take them all out)",
            backends=", ".join(sorted(counts)),
            count=sum(counts.values()),
            window=window(seconds),
            ejected=pool.ejected,
            inService=pool.inService,
            percent=pool.maxEjectedPercent,
        )

    def stopSummary(self) -> None:
        """
        Tell the summed line pending now (see L{Summary.stop}).
        """
        self._skipped.stop()

    def stop(self) -> None:
        """
        Cancel the timers: nothing is readmitted any more.
        """
        self._skipped.stop()
        for call in list(self._readmissions.values()):
            if call.active():
                call.cancel()
        self._readmissions.clear()
