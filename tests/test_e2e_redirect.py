"""
Redirect mode end to end: a real balancer with a redirect listener and real
backends (``twistd`` processes on 127.0.0.1), asked by raw sockets, by the
``cluster:`` endpoint and by ``cluster-connect``.  Every wait is bounded;
every process is stopped in teardown.
"""

import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread

from twistedcluster.localcluster import LocalCluster, echoOnce, freePort
from twistedcluster.client.redirectclient import NoBackendAvailable, parseAnswer

pytestmark = pytest.mark.e2e

BACKENDS = ["backend-1", "backend-2"]


def assertNoTracebacks(cluster):
    for proc in cluster.processes.values():
        text = proc.logText()
        for marker in ("Traceback", "Unhandled"):
            assert marker not in text, f"{proc.name} logged:\n{text[-4000:]}"


def startCluster(workdir, backends=BACKENDS, balancerArgs=(), backendArgs=()):
    cluster = LocalCluster(workdir)
    cluster.redirectPort = freePort()
    try:
        cluster.startBalancer(
            extra=[f"--redirect=tcp:{cluster.redirectPort}:interface=127.0.0.1", *balancerArgs]
        )
        for name in backends:
            cluster.startBackend(name, extra=list(backendArgs))
        if backends:
            cluster.waitUp(backends)
    except BaseException:
        cluster.stopAll()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Reports every 5 s: the 20 redirects below fall, almost always, within
    # one report interval, so the spread is what least-load itself does.
    c = startCluster(
        tmp_path_factory.mktemp("redirect"), backendArgs=["--report-interval=5"]
    )
    yield c
    c.stopAll()
    assertNoTracebacks(c)


def redirect(port, send=b""):
    """
    Ask the redirect listener once; return the raw answer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if send:
            try:
                s.sendall(send)
            except OSError:
                pass
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk


def backendPorts(cluster):
    return {cluster.processes[n].port: n for n in BACKENDS}


def test_twenty_redirects_name_live_backends_and_least_load_spreads_them(cluster):
    ports = backendPorts(cluster)
    before = {n: b["routed"] for n, b in cluster.status().items()}
    answers = [parseAnswer(redirect(cluster.redirectPort)) for _ in range(20)]
    assert {a.host for a in answers} == {"127.0.0.1"}
    assert {a.port for a in answers} <= set(ports)
    counts = {n: sum(1 for a in answers if ports[a.port] == n) for n in BACKENDS}
    # 10/10 unless a load report landed in the middle of the burst.
    assert abs(counts["backend-1"] - counts["backend-2"]) <= 4, counts
    after = cluster.status()
    assert {n: after[n]["routed"] - before[n] for n in BACKENDS} == counts
    assert all(after[n]["active"] == 0 for n in BACKENDS)  # redirects hold nothing
    for i, a in enumerate(answers):
        payload = b"redirected %d\n" % i
        assert echoOnce(a.host, a.port, payload) == payload


class EchoClient(Protocol):
    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(self.received)


@pytest_twisted.ensureDeferred
async def test_cluster_endpoint_string_reaches_a_backend(cluster):
    ep = clientFromString(
        reactor, f"cluster:host=127.0.0.1:port={cluster.redirectPort}:timeout=5"
    )
    seen = set()
    for i in range(4):
        client = await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
        seen.add(client.transport.getPeer().port)
        payload = b"endpoint %d" % i
        client.transport.write(payload)
        client.transport.loseWriteConnection()  # the echo backend closes after
        assert await client.closed.addTimeout(10, reactor) == payload
    assert seen <= set(backendPorts(cluster))
    assert len(seen) == 2  # least-load alternates between two idle backends


def connectCommand(*args):
    return [sys.executable, "-m", "twistedcluster.cli.connect", *args]


def test_cluster_connect_prints_relays_and_replaces_nc(cluster):
    r = subprocess.run(
        connectCommand("--print", f"127.0.0.1:{cluster.redirectPort}"),
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
    host, port = r.stdout.split()
    assert host == "127.0.0.1" and int(port) in backendPorts(cluster)

    payload = b"".join(b"line %d\n" % i for i in range(1000))
    r = subprocess.run(
        connectCommand(f"127.0.0.1:{cluster.redirectPort}"),
        input=payload, capture_output=True, timeout=30,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, payload, b"")

    # --direct, through the proxy listener: the nc this machine lacks.
    r = subprocess.run(
        connectCommand("--direct", f"127.0.0.1:{cluster.port}"),
        input=b"via the proxy\n", capture_output=True, timeout=30,
    )
    assert (r.returncode, r.stdout) == (0, b"via the proxy\n"), r.stderr


def test_garbage_on_the_redirect_port_does_no_harm(cluster):
    ports = backendPorts(cluster)
    garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 256
    answer = redirect(cluster.redirectPort, send=garbage)
    assert parseAnswer(answer).port in ports
    # A client that resets at once.
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", cluster.redirectPort), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    # A client that half-closes before the answer.
    with socket.create_connection(("127.0.0.1", cluster.redirectPort), timeout=5) as s:
        s.shutdown(socket.SHUT_WR)
        assert parseAnswer(s.recv(4096)).port in ports
    # The balancer still answers and still proxies.
    assert parseAnswer(redirect(cluster.redirectPort)).port in ports
    assert echoOnce("127.0.0.1", cluster.port, b"still here") == b"still here"
    assert all(cluster.status()[n]["state"] == "up" for n in BACKENDS)
    assert cluster.processes["balancer"].alive()


@pytest_twisted.ensureDeferred
async def test_no_backend_then_a_dead_one_first(tmp_path, logged):
    # Round-robin picks the backends in name order, so the first answer of
    # each connect is the ghost: a live backend process that advertises an
    # address where nothing listens (as a backend behind a bad NAT would).
    c = startCluster(tmp_path, backends=[], balancerArgs=["--policy=round-robin"])
    try:
        ep = clientFromString(
            reactor, f"cluster:host=127.0.0.1:port={c.redirectPort}:timeout=5"
        )
        with pytest.raises(NoBackendAvailable, match="no backend available"):
            await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
        r = await deferToThread(
            subprocess.run,
            connectCommand(f"127.0.0.1:{c.redirectPort}"),
            capture_output=True, text=True, timeout=30,
        )
        assert r.returncode == 1
        assert "no backend available" in r.stderr

        ghostPort = freePort()
        c.startBackend("a-ghost", extra=[f"--advertise=127.0.0.1:{ghostPort}"])
        c.startBackend("b-live")
        await deferToThread(c.waitUp, ["a-ghost", "b-live"])
        live = c.processes["b-live"].port
        for i in range(2):
            client = await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
            assert client.transport.getPeer().port == live
            client.transport.write(b"after a ghost %d" % i)
            client.transport.loseWriteConnection()
            assert await client.closed.addTimeout(10, reactor) == b"after a ghost %d" % i
        refused = [
            m for m in logged
            if f"backend 127.0.0.1:{ghostPort} named by 127.0.0.1:{c.redirectPort} failed: "
            "connection refused (attempt 1/3)" in m
        ]
        assert len(refused) == 2, logged
        status = c.status()
        assert (status["a-ghost"]["routed"], status["b-live"]["routed"]) == (2, 2)
    finally:
        c.stopAll()
    assertNoTracebacks(c)
