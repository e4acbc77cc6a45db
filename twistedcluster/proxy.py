"""
Proxy mode: relay each client connection to a backend the cluster picks.

The pattern of Twisted's C{portforward}, with what it lacks: a connect
timeout, a retry on another backend when a connect fails, half-close passed
through both ways, a reset passed on as a reset, and accounting of every
connection in the pool.

Memory stays bounded: what a client sends before its backend is connected is
held up to L{EARLY_DATA_LIMIT}, then the client is paused; after that each
transport is the other's streaming producer, so a fast sender is paused as
soon as the slow side's write buffer fills.

Speed, measured with bench/run.py: between plain TCP sockets, backends are
dialled, chunks sent and connections closed by L{twistedcluster.fasttcp},
with fewer system calls and reactor turns than Twisted's generic paths; a
bulk stream moves to splice(2), the kernel relaying it through a pipe
(L{_Splicer}).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections import OrderedDict
from typing import Dict, Optional, Set, Tuple

from twisted.internet import defer, main
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import ConnectBindError, ConnectError, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedcluster.address import tcpEndpoint
from twistedcluster.cluster import Cluster, Route
from twistedcluster.pool import DEFAULT_MAX_EJECTED_PERCENT
from twistedcluster.summary import Summary, window
from twistedcluster.fasttcp import (
    Dialled,
    loseConnectionNow,
    loseWriteConnectionNow,
    plainTCP,
    prepare,
    sendNow,
)
from twistedcluster.transports import peerText, unsentBytes

log = Logger()

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_ATTEMPTS = 3
DEFAULT_EJECT_AFTER = 3
DEFAULT_EJECT_FOR = 10.0
DEFAULT_QUEUE_SIZE = 1000
DEFAULT_QUEUE_TIMEOUT = 5.0
#: Seconds after its connect within which a backend that closes or resets
#: the connection before sending a byte is counted as failing (as long as
#: the connect timeout, by default, to prove itself).
DEFAULT_EARLY_CLOSE_WINDOW = 3.0


#: Zero-copy relaying needs Linux's splice(2).
SPLICE = sys.platform.startswith("linux") and hasattr(os, "splice")
#: A direction switches to splice after this many reads of at least
#: LARGE_READ bytes: bulk streams do, request/response traffic never does
#: (its small reads are cheaper through recv and send than a pipe's two
#: extra descriptors per connection would be).
SPLICE_AFTER = 8
LARGE_READ = 32 * 1024
#: A splice pipe's capacity: the most one direction holds in the kernel
#: while its sink is slow.  Large pipes move a bulk stream in fewer, larger
#: splices (measured: about 15% more bulk throughput at 1 MiB than at the
#: default 64 KiB).  Linux caps it at /proc/sys/fs/pipe-max-size; an
#: unprivileged user past pipe-user-pages-soft gets the default size.
PIPE_SIZE = 1 << 20
_DEFAULT_PIPE_SIZE = 1 << 16
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE else 0


class _Splicer:
    """
    One direction of a relay moved by the kernel: source socket, pipe, sink
    socket (splice(2)), never copied into Python.

    It stands in for the source transport's C{doRead}; when the sink cannot
    take what is in the pipe, the source stops reading (that is the
    back-pressure: at most a pipe's worth, L{PIPE_SIZE}, is held) and the
    sink's C{doWrite} drains the pipe.  End-of-file and a clean close of the sink
    wait until the pipe is empty.
    """

    def __init__(self, source: "_Relay", sink: "_Relay") -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over pipe-max-size, or the user's pipe quota
            self.capacity = _DEFAULT_PIPE_SIZE
        self.source = source
        self.src = source.transport
        self.dst = sink.transport
        self.srcFd = self.src.fileno()
        self.dstFd = self.dst.fileno()
        self.pending = 0
        self.eofWaiting = False
        self.closeWaiting = False
        self.src.doRead = self.doRead
        sink._inbound = self

    def doRead(self):
        if self.pending:
            # Called while the pipe still waits on the sink (someone else
            # resumed the source): wait with it, or the full pipe would make
            # this spin.
            self.src.stopReading()
            return None
        try:
            n = os.splice(self.srcFd, self.w, self.capacity, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if n == 0:
            return main.CONNECTION_DONE
        self.pending += n
        source = self.source
        if source.seconds is not None:
            source.lastActivity = source.seconds()
        self._drain()
        return None

    def _drain(self) -> None:
        while self.pending:
            try:
                m = os.splice(self.r, self.dstFd, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError:
                # The sink is broken; its own side will report it and close
                # everything.  Read no more meanwhile.
                self.src.stopReading()
                return
            if m == 0:
                break
            self.pending -= m
        if self.pending:
            self.src.stopReading()
            self.dst.doWrite = self._sinkWritable
            self.dst.startWriting()

    def _sinkWritable(self):
        self._drain()
        if not self.pending:
            dst = self.dst
            del dst.doWrite  # Twisted's own again
            if dst.disconnecting or dst._writeDisconnecting:
                # A close asked for meanwhile: let Twisted finish it.
                return dst.doWrite()
            dst.stopWriting()
            src = self.src
            if src.connected and not src.disconnecting and not self.eofWaiting:
                src.startReading()
            self._drained()
        return None

    def _drained(self) -> None:
        if self.eofWaiting:
            self.eofWaiting = False
            self.dst.loseWriteConnection()
        if self.closeWaiting:
            # The source closed cleanly while the pipe was full: the relay
            # is over once the sink has it all.
            self.closeWaiting = False
            self.dst.loseConnection()
            self.stop()

    def stop(self) -> None:
        """
        The relay is over: give the descriptors back.
        """
        if self.r >= 0:
            os.close(self.r)
            os.close(self.w)
            self.r = self.w = -1
            self.pending = 0
        self.src.__dict__.pop("doRead", None)
        self.dst.__dict__.pop("doWrite", None)


@implementer(IHalfCloseableProtocol)
class _Relay(Protocol):
    """
    One side of a relayed connection: what it reads, its peer writes.

    Half-close: end-of-file read here becomes a write shutdown on the peer;
    this side's transport closes once both its directions are done.

    @ivar seconds: the clock's C{seconds}, when the connection has an idle
        timeout; then C{lastActivity} records when data last came in here.
    """

    peer: Optional["_Relay"] = None
    seconds = None
    lastActivity = 0.0
    _readDone = False
    _writeDone = False
    #: This side's transport, and the peer's, are plain TCP (fasttcp).
    _plain = False
    _direct = False
    _largeReads = 0
    _splicer: Optional[_Splicer] = None
    _inbound: Optional[_Splicer] = None

    def link(self, peer: "_Relay") -> None:
        """
        Relay between this side and C{peer}, each pausing the other when its
        write buffer is full.
        """
        self.peer = peer
        peer.peer = self
        self.transport.registerProducer(peer.transport, True)
        peer.transport.registerProducer(self.transport, True)
        selfPlain = plainTCP(self.transport)
        peerPlain = plainTCP(peer.transport)
        if selfPlain:
            prepare(self.transport)
        if peerPlain:
            prepare(peer.transport)
        self._plain = peer._direct = selfPlain
        peer._plain = self._direct = peerPlain

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            if self._direct:
                sendNow(peer.transport, data)
                if len(data) >= LARGE_READ:
                    self._bulk(peer)
            else:
                peer.transport.write(data)
            if self.seconds is not None:
                self.lastActivity = self.seconds()

    def _bulk(self, peer: "_Relay") -> None:
        """
        Another large read: after enough of them, move this direction to
        splice, once nothing is queued in Twisted ahead of the pipe.
        """
        self._largeReads += 1
        if (
            SPLICE
            and self._largeReads >= SPLICE_AFTER
            and self._splicer is None
            and peer._direct  # this side is plain TCP too
            and not unsentBytes(peer.transport)
        ):
            try:
                self._splicer = _Splicer(self, peer)
            except OSError as e:  # out of descriptors: recv and send do
                log.info("proxy: no splice for this connection: {error}", error=e)
                self._largeReads = -(10**9)

    def readConnectionLost(self) -> None:
        self._readDone = True
        peer = self.peer
        if peer is not None:
            splicer = self._splicer
            if splicer is not None and splicer.pending:
                splicer.eofWaiting = True
            elif self._direct:
                if peer._readDone:
                    # Both ways are over: close the peer outright (the close
                    # is its end-of-file), one shutdown() fewer.
                    loseConnectionNow(peer.transport)
                else:
                    loseWriteConnectionNow(peer.transport)
            else:
                peer.transport.loseWriteConnection()
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self._writeDone = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self._readDone and self._writeDone:
            if self._plain:
                loseConnectionNow(self.transport)
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        inbound, self._inbound = self._inbound, None
        if inbound is not None:
            # Nothing more can reach this side, whoever feeds it.
            inbound.stop()
        peer, self.peer = self.peer, None
        splicer = self._splicer
        if peer is not None:
            peer.peer = None
            peer._splicer = None
            if isinstance(reason.value, ConnectionDone):
                # A clean end: what was written to the peer is flushed, then
                # it closes (after the pipe, when splicing).
                if splicer is not None and splicer.pending:
                    splicer.closeWaiting = True
                    return
                if self._direct:
                    loseConnectionNow(peer.transport)
                else:
                    peer.transport.loseConnection()
            else:
                # Reset, or lost: pass that on as a reset, so that the peer
                # cannot mistake a cut-off stream for a complete one.
                peer.transport.abortConnection()
        if splicer is not None:
            splicer.stop()
            self._splicer = None


class _BackendSide(_Relay):
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
    #: Set while on probation: the factory that counts failures, and when
    #: the connection was made.
    _probation: Optional["ProxyFactory"] = None
    _madeAt = 0.0

    def connectionMade(self) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.made(self)

    def watchEarlyClose(self, factory: "ProxyFactory") -> None:
        """
        Count it against the backend if, within C{factory.earlyCloseWindow}
        seconds, the backend resets this connection before sending anything,
        or closes it before that and before the client's end-of-file
        (L{_endedEarly}); a byte from the backend clears its failures
        instead.

        The first byte is caught by a C{dataReceived} set on this instance
        and removed by it: the relay pays nothing per chunk.
        """
        self._probation = factory
        self._madeAt = factory.reactor.seconds()
        self.dataReceived = self._firstData  # type: ignore[method-assign]

    def _firstData(self, data: bytes) -> None:
        del self.dataReceived
        factory, self._probation = self._probation, None
        if factory is not None and self.backendName is not None:
            factory.cluster.pool.backendServed(self.backendName)
        self.dataReceived(data)

    def _endedEarly(self, clean: bool) -> None:
        """
        The backend ended the connection while on probation.  It is to blame
        for a reset, and for a clean close that came before the client's
        end-of-file: a service that only reads may close once the client
        has sent everything.  When the client (or this balancer, on its
        behalf) ended the connection first (the peer link is gone by then),
        the backend kept it as long as it was wanted: that ends its failures
        in a row, as a byte would.
        """
        factory, self._probation = self._probation, None
        self.__dict__.pop("dataReceived", None)
        client, name = self.peer, self.backendName
        if factory is None or name is None:
            return
        pool = factory.cluster.pool
        if client is None:
            pool.backendServed(name)
            return
        early = factory.reactor.seconds() - self._madeAt < factory.earlyCloseWindow
        if not early or (clean and client._readDone):
            pool.backendServed(name)
            return
        failures = pool.backendFailed(name)
        log.warn(
            "proxy: backend {backend} {how} a connection before sending anything "
            "({failures} in a row)",
            backend=name,
            how="closed" if clean else "reset",
            failures=failures,
        )
        factory.connectFailures(name, failures)

    def readConnectionLost(self) -> None:
        if self._probation is not None:
            self._endedEarly(clean=True)
        _Relay.readConnectionLost(self)

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

    A literal address is dialled by L{Dialled} on a reactor that polls file
    descriptors (through C{connectTCP} on any other, such as a test's memory
    reactor); a host name through an endpoint, which resolves it.
    """

    _connection: Optional[Dialled] = None
    _connector = None
    _deferred = None

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
        host, port = self.host, self.port
        factory = self.client.factory
        reactor = factory.reactor
        if isIPAddress(host) or isIPv6Address(host):
            backend = _BackendSide()
            backend.attempt = self
            if isinstance(reactor, PosixReactorBase):
                try:
                    self._connection = Dialled(
                        reactor, host, port, backend, factory.connectTimeout, self.failed
                    )
                except OSError as e:
                    # A failed connect, reported on a later turn as
                    # Twisted's connectors do: the backend's address is
                    # unusable (an unknown scope), or there is no socket
                    # here (out of descriptors).
                    if isinstance(e, socket.gaierror):
                        why = ConnectError(string=f"unusable address {host}: {e}")
                    else:
                        why = ConnectBindError(e.errno, e.strerror)
                    reactor.callLater(0, self.failed, Failure(why))
                    return
                self._connection.dial()
            else:
                self._connector = reactor.connectTCP(
                    host, port, _OneProtocol(backend, self.failed),
                    timeout=factory.connectTimeout,
                )
        else:
            self._deferred = factory.endpointFor(host, port).connect(
                Factory.forProtocol(_BackendSide)
            )
            self._deferred.addCallbacks(self.made, self.failed)

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
        if self._connection is not None:
            self._connection.abandon()
        elif self._connector is not None:
            self._connector.stopConnecting()
        elif self._deferred is not None:
            self._deferred.cancel()


class _OneProtocol(ClientFactory):
    """
    The client factory C{connectTCP} needs, for one ready-made protocol.
    """

    noisy = False

    def __init__(self, protocol: Protocol, failed) -> None:
        self.protocol = protocol
        self.failed = failed

    def buildProtocol(self, addr) -> Protocol:
        return self.protocol

    def clientConnectionFailed(self, connector, reason) -> None:
        self.failed(reason)


#: Bytes a client may send before its backend is connected; past this it is
#: paused until then.
EARLY_DATA_LIMIT = 64 * 1024


class ProxyServer(_Relay):
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
        self._tryNext()

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
        _Relay.dataReceived(self, data)

    def _tryNext(self) -> None:
        factory = self.factory
        if len(self._tried) >= factory.maxAttempts:
            return self._giveUp("every attempt failed")
        chosen = factory.cluster.pick(exclude=self._tried)
        if chosen is None:
            # Wait only when every backend is full: a client that has ruled
            # some out while others are eligible would otherwise be woken
            # and queued again for ever.
            if factory.cluster.noRoomOnly():
                return factory.enqueue(self)
            if self._tried:
                return self._giveUp("no other backend to try")
            return self._giveUp("no backend available")
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
            backend.watchEarlyClose(factory)
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
        _Relay.readConnectionLost(self)

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
            factory.connectFailures(name, failures)
        self._tryNext()

    def _giveUp(self, why: str) -> None:
        factory = self.factory
        factory._lastClosed = (peerText(self.transport), why)
        factory._closed.count(why)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._gone = True
        self._early = None
        factory = self.factory
        factory.clients.discard(self)
        if factory.limit is not None:
            factory.limit.closed()
        if not factory.clients and factory._idle is not None:
            idle, factory._idle = factory._idle, None
            idle.callback(None)
        factory.dequeue(self)
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
    Builds a L{ProxyServer} for each client connection.

    @param maxAttempts: backends tried for one client before giving up.
    @param ejectAfter: connects in a row that may fail before a backend is
        taken out (the passive health check); 0 never takes one out.
    @param ejectFor: seconds a backend stays out before it is tried again.
    @param maxEjectedPercent: the most of the backends in service that may
        be out at once, in percent (L{twistedcluster.pool.allowedEjections});
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
    @ivar clients: the client connections open now.
    @ivar ejectionsSkipped: backends kept in, in total, that failed enough
        to be taken out, because too many were out already.
    @ivar limit: the client connection limit (L{limits.ClientLimit}) its
        connections count against, if any.
    """

    noisy = False
    protocol = ProxyServer
    limit = None

    def buildProtocol(self, addr):
        limit = self.limit
        if limit is not None and not limit.admits():
            return None
        p = self.protocol()
        p.factory = self
        return p

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
    ) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.maxAttempts = max(1, maxAttempts)
        self.ejectAfter = ejectAfter
        self.ejectFor = ejectFor
        self.maxEjectedPercent = cluster.pool.maxEjectedPercent = maxEjectedPercent
        self.ejectionsSkipped = 0
        self.earlyCloseWindow = earlyCloseWindow
        self.idleTimeout = idleTimeout
        self.queueSize = queueSize
        self.queueTimeout = queueTimeout
        self._endpoints: Dict[Tuple[str, int], IStreamClientEndpoint] = {}
        self.clients: Set[ProxyServer] = set()
        self._idle: Optional[defer.Deferred] = None
        self._readmissions: Dict[str, object] = {}
        self._queue: "OrderedDict[ProxyServer, object]" = OrderedDict()
        self._wakeScheduled = None
        # What a flood would log once per client, summed once a second.
        self._skipped = Summary(reactor, self._reportSkipped)
        self._noSocket = Summary(reactor, self._reportNoSocket)
        self._lastNoSocket: Tuple[str, str, int, str] = ("?", "?", 0, "")
        self._closed = Summary(reactor, self._reportClosed)
        self._lastClosed: Tuple[str, str] = ("?", "")

    def endpointFor(self, host: str, port: int) -> IStreamClientEndpoint:
        """
        The (cached) endpoint for a backend advertised by host name.
        """
        key = (host, port)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) > 4096:
                self._endpoints.clear()
            ep = self._endpoints[key] = tcpEndpoint(
                self.reactor, host, port, self.connectTimeout
            )
        return ep

    # -- passive health check --------------------------------------------

    def connectFailures(self, name: str, failures: int) -> None:
        """
        C{failures} connections in a row to C{name} failed (connects, and
        connections it ended before sending anything): take it out for a
        while once there are too many.
        """
        if not self.ejectAfter or failures < self.ejectAfter:
            return
        pool = self.cluster.pool
        if name in self._readmissions or name not in pool:
            return
        if not pool.eject(name):
            self.ejectionsSkipped += 1
            self._skipped.count(name)
            return
        log.warn(
            "proxy: backend {backend}: {failures} connects in a row failed; "
            "taken out for {seconds} s",
            backend=name,
            failures=failures,
            seconds=self.ejectFor,
        )
        self._readmissions[name] = self.reactor.callLater(
            self.ejectFor, self._readmit, name
        )

    def _reportSkipped(self, counts: Dict[str, int], seconds: float) -> None:
        pool = self.cluster.pool
        log.warn(
            "proxy: backend(s) {backends} failed enough to be taken out but "
            "kept in, {count} time(s) {window}: {ejected} of {inService} "
            "backends in service are out already, the most "
            "--max-ejected-percent {percent} allows (a client that makes "
            "backends fail must not take them all out)",
            backends=", ".join(sorted(counts)),
            count=sum(counts.values()),
            window=window(seconds),
            ejected=pool.ejected,
            inService=pool.inService,
            percent=self.maxEjectedPercent,
        )

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

    def _readmit(self, name: str) -> None:
        del self._readmissions[name]
        if name in self.cluster.pool:
            self.cluster.pool.readmit(name)
            log.info("proxy: backend {backend} is tried again", backend=name)

    # -- waiting for capacity --------------------------------------------

    @property
    def waiting(self) -> int:
        """
        Clients waiting for a backend with room.
        """
        return len(self._queue)

    def enqueue(self, client: ProxyServer) -> None:
        if len(self._queue) >= self.queueSize:
            return client._giveUp(
                f"every backend is at capacity and {len(self._queue)} clients "
                "already wait"
            )
        timer = self.reactor.callLater(self.queueTimeout, self._queueTimedOut, client)
        self._queue[client] = timer
        if len(self._queue) == 1:
            self.cluster.pool.watch(self._capacityMayHaveChanged)

    def dequeue(self, client: ProxyServer) -> None:
        """
        Take C{client} out of the queue, if it is there.
        """
        timer = self._queue.pop(client, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        if not self._queue:
            self.cluster.pool.unwatch(self._capacityMayHaveChanged)

    def _queueTimedOut(self, client: ProxyServer) -> None:
        self.dequeue(client)
        client._giveUp(f"every backend stayed at capacity for {self.queueTimeout} s")

    def _capacityMayHaveChanged(self) -> None:
        # Called from inside the pool: look again once it is done changing.
        if self._wakeScheduled is None:
            self._wakeScheduled = self.reactor.callLater(0, self._wake)

    def _wake(self) -> None:
        self._wakeScheduled = None
        # Each waiting client once, oldest first, while there is room.
        for client in list(self._queue):
            if not self.cluster.pool.eligible():
                break
            if client in self._queue:
                self.dequeue(client)
                client._tryNext()

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
        for summary in (self._skipped, self._noSocket, self._closed):
            summary.stop()
        for call in list(self._readmissions.values()):
            if call.active():
                call.cancel()
        self._readmissions.clear()
        for client in list(self._queue):
            self.dequeue(client)
            client.transport.loseConnection()
        if self._wakeScheduled is not None and self._wakeScheduled.active():
            self._wakeScheduled.cancel()
        self._wakeScheduled = None
