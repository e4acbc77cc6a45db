"""
Clients of an C{ssl:} listener are served once their TLS handshake is done.

Until then a client has proved nothing: the proxy listener dials no backend
for it and the redirect listener names none (which would count as load on
it), and a client that has not finished its handshake in time is closed,
with the access log's end C{handshake_timeout}.  The proxy and redirect
listeners' protocols share this; what each does once the handshake is done
is its own (L{AwaitsHandshake.handshakeDone}).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from twistedcluster.balancer import accesslog as ends

__all__ = ["AwaitsHandshake", "overTLS"]


def overTLS(transport) -> bool:
    """
    Whether C{transport} is a TLS connection (an C{ssl:} listener's).
    """
    return isinstance(transport, TLSMemoryBIOProtocol)


@implementer(IHandshakeListener)
class AwaitsHandshake:
    """
    A listener's protocol that waits for a TLS client's handshake before it
    serves it (L{awaitHandshake}); it sets C{_end} when the wait runs out.
    """

    #: The protocol's own (the class it is mixed into).
    transport: Any
    _end: Optional[str]

    #: Set while a TLS client's handshake is awaited, and its deadline.
    _handshaking = False
    _handshakeCall = None

    def awaitHandshake(self, clock, timeout: float) -> None:
        """
        Serve this client (L{handshakeDone}) once its TLS handshake is done;
        close it if that takes over C{timeout} seconds.
        """
        self._handshaking = True
        self._handshakeCall = clock.callLater(timeout, self._handshakeLate, timeout)

    def handshakeCompleted(self) -> None:
        if self._handshaking:
            self._stopHandshakeWait()
            self.handshakeDone()

    def handshakeDone(self) -> None:
        """
        The client's handshake is done: serve it now.
        """
        raise NotImplementedError

    def handshakeTimedOut(self, timeout: float) -> None:
        """
        The client is about to be closed for not finishing its handshake
        within C{timeout} seconds: say so where the listener says such
        things.
        """

    def _stopHandshakeWait(self) -> None:
        self._handshaking = False
        call, self._handshakeCall = self._handshakeCall, None
        if call is not None and call.active():
            call.cancel()

    def _handshakeLate(self, timeout: float) -> None:
        # Aborted: a TLS close would wait for the client's own close_notify.
        self._handshakeCall = None
        self._handshaking = False
        self._end = ends.HANDSHAKE_TIMEOUT
        self.handshakeTimedOut(timeout)
        self.transport.abortConnection()
