"""
Proxy mode.  First the wiring, with a MemoryReactor and string transports
(as Twisted's own portforward test does); then real relays on loopback.
"""

import fcntl
import os
import socket
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedcluster.core.cluster import Cluster
from twistedcluster.backend.echo import echoFactory
from twistedcluster.balancer import proxy
from twistedcluster.balancer import relay as relaying
from twistedcluster.balancer.proxy import ProxyFactory
from tests.loopback import until
from twistedcluster.fast.fasttcp import prepareListener
from twistedcluster.localcluster import echoOnce


def clusterOf(*ports):
    c = Cluster()
    for p in ports:
        c.pool.register(f"b{p}", "127.0.0.1", p, capacity=10)
    return c


def startClient(factory):
    proto = factory.buildProtocol(("127.0.0.1", 5555))
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


class HalfClosingTransport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


def completeConnect(memreactor, index=0):
    host, port, wrapping, timeout, bind = memreactor.tcpClients[index]
    backend = wrapping.buildProtocol(None)
    transport = HalfClosingTransport()
    backend.makeConnection(transport)
    return backend, transport


def failConnect(memreactor, index=0):
    host, port, wrapping, timeout, bind = memreactor.tcpClients[index]
    wrapping.clientConnectionFailed(memreactor.connectors[index], Failure(ConnectionRefusedError()))
    return port


def test_early_bytes_and_eof_wait_for_the_backend_then_producers_both_ways():
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    proxy, clientT = startClient(ProxyFactory(cluster, mr, connectTimeout=1.5))
    host, port, _, timeout, _ = mr.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 9001, 1.5)
    # The client talks, and even half-closes, before the backend is there.
    proxy.dataReceived(b"early ")
    proxy.dataReceived(b"bytes")
    proxy.readConnectionLost()
    assert not clientT.disconnecting
    backend, backendT = completeConnect(mr)
    assert backendT.value() == b"early bytes"
    assert backendT.writeClosed
    # Each side pauses the other when its own write buffer fills.
    assert clientT.producer is backendT and clientT.streaming
    assert backendT.producer is clientT and backendT.streaming
    backend.dataReceived(b"from backend")
    assert clientT.value() == b"from backend"


def test_a_client_sending_much_before_the_backend_connects_is_paused():
    mr = MemoryReactorClock()
    proxy, clientT = startClient(ProxyFactory(clusterOf(9001), mr))
    for _ in range(3):
        proxy.dataReceived(b"x" * 30000)
    assert clientT.producerState == "paused"
    backend, backendT = completeConnect(mr)
    assert clientT.producerState == "producing"
    assert len(backendT.value()) == 90000


def test_connect_failure_retries_another_backend(logged):
    mr = MemoryReactorClock()
    cluster = clusterOf(9001, 9002)
    proxy, clientT = startClient(ProxyFactory(cluster, mr))
    failedPort = failConnect(mr)
    assert len(mr.tcpClients) == 2
    otherPort = mr.tcpClients[1][1]
    assert {failedPort, otherPort} == {9001, 9002}
    assert cluster.pool.get(f"b{failedPort}").failures == 1
    assert cluster.pool.get(f"b{failedPort}").active == 0
    completeConnect(mr, 1)
    assert clientT.producerState == "producing"
    assert cluster.pool.get(f"b{otherPort}").active == 1
    [line] = [line for line in logged if "failed (1 in a row)" in line]
    assert line == (
        f"proxy: connect to backend b{failedPort} at 127.0.0.1:{failedPort} failed "
        "(1 in a row): connection refused; trying another"
    )


def test_a_worker_client_whose_connect_failed_waits_for_its_share_of_another_backend():
    """
    In a worker (--workers): the connect to one backend fails, and the
    other has room only beyond this worker's share of it.  One process
    would route the client there, so it waits for the share (not refused
    with "no other backend to try"), and connects once the share comes.
    """
    mr = MemoryReactorClock()
    cluster = clusterOf(9001, 9002)
    cluster.pool.setQuota("b9002", 0)  # another worker's share, for now
    proxy, clientT = startClient(ProxyFactory(cluster, mr, queueTimeout=5))
    assert mr.tcpClients[0][1] == 9001
    failConnect(mr)
    assert not clientT.disconnecting and len(mr.tcpClients) == 1
    mr.advance(1)  # a change to the failed backend alone does not wake it
    cluster.pool.report("b9001", connections=0, load=0.0)
    mr.advance(0)
    assert len(mr.tcpClients) == 1 and not clientT.disconnecting
    cluster.pool.setQuota("b9002", 1)  # the share comes
    mr.advance(0)
    assert mr.tcpClients[1][1] == 9002
    completeConnect(mr, 1)
    assert cluster.pool.get("b9002").active == 1


