"""
The web site of an operator's listener (``--metrics``: ``/metrics``, the
status page, the health checks), bounded against whoever else can reach
it: the same care as the AMP listeners get in L{guardedamp}.

Twisted's own C{Site} keeps a connection for 12 hours without a request,
takes any number of them, and stores any request body (a large one in a
temporary file) before the page is asked.  A scraper needs none of that: a
local peer holding a thousand idle connections took every file descriptor
of the balancer, and with them its control and admin listeners and its
clients.  L{GuardedSite} closes a connection idle for L{IDLE_TIMEOUT},
keeps at most L{MAX_CONNECTIONS} open, and refuses a body over L{MAX_BODY}
before storing it (no page here reads one).  When it is full, a newcomer
takes the place of the connection that has made no request for the
longest, if that is L{IDLE_BEFORE_EVICTION} or more (a peer holding every
place, idle or trickling a request byte by byte, must not keep a scraper
out); else the newcomer is closed at once.  Both are summed in
one log line a second.
"""

from __future__ import annotations

from typing import Dict, Optional

from twisted.logger import Logger
from twisted.web import server

from twistedcluster.address import addressText
from twistedcluster.summary import Summary, tellClosings

__all__ = ["GuardedSite", "IDLE_BEFORE_EVICTION", "IDLE_TIMEOUT", "MAX_BODY", "MAX_CONNECTIONS"]

_log = Logger()

#: Seconds a connection may stay open without a request (Prometheus keeps
#: its connection between scrapes, 15 s apart by default, and opens another
#: when this one has been closed).
IDLE_TIMEOUT = 60.0
#: Connections open at once: scrapers, health checkers and browsers are few.
MAX_CONNECTIONS = 128
#: Seconds a connection must have been idle (nothing received) to be closed for a newcomer when every place is taken: as the
#: admin listener does (L{twistedcluster.balancer.admin.IDLE_BEFORE_EVICTION}).
IDLE_BEFORE_EVICTION = 5.0
#: The largest request body taken (no page reads one).
MAX_BODY = 64 * 1024

_TOO_LARGE = (
    b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 24\r\n\r\n"
    b"request body over 64 KiB"
)


class _BoundedRequest(server.Request):
    """
    A request whose body may be at most L{MAX_BODY} bytes: a larger one,
    declared or sent, is answered 413 and the connection closed, before
    anything more of it is stored.
    """

    _refused = False
    _bodyBytes = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
        server.Request.gotLength(self, None if self._refused else length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._bodyBytes += len(data)
        if self._bodyBytes > MAX_BODY:
            self._refuse()
            return
        server.Request.handleContentChunk(self, data)

    def _refuse(self) -> None:
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.write(_TOO_LARGE)
            transport.loseConnection()  # stops reading at once

    def requestReceived(self, command, path, version) -> None:
        if self._refused:
            return
        site = getattr(self.channel, "site", None)
        if isinstance(site, GuardedSite):
            site._requested(self.channel.transport)
        server.Request.requestReceived(self, command, path, version)


class GuardedSite(server.Site):
    """
    A C{Site} with an idle timeout, a bound on connections and on request
    bodies (see the module's docstring).

    @param what: the listener's name in log lines (C{"metrics"}).
    @param evictAfter: seconds of idleness after which a connection may be
        closed to let a newcomer in when the listener is full.
    """

    noisy = False
    requestFactory = _BoundedRequest

    def __init__(
        self,
        resource,
        clock,
        what: str = "metrics",
        maxConnections: int = MAX_CONNECTIONS,
        timeout: float = IDLE_TIMEOUT,
        evictAfter: float = IDLE_BEFORE_EVICTION,
    ) -> None:
        server.Site.__init__(self, resource, timeout=timeout, reactor=clock)
        self.what = what
        self.clock = clock
        self.maxConnections = maxConnections
        self.evictAfter = evictAfter
        #: The transport of each connection open now, with when it last
        #: made a whole request (or opened).
        self._active: Dict[object, float] = {}
        self._refused = Summary(clock, self._tellRefused)

    @property
    def open(self) -> int:
        """
        The connections open now (one closed to make room no longer counts).
        """
        return len(self._active)

    def log(self, request) -> None:  # type: ignore[override]
        """
        No access log: scrapers come every few seconds.
        """

    def buildProtocol(self, addr):
        peer = addressText(addr)
        if len(self._active) >= self.maxConnections and not self._evictIdlest(peer):
            self._refused.count(
                "refused", example=(peer, f"{self.maxConnections} connections open")
            )
            return None
        p = server.Site.buildProtocol(self, addr)
        made, lost = p.makeConnection, p.connectionLost
        active, now = self._active, self.clock.seconds
        place = []

        def makeConnection(transport, made=made):
            # Made as soon as built, in the same call: counted from here.
            place.append(transport)
            active[transport] = now()
            return made(transport)

        def connectionLost(reason, lost=lost):
            if place:
                active.pop(place[0], None)
            return lost(reason)

        p.makeConnection = makeConnection
        p.connectionLost = connectionLost
        return p

    def _requested(self, transport) -> None:
        """
        A whole request came on C{transport}: it is in use.
        """
        if transport in self._active:
            self._active[transport] = self.clock.seconds()

    def _evictIdlest(self, peer: str) -> bool:
        """
        Close the connection that has gone without a request the longest, if
        that is L{evictAfter} seconds or more, to make room for C{peer};
        whether one was.
        """
        if not self._active:
            return False
        transport, at = min(self._active.items(), key=lambda item: item[1])
        seconds = self.clock.seconds() - at
        if seconds < self.evictAfter:
            return False
        del self._active[transport]
        self._refused.count(
            "evicted",
            example=(
                addressText(transport.getPeer()),
                f"listener full, no request for {seconds:.0f} s, to let {peer} in",
            ),
        )
        transport.abortConnection()
        return True

    def _tellRefused(self, counts: Dict[str, int], seconds: float) -> None:
        tellClosings(_log, self.what, self._refused, counts, seconds)

    def stopFactory(self) -> None:
        self._refused.stop()
        server.Site.stopFactory(self)

