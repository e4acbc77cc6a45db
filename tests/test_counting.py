"""
CountingFactory over real loopback sockets: the count, and that the service's
protocol sees its transport and events as if it were not wrapped (plain TCP
and TLS).
"""

import socket

import pytest
import pytest_twisted
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocolFactory,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.python import log as legacyLog
from zope.interface import alsoProvides, implementer

from tests.certificates import loopbackTLS
from tests.loopback import listening, until
from twistedcluster.backend.counting import CountingFactory


class Recorder(Protocol):
    """
    Writes back what it gets; records what it was told.
    """

    def __init__(self, seen):
        self.seen = seen

    def connectionMade(self):
        self.seen.append(("made", ITCPTransport.providedBy(self.transport)))

    def dataReceived(self, data):
        self.seen.append(("data", data))
        self.transport.write(data)

    def connectionLost(self, reason):
        self.seen.append(("lost", type(reason.value).__name__))


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    def readConnectionLost(self):
        self.seen.append(("readLost",))
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        self.seen.append(("writeLost",))


@implementer(IHandshakeListener)
class Handshaker(Recorder):
    def handshakeCompleted(self):
        self.seen.append(("handshake",))


def counted(protocolClass):
    seen, changes = [], []
    factory = CountingFactory(
        Factory.forProtocol(lambda: protocolClass(seen)), lambda *change: changes.append(change)
    )
    return factory, seen, changes


