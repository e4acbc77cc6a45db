"""
Backend services that fail after accepting, for ``twistd cluster-backend
--service tests.faulty.NAME``: they register and report like a healthy
backend, but their service port cuts every connection.
"""

from twisted.internet.protocol import Factory, Protocol


class ResetOnAccept(Protocol):
    """
    Accept, then reset at once: a crashed worker behind a live listener.
    """

    def connectionMade(self):
        self.transport.abortConnection()


class ResetOnData(Protocol):
    """
    Accept, then reset on the first request bytes.
    """

    def dataReceived(self, data):
        self.transport.abortConnection()


def resetOnAccept():
    return Factory.forProtocol(ResetOnAccept)


def resetOnData():
    return Factory.forProtocol(ResetOnData)
