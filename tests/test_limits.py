"""
The client connection limit (--max-connections) and the summary of accept
errors (issue 13, item 7 of "Hold the line under bursts and hostile peers").
"""

import os
import resource
import socket
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from tests.loopback import until
from twistedcluster.balancer import service as balancer
from twistedcluster.backend.echo import echoFactory
from twistedcluster.balancer.limits import AcceptErrors, ClientLimit, defaultMaxConnections


@pytest.mark.parametrize(
    "nofile, expected",
    [
        (1024, (1024 - 256) // 2),  # a quarter kept for the rest
        (20000, (20000 - 1024) // 2),  # at most 1024 kept
        (1 << 20, ((1 << 20) - 1024) // 2),
        (8, 3),
        (1, 1),
    ],
)
def test_the_default_keeps_descriptors_for_control_and_admin(nofile, expected):
    assert defaultMaxConnections(nofile) == expected


def test_the_default_follows_the_open_file_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert defaultMaxConnections() == defaultMaxConnections(soft)
    o = balancer.Options()
    o.parseOptions([])
    assert o["max-connections"] == defaultMaxConnections()
    o.parseOptions(["--max-connections=7"])
    assert o["max-connections"] == 7


class FakePort:
    """
    What the limit uses of a listening port: reading on or off.
    """

    connected = True
    reading = True
    numberAccepts = 100

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True


class Counted(Protocol):
    pass


def connect(factory):
    p = factory.buildProtocol(None)
    if p is not None:
        p.makeConnection(StringTransport())
    return p


def test_at_the_limit_the_listeners_stop_accepting_until_one_closes(logged):
    clock = task.Clock()
    limit = ClientLimit(3, clock)
    proxy = limit.wrap(Factory.forProtocol(Counted))
    redirect = limit.wrap(Factory.forProtocol(Counted))
    ports = [FakePort(), FakePort()]
    for p in ports:
        limit.listening(p)
    a, b = connect(proxy), connect(redirect)
    assert limit.count == 2 and all(p.reading for p in ports)
    c = connect(proxy)
    assert limit.count == 3
    assert not any(p.reading for p in ports)
    # Accepted in the same turn as the one that reached it: closed at once.
    assert connect(redirect) is None
    assert limit.count == 3
    b.connectionLost(None)
    assert limit.count == 2 and all(p.reading for p in ports)
    # A port that starts listening while at the limit starts paused.
    connect(proxy)
    late = FakePort()
    limit.listening(late)
    assert not late.reading
    lines = [line for line in logged if "client connection limit" in line]
    assert len(lines) == 1
    assert "limit 3 " in lines[0] and "reached 1 time(s) just now" in lines[0]
    assert "listen backlog" in lines[0]


def test_a_port_that_stopped_listening_is_not_resumed():
    limit = ClientLimit(1, task.Clock())
    f = limit.wrap(Factory.forProtocol(Counted))
    port = FakePort()
    limit.listening(port)
    p = connect(f)
    assert not port.reading
    port.connected = False
    p.connectionLost(None)
    assert not port.reading


def test_near_the_limit_a_port_accepts_no_more_in_one_turn_than_there_is_room_for():
    limit = ClientLimit(10, task.Clock())
    f = limit.wrap(Factory.forProtocol(Counted))
    port = FakePort()
    limit.listening(port)
    for _ in range(7):
        connect(f)
    assert port.numberAccepts == 3


def test_the_limit_is_logged_at_most_once_a_second_with_a_count(logged):
    clock = task.Clock()
    limit = ClientLimit(1, clock)
    f = limit.wrap(Factory.forProtocol(Counted))
    limit.listening(FakePort())
    for _ in range(50):
        p = connect(f)
        assert connect(f) is None
        p.connectionLost(None)
    lines = [line for line in logged if "client connection limit" in line]
    assert len(lines) == 1
    clock.advance(1.0)
    lines = [line for line in logged if "client connection limit" in line]
    assert len(lines) == 2
    # The first line told of the first time; this one of the rest.
    assert "reached 49 time(s) in the last 1.0 s" in lines[1] and "50 closed at once" in lines[1], lines[1]
    clock.advance(10)
    assert len([line for line in logged if "client connection limit" in line]) == 2


def acceptQueue(port):
    """
    Connections waiting in a listening socket's accept queue (Linux's
    TCP_INFO tcpi_unacked for a listening socket; ss -ltn's Recv-Q).
    """
    s = socket.socket(fileno=socket.dup(port.fileno()))
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    finally:
        s.close()
    return struct.unpack_from("I", info, 24)[0]


async def limitedPort(most):
    """
    A listener on loopback whose connections count against a new
    C{ClientLimit(most)}: (the limit, the port, its address).
    """
    limit = ClientLimit(most, reactor)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1:backlog=4096").listen(
        limit.wrap(Factory.forProtocol(Protocol))
    )
    limit.listening(port)
    return limit, port, ("127.0.0.1", port.getHost().port)


def connectMany(address, n, into):
    """
    Start C{n} non-blocking connects to C{address}, kept in C{into}.
    """
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        into.append(s)


def closedByServer(clients):
    """
    How many of C{clients} the server has closed (end of file, or reset).
    """
    closed = 0
    for s in clients:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


@pytest_twisted.ensureDeferred
async def test_a_client_past_the_limit_waits_in_the_backlog_and_is_served_later():
    limit = ClientLimit(2, reactor)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        limit.wrap(echoFactory())
    )
    limit.listening(port)
    clients = []
    try:
        for i in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port.getHost().port))
            clients.append(s)
        await until(lambda: limit.count == 2, what="two clients accepted")
        await until(lambda: acceptQueue(port) == 1, what="the third in the backlog")
        assert limit.count == 2
        third = clients[2]
        third.send(b"third")
        clients[0].close()
        got = []

        def echoed():
            try:
                got.append(third.recv(100))
            except BlockingIOError:
                pass
            return b"".join(got) == b"third"

        await until(echoed, what="the third client's echo")
        assert limit.count == 2
    finally:
        for s in clients:
            s.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_burst_past_the_limit_waits_in_the_backlog_none_is_closed():
    # After a warm-up Twisted's port accepts 100+ connections a turn: the
    # turn that reaches the limit must not accept more than there is room
    # for (those would be closed at once instead of waiting).
    limit, port, address = await limitedPort(150)
    clients = []
    try:
        connectMany(address, 100, clients)
        await until(lambda: limit.count == 100, what="the warm-up accepted")
        connectMany(address, 300, clients)
        await until(lambda: acceptQueue(port) == 250, what="the rest in the backlog")
        assert limit.count == 150
        assert closedByServer(clients) == 0
    finally:
        for s in clients:
            s.close()
        await port.stopListening()
        limit.stop()


