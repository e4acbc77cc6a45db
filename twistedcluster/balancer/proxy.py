"""
Proxy mode: relay each client connection to a backend the cluster picks.

The pattern of Twisted's C{portforward}, with what it lacks: a connect
timeout, a retry on another backend when a connect fails, half-close passed
through both ways, a reset passed on as a reset, and accounting of every
connection in the pool.

This module ties the rooms together; each job has its own:
  - L{twistedcluster.balancer.relay}: the bytes both ways (and splice);
  - L{twistedcluster.balancer.dialer}: connecting to a backend;
  - L{twistedcluster.balancer.passivehealth}: taking out backends that fail;
  - L{twistedcluster.balancer.admission}: clients waiting while every backend is full;
  - L{twistedcluster.core.cluster}: which backend, and whether there is none or
    only no room.

Memory stays bounded: what a client sends before its backend is connected is
held up to L{EARLY_DATA_LIMIT}, then the client is paused; after that the
relay's producers pause a fast sender.
"""

from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

from twisted.internet import defer
from twisted.internet.error import ConnectBindError, ConnectionDone
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from twistedcluster.balancer.admission import DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT, WaitQueue
from twistedcluster.core.cluster import Cluster, Route
from twistedcluster.balancer.dialer import dialerFor
from twistedcluster.fast.fasttcp import loseWriteConnectionNow, plainTCP, readNow, sendNow
from twistedcluster.balancer.passivehealth import (
    DEFAULT_EARLY_CLOSE_WINDOW,
    DEFAULT_EJECT_AFTER,
    DEFAULT_EJECT_FOR,
    PassiveHealth,
)
from twistedcluster.core.pool import DEFAULT_MAX_EJECTED_PERCENT
from twistedcluster.balancer.relay import Relay
from twistedcluster.summary import Summary, window
from twistedcluster.fast.transports import peerText

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_EARLY_CLOSE_WINDOW",
    "DEFAULT_EJECT_AFTER",
    "DEFAULT_EJECT_FOR",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_QUEUE_TIMEOUT",
    "EARLY_DATA_LIMIT",
    "ProxyFactory",
    "ProxyServer",
]

log = Logger()

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_ATTEMPTS = 3


class _BackendSide(Relay):
    """
    The balancer's connection to a backend; releases its pool slot on close.

    Until the backend sends its first byte, it is on probation
    (L{watchEarlyClose}): a backend that accepts and then closes or resets
    at once looks idle to least-load, so without this it would keep taking
    clients and failing them.

    @ivar attempt: the connect that made it, told when it is made.
    """

    pool = None
    backendName: Optional[str] = None
    ticket = 0
    attempt: Optional["_Attempt"] = None
    #: Set while on probation: the passive health check that counts
    #: failures, and when the connection was made.
    _probation: Optional[PassiveHealth] = None
    _madeAt = 0.0

    def connectionMade(self) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.made(self)

    def watchEarlyClose(self, health: PassiveHealth) -> None:
        """
        Put the connection on probation: if the backend ends it before
        sending anything, C{health} judges whether it is to blame
        (L{PassiveHealth.endedEarly}); a byte from the backend ends the
        probation as served.

        The first byte is caught by a C{dataReceived} set on this instance
        and removed by it: the relay pays nothing per chunk.
        """
        self._probation = health
        self._madeAt = health.clock.seconds()
        self.dataReceived = self._firstData  # type: ignore[method-assign]

    def _firstData(self, data: bytes) -> None:
        del self.dataReceived
        health, self._probation = self._probation, None
        if health is not None and self.backendName is not None:
            health.served(self.backendName)
        self.dataReceived(data)

    def _endedEarly(self, clean: bool) -> None:
        """
        The backend ended the connection while on probation.  When the
        client (or this balancer, on its behalf) ended it first (the peer
        link is gone by then), the backend kept it as long as it was
        wanted: that counts as served, as a byte would.
        """
        health, self._probation = self._probation, None
        self.__dict__.pop("dataReceived", None)
        client, name = self.peer, self.backendName
        if health is None or name is None:
            return
        if client is None:
            health.served(name)
        else:
            health.endedEarly(name, clean, client._readDone, self._madeAt)

    def readConnectionLost(self) -> None:
        if self._probation is not None:
            self._endedEarly(clean=True)
        Relay.readConnectionLost(self)

    def connectionLost(self, reason) -> None:
        if self._probation is not None:
            self._endedEarly(clean=isinstance(reason.value, ConnectionDone))
        if self.pool is not None and self.backendName is not None:
            self.pool.release(self.backendName, self.ticket)
            self.backendName = None
        super().connectionLost(reason)