def exchange(port, half):
    """
    Send, read the echo, end the input; what the server sends after that.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"ping")
        assert s.recv(10) == b"ping"
        s.shutdown(socket.SHUT_WR if half else socket.SHUT_RDWR)
        rest = b""
        while half:
            chunk = s.recv(100)
            if not chunk:
                break
            rest += chunk
        return rest


@pytest_twisted.ensureDeferred
async def test_counts_connections_and_the_service_gets_its_real_transport():
    factory, seen, changes = counted(Recorder)
    async with listening(factory) as port:
        assert await deferToThread(exchange, port, False) == b""
        await until(lambda: factory.count == 0 and len(changes) == 2, what="count back to 0")
        # It wrote: its close is a served one (the cost meter counts it).
        assert changes == [(1, True), (0, True)]
        assert seen[:2] == [("made", True), ("data", b"ping")]
        assert seen[-1][0] == "lost"


class Silent(Recorder):
    """
    Reads and never answers: a request whose client gave up waiting.
    """

    def dataReceived(self, data):
        self.seen.append(("data", data))


def giveUp(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"q\n")


@pytest_twisted.ensureDeferred
async def test_a_connection_the_service_never_wrote_to_closes_unserved():
    factory, seen, changes = counted(Silent)
    async with listening(factory) as port:
        await deferToThread(giveUp, port)
        await until(lambda: factory.count == 0 and len(changes) == 2, what="closed")
        assert changes == [(1, True), (0, False)]
        # The write hook is gone with the first write, from writeSequence too:
        # the next connection's service writes through the real transport.
        factory.wrappedFactory.protocol = lambda: Sequencer(seen)
        assert await deferToThread(exchange, port, False) == b""
        await until(lambda: factory.count == 0 and len(changes) == 4, what="closed")
        assert changes[2:] == [(1, True), (0, True)]
        assert seen.count(("hook gone", True)) == 1


class Sequencer(Recorder):
    def dataReceived(self, data):
        self.transport.writeSequence([data[:1], data[1:]])
        self.seen.append(("hook gone", "write" not in vars(self.transport)))


@pytest_twisted.ensureDeferred
async def test_end_of_input_closes_a_service_that_is_not_half_closeable():
    # Wrapped as if half-closeable, the end of input would go nowhere and the
    # connection would stay open.
    factory, seen, _ = counted(Recorder)
    async with listening(factory) as port:
        assert await deferToThread(exchange, port, True) == b""
        await until(lambda: factory.count == 0, what="closed")
        assert ("readLost",) not in seen


@pytest_twisted.ensureDeferred
async def test_a_half_closeable_service_is_told_of_the_end_of_input():
    factory, seen, _ = counted(HalfCloser)
    async with listening(factory) as port:
        assert await deferToThread(exchange, port, True) == b"bye"
        await until(lambda: factory.count == 0, what="closed")
        assert ("readLost",) in seen


@pytest_twisted.ensureDeferred
async def test_a_tls_service_is_told_of_the_handshake(tmp_path):
    description, context = loopbackTLS(tmp_path)
    factory, seen, changes = counted(Handshaker)

    def client(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"ping")
                return s.recv(10)

    async with listening(factory, description) as port:
        assert await deferToThread(client, port) == b"ping"
        await until(lambda: ("handshake",) in seen, what="handshake")
        await until(lambda: factory.count == 0, what="closed")
        assert changes == [(1, True), (0, True)]  # its write went through TLS


@pytest_twisted.ensureDeferred
async def test_close_all_aborts_what_is_open():
    factory, seen, _ = counted(Recorder)
    async with listening(factory) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            await until(lambda: factory.count == 1, what="connected")
            factory.closeAll()
            await until(lambda: factory.count == 0, what="aborted")
            assert seen[-1] == ("lost", "ConnectionAborted")


@pytest_twisted.ensureDeferred
async def test_a_service_factory_with_only_IProtocolFactory_can_listen():
    # --service accepts any IProtocolFactory provider: no logPrefix needed.
    @implementer(IProtocolFactory)
    class Bare:
        def buildProtocol(self, addr):
            return Recorder([])

        def doStart(self):
            pass

        def doStop(self):
            pass

    factory = CountingFactory(Bare())
    async with listening(factory) as port:
        assert await deferToThread(exchange, port, False) == b""
        await until(lambda: factory.count == 0, what="closed")


@pytest_twisted.ensureDeferred
async def test_the_legacy_log_context_names_the_service_protocol():
    # A service of one's own that logs with twisted.python.log gets its own
    # protocol's name as the event's system, as if it were not wrapped.
    systems = []

    def observer(event):
        if event.get("message") == ("service says hi",):
            systems.append(event["system"])

    class Named(Recorder):
        def dataReceived(self, data):
            legacyLog.msg("service says hi")
            super().dataReceived(data)

    factory, _, _ = counted(Named)
    legacyLog.addObserver(observer)
    try:
        async with listening(factory) as port:
            await deferToThread(exchange, port, False)
            assert systems and systems[0].startswith("Named,"), systems
    finally:
        legacyLog.removeObserver(observer)


class LateHalfCloser(Recorder):
    """
    Declares half-close only once connected.
    """

    def connectionMade(self):
        super().connectionMade()
        alsoProvides(self, IHalfCloseableProtocol)

    readConnectionLost = HalfCloser.readConnectionLost
    writeConnectionLost = HalfCloser.writeConnectionLost


@pytest_twisted.ensureDeferred
async def test_half_close_declared_in_connectionMade_is_passed_on():
    factory, seen, _ = counted(LateHalfCloser)
    async with listening(factory) as port:
        assert await deferToThread(exchange, port, True) == b"bye"
        await until(lambda: factory.count == 0, what="closed")
        assert ("readLost",) in seen


@implementer(IHalfCloseableProtocol)
class FailsToStart(Recorder):
    def connectionMade(self):
        raise RuntimeError("connectionMade failed after setting things up")

    readConnectionLost = HalfCloser.readConnectionLost
    writeConnectionLost = HalfCloser.writeConnectionLost


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_a_service_whose_connectionMade_raised_still_gets_half_close():
    # Twisted logs the error and the connection carries on, as it would
    # unwrapped: the end of input still goes to readConnectionLost.
    factory, seen, _ = counted(FailsToStart)
    async with listening(factory) as port:
        assert await deferToThread(exchange, port, True) == b"bye"
        await until(lambda: factory.count == 0, what="closed")
        assert ("readLost",) in seen


# -- behind a proxy that sends a PROXY header (haproxy: listeners) -------------


class Peers(Protocol):
    """
    Echo, recording who the transport says the client is.
    """

    def __init__(self, seen):
        self.seen = seen

    def connectionMade(self):
        self.seen.append(("peer", self.transport.getPeer(), self.transport.getHost()))

    def dataReceived(self, data):
        self.transport.write(data)


def proxiedExchange(port, first, half=True, want=None):
    """
    Send C{first} (then end of input, if C{half}); read until the server
    closes, or C{want} bytes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(first)
        if half:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while want is None or len(got) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