def test_a_connection_stops_counting_on_its_backend_once_the_backend_has_closed_its_side():
    """
    The backend's end of file: its own reports count the connection while
    it keeps it open to read; this balancer no longer does (a backend
    killed under silent clients stayed full after its restart).  A static
    backend reports nothing: there it counts until the connection ends.
    """
    mr = MemoryReactorClock()
    cluster = Cluster()
    cluster.pool.register("reporting", "127.0.0.1", 9001, capacity=10)
    cluster.pool.register("static", "127.0.0.1", 9002, capacity=10, static=True)
    factory = ProxyFactory(cluster, mr)
    for index, name in enumerate(["reporting", "static"]):
        other = "static" if name == "reporting" else "reporting"
        cluster.pool.setWeight(other, 0)
        cluster.pool.setWeight(name, 1)
        client = factory.buildProtocol(("127.0.0.1", 5555))
        clientT = HalfClosingTransport()
        client.makeConnection(clientT)
        backend, backendT = completeConnect(mr, index)
        assert cluster.pool.get(name).active == 1
        backend.readConnectionLost()  # the backend's FIN; the client stays
        assert clientT.writeClosed and not clientT.disconnecting
        assert cluster.pool.get(name).active == (1 if name == "static" else 0)
        backend.connectionLost(Failure(ConnectionDone()))
        assert cluster.pool.get(name).active == 0


def test_a_client_whose_connect_failed_does_not_wait_for_a_backend_it_tried():
    """
    Its only backend failed its connect and is full now: nothing could
    wake it (room there is not for it), so it is refused at once, not after
    the queue's timeout.
    """
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    proxy, clientT = startClient(ProxyFactory(cluster, mr, queueTimeout=5))
    cluster.pool.report("b9001", connections=10, load=1.0)  # full meanwhile
    failConnect(mr)
    assert clientT.disconnecting and len(mr.tcpClients) == 1


def test_failed_connects_to_a_backend_are_one_line_a_second_not_one_each(logged):
    # A backend that is not taken out (--max-ejected-percent) fails every
    # client sent to it: the first is told at once, the rest summed.
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    factory = ProxyFactory(cluster, mr, ejectAfter=0, maxAttempts=1)
    for i in range(20):
        startClient(factory)
        failConnect(mr, i)
    lines = [line for line in logged if "proxy: connect to backend" in line]
    assert lines == [
        "proxy: connect to backend b9001 at 127.0.0.1:9001 failed (1 in a row): "
        "connection refused; trying another"
    ]
    mr.advance(1)
    lines = [line for line in logged if "proxy: connect to backend" in line]
    assert len(lines) == 2 and lines[1] == (
        "proxy: connect to backend b9001 at 127.0.0.1:9001 failed (20 in a row): "
        "connection refused; trying another (19 failed connects to it in the last 1.0 s)"
    )


def test_no_backend_closes_the_client_with_a_log_line(logged):
    mr = MemoryReactorClock()
    proxy, clientT = startClient(ProxyFactory(Cluster(), mr))
    assert clientT.disconnecting
    assert mr.tcpClients == []
    assert any("no backend available" in line for line in logged)


def test_every_attempt_failing_closes_the_client_and_undoes_accounting():
    mr = MemoryReactorClock()
    cluster = clusterOf(9001, 9002, 9003, 9004)
    proxy, clientT = startClient(ProxyFactory(cluster, mr, maxAttempts=2))
    failConnect(mr, 0)
    failConnect(mr, 1)
    assert clientT.disconnecting
    assert len(mr.tcpClients) == 2  # two attempts, not four
    assert sum(s.active + s.routed for s in cluster.pool.snapshot()) == 0


def test_client_leaving_while_connecting_cancels_the_connect():
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    proxy, clientT = startClient(ProxyFactory(cluster, mr))
    connector = mr.connectors[0]
    proxy.connectionLost(Failure(Exception("client went away")))
    assert connector.stoppedConnecting
    s = cluster.pool.get("b9001")
    assert (s.active, s.failures) == (0, 0)


def test_closing_either_side_closes_the_other_and_releases():
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    proxy, clientT = startClient(ProxyFactory(cluster, mr))
    backend, backendT = completeConnect(mr)
    assert cluster.pool.get("b9001").active == 1
    backend.connectionLost(Failure(Exception("backend died")))
    assert clientT.disconnecting
    assert cluster.pool.get("b9001").active == 0
    assert cluster.pool.get("b9001").routed == 1


# -- real sockets on loopback --------------------------------------------------


async def listen(factory):
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


class ProxyOnLoopback:
    def __init__(self):
        self.ports = []

    async def start(self, backendFactories, **kw):
        self.cluster = Cluster()
        for i, f in enumerate(backendFactories):
            port = await listen(f)
            self.ports.append(port)
            self.cluster.pool.register(f"b{i}", "127.0.0.1", port.getHost().port, capacity=100)
        self.factory = ProxyFactory(self.cluster, reactor, **kw)
        proxyPort = await listen(self.factory)
        # As the balancer's service readies its proxy listener: the lean
        # accept and the lean server.
        prepareListener(proxyPort)
        self.ports.append(proxyPort)
        self.port = proxyPort.getHost().port
        return self

    async def stop(self):
        for p in self.ports:
            await defer.maybeDeferred(p.stopListening)


@pytest.fixture
def loopback():
    lb = ProxyOnLoopback()
    yield lb
    pytest_twisted.blockon(defer.ensureDeferred(lb.stop()))