class _Attempt:
    """
    One connect to one backend for one client: tells the client how it
    went, unless cancelled first.
    """

    _abandon = None

    def __init__(self, client: "ProxyServer", chosen: Route) -> None:
        self.client = client
        self.name = chosen.name
        self.host = chosen.host
        self.port = chosen.port
        #: The connection's ticket in the pool.
        self.ticket = chosen.ticket

    def start(self) -> None:
        """
        Connect.  A connect that completes at once (a backend on this host)
        tells the client before this returns; so the client records this
        attempt before starting it.
        """
        backend = _BackendSide()
        backend.attempt = self
        self._abandon = self.client.factory.dialer.dial(
            self.host, self.port, backend, self.failed
        )

    def made(self, backend: _BackendSide) -> None:
        client, self.client = self.client, None
        if client is not None:
            client._connected(backend, self)
        else:
            backend.transport.loseConnection()

    def failed(self, reason) -> None:
        client, self.client = self.client, None
        if client is not None:
            client._connectFailed(reason, self)

    def cancel(self) -> None:
        """
        The client left: stop connecting, and tell it nothing more.
        """
        self.client = None
        if self._abandon is not None:
            self._abandon()


#: Bytes a client may send before its backend is connected; past this it is
#: paused until then.
EARLY_DATA_LIMIT = 64 * 1024


class ProxyServer(Relay):
    """
    The client's connection to the proxy listener.

    Until its backend is connected, what the client sends is held here (up
    to L{EARLY_DATA_LIMIT}, then the client is paused), and so is its
    end-of-file: cheaper than pausing every client while connecting.
    """

    factory: "ProxyFactory"
    _attempt: Optional[_Attempt] = None
    _tried: Tuple[str, ...] = ()
    _early: Optional[list] = None
    _earlyBytes = 0
    _pausedEarly = False
    _idleCall = None
    _gone = False

    def connectionMade(self) -> None:
        factory = self.factory
        factory.clients.add(self)
        if factory.limit is not None:
            factory.limit.opened()
        self.route()
        if not self._gone and plainTCP(self.transport):
            # Most clients send first, and at once: by now their first bytes
            # are here, so read them in this turn (to the backend, when it is
            # connected already, or held until it is) rather than on the
            # reactor's next, one wake-up and dispatch per connection fewer.
            data = readNow(self.transport)
            if data is not None:
                self.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            if self._early is None:
                self._early = []
            self._early.append(data)
            self._earlyBytes += len(data)
            if self._earlyBytes >= EARLY_DATA_LIMIT and not self._pausedEarly:
                self._pausedEarly = True
                self.transport.pauseProducing()
            return
        Relay.dataReceived(self, data)

    def route(self) -> None:
        """
        Find this client a backend (another than those tried), and connect
        to it; wait for room when every backend is full; else give up.
        """
        factory = self.factory
        if len(self._tried) >= factory.maxAttempts:
            return self.refuse("every attempt failed")
        cluster = factory.cluster
        if cluster.keyed:  # hash: the client's address, only then
            key = getattr(self.transport.getPeer(), "host", None)
            chosen = cluster.pick(exclude=self._tried, key=key)
        else:
            chosen = cluster.pick(exclude=self._tried)
        if chosen is None:
            # Wait only when every backend is full: a client that has ruled
            # some out while others are eligible would otherwise be woken
            # and queued again for ever.
            if factory.cluster.noRoomOnly():
                return factory.admission.enqueue(self, self.route, self.refuse)
            if self._tried:
                return self.refuse("no other backend to try")
            return self.refuse("no backend available")
        self._tried += (chosen.name,)
        attempt = self._attempt = _Attempt(self, chosen)
        attempt.start()

    def _connected(self, backend: _BackendSide, attempt: _Attempt) -> None:
        self._attempt = None
        factory = self.factory
        pool = factory.cluster.pool
        # Connected is not yet served when the backend must prove itself
        # first (the early-close window).
        pool.connected(attempt.name, attempt.ticket, served=not factory.earlyCloseWindow)
        backend.pool = pool
        backend.backendName = attempt.name
        backend.ticket = attempt.ticket
        if factory.earlyCloseWindow:
            backend.watchEarlyClose(factory.health)
        self.link(backend)
        early, self._early = self._early, None
        if early:
            self._earlyBytes = 0
            data = b"".join(early)
            if self._direct:
                sendNow(backend.transport, data)
            else:
                backend.transport.write(data)
        if self._pausedEarly:
            self._pausedEarly = False
            self.transport.resumeProducing()
        if self._readDone:
            if self._direct:
                loseWriteConnectionNow(backend.transport)
            else:
                backend.transport.loseWriteConnection()
        if factory.idleTimeout is not None:
            self.seconds = backend.seconds = factory.reactor.seconds
            self.lastActivity = backend.lastActivity = self.seconds()
            self._idleCall = factory.reactor.callLater(factory.idleTimeout, self._checkIdle)

    def readConnectionLost(self) -> None:
        if self.peer is None:
            # Before the backend is connected, the end-of-file waits with
            # the early data; _connected passes both on.
            self._readDone = True
            return
        Relay.readConnectionLost(self)

    def _checkIdle(self) -> None:
        self._idleCall = None
        peer = self.peer
        if peer is None:
            return
        timeout = self.factory.idleTimeout
        last = max(self.lastActivity, peer.lastActivity)
        remaining = last + timeout - self.seconds()
        if remaining > 0:
            self._idleCall = self.factory.reactor.callLater(remaining, self._checkIdle)
            return
        log.info(
            "proxy: closing idle connection from {client} to backend {backend} "
            "after {timeout} s without data",
            client=peerText(self.transport),
            backend=getattr(peer, "backendName", "?"),
            timeout=timeout,
        )
        # Abort: a peer that stopped reading would hold a graceful close open.
        self.transport.abortConnection()

    def _connectFailed(self, reason, attempt: _Attempt) -> None:
        self._attempt = None
        factory = self.factory
        name = attempt.name
        # No socket here (out of file descriptors, say) is the balancer's
        # trouble, not the backend's: it does not count towards taking the
        # backend out.
        local = reason.check(ConnectBindError) is not None
        failures = factory.cluster.pool.connectFailed(
            name, attempt.ticket, countFailure=not local
        )
        if local:
            # As many as clients come, under a flood: summed.
            factory._lastNoSocket = (name, attempt.host, attempt.port, reason.getErrorMessage())
            factory._noSocket.count("no socket")
        else:
            log.warn(
                "proxy: connect to backend {backend} at {host}:{port} failed "
                "({failures} in a row): {error}; trying another",
                backend=name,
                host=attempt.host,
                port=attempt.port,
                failures=failures,
                error=reason.getErrorMessage(),
            )
            factory.health.failed(name, failures)
        self.route()

    def refuse(self, why: str) -> None:
        """
        Close this client: it gets no backend (the reason is logged, summed
        once a second).
        """
        factory = self.factory
        factory._lastClosed = (peerText(self.transport), why)
        factory._closed.count(why)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._gone = True
        self._early = None
        factory = self.factory
        factory.clientGone(self)
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()
            # Abandoned, not refused: undo the routing without blaming it.
            factory.cluster.pool.connectFailed(
                attempt.name, attempt.ticket, countFailure=False
            )
        super().connectionLost(reason)