@pytest_twisted.ensureDeferred
async def test_a_proxy_header_is_read_before_the_service_sees_anything():
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address

    from twistedcluster.backend.echo import Echo, echoFactory
    from twistedcluster.fast.internals import proxyParsers

    seen, counts = [], []

    class Both(Echo):
        def connectionMade(self):
            seen.append(("peer", self.transport.getPeer(), self.transport.getHost(), self._direct))
            super().connectionMade()
            seen.append(("direct", self._direct))

    inner = echoFactory()
    inner.protocol = Both
    factory = CountingFactory(
        inner, lambda count, served: counts.append(count), proxyParsers=proxyParsers(), clock=reactor
    )
    async with listening(factory) as port:
        header = b"PROXY TCP4 127.0.0.5 127.0.0.1 4444 80\r\n"
        got = await deferToThread(proxiedExchange, port, header + b"hello")
        assert got == b"hello"  # the echo, half-close and all, not the header
        assert seen[0] == (
            "peer", IPv4Address("TCP", "127.0.0.5", 4444), IPv4Address("TCP", "127.0.0.1", 80), False
        )
        assert seen[1] == ("direct", True)  # the echo's fast path
        await until(lambda: factory.count == 0)
        assert counts[:2] == [1, 0]


@pytest_twisted.ensureDeferred
async def test_a_bad_proxy_header_is_refused_counted_out_and_logged(logged):
    from twisted.internet import reactor

    from twistedcluster.fast.internals import proxyParsers

    seen = []
    factory = CountingFactory(
        Factory.forProtocol(lambda: Peers(seen)), proxyParsers=proxyParsers(), clock=reactor
    )
    async with listening(factory) as port:
        assert await deferToThread(proxiedExchange, port, b"PROXY TCP4 1.2.3.4\r\nhi", False) == b""
        await until(lambda: factory.count == 0)
        assert seen == []
        assert any("bad PROXY header" in line for line in logged)
        # The next one is served.
        v2 = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"  # LOCAL: the real addresses stand
        assert await deferToThread(proxiedExchange, port, v2 + b"ok", False, 2) == b"ok"
        assert seen[0][1].host == "127.0.0.1"


def test_a_proxy_header_that_never_comes_is_refused_in_time(logged):
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twistedcluster.fast.internals import proxyParsers

    clock = Clock()
    factory = CountingFactory(
        Factory.forProtocol(Protocol), proxyParsers=proxyParsers(), clock=clock, proxyHeaderTimeout=4
    )
    p = factory.buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    assert factory.count == 1
    clock.advance(4)
    assert t.disconnecting
    assert any("no PROXY header within 4" in line for line in logged)


def test_bytes_after_a_refused_header_are_dropped(logged):
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twistedcluster.fast.internals import proxyParsers

    factory = CountingFactory(Factory.forProtocol(Protocol), proxyParsers=proxyParsers(), clock=Clock())
    p = factory.buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(b"GARBAGE")
    assert t.disconnecting
    p.dataReceived(b"more, before the close")  # no error: dropped
    p.connectionLost(None)
    assert factory.count == 0
