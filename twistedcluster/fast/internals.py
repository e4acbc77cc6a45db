"""
The one door to Twisted's internals: every private Twisted name twistedcluster
reads, sets or overrides is named here, with what Twisted means by it, and
nowhere else.

The fast paths (L{twistedcluster.fast.fasttcp}, the relay's splice, the lean
reactor, L{twistedcluster.balancer.dialer.FastDialer}) and a few guards (the listeners'
accept-error summary and connection clamp, the hardened AMP parser) rely on
what these names mean, not on any public API.  Each name below says what it
stands for and what we rely on; the meanings were read in, and are checked
against, Twisted 24.7.0 (the oldest that setup.py allows) and 26.10.0.

L{check} is the canary: it exercises every meaning on real objects (a
loopback TCP socket pair under a real C{tcp.Connection}, a real epoll poller,
Twisted's accept loop, AMP's parser) and raises L{Changed} naming the first
one that no longer holds.  L{fastPaths} runs it once per process: when it
fails, twistedcluster uses Twisted's plain paths (Twisted's own reactor,
C{transport.write}, no splice, C{reactor.connectTCP}, Twisted's own accept
logging) and logs one line saying so.  tests/test_internals.py runs
each probe, so a Twisted release that changes one fails the suite by name.
"""

from __future__ import annotations

import _socket
import errno
import socket
import sys
from select import EPOLLIN as _EPOLLIN
from select import EPOLLOUT as _EPOLLOUT
from typing import Callable, Dict, List, Optional

import twisted
from twisted.internet import abstract, error, tcp
from twisted.internet.address import IPv6Address
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

log = Logger()

#: The Twisted releases these meanings were verified on, oldest first.
VERIFIED = ("24.7.0", "26.10.0")


class Changed(Exception):
    """
    A Twisted internal no longer means what twistedcluster relies on; the
    message names it.
    """


# -- TCP transports (abstract.FileDescriptor, tcp.Connection) ---------------
#
# What a plain TCP transport holds (FileDescriptor): written data is appended
# to _tempData (a list) and counted in _tempDataLen until doWrite moves it to
# dataBuffer (bytes), of which offset bytes have been sent.  So the bytes
# queued and not sent are _tempDataLen + len(dataBuffer) - offset, and the
# transport is idle (a send now cannot overtake anything) when that is 0.
# _writeDisconnecting is set by loseWriteConnection (and loseConnection's
# write side) while the queue drains; _writeDisconnected once the write side
# is shut down (_closeWriteConnection: shutdown(SHUT_WR) and the protocol's
# writeConnectionLost).  _aborting is set by abortConnection.
# _shouldShutdown (tcp.Connection) makes connectionLost call shutdown()
# before close().  doRead and doWrite are looked up on the instance by the
# reactor at each event, so an instance attribute stands in for the class's.

#: Twisted's TCP connection class: C{__init__(socket, protocol, reactor)};
#: once C{connected = 1} and reading, an ordinary transport.  L{Dialled} in
#: fasttcp builds on it.
TCPConnection = tcp.Connection
#: Twisted's listening TCP port (its C{socket} is the listening socket).
TCPPort = tcp.Port
#: Twisted's accepted TCP transport, which a listening port makes (its
#: C{transport}: L{LeanServer} may stand in).
TCPServer = tcp.Server
#: Twisted's own accepted and connected TCP transports.
TCP_TRANSPORTS = (tcp.Server, tcp.Client)

#: Every private transport attribute the functions below touch.
TRANSPORT_INTERNALS = (
    "_tempDataLen",
    "dataBuffer",
    "offset",
    "producerPaused",
    "_writeDisconnecting",
    "_writeDisconnected",
    "_closeWriteConnection",
    "_shouldShutdown",
    "_aborting",
)

#: One shared reason for clean closes, as Twisted's reactor keeps one.
_DONE = Failure(error.ConnectionDone())


def hasTransportInternals(transport) -> bool:
    """
    Whether C{transport} has every attribute in L{TRANSPORT_INTERNALS}.
    """
    return all(hasattr(transport, a) for a in TRANSPORT_INTERNALS)


def unsent(transport) -> int:
    """
    Bytes a Twisted file-descriptor transport holds that it has not sent yet
    (C{_tempDataLen + len(dataBuffer) - offset}); 0 for a transport that
    cannot say (a TLS wrapper, a test fake).
    """
    try:
        return transport._tempDataLen + len(transport.dataBuffer) - transport.offset
    except AttributeError:
        return 0


def idle(transport) -> bool:
    """
    Whether a plain TCP transport is open, not closing or paused, and has
    nothing queued to send.
    """
    return (
        transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport._writeDisconnecting
        and not transport.producerPaused
        and transport._tempDataLen == 0
        and transport.offset == len(transport.dataBuffer)
    )


def writeShutdownAsked(transport) -> bool:
    """
    Whether C{loseWriteConnection} (or C{loseConnection}) was asked of
    C{transport} (C{_writeDisconnecting}): its C{doWrite} finishes that
    once the queue is empty.
    """
    return transport._writeDisconnecting


def skipShutdown(transport) -> None:
    """
    Make a plain TCP transport close with close() alone, without the
    shutdown() Twisted's C{connectionLost} calls first (C{_shouldShutdown}).
    """
    transport._shouldShutdown = False


