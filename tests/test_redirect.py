"""
The redirect listener, in memory.
"""

import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistedcluster.core.cluster import Cluster
from twistedcluster.balancer.redirect import RedirectFactory


def ask(cluster, factory=None):
    if factory is None:
        factory = RedirectFactory(cluster, Clock())
    proto = factory.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    proto.dataReceived(b"garbage that is ignored\r\n\x00\xff")
    return t


def test_answers_one_line_naming_a_backend_and_closes():
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    t = ask(c)
    assert t.value() == b"127.0.0.1 9001\r\n"
    assert t.disconnecting


def test_no_backend():
    t = ask(Cluster())
    assert t.value() == b"ERROR no-backend\r\n"
    assert t.disconnecting


def test_ipv6_backend():
    c = Cluster()
    c.pool.register("a", "::1", 9001)
    assert ask(c).value() == b"::1 9001\r\n"


def test_redirects_count_as_routed_so_least_load_spreads_them():
    c = Cluster()
    for i in range(3):
        c.pool.register(f"b{i}", "127.0.0.1", 9000 + i, capacity=10)
    answers = [ask(c).value() for _ in range(30)]
    assert {a: answers.count(a) for a in set(answers)} == {
        b"127.0.0.1 9000\r\n": 10,
        b"127.0.0.1 9001\r\n": 10,
        b"127.0.0.1 9002\r\n": 10,
    }
    assert [s.routed for s in c.pool.snapshot()] == [10, 10, 10]
    assert [s.active for s in c.pool.snapshot()] == [0, 0, 0]


class Peer:
    def __init__(self, host):
        self.host = host
        self.port = 1234


def askFrom(factory, host):
    proto = factory.buildProtocol(None)
    t = StringTransport(peerAddress=Peer(host))
    proto.makeConnection(t)
    return t.value()


def test_an_asker_that_never_connects_cannot_use_up_the_cluster():
    # One source asks far more often than it could use: only its share of
    # answers counts as load, so the others still get backends.
    from twistedcluster.balancer.redirect import HandOffs

    c = Cluster()
    for i in range(3):
        c.pool.register(f"b{i}", "127.0.0.1", 9000 + i, capacity=10)
    clock = Clock()
    factory = RedirectFactory(c, clock, HandOffs(window=2.0, perSource=4))
    answers = [askFrom(factory, "127.0.0.9") for _ in range(1000)]
    assert b"ERROR no-backend\r\n" not in answers
    assert sum(s.addedSinceReport for s in c.pool.snapshot()) == 4
    honest = [askFrom(factory, "127.0.0.1") for _ in range(4)]
    assert b"ERROR no-backend\r\n" not in honest
    assert sum(s.addedSinceReport for s in c.pool.snapshot()) == 8
    # After the window, those never seen by a report stop counting, and the
    # source has its share again.
    clock.advance(2.0)
    askFrom(factory, "127.0.0.9")
    assert sum(s.addedSinceReport for s in c.pool.snapshot()) == 1


def test_without_a_share_limit_one_asker_would_fill_the_cluster():
    # The same flood with a share as large as the cluster: the honest ask
    # finds no room (what the share prevents).
    from twistedcluster.balancer.redirect import HandOffs

    c = Cluster()
    for i in range(3):
        c.pool.register(f"b{i}", "127.0.0.1", 9000 + i, capacity=10)
    factory = RedirectFactory(c, Clock(), HandOffs(window=2.0, perSource=10**6))
    for _ in range(100):
        askFrom(factory, "127.0.0.9")
    assert askFrom(factory, "127.0.0.1") == b"ERROR no-backend\r\n"


def test_ipv6_clients_share_by_slash_64():
    from twistedcluster.balancer.redirect import sourceOf

    assert sourceOf(Peer("2001:db8::1")) == sourceOf(Peer("2001:db8::ffff:1"))
    assert sourceOf(Peer("2001:db8:0:1::1")) != sourceOf(Peer("2001:db8::1"))
    assert sourceOf(Peer("127.0.0.1")) != sourceOf(Peer("127.0.0.2"))
    assert sourceOf(object()) == "local"


def test_refusals_are_logged_at_most_once_a_second(logged):
    clock = Clock()
    factory = RedirectFactory(Cluster(), clock)
    for _ in range(50):
        askFrom(factory, "127.0.0.1")
    lines = [line for line in logged if "no backend available" in line]
    assert len(lines) == 1 and "1 client(s) answered ERROR no-backend just now" in lines[0]
    # The rest of the burst is told when the second is over, without
    # waiting for another refusal (which may never come).
    clock.advance(1.0)
    lines = [line for line in logged if "no backend available" in line]
    assert len(lines) == 2
    assert "49 client(s) answered ERROR no-backend in the last 1.0 s" in lines[1]
    askFrom(factory, "127.0.0.1")
    clock.advance(1.0)
    assert len([line for line in logged if "no backend available" in line]) == 3
    assert factory.refused == 51


def test_a_backend_with_a_bad_host_is_not_named(logged):
    # Hosts are validated where they come in; this is the last line.
    c = Cluster()
    c.pool.register("a", "127.0.0.1 1\r\nEVIL", 9001)
    t = ask(c)
    assert t.value() == b"ERROR no-backend\r\n"
    assert any("not a valid host" in line for line in logged)



