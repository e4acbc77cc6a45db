"""
Redirect mode: tell the client which backend to use, then leave the data
path.

On connect the balancer writes one line, ``HOST PORT\\r\\n``, naming the
backend the policy chose, and closes; with no backend available it writes
``ERROR no-backend\\r\\n``.  Anything the client sends is ignored.
"""

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twistedcluster.cluster import Cluster

log = Logger()

NO_BACKEND = b"ERROR no-backend\r\n"


def answerLine(host: str, port: int) -> bytes:
    """
    The redirect answer naming a backend.
    """
    return f"{host} {port}\r\n".encode("ascii", "backslashreplace")


class RedirectProtocol(Protocol):
    """
    Answers one client with one line and closes.
    """

    factory: "RedirectFactory"

    def connectionMade(self) -> None:
        cluster = self.factory.cluster
        chosen = cluster.pick()
        if chosen is None:
            log.warn("redirect: no backend available")
            self.transport.write(NO_BACKEND)
        else:
            # Added to the backend (so least-load sees it until the next
            # report) but not a connection this balancer holds.
            cluster.pool.handOff(chosen.name)
            self.transport.write(answerLine(chosen.host, chosen.port))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass


class RedirectFactory(Factory):

    noisy = False
    protocol = RedirectProtocol

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
