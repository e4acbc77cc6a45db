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
from twisted.internet.error import ConnectBindError, ConnectError, ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedcluster.address import backendText, errorText
from twistedcluster.balancer import accesslog as ends
from twistedcluster.balancer.admission import DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT, WaitQueue
from twistedcluster.core.cluster import Cluster, Route
from twistedcluster.balancer.dialer import ReactorDialer, dialerFor
from twistedcluster.balancer.handshake import AwaitsHandshake, overTLS
from twistedcluster.fast.fasttcp import (
    loseWriteConnectionNow,
    plainTCP,
    readNow,
    sendNow,
    shareServerNames,
)
from twistedcluster.balancer.passivehealth import (
    DEFAULT_EARLY_CLOSE_WINDOW,
    DEFAULT_EJECT_AFTER,
    DEFAULT_EJECT_FOR,
    PassiveHealth,
)
from twistedcluster.core.pool import DEFAULT_MAX_EJECTED_PERCENT
from twistedcluster.balancer.relay import Relay
from twistedcluster.balancer.traffic import Traffic
from twistedcluster.summary import Summary, window
from twistedcluster.fast.transports import endWrites, peerText, readWaiting, showProxied
from twistedcluster.wire.proxyheader import BadProxyHeader, HeaderReader, header, rawHeader

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_EARLY_CLOSE_WINDOW",
    "DEFAULT_EJECT_AFTER",
    "DEFAULT_EJECT_FOR",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_QUEUE_TIMEOUT",
    "EARLY_DATA_LIMIT",
    "HANDSHAKE_TIMEOUT",
    "PROXY_HEADER_TIMEOUT",
    "ProxyFactory",
    "ProxyServer",
]

log = Logger()

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_ATTEMPTS = 3
#: Seconds a client of a listener that expects a PROXY header has to send
#: it (the spec: at least 3, to cover a TCP retransmit).
PROXY_HEADER_TIMEOUT = 5.0
#: Seconds a TLS client (C{ssl:} listener) has to finish its handshake
#: before it is closed (nginx's C{ssl_handshake_timeout} is 60): until
#: then it has no backend, but it holds a client connection.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds between the lines that tell how a drain goes.
DRAIN_PROGRESS_INTERVAL = 10.0


def tlsAlertText(error: BaseException) -> Optional[str]:
    """
    What a TLS error says, in OpenSSL's words (C{"tlsv13 alert certificate
    required"}), or C{None} for an error that is not TLS's.  Under TLS 1.3
    a backend that refuses the balancer's certificate (or its lack of one)
    says so only after the balancer's handshake is over: as an alert that
    ends the connection, which would otherwise read as a bare reset.
    """
    if not type(error).__module__.startswith("OpenSSL"):
        return None  # the common case, at no import's cost
    from OpenSSL import SSL

    if not isinstance(error, SSL.Error):
        return None
    # pyOpenSSL's args: [(library, function, reason), ...]
    queue = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry]
    return "TLS: " + ("; ".join(reasons) if reasons else str(error))


class _BackendSide(Relay):
    """
    The balancer's connection to a backend; releases its pool slot once the
    backend has closed its side, or on close.

    Until the backend sends its first byte, it is on probation
    (L{watchEarlyClose}): a backend that accepts and then closes or resets
    at once looks idle to least-load, so without this it would keep taking
    clients and failing them.

    @ivar attempt: the connect that made it, told when it is made.
    """

    pool = None
    backendName: Optional[str] = None
    ticket = 0
    #: Whether its backend is static (reports nothing).
    static = False
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

    def _endedEarly(self, clean: bool, why: Optional[str] = None) -> None:
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
            health.endedEarly(name, clean, client._readDone, self._madeAt, why)

    def readConnectionLost(self) -> None:
        client = self.peer
        if client is not None and client._end is None:
            client._end = ends.BACKEND_CLOSED
        if self._probation is not None:
            self._endedEarly(clean=True)
        # The backend has closed its side: the connection no longer counts
        # as this balancer's on it (its own reports count it while it
        # keeps it open to read).  A backend killed while its clients were
        # silent would otherwise stay full after its restart, for as long
        # as those clients kept their half of the relay open.  A static
        # backend reports nothing: what this balancer relays is all that
        # counts there, to the end.
        if not self.static:
            self._release()
        Relay.readConnectionLost(self)

    def _release(self) -> None:
        if self.pool is not None and self.backendName is not None:
            self.pool.release(self.backendName, self.ticket)
            self.pool = None

    def connectionLost(self, reason) -> None:
        client = self.peer
        if client is not None and client._end is None:
            client._end = (
                ends.BACKEND_CLOSED
                if isinstance(reason.value, ConnectionDone)
                else ends.BACKEND_RESET
            )
        if self._probation is not None:
            self._endedEarly(
                clean=isinstance(reason.value, ConnectionDone), why=tlsAlertText(reason.value)
            )
        self._release()
        super().connectionLost(reason)