def pattern(n):
    block = bytes(range(256)) * 4096
    return (block * (n // len(block) + 1))[:n]


@pytest_twisted.ensureDeferred
async def test_relays_a_large_payload_byte_exact_with_half_close(loopback):
    await loopback.start([echoFactory()])
    payload = pattern(8 * 1024 * 1024 + 17)
    got = await deferToThread(echoOnce, "127.0.0.1", loopback.port, payload, 30)
    assert len(got) == len(payload) and got == payload
    assert loopback.cluster.pool.get("b0").routed == 1


@pytest_twisted.ensureDeferred
async def test_a_held_connection_keeps_no_names_of_its_own(loopback):
    # The accepted transport's logPrefix() and repr() are one shared pair of
    # strings, not two built per connection (issue 16, item 4: bytes per
    # held connection); the relay goes on as before.
    await loopback.start([echoFactory()])
    s = await deferToThread(socket.create_connection, ("127.0.0.1", loopback.port), 5)
    try:
        await deferToThread(s.sendall, b"ping")
        assert await deferToThread(s.recv, 10) == b"ping"
        [relay] = loopback.factory.clients
        prefix, text = type(relay)._SERVER_NAMES
        assert relay.transport.logPrefix() is prefix and repr(relay.transport) is text
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_many_concurrent_clients_each_get_their_own_bytes(loopback):
    await loopback.start([echoFactory(), echoFactory()])
    payloads = [f"client {i} ".encode() * (i + 1) * 100 for i in range(40)]
    results = await defer.gatherResults(
        [deferToThread(echoOnce, "127.0.0.1", loopback.port, p, 30) for p in payloads]
    )
    assert results == payloads
    routed = [s.routed for s in loopback.cluster.pool.snapshot()]
    assert sum(routed) == 40 and min(routed) > 0


@pytest_twisted.ensureDeferred
async def test_dead_backend_is_skipped_and_the_client_is_served(loopback):
    await loopback.start([echoFactory(), echoFactory()])
    # b0 is gone without the balancer knowing: its port is closed.
    await loopback.ports[0].stopListening()
    for i in range(6):
        assert await deferToThread(echoOnce, "127.0.0.1", loopback.port, b"ping %d" % i, 10) == b"ping %d" % i
    assert loopback.cluster.pool.get("b1").routed == 6


class CutOff(Protocol):
    """
    A backend that dies mid-answer: some bytes, then a reset.
    """

    def dataReceived(self, data):
        self.transport.write(b"partial answer")
        self.transport.abortConnection()


def readUntilClosed(port, payload):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(payload)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got, "clean end"
            got += chunk
    except ConnectionResetError:
        return got, "reset"
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_a_backend_reset_reaches_the_client_as_a_reset(loopback):
    # Were it passed on as a clean end, the client would take the partial
    # answer for the whole of it.
    await loopback.start([Factory.forProtocol(CutOff)])
    got, how = await deferToThread(readUntilClosed, loopback.port, b"question")
    assert how == "reset"
    assert got in (b"", b"partial answer")


class EchoThenReset(Protocol):
    """
    A backend that echoes a stream, then resets in the middle of it.
    """

    seen = 0

    def dataReceived(self, data):
        self.seen += len(data)
        if self.seen > 300_000:
            self.transport.abortConnection()
        else:
            self.transport.write(data)


def streamUntilClosed(port, total, timeout=20.0):
    """
    Send C{total} bytes while reading what comes back, until the proxy
    ends the connection: how it ended it, "reset" or "clean end".
    """
    import select

    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setblocking(False)
    chunk, sent = b"y" * 65536, 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            want = [s] if sent < total else []
            readable, writable, _ = select.select([s], want, [], 1.0)
            try:
                if readable and not s.recv(1 << 20):
                    return "clean end"
                if writable:
                    sent += s.send(chunk)
            except (ConnectionResetError, BrokenPipeError):
                return "reset"
        return "no end"
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_a_backend_reset_mid_stream_reaches_every_client_as_a_reset(loopback):
    # Big streams both ways (the relay splices them): the reset meets the
    # balancer in a send or a splice towards the backend as often as in a
    # read. Each time it must be passed on as a reset, never as a clean end
    # that would make the client take a cut-off echo for the whole.
    await loopback.start([Factory.forProtocol(EchoThenReset)])
    for _ in range(12):
        how = await deferToThread(streamUntilClosed, loopback.port, 8 * 1024 * 1024)
        assert how == "reset"
    await until(lambda: not loopback.factory.clients)
    assert loopback.cluster.pool.get("b0").active == 0


@pytest_twisted.ensureDeferred
async def test_a_clean_backend_close_reaches_the_client_as_a_clean_end(loopback):
    await loopback.start([echoFactory()])
    assert await deferToThread(echoOnce, "127.0.0.1", loopback.port, b"whole") == b"whole"


class Sink(Protocol):
    """
    A backend that never reads: the worst consumer.
    """

    def connectionMade(self):
        self.transport.pauseProducing()
        Sink.instances.append(self)


Sink.instances = []


def pipeMaxSize():
    with open("/proc/sys/fs/pipe-max-size") as f:
        return int(f.read())


def bufferedBytes(transport):
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_a_fast_sender_cannot_fill_the_balancers_memory(loopback):
    await loopback.start([Factory.forProtocol(Sink)])
    sent = []
    stop = threading.Event()

    def flood():
        s = socket.create_connection(("127.0.0.1", loopback.port), timeout=5)
        s.settimeout(0.5)
        chunk = b"x" * 65536
        total = 0
        try:
            while not stop.is_set() and total < 256 * 1024 * 1024:
                try:
                    total += s.send(chunk)
                except socket.timeout:
                    break  # the balancer stopped reading: backpressure
        finally:
            sent.append(total)
            s.close()

    await deferToThread(flood)
    [relay] = loopback.factory.clients
    if relaying.SPLICE:
        # The flood moved to splice: at most a pipe's worth waits there.
        splicer = relay._splicer
        assert splicer is not None
        assert splicer.pending <= splicer.capacity <= relaying.PIPE_SIZE
        # The pipe was enlarged where Linux lets this process do so.
        assert fcntl.fcntl(splicer.w, fcntl.F_GETPIPE_SZ) == splicer.capacity
        if os.geteuid() == 0 and pipeMaxSize() >= relaying.PIPE_SIZE:
            assert splicer.capacity == relaying.PIPE_SIZE
    held = bufferedBytes(relay.peer.transport)
    # Twisted pauses the producer past 64 KiB; one more read may land.
    assert held < 512 * 1024, f"balancer buffered {held} bytes"
    # What the sender got rid of sits in kernel socket buffers, not in ours.
    assert sent[0] < 64 * 1024 * 1024, f"sender was never paused ({sent[0]} bytes)"
    stop.set()


# -- passive health check, idle timeout, waiting for capacity -----------------


def failNext(mr):
    failConnect(mr, 0)
    mr.tcpClients.pop(0)
    mr.connectors.pop(0)


def completeNext(mr):
    result = completeConnect(mr, 0)
    mr.tcpClients.pop(0)
    mr.connectors.pop(0)
    return result


def test_repeated_connect_failures_take_a_backend_out_for_a_while(logged):
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    # One backend: only without the share guard can it be taken out.
    factory = ProxyFactory(
        cluster, mr, maxAttempts=1, ejectAfter=3, ejectFor=10, maxEjectedPercent=100
    )
    for i in range(3):
        startClient(factory)
        failNext(mr)
    assert cluster.pool.get("b9001").state.value == "down"
    assert any("3 connects in a row failed; taken out for 10" in line for line in logged)
    _, clientT = startClient(factory)
    assert clientT.disconnecting and mr.tcpClients == []  # not tried while out
    mr.advance(10)
    assert cluster.pool.get("b9001").state.value == "up"
    assert cluster.pool.get("b9001").failures == 0


def test_a_success_resets_the_failure_count():
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    factory = ProxyFactory(cluster, mr, maxAttempts=1, ejectAfter=3)
    for _ in range(2):
        startClient(factory)
        failNext(mr)
    startClient(factory)
    backend, _ = completeNext(mr)
    backend.dataReceived(b"hello")  # a byte from the backend is a success
    startClient(factory)
    failNext(mr)
    assert cluster.pool.get("b9001").state.value == "up"


# A backend that accepts and then closes or resets before sending anything
# (issue 13, item 5).


def earlyCloser(**kw):
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    kw.setdefault("maxAttempts", 1)
    factory = ProxyFactory(cluster, mr, **kw)
    return mr, cluster, factory


def relayed(factory, mr, request=b"request"):
    proxy = factory.buildProtocol(("127.0.0.1", 5555))
    clientT = HalfClosingTransport()
    proxy.makeConnection(clientT)
    backend, backendT = completeNext(mr)
    if request:
        proxy.dataReceived(request)
    return proxy, clientT, backend, backendT


def test_a_backend_that_resets_or_closes_before_sending_anything_is_taken_out(logged):
    mr, cluster, factory = earlyCloser(ejectAfter=3, ejectFor=10, maxEjectedPercent=100)
    # Reset right after accept, reset on the request, clean close on it.
    proxy, clientT, backend, _ = relayed(factory, mr, request=b"")
    backend.connectionLost(Failure(ConnectionLost()))
    assert clientT.disconnecting
    proxy, _, backend, _ = relayed(factory, mr)
    backend.connectionLost(Failure(ConnectionLost()))
    assert cluster.pool.get("b9001").failures == 2
    proxy, _, backend, backendT = relayed(factory, mr)
    backend.readConnectionLost()
    backend.writeConnectionLost()
    assert backendT.disconnecting
    backend.connectionLost(Failure(ConnectionDone()))
    s = cluster.pool.get("b9001")
    assert (s.state.value, s.failures, s.active) == ("down", 3, 0)
    assert any(
        "backend b9001 reset a connection before sending anything (2 in a row)" in line
        for line in logged
    )
    assert any("3 connects in a row failed; taken out for 10" in line for line in logged)
    mr.advance(10)
    assert cluster.pool.get("b9001").state.value == "up"


def test_connects_alone_do_not_reset_the_count_a_byte_does():
    mr, cluster, factory = earlyCloser(ejectAfter=3, maxEjectedPercent=100)
    for _ in range(2):
        startClient(factory)
        failNext(mr)
    # Connected, then reset before a byte: the third failure in a row.
    proxy, _, backend, _ = relayed(factory, mr)
    backend.connectionLost(Failure(ConnectionLost()))
    assert cluster.pool.get("b9001").state.value == "down"


def test_a_byte_from_the_backend_clears_the_count_and_costs_nothing_per_chunk():
    mr, cluster, factory = earlyCloser(ejectAfter=3)
    for _ in range(2):
        startClient(factory)
        failNext(mr)
    proxy, clientT, backend, _ = relayed(factory, mr)
    backend.dataReceived(b"a")
    assert cluster.pool.get("b9001").failures == 0
    # The first byte is noticed once; after it the class's dataReceived is
    # the relay's own again.
    assert "dataReceived" not in backend.__dict__
    backend.dataReceived(b"bc")
    assert clientT.value() == b"abc"
    # A reset after the backend spoke is a cut-off answer, not this rule.
    backend.connectionLost(Failure(ConnectionLost()))
    assert cluster.pool.get("b9001").failures == 0


def test_closes_that_are_not_the_backends_fault_are_not_counted():
    # ejectAfter=1: any counted failure would take it out.
    mr, cluster, factory = earlyCloser(ejectAfter=1, earlyCloseWindow=3)

    def assertNotBlamed():
        s = cluster.pool.get("b9001")
        assert (s.state.value, s.failures) == ("up", 0)

    # A service that only reads: the client half-closes, then it closes.
    proxy, _, backend, backendT = relayed(factory, mr)
    proxy.readConnectionLost()
    assert backendT.writeClosed
    backend.readConnectionLost()
    backend.connectionLost(Failure(ConnectionDone()))
    assertNotBlamed()
    # The client closes, or resets, first.
    for why in (ConnectionDone(), ConnectionLost()):
        proxy, _, backend, _ = relayed(factory, mr)
        proxy.connectionLost(Failure(why))
        backend.connectionLost(Failure(ConnectionLost()))
        assertNotBlamed()
    # The backend closes, silent, after the window: it served a while.
    proxy, _, backend, _ = relayed(factory, mr)
    mr.advance(3)
    backend.connectionLost(Failure(ConnectionLost()))
    assertNotBlamed()
    assert cluster.pool.get("b9001").active == 0


def test_a_connection_the_client_ended_first_ends_the_failures_in_a_row():
    # Sporadic failures must not add up across many good connections of a
    # service that seldom speaks first.
    mr, cluster, factory = earlyCloser(ejectAfter=3, earlyCloseWindow=3)
    cluster.pool.backendFailed("b9001")
    cluster.pool.backendFailed("b9001")
    proxy, _, backend, _ = relayed(factory, mr)
    proxy.connectionLost(Failure(ConnectionDone()))
    backend.connectionLost(Failure(ConnectionDone()))
    assert cluster.pool.get("b9001").failures == 0


def test_an_early_close_window_of_zero_turns_the_rule_off():
    mr, cluster, factory = earlyCloser(ejectAfter=1, earlyCloseWindow=0)
    proxy, _, backend, _ = relayed(factory, mr)
    assert "dataReceived" not in backend.__dict__
    backend.connectionLost(Failure(ConnectionLost()))
    s = cluster.pool.get("b9001")
    assert (s.state.value, s.failures) == ("up", 0)


def resetBeforeAnyByte(factory, mr):
    """
    A hostile client's connection: its bytes make the backend reset it.
    """
    proxy, _, backend, _ = relayed(factory, mr, request=b"poison")
    name = backend.backendName
    backend.connectionLost(Failure(ConnectionLost()))
    return name


def test_a_client_that_makes_backends_reset_cannot_take_them_all_out(logged):
    mr = MemoryReactorClock()
    cluster = clusterOf(9001, 9002, 9003, 9004)
    factory = ProxyFactory(cluster, mr, maxAttempts=1, ejectAfter=1, ejectFor=10)
    for _ in range(40):
        resetBeforeAnyByte(factory, mr)
    pool = cluster.pool
    up = [s.name for s in pool.snapshot() if s.state.value == "up"]
    # Half of four may be out (--max-ejected-percent 50): two stay in.
    assert len(up) == 2 and (pool.ejected, pool.inService) == (2, 4)
    assert factory.ejectionsSkipped == 40 - 2
    lines = [line for line in logged if "kept in" in line]
    assert len(lines) == 1, lines
    assert "2 of 4 backends in service are out" in lines[0]
    assert "--max-ejected-percent 50" in lines[0]
    mr.advance(1)
    lines = [line for line in logged if "kept in" in line]
    assert len(lines) == 2 and "37 time(s) in the last 1.0 s" in lines[1], lines
    # Readmitted after --eject-for; the hostile client can again take out
    # two, never more.
    mr.advance(9)
    assert pool.ejected == 0
    for _ in range(10):
        resetBeforeAnyByte(factory, mr)
    assert pool.ejected == 2


def test_a_lone_backend_is_not_taken_out_by_default(logged):
    mr, cluster, factory = earlyCloser(ejectAfter=1)
    for _ in range(3):
        startClient(factory)
        failNext(mr)
    s = cluster.pool.get("b9001")
    assert (s.state.value, s.failures) == ("up", 3)
    assert any("kept in" in line and "0 of 1 backends" in line for line in logged)


def test_no_socket_and_closed_clients_are_a_line_a_second_each(logged):
    # Out of file descriptors, every client's connect fails here and the
    # client is closed: two lines each, a flood; now one of each a second.
    from twisted.internet.error import ConnectBindError

    mr, cluster, factory = earlyCloser(ejectAfter=1)
    for _ in range(100):
        startClient(factory)
        host, port, wrapping, timeout, bind = mr.tcpClients.pop(0)
        wrapping.clientConnectionFailed(
            mr.connectors.pop(0), Failure(ConnectBindError(24, "Too many open files"))
        )

    def lines(text):
        return [line for line in logged if text in line]

    assert len(lines("no socket for a connect")) == 1
    assert len(lines("closing client")) == 1
    assert "no socket for a connect to backend b9001" in lines("no socket")[0]
    mr.advance(1)
    [_, noSocket] = lines("no socket for a connect")
    [_, closing] = lines("closing client")
    assert "99 such in the last 1.0 s" in noSocket, noSocket
    assert "99 client(s) closed in the last 1.0 s (every attempt failed: 99)" in closing, closing
    assert cluster.pool.get("b9001").failures == 0


def test_idle_connections_are_closed_after_the_timeout():
    mr = MemoryReactorClock()
    cluster = clusterOf(9001)
    proxy, clientT = startClient(ProxyFactory(cluster, mr, idleTimeout=30))
    backend, backendT = completeConnect(mr)
    mr.advance(20)
    backend.dataReceived(b"activity")  # resets the clock
    mr.advance(20)
    assert not clientT.disconnecting
    mr.advance(11)
    assert clientT.disconnecting


def test_drain_waits_for_open_connections():
    mr = MemoryReactorClock()
    factory = ProxyFactory(clusterOf(9001), mr)
    proxy, clientT = startClient(factory)
    completeConnect(mr)
    done = []
    factory.drain(5).addCallback(done.append)
    mr.advance(4)
    assert done == [] and not clientT.disconnecting
    proxy.connectionLost(Failure(ConnectionDone()))
    assert done == [None]


def test_drain_resets_what_is_left_at_the_deadline(logged):
    mr = MemoryReactorClock()
    factory = ProxyFactory(clusterOf(9001), mr)
    proxy, clientT = startClient(factory)
    completeConnect(mr)
    done = []
    factory.drain(5).addCallback(done.append)
    mr.advance(5)
    assert done == [None] and clientT.disconnecting
    assert any("drain deadline reached: resetting 1 connection" in line for line in logged)


def test_drain_with_nothing_open_is_immediate():
    done = []
    ProxyFactory(clusterOf(9001), MemoryReactorClock()).drain(5).addCallback(done.append)
    assert done == [None]


def fullCluster():
    c = Cluster()
    c.pool.register("b9001", "127.0.0.1", 9001, capacity=1, connections=1)
    return c


def test_clients_wait_for_capacity_then_connect():
    mr = MemoryReactorClock()
    cluster = fullCluster()
    proxy, clientT = startClient(ProxyFactory(cluster, mr))
    assert not clientT.disconnecting and mr.tcpClients == []
    cluster.pool.report("b9001", connections=0, load=0.0)  # room again
    mr.advance(0)
    assert [c[1] for c in mr.tcpClients] == [9001]
    completeConnect(mr)
    assert clientT.producerState == "producing"


def test_waiting_clients_are_refused_after_the_queue_timeout(logged):
    mr = MemoryReactorClock()
    factory = ProxyFactory(fullCluster(), mr, queueTimeout=5)
    proxy, clientT = startClient(factory)
    mr.advance(4.9)
    assert not clientT.disconnecting
    mr.advance(0.2)
    assert clientT.disconnecting
    assert any("stayed at capacity for 5" in line for line in logged)
    assert not factory.cluster.pool._watchers


def test_a_full_queue_refuses_at_once(logged):
    mr = MemoryReactorClock()
    factory = ProxyFactory(fullCluster(), mr, queueSize=1)
    _, first = startClient(factory)
    _, second = startClient(factory)
    assert not first.disconnecting and second.disconnecting
    assert any("1 clients already wait" in line for line in logged)


def bulkExchange(port, payload):
    """
    Send a bulk payload and read its echo on one connection, then look at
    the relay before closing, then close and read the end.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    got = bytearray()

    def reader():
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    t.join(30)
    return s, bytes(got)


@pytest.mark.skipif(not relaying.SPLICE, reason="splice(2) is Linux only")
@pytest_twisted.ensureDeferred
async def test_bulk_streams_move_to_splice_byte_exact(loopback):
    await loopback.start([echoFactory()])
    payload = pattern(16 * 1024 * 1024 + 123)
    s, got = await deferToThread(bulkExchange, loopback.port, payload)
    try:
        assert len(got) == len(payload) and got == payload
        [relay] = loopback.factory.clients
        assert relay._splicer is not None  # client to backend
        assert relay.peer._splicer is not None  # backend to client
        # More after the switch, then a half-close: all of it, then the end.
        tail = b"the end" * 1000

        def finish():
            s.sendall(tail)
            s.shutdown(socket.SHUT_WR)
            rest = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return rest
                rest += chunk

        assert await deferToThread(finish) == tail
    finally:
        s.close()


class BulkThenReset(Protocol):
    """
    A backend that streams a lot, then dies with a reset.
    """

    def connectionMade(self):
        self.transport.write(b"z" * (4 * 1024 * 1024))
        from twisted.internet import reactor as r

        r.callLater(0.3, self.transport.abortConnection)


@pytest_twisted.ensureDeferred
async def test_a_reset_during_a_bulk_stream_reaches_the_client_as_a_reset(loopback):
    await loopback.start([Factory.forProtocol(BulkThenReset)])
    got, how = await deferToThread(readUntilClosed, loopback.port, b"go")
    assert how == "reset"
    assert got == b"z" * len(got)


def test_a_client_that_ruled_out_a_backend_does_not_wait_for_a_full_one(logged):
    # b9001 refused once (still up, eligible); b9002 is full.  The client
    # has nowhere left to go: it is refused, not queued to be woken and
    # queued again for ever.
    mr = MemoryReactorClock()
    cluster = Cluster()
    cluster.pool.register("b9001", "127.0.0.1", 9001, capacity=10)
    cluster.pool.register("b9002", "127.0.0.1", 9002, capacity=1, connections=1)
    factory = ProxyFactory(cluster, mr)
    proxy, clientT = startClient(factory)
    assert mr.tcpClients[0][1] == 9001
    failNext(mr)
    assert factory.waiting == 0 and clientT.disconnecting
    cluster.pool.report("b9002", connections=1, load=0.1)  # any change: no spin
    mr.advance(0)
    assert any("no other backend to try" in line for line in logged)


def pipeCount():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return count


@pytest.mark.skipif(not relaying.SPLICE, reason="splice(2) is Linux only")
@pytest_twisted.ensureDeferred
async def test_splice_pipes_are_given_back_when_an_idle_upload_is_cut(loopback):
    # A bulk upload to a backend that never reads: spliced, the pipe full,
    # then the idle timeout cuts it.  Both pipes' descriptors come back.
    # The idle timeout is long enough to look at the relay first, even on a
    # busy machine: the upload stops as soon as sending blocks.
    await loopback.start([Factory.forProtocol(Sink)], idleTimeout=3.0)
    before = pipeCount()

    def upload():
        s = socket.create_connection(("127.0.0.1", loopback.port), timeout=5)
        s.settimeout(0.2)
        try:
            while True:
                s.send(b"u" * 65536)
        except OSError:
            pass
        return s

    s = await deferToThread(upload)
    [relay] = loopback.factory.clients
    assert relay._splicer is not None and relay._splicer.pending
    deadline = reactor.seconds() + 10
    while loopback.factory.clients and reactor.seconds() < deadline:
        await deferLater(reactor, 0.05, lambda: None)
    s.close()
    assert not loopback.factory.clients
    assert pipeCount() == before


@pytest_twisted.ensureDeferred
async def test_no_descriptor_for_the_backend_socket_closes_the_client_without_blaming_the_backend(
    loopback, logged
):
    # The accept takes the last free descriptor; the socket to the backend
    # then fails with EMFILE.  The client is closed (not left hanging), the
    # pool's accounting is undone, and the backend is not counted as failing.
    await loopback.start([echoFactory()], ejectAfter=1)
    client = socket.socket()
    client.setblocking(False)
    fillers = []
    try:
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(fillers.pop())  # exactly one free: the accept takes it
        client.connect_ex(("127.0.0.1", loopback.port))

        def closed():
            try:
                return client.recv(100) == b""
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True

        deadline = reactor.seconds() + 10
        while not closed():
            assert reactor.seconds() < deadline, "the client was left hanging"
            await deferLater(reactor, 0.01, lambda: None)
    finally:
        for fd in fillers:
            os.close(fd)
        client.close()
    status = loopback.cluster.pool.get("b0")
    assert status.active == 0 and status.routed == 0
    # ejectAfter=1: one counted failure would have taken it out (DOWN).
    assert status.failures == 0 and status.state.value == "up"
    assert any("no socket for a connect to backend b0" in line for line in logged)
    # With descriptors back, the same backend serves the next client.
    assert await deferToThread(echoOnce, "127.0.0.1", loopback.port, b"again", 10) == b"again"


@pytest_twisted.ensureDeferred
async def test_a_backend_at_an_unusable_scoped_address_is_counted_as_failing(loopback, logged):
    # fe80::1%nosuchif0 parses as IPv6 but names no interface: each connect
    # to it fails, counts against it, and takes it out; clients are served
    # by the other backend meanwhile.
    await loopback.start([echoFactory()], ejectAfter=1)
    loopback.cluster.pool.register("bad", "fe80::1%nosuchif0", 9, capacity=100)
    # Both are idle between clients, so each client goes to either one at
    # random: keep connecting until "bad" has been tried (bounded; not
    # trying it in 40 would be a 1 in 2**40 chance), then a few more.
    for i in range(40):
        assert await deferToThread(echoOnce, "127.0.0.1", loopback.port, b"hi %d" % i, 10) == b"hi %d" % i
        if loopback.cluster.pool.get("bad").failures:
            break
    for i in range(3):
        assert await deferToThread(echoOnce, "127.0.0.1", loopback.port, b"after %d" % i, 10) == b"after %d" % i
    bad = loopback.cluster.pool.get("bad")
    assert bad.failures >= 1 and bad.state.value == "down" and bad.active == 0
    assert any("unusable address fe80::1%nosuchif0" in line for line in logged)


@implementer(IHalfCloseableProtocol)
class ReadUntilEnd(Protocol):
    """
    A healthy service that answers nothing: it reads until the client's
    end-of-file, then closes.
    """

    def readConnectionLost(self):
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_silent_service_that_closes_after_the_clients_end_is_not_blamed(loopback):
    # ejectAfter=1: one counted failure would take it out.
    await loopback.start([Factory.forProtocol(ReadUntilEnd)], ejectAfter=1)
    for i in range(20):
        assert await deferToThread(echoOnce, "127.0.0.1", loopback.port, b"log %d" % i, 10) == b""
    s = loopback.cluster.pool.get("b0")
    assert (s.state.value, s.failures, s.routed, s.active) == ("up", 0, 20, 0)


@pytest_twisted.ensureDeferred
async def test_a_tls_client_gets_a_backend_only_once_its_handshake_is_done(tmp_path):
    # With an ssl: listener, a client that opens TCP and never handshakes
    # costs no backend connection and no load; one that handshakes is relayed.
    from twisted.internet.endpoints import serverFromString

    from tests.certificates import loopbackTLS

    description, context = loopbackTLS(tmp_path)
    accepted = []

    class Counted(Factory):
        def buildProtocol(self, addr):
            accepted.append(addr)
            return echoFactory().buildProtocol(addr)

    backendPort = await listen(Counted())
    cluster = clusterOf(backendPort.getHost().port)
    factory = ProxyFactory(cluster, reactor)
    proxyPort = await serverFromString(reactor, description).listen(factory)
    port = proxyPort.getHost().port
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            await deferLater(reactor, 0.3, lambda: None)
            assert len(factory.clients) == 1  # accepted, awaiting its handshake
            assert accepted == []
            s = cluster.pool.get(f"b{backendPort.getHost().port}")
            assert (s.active, s.routed, s.addedSinceReport) == (0, 0, 0)

            def run():
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.sendall(b"over tls")
                        return tls.recv(100)

            assert await deferToThread(run) == b"over tls"
            assert len(accepted) == 1
        finally:
            silent.close()
        await deferLater(reactor, 0.1, lambda: None)
        assert factory.clients == set()
        assert len(accepted) == 1
    finally:
        await proxyPort.stopListening()
        await backendPort.stopListening()


def test_summaries_go_on_while_draining_and_the_last_is_told(logged):
    # SIGTERM: the listener closes (stopFactory), then the drain waits for
    # the connections open.  Lines summed once a second are told through
    # the drain, and what is pending when it ends is told then (the process
    # exits next): nothing is dropped.
    mr = MemoryReactorClock()
    factory = ProxyFactory(clusterOf(9001), mr)
    factory.doStart()  # listening
    staying, _ = startClient(factory)
    completeConnect(mr)

    def closing():
        return [line for line in logged if "closing client" in line]

    def refuseOne(why):
        proxy, _ = startClient(factory)
        proxy.refuse(why)
        proxy.connectionLost(Failure(ConnectionDone()))

    refuseOne("first")
    assert len(closing()) == 1
    mr.advance(0.2)
    refuseOne("pending at the stop")
    factory.doStop()  # the listener closed
    done = []
    factory.drain(30).addCallback(done.append)
    mr.advance(1)
    assert len(closing()) == 2 and "pending at the stop: 1" in closing()[1]
    mr.advance(1.5)
    refuseOne("during the drain")
    assert len(closing()) == 3  # a second after the last: told at once
    mr.advance(0.2)
    refuseOne("pending at the end")
    staying.connectionLost(Failure(ConnectionDone()))
    assert done == [None]
    assert len(closing()) == 4 and "pending at the end: 1" in closing()[3]
    assert not mr.getDelayedCalls()


def test_a_long_drain_says_how_it_goes(logged):
    mr = MemoryReactorClock()
    factory = ProxyFactory(clusterOf(9001), mr)
    proxies = [startClient(factory)[0] for _ in range(2)]
    for i in range(2):
        completeConnect(mr, i)
    done = []
    factory.drain(300).addCallback(done.append)

    def progress():
        return [line for line in logged if "still open" in line]

    mr.advance(proxy.DRAIN_PROGRESS_INTERVAL)
    assert progress() == ["proxy: stopping: 2 connection(s) still open, 290 s to the drain deadline"]
    proxies[0].connectionLost(Failure(ConnectionDone()))
    mr.advance(proxy.DRAIN_PROGRESS_INTERVAL)
    assert progress()[1] == "proxy: stopping: 1 connection(s) still open, 280 s to the drain deadline"
    proxies[1].connectionLost(Failure(ConnectionDone()))
    assert done == [None]
    assert not mr.getDelayedCalls()


@pytest.mark.parametrize("kw", [{"handshakeTimeout": 0.3}, {"idleTimeout": 0.3}])
@pytest_twisted.ensureDeferred
async def test_a_tls_client_that_never_handshakes_is_closed_in_time(tmp_path, logged, kw):
    # It holds no backend, but it holds a client slot: closed after the
    # handshake deadline (or --idle-timeout, when shorter), counted and
    # logged as the balancer's doing.
    from twisted.internet.endpoints import serverFromString

    from tests.certificates import loopbackTLS

    description, context = loopbackTLS(tmp_path)
    cluster = clusterOf(9)
    ended = []
    factory = ProxyFactory(cluster, reactor, **kw)
    factory.traffic.proxyEnded = lambda client, now: ended.append(client._end)
    proxyPort = await serverFromString(reactor, description).listen(factory)
    try:
        silent = socket.create_connection(("127.0.0.1", proxyPort.getHost().port), timeout=5)
        try:
            await deferLater(reactor, 1.0, lambda: None)
            assert factory.clients == set()
            assert ended == ["handshake_timeout"]
            silent.settimeout(5)
            try:
                assert silent.recv(10) == b""
            except ConnectionResetError:
                pass
        finally:
            silent.close()
        assert any("no TLS handshake within 0.3 s" in line for line in logged)
    finally:
        await proxyPort.stopListening()
