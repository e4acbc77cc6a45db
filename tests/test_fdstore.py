"""
systemd's file-descriptor store, in one process with real sockets: the
balancer's side (L{fdstore.FDStoreService}, L{fdstore.fromSystemd}) against
the fake systemd of tests/fakesystemd.py.  The real-process test is
tests/test_e2e_fdstore.py.
"""

import json
import os
import shutil
import socket
import tempfile

import pytest
import pytest_twisted
from twisted.internet import defer, protocol

from tests.fakesystemd import FakeSystemd
from tests.loopback import until
from twistedcluster.balancer import fdstore


@pytest.fixture
def systemd():
    d = tempfile.mkdtemp(prefix="fds-")
    fake = FakeSystemd(os.path.join(d, "notify"), room=16)
    yield fake
    fake.close()
    shutil.rmtree(d, ignore_errors=True)


def passedBack(fake):
    """
    What a restarted process gets: name -> its own copy of each stored
    descriptor (systemd passes copies; the fake keeps its own).
    """
    with fake.lock:
        return {name: os.dup(fd) for name, fd in fake.store}


def listening(fd):
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        probe.close()


def test_capacity_comes_from_FDSTORE_under_systemd():
    assert fdstore.capacity({}) == 0
    assert fdstore.capacity({"FDSTORE": "16"}) == 0  # no notify socket
    assert fdstore.capacity({"NOTIFY_SOCKET": "/run/n", "FDSTORE": "16"}) == 16
    assert fdstore.capacity({"NOTIFY_SOCKET": "/run/n"}) == 0  # no store
    assert fdstore.capacity({"NOTIFY_SOCKET": "/run/n", "FDSTORE": "x"}) == 0


@pytest.mark.parametrize(
    "description, stored",
    [
        ("tcp:8000", True),
        ("tcp:8000:interface=127.0.0.1:backlog=4096", True),
        ("tcp6:8000", True),
        ("8000", True),
        ("ssl:8443:privateKey=k.pem", False),
        ("mtls:8100:privateKey=k.pem:certKey=c.pem:caCerts=ca.pem", False),
        ("unix:/run/x.sock", False),
        ("systemd:domain=INET:name=proxy", False),
    ],
)
def test_only_tcp_listeners_are_stored(description, stored):
    assert fdstore.storable(description) is stored


def test_names_of_socket_units_are_not_ours():
    assert fdstore.systemdNames(["systemd:domain=INET:name=proxy", "tcp:8100"]) == ["proxy"]


