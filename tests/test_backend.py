"""
The backend service in-process on loopback: connection counting, load
reports to a real control listener, draining on stop.
"""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from tests.loopback import until
from twistedcluster.backend import service as backend
from twistedcluster.core.cluster import Cluster
from twistedcluster.balancer.control import ControlFactory, ControlProtocol
from twistedcluster.wire import commands
from twistedcluster.localcluster import echoOnce
from twistedcluster.core.pool import State


class Harness:
    controlFactory = ControlFactory

    async def start(self, *args):
        self.cluster = Cluster()
        self.control = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.controlFactory(self.cluster, reactor)
        )
        controlPort = self.control.getHost().port
        o = backend.Options()
        o.parseOptions([
            "--listen=tcp:0:interface=127.0.0.1",
            f"--balancer=tcp:host=127.0.0.1:port={controlPort}",
            "--name=web1",
            "--report-interval=0.1",
            *args,
        ])
        self.svc = backend.makeService(o, reactor)
        self.svc.startService()
        self.port = self.svc.port.getHost().port
        await until(lambda: "web1" in self.cluster.pool, what="registration")
        return self

    async def stop(self):
        if self.svc.running:
            await self.svc.stopService()
        await self.control.stopListening()


@pytest.fixture
def harness():
    h = Harness()
    yield h
    pytest_twisted.blockon(defer.ensureDeferred(h.stop()))


def closedByPeer(sock) -> bool:
    """
    Whether the backend has closed C{sock} (an end of file, or a reset).
    """
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def openClient(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"hi")
    assert s.recv(10) == b"hi"
    return s


@pytest_twisted.ensureDeferred
async def test_registers_with_its_listening_address_and_reports_connections(harness):
    await harness.start("--capacity=4")
    s = harness.cluster.pool.get("web1")
    assert (s.host, s.port, s.capacity, s.state) == ("127.0.0.1", harness.port, 4, State.UP)
    clients = [await deferToThread(openClient, harness.port) for _ in range(2)]
    await until(lambda: harness.cluster.pool.get("web1").connections == 2, what="report of 2")
    assert harness.cluster.pool.get("web1").load == 0.5
    for c in clients:
        c.close()
    await until(lambda: harness.cluster.pool.get("web1").connections == 0, what="report of 0")


@pytest_twisted.ensureDeferred
async def test_counting_passes_half_close_through_to_the_service(harness):
    await harness.start()
    payload = b"half-close " * 10000
    assert await deferToThread(echoOnce, "127.0.0.1", harness.port, payload) == payload


@pytest_twisted.ensureDeferred
async def test_stop_drains_then_exits_when_idle(harness):
    await harness.start()
    held = await deferToThread(openClient, harness.port)
    stopped = harness.svc.stopService()
    await until(lambda: harness.cluster.pool.get("web1").state is State.DRAINING, what="draining")
    await until(lambda: harness.svc.port.disconnected, what="listener closed")
    with pytest.raises(ConnectionRefusedError):
        await deferToThread(socket.create_connection, ("127.0.0.1", harness.port), 2)
    # The held connection is still served.
    def echo():
        held.sendall(b"still")
        return held.recv(10)

    assert await deferToThread(echo) == b"still"
    assert not stopped.called
    held.close()
    await stopped


@pytest_twisted.ensureDeferred
async def test_drain_deadline_closes_what_is_left(harness, logged):
    await harness.start("--drain-timeout=0.3")
    held = await deferToThread(openClient, harness.port)
    started = reactor.seconds()
    await harness.svc.stopService()
    assert reactor.seconds() - started >= 0.3
    held.settimeout(5)
    assert await deferToThread(closedByPeer, held)
    assert any("drain deadline reached: closing 1 connection" in line for line in logged)
    held.close()


class MuteOnDrain(ControlProtocol):
    """
    A balancer that never answers a backend's Drain (hung, or far away).
    """

    @commands.Drain.responder
    def drain(self):
        return defer.Deferred()


class MuteOnDrainFactory(ControlFactory):
    def makeProtocol(self):
        return MuteOnDrain(self)


async def secondsToCloseOnStop(harness, held) -> float:
    """
    Stop the backend; the seconds until it closed C{held} (a client socket),
    once the stop is over.
    """
    held.settimeout(10)
    started = reactor.seconds()
    stopped = harness.svc.stopService()
    assert await deferToThread(closedByPeer, held)
    closedAfter = reactor.seconds() - started
    await stopped
    held.close()
    return closedAfter


@pytest_twisted.ensureDeferred
async def test_the_drain_deadline_counts_from_the_stop_not_from_the_balancers_answers(harness, logged):
    # The wait for the balancers' answers came on top of --drain-timeout:
    # a held client was closed 2 s late, past a service manager's grace.
    harness.controlFactory = MuteOnDrainFactory
    await harness.start("--drain-timeout=1")
    held = await deferToThread(openClient, harness.port)
    closedAfter = await secondsToCloseOnStop(harness, held)
    assert 1.0 <= closedAfter < 1.8, closedAfter
    lines = [line for line in logged if "did not acknowledge within 1 s" in line]
    assert lines and f"tcp:host=127.0.0.1:port={harness.control.getHost().port}" in lines[0], logged
    assert not any("answered Drain with an error" in line for line in logged)


class Busy(Factory):
    """
    A service that supplies its own load figure.
    """

    protocol = Protocol

    def currentLoad(self):
        return 0.75


busyFactory = Busy()