@pytest_twisted.ensureDeferred
async def test_a_tls_client_is_answered_only_once_its_handshake_is_done(tmp_path):
    # --redirect ssl:...: a client that connects and never handshakes is
    # not given a backend (nor counted as load on one); one that does is.
    import socket

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThread

    from tests.certificates import loopbackTLS

    description, context = loopbackTLS(tmp_path)
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001, capacity=10)
    factory = RedirectFactory(c, reactor)
    port = await serverFromString(reactor, description).listen(factory)
    number = port.getHost().port
    try:
        silent = socket.create_connection(("127.0.0.1", number), timeout=5)
        try:
            await deferLater(reactor, 0.3, lambda: None)
            s = c.pool.get("a")
            assert (s.routed, s.addedSinceReport) == (0, 0)

            def run():
                with socket.create_connection(("127.0.0.1", number), timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        return tls.recv(100)

            assert await deferToThread(run) == b"127.0.0.1 9001\r\n"
            assert c.pool.get("a").routed == 1
        finally:
            silent.close()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_tls_client_that_never_handshakes_is_closed_in_time(tmp_path):
    import socket

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.task import deferLater

    from tests.certificates import loopbackTLS

    description, _ = loopbackTLS(tmp_path)
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001, capacity=10)
    factory = RedirectFactory(c, reactor)
    factory.handshakeTimeout = 0.3
    ended = []
    factory.traffic.redirectEnded = lambda client, now: ended.append(client._end)
    port = await serverFromString(reactor, description).listen(factory)
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as silent:
            await deferLater(reactor, 1.0, lambda: None)
            assert ended == ["handshake_timeout"]
            assert c.pool.get("a").routed == 0
    finally:
        await port.stopListening()


def test_settled_hand_offs_have_their_backends_sent_a_newer_mark():
    # Their backends' next reports count them only with a mark newer than
    # their settling: the control listener is told at once which backends
    # need one (ControlFactory.pushMarks), not after their next report.
    from twistedcluster.balancer.redirect import HANDOFF_SETTLE, HandOffs

    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001, capacity=100)
    c.pool.register("b", "127.0.0.1", 9002, capacity=100)
    clock = Clock()
    factory = RedirectFactory(c, clock, HandOffs(window=2.0, perSource=100))
    told = []
    factory.pushMarks = told.append
    for i in range(4):
        askFrom(factory, f"10.0.0.{i}")
    assert told == []
    clock.advance(HANDOFF_SETTLE)
    assert told == [{"a", "b"}]
    assert all(c.pool.markDue(n, None) for n in "ab")


def test_a_workers_answer_waits_for_its_share_and_no_longer_than_the_room():
    """
    In a worker (--workers), an answer that would exceed the worker's share
    of a backend that has room waits for the share to move, as a proxy
    client does; it is answered ERROR no-backend as soon as the room is
    gone (one process would answer that at once), or after the queue's
    timeout.  Its answers use its share as held connections would.
    """
    from twistedcluster.balancer.admission import WaitQueue

    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001, capacity=4)
    c.pool.setQuota("a", 1)
    clock = Clock()
    factory = RedirectFactory(c, clock)
    factory.shareWait = WaitQueue(c.pool, clock, 0, 5.0)
    assert ask(c, factory).value() == b"127.0.0.1 9001\r\n"
    assert c.pool.get("a").quota == 0  # the answer used the share
    # The share is used, the backend has room: the next waits.
    waiting = ask(c, factory)
    assert (waiting.value(), waiting.disconnecting) == (b"", False)
    assert len(factory.shareWait) == 1
    c.pool.setQuota("a", 1)  # the share moved here
    clock.advance(0)
    assert waiting.value() == b"127.0.0.1 9001\r\n" and waiting.disconnecting
    # Waiting again; then the room is gone: refused at once.
    waiting = ask(c, factory)
    assert waiting.value() == b""
    c.pool.report("a", 4, 1.0)
    clock.advance(0)
    assert waiting.value() == b"ERROR no-backend\r\n" and waiting.disconnecting
    assert factory.refused == 1
    # Room, but the share never comes: refused after the queue's timeout.
    c.pool.report("a", 2, 0.5)
    waiting = ask(c, factory)
    clock.advance(4.9)
    assert waiting.value() == b""
    clock.advance(0.1)
    assert waiting.value() == b"ERROR no-backend\r\n"
    # A client that leaves while it waits waits no more.
    proto = factory.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    assert len(factory.shareWait) == 1
    proto.connectionLost(None)
    assert len(factory.shareWait) == 0
    # One process (no share queue) never waits: nothing is room elsewhere.
    c.pool.setQuota("a", None)
    c.pool.report("a", 4, 1.0)
    assert ask(c).value() == b"ERROR no-backend\r\n"


def test_an_answer_of_a_worker_that_died_settles_in_the_main_process_first():
    """
    A worker that died held an answer its client may not have followed
    yet: the main process lets it settle as its own answers do before its
    backend's next report may count it (sent a newer mark then), and
    expires it after the window; one handed off settled is marked at once.
    """
    from twistedcluster.balancer.redirect import HANDOFF_SETTLE, HandOffs

    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001, capacity=10)
    clock = Clock()
    factory = RedirectFactory(c, clock, HandOffs(window=2.0, perSource=10))
    told = []
    factory.pushMarks = told.append
    ticket = c.pool.acquire("a")
    c.pool.handOff("a", ticket)  # as mirror.fold counts a worker's answer
    factory.handedOff("a", ticket, settled=False)
    clock.advance(0)
    assert told == [] and not c.pool.markDue("a", None)
    clock.advance(HANDOFF_SETTLE)
    assert told == [{"a"}] and c.pool.markDue("a", None)
    clock.advance(2.0)
    assert c.pool.get("a").estimatedConnections == 0  # expired
    settled = c.pool.acquire("a")
    c.pool.handOff("a", settled)
    c.pool.connected("a", settled, served=False)
    factory.handedOff("a", settled)
    clock.advance(0)
    assert told[-1] == {"a"} and len(told) == 2