def sendNow(transport, data: bytes) -> None:
    """
    Write C{data} to a plain TCP transport, sending it at once when nothing
    is queued before it; what the kernel does not take goes through
    C{transport.write} as usual.

    A send that fails for any other reason than a full buffer (a reset, a
    broken pipe) ends the connection as lost, at once
    (C{abortConnection}: its protocol hears of it on the reactor's next
    turn, as C{ConnectionAborted}): the socket reports its error once, to
    this send, so a read after it would see only the end of file that
    follows, a clean close, and a relay would pass on a cut-off stream as a
    complete one.
    """
    if (
        transport._tempDataLen == 0
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport._writeDisconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                transport.abortConnection()
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def readNow(transport) -> Optional[bytes]:
    """
    Read what a plain TCP transport's socket holds already, without waiting
    for the reactor to say it is readable (as C{Connection.doRead} reads:
    up to C{bufferSize} bytes from C{socket}); C{None} when it holds no data.

    End of file is left where it is (a socket at end of file stays readable:
    the reactor reports it on its next turn).  An error ends the connection
    as a reset (C{abortConnection}), as the reactor would once it saw it:
    a socket's error is reported once, so it cannot be left for later.
    """
    if not transport.connected or transport.disconnecting or transport._aborting:
        return None
    try:
        data = transport.socket.recv(transport.bufferSize)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        transport.abortConnection()
        return None
    return data or None


def writeShutDown(transport) -> bool:
    """
    Whether a plain TCP transport is open, not closing, with its write side
    shut down already (C{_writeDisconnected}: the queue was sent before
    that): closing it now is what Twisted's C{loseConnection} would do.
    """
    return (
        transport._writeDisconnected
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
    )


def shutdownWriteNow(transport) -> None:
    """
    Shut down the write side of an L{idle} plain TCP transport now, as its
    C{doWrite} would once the queue drained: the flags set, shutdown(), the
    protocol's C{writeConnectionLost} before this returns.
    """
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport.stopWriting()
    transport._closeWriteConnection()


def closeNow(transport) -> None:
    """
    Close an L{idle} plain TCP transport now: its producer let go, the
    protocol's C{connectionLost} called before this returns, as Twisted's
    own C{loseConnection} does once the queue is empty.
    """
    transport.producer = None
    transport.disconnecting = True
    # FileDescriptor.connectionLost stops reading and writing first thing.
    transport.connectionLost(_DONE)


class _Named:
    """
    A C{tcp.Server} string (C{logstr}, C{repstr}) made the first time it is
    asked for and kept on the instance (a non-data descriptor: the
    instance's own value, once set, is read before it).
    """

    def __init__(self, make: Callable[[tcp.Server], str]) -> None:
        self.make = make

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.make(instance)
        return value


def _protocolName(server) -> str:
    protocol = server.__dict__.get("protocol")
    return "?" if protocol is None else server._getLogPrefix(protocol)


class LeanConnection:
    """
    C{tcp.Connection.connectionLost} with the same effects in the same
    order, for less Python: Twisted's asks C{reason.check(ConnectionAborted)}
    (L{Failure.check} builds the type's qualified name and searches the
    reason's parents by name, a few microseconds) and goes through
    C{FileDescriptor.connectionLost}; this asks C{isinstance} and does the
    latter's four steps itself (disconnected, the producer stopped and let
    go, reading and writing stopped).  Mixed into L{LeanServer} and the
    dialer's connections: closes are two per proxied connection.
    """

    def connectionLost(self, reason) -> None:
        d = self.__dict__
        if "socket" not in d:  # called twice (Twisted guards the same way)
            return
        self.disconnected = 1
        self.connected = 0
        producer = self.producer
        if producer is not None:
            producer.stopProducing()
            self.producer = None
        self.stopReading()
        self.stopWriting()
        self._closeSocket(not isinstance(reason.value, error.ConnectionAborted))
        protocol = d.pop("protocol")
        del d["socket"]
        d.pop("fileno", None)
        protocol.connectionLost(reason)


class LeanServer(LeanConnection, tcp.Server):
    """
    An accepted TCP connection: C{tcp.Server} with L{LeanConnection}'s
    close, and without the two strings its C{__init__} formats for each
    connection (C{logstr} with the session number and the client's host,
    C{repstr} with the port): they are made when first asked for (the
    legacy log context of Twisted's own reactor asks; the lean reactor and
    twistedcluster's log lines never do).  What C{__init__} sets otherwise
    is C{tcp.Server}'s (L{checkLeanServer} compares the two).  A listening
    port makes these when its C{transport} is this class
    (L{twistedcluster.fast.fasttcp.prepareListener}).
    """

    logstr = _Named(lambda t: f"{_protocolName(t)},{t.sessionno},{t.hostname}")
    repstr = _Named(
        lambda t: f"<{type(t.__dict__.get('protocol')).__name__} #{t.sessionno} on "
        f"{t.server._realPortNumber}>"
    )

    def __init__(self, sock, protocol, client, server, sessionno, reactor) -> None:
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1


class LeanListeningSocket(socket.socket):
    """
    A listening socket whose C{accept} makes the new socket from the
    listener's family, type and protocol as plain integers: the socket
    module's own C{accept} reads them through C{family} and C{type}, which
    convert each to an enum member, about a microsecond apiece per accepted
    connection.  Twisted's C{tcp.Port} calls C{accept} on its C{socket}
    (through C{tcp._accept}); nothing else differs (the listener is
    non-blocking, so C{socket.accept}'s C{setblocking(True)} never applied).
    """

    __slots__ = ()

    def accept(self):
        fd, addr = self._accept()
        return socket.socket(_FAMILY(self), _TYPE(self), _PROTO(self), fd), addr


_FAMILY = _socket.socket.family.__get__
_TYPE = _socket.socket.type.__get__
_PROTO = _socket.socket.proto.__get__


def leanAccept(port) -> bool:
    """
    Have a listening C{tcp.Port} accept through L{LeanListeningSocket}
    (its C{socket}'s class changed in place); whether it was.
    """
    sock = getattr(port, "socket", None)
    if type(sock) is not socket.socket or sock.gettimeout() != 0.0:
        return False
    sock.__class__ = LeanListeningSocket
    return True


def replaceDoRead(transport, doRead: Callable[[], object]) -> None:
    """
    Have the reactor call C{doRead} instead of the transport's own when it
    is readable (an instance attribute; L{restoreDoRead} undoes it).
    """
    transport.doRead = doRead


def replaceDoWrite(transport, doWrite: Callable[[], object]) -> None:
    """
    Have the reactor call C{doWrite} instead of the transport's own when it
    is writable (L{restoreDoWrite} undoes it).
    """
    transport.doWrite = doWrite


def restoreDoRead(transport) -> None:
    """
    The transport's own C{doRead} again (nothing if it was not replaced).
    """
    transport.__dict__.pop("doRead", None)


def restoreDoWrite(transport) -> None:
    """
    The transport's own C{doWrite} again (nothing if it was not replaced).
    """
    transport.__dict__.pop("doWrite", None)


def setLogPrefix(connection, prefix: str) -> None:
    """
    What a C{tcp.Connection}'s C{logPrefix()} answers (C{logstr}).
    """
    connection.logstr = prefix


def shareServerNames(server, prefix: str, text: str) -> None:
    """
    Give an accepted C{tcp.Server} a shared C{logPrefix()} (C{logstr}) and
    C{repr()} (C{repstr}) in place of the two strings its C{__init__} built
    for it alone (with its session number and the client's host): about
    150 bytes a held connection, of the 2.5 KiB item 4 of issue 16 allows.
    twistedcluster's log lines name the client themselves (peerText); only
    a legacy log context (Twisted's own reactor) names the listener instead.
    """
    setLogPrefix(server, prefix)
    server.repstr = text


# -- the epoll reactor (EPollReactor) ----------------------------------------
#
# _poller is the select.epoll object; _selectables maps each registered file
# descriptor to its reader/writer; _doReadOrWrite(selectable, fd, event)
# calls doRead/doWrite for the event, catches what they raise, and removes
# and disconnects the selectable when they return or raise a reason, through
# _disconnectSelectable(selectable, why, isRead): for an end of file read,
# readConnectionLost when the selectable is half-closeable, else
# connectionLost.
# _reads and _writes are the sets of file descriptors registered for reading
# and for writing; removeReader/removeWriter change nothing for a descriptor
# not in them, unless it is one _continuousPolling watches (files epoll
# refuses: the sets _readers and _writers hold them).  _remove takes a
# descriptor off: epoll modified to the other event when it is still
# watched for that, else unregistered and dropped from _selectables.


def leanRemoveReader(reactor, reader) -> None:
    """
    C{EPollReactor.removeReader}, answered at once for a descriptor that is
    not being read: a transport stops reading and writing four or five
    times over while it closes (C{loseConnection}, C{connectionLost}, the
    reactor's own disconnect), and each such call costs Twisted's generic
    path about a microsecond.  A descriptor epoll watches is removed here,
    as C{EPollReactor._remove} would (three Python calls fewer); one of
    C{_continuousPolling}'s (a file epoll refused), or one whose
    C{fileno()} is -1 already, goes Twisted's way.
    """
    fd = reader.fileno()
    reads = reactor._reads
    if fd in reads:
        # EPollReactor._remove for a descriptor epoll watches, inlined.
        if fd in reactor._writes:
            reactor._poller.modify(fd, _EPOLLOUT)
        else:
            del reactor._selectables[fd]
            reactor._poller.unregister(fd)
        reads.remove(fd)
    elif fd == -1 or reader in reactor._continuousPolling._readers:
        EPollReactor.removeReader(reactor, reader)


def leanRemoveWriter(reactor, writer) -> None:
    """
    C{EPollReactor.removeWriter}, answered at once for a descriptor that is
    not being written (see L{leanRemoveReader}).
    """
    fd = writer.fileno()
    writes = reactor._writes
    if fd in writes:
        if fd in reactor._reads:
            reactor._poller.modify(fd, _EPOLLIN)
        else:
            del reactor._selectables[fd]
            reactor._poller.unregister(fd)
        writes.remove(fd)
    elif fd == -1 or writer in reactor._continuousPolling._writers:
        EPollReactor.removeWriter(reactor, writer)


def leanDoPoll(reactor, timeout) -> None:
    """
    C{EPollReactor.doPoll} without C{log.callWithLogger} around each ready
    descriptor: a copy of Twisted's, which the lean reactor uses as its own
    (errors from a descriptor are still caught and logged, naming it).
    """
    if timeout is None:
        timeout = -1  # wait until something happens
    try:
        ready = reactor._poller.poll(timeout, len(reactor._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = reactor._selectables
    doReadOrWrite = reactor._doReadOrWrite
    for fd, event in ready:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            if event == _EPOLLIN and selectable.fileno() != -1:
                # Readable and nothing else, the common case: the read
                # branch of _doReadOrWrite, inlined (a relayed message is
                # two of these; the frame and flag tests are a tenth of the
                # Python work each costs).
                try:
                    why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    log.failure("unhandled error reading {selectable!r}", selectable=selectable)
                if why:
                    reactor._disconnectSelectable(selectable, why, True)
            else:
                doReadOrWrite(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            # _doReadOrWrite catches what doRead and doWrite raise; this is
            # what a connectionLost raised.  Log it and go on, as
            # callWithLogger would.
            log.failure("unhandled error from {selectable!r}", selectable=selectable)


def closePoller(reactor) -> None:
    """
    Release an epoll reactor that was made but never run (its poller).
    """
    reactor._poller.close()


# -- listening TCP ports (tcp.Port, tcp._accept) -------------------------------
#
# Port.doRead accepts up to numberAccepts connections per turn (and adapts
# it), and logs accept errors (tcp._accept) through a logger built from
# self._logger's namespace and observer.

#: What tcp._accept logs when accept() fails with EMFILE and Twisted frees
#: its reserved descriptor, per connection it then closes unaccepted, and
#: when it reserves the descriptor again; and on other accept errors.
EMFILE_START = "EMFILE encountered; releasing reserved file descriptor."
EMFILE_CLOSED = "EMFILE recovery: Closed socket from {address}"
EMFILE_END = "Re-reserving EMFILE recovery file descriptor."
ACCEPT_FAILED = "Could not accept new connection ({acceptError})"


def portLogger(port) -> Optional[Logger]:
    """
    The logger a listening port logs its accept errors through, or None.
    """
    logger = getattr(port, "_logger", None)
    return logger if isinstance(logger, Logger) else None


def setPortLogger(port, logger: Logger) -> None:
    """
    Send a listening port's accept-error events to C{logger}'s observer.
    """
    port._logger = logger


def acceptsPerTurn(port, default: int) -> int:
    """
    How many connections C{port} accepts at most in one reactor turn
    (C{numberAccepts}); C{default} for a port that does not say.
    """
    return getattr(port, "numberAccepts", default)


def limitAcceptsPerTurn(port, most: int) -> None:
    """
    Accept at most C{most} connections in C{port}'s next turn (Twisted
    raises it again by itself as turns fill up).
    """
    if getattr(port, "numberAccepts", 0) > most:
        port.numberAccepts = most


# -- Listening ports shared with another process (--takeover) -------------
#
# tcp.Port.connectionLost calls _closeSocket(True), which calls
# socket.shutdown(SHUT_RDWR) before close() unless _shouldShutdown is false
# (Twisted sets it false itself on a port made by adoptStreamPort).  On
# Linux, shutdown() on a listening socket stops it listening for every
# process that holds it.  unix.Port.connectionLost also unlinks the path it
# is bound to, then does tcp.Port's.  StreamServerEndpointService raises a
# listen failure from privilegedStartService (instead of logging it later)
# when _raiseSynchronously is true, as strports.service sets it.


def keepSharedOnClose(port) -> None:
    """
    When C{port} stops listening, close its socket in this process only:
    without shutdown(), and leaving a unix socket's path.  For a socket
    another process holds too (a successor, or systemd's file-descriptor
    store).
    """
    from twisted.internet import unix

    port._shouldShutdown = False
    if isinstance(port, unix.Port):
        port.connectionLost = lambda reason, port=port: tcp.Port.connectionLost(port, reason)


def letGoOfListener(port) -> None:
    """
    Stop listening on C{port} in this process only: the shared socket is
    closed here without shutdown(), and a unix socket's path stays.
    """
    keepSharedOnClose(port)
    port.stopListening()


def systemdDescriptors() -> Dict[str, int]:
    """
    The descriptors systemd passed this process, by name (C{LISTEN_FDS},
    C{LISTEN_FDNAMES}, C{LISTEN_PID}): the list Twisted's C{systemd:}
    endpoints read.  Twisted reads the environment once, when
    C{twisted.internet.endpoints} is imported, and removes C{LISTEN_FDS} from
    it, so this asks Twisted's parser rather than the environment.  Sockets
    of socket units and the file-descriptor store's alike.
    """
    try:
        from twisted.internet.endpoints import _SystemdParser

        return dict(_SystemdParser._sddaemon.inheritedNamedDescriptors())
    except (ImportError, AttributeError):
        # A Twisted that keeps them elsewhere: the environment, if still there.
        from twisted.python.systemd import ListenFDs

        return dict(ListenFDs.fromEnvironment().inheritedNamedDescriptors())


# SSL4ServerEndpoint (what ssl: and mtls: strings make) keeps the TLS
# context factory it listens with as _sslContextFactory.


def serverTLSContext(endpoint) -> Optional[object]:
    """
    The TLS context factory C{endpoint} (a C{SSL4ServerEndpoint}) listens
    with, to put the same TLS layer on a socket listened on otherwise (an
    adopted one); C{None} when Twisted keeps it elsewhere.
    """
    return getattr(endpoint, "_sslContextFactory", None)


def raiseListenFailures(service) -> None:
    """
    Make a C{StreamServerEndpointService} raise a listen failure when it
    starts, as C{strports.service} does.
    """
    service._raiseSynchronously = True


# -- AMP's parser (amp.BinaryBoxProtocol, amp._ParserHelper) -------------------
#
# BinaryBoxProtocol is a StatefulStringProtocol: each length-prefixed string
# goes to proto_<state>(string), which returns the next state.  A box is
# "key" strings each followed by a "value" string, ended by an empty key.
# proto_key(key) returns "value" after setting MAX_LENGTH to the limit for
# that value; nothing changes MAX_LENGTH again before the value is read.
# AMP.makeConnection logs the connection and keeps _transportPeer and
# _transportHost for the line AMP.connectionLost logs.

#: The parser states (method names are "proto_" + state) a guard overrides.
AMP_KEY_STATE = "key"
AMP_VALUE_STATE = "value"


def connectAMPQuietly(protocol: amp.AMP, transport) -> None:
    """
    C{AMP.makeConnection} without its info line per connection.
    """
    protocol._transportPeer = transport.getPeer()
    protocol._transportHost = transport.getHost()
    amp.BinaryBoxProtocol.makeConnection(protocol, transport)


# -- the canary ----------------------------------------------------------------


def _require(condition, what: str) -> None:
    if not condition:
        raise Changed(what)


class _FakeReactor:
    """
    Just enough reactor for a transport that is never run: it records which
    descriptors want reading and writing.
    """

    def __init__(self) -> None:
        self.readers: set = set()
        self.writers: set = set()

    def addReader(self, r) -> None:
        self.readers.add(r)

    def addWriter(self, w) -> None:
        self.writers.add(w)

    def removeReader(self, r) -> None:
        self.readers.discard(r)

    def removeWriter(self, w) -> None:
        self.writers.discard(w)

    def callLater(self, *a, **kw):  # pragma: no cover - not reached
        raise Changed("a transport scheduled a call while probed")


class _HalfCloseable:
    """
    A protocol that records what its transport tells it.
    """

    def __init__(self) -> None:
        self.events: List[str] = []

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data) -> None:
        self.events.append("data")

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason) -> None:
        self.events.append("connectionLost")


def _loopbackPair():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    finally:
        listener.close()
    client.settimeout(5)
    server.setblocking(False)
    return server, client


def _transport(server):
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from zope.interface import directlyProvides

    protocol = _HalfCloseable()
    directlyProvides(protocol, IHalfCloseableProtocol)
    reactor = _FakeReactor()
    transport = tcp.Connection(server, protocol, reactor)
    transport.connected = 1
    protocol.makeConnection(transport)
    return transport, protocol, reactor


def checkTransport() -> None:
    """
    The transport internals mean what L{unsent}, L{idle}, L{sendNow},
    L{writeShutdownAsked}, L{shutdownWriteNow}, L{closeNow},
    L{skipShutdown} and the C{doRead}/C{doWrite} swaps rely on, on a real
    loopback TCP connection.
    """
    server, client = _loopbackPair()
    try:
        t, protocol, reactor = _transport(server)
        _require(hasTransportInternals(t), f"tcp.Connection lacks one of {TRANSPORT_INTERNALS}")
        _require(idle(t) and unsent(t) == 0, "a new transport is not idle")
        t.write(b"x" * 10)
        _require(unsent(t) == 10, "_tempDataLen/dataBuffer/offset do not count written bytes")
        _require(not idle(t), "a transport with data queued looks idle")
        _require(t in reactor.writers, "write() did not ask the reactor for writability")
        t.doWrite()
        _require(client.recv(100) == b"x" * 10, "doWrite did not send what write() queued")
        _require(unsent(t) == 0 and idle(t), "doWrite left sent bytes counted as unsent")
        sendNow(t, b"now")
        _require(client.recv(100) == b"now", "sendNow did not send at once")
        _require(readNow(t) is None, "readNow read from an empty socket")
        client.sendall(b"early")
        for _ in range(100):  # loopback delivers at once, or nearly
            got = readNow(t)
            if got is not None:
                break
        _require(got == b"early", f"readNow did not read what was there: {got!r}")
        _require(unsent(t) == 0, "sendNow queued on an idle transport")
        t.write(b"queued")
        t.loseWriteConnection()
        _require(
            writeShutdownAsked(t), "_writeDisconnecting is not set by loseWriteConnection with data pending"
        )
        t.doWrite()
        _require(client.recv(100) == b"queued", "doWrite did not send before the write shutdown")
        _require(client.recv(100) == b"", "no end-of-file after loseWriteConnection")
        _require(
            t._writeDisconnected and "writeConnectionLost" in protocol.events,
            "_writeDisconnected/writeConnectionLost not reached after the queue drained",
        )
        _require(t._shouldShutdown is True, "_shouldShutdown is not on by default")
        skipShutdown(t)
        own = type(t).doRead
        replaceDoRead(t, len)
        replaceDoWrite(t, len)
        _require(t.doRead is len and t.doWrite is len, "doRead/doWrite cannot be replaced")
        restoreDoRead(t)
        restoreDoWrite(t)
        _require(
            t.doRead.__func__ is own and t.doWrite.__func__ is type(t).doWrite,
            "doRead/doWrite not restored",
        )
        t.startReading()
        closeNow(t)
        _require(
            protocol.events[-1] == "connectionLost" and getattr(t, "socket", None) is None and t.disconnected,
            "closeNow did not close the transport",
        )
        _require(
            t not in reactor.readers and t not in reactor.writers,
            "closeNow left the transport reading (FileDescriptor.connectionLost no longer stops it)",
        )
    finally:
        server.close()
        client.close()

    # shutdownWriteNow on an idle transport.
    server, client = _loopbackPair()
    try:
        t, protocol, reactor = _transport(server)
        _require(not writeShutDown(t), "an open transport looks shut down for writing")
        shutdownWriteNow(t)
        _require(client.recv(100) == b"", "shutdownWriteNow did not shut the write side down")
        _require(protocol.events == ["writeConnectionLost"], "shutdownWriteNow did not tell the protocol")
        _require(writeShutDown(t), "_writeDisconnected is not set once the write side is shut down")
        closeNow(t)
        _require(not writeShutDown(t), "a closed transport looks open")
    finally:
        server.close()
        client.close()


def checkListener() -> None:
    """
    A socket's class can be changed to L{LeanListeningSocket} in place, and
    its C{accept} then gives a plain socket connected to the client.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        _require(leanAccept(_ListeningPort(listener)), "a listening socket's class cannot be changed")
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            for _ in range(100):  # the handshake is over at once on loopback
                try:
                    server, addr = listener.accept()
                    break
                except BlockingIOError:
                    import time

                    time.sleep(0.01)
            else:
                raise Changed("LeanListeningSocket.accept accepted nothing")
            try:
                _require(type(server) is socket.socket, f"LeanListeningSocket.accept gave {type(server)}")
                _require(
                    server.family == socket.AF_INET and server.type == socket.SOCK_STREAM
                    and addr == client.getsockname(),
                    "LeanListeningSocket.accept gave another family, type or address",
                )
                server.sendall(b"x")
                _require(client.recv(1) == b"x", "the socket LeanListeningSocket.accept gave is not connected")
            finally:
                server.close()
    finally:
        listener.close()


class _ListeningPort:
    def __init__(self, sock) -> None:
        self.socket = sock


class _Readable:
    def __init__(self, sock) -> None:
        self.sock = sock
        self.reads: List[bytes] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "canary"

    def doRead(self):
        self.reads.append(self.sock.recv(100))

    def connectionLost(self, reason) -> None:
        pass


class _Ending(_Readable):
    def __init__(self, sock, outcome: str) -> None:
        super().__init__(sock)
        self.outcome = outcome
        self.lost = None

    def doRead(self):
        return error.ConnectionDone()

    def connectionLost(self, reason) -> None:
        self.lost = reason


class _ProbeReactor(EPollReactor):
    doPoll = doIteration = leanDoPoll
    removeReader = leanRemoveReader
    removeWriter = leanRemoveWriter


def checkReactor() -> None:
    """
    L{leanDoPoll} on a real epoll reactor dispatches a readable descriptor.
    """
    reactor = _ProbeReactor()
    a, b = socket.socketpair()
    try:
        readable = _Readable(a)
        reactor.addReader(readable)
        b.send(b"ping")
        leanDoPoll(reactor, 1)
        _require(readable.reads == [b"ping"], "EPollReactor's _poller/_selectables/_doReadOrWrite changed")
        fd = a.fileno()
        _require(fd in reactor._reads and fd not in reactor._writes, "EPollReactor's _reads/_writes changed")
        reactor.removeWriter(readable)  # not writing: nothing changes
        _require(fd in reactor._reads and fd in reactor._selectables, "leanRemoveWriter removed a reader")
        reactor.addWriter(readable)
        _require(fd in reactor._writes, "EPollReactor's _writes changed")
        reactor.removeWriter(readable)
        _require(fd not in reactor._writes and fd in reactor._reads, "leanRemoveWriter did not remove a writer")
        # epoll itself no longer reports it writable (the socket is), and
        # still reports it readable.
        _require(reactor._poller.poll(0) == [], "leanRemoveWriter left epoll watching for writes")
        b.send(b"again")
        _require(
            reactor._poller.poll(1) == [(fd, _EPOLLIN)],
            "leanRemoveWriter did not leave epoll watching for reads",
        )
        a.recv(100)
        reactor.addWriter(readable)
        reactor.removeReader(readable)
        _require(
            fd in reactor._writes and fd not in reactor._reads and reactor._poller.poll(1) == [(fd, _EPOLLOUT)],
            "leanRemoveReader did not leave epoll watching for writes",
        )
        reactor.addReader(readable)
        reactor.removeWriter(readable)
        reactor.removeReader(readable)
        _require(
            fd not in reactor._reads and fd not in reactor._selectables,
            "leanRemoveReader did not remove a reader",
        )
        polling = reactor._continuousPolling
        _require(
            not polling.isReading(readable)
            and not polling.isWriting(readable)
            and isinstance(getattr(polling, "_readers", None), set)
            and isinstance(getattr(polling, "_writers", None), set),
            "EPollReactor's _continuousPolling changed",
        )
        reactor.removeReader(readable)  # twice: nothing happens
        # A read that ends the connection is disconnected, as
        # _doReadOrWrite would.
        for outcome in ("done",):
            ending = _Ending(a, outcome)
            reactor.addReader(ending)
            b.send(b"x")
            leanDoPoll(reactor, 1)
            _require(ending.lost is not None, "a doRead that ended the connection did not disconnect it")
            _require(fd not in reactor._reads, "_disconnectSelectable did not stop reading")
            a.recv(100)
    finally:
        closePoller(reactor)
        a.close()
        b.close()


class _Listener:
    def __init__(self, errors) -> None:
        self.errors = list(errors)

    def accept(self):
        e = self.errors.pop(0)
        if isinstance(e, int):
            raise OSError(e, "probe")
        return e


class _Reservation:
    def available(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *a) -> None:
        pass


class _Closable:
    def close(self) -> None:
        pass


def checkPort() -> None:
    """
    A listening port has the C{_logger} and C{numberAccepts} its accept loop
    uses, and Twisted's accept loop logs accept errors with the formats
    L{EMFILE_START}, L{EMFILE_CLOSED}, L{EMFILE_END} and L{ACCEPT_FAILED}.
    """
    import inspect

    _require(isinstance(getattr(tcp.Port, "_logger", None), Logger), "tcp.Port._logger is not a Logger")
    _checkServerNames()
    doRead = inspect.getsource(tcp.Port.doRead)
    _require(
        "self._logger" in doRead and "self.numberAccepts" in doRead,
        "tcp.Port.doRead no longer uses _logger and numberAccepts",
    )
    formats: List[str] = []
    logger = Logger(observer=lambda event: formats.append(event.get("log_format")))
    listener = _Listener([errno.EMFILE, (_Closable(), ("127.0.0.1", 1)), errno.EAGAIN])
    list(tcp._accept(logger, range(5), listener, _Reservation()))
    _require(formats == [EMFILE_START, EMFILE_CLOSED, EMFILE_END], f"EMFILE log formats changed: {formats}")
    formats.clear()
    list(tcp._accept(logger, range(5), _Listener([errno.ENOBUFS]), _Reservation()))
    _require(formats == [ACCEPT_FAILED], f"accept-error log format changed: {formats}")


#: What Twisted's C{connectionLost} of a TCP connection, and of a file
#: descriptor, use (L{LeanConnection} does the same).
_CONNECTION_LOST_NAMES = {
    "hasattr", "abstract", "FileDescriptor", "connectionLost", "_closeSocket",
    "check", "error", "ConnectionAborted", "protocol", "socket", "fileno",
}
_DESCRIPTOR_LOST_NAMES = {
    "disconnected", "connected", "producer", "stopProducing", "stopReading", "stopWriting",
}


def checkLeanServer() -> None:
    """
    L{LeanServer} is C{tcp.Server} less its strings: the same attributes
    after C{__init__}, the same names (made when asked for), and
    L{LeanConnection.connectionLost} does what Twisted's does (their code
    uses the names it copies, and both leave the same state).
    """
    used = set(tcp.Connection.connectionLost.__code__.co_names)
    _require(used <= _CONNECTION_LOST_NAMES, f"tcp.Connection.connectionLost uses {sorted(used)}")
    used = set(abstract.FileDescriptor.connectionLost.__code__.co_names)
    _require(used == _DESCRIPTOR_LOST_NAMES, f"FileDescriptor.connectionLost uses {sorted(used)}")
    states = []
    for kind in (tcp.Server, LeanServer):
        server, client = _loopbackPair()
        try:
            port = tcp.Port(0, None, reactor=_FakeReactor())
            port._realPortNumber = 1
            reactor = _FakeReactor()
            protocol = _HalfCloseable()
            t = kind(server, protocol, ("127.0.0.1", 1), port, 7, reactor)
            names = (t.logPrefix(), repr(t))
            made = set(vars(t)) - {"logstr", "repstr"}
            t.connectionLost(_DONE)
            after = {k: v for k, v in vars(t).items() if k not in ("reactor", "server")}
            states.append((made, names, after, reactor.readers, protocol.events))
            _require(client.recv(10) == b"", f"{kind.__name__}.connectionLost did not close the socket")
        finally:
            server.close()
            client.close()
    twisted_, lean = states
    for what, i in (("__init__ sets", 0), ("names", 1), ("state after connectionLost", 2),
                    ("reading after connectionLost", 3), ("protocol told", 4)):
        _require(twisted_[i] == lean[i], f"LeanServer differs from tcp.Server: {what} "
                 f"{lean[i]!r} against {twisted_[i]!r}")


def _checkServerNames() -> None:
    """
    An accepted C{tcp.Server} answers C{logPrefix()} and C{repr()} from
    C{logstr} and C{repstr} (L{shareServerNames}).
    """
    server, client = _loopbackPair()
    try:
        port = tcp.Port(0, None, reactor=_FakeReactor())
        port._realPortNumber = 1
        t = tcp.Server(server, _HalfCloseable(), ("127.0.0.1", 1), port, 7, _FakeReactor())
        _require(hasattr(t, "logstr") and hasattr(t, "repstr"), "tcp.Server has no logstr or repstr")
        shareServerNames(t, "Probe,server", "<Probe on 1>")
        _require(
            t.logPrefix() == "Probe,server" and repr(t) == "<Probe on 1>",
            "tcp.Server's logPrefix() and repr() no longer answer logstr and repstr",
        )
    finally:
        server.close()
        client.close()


class _ProbeAMP(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.states: List[tuple] = []
        self.boxes: List[dict] = []

    def ampBoxReceived(self, box) -> None:
        self.boxes.append(dict(box))

    def proto_key(self, string):
        state = super().proto_key(string)
        self.states.append(("key", string, state, self.MAX_LENGTH))
        return state

    def proto_value(self, string):
        state = super().proto_value(string)
        self.states.append(("value", string, state, self.MAX_LENGTH))
        return state


def checkAMP() -> None:
    """
    AMP's parser calls C{proto_key} and C{proto_value} with the states
    L{AMP_KEY_STATE} and L{AMP_VALUE_STATE}, sets C{MAX_LENGTH} for a value
    in C{proto_key}, and L{connectAMPQuietly} leaves what C{connectionLost}
    needs.
    """
    from twisted.internet.testing import StringTransport

    protocol = _ProbeAMP()
    connectAMPQuietly(protocol, StringTransport())
    protocol.dataReceived(amp.AmpBox(k=b"v").serialize())
    keys = [s for s in protocol.states if s[0] == "key"]
    values = [s for s in protocol.states if s[0] == "value"]
    _require(
        keys and keys[0][1:3] == (b"k", AMP_VALUE_STATE) and keys[0][3] >= 1,
        f"AMP's proto_key changed: {protocol.states}",
    )
    _require(values and values[0][1:3] == (b"v", AMP_KEY_STATE), f"AMP's proto_value changed: {protocol.states}")
    _require(protocol.boxes == [{b"k": b"v"}], f"AMP's parser did not deliver the box: {protocol.boxes}")
    # What AMP.connectionLost logs is what connectAMPQuietly keeps (read off
    # its code, so that the probe logs nothing).
    kept = {"_transportPeer", "_transportHost"}
    used = {n for n in amp.AMP.connectionLost.__code__.co_names if n.startswith("_transport")}
    _require(used <= kept and all(hasattr(protocol, n) for n in kept), f"AMP.connectionLost uses {used}")


# -- TLS (twisted.protocols.tls.TLSMemoryBIOProtocol) -----------------------
#
# Twisted's TLS layer has no half-close: an ssl: listener's connection is a
# TLSMemoryBIOProtocol, a ProtocolWrapper whose __getattr__ hands
# loseWriteConnection to the TCP transport under it (and startTLS on a TCP
# connection leaves loseWriteConnection the TCP one's): shutdown(SHUT_WR)
# beneath TLS, which the peer reads as a truncation (an unexpected EOF),
# not an end.  TLS's end of one direction is a close_notify alert.
# _tlsConnection is the pyOpenSSL Connection (None once connectionLost has
# run); its shutdown() queues a close_notify in the send BIO (and reports
# whether the peer's came already); _flushSendBIO() writes what the send
# BIO holds to the TCP transport, after what was written before.
# _handshakeDone is set once the handshake is over, and until then writes
# wait in _appSendBuffer.  BufferingTLSTransport (the class Twisted makes)
# holds writes under 64 KiB in _aggregator until the next reactor turn; its
# own loseConnection flushes it first, and so must a close_notify, or the
# alert would overtake what was written just before it, which OpenSSL then
# refuses to send.  Reading goes on after shutdown(): the peer's
# data still arrives, and its own close_notify (ZeroReturnError) makes
# Twisted close the connection, as it does for any close_notify.

# twisted.internet._sslverify.setupForALPN(context, protocols) is what
# OpenSSLCertificateOptions._makeContext calls, by that module-level name,
# on every context it makes: it sets an ALPN select callback that returns
# b"" when none of the client's protocols is acceptable, and always, when
# none is configured (as on every ssl: listener here).  pyOpenSSL reads b""
# as "fail the handshake": with recent pyOpenSSL and OpenSSL, every client
# that offers ALPN (curl, browsers, Go, Java) gets an internal_error alert.
# pyOpenSSL's NO_OVERLAPPING_PROTOCOLS is "go on without a protocol".

_alpnTolerated = False


def tolerateALPN() -> bool:
    """
    Make TLS servers with no application protocol configured complete the
    handshake of a client that offers some (ALPN), choosing none, as a
    TLS-terminating proxy must: Twisted's select callback fails it with
    recent pyOpenSSL (see above).  One configured with protocols still
    refuses a client offering none of them, as Twisted means.  Done once
    per process; whether it was (C{False} when this Twisted or pyOpenSSL
    lacks what it relies on, and nothing is changed).
    """
    global _alpnTolerated
    if _alpnTolerated:
        return True
    try:
        from OpenSSL import SSL
        from twisted.internet import _sslverify
    except ImportError:
        return False
    noOverlap = getattr(SSL, "NO_OVERLAPPING_PROTOCOLS", None)
    twistedSetup = getattr(_sslverify, "setupForALPN", None)
    protocolsOf = getattr(_sslverify, "protosFromProtocol", None)
    makeContext = getattr(_sslverify.OpenSSLCertificateOptions, "_makeContext", None)
    if (
        noOverlap is None
        or twistedSetup is None
        or protocolsOf is None
        or makeContext is None
        or "setupForALPN" not in makeContext.__code__.co_names
    ):
        return False

    def setupForALPN(context, acceptableProtocols):
        if acceptableProtocols:
            return twistedSetup(context, acceptableProtocols)

        def alpnSelect(connection, offered):
            protocols = protocolsOf(connection.get_app_data(), ())
            for protocol in protocols:
                if protocol in offered:
                    return protocol
            return noOverlap

        context.set_alpn_select_callback(alpnSelect)

    _sslverify.setupForALPN = setupForALPN
    _alpnTolerated = True
    return True


_TLS_SHUTDOWN_NAMES = frozenset({"_tlsConnection", "shutdown", "_flushSendBIO"})
_TLS_LOSE_NAMES = frozenset({"_handshakeDone", "_appSendBuffer"})


def tlsLayer(transport):
    """
    The TLS layer (a C{TLSMemoryBIOProtocol}) C{transport} writes through:
    itself for an C{ssl:} listener's connection, its C{protocol} for a TCP
    connection after C{startTLS}; C{None} for one without TLS.
    """
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    if isinstance(transport, TLSMemoryBIOProtocol):
        return transport
    layer = getattr(transport, "protocol", None)
    if getattr(transport, "TLS", False) and isinstance(layer, TLSMemoryBIOProtocol):
        return layer
    return None


def tlsCloseNotify(layer) -> bool:
    """
    End what C{layer} (a C{TLSMemoryBIOProtocol}) sends with a close_notify
    alert, after what was written before, and go on reading: TLS's
    half-close.  C{False} when it cannot now (the handshake is not over,
    writes wait for it, the connection is closing or gone): the caller
    closes the connection instead.
    """
    from OpenSSL.SSL import Error as TLSError

    connection = getattr(layer, "_tlsConnection", None)
    if (
        connection is None
        or not layer._handshakeDone
        or layer._appSendBuffer
        or layer.disconnecting
    ):
        return False
    aggregator = getattr(layer, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()  # what was written just before goes first
        connection = getattr(layer, "_tlsConnection", None)
        if connection is None or layer.disconnecting:
            return False
    try:
        connection.shutdown()
    except TLSError:
        return False
    layer._flushSendBIO()
    return True


def checkTLS() -> None:
    """
    The TLS layer's names L{tlsCloseNotify} uses mean what it relies on:
    Twisted's own shutdown uses them so, and its close waits on the same
    handshake and buffer state.
    """
    try:
        from twisted.protocols.tls import TLSMemoryBIOProtocol
    except ImportError:  # no TLS installed: nothing to half-close
        return
    used = set(TLSMemoryBIOProtocol._shutdownTLS.__code__.co_names)
    _require(_TLS_SHUTDOWN_NAMES <= used, f"TLSMemoryBIOProtocol._shutdownTLS uses {sorted(used)}")
    used = set(TLSMemoryBIOProtocol.loseConnection.__code__.co_names)
    _require(_TLS_LOSE_NAMES <= used, f"TLSMemoryBIOProtocol.loseConnection uses {sorted(used)}")
    _require(
        callable(getattr(TLSMemoryBIOProtocol, "_flushSendBIO", None)),
        "TLSMemoryBIOProtocol has no _flushSendBIO",
    )
    try:
        from twisted.protocols.tls import BufferingTLSTransport
    except ImportError:  # writes not held back: nothing to flush first
        return
    used = set(BufferingTLSTransport.loseConnection.__code__.co_names)
    _require(
        {"_aggregator", "flush"} <= used,
        f"BufferingTLSTransport.loseConnection uses {sorted(used)}",
    )


#: Every probe, in the order L{check} runs them.
PROBES = (checkTransport, checkListener, checkReactor, checkPort, checkLeanServer, checkAMP, checkTLS)


def check() -> None:
    """
    Run every probe; raise L{Changed} (or whatever a probe met) naming the
    first meaning that no longer holds.
    """
    for probe in PROBES:
        probe()


_usable: Optional[bool] = None


def fastPaths() -> bool:
    """
    Whether the fast paths may be used in this process: L{check} passed
    (run once; when it fails, one log line says which meaning changed and
    that Twisted's plain paths are used).
    """
    global _usable
    if _usable is None:
        try:
            check()
        except Exception as e:
            _usable = False
            log.warn(
                "Twisted {version} changed what twistedcluster's fast paths rely on "
                "({why}): using Twisted's plain reactor, writes, connects and "
                "accept logging, no splice (verified: Twisted {verified})",
                version=twisted.__version__,
                why=f"{type(e).__name__}: {e}",
                verified=", ".join(VERIFIED),
            )
        else:
            _usable = True
    return _usable


# -- PROXY protocol parsers (twisted.protocols.haproxy) ---------------------
#
# twisted.protocols.haproxy exports only proxyEndpoint, a wrapper that stands
# in for the transport (so no fast path, no half-close).  Its private modules
# hold the decoders: _v1parser.V1Parser.parse(line) decodes one complete v1
# line (without its CRLF), _v2parser.V2Parser.parse(header) one complete v2
# header (16 bytes and the announced length); both classmethods return a
# ProxyInfo with .source and .destination (IPv4Address, IPv6Address,
# UNIXAddress, or None for UNKNOWN/LOCAL/unspecified) and raise
# InvalidProxyHeader (or, for a v1 port that is not a number, ValueError).
# twistedcluster.wire.proxyheader frames the header itself and checks what
# they return.


def proxyParsers():
    """
    Twisted's v1 and v2 PROXY header parser classes, or C{None} when this
    Twisted has them no more (then C{haproxy:} listeners use Twisted's own
    wrapper, the slow path).
    """
    try:
        from twisted.protocols.haproxy._v1parser import V1Parser
        from twisted.protocols.haproxy._v2parser import V2Parser
    except ImportError:
        return None
    if not (callable(getattr(V1Parser, "parse", None)) and callable(getattr(V2Parser, "parse", None))):
        return None
    return V1Parser, V2Parser
