"""
The takeover handshake in one process, real sockets: the old side
(L{Handover} behind its unix socket) in the reactor, the new side's
blocking L{inherit} in a thread.  The real-process test is
tests/test_e2e_takeover.py.
"""

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, threads

from tests.loopback import until
from twistedcluster.balancer import takeover


class Tagged(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(self.factory.tag)
        self.transport.loseConnection()


def taggedFactory(tag):
    f = protocol.Factory.forProtocol(Tagged)
    f.tag = tag
    f.noisy = False
    return f


def readTag(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(16)


@pytest.fixture
def shortDir():
    """
    A folder with a short path (a unix socket's has at most 107 bytes;
    pytest's tmp_path is long), removed afterwards.
    """
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="tk-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def shortPath(folder, name):
    return os.path.join(folder, name)


def test_no_balancer_at_the_path(shortDir):
    path = shortPath(shortDir, "none.sock")
    assert takeover.inherit(path) is None


def test_a_stale_path_is_removed(shortDir):
    path = shortPath(shortDir, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # the file stays; nothing listens
    assert takeover.inherit(path) is None
    assert not os.path.exists(path)


@pytest_twisted.ensureDeferred
async def test_listeners_and_state_are_handed_over(shortDir):
    """
    The new side gets the old listening socket and the snapshot; once it
    says ready, the old side stops listening without shutting the shared
    socket down: connections go on being accepted, by the adopted port.
    """
    from twisted.internet import reactor

    old = reactor.listenTCP(0, taggedFactory(b"old"), interface="127.0.0.1")
    number = old.getHost().port
    stopped = []
    snapshot = {"operator": {"policy": "p2c"}, "live": []}
    handover = takeover.Handover(
        {"proxy": old}, {"proxy": "tcp:0"}, lambda: snapshot, lambda: stopped.append(True)
    )
    path = shortPath(shortDir, "t.sock")
    giver = protocol.Factory.forProtocol(takeover._Giver)
    giver.handover = handover
    unixPort = reactor.listenUNIX(path, giver, mode=0o600)
    adopted = None
    inh = await threads.deferToThread(takeover.inherit, path)
    assert inh.state == snapshot
    assert set(inh.listeners) == {"proxy"}
    # A listener whose endpoint string changed is not adopted; a new side
    # that goes away before ready leaves the old one serving.
    assert inh.take("proxy", "tcp:1", reactor) is None
    inh.channel.close()
    await until(lambda: not handover.busy, 10, "the old side to see the new one gone")
    assert old.connected and not stopped
    inh = await threads.deferToThread(takeover.inherit, path)
    # A second new process while this one is under way is refused, saying
    # so; its going does not end the first one's handover.
    with pytest.raises(takeover.TakeoverError, match="handing its listeners to another new process"):
        await threads.deferToThread(takeover.inherit, path)
    with pytest.raises(takeover.TakeoverError, match="handing its listeners to another new process"):
        await threads.deferToThread(takeover.inherit, path)
    assert handover.busy
    endpoint = inh.take("proxy", "tcp:0", reactor)
    assert endpoint is not None
    adopted = await endpoint.listen(taggedFactory(b"new"))
    try:
        assert adopted.getHost().port == number
        await threads.deferToThread(inh.ready)
        await until(lambda: stopped, 10, "the old side to be told ready")
        await until(lambda: not old.connected, 10, "the old port to stop")
        # The socket is still listening: the adopted port accepts.
        for _ in range(5):
            assert await threads.deferToThread(readTag, number) == b"new"
        # Once handed over, a second request is refused.
        with pytest.raises(takeover.TakeoverError, match="handed its listeners over"):
            await threads.deferToThread(takeover.inherit, path)
    finally:
        await defer.maybeDeferred(adopted.stopListening)
        await defer.maybeDeferred(unixPort.stopListening)
        if old.connected:
            await defer.maybeDeferred(old.stopListening)


def test_systemd_is_notified(shortDir):
    path = shortPath(shortDir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        assert takeover.notifySystemd("READY=1", {"NOTIFY_SOCKET": path})
        assert s.recv(64) == b"READY=1"
    abstract = f"tc-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + abstract)
        assert takeover.notifySystemd("MAINPID=7\nREADY=1", {"NOTIFY_SOCKET": "@" + abstract})
        assert s.recv(64) == b"MAINPID=7\nREADY=1"
    assert not takeover.notifySystemd("READY=1", {})


def test_takeover_with_workers_is_refused_clearly():
    """
    The workers share the listening sockets, which a takeover does not yet
    hand over: the combination is a usage error, not half an upgrade.
    """
    import pytest
    from twisted.python import usage

    from twistedcluster.balancer.service import Options

    with pytest.raises(usage.UsageError, match="--takeover cannot be used with --workers"):
        Options().parseOptions(["--workers=2", "--takeover=/tmp/tc-takeover.sock"])


def readTagOverTLS(port, caFile):
    import ssl

    context = ssl.create_default_context(cafile=str(caFile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            return s.recv(16)


def readInClear(port):
    """
    What a client that speaks no TLS reads: it sends a line and reads
    until the server closes (a TLS server answers with an alert, never the
    protocol's bytes).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hello\r\n")
        data = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data


@pytest_twisted.ensureDeferred
async def test_a_tls_listener_taken_over_still_speaks_tls(shortDir, tmp_path):
    """
    An adopted socket is bare TCP: the new side puts the TLS layer of the
    C{ssl:} string back on, so its clients are not served in clear.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from tests.certificates import Authority, writePair

    ca = Authority()
    caFile = ca.writeCA(tmp_path / "ca")
    key, cert = writePair(tmp_path, "server", *ca.issue("localhost", dns=["localhost"]))
    description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    old = await serverFromString(reactor, description).listen(taggedFactory(b"old"))
    number = old.getHost().port
    assert await threads.deferToThread(readTagOverTLS, number, caFile) == b"old"
    stopped = []
    handover = takeover.Handover(
        {"proxy": old}, {"proxy": description}, lambda: {"live": []},
        lambda: stopped.append(True),
    )
    path = shortPath(shortDir, "t.sock")
    giver = protocol.Factory.forProtocol(takeover._Giver)
    giver.handover = handover
    unixPort = reactor.listenUNIX(path, giver, mode=0o600)
    adopted = None
    try:
        inh = await threads.deferToThread(takeover.inherit, path)
        adopted = await inh.take("proxy", description, reactor).listen(taggedFactory(b"new"))
        await threads.deferToThread(inh.ready)
        await until(lambda: not old.connected, 10, "the old port to stop")
        assert await threads.deferToThread(readTagOverTLS, number, caFile) == b"new"
        assert b"new" not in await threads.deferToThread(readInClear, number)
    finally:
        if adopted is not None:
            await defer.maybeDeferred(adopted.stopListening)
        await defer.maybeDeferred(unixPort.stopListening)
        if old.connected:
            await defer.maybeDeferred(old.stopListening)


def test_a_live_backend_handed_over_does_not_take_a_static_backends_name(logged):
    # The old process heard from a backend "web"; the new one is started
    # with --backend web=...: the static backend keeps its name, address
    # and state, and the handed-over one's heartbeat does not mark it down.
    from twisted.internet.task import Clock

    from twistedcluster.balancer.control import ControlFactory
    from twistedcluster.balancer.healthcheck import TCPHealthChecks
    from twistedcluster.balancer.staticbackend import StaticBackend
    from twistedcluster.balancer.takeover import restoreLive
    from twistedcluster.core.cluster import Cluster
    from twistedcluster.core.pool import State

    clock = Clock()
    cluster = Cluster()
    control = ControlFactory(cluster, clock)
    statics = TCPHealthChecks(cluster.pool, clock, [StaticBackend("web", "127.0.0.1", 6379)])
    live = [{"name": "web", "host": "127.0.0.1", "port": 9000, "capacity": 10,
             "connections": 0, "load": 0.0, "timeout": 3.0}]
    restored = restoreLive({"live": live}, cluster, control, clock, statics=statics)
    assert restored == []
    assert any("web" in line and "static" in line for line in logged)
    statics.startService()
    clock.advance(3.5)
    s = cluster.pool.get("web")
    assert (s.static, s.port, s.state) == (True, 6379, State.UP)
    statics.stopService()


@pytest.mark.parametrize("stored, expected", [({}, "p2c"), ({"policy": "hash"}, "hash")])
def test_with_a_state_store_the_policy_comes_from_the_store_not_the_old_process(
    shortDir, monkeypatch, stored, expected
):
    # With --state-store, the policy is the store's once an operator set
    # one, and each balancer's own --policy until then: a takeover must not
    # carry the old process's --policy over the new one's.
    import socket as socketModule

    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer import statestore
    from twistedcluster.balancer.service import Options, makeService

    old = {"operator": {"version": 1, "policy": "round-robin", "backends": {}, "static": {}},
           "live": []}
    monkeypatch.setattr(
        takeover, "inherit",
        lambda path: takeover.Inheritance(socketModule.socket(socketModule.AF_UNIX), {}, old),
    )
    monkeypatch.setattr(statestore, "loadBlocking", lambda *a, **kw: dict(stored))
    o = Options()
    o.parseOptions([f"--takeover={shortPath(shortDir, 't.sock')}",
                    "--state-store=etcd:127.0.0.1:1", "--policy=p2c"])
    top = makeService(o, reactor=MemoryReactorClock())
    assert top.cluster.policyName == expected
