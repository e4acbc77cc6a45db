"""
Static backends at runtime (issue 18, item 3), real processes: --backend
with a name, weight and capacity at start-up; cluster-admin add and remove
while clients are served; what was added survives a balancer restart
through the state file, what was removed does not come back.
"""

import json

import pytest

from twistedcluster.localcluster import LocalCluster, echoOnce, freePort

pytestmark = pytest.mark.e2e


def echoServer(cluster, name):
    """
    An echo server that does not report (its balancer address is dead):
    what a static backend is to the balancer.
    """
    return cluster.startBackend(name, balancers=[f"tcp:host=127.0.0.1:port={freePort()}"])


def test_static_backends_added_and_removed_at_runtime_and_kept(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.useSecret()
    state = tmp_path / "state.json"
    s1, s2 = echoServer(cluster, "echo-1"), echoServer(cluster, "echo-2")
    balancerArgs = [
        f"--state-file={state}",
        f"--backend=s1=127.0.0.1:{s1.port},weight=2,capacity=5",
        "--check-interval=0.2",
        "--rise=1",
    ]
    try:
        cluster.startBalancer(extra=balancerArgs)
        ports = (cluster.port, cluster.controlPort, cluster.adminPort)
        status = cluster.waitForStatus(lambda s: s.get("s1", {}).get("state") == "up", 20, "s1 up")
        assert {k: status["s1"][k] for k in ("static", "weight", "capacity")} == {
            "static": True, "weight": 2, "capacity": 5}

        r = cluster.adminRun("add", "s2", f"127.0.0.1:{s2.port}", "--weight", "3",
                             "--capacity", "7", "--json")
        assert json.loads(r.stdout) == {"name": "s2", "host": "127.0.0.1", "port": s2.port,
                                        "weight": 3, "capacity": 7, "state": "up"}
        r = cluster.adminRun("add", "s2", "127.0.0.1:1", check=False)
        assert r.returncode == 1 and "exists already" in r.stderr
        r = cluster.adminRun("add", "s3", "nonsense", check=False)
        assert r.returncode == 2
        assert json.loads(state.read_text())["static"] == {
            "s2": {"host": "127.0.0.1", "port": s2.port, "capacity": 7}}
        cluster.adminRun("drain", "s1")
        for i in range(4):  # s1 drained: every client goes to s2
            assert echoOnce("127.0.0.1", cluster.port, b"via s2 %d" % i) == b"via s2 %d" % i
        assert cluster.status()["s2"]["routed"] == 4

        # A restart keeps s2 (state file) and s1 (command line).
        cluster.processes["balancer"].stop()
        cluster.startBalancer(*ports, extra=balancerArgs)
        status = cluster.waitForStatus(
            lambda s: s.get("s2", {}).get("state") == "up" and "s1" in s, 20, "s2 back up")
        assert {k: status["s2"][k] for k in ("static", "weight", "capacity")} == {
            "static": True, "weight": 3, "capacity": 7}
        assert status["s1"]["state"] == "draining"
        assert echoOnce("127.0.0.1", cluster.port, b"after restart") == b"after restart"

        # Removed: gone from the list and the file, and stays gone.
        assert cluster.adminRun("remove", "s2").stdout.strip() == "s2: removed"
        assert "s2" not in cluster.status()
        assert json.loads(state.read_text())["static"] == {}
        r = cluster.adminRun("remove", "s2", check=False)
        assert r.returncode == 1 and "no backend named 's2'" in r.stderr
        cluster.processes["balancer"].stop()
        cluster.startBalancer(*ports, extra=balancerArgs)
        status = cluster.waitForStatus(lambda s: "s1" in s, 20, "s1 listed")
        assert "s2" not in status
    finally:
        cluster.stopAll()


@pytest.mark.parametrize("policy", ["hash", "round-robin"])
def test_a_client_keeps_its_backend_only_under_hash(tmp_path, policy):
    """
    The README's paragraph on stateful backends: connections of one client
    are routed each on its own (round-robin sends them to both backends);
    --policy hash sends them all to one while the pool is stable.
    """
    cluster = LocalCluster(tmp_path)
    try:
        cluster.startBalancer(extra=[f"--policy={policy}"])
        for name in ("b1", "b2"):
            cluster.startBackend(name, extra=["--report-interval=0.2"])
        cluster.waitUp(["b1", "b2"])
        for i in range(10):
            assert echoOnce("127.0.0.1", cluster.port, b"%d" % i) == b"%d" % i
        routed = sorted(b["routed"] for b in cluster.status().values())
        assert routed == ([0, 10] if policy == "hash" else [5, 5]), routed
    finally:
        cluster.stopAll()


class RecordingServer:
    """
    A plain TCP server in this process that echoes what it gets: a static
    backend that shows what the balancer sends first.
    """

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    while True:
                        data = conn.recv(4096)
                        if not data:
                            break
                        conn.sendall(data)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_a_static_backend_added_with_send_proxy_gets_the_header_and_keeps_it(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.useSecret()
    state = tmp_path / "state.json"
    server = RecordingServer()
    balancerArgs = [f"--state-file={state}", "--check-interval=0.2", "--rise=1"]
    try:
        cluster.startBalancer(extra=balancerArgs)
        ports = (cluster.port, cluster.controlPort, cluster.adminPort)
        r = cluster.adminRun("add", "web", f"127.0.0.1:{server.port}", "--send-proxy", "v1", "--json")
        assert json.loads(r.stdout) == {"name": "web", "host": "127.0.0.1", "port": server.port,
                                        "sendProxy": "v1", "state": "up"}
        r = cluster.adminRun("add", "x", "127.0.0.1:1", "--send-proxy", "v3", check=False)
        assert r.returncode == 2
        got = echoOnce("127.0.0.1", cluster.port, b"hello")
        assert got.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ") and got.endswith(b"\r\nhello"), got
        assert json.loads(state.read_text())["static"] == {
            "web": {"host": "127.0.0.1", "port": server.port, "capacity": 1000, "sendProxy": "v1"}}

        # A restart keeps it, header included.
        cluster.processes["balancer"].stop()
        cluster.startBalancer(*ports, extra=balancerArgs)
        cluster.waitForStatus(lambda s: s.get("web", {}).get("state") == "up", 20, "web back up")
        got = echoOnce("127.0.0.1", cluster.port, b"again")
        assert got.startswith(b"PROXY TCP4 ") and got.endswith(b"\r\nagain"), got
    finally:
        cluster.stopAll()
        server.close()


def test_a_backend_registering_under_a_static_backends_name_is_refused(tmp_path):
    # --backend web=... holds the name "web": a cluster-backend --name web
    # is refused (its log and the balancer's say why), the static backend
    # keeps its address and its clients; and cluster-admin add of the
    # registered backend's name is refused the same way.
    from twistedcluster.localcluster import waitFor

    cluster = LocalCluster(tmp_path)
    cluster.useSecret()
    static = echoServer(cluster, "echo-static")
    try:
        cluster.startBalancer(extra=[f"--backend=web=127.0.0.1:{static.port}", "--check-interval=0.2"])
        cluster.waitForStatus(lambda s: s.get("web", {}).get("state") == "up", 20, "web up")
        impostor = cluster.startBackend("web")
        waitFor(lambda: "is a static backend's" in impostor.logText(), 20, "the refusal on the channel")
        balancerLog = cluster.processes["balancer"].logText()
        assert "registration from" in balancerLog and "refused" in balancerLog
        status = cluster.status()["web"]
        assert (status["static"], status["port"], status["state"]) == (True, static.port, "up")
        for i in range(3):
            assert echoOnce("127.0.0.1", cluster.port, b"%d" % i) == b"%d" % i
        assert cluster.status()["web"]["routed"] == 3

        cluster.startBackend("amp")
        cluster.waitUp(["amp"])
        r = cluster.adminRun("add", "amp", f"127.0.0.1:{static.port}", check=False)
        assert r.returncode == 1 and "registered itself" in r.stderr
        assert cluster.status()["amp"]["static"] is False
    finally:
        cluster.stopAll()
