"""
twistedcluster.fast.fasttcp on real loopback sockets and the real reactor: the
outgoing connection (connect, refusal, timeout, abandon, IPv6) and the
at-once send, half-close and close, each against what Twisted itself would
have done.
"""

import socket
from contextlib import contextmanager

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedcluster.fast import internals
from twistedcluster.fast.transports import unsentBytes
from twistedcluster.fast.fasttcp import (
    Dialled,
    loseConnectionNow,
    loseWriteConnectionNow,
    plainTCP,
    prepare,
    prepareListener,
    readNow,
    sendNow,
)


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """
    Records what happens to it; C{made} and C{lost} fire.
    """

    def __init__(self):
        self.data = b""
        self.made = defer.Deferred()
        self.lost = defer.Deferred()
        self.readDone = defer.Deferred()
        self.writeDone = False

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.readDone.callback(self.data)

    def writeConnectionLost(self):
        self.writeDone = True

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(reason.value)


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


async def until(predicate, timeout=5.0):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition not met in time"
        await deferLater(reactor, 0.01, lambda: None)


def dial(port, protocol, host="127.0.0.1", timeout=5.0):
    failures = []
    conn = Dialled(reactor, host, port, protocol, timeout, failures.append)
    conn.dial()
    return conn, failures


@contextmanager
def fullListener(fillers=1):
    """
    A listener whose accept queue is full: it drops further SYNs, so a
    connect to it neither succeeds nor fails until something is accepted
    (then the SYN the kernel sends again, about a second later, gets in).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    try:
        for _ in range(fillers):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            queued.append(f)
        yield listener, port
    finally:
        for f in queued:
            f.close()
        listener.close()


@pytest.fixture
def servers():
    ports = []
    yield ports
    for p in ports:
        p.stopListening()


async def listen(servers, factory, endpoint=None):
    port = await (endpoint or TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")).listen(factory)
    servers.append(port)
    return port.getHost().port


async def dialledPair(servers):
    """
    A dialled connection, its protocol and the Recorder at the far end.
    """
    received = []

    class Collect(Recorder):
        def connectionMade(self):
            received.append(self)

    port = await listen(servers, Factory.forProtocol(Collect))
    proto = Recorder()
    conn, _ = dial(port, proto)
    await proto.made
    await until(lambda: received)
    [far] = received
    return conn, proto, far


@pytest_twisted.ensureDeferred
async def test_a_dialled_connection_is_a_plain_tcp_transport(servers):
    port = await listen(servers, Factory.forProtocol(Echo))
    proto = Recorder()
    conn, failures = dial(port, proto)
    # Over loopback the handshake is over inside connect(): the protocol is
    # connected before dial() returns, with no connect timeout armed.
    assert proto.made.called and conn.connected
    assert conn._timeoutCall is None
    assert plainTCP(conn) and not failures
    assert conn.getPeer().port == port and conn.getPeer().host == "127.0.0.1"
    assert conn.getHost().host == "127.0.0.1" and conn.getHost().port > 0
    conn.write(b"hello")
    await until(lambda: proto.data == b"hello")
    conn.loseConnection()
    await proto.lost
    assert proto.reason.check(ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_a_connect_still_under_way_completes_on_a_later_turn():
    with fullListener() as (listener, port):
        proto = Recorder()
        conn, failures = dial(port, proto, timeout=30)
        # The SYN was dropped: dial() returned with the connect under way.
        assert not proto.made.called and not conn.connected
        assert conn._timeoutCall is not None and conn._timeoutCall.active()
        listener.setblocking(False)
        accepted = []

        def acceptAll():
            try:
                while True:
                    accepted.append(listener.accept()[0])
            except BlockingIOError:
                pass
            return proto.made.called

        await until(acceptAll, timeout=15)
        assert conn.connected and not failures
        # The timeout is cancelled once connected.
        assert conn._timeoutCall is None
        conn.write(b"late")
        [server] = [a for a in accepted if a.getpeername() == conn.socket.getsockname()]
        server.setblocking(False)
        got = []

        def received():
            try:
                got.append(server.recv(10))
            except BlockingIOError:
                pass
            return b"".join(got) == b"late"

        await until(received)
        conn.loseConnection()
        await proto.lost
        for a in accepted:
            a.close()


@pytest_twisted.ensureDeferred
async def test_a_dialled_connection_over_ipv6(servers):
    try:
        port = await listen(servers, Factory.forProtocol(Echo), TCP6ServerEndpoint(reactor, 0, interface="::1"))
    except Exception as e:  # pragma: no cover - a machine without ::1
        pytest.skip(f"no IPv6 loopback: {e}")
    proto = Recorder()
    conn, failures = dial(port, proto, host="::1")
    await proto.made
    assert conn.getPeer().host == "::1"
    sendNow(conn, b"six")
    await until(lambda: proto.data == b"six")
    conn.loseConnection()
    await proto.lost


@pytest_twisted.ensureDeferred
async def test_a_refused_connect_is_reported_and_never_connects():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    proto = Recorder()
    conn, failures = dial(port, proto)
    await until(lambda: failures)
    [reason] = failures
    assert reason.check(ConnectionRefusedError), reason
    assert not proto.made.called and not proto.lost.called
    assert conn.disconnected and conn.socket.fileno() == -1


@pytest_twisted.ensureDeferred
async def test_a_connect_that_hangs_times_out():
    with fullListener(fillers=4) as (listener, port):
        proto = Recorder()
        started = reactor.seconds()
        conn, failures = dial(port, proto, timeout=0.3)
        await until(lambda: failures, timeout=10)
        [reason] = failures
        if not reason.check(TimeoutError):
            pytest.skip(f"this kernel did not leave the connect hanging: {reason.value}")
        assert reactor.seconds() - started >= 0.25
        assert not proto.made.called
        assert conn.disconnected


@pytest_twisted.ensureDeferred
async def test_an_abandoned_connect_reports_nothing():
    with fullListener() as (listener, port):
        proto = Recorder()
        conn, failures = dial(port, proto)
        assert not conn.connected
        conn.abandon()
        assert conn.disconnected and conn.socket.fileno() == -1
        assert conn._timeoutCall is None
        # A second abandon, or the reactor, does nothing more.
        conn.abandon()
        await deferLater(reactor, 0.1, lambda: None)
        assert not failures and not proto.made.called and not proto.lost.called


@pytest_twisted.ensureDeferred
async def test_abandoning_a_connected_connection_does_nothing(servers):
    port = await listen(servers, Factory.forProtocol(Echo))
    proto = Recorder()
    conn, failures = dial(port, proto)
    assert conn.connected
    conn.abandon()
    assert conn.connected and not proto.lost.called
    conn.loseConnection()
    await proto.lost


@pytest_twisted.ensureDeferred
async def test_close_now_runs_connection_lost_before_returning(servers):
    port = await listen(servers, Factory.forProtocol(Recorder))
    proto = Recorder()
    conn, _ = dial(port, proto)
    await proto.made
    prepare(conn)
    loseConnectionNow(conn)
    assert proto.lost.called
    await proto.lost
    assert proto.reason.check(ConnectionDone)
    assert not conn.connected


@pytest_twisted.ensureDeferred
async def test_close_now_with_bytes_queued_sends_them_first(servers):
    conn, proto, far = await dialledPair(servers)
    far.transport.pauseProducing()  # the far end stops reading
    payload = b"q" * (8 * 1024 * 1024)
    conn.write(payload)  # queued in Twisted: more than the kernel takes
    assert unsentBytes(conn) > 0
    loseConnectionNow(conn)
    assert not proto.lost.called  # it waits for the queue, like loseConnection
    far.transport.resumeProducing()
    await proto.lost
    assert await far.readDone == payload
    far.transport.loseConnection()
    await far.lost


@pytest_twisted.ensureDeferred
async def test_half_close_now_shuts_the_write_side_at_once(servers):
    conn, proto, far = await dialledPair(servers)
    sendNow(conn, b"all of it")
    loseWriteConnectionNow(conn)
    assert proto.writeDone  # before returning
    assert await far.readDone == b"all of it"
    # The other direction still works.
    far.transport.write(b"reply")
    await until(lambda: proto.data == b"reply")
    far.transport.loseConnection()
    await proto.readDone
    conn.loseConnection()
    await proto.lost


@pytest_twisted.ensureDeferred
async def test_half_close_now_with_bytes_queued_sends_them_first(servers):
    conn, proto, far = await dialledPair(servers)
    payload = b"z" * (8 * 1024 * 1024)
    conn.write(payload)
    loseWriteConnectionNow(conn)
    assert not proto.writeDone  # Twisted's own half-close, after the queue
    assert await far.readDone == payload
    await until(lambda: proto.writeDone)
    conn.loseConnection()
    await proto.lost


@pytest_twisted.ensureDeferred
async def test_prepare_sets_no_delay_and_plain_tcp_excludes_other_transports(servers):
    port = await listen(servers, Factory.forProtocol(Recorder))
    proto = Recorder()
    conn, _ = dial(port, proto)
    await proto.made
    assert not conn.getTcpNoDelay()
    prepare(conn)
    assert conn.getTcpNoDelay()
    assert conn._shouldShutdown is False
    conn.loseConnection()
    await proto.lost

    from twisted.internet.testing import StringTransport

    assert not plainTCP(StringTransport())


@pytest_twisted.ensureDeferred
async def test_a_prepared_listener_accepts_sockets_with_no_delay_already(servers):
    # Linux copies the listener's TCP_NODELAY to what it accepts: prepare()
    # then leaves it (one setsockopt fewer), and the lean accept gives
    # Twisted an ordinary socket.
    accepted = []

    class Keep(Recorder):
        def connectionMade(self):
            accepted.append(self)

    port = await listen(servers, Factory.forProtocol(Keep))
    prepareListener(servers[-1])
    assert type(servers[-1].socket).__name__ == "LeanListeningSocket"
    client = socket.create_connection(("127.0.0.1", port))
    try:
        await until(lambda: accepted)
        transport = accepted[0].transport
        assert type(transport.socket) is socket.socket
        # The lean server: Twisted's names, made when asked for.
        assert type(transport) is internals.LeanServer and plainTCP(transport)
        assert "logstr" not in vars(transport) and "repstr" not in vars(transport)
        assert transport.logPrefix() == f"Keep,{transport.sessionno},127.0.0.1"
        assert repr(transport) == f"<Keep #{transport.sessionno} on {port}>"
        assert transport.getTcpNoDelay()
        prepare(transport)
        assert transport.getTcpNoDelay() and transport._shouldShutdown is False
        client.sendall(b"through")
        await until(lambda: accepted[0].data == b"through")
    finally:
        client.close()
    await bounded(accepted[0].readDone)
    transport.loseConnection()
    await bounded(accepted[0].lost)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("abort", [False, True], ids=["close", "abort"])
async def test_a_lean_server_closes_as_twisteds_does(servers, abort):
    # LeanConnection.connectionLost: a close is an end-of-file to the
    # client, an abort a reset (SO_LINGER 0), and the protocol is told
    # once, with the reason.
    accepted = []

    class Keep(Recorder):
        def connectionMade(self):
            accepted.append(self)

        def connectionLost(self, reason):
            self.reason = reason
            Recorder.connectionLost(self, reason)

    port = await listen(servers, Factory.forProtocol(Keep))
    prepareListener(servers[-1])
    client = socket.create_connection(("127.0.0.1", port))
    client.settimeout(10)
    try:
        await until(lambda: accepted)
        transport = accepted[0].transport
        assert type(transport) is internals.LeanServer
        transport.write(b"bye")
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()
        await bounded(accepted[0].lost)
        assert transport.disconnected and not transport.connected
        assert "socket" not in vars(transport) and "protocol" not in vars(transport)
        if abort:
            assert accepted[0].reason.check(ConnectionAborted)
            with pytest.raises(ConnectionResetError):
                await deferToThread(lambda: [client.recv(100) for _ in range(3)])
        else:
            assert accepted[0].reason.check(ConnectionDone)
            got = await deferToThread(client.recv, 100)
            assert got == b"bye" and await deferToThread(client.recv, 100) == b""
        transport.connectionLost(Failure(ConnectionDone()))  # a second call: nothing
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_send_that_meets_a_reset_ends_the_connection_as_lost(servers):
    # The far end resets while this side is not reading. The send that
    # meets the reset is the only call that hears of it: a read after it
    # would find a clean end of file. So sendNow ends the connection as
    # lost, and the protocol never hears of a clean end.
    conn, proto, far = await dialledPair(servers)
    conn.stopReading()
    far.transport.abortConnection()
    await bounded(far.lost)
    sendNow(conn, b"x" * 10)
    conn.startReading()
    reason = await bounded(proto.lost)
    assert not isinstance(reason, ConnectionDone), reason
    assert not proto.readDone.called


def bounded(d, seconds=10.0):
    return d.addTimeout(seconds, reactor)


@pytest_twisted.ensureDeferred
async def test_read_now_reads_what_is_there_and_leaves_the_end_of_file(servers):
    conn, proto, far = await dialledPair(servers)
    assert readNow(conn) is None  # nothing sent yet
    far.transport.write(b"first")
    await until(lambda: proto.data == b"first")  # the reactor read it
    conn.stopReading()  # from here on only readNow reads
    far.transport.write(b"second")
    got = None
    for _ in range(100):
        got = readNow(conn)
        if got is not None:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert got == b"second"
    far.transport.loseConnection()
    await bounded(far.lost)
    assert readNow(conn) is None  # end of file is left for the reactor
    conn.startReading()
    await bounded(proto.readDone)  # ...which sees it
    conn.loseConnection()
    await bounded(proto.lost)


@pytest_twisted.ensureDeferred
async def test_read_now_turns_an_error_into_a_reset(servers):
    conn, proto, far = await dialledPair(servers)
    conn.stopReading()
    far.transport.abortConnection()  # RST
    await bounded(far.lost)
    await until(lambda: readNow(conn) is None and conn._aborting)
    reason = await bounded(proto.lost)
    assert isinstance(reason, ConnectionAborted)


@pytest_twisted.ensureDeferred
async def test_a_dialled_socket_is_made_non_blocking(servers):
    conn, proto, far = await dialledPair(servers)
    assert conn.socket.gettimeout() == 0.0
    assert conn.socket.getblocking() is False
    conn.loseConnection()
    await bounded(proto.lost)


@pytest_twisted.ensureDeferred
async def test_close_now_after_the_write_side_is_shut_down(servers):
    # Both ways done, the write side shut down already: closed at once,
    # cleanly, as Twisted's loseConnection would.
    conn, proto, far = await dialledPair(servers)
    loseWriteConnectionNow(conn)
    assert proto.writeDone
    loseConnectionNow(conn)
    assert proto.lost.called
    assert isinstance(await bounded(proto.lost), ConnectionDone)
    loseConnectionNow(conn)  # closed already: nothing happens
    await bounded(far.readDone)


def linkLocalAddress():
    """
    A link-local IPv6 address of this machine, with its scope
    (fe80::...%eth0), or None.
    """
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexAddr, _, _, scope, _, name = line.split()
                if scope == "20":  # link scope
                    groups = [hexAddr[i : i + 4] for i in range(0, 32, 4)]
                    packed = socket.inet_pton(socket.AF_INET6, ":".join(groups))
                    return f"{socket.inet_ntop(socket.AF_INET6, packed)}%{name}"
    except OSError:
        pass
    return None


@pytest_twisted.ensureDeferred
async def test_a_scoped_ipv6_address_is_dialled_with_its_scope(servers):
    # fe80::...%eth0: without the scope id the kernel cannot tell which
    # link is meant, and the connect fails with EINVAL.
    address = linkLocalAddress()
    if address is None:
        pytest.skip("no link-local IPv6 address here")
    try:
        port = await listen(servers, Factory.forProtocol(Echo), TCP6ServerEndpoint(reactor, 0, interface=address))
    except Exception as e:  # pragma: no cover - IPv6 disabled on the link
        pytest.skip(f"cannot listen on {address}: {e}")
    proto = Recorder()
    conn, failures = dial(port, proto, host=address)
    await until(lambda: proto.made.called or failures)
    assert not failures, failures[0].getErrorMessage()
    sendNow(conn, b"scoped")
    await until(lambda: proto.data == b"scoped")
    conn.loseConnection()
    await proto.lost


@pytest_twisted.ensureDeferred
async def test_an_aborted_connection_is_not_half_closed_or_written_afterwards(servers):
    # abortConnection() resets on the next turn; a half-close or a send in
    # between must not turn that reset into a clean end, or add bytes.
    conn, proto, far = await dialledPair(servers)
    conn.abortConnection()
    sendNow(conn, b"after the abort")
    loseWriteConnectionNow(conn)
    loseConnectionNow(conn)
    reason = await far.lost
    assert isinstance(reason, ConnectionLost), reason
    assert far.data == b"" and not far.readDone.called
    await proto.lost
    assert proto.reason.check(ConnectionAborted)
