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
keeps at most L{MAX_CONNECTIONS} open (more are closed at once, summed in
one log line a second), and refuses a body over L{MAX_BODY} before storing
it (no page here reads one).
"""

from __future__ import annotations

from typing import Dict, Optional

from twisted.logger import Logger
from twisted.web import server

from twistedcluster.summary import Summary, window

__all__ = ["GuardedSite", "IDLE_TIMEOUT", "MAX_BODY", "MAX_CONNECTIONS"]

_log = Logger()

#: Seconds a connection may stay open without a request (Prometheus keeps
#: its connection between scrapes, 15 s apart by default, and opens another
#: when this one has been closed).
IDLE_TIMEOUT = 60.0
#: Connections open at once: scrapers, health checkers and browsers are few.
MAX_CONNECTIONS = 128
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
        server.Request.requestReceived(self, command, path, version)


class GuardedSite(server.Site):
    """
    A C{Site} with an idle timeout, a bound on connections and on request
    bodies (see the module's docstring).

    @param what: the listener's name in log lines (C{"metrics"}).
    @ivar open: the connections open now.
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
    ) -> None:
        server.Site.__init__(self, resource, timeout=timeout, reactor=clock)
        self.what = what
        self.maxConnections = maxConnections
        self.open = 0
        self._refused = Summary(clock, self._tellRefused)

    def log(self, request) -> None:  # type: ignore[override]
        """
        No access log: scrapers come every few seconds.
        """

    def buildProtocol(self, addr):
        if self.open >= self.maxConnections:
            self._refused.count(
                "refused", example=f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}"
            )
            return None
        p = server.Site.buildProtocol(self, addr)
        self.open += 1
        lost = p.connectionLost

        def connectionLost(reason, lost=lost):
            self.open -= 1
            return lost(reason)

        p.connectionLost = connectionLost
        return p

    def _tellRefused(self, counts: Dict[str, int], seconds: float) -> None:
        _log.warn(
            "{what} listener: refusing {peer}: {limit} connections open "
            "({count} refused {window})",
            what=self.what,
            peer=self._refused.last,
            limit=self.maxConnections,
            count=sum(counts.values()),
            window=window(seconds),
        )

    def stopFactory(self) -> None:
        self._refused.stop()
        server.Site.stopFactory(self)