@pytest_twisted.ensureDeferred
async def test_clients_let_in_as_room_frees_are_never_closed_at_once():
    # At the limit with a queue in the backlog, the clients served leave
    # together: each turn lets in as many as there is room for. Twisted
    # raises a port's accepts per turn by 20 after a turn that took all it
    # might; unless clamped again, the next turn accepted clients past the
    # limit only to close them at once (reset, where they should wait).
    limit, port, address = await limitedPort(50)
    first, waiting = [], []
    try:
        for _ in range(3):
            connectMany(address, 50, first)
            await until(lambda: limit.count == 50, what="the first 50 accepted")
            connectMany(address, 100, waiting)
            await until(lambda: acceptQueue(port) == 100, what="the rest in the backlog")
            for s in first:  # they all leave at once
                s.close()
            first.clear()
            await until(lambda: acceptQueue(port) == 50 and limit.count == 50, what="50 more let in")
            assert closedByServer(waiting) == 0
            for s in waiting:  # everyone leaves: again from an empty listener
                s.close()
            waiting.clear()
            await until(lambda: limit.count == 0 and acceptQueue(port) == 0, what="all gone")
    finally:
        for s in first + waiting:
            s.close()
        await port.stopListening()
        limit.stop()


# -- accept errors ---------------------------------------------------------


def lowestFreeDescriptor():
    fd = os.dup(0)
    os.close(fd)
    return fd


@pytest_twisted.ensureDeferred
async def test_out_of_descriptors_is_one_line_a_second_with_a_count(logged):
    """
    A real EMFILE: Twisted's port closes every waiting connection unaccepted
    and logs three lines for the first and one for each other; summed here
    into one line a second.
    """
    clock = task.Clock()
    errors = AcceptErrors(clock)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    errors.watch(port, "proxy")
    port.stopReading()  # this test calls doRead itself
    clients = []

    def burst(n):
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port.getHost().port))
            clients.append(s)

    def outOfDescriptors(turns):
        # As the reactor would: the port stays readable while connections
        # wait (after the first turn Twisted closes one per turn).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowestFreeDescriptor(), hard))
        try:
            for _ in range(turns):
                port.doRead()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert acceptQueue(port) == 0

    try:
        burst(5)
        await until(lambda: acceptQueue(port) == 5, what="5 waiting")
        outOfDescriptors(1)
        burst(7)
        await until(lambda: acceptQueue(port) == 7, what="7 waiting")
        outOfDescriptors(7)
        lines = [line for line in logged if "descriptor" in line or "accept" in line]
        assert len(lines) == 1, lines
        assert "5 connection(s) closed unaccepted" in lines[0]
        assert "proxy" in lines[0]
        clock.advance(1)
        lines = [line for line in logged if "descriptor" in line or "accept" in line]
        assert len(lines) == 2, lines
        assert "7 connection(s) closed unaccepted" in lines[1]
    finally:
        for s in clients:
            s.close()
        await port.stopListening()