@pytest_twisted.ensureDeferred
async def test_a_service_may_report_its_own_load(harness):
    await harness.start(f"--service={__name__}.busyFactory")
    await until(lambda: harness.cluster.pool.get("web1").load == 0.75, what="custom load")


class Flaky(Factory):
    """
    A service whose own load figure fails, then comes back.
    """

    protocol = Protocol
    figures = [0.5]

    def currentLoad(self):
        figure = self.figures[0]
        if isinstance(figure, Exception):
            raise figure
        return figure


flakyFactory = Flaky()


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_a_service_whose_own_load_fails_goes_on_reporting(harness, logged):
    # One exception from currentLoad() stopped the reports for good: the
    # balancer took the backend for dead, its channel still open.
    await harness.start(f"--service={__name__}.flakyFactory")
    pool = harness.cluster.pool
    await until(lambda: pool.get("web1").load == 0.5, what="the service's figure")
    for bad in (ZeroDivisionError("division by zero"), float("nan"), -1.0):
        Flaky.figures[0] = bad
        reports = pool.get("web1").reports
        await until(lambda: pool.get("web1").reports >= reports + 2, what="reports going on")
        assert pool.get("web1").state.value == "up" and pool.get("web1").load == 0.0
    Flaky.figures[0] = 0.25
    await until(lambda: pool.get("web1").load == 0.25, what="the figure again")
    lines = [line for line in logged if "currentLoad() failed" in line]
    assert lines and "ZeroDivisionError: division by zero" in lines[0], logged
    Flaky.figures[0] = 0.5
    # What is pending is told when the service stops, and no timer is left
    # (a minute later it logged into whatever ran then).
    await harness.svc.stopService()
    assert len([line for line in logged if "currentLoad() failed" in line]) == 2
    assert not [c for c in reactor.getDelayedCalls() if "Summary" in repr(c.func)]


@pytest_twisted.ensureDeferred
async def test_out_of_descriptors_on_the_service_listener_is_one_line_a_second(harness, logged):
    # Twisted's port logs three lines for the first connection it closes
    # unaccepted and one for each other; the balancer's listeners sum them
    # (twistedcluster.balancer.limits.AcceptErrors), and so does the backend's.
    import resource

    from tests.test_limits import acceptQueue, lowestFreeDescriptor

    await harness.start()
    port = harness.svc.port
    port.stopReading()  # this test calls doRead itself, as the reactor would
    clients = []
    try:
        for _ in range(5):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", harness.port))
            clients.append(s)
        await until(lambda: acceptQueue(port) == 5, what="5 waiting")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowestFreeDescriptor(), hard))
        try:
            port.doRead()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert acceptQueue(port) == 0
    finally:
        for s in clients:
            s.close()
        port.startReading()
    lines = [line for line in logged if "EMFILE" in line or "descriptor" in line]
    assert len(lines) == 1, lines
    assert "5 connection(s) closed unaccepted" in lines[0]
    assert "service listener" in lines[0]


class Joining(Factory):
    """
    A service with drain(): records the call, and what it returns is set by
    the test (None, a Deferred, or an exception to raise).
    """

    protocol = Protocol

    def __init__(self):
        self.calls = []
        self.result = None

    def drain(self):
        self.calls.append(reactor.seconds())
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


joiningFactory = Joining()


@pytest.fixture
def joining():
    joiningFactory.__init__()
    return joiningFactory


@pytest_twisted.ensureDeferred
async def test_drain_calls_the_service_drain_after_the_listener_closed(harness, joining):
    await harness.start(f"--service={__name__}.joiningFactory", "--drain-timeout=5")
    joining.result = defer.Deferred()
    stopped = harness.svc.stopService()
    await until(lambda: joining.calls, what="drain() called")
    assert harness.svc.port.disconnected
    assert harness.cluster.pool.get("web1").state is State.DRAINING
    assert not stopped.called  # it waits for what drain() returned
    joining.result.callback(None)
    await stopped
    assert len(joining.calls) == 1


@pytest_twisted.ensureDeferred
async def test_a_service_drain_that_fails_or_hangs_does_not_stop_the_drain(
    harness, joining, logged, observeErrors
):
    await harness.start(f"--service={__name__}.joiningFactory", "--drain-timeout=0.3")
    joining.result = defer.Deferred()  # never fires
    started = reactor.seconds()
    await harness.svc.stopService()
    assert 0.3 <= reactor.seconds() - started < 5
    assert any("drain() had not finished after 0.3 s" in line for line in logged)
    joining.__init__()
    joining.result = RuntimeError("boom")
    await harness.stop()
    await harness.start(f"--service={__name__}.joiningFactory")
    await harness.svc.stopService()
    assert joining.calls
    assert any("the service's drain() failed: RuntimeError('boom')" in line for line in logged)
    observeErrors.clear()  # that error is what this test expects


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_a_service_drain_that_hangs_gets_what_is_left_of_the_deadline_not_all_of_it(harness, joining, logged):
    # A balancer that does not acknowledge (the whole 1 s goes in waiting
    # for it) and a drain() that never finishes: the connections are still
    # closed at the deadline counted from the stop.
    harness.controlFactory = MuteOnDrainFactory
    await harness.start(f"--service={__name__}.joiningFactory", "--drain-timeout=1")
    joining.result = defer.Deferred()
    held = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    await until(lambda: harness.svc.factory.count == 1, what="the client counted")
    closedAfter = await secondsToCloseOnStop(harness, held)
    assert 1.0 <= closedAfter < 1.8, closedAfter
