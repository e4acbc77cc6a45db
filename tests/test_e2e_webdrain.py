"""
Drain that services join (issue 18, item 4), with real processes: the
README's twisted.web example (examples/hello.py, a DrainingSite) behind a
balancer, keep-alive clients in a loop, one backend sent SIGTERM.  The
clients finish every request without a socket error, and the drained backend
exits as soon as they have moved, long before its --drain-timeout.

The clients are a bounded loop of keep-alive HTTP/1.1 connections of our own
(http.client); when wrk is installed the same is checked under wrk too.
"""

import http.client
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from twistedcluster.localcluster import LocalCluster, waitFor

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DRAIN_TIMEOUT = 30.0


def startWebCluster(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.env["PYTHONPATH"] = f"{ROOT / 'examples'}:{ROOT}"
    cluster.startBalancer()
    for name in ("web1", "web2"):
        cluster.startBackend(name, extra=[
            "--service=hello.site", "--report-interval=0.2",
            f"--drain-timeout={DRAIN_TIMEOUT}",
        ])
    cluster.waitUp(["web1", "web2"], timeout=30)
    return cluster


class KeepAliveClients:
    """
    C{n} threads, each sending GET / over one keep-alive connection at a
    time, in a loop bounded in time and count; a response that says
    C{Connection: close} ends its connection and the next request opens a
    new one (as HTTP clients do).  Anything else that ends a connection is
    an error.
    """

    def __init__(self, port, n=6, seconds=30.0, most=200000):
        self.port = port
        self.stop = threading.Event()
        self.deadline = time.monotonic() + seconds
        self.most = most
        self.lock = threading.Lock()
        self.ok = 0
        self.closes = 0
        self.errors = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                with self.lock:
                    if self.ok >= self.most:
                        return
                try:
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException) as e:
                    with self.lock:
                        self.errors.append(repr(e))
                    conn.close()
                    continue
                with self.lock:
                    if response.status != 200 or body != b"hello\n":
                        self.errors.append(f"{response.status} {body!r}")
                    else:
                        self.ok += 1
                    if response.getheader("connection", "").lower() == "close":
                        self.closes += 1
        finally:
            conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(20)


def test_keep_alive_clients_move_off_a_draining_web_backend(tmp_path):
    cluster = startWebCluster(tmp_path)
    clients = None
    try:
        clients = KeepAliveClients(cluster.port)
        cluster.waitForStatus(lambda s: s["web1"]["connections"] > 0, 20, "clients on web1")
        waitFor(lambda: clients.ok > 200, 20, "requests flowing")
        web1 = cluster.processes["web1"]
        signalled = time.monotonic()
        web1.signal(signal.SIGTERM)
        waitFor(lambda: not web1.alive(), DRAIN_TIMEOUT, "web1 to exit")
        took = time.monotonic() - signalled
        before = clients.ok
        waitFor(lambda: clients.ok > before + 200, 20, "requests served by web2")
        clients.finish()
        assert clients.errors == [], clients.errors[:5]
        assert clients.closes >= 1
        assert took < DRAIN_TIMEOUT / 3, f"web1 took {took:.1f} s to drain"
        log = web1.logText()
        assert "calling the service's drain()" in log
        assert "drained: no connection left" in log
        print(f"\nkeep-alive drain: {clients.ok} requests, {clients.closes} "
              f"'Connection: close', 0 errors; web1 exited {took:.2f} s after SIGTERM")
    finally:
        if clients is not None:
            clients.finish()
        cluster.stopAll()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_sees_no_socket_error_when_a_web_backend_drains(tmp_path):
    cluster = startWebCluster(tmp_path)
    try:
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c8", "-d8s", f"http://127.0.0.1:{cluster.port}/"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            cluster.waitForStatus(lambda s: s["web1"]["connections"] > 0, 5, "wrk on web1")
            web1 = cluster.processes["web1"]
            web1.signal(signal.SIGTERM)
            waitFor(lambda: not web1.alive(), DRAIN_TIMEOUT, "web1 to exit")
            # Its keep-alive clients moved: it did not wait for wrk to end.
            assert wrk.poll() is None, "web1 exited only once wrk had finished"
            out, _ = wrk.communicate(timeout=30)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait(5)
        assert wrk.returncode == 0, out
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        assert requests > 100, out
        assert "Socket errors" not in out, out
        assert "Non-2xx" not in out, out
        print(f"\nwrk through a drain: {requests} requests, no socket error")
    finally:
        cluster.stopAll()
