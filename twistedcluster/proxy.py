"""
Proxy mode: relay each client connection to a backend the cluster picks.

The pattern of Twisted's C{portforward}, with what it lacks: endpoints with a
connect timeout, a retry on another backend when a connect fails, half-close
passed through both ways, and accounting of every connection in the pool.

Memory stays bounded: the client is paused until its backend is connected,
then each transport is registered as the other's streaming producer, so a
fast sender is paused as soon as the slow side's write buffer fills.
"""

from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

from twisted.internet import defer, endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twistedcluster.cluster import Cluster

log = Logger()

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_ATTEMPTS = 3


def backendEndpoint(
    reactor, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """
    A client endpoint for a backend's advertised address: a literal IPv4 or
    IPv6 address is connected to directly, a name through HostnameEndpoint.
    """
    if isIPAddress(host):
        return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IHalfCloseableProtocol)
class _Relay(Protocol):
    """
    One side of a relayed connection: what it reads, its peer writes.

    Half-close: end-of-file read here becomes a write shutdown on the peer;
    this side's transport closes once both its directions are done.
    """

    peer: Optional["_Relay"] = None
    _readDone = False
    _writeDone = False

    def link(self, peer: "_Relay") -> None:
        """
        Relay between this side and C{peer}, each pausing the other when its
        write buffer is full.
        """
        self.peer = peer
        peer.peer = self
        self.transport.registerProducer(peer.transport, True)
        peer.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)

    def readConnectionLost(self) -> None:
        self._readDone = True
        if self.peer is not None:
            self.peer.transport.loseWriteConnection()
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self._writeDone = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self._readDone and self._writeDone:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            # What was already written to the peer is flushed, then it closes.
            peer.transport.loseConnection()


class _BackendSide(_Relay):
    """
    The balancer's connection to a backend; releases its pool slot on close.
    """

    pool = None
    backendName: Optional[str] = None

    def connectionLost(self, reason) -> None:
        if self.pool is not None and self.backendName is not None:
            self.pool.release(self.backendName)
            self.backendName = None
        super().connectionLost(reason)


class ProxyServer(_Relay):
    """
    The client's connection to the proxy listener.
    """

    factory: "ProxyFactory"
    _connecting: Optional[defer.Deferred] = None
    _gone = False

    def connectionMade(self) -> None:
        self.factory.clients.add(self)
        # Read nothing until there is somewhere to send it.
        self.transport.pauseProducing()
        self._tried: Set[str] = set()
        self._tryNext()

    def _tryNext(self) -> None:
        factory = self.factory
        if len(self._tried) >= factory.maxAttempts:
            return self._giveUp("every attempt failed")
        chosen = factory.cluster.pick(exclude=self._tried)
        if chosen is None:
            if self._tried:
                return self._giveUp("no other backend to try")
            return self._giveUp("no backend available")
        self._tried.add(chosen.name)
        d = self._connecting = factory.connectTo(chosen.name, chosen.host, chosen.port)
        d.addCallbacks(
            self._connected,
            self._connectFailed,
            callbackArgs=(chosen.name,),
            errbackArgs=(chosen.name, chosen.host, chosen.port),
        )

    def _connected(self, backend: _BackendSide, name: str) -> None:
        self._connecting = None
        pool = self.factory.cluster.pool
        pool.connected(name)
        backend.pool = pool
        backend.backendName = name
        if self._gone:
            backend.transport.loseConnection()
            return
        self.link(backend)
        self.transport.resumeProducing()

    def _connectFailed(self, reason, name: str, host: str, port: int) -> None:
        self._connecting = None
        pool = self.factory.cluster.pool
        if self._gone:
            pool.connectFailed(name, countFailure=False)
            return
        failures = pool.connectFailed(name)
        log.warn(
            "proxy: connect to backend {backend} at {host}:{port} failed "
            "({failures} in a row): {error}; trying another",
            backend=name,
            host=host,
            port=port,
            failures=failures,
            error=reason.getErrorMessage(),
        )
        self._tryNext()

    def _giveUp(self, why: str) -> None:
        peer = self.transport.getPeer()
        log.warn(
            "proxy: closing client {client}: {why}",
            client=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
            why=why,
        )
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._gone = True
        self.factory.clients.discard(self)
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        super().connectionLost(reason)


class ProxyFactory(Factory):
    """
    Builds a L{ProxyServer} for each client connection.

    @param maxAttempts: backends tried for one client before giving up.
    @ivar clients: the client connections open now.
    """

    noisy = False

    protocol = ProxyServer

    def __init__(
        self,
        cluster: Cluster,
        reactor,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        maxAttempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.maxAttempts = max(1, maxAttempts)
        self._backendFactory = Factory.forProtocol(_BackendSide)
        self._backendFactory.noisy = False
        self._endpoints: Dict[Tuple[str, int], IStreamClientEndpoint] = {}
        self.clients: Set[ProxyServer] = set()

    def connectTo(self, name: str, host: str, port: int) -> defer.Deferred:
        """
        Connect to a backend; fires with its L{_BackendSide}.
        """
        key = (host, port)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) > 4096:
                self._endpoints.clear()
            ep = self._endpoints[key] = backendEndpoint(
                self.reactor, host, port, self.connectTimeout
            )
        return ep.connect(self._backendFactory)
