"""
The PROXY protocol through the proxy listener: sent to backends
(C{sendProxy}), read from clients (C{haproxy:} listeners), on real loopback
sockets; the fast path and splice stay in use.  Refusals are unit tested
with a memory reactor.
"""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.internet.threads import deferToThread

from twistedcluster.backend.echo import echoFactory
from twistedcluster.balancer import relay as relaying
from twistedcluster.balancer.proxy import ProxyFactory
from twistedcluster.core.cluster import Cluster
from twistedcluster.fast.internals import proxyParsers
from twistedcluster.wire.proxyheader import HeaderReader, v1Header

from .loopback import until

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


class Recorder(Protocol):
    """
    A backend that keeps what it got and answers "ok" to the first chunk.
    """

    def connectionMade(self):
        self.factory.made.append(self)
        self.got = b""

    def dataReceived(self, data):
        if not self.got:
            self.transport.write(b"ok")
        self.got += data


def recorderFactory():
    f = Factory.forProtocol(Recorder)
    f.made = []
    return f


class Balancer:
    def __init__(self):
        self.ports = []

    async def start(self, backendFactory, **kw):
        self.cluster = Cluster()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(backendFactory)
        self.ports.append(port)
        self.cluster.pool.register("b0", "127.0.0.1", port.getHost().port, capacity=100)
        self.factory = ProxyFactory(self.cluster, reactor, **kw)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.ports.append(port)
        self.port = port.getHost().port
        return self

    async def stop(self):
        for p in self.ports:
            await defer.maybeDeferred(p.stopListening)


@pytest.fixture
def balancer():
    b = Balancer()
    yield b
    pytest_twisted.blockon(defer.ensureDeferred(b.stop()))


def talk(port, first, source="127.0.0.5", want=2):
    """
    From C{source}: send C{first}, read C{want} bytes; the client's port
    and the socket.
    """
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(first)
    got = b""
    while len(got) < want:
        chunk = s.recv(want - len(got))
        if not chunk:
            break
        got += chunk
    return s.getsockname()[1], got, s


def decoded(data):
    return HeaderReader(proxyParsers()).feed(data)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_send_proxy_names_the_client_first_on_the_fast_path(balancer, version):
    backends = recorderFactory()
    await balancer.start(backends, sendProxy=version)
    clientPort, answer, s = await deferToThread(talk, balancer.port, b"hello")
    try:
        assert answer == b"ok"
        [backend] = backends.made
        await until(lambda: backend.got.endswith(b"hello"), what="the request")
        assert backend.got.startswith(b"PROXY TCP4 " if version == "v1" else SIG + b"\x21\x11")
        proxied, rest = decoded(backend.got)
        assert (proxied.source.host, proxied.source.port) == ("127.0.0.5", clientPort)
        assert (proxied.destination.host, proxied.destination.port) == ("127.0.0.1", balancer.port)
        assert rest == b"hello"
        # Both sides still relay through the fast path.
        [client] = balancer.factory.clients
        assert client._direct and client.peer._direct
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_a_header_received_is_passed_on_and_the_relay_stays_fast(balancer):
    backends = recorderFactory()
    await balancer.start(backends, sendProxy="v2", proxyParsers=proxyParsers())
    first = b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\nhello"
    clientPort, answer, s = await deferToThread(talk, balancer.port, first)
    try:
        assert answer == b"ok"
        [backend] = backends.made
        await until(lambda: backend.got.endswith(b"hello"), what="the request")
        proxied, rest = decoded(backend.got)
        assert (proxied.source.host, proxied.source.port) == ("203.0.113.7", 40000)
        assert (proxied.destination.host, proxied.destination.port) == ("198.51.100.1", 443)
        assert rest == b"hello"
        [client] = balancer.factory.clients
        assert client.transport.getPeer() == IPv4Address("TCP", "203.0.113.7", 40000)
        assert client._direct and client.peer._direct
        assert "dataReceived" not in client.__dict__  # the header reader is gone
    finally:
        s.close()


