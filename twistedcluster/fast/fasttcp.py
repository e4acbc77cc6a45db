"""
Plain TCP connections driven more directly than Twisted's generic code
drives them, for the proxy's relay, where every system call and reactor turn
per connection shows in the connection rate.

Everything here works on Twisted's own TCP transports and falls back to
Twisted's public methods whenever a transport is not plain TCP or is not in
the simple case, so ordering, back-pressure and error handling stay
Twisted's:

- L{sendNow}: send a chunk at once when nothing is queued before it.
- L{readNow}: read what a socket holds already, without a reactor turn (a
  client that connects and sends at once has sent by the time it is
  accepted, as HAProxy's speculative reads assume).
- L{loseWriteConnectionNow}, L{loseConnectionNow}: a half-close or a close
  of a transport with nothing left to send happens at once, not on a later
  reactor turn after an empty send.
- L{Dialled}: an outgoing connection to a literal address with none of the
  Connector, resolver turn and Deferred of C{reactor.connectTCP}; a connect
  the kernel completes at once (loopback) is used in the same turn.

The transport internals this relies on are named, with what they mean, in
L{twistedcluster.fast.internals}, and only used through it.  Its canary
runs once per process: should a Twisted release change them, L{plainTCP}
says no and every caller uses Twisted's public methods.  The built-in echo
service (L{twistedcluster.backend.echo}) uses the same fast writes and close.  The
saving is in system calls and epoll changes per proxied connection (each
write and close otherwise waits a reactor turn with two epoll changes);
the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Callable, Dict, Optional

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure

from twistedcluster.fast import internals
from twistedcluster.fast.internals import readNow, sendNow, shareServerNames, skipShutdown

__all__ = [
    "Dialled",
    "plainTCP",
    "prepare",
    "prepareListener",
    "readNow",
    "skipShutdown",
    "sendNow",
    "shareServerNames",
    "loseWriteConnectionNow",
    "loseConnectionNow",
]

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR)
#: What connect() says of a connect already started: still under way, or done.
_UNDER_WAY = _IN_PROGRESS + (errno.EALREADY,)
_CONNECTED = (0, errno.EISCONN)


_PREFIXES: Dict[type, str] = {}


def _clientPrefix(kind: type) -> str:
    """
    The log prefix of a dialled connection whose protocol is of class
    C{kind}: one string per class, not one per connection (held
    connections are counted in bytes, bench/run.py's held figure).
    """
    prefix = _PREFIXES.get(kind)
    if prefix is None:
        prefix = _PREFIXES[kind] = f"{kind.__name__},client"
    return prefix


class Dialled(internals.LeanConnection, internals.TCPConnection):
    """
    An outgoing TCP connection to a literal IPv4 or IPv6 address, started by
    L{dial}.

    Once connected it is an ordinary Twisted TCP transport (C{tcp.Connection}:
    reads, writes, producers, half-close, abort); C{protocol.makeConnection}
    is called then.  If the connect fails or times out, C{failed} is called
    with the reason instead, and the protocol is never connected.

    @param failed: called with a L{Failure} (C{ConnectError} and its
        subclasses, or C{TimeoutError}) when no connection is made.
    @raise OSError: when no socket can be made (out of file descriptors) or
        C{host} names a scope that does not exist.
    """

    _timeoutCall = None
    #: IPv4 unless the instance says IPv6: one attribute fewer per connection.
    _addressType = IPv4Address

    def __init__(
        self,
        reactor,
        host: str,
        port: int,
        protocol,
        timeout: Optional[float],
        failed: Callable[[Failure], None],
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if "%" in host:
            # A scoped address (fe80::1%eth0): its scope id travels only in
            # the 4-tuple form of the address.
            self.realAddress = socket.getaddrinfo(
                host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )[0][4]
        else:
            self.realAddress = (host, port)
        internals.TCPConnection.__init__(
            self, _NonBlockingSocket(family, _STREAM_NONBLOCK), protocol, reactor
        )
        if family == socket.AF_INET6:
            self._addressType = IPv6Address
        internals.setLogPrefix(self, _clientPrefix(type(protocol)))
        self._failed: Optional[Callable[[Failure], None]] = failed
        self._timeout = timeout

    def dial(self) -> None:
        """
        Start connecting.

        A connect the kernel completes at once (to a listener on this host:
        over loopback the handshake runs inside the connect() call) connects
        the protocol before this returns, with no turn of the reactor in
        between; any other waits for the socket to become writable, as
        Twisted's connectors do.  A failure is always reported on a later
        turn, so the caller never hears of it before this returns.
        """
        connect = self.socket.connect_ex
        err = connect(self.realAddress)
        if err in _IN_PROGRESS:
            # A second connect() says whether the handshake is over.
            err = connect(self.realAddress)
        if err in _CONNECTED:
            self._connected()
            return
        if err not in _UNDER_WAY:
            self._timeoutCall = self.reactor.callLater(0, self._fail, _connectError(err))
            return
        # Until the connect completes, either readiness means "look".
        internals.replaceDoRead(self, self._connectDone)
        internals.replaceDoWrite(self, self._connectDone)
        self.startWriting()
        timeout = self._timeout
        if timeout:
            self._timeoutCall = self.reactor.callLater(
                timeout, self._fail, error.TimeoutError(string=f"connect took over {timeout} s")
            )

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} to {self.realAddress[0]}:{self.realAddress[1]}>"

    def getPeer(self):
        return self._addressType("TCP", *self.realAddress[:2])

    def getHost(self):
        return self._addressType("TCP", *self.socket.getsockname()[:2])

    def _connectDone(self) -> None:
        # As Twisted's connectors do: connect() again says connected (0,
        # EISCONN), still connecting (a wake-up that was not for this
        # connect), or why it failed.
        err = self.socket.connect_ex(self.realAddress)
        if err in _UNDER_WAY:
            return None
        if err not in _CONNECTED:
            self._fail(_connectError(err))
            return None
        internals.restoreDoRead(self)  # the class's own again
        internals.restoreDoWrite(self)
        self._cancelTimeout()
        self.stopWriting()
        self._connected()
        return None

    def _connected(self) -> None:
        self._failed = None
        self.connected = 1
        self.startReading()
        self.protocol.makeConnection(self)

    def _cancelTimeout(self) -> None:
        call, self._timeoutCall = self._timeoutCall, None
        if call is not None and call.active():
            call.cancel()

    def _fail(self, reason: Exception) -> None:
        failed = self._failed
        self.abandon()
        if failed is not None:
            failed(Failure(reason))

    def abandon(self) -> None:
        """
        Stop connecting, if still connecting, and report nothing.
        """
        if self.connected or self.disconnected:
            return
        self._failed = None
        self._cancelTimeout()
        self.stopReading()
        self.stopWriting()
        self.disconnected = 1
        self.socket.close()

    def connectionLost(self, reason: Failure) -> None:
        if self.connected:
            internals.LeanConnection.connectionLost(self, reason)
            return
        # The reactor saw the socket hang up before it was connected.
        try:
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            err = 0
        self._fail(_connectError(err) if err else error.ConnectError(string=str(reason.value)))


#: A socket made non-blocking (one system call, not two).
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


class _NonBlockingSocket(socket.socket):
    """
    A socket made with C{SOCK_NONBLOCK} where the system has it: Twisted's
    C{Connection} asks for non-blocking again (an ioctl per connection),
    which is skipped when it already is.
    """

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        # A timeout of 0.0 is what a socket made with SOCK_NONBLOCK has.
        if flag or self.gettimeout() != 0.0:
            socket.socket.setblocking(self, flag)


def _connectError(err: int) -> error.ConnectError:
    return error.getConnectError((err, os.strerror(err)))


#: The transports the functions below drive; anything else goes through
#: Twisted's public methods.
_PLAIN_TYPES = internals.TCP_TRANSPORTS + (internals.LeanServer, Dialled)


def plainTCP(transport) -> bool:
    """
    Whether C{transport} is one of Twisted's own TCP connections, with no TLS
    over it and the internals this module relies on (and whether this
    Twisted passed the canary, L{internals.fastPaths}).
    """
    kind = type(transport)
    if kind not in _PLAIN_TYPES or getattr(transport, "TLS", True):
        return False
    if kind in _CHECKED:
        return True
    # Every instance of these types has what its __init__ set: look once.
    if internals.fastPaths() and internals.hasTransportInternals(transport):
        _CHECKED.add(kind)
        return True
    return False


_CHECKED: set = set()


def prepare(transport) -> None:
    """
    Ready a plain TCP transport for relaying: no Nagle delay (what a relay
    reads, it passes on at once) and no shutdown() before close() (the
    socket is not shared with another process, so close() alone ends it the
    same way, one system call sooner).  A socket accepted by a listener
    given to L{prepareListener} has no Nagle delay already.
    """
    if not getattr(getattr(transport, "server", None), _NO_DELAY, False):
        transport.setTcpNoDelay(True)
    skipShutdown(transport)


#: Set on a listening port whose accepted sockets start with TCP_NODELAY.
_NO_DELAY = "_twistedclusterNoDelay"


def prepareListener(port) -> None:
    """
    Ready a listening TCP port whose connections are relayed: it accepts
    without the socket module's enum conversions
    (L{internals.leanAccept}), and TCP_NODELAY is set on the listening
    socket, which Linux copies to every socket it accepts (as HAProxy
    does), so that L{prepare} need not set it on each: one system call
    fewer per connection.  Anything but a plain TCP port over IP, or a
    Twisted that failed the canary, is left alone.
    """
    if not (internals.fastPaths() and isinstance(port, internals.TCPPort)):
        return
    sock = getattr(port, "socket", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    internals.leanAccept(port)
    if port.transport is internals.TCPServer:
        port.transport = internals.LeanServer
    if sys.platform.startswith("linux"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return
        setattr(port, _NO_DELAY, True)


def loseWriteConnectionNow(transport) -> None:
    """
    C{loseWriteConnection} for a plain TCP transport: when nothing is queued,
    the write side is shut down now and the protocol's C{writeConnectionLost}
    runs before this returns.
    """
    if not internals.idle(transport):
        transport.loseWriteConnection()
        return
    internals.shutdownWriteNow(transport)


def loseConnectionNow(transport) -> None:
    """
    C{loseConnection} for a plain TCP transport: when nothing is queued, the
    connection is closed now and the protocol's C{connectionLost} runs before
    this returns (as Twisted's own C{loseConnection} does once the write side
    is shut down).

    Its producer is let go rather than stopped: the protocol's
    C{connectionLost} decides what becomes of it (a relay closes its other
    side itself, the same fast way).
    """
    if not transport.connected:
        # Closed already (or never open): Twisted's loseConnection would do
        # nothing either.
        return
    if internals.idle(transport) or internals.writeShutDown(transport):
        # Also once the write side is shut down (nothing can be queued
        # then): Twisted's loseConnection would close at once too, but with
        # a new Failure for the reason, a few microseconds per connection.
        internals.closeNow(transport)
        return
    transport.loseConnection()