class ProxyFactory(Factory):
    """
    Builds a L{ProxyServer} for each client connection, and holds what they
    share: the cluster, the dialer, the passive health check, the wait
    queue, the client limit.

    @param maxAttempts: backends tried for one client before giving up.
    @param ejectAfter: connects in a row that may fail before a backend is
        taken out (the passive health check); 0 never takes one out.
    @param ejectFor: seconds a backend stays out before it is tried again.
    @param maxEjectedPercent: the most of the backends in service that may
        be out at once, in percent (L{twistedcluster.core.pool.allowedEjections});
        100 for no limit.
    @param earlyCloseWindow: seconds after its connect within which a
        backend that closes or resets the connection before sending a byte
        counts as failing, as a failed connect does; 0 counts only failed
        connects.
    @param idleTimeout: seconds without data either way after which a relayed
        connection is closed; C{None} for never.
    @param queueSize: clients that may wait when every backend is at
        capacity; more are refused at once.
    @param queueTimeout: seconds a client may wait in that queue.
    @param dialer: connects to backends (L{twistedcluster.balancer.dialer}); the one
        for the reactor unless given.
    @ivar clients: the client connections open now.
    @ivar health: the passive health check (L{PassiveHealth}).
    @ivar admission: the clients waiting for room (L{WaitQueue}).
    @ivar limit: the client connection limit (L{limits.ClientLimit}) its
        connections count against, if any.
    """

    noisy = False
    protocol = ProxyServer
    limit = None

    def __init__(
        self,
        cluster: Cluster,
        reactor,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        maxAttempts: int = DEFAULT_ATTEMPTS,
        ejectAfter: int = DEFAULT_EJECT_AFTER,
        ejectFor: float = DEFAULT_EJECT_FOR,
        maxEjectedPercent: int = DEFAULT_MAX_EJECTED_PERCENT,
        earlyCloseWindow: float = DEFAULT_EARLY_CLOSE_WINDOW,
        idleTimeout: Optional[float] = None,
        queueSize: int = DEFAULT_QUEUE_SIZE,
        queueTimeout: float = DEFAULT_QUEUE_TIMEOUT,
        dialer=None,
    ) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.maxAttempts = max(1, maxAttempts)
        self.maxEjectedPercent = cluster.pool.maxEjectedPercent = maxEjectedPercent
        self.earlyCloseWindow = earlyCloseWindow
        self.idleTimeout = idleTimeout
        self.dialer = dialer if dialer is not None else dialerFor(reactor, connectTimeout)
        self.health = PassiveHealth(
            cluster.pool, reactor, ejectAfter, ejectFor, earlyCloseWindow
        )
        self.admission = WaitQueue(cluster.pool, reactor, queueSize, queueTimeout)
        self.clients: Set[ProxyServer] = set()
        self._idle: Optional[defer.Deferred] = None
        # What a flood would log once per client, summed once a second.
        self._noSocket = Summary(reactor, self._reportNoSocket)
        self._lastNoSocket: Tuple[str, str, int, str] = ("?", "?", 0, "")
        self._closed = Summary(reactor, self._reportClosed)
        self._lastClosed: Tuple[str, str] = ("?", "")

    def buildProtocol(self, addr):
        limit = self.limit
        if limit is not None and not limit.admits():
            return None
        p = self.protocol()
        p.factory = self
        return p

    @property
    def ejectionsSkipped(self) -> int:
        """
        Backends kept in that failed enough to be taken out (see
        L{PassiveHealth.ejectionsSkipped}).
        """
        return self.health.ejectionsSkipped

    @property
    def waiting(self) -> int:
        """
        Clients waiting for a backend with room.
        """
        return len(self.admission)

    def clientGone(self, client: ProxyServer) -> None:
        """
        C{client}'s connection has ended: it counts no more, waits no more,
        and a drain may be over.
        """
        self.clients.discard(client)
        if self.limit is not None:
            self.limit.closed()
        self.admission.dequeue(client)
        if not self.clients and self._idle is not None:
            idle, self._idle = self._idle, None
            idle.callback(None)

    def _reportNoSocket(self, counts: Dict[str, int], seconds: float) -> None:
        name, host, port, error = self._lastNoSocket
        log.warn(
            "proxy: no socket for a connect to backend {backend} at "
            "{host}:{port}: {error}; not counted against the backends, trying "
            "others ({count} such {window})",
            backend=name,
            host=host,
            port=port,
            error=error,
            count=sum(counts.values()),
            window=window(seconds),
        )

    def _reportClosed(self, counts: Dict[str, int], seconds: float) -> None:
        client, why = self._lastClosed
        log.warn(
            "proxy: closing client {client}: {why}; {count} client(s) closed "
            "{window} ({reasons})",
            client=client,
            why=why,
            count=sum(counts.values()),
            window=window(seconds),
            reasons=", ".join(f"{w}: {n}" for w, n in counts.items()),
        )

    def drain(self, timeout: float) -> defer.Deferred:
        """
        Let the connections open now finish, for at most C{timeout} seconds,
        then reset what is left; fires when none is left.  (The listener is
        stopped separately, so no new one comes.)
        """
        if not self.clients:
            return defer.succeed(None)
        log.info(
            "proxy: stopping: waiting up to {timeout} s for {count} connection(s)",
            timeout=timeout,
            count=len(self.clients),
        )
        self._idle = defer.Deferred()
        self._idle.addTimeout(timeout, self.reactor)

        def deadline(failure):
            failure.trap(defer.TimeoutError)
            self._idle = None
            log.warn(
                "proxy: drain deadline reached: resetting {count} connection(s)",
                count=len(self.clients),
            )
            for client in list(self.clients):
                client.transport.abortConnection()

        def drained(result):
            log.info("proxy: drained: no connection left")

        return self._idle.addCallbacks(drained, deadline)

    def stopFactory(self) -> None:
        for summary in (self._noSocket, self._closed):
            summary.stop()
        self.health.stop()
        self.admission.close("the balancer is stopping")