def test_an_emfile_recovery_that_closed_nothing_is_a_failed_accept(logged):
    observe = AcceptErrors(task.Clock()).observerFor("proxy")
    observe({"log_format": "EMFILE encountered; releasing reserved file descriptor."})
    observe({"log_format": "Re-reserving EMFILE recovery file descriptor."})
    [line] = [line for line in logged if "accept" in line]
    assert "0 connection(s) closed unaccepted, 1 accept(s) failed" in line


def test_other_accept_errors_are_summed_and_other_events_pass(logged):
    clock = task.Clock()
    seen = []
    errors = AcceptErrors(clock, observer=seen.append)
    observe = errors.observerFor("admin")
    for _ in range(3):
        observe({"log_format": "Could not accept new connection ({acceptError})",
                 "acceptError": "EMFILE"})
    other = {"log_format": "something else", "log_namespace": "x"}
    observe(other)
    assert seen == [other]
    clock.advance(1)
    lines = [line for line in logged if "accept" in line]
    assert len(lines) == 2
    assert "1 accept(s) failed" in lines[0] and "EMFILE" in lines[0]
    assert "2 accept(s) failed" in lines[1] and "admin" in lines[1]


def test_stopping_the_limit_and_the_accept_errors_drops_their_pending_lines(logged):
    # Both had a stop() that raised: their summary's stop was unreachable
    # code, after a return.
    clock = task.Clock()
    limit = ClientLimit(1, clock)
    f = limit.wrap(Factory.forProtocol(Counted))
    limit.listening(FakePort())
    for _ in range(3):
        connect(f).connectionLost(None)
    errors = AcceptErrors(clock)
    observe = errors.observerFor("proxy")
    for _ in range(2):
        observe({"log_format": "Could not accept new connection ({acceptError})",
                 "acceptError": "EMFILE"})
    limit.stop()
    errors.stop()
    assert not clock.getDelayedCalls()


def test_the_proxy_and_redirect_factories_count_themselves_without_a_wrapper():
    # No wrapper protocol per client (it cost CPU per connection): the
    # factories tell the limit of each connection themselves.
    from twistedcluster.core.cluster import Cluster
    from twistedcluster.balancer.proxy import ProxyFactory, ProxyServer
    from twistedcluster.balancer.redirect import RedirectFactory

    clock = task.Clock()
    limit = ClientLimit(2, clock)
    cluster = Cluster()
    proxy = ProxyFactory(cluster, clock)
    redirect = RedirectFactory(cluster, clock)
    assert limit.wrap(proxy) is proxy and limit.wrap(redirect) is redirect
    client = proxy.buildProtocol(None)
    assert type(client) is ProxyServer
    client.makeConnection(StringTransport())  # no backend: closed at once
    asked = redirect.buildProtocol(None)
    asked.makeConnection(StringTransport())
    assert limit.count == 2
    assert proxy.buildProtocol(None) is None and redirect.buildProtocol(None) is None
    asked.connectionLost(None)
    assert limit.count == 1
    assert redirect.buildProtocol(None) is not None


def test_the_limits_last_summed_line_is_told_when_the_drain_ends(logged):
    # SIGTERM: what the client limit (and accept errors) had summed but not
    # yet told when the drain ends is told then; the process exits next.
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer.service import Options, _DrainOnStop, makeService

    o = Options()
    o.parseOptions(["--max-connections=1"])
    clock = MemoryReactorClock()
    top = makeService(o, reactor=clock)
    [drainOnStop] = [s for s in top if isinstance(s, _DrainOnStop)]
    limit = drainOnStop.factory.limit  # the proxy listener counts against it
    for _ in range(3):
        assert limit.admits()
        limit.opened()
        assert not limit.admits()  # refused: summed
        limit.closed()
    assert sum("client connection limit 1" in line for line in logged) == 1
    drainOnStop.stopService()
    told = [line for line in logged if "client connection limit 1" in line]
    assert len(told) == 2 and "reached 2 time(s)" in told[1] and "(3 closed at once)" in told[1], told
    assert not [c for c in clock.getDelayedCalls() if c.active()]
