"""
Redirect mode: tell the client which backend to use, then leave the data
path.

On connect the balancer writes one line, ``HOST PORT\\r\\n``, naming the
backend the policy chose, and closes; with no backend available it writes
``ERROR no-backend\\r\\n``.  Anything the client sends is ignored.
"""

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twistedcluster.address import validHost
from twistedcluster.cluster import Cluster

log = Logger()

NO_BACKEND = b"ERROR no-backend\r\n"


def answerLine(host: str, port: int) -> bytes:
    """
    The redirect answer naming a backend; C{ValueError} for a host that is
    not an IP address or a host name (it could end the line early).
    """
    if not validHost(host):
        raise ValueError(f"{host!r} is not a valid host")
    return f"{host} {port}\r\n".encode("ascii")


class RedirectProtocol(Protocol):
    """
    Answers one client with one line and closes.
    """

    factory: "RedirectFactory"

    def connectionMade(self) -> None:
        cluster = self.factory.cluster
        chosen = cluster.pick()
        line = NO_BACKEND
        if chosen is None:
            log.warn("redirect: no backend available")
        else:
            try:
                line = answerLine(chosen.host, chosen.port)
            except ValueError as e:
                log.warn("redirect: backend {name}: {why}", name=chosen.name, why=e)
            else:
                # Added to the backend (so least-load sees it until the next
                # report) but not a connection this balancer holds.
                cluster.pool.handOff(chosen.name)
        self.transport.write(line)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass


class RedirectFactory(Factory):

    noisy = False
    protocol = RedirectProtocol

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