@implementer(IHandshakeListener)
class _TLSBackendSide(_BackendSide):
    """
    A connection to a backend over TLS (C{--backend-tls}): connected once
    the handshake has verified the backend's certificate and name; a
    handshake that fails (or takes longer than the connect timeout) is a
    failed connect, with the reason.

    A PROXY header, if any, goes first in clear, before the handshake, as
    HAProxy sends it and nginx reads it (C{listen ... ssl proxy_protocol}).
    """

    _handshakeCall = None
    _shaken = False
    _failure: Optional[Failure] = None

    def connectionMade(self) -> None:
        attempt = self.attempt
        client = attempt.client if attempt is not None else None
        if client is None:  # the client left meanwhile
            self.transport.loseConnection()
            return
        factory = client.factory
        # Connected, not yet verified: a client that leaves now abandons
        # this connection, not the connect.
        attempt._abandon = self.transport.abortConnection
        first = client.proxyHeader(attempt.name)
        # What the relay writes goes at once (as prepare() does on plain
        # TCP): Nagle's delay against the backend's delayed ACK would stall
        # each TLS record of a request/response exchange by 40 ms.
        self.transport.setTcpNoDelay(True)
        if first is not None:
            self.transport.write(first)
        self.transport.startTLS(factory.backendTLS.optionsFor(attempt.host))
        self._handshakeCall = factory.reactor.callLater(
            factory.connectTimeout, self._handshakeLate, factory.connectTimeout
        )

    def _handshakeLate(self, timeout: float) -> None:
        self._handshakeCall = None
        self._failure = Failure(ConnectError(string=f"TLS handshake took over {timeout} s"))
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        tls = getattr(self.transport, "protocol", None)
        if getattr(tls, "disconnecting", False):
            # Twisted before 25 tells of a completed handshake even when the
            # certificate's name check has just failed it (and aborted the
            # connection): its connectionLost, with that reason, follows.
            return
        self._shaken = True
        call, self._handshakeCall = self._handshakeCall, None
        if call is not None and call.active():
            call.cancel()
        _BackendSide.connectionMade(self)

    def connectionLost(self, reason) -> None:
        if self._shaken:
            return _BackendSide.connectionLost(self, reason)
        call, self._handshakeCall = self._handshakeCall, None
        if call is not None and call.active():
            call.cancel()
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            failure = self._failure or Failure(
                ConnectError(string=f"TLS handshake failed: {reason.getErrorMessage()}")
            )
            attempt.failed(failure)
        return None


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
        #: The backend's status when it was chosen.
        self.status = chosen.backend

    def start(self) -> None:
        """
        Connect.  A connect that completes at once (a backend on this host)
        tells the client before this returns; so the client records this
        attempt before starting it.
        """
        tls = self.client.factory.backendTLS is not None
        backend = _TLSBackendSide() if tls else _BackendSide()
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


