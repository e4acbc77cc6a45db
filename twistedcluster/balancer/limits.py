"""
Keep file descriptors for the control and admin channels when clients
flood the balancer.

L{ClientLimit} is C{--max-connections}: a count shared by the proxy and
redirect listeners.  At the limit those listeners stop accepting, as
HAProxy's C{maxconn} does: new clients wait in the kernel's listen backlog
(deep, see L{twistedcluster.balancer.listeners}) and are accepted, in order, as
connections close; past the backlog the kernel drops their handshakes and
they retry.  Accepting them only to close them would cost a descriptor, a
system call and a log line each, and fail clients that a moment's wait would
serve.

L{AcceptErrors} sums what Twisted's listening ports log when accepting fails
(out of file descriptors: three lines for the first refused connection and
one for each other) into one line a second with counts.
"""

from __future__ import annotations

import resource
from typing import Dict, List, Optional

from twisted.logger import Logger, globalLogPublisher

from twistedcluster.backend.counting import CountingFactory
from twistedcluster.fast.internals import (
    ACCEPT_FAILED,
    EMFILE_CLOSED,
    EMFILE_END,
    EMFILE_START,
    acceptsPerTurn,
    fastPaths,
    limitAcceptsPerTurn,
    replaceDoRead,
    portLogger,
    setPortLogger,
)
from twistedcluster.summary import Summary, window as _window

log = Logger()

#: Descriptors kept for everything but client connections: at most this
#: many, at most a quarter of the limit.
RESERVE = 1024
#: A proxied client holds two descriptors: its own and its backend's.
DESCRIPTORS_PER_CLIENT = 2