def taggedFactory(tag):
    class Tagged(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(tag)
            self.transport.loseConnection()

    f = protocol.Factory.forProtocol(Tagged)
    f.noisy = False
    return f


def readTag(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(16)


@pytest_twisted.ensureDeferred
async def test_listeners_are_stored_by_role_and_adopted_by_the_next_process(systemd):
    """
    The first process stores its TCP listeners under their roles with
    the memfd of their endpoints and the one of the pool; stopping its
    ports leaves the stored sockets listening.  The next one adopts each
    socket whose endpoint is the same, and closes and removes one whose
    endpoint changed before it binds anew.
    """
    from twisted.internet import reactor, threads

    env = systemd.environ()
    proxy = reactor.listenTCP(0, taggedFactory(b"old"), interface="127.0.0.1")
    control = reactor.listenTCP(0, taggedFactory(b"ctl"), interface="127.0.0.1")
    proxyPort, controlPort = proxy.getHost().port, control.getHost().port
    descriptions = {
        "proxy": f"tcp:{proxyPort}:interface=127.0.0.1",
        "control": f"tcp:{controlPort}:interface=127.0.0.1",
        "takeover": "/run/t.sock",
    }
    live = [{"name": "b1", "host": "127.0.0.1", "port": 9, "capacity": 10,
             "connections": 0, "load": 0.0, "selfDraining": False, "timeout": 3.0}]
    first = fdstore.FDStoreService(
        {"proxy": proxy, "control": control}, descriptions, None, 16,
        live=lambda: live, environ=env,
    )
    assert first.store() == ["proxy", "control"]
    await until(lambda: len(systemd.names()) == 4, 10, "the fake systemd to store them")
    assert sorted(systemd.names()) == ["control", "listeners.json", "pool.json", "proxy"]
    described = json.loads(os.pread(systemd.stored("listeners.json"), 4096, 0))
    assert described == {"listeners": {"proxy": descriptions["proxy"], "control": descriptions["control"]}}
    assert json.loads(os.pread(systemd.stored("pool.json"), 4096, 0)) == {"live": live}
    # The pool is rewritten in the same file systemd holds.
    live.append(dict(live[0], name="b2"))
    first.writePool()
    assert [b["name"] for b in json.loads(os.pread(systemd.stored("pool.json"), 4096, 0))["live"]] == ["b1", "b2"]
    # The first process goes away (SIGTERM: its ports stop); systemd's
    # copies still listen, connections wait in their backlog.
    await defer.maybeDeferred(proxy.stopListening)
    await defer.maybeDeferred(control.stopListening)
    assert listening(systemd.stored("proxy")) and listening(systemd.stored("control"))
    waiting = socket.create_connection(("127.0.0.1", proxyPort), timeout=10)

    stored = fdstore.fromSystemd(passedBack(systemd), environ=env)
    assert stored.state == {"live": live}
    endpoint = stored.take("proxy", descriptions["proxy"], reactor)
    assert endpoint is not None
    # The control endpoint changed: not adopted.
    assert stored.take("control", f"tcp:{controlPort}:interface=0.0.0.0", reactor) is None
    assert stored.adopted == ["proxy"]
    removed = await threads.deferToThread(stored.release)
    assert removed == ["control"]
    assert "control" not in systemd.names() and systemd.said("BARRIER")
    # Nothing holds the old control socket now: its address binds again.
    again = reactor.listenTCP(controlPort, taggedFactory(b"new-ctl"), interface="0.0.0.0")
    adopted = await endpoint.listen(taggedFactory(b"new"))
    try:
        assert adopted.getHost().port == proxyPort
        # The client that waited in the backlog is served by the new port.
        assert await threads.deferToThread(waiting.recv, 16) == b"new"
        assert await threads.deferToThread(readTag, proxyPort) == b"new"
        second = fdstore.FDStoreService(
            {"proxy": adopted, "control": again},
            {"proxy": descriptions["proxy"], "control": f"tcp:{controlPort}:interface=0.0.0.0"},
            stored, 16, environ=env,
        )
        assert second.store() == ["proxy", "control"]
        await until(lambda: sorted(systemd.names()) == ["control", "listeners.json", "pool.json", "proxy"], 10, "the store")
        # The adopted socket was not sent again; the new control one was.
        proxies = [m for m in systemd.said("FDSTORE") if m.get("FDNAME") == "proxy" and m.get("FDSTORE") == "1"]
        assert len(proxies) == 1
        assert socket.socket(fileno=os.dup(systemd.stored("control"))).getsockname() == ("0.0.0.0", controlPort)
    finally:
        waiting.close()
        await defer.maybeDeferred(adopted.stopListening)
        await defer.maybeDeferred(again.stopListening)


def test_a_store_without_room_keeps_what_fits(systemd):
    from twisted.internet import reactor

    ports = {r: reactor.listenTCP(0, taggedFactory(b"x"), interface="127.0.0.1") for r in ("proxy", "control", "admin")}
    try:
        svc = fdstore.FDStoreService(
            ports, {r: f"tcp:{p.getHost().port}" for r, p in ports.items()}, None, 3,
            environ=systemd.environ(),
        )
        assert svc.store() == ["proxy"]
    finally:
        for p in ports.values():
            p.stopListening()


def test_nothing_of_ours_comes_back():
    assert fdstore.fromSystemd({}) is None
    r, w = os.pipe()
    try:
        # A socket unit's descriptor named like a role is not ours.
        assert fdstore.fromSystemd({"proxy": r}, skip=["proxy"]) is None
    finally:
        os.close(r)
        os.close(w)


def test_systemd_descriptors_are_read_where_twisted_reads_them(monkeypatch):
    """
    The names come from the list Twisted's systemd: endpoints use (which
    Twisted read from the environment, and took out of it, when
    twisted.internet.endpoints was imported).
    """
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    from twistedcluster.fast.internals import systemdDescriptors

    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([3, 4], ("proxy", "control")))
    assert systemdDescriptors() == {"proxy": 3, "control": 4}
