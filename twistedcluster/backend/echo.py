"""
The default backend service: echo every byte back.

Half-closeable, so a client that shuts down its sending side still gets the
rest of its echo before the connection closes.  Over plain TCP it is
bounded: it stops reading while the echo waits to be sent.

Over plain TCP it writes and closes through L{twistedcluster.fast.fasttcp}: an
echo is sent in the turn it was read, and the close happens when the
client's end of input is read, instead of each waiting a reactor turn with
two epoll changes (what the backend's CPU per connection is mostly made of,
bench/profile_balancer.py --process backend).  Any other transport (TLS)
gets Twisted's C{write} and C{loseConnection}.  That fast path writes past
the counting wrapper's note of a first write, so over plain TCP an echo's
closes give the cost meter no evidence: an echo serves for as long as its
client stays, and its count against capacity is its load
(L{twistedcluster.backend.cost}).
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from twistedcluster.fast.fasttcp import loseConnectionNow, plainTCP, sendNow, skipShutdown


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    _direct = False

    def connectionMade(self) -> None:
        if plainTCP(self.transport):
            self._direct = True
            skipShutdown(self.transport)
            # Read no faster than the client takes its echo: the transport is
            # its own producer, so it stops reading while its write buffer is
            # full (a client that sends and never reads holds a bounded
            # amount here).  Not over TLS: there a close_notify or a TLS
            # error read while paused would leave the transport neither
            # reading nor closing.
            self.transport.registerProducer(self.transport, True)
        else:
            # An echo's tail must not wait for the peer's delayed ACK
            # (Nagle): 40 ms per 64 KiB exchanged over TLS through the
            # balancer, measured with bench/proxycost.py.
            noDelay = getattr(self.transport, "setTcpNoDelay", None)
            if noDelay is not None:
                try:
                    noDelay(True)
                except OSError:
                    pass  # not TCP (a unix socket, on Twisted before 25)

    def dataReceived(self, data: bytes) -> None:
        if self._direct:
            sendNow(self.transport, data)
        else:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        # Everything received was written; close once it is flushed.
        if self._direct:
            loseConnectionNow(self.transport)
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def echoFactory() -> Factory:
    """
    The factory ``--service echo`` names.
    """
    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    return factory
