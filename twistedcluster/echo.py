"""
The default backend service: echo every byte back.

Half-closeable, so a client that shuts down its sending side still gets the
rest of its echo before the connection closes.
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        # Everything received was written; close once it is flushed.
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
