"""
A twisted.web site that joins the backend's drain: L{DrainingSite}.

When a backend drains (SIGTERM) it stops accepting and waits for its
connections to finish.  HTTP keep-alive connections never finish by
themselves: the client sends the next request on the same connection.  A
plain L{Site} therefore holds the drain to its deadline, after which the
backend cuts the connections, mid-request for some.

L{DrainingSite} has the C{drain()} the backend calls (see
L{twistedcluster.backend.service}): from then on every response says
C{Connection: close} and its connection closes once it is sent.  Each client
finishes the request it had sent and opens a new connection for the next,
which the balancer sends to a backend that is not draining.  A connection
idle between requests is closed only after C{idleGrace} seconds more of
silence: a busy client's next request, which is likely already on its way,
gets its answer (with C{Connection: close}) rather than a closed socket;
closing idle connections at once made clients in a tight loop (wrk) see
socket errors.  (A client that sends a request on an idle connection at the
very moment it closes still sees that close, as with any HTTP server closing
idle connections.)

    from twistedcluster.backend.web import DrainingSite
    site = DrainingSite(myResource)      # twistd cluster-backend --service mymodule.site
"""

from __future__ import annotations

from typing import Set

from twisted.web import http, server

__all__ = ["DrainingSite"]


class _DrainingChannel(http.HTTPChannel):
    """
    An HTTP/1.x channel whose requests are not kept alive once its site
    drains.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    _idleCall = None

    def connectionLost(self, reason) -> None:
        self.site.channels.discard(self)
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        super().connectionLost(reason)

    def _closeIfIdle(self) -> None:
        self._idleCall = None
        if not self.requests:
            self.loseConnection()

    def checkPersistence(self, request, version) -> bool:
        if self.site.draining:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return super().checkPersistence(request, version)

    def stopKeepAlive(self, idleGrace: float) -> None:
        """
        Close after the response to the current request, which says so if it
        has not started; with no request under way, after C{idleGrace}
        seconds if none has come by then.
        """
        if not self.requests:
            self._idleCall = self.callLater(idleGrace, self._closeIfIdle)
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])


class DrainingSite(server.Site):
    """
    A L{Site} that ends keep-alive when the backend drains.

    HTTP/1.x only (its channels do not negotiate HTTP/2).

    @param idleGrace: seconds a connection idle when the drain starts may
        still bring a request (answered with C{Connection: close}) before it
        is closed.
    @ivar draining: set by L{drain}.
    @ivar channels: the open connections.
    """

    protocol = _DrainingChannel
    draining = False

    def __init__(self, resource, *args, idleGrace: float = 1.0, **kwargs) -> None:
        super().__init__(resource, *args, **kwargs)
        self.idleGrace = idleGrace
        self.channels: Set[_DrainingChannel] = set()

    def drain(self) -> None:
        """
        The backend is draining: answer every request from now on with
        C{Connection: close}, and close connections that stay idle.
        """
        self.draining = True
        for channel in list(self.channels):
            channel.stopKeepAlive(self.idleGrace)