class ProxyServer(AwaitsHandshake, Relay):
    """
    The client's connection to the proxy listener.

    Until its backend is connected, what the client sends is held here (up
    to L{EARLY_DATA_LIMIT}, then the client is paused), and so is its
    end-of-file: cheaper than pausing every client while connecting.

    For the metrics and the access log it keeps when it started, when its
    backend accepted, and how it ended (C{_end}, one of
    L{twistedcluster.balancer.accesslog.ENDS}: the first side to end its
    input, or the balancer's reason for closing it).
    """

    factory: "ProxyFactory"
    _attempt: Optional[_Attempt] = None
    _tried: Tuple[str, ...] = ()
    #: When it is refused if it still waits for room (set when it first
    #: waits).
    _waitUntil: Optional[float] = None
    _early: Optional[list] = None
    _earlyBytes = 0
    _pausedEarly = False
    _idleCall = None
    _gone = False
    _start = 0.0
    _connectAt: Optional[float] = None
    _backend: Optional[_BackendSide] = None
    _end: Optional[str] = None
    #: While a PROXY header is awaited: its reader, and the deadline.
    _header: Optional[HeaderReader] = None
    _headerCall = None
    #: The address the client connected from, as accept() gave it (set by
    #: the factory); and whether a PROXY header named another one.
    clientAddress = None
    _proxied: Optional[Tuple[object, object]] = None
    #: What every accepted plain TCP connection's logPrefix() and repr()
    #: answer (shareServerNames: two strings fewer per held connection).
    _SERVER_NAMES = ("ProxyServer,server", "<ProxyServer: a client of the proxy listener>")

    def connectionMade(self) -> None:
        factory = self.factory
        self._start = factory.reactor.seconds()
        plain = plainTCP(self.transport)
        if plain:
            shareServerNames(self.transport, *self._SERVER_NAMES)
        factory.clients.add(self)
        if factory.limit is not None:
            factory.limit.opened()
        if factory.proxyParsers is not None:
            self._awaitHeader()
            return
        if overTLS(self.transport):
            # TLS to the client (ssl:): no backend until its handshake is
            # done (handshakeDone), so a client that opens TCP and never
            # handshakes costs no backend connection, nor load.
            timeout = factory.handshakeTimeout
            if factory.idleTimeout is not None:
                timeout = min(timeout, factory.idleTimeout)
            self.awaitHandshake(factory.reactor, timeout)
            return
        self.route()
        if not self._gone and plain:
            # Most clients send first, and at once: by now their first bytes
            # are here, so read them in this turn (to the backend, when it is
            # connected already, or held until it is) rather than on the
            # reactor's next, one wake-up and dispatch per connection fewer.
            data = readNow(self.transport)
            if data is not None:
                self.dataReceived(data)

    def handshakeDone(self) -> None:
        """
        The client's TLS handshake is done: find it a backend now.  (With a
        PROXY header to read as well, the header, which comes inside TLS,
        decides when instead.)
        """
        if not self._gone:
            self.route()

    def handshakeTimedOut(self, timeout: float) -> None:
        factory = self.factory
        factory._closed.count(
            "no TLS handshake in time",
            example=(peerText(self.transport), f"no TLS handshake within {timeout:g} s"),
        )

    def _awaitHeader(self) -> None:
        """
        The listener expects a PROXY header: no backend until it is read.
        Its bytes are caught by a C{dataReceived} set on this instance and
        removed once the header is read, so the relay pays nothing.
        """
        factory = self.factory
        self._header = HeaderReader(factory.proxyParsers)
        self.dataReceived = self._headerData  # type: ignore[method-assign]
        self._headerCall = factory.reactor.callLater(
            factory.proxyHeaderTimeout, self._badHeader, "no PROXY header in time",
            f"no PROXY header within {factory.proxyHeaderTimeout} s",
        )

    def _headerData(self, data: bytes) -> None:
        reader = self._header
        try:
            result = reader.feed(data)
        except BadProxyHeader as e:
            self._badHeader("bad PROXY header", f"bad PROXY header: {e}")
            return
        if result is None:
            return
        self._stopAwaiting()
        proxied, rest = result
        if proxied.source is not None:
            showProxied(self.transport, proxied.source, proxied.destination)
            self._proxied = (proxied.source, proxied.destination)
        if rest:
            # Held as early data before routing: a backend connected at once
            # takes it first, ahead of anything still waiting in the socket
            # (which _connected reads with the header it sends).
            self.dataReceived(rest)
        self.route()

    def _stopAwaiting(self) -> None:
        self._header = None
        self.__dict__.pop("dataReceived", None)
        call, self._headerCall = self._headerCall, None
        if call is not None and call.active():
            call.cancel()

    def _badHeader(self, why: str, detail: str) -> None:
        self._headerCall = None
        self._stopAwaiting()
        self.refuse(why, detail, end=ends.BAD_HEADER)

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            if self._early is None:
                self._early = []
            self._early.append(data)
            self.received += len(data)
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
            return self.refuse("every attempt failed", end=ends.CONNECT_FAILED)
        cluster = factory.cluster
        if cluster.keyed:  # hash: the client's address, only then
            key = getattr(self.transport.getPeer(), "host", None)
            chosen = cluster.pick(exclude=self._tried, key=key)
        else:
            chosen = cluster.pick(exclude=self._tried)
        if chosen is None:
            # Wait when every backend is full (one not tried among them, as
            # room on a backend tried does not wake it), or (in a worker)
            # when those not tried are full only within this worker's
            # share, as one process would route it there.  Woken and
            # queued again, it keeps its deadline.
            tried = self._tried
            full = cluster.noRoomOnly() and (not tried or cluster.noRoomOnly(tried))
            if full or (tried and cluster.roomElsewhere(tried)):
                forShare = (lambda: cluster.roomElsewhere(tried)) if tried else cluster.roomElsewhere
                self._waitUntil = factory.admission.enqueue(
                    self, self.route, self.refuse, forShare, tried, self._waitUntil
                )
                return
            if tried:
                return self.refuse("no other backend to try", end=ends.CONNECT_FAILED)
            return self.refuse("no backend available", end=ends.NO_BACKEND)
        self._tried += (chosen.name,)
        attempt = self._attempt = _Attempt(self, chosen)
        attempt.start()

    def _connected(self, backend: _BackendSide, attempt: _Attempt) -> None:
        self._attempt = None
        factory = self.factory
        self._connectAt = factory.reactor.seconds()
        self._backend = backend
        pool = factory.cluster.pool
        # Connected is not yet served when the backend must prove itself
        # first (the early-close window).
        pool.connected(attempt.name, attempt.ticket, served=not factory.earlyCloseWindow)
        backend.pool = pool
        backend.backendName = attempt.name
        backend.ticket = attempt.ticket
        if attempt.status.static:
            backend.static = True
        if factory.earlyCloseWindow:
            backend.watchEarlyClose(factory.health)
        self.link(backend)
        if not self._plain:
            # TLS (or unix) to the client: link() readied only plain TCP;
            # without this Nagle holds each record's tail for the client's
            # delayed ACK.
            noDelay = getattr(self.transport, "setTcpNoDelay", None)
            if noDelay is not None:
                try:
                    noDelay(True)
                except OSError:  # not a TCP socket after all
                    pass
        early, self._early = self._early, None
        version = factory.sendProxy
        if factory.sendProxyFor:
            version = factory.sendProxyFor.get(attempt.name, version)
        if version is not None and factory.backendTLS is None:
            # The header goes first, at once, with whatever the client sent
            # meanwhile: the backend may have to speak first.  (Over TLS it
            # went before the handshake.)  What the client has sent and the
            # reactor not read yet goes with it: one send, one segment.
            first = self.proxyHeader(attempt.name)
            if not early and self._plain and not self._readDone:
                waiting = readWaiting(self.transport)
                if waiting:
                    # Read here, not by dataReceived: counted here.
                    self.received += len(waiting)
                    early = [waiting]
            early = [first, *early] if early else [first]
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
                endWrites(backend.transport)
        if factory.idleTimeout is not None:
            self.seconds = backend.seconds = factory.reactor.seconds
            self.lastActivity = backend.lastActivity = self.seconds()
            self._idleCall = factory.reactor.callLater(factory.idleTimeout, self._checkIdle)

    def proxyHeader(self, backend: str) -> Optional[bytes]:
        """
        The PROXY header that names this client to C{backend} (by name:
        C{--send-proxy}, or that backend's own setting), or C{None} when
        none is sent.
        """
        factory = self.factory
        version = factory.sendProxy
        if factory.sendProxyFor:
            version = factory.sendProxyFor.get(backend, version)
        if version is None:
            return None
        transport = self.transport
        proxied = self._proxied
        if proxied:
            # What the header received named (checked IP addresses).
            source, destination = proxied
            return rawHeader(version, source.host, source.port, destination.host, destination.port)
        client = self.clientAddress
        if self._plain and client is not None:
            # The common case, built from what accept() gave and one
            # getsockname(), with no address objects: the header must cost
            # next to nothing per connection (bench/proxycost.py).
            here = transport.getHandle().getsockname()
            return rawHeader(version, client.host, client.port, here[0], here[1])
        return header(version, transport.getPeer(), transport.getHost())

    def readConnectionLost(self) -> None:
        if self._header is not None:
            # Refused (and logged) for its header, as garbage or a late one
            # is: the access log says so, not client_closed.
            self._badHeader("bad PROXY header", "bad PROXY header: end of input before it")
            return
        if self._end is None:
            self._end = ends.CLIENT_CLOSED
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
        self._end = ends.IDLE_TIMEOUT
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
            factory._noSocket.count(
                "no socket", example=(name, attempt.host, attempt.port, errorText(reason))
            )
        else:
            # The first told at once, the rest summed once a second, a line
            # a backend: one that cannot be taken out (--max-ejected-percent)
            # fails every client sent to it.
            factory._connectFailures[name] = (
                attempt.host, attempt.port, failures, errorText(reason)
            )
            factory._failedConnects.count(name)
            factory.health.failed(name, failures)
        self.route()

    def refuse(self, why: str, detail: Optional[str] = None, end: Optional[str] = None) -> None:
        """
        Close this client: it gets no backend (the reason is logged, summed
        once a second by C{why}; C{detail}, when given, is what the line
        says of this client).

        @param end: how the connection ended, for the metrics and the access
            log; the wait queue's reasons carry theirs (C{why.end}).
        """
        if self._end is None:
            self._end = end or getattr(why, "end", None) or ends.NO_BACKEND
        factory = self.factory
        factory._closed.count(why, example=(peerText(self.transport), detail or why))
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._gone = True
        self._early = None
        if self._end is None:
            self._end = (
                ends.CLIENT_CLOSED
                if isinstance(reason.value, ConnectionDone)
                else ends.CLIENT_RESET
            )
        if self._header is not None:
            self._stopAwaiting()
        if self._handshaking:
            self._stopHandshakeWait()
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
    @param sendProxy: C{"v1"} or C{"v2"}: each backend connection starts with
        a PROXY header of that version naming the client; C{None} for none.
    @param sendProxyFor: the version for some backends, by name, over
        C{sendProxy} (static backends' own setting).
    @param proxyParsers: Twisted's PROXY header parsers
        (L{twistedcluster.fast.internals.proxyParsers}) when the listener's
        clients send a PROXY header first (another proxy in front); C{None}
        when they do not.
    @param proxyHeaderTimeout: seconds such a client has to send it.
    @param handshakeTimeout: seconds a TLS client has to finish its
        handshake (or C{idleTimeout}, when shorter); it gets a backend only
        then.
    @param backendTLS: how to speak TLS to backends
        (L{twistedcluster.balancer.backendtls.BackendTLS}); C{None} for
        plain TCP.
    @ivar clients: the client connections open now.
    @ivar health: the passive health check (L{PassiveHealth}).
    @ivar admission: the clients waiting for room (L{WaitQueue}).
    @ivar limit: the client connection limit (L{limits.ClientLimit}) its
        connections count against, if any.
    @ivar traffic: what became of the clients (L{Traffic}): counts for the
        metrics, and the access log when there is one.
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
        traffic: Optional[Traffic] = None,
        sendProxy: Optional[str] = None,
        sendProxyFor: Optional[Dict[str, str]] = None,
        proxyParsers=None,
        proxyHeaderTimeout: float = PROXY_HEADER_TIMEOUT,
        backendTLS=None,
        handshakeTimeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.handshakeTimeout = handshakeTimeout
        self.traffic = traffic if traffic is not None else Traffic()
        if self.traffic.pool is None:
            self.traffic.pool = cluster.pool
        self.cluster = cluster
        self.backendTLS = backendTLS
        self.sendProxy = sendProxy
        # Shared with the static backends' checks, which change it.
        self.sendProxyFor = sendProxyFor if sendProxyFor is not None else {}
        self.proxyParsers = proxyParsers
        self.proxyHeaderTimeout = proxyHeaderTimeout
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.maxAttempts = max(1, maxAttempts)
        self.maxEjectedPercent = cluster.pool.maxEjectedPercent = maxEjectedPercent
        self.earlyCloseWindow = earlyCloseWindow
        self.idleTimeout = idleTimeout
        if dialer is None:
            # TLS starts on Twisted's own client connections (startTLS).
            dialer = (
                ReactorDialer(reactor, connectTimeout)
                if backendTLS is not None
                else dialerFor(reactor, connectTimeout)
            )
        self.dialer = dialer
        self.health = PassiveHealth(
            cluster.pool, reactor, ejectAfter, ejectFor, earlyCloseWindow
        )
        self.admission = WaitQueue(cluster.pool, reactor, queueSize, queueTimeout)
        self.clients: Set[ProxyServer] = set()
        self._idle: Optional[defer.Deferred] = None
        # What a flood would log once per client, summed once a second.
        self._noSocket = Summary(reactor, self._reportNoSocket)
        self._closed = Summary(reactor, self._reportClosed)
        self._failedConnects = Summary(reactor, self._reportFailedConnects)
        #: Each backend whose connects failed since the last line: its
        #: address, the failures in a row, and the last error.
        self._connectFailures: Dict[str, Tuple[str, int, int, str]] = {}

    def buildProtocol(self, addr):
        limit = self.limit
        if limit is not None and not limit.admits():
            self.traffic.refusedAtLimit("proxy", addr, self.reactor.seconds())
            return None
        p = self.protocol()
        p.factory = self
        p.clientAddress = addr
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
        self.traffic.proxyEnded(client, self.reactor.seconds())
        if not self.clients and self._idle is not None:
            idle, self._idle = self._idle, None
            idle.callback(None)

    def _reportNoSocket(self, counts: Dict[str, int], seconds: float) -> None:
        name, host, port, error = self._noSocket.last
        log.warn(
            "proxy: no socket for a connect to backend {backend}: {error}; "
            "not counted against the backends, trying others ({count} such "
            "{window})",
            backend=backendText(name, host, port),
            name=name,
            host=host,
            port=port,
            error=error,
            count=sum(counts.values()),
            window=window(seconds),
        )

    def _reportFailedConnects(self, counts: Dict[str, int], seconds: float) -> None:
        examples, self._connectFailures = self._connectFailures, {}
        for name, count in counts.items():
            host, port, failures, error = examples.get(name, ("?", 0, 0, "?"))
            log.warn(
                "proxy: connect to backend {backend} failed ({failures} in a row): "
                "{error}; trying another{summed}",
                backend=backendText(name, host, port),
                name=name,
                host=host,
                port=port,
                failures=failures,
                error=error,
                count=count,
                summed=f" ({count} failed connects to it {window(seconds)})" if count > 1 else "",
            )

    def _reportClosed(self, counts: Dict[str, int], seconds: float) -> None:
        client, why = self._closed.last
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
            self._tellSummaries()
            return defer.succeed(None)
        log.info(
            "proxy: stopping: waiting up to {timeout} s for {count} connection(s)",
            timeout=timeout,
            count=len(self.clients),
        )
        self._idle = defer.Deferred()
        self._idle.addTimeout(timeout, self.reactor)
        end = self.reactor.seconds() + timeout
        progress: list = []

        def tell():
            # A long drain (--takeover-drain) is not silent until its end.
            progress[:] = [self.reactor.callLater(DRAIN_PROGRESS_INTERVAL, tell)]
            log.info(
                "proxy: stopping: {count} connection(s) still open, {left:.0f} s "
                "to the drain deadline",
                count=len(self.clients),
                left=max(0.0, end - self.reactor.seconds()),
            )

        progress.append(self.reactor.callLater(DRAIN_PROGRESS_INTERVAL, tell))

        def over(result):
            call = progress.pop()
            if call.active():
                call.cancel()
            return self._tellSummaries(result)

        def deadline(failure):
            failure.trap(defer.TimeoutError)
            self._idle = None
            log.warn(
                "proxy: drain deadline reached: resetting {count} connection(s)",
                count=len(self.clients),
            )
            for client in list(self.clients):
                client._end = ends.DRAINED
                client.transport.abortConnection()

        def drained(result):
            log.info("proxy: drained: no connection left")

        return self._idle.addCallbacks(drained, deadline).addBoth(over)

    def _tellSummaries(self, result=None):
        """
        Tell the summed lines pending now, at once (the drain is over: the
        process exits next).
        """
        for summary in (self._noSocket, self._closed, self._failedConnects):
            summary.stop()
        self.health.stopSummary()
        return result

    def stopFactory(self) -> None:
        # The listener closed: what is pending is told now; the connections
        # still open go on counting until the drain is over (L{drain}).
        self._tellSummaries()
        self.health.stop()
        self.admission.close("the balancer is stopping")