def defaultMaxConnections(nofile: Optional[int] = None) -> int:
    """
    The client connections the open-file limit (C{RLIMIT_NOFILE}'s soft
    limit, unless C{nofile}) leaves room for, keeping
    C{min(limit / 4, 1024)} descriptors for the listeners, the control and
    admin channels, health checks and logs.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
    reserve = min(nofile // 4, RESERVE)
    return max(1, (nofile - reserve) // DESCRIPTORS_PER_CLIENT)


#: Room beyond which no port's turn of accepting can reach the limit (a
#: port accepts 100 a turn at first, 20 more after each full turn).
_FAR = 4096


class _LimitedFactory(CountingFactory):
    """
    Counts a factory's connections in a L{ClientLimit}, for a factory that
    does not tell the limit itself; past the limit, builds no protocol (the
    port closes the connection at once).
    """

    #: Only the count matters here: no note of the service's first write.
    notesWrites = False

    def __init__(self, limit: "ClientLimit", wrappedFactory) -> None:
        super().__init__(wrappedFactory, self._counted)
        self.limit = limit
        self._last = 0

    def _counted(self, count: int, served: bool) -> None:
        last, self._last = self._last, count
        for _ in range(count - last):
            self.limit.opened()
        for _ in range(last - count):
            self.limit.closed()

    def buildProtocol(self, addr):
        if not self.limit.admits():
            return None
        return super().buildProtocol(addr)


class ClientLimit:
    """
    At most C{maxConnections} client connections, proxy and redirect
    together: at the limit their listening ports stop accepting until one
    closes.

    Connections the port had already accepted in the turn that reached the
    limit would be closed at once; so near the limit a port never accepts
    more in one turn than its share of the room left.  (Twisted's port sets
    how many it accepts per turn after each turn, from that turn's count:
    the share is set again after the turn, before the next.)

    A factory that has a C{limit} attribute (the proxy's and the redirect
    listener's) is given this limit and tells it of each connection itself,
    asking L{admits} in C{buildProtocol}, calling L{opened} and L{closed};
    any other is wrapped to be counted.

    @param clock: for the log: at most one line a second.
    """

    def __init__(self, maxConnections: int, clock, interval: float = 1.0) -> None:
        self.maxConnections = maxConnections
        self.clock = clock
        self.count = 0
        self.paused = False
        self._ports: list = []
        self._summary = Summary(clock, self._report, interval)

    def wrap(self, factory):
        """
        C{factory}, its connections counted against this limit: the same
        factory when it tells the limit itself (it has a C{limit}
        attribute), else a counting wrapper around it.
        """
        if hasattr(factory, "limit"):
            factory.limit = self
            return factory
        return _LimitedFactory(self, factory)

    def admits(self) -> bool:
        """
        Whether a connection just accepted may be served: below the limit.
        One that may not is closed at once by the caller, and counted here.
        """
        if self.count < self.maxConnections:
            return True
        self._summary.add(refused=1)
        return False

    def opened(self) -> None:
        """
        A client connection counted against the limit has been made.
        """
        self.count += 1
        if self.count >= self.maxConnections or self.paused or self._ports and self._near():
            self._changed()

    def closed(self) -> None:
        """
        A client connection counted against the limit has ended.
        """
        self.count -= 1
        if self.paused or self._ports and self._near():
            self._changed()

    def listening(self, port) -> None:
        """
        C{port} accepts connections for a factory from L{wrap}: pause it
        while at the limit.
        """
        self._ports.append(port)
        if self.paused:
            port.stopReading()
        self._clamp(port)
        accept = getattr(port, "doRead", None)
        if accept is None:  # not a listening port the reactor reads
            return

        def doRead():
            # After a turn that accepted as many as it might, Twisted raises
            # the port's accepts per turn by 20: within the room again
            # before the next turn, or the clients past the limit that it
            # accepted would be closed at once (waiting clients, reset).
            try:
                return accept()
            finally:
                self._clamp(port)

        replaceDoRead(port, doRead)

    def _changed(self) -> None:
        count = self.count
        if count >= self.maxConnections:
            if not self.paused:
                self.paused = True
                for port in self._ports:
                    port.stopReading()
                self._summary.add(full=1)
        elif self.paused:
            self.paused = False
            for port in self._ports:
                # Not one that has stopped listening (draining).
                if port.connected:
                    port.startReading()
        # Each port is clamped again once its turn's accepting is over
        # (listening): Twisted raises its accepts per turn then.
        self._clampAll()

    def _near(self) -> bool:
        """
        Whether one turn of accepting on every port could pass the limit.
        (Far from it, as nearly always, this costs one subtraction.)
        """
        room = self.maxConnections - self.count
        if room > _FAR:
            return False
        return room <= sum(acceptsPerTurn(port, 1) for port in self._ports)

    def _clampAll(self) -> None:
        for port in self._ports:
            self._clamp(port)

    def _clamp(self, port) -> None:
        # A port accepts up to numberAccepts connections per turn, then
        # builds their protocols: keep that within its share of the room.
        room = max(1, (self.maxConnections - self.count) // max(1, len(self._ports)))
        limitAcceptsPerTurn(port, room)

    def _report(self, counts: Dict[str, int], seconds: float) -> None:
        log.warn(
            "client connection limit {limit} (--max-connections) reached {full} "
            "time(s) {window}: the proxy and redirect listeners stop "
            "accepting while at it, new clients wait in the listen backlog "
            "({refused} closed at once)",
            limit=self.maxConnections,
            full=counts.get("full", 0),
            refused=counts.get("refused", 0),
            window=_window(seconds),
        )

    def stop(self) -> None:
        self._summary.stop()


# What Twisted's tcp.Port logs when accept() fails (the formats and their
# meaning: twistedcluster.fast.internals).  Should a release word them
# otherwise, they pass through unchanged, and the canary says so.
_EMFILE_START = EMFILE_START
_EMFILE_CLOSED = EMFILE_CLOSED
_EMFILE_END = EMFILE_END
_ACCEPT_FAILED = ACCEPT_FAILED


class AcceptErrors:
    """
    One log line a second, with counts, for what listening ports log when
    accept() fails.

    Twisted's port logs through its own logger (L{portLogger}); L{watch}
    gives a port one whose events come here.  (A filter on the global log would have to
    wrap twistd's own observers; copying the port's accept loop to log
    differently would copy Twisted's EMFILE recovery with it.)

    @param observer: where every other event from the port goes.
    """

    def __init__(self, clock, interval: float = 1.0, observer=None) -> None:
        self.observer = globalLogPublisher if observer is None else observer
        self._summary = Summary(clock, self._report, interval)
        self._closing = 0
        self._listeners: List[str] = []
        self._errors: List[str] = []

    def watch(self, port, name: str) -> None:
        """
        Sum C{port}'s accept errors, naming it C{name} (proxy, admin...).
        """
        logger = portLogger(port)
        if logger is not None and fastPaths():
            setPortLogger(port, Logger(namespace=logger.namespace, observer=self.observerFor(name)))

    def observerFor(self, name: str):
        def observe(event) -> None:
            fmt = event.get("log_format")
            if fmt == _EMFILE_CLOSED:
                self._closing += 1
            elif fmt == _EMFILE_END:
                closed, self._closing = self._closing, 0
                # None closed: the accept that the spare descriptor was
                # freed for failed again.
                self._note(name, "EMFILE", **({"closed": closed} if closed else {"failed": 1}))
            elif fmt == _ACCEPT_FAILED:
                self._note(name, str(event.get("acceptError")), failed=1)
            elif fmt != _EMFILE_START:
                self.observer(event)

        return observe

    def _note(self, name: str, error: str, **counts: int) -> None:
        if name not in self._listeners:
            self._listeners.append(name)
        if error not in self._errors:
            self._errors.append(error)
        self._summary.add(**counts)

    def _report(self, counts: Dict[str, int], seconds: float) -> None:
        listeners, self._listeners = self._listeners, []
        errors, self._errors = self._errors, []
        log.warn(
            "accept failed ({errors}) on the {listeners} listener(s) {window}: "
            "{closed} connection(s) closed unaccepted, {failed} accept(s) failed; "
            "out of file descriptors? (raise the open-file limit or lower "
            "--max-connections)",
            errors=", ".join(errors),
            listeners=", ".join(listeners),
            closed=counts.get("closed", 0),
            failed=counts.get("failed", 0),
            window=_window(seconds),
        )

    def stop(self) -> None:
        self._summary.stop()
