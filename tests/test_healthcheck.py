"""
Active TCP checks of static backends, on a MemoryReactorClock.
"""

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistedcluster.balancer.healthcheck import TCPHealthChecks
from twistedcluster.core.pool import Pool, State


def succeed(mr):
    host, port, factory, timeout, bind = mr.tcpClients.pop(0)
    mr.connectors.pop(0)
    p = factory.buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    assert t.disconnecting  # a check connects and closes


def fail(mr):
    host, port, factory, timeout, bind = mr.tcpClients.pop(0)
    factory.clientConnectionFailed(mr.connectors.pop(0), Failure(ConnectionRefusedError()))


def test_static_backend_falls_and_rises(logged):
    mr = MemoryReactorClock()
    pool = Pool()
    checks = TCPHealthChecks(pool, mr, [("127.0.0.1", 8080)], interval=2, rise=2, fall=3)
    checks.startService()
    s = pool.get("127.0.0.1:8080")
    assert (s.state, s.static) == (State.UP, True)
    fail(mr)  # the first check runs at once
    for _ in range(2):
        mr.advance(2)
        fail(mr)
    assert pool.get("127.0.0.1:8080").state is State.DOWN
    assert any("failed 3 checks in a row" in line for line in logged)
    mr.advance(2)
    succeed(mr)
    assert pool.get("127.0.0.1:8080").state is State.DOWN  # one is not enough
    mr.advance(2)
    succeed(mr)
    assert pool.get("127.0.0.1:8080").state is State.UP
    checks.stopService()


def test_a_slow_check_is_not_stacked():
    mr = MemoryReactorClock()
    checks = TCPHealthChecks(Pool(), mr, [("127.0.0.1", 8080)], interval=1)
    checks.startService()
    mr.advance(1)
    mr.advance(1)
    assert len(mr.tcpClients) == 1
    checks.stopService()


def test_checks_send_a_proxy_header_when_backends_expect_one():
    from twisted.internet.address import IPv4Address

    for version, expected in (
        ("v2", b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"),  # LOCAL, as HAProxy's checks
        ("v1", b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 8080\r\n"),  # the check's own addresses
    ):
        mr = MemoryReactorClock()
        checks = TCPHealthChecks(Pool(), mr, [("127.0.0.1", 8080)], interval=1, sendProxy=version)
        checks.startService()
        host, port, factory, timeout, bind = mr.tcpClients.pop(0)
        p = factory.buildProtocol(None)
        t = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 8080),
        )
        p.makeConnection(t)
        assert t.value() == expected and t.disconnecting
        checks.stopService()


def test_a_backend_of_its_own_is_checked_with_its_own_header():
    mr = MemoryReactorClock()
    checks = TCPHealthChecks(
        Pool(), mr, [("127.0.0.1", 8080), ("127.0.0.1", 8081)], interval=1,
        sendProxyFor={"127.0.0.1:8081": "v2"},
    )
    checks.startService()
    sent = {}
    for host, port, factory, timeout, bind in mr.tcpClients:
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        sent[port] = t.value()
    assert sent == {8080: b"", 8081: b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"}
    checks.stopService()


def test_stopping_a_check_in_flight_is_not_a_failed_check(logged):
    """
    Removing a static backend, or stopping the balancer, while a check is
    on its way cancels that check: not a failure of the backend, so one at
    C{fall - 1} failures is not marked down or logged as failing.
    """
    mr = MemoryReactorClock()
    pool = Pool()
    checks = TCPHealthChecks(pool, mr, [("127.0.0.1", 8080)], interval=2, fall=2)
    checks.startService()
    fail(mr)  # one failure of two
    mr.advance(2)  # the second check is in flight
    assert len(mr.tcpClients) == 1
    checks.stopService()
    assert pool.get("127.0.0.1:8080").state is State.UP
    assert not any("failed 2 checks" in line for line in logged)


def test_an_ejected_backend_that_passes_its_checks_says_so_once_and_stays_out(logged):
    # Taken out by the passive check (its connects failed), a backend whose
    # TCP checks pass stays out until the ejection is over; the log said
    # "passed N checks: up" at every check, N climbing, while it stayed down.
    mr = MemoryReactorClock()
    pool = Pool()
    pool.maxEjectedPercent = 100
    checks = TCPHealthChecks(pool, mr, [("127.0.0.1", 8080)], interval=2, rise=2, fall=3)
    checks.startService()
    name = "127.0.0.1:8080"
    succeed(mr)  # passing checks before it is taken out: past rise already
    for _ in range(3):
        mr.advance(2)
        succeed(mr)
    assert pool.eject(name)
    mr.advance(2)
    succeed(mr)
    for _ in range(4):
        mr.advance(2)
        succeed(mr)
    assert pool.get(name).state is State.DOWN
    assert not any(": up" in line for line in logged)
    assert sum("but stays out" in line for line in logged) == 1
    pool.readmit(name)
    assert pool.get(name).state is State.UP
    checks.stopService()