def bulkThroughHeader(port, header, size):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    payload = bytes(range(256)) * (size // 256)
    import threading

    got = bytearray()

    def reader():
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(header + payload)
    t.join(60)
    return s, bytes(got) == payload


@pytest.mark.skipif(not relaying.SPLICE, reason="splice(2) is Linux only")
@pytest_twisted.ensureDeferred
async def test_behind_another_proxy_bulk_still_moves_to_splice(balancer):
    await balancer.start(echoFactory(), proxyParsers=proxyParsers())
    header = v1Header(IPv4Address("TCP", "203.0.113.9", 1), IPv4Address("TCP", "127.0.0.1", 2))
    s, same = await deferToThread(bulkThroughHeader, balancer.port, header, 16 * 1024 * 1024)
    try:
        assert same
        [client] = balancer.factory.clients
        assert client._splicer is not None and client.peer._splicer is not None
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_garbage_is_refused_logged_and_the_next_client_served(balancer, logged):
    await balancer.start(echoFactory(), proxyParsers=proxyParsers())

    def refused():
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            return s.recv(100)

    assert await deferToThread(refused) == b""
    assert any("bad PROXY header" in line and "does not start" in line for line in logged)
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\r\n"
    _, answer, s = await deferToThread(talk, balancer.port, header + b"hi")
    s.close()
    assert answer == b"hi"


def memoryClient(factory):
    proto = factory.buildProtocol(("127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
    proto.makeConnection(transport)
    return proto, transport


def test_no_backend_before_the_header_and_a_late_header_is_refused(logged):
    mr = MemoryReactorClock()
    cluster = Cluster()
    cluster.pool.register("b", "127.0.0.1", 9001, capacity=10)
    factory = ProxyFactory(cluster, mr, proxyParsers=proxyParsers(), proxyHeaderTimeout=3)
    proto, transport = memoryClient(factory)
    proto.dataReceived(b"PROXY TCP4 1.2.3.4")
    assert mr.tcpClients == []
    mr.advance(3)
    assert transport.disconnecting
    assert any("no PROXY header within 3" in line and "10.0.0.1" in line for line in logged)


def test_a_header_in_pieces_then_the_route_uses_the_client_for_hash():
    mr = MemoryReactorClock()
    cluster = Cluster(policy="hash")
    cluster.pool.register("b", "127.0.0.1", 9001, capacity=10)
    factory = ProxyFactory(cluster, mr, proxyParsers=proxyParsers(), sendProxy="v1")
    proto, transport = memoryClient(factory)
    for byte in b"PROXY TCP6 2001:db8::7 ::1 7 80\r\nearly":
        proto.dataReceived(bytes([byte]))
    assert len(mr.tcpClients) == 1
    assert transport.getPeer().host == "2001:db8::7"
    assert not any(c.active() for c in mr.getDelayedCalls())  # no header deadline left


def test_end_of_input_before_the_header_is_refused(logged):
    mr = MemoryReactorClock()
    cluster = Cluster()
    cluster.pool.register("b", "127.0.0.1", 9001, capacity=10)
    factory = ProxyFactory(cluster, mr, proxyParsers=proxyParsers())
    proto, transport = memoryClient(factory)
    proto.readConnectionLost()
    assert transport.disconnecting
    assert any("end of input before it" in line for line in logged)


def test_read_waiting_takes_what_the_client_sent_and_nothing_else():
    from twistedcluster.fast.transports import readWaiting

    class Handle:
        def __init__(self, sock):
            self.sock = sock

        def getHandle(self):
            return self.sock

    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        t = Handle(a)
        assert readWaiting(t) == b""  # nothing yet: no wait
        b.sendall(b"first bytes")
        assert readWaiting(t) == b"first bytes"
        b.close()
        assert readWaiting(t) == b""  # the end is left for the reactor to see
        assert readWaiting(t) == b""
    finally:
        a.close()


@pytest_twisted.ensureDeferred
async def test_the_header_and_bytes_already_sent_go_in_one_send(balancer, monkeypatch):
    from twistedcluster.balancer import proxy as proxying

    sends = []
    real = proxying.sendNow

    def counting(transport, data):
        sends.append(data)
        real(transport, data)

    monkeypatch.setattr(proxying, "sendNow", counting)
    waiting = []
    realRead = proxying.readWaiting

    def reading(transport):
        # The client's bytes are surely there: wait for them (bounded).
        import select

        select.select([transport.getHandle()], [], [], 5)
        data = realRead(transport)
        waiting.append(data)
        return data

    monkeypatch.setattr(proxying, "readWaiting", reading)
    backends = recorderFactory()
    await balancer.start(backends, sendProxy="v2")
    _, answer, s = await deferToThread(talk, balancer.port, b"hello")
    s.close()
    assert answer == b"ok" and waiting == [b"hello"]
    assert len(sends) == 1 and sends[0].startswith(SIG) and sends[0].endswith(b"hello")


def test_a_static_backend_of_its_own_gets_its_own_header_version():
    from tests.test_proxy import completeConnect

    mr = MemoryReactorClock()
    cluster = Cluster(policy="round-robin")
    cluster.pool.register("127.0.0.1:9001", "127.0.0.1", 9001, capacity=10)
    cluster.pool.register("127.0.0.1:9002", "127.0.0.1", 9002, capacity=10)
    factory = ProxyFactory(cluster, mr, sendProxyFor={"127.0.0.1:9001": "v1"})
    got = {}
    for i in range(2):
        proto, transport = memoryClient(factory)
        backend, backendT = completeConnect(mr, i)
        got[mr.tcpClients[i][1]] = backendT.value()
    assert got[9001].startswith(b"PROXY TCP4 10.0.0.1 ")
    assert got[9002] == b""


def test_the_backend_option_takes_a_send_proxy_setting():
    from twisted.python import usage

    from twistedcluster.balancer.service import Options

    o = Options()
    o.parseOptions(["--backend=127.0.0.1:9001,send-proxy=v2", "--backend=[::1]:9002"])
    assert [(b.host, b.port, b.sendProxy) for b in o["backends"]] == [
        ("127.0.0.1", 9001, "v2"),
        ("::1", 9002, None),
    ]
    assert o["backend-send-proxy"] == {"127.0.0.1:9001": "v2"}
    for bad in ("127.0.0.1:9001,send-proxy=v3", "127.0.0.1:9001,colour=blue"):
        with pytest.raises(usage.UsageError) as e:
            Options().parseOptions([f"--backend={bad}"])
        assert "--backend" in str(e.value)


def sendAll(port, data, want):
    """
    Send C{data} at once and keep the connection open until the balancer
    has read it all (the backend is checked from the test).
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    return s


@pytest_twisted.ensureDeferred
async def test_bytes_after_a_received_header_keep_their_order_when_a_header_is_sent(balancer):
    # A header read with the first bytes after it (rest) while more of the
    # client's bytes wait in the socket: the backend, connected at once over
    # loopback, must get rest before those (not readWaiting's bytes first).
    backends = recorderFactory()
    await balancer.start(backends, sendProxy="v1", proxyParsers=proxyParsers())
    header = b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n"
    payload = bytes(range(256)) * (512 * 1024 // 256)
    s = await deferToThread(sendAll, balancer.port, header + payload, len(payload))
    try:
        await until(lambda: backends.made and len(backends.made[0].got) > len(payload),
                    what="the payload at the backend")
        [backend] = backends.made
        proxied, rest = decoded(backend.got)
        assert (proxied.source.host, proxied.source.port) == ("203.0.113.7", 40000)
        assert len(rest) == len(payload)
        assert rest == payload
    finally:
        s.close()


def test_a_static_backend_removed_and_added_again_loses_its_old_send_proxy():
    # --backend web=...,send-proxy=v2, then cluster-admin remove web and
    # cluster-admin add web (another address, no send-proxy: add cannot
    # give one): the new web must get no PROXY header, neither from the
    # proxy nor from its health checks.
    from tests.test_proxy import completeConnect
    from twistedcluster.balancer.service import Options, _DrainOnStop, makeService
    from twistedcluster.balancer.staticbackend import makeStaticBackend

    o = Options()
    o.parseOptions(["--backend=web=127.0.0.1:9001,send-proxy=v2"])
    mr = MemoryReactorClock()
    top = makeService(o, reactor=mr)
    [factory] = [s.factory for s in top if isinstance(s, _DrainOnStop)]
    statics = top.statics
    assert factory.sendProxyFor == {"web": "v2"}
    statics.remove("web")
    statics.add(makeStaticBackend("web", "127.0.0.1", 9002))
    assert statics.probeFactoryFor("web").sendProxy is None
    top.cluster.pool.register("web", "127.0.0.1", 9002, capacity=10, static=True)
    proto, transport = memoryClient(factory)
    backend, backendT = completeConnect(mr, len(mr.tcpClients) - 1)
    assert mr.tcpClients[-1][1] == 9002
    assert backendT.value() == b""


@pytest_twisted.ensureDeferred
async def test_a_client_reset_before_its_backend_connects_is_passed_on_as_a_reset(balancer):
    # With a header to send, _connected reads what the client sent already
    # (readWaiting): a reset found there must not be swallowed (the socket
    # reports it once), or the backend sees a clean end, and the access log
    # client_closed.
    import struct

    backends = recorderFactory()
    ended = []

    class Ends(Recorder):
        def connectionLost(self, reason):
            ended.append(reason.value)

    backends.protocol = Ends
    await balancer.start(backends, sendProxy="v1")
    s = socket.create_connection(("127.0.0.1", balancer.port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # a reset, before the balancer has even accepted
    await until(lambda: ended, what="the backend connection's end")
    traffic = balancer.factory.traffic
    await until(lambda: traffic.ended, what="the client's end")
    assert list(traffic.ended) == [("proxy", "client_reset")]
    from twisted.internet.error import ConnectionDone

    assert not isinstance(ended[0], ConnectionDone)


def test_every_header_refusal_is_refused_bad_header_in_the_access_log(logged):
    # Garbage, a late header and end of input before it are all logged as
    # a bad PROXY header: the metrics and the access log must say so too.
    mr = MemoryReactorClock()
    cluster = Cluster()
    cluster.pool.register("b", "127.0.0.1", 9001, capacity=10)
    factory = ProxyFactory(cluster, mr, proxyParsers=proxyParsers(), proxyHeaderTimeout=3)
    for end in ("garbage", "late", "eof"):
        proto, transport = memoryClient(factory)
        if end == "garbage":
            proto.dataReceived(b"GET / HTTP/1.1\r\n")
        elif end == "late":
            mr.advance(3)
        else:
            proto.dataReceived(b"PROXY TCP4 ")
            proto.readConnectionLost()
        assert transport.disconnecting
        proto.connectionLost(Failure(ConnectionDone()))
    assert factory.traffic.ended == {("proxy", "refused_bad_header"): 3}


@pytest_twisted.ensureDeferred
async def test_bytes_read_with_the_header_count_as_the_clients(balancer, monkeypatch):
    # The client's first bytes, read at once to go out with the PROXY
    # header, are bytes it sent: counted for the access log and metrics.
    from twistedcluster.balancer import proxy as proxying

    realRead = proxying.readWaiting
    waiting = []

    def reading(transport):
        import select

        select.select([transport.getHandle()], [], [], 5)  # surely there
        data = realRead(transport)
        waiting.append(data)
        return data

    monkeypatch.setattr(proxying, "readWaiting", reading)
    backends = recorderFactory()
    await balancer.start(backends, sendProxy="v1")
    _, answer, s = await deferToThread(talk, balancer.port, b"hello")
    s.close()
    assert answer == b"ok" and waiting == [b"hello"]
    traffic = balancer.factory.traffic
    await until(lambda: traffic.ended, what="the client's end")
    assert traffic.bytes["b0"] == [len(b"hello"), len(b"ok")]
