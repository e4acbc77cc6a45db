"""
End to end: a backend whose service is slower reports a higher cost, and
least-load sends it fewer connections.  Real ``twistd`` processes on
127.0.0.1, real sockets; every wait bounded, every process stopped.
"""

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from twistedcluster.localcluster import LocalCluster

pytestmark = pytest.mark.e2e


def request(port):
    """
    One request on a new connection through the balancer; its answer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"q\n")
        got = b""
        while not got.endswith(b"\n"):
            data = s.recv(64)
            if not data:
                break
            got += data
        return got


def load(port, clients, requests, seconds):
    """
    C{clients} clients, each making requests one after the other, until
    C{requests} in all or C{seconds} have passed; the answers.
    """
    deadline = time.monotonic() + seconds
    per = requests // clients

    def client(_):
        answers = []
        for _ in range(per):
            if time.monotonic() > deadline:
                break
            answers.append(request(port))
        return answers

    with ThreadPoolExecutor(clients) as pool:
        return [a for answers in pool.map(client, range(clients)) for a in answers]


def test_a_slower_backend_shows_a_higher_cost_and_gets_fewer_connections(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        cluster.startBalancer()
        for name in ("fast", "slow"):
            cluster.startBackend(
                name, extra=[f"--service=tests.slowservice.{name}", "--report-interval=0.2"]
            )
        cluster.waitUp(["fast", "slow"])
        # Enough closes on each for a measurement (both start at 1/capacity).
        assert set(load(cluster.port, 4, 200, 60)) == {b"done\n"}
        status = cluster.waitForStatus(
            lambda s: s["slow"]["cost"] > 3 * s["fast"]["cost"] > 0.003,
            10,
            "the slow backend to report a cost over 3 times the fast one's",
        )
        assert status["slow"]["cost"] >= 0.009, status
        before = {n: status[n]["routed"] for n in ("fast", "slow")}
        # Four clients at a time: the fast backend, four queued, is still
        # quicker than the idle slow one (least-conn would split them).
        answers = load(cluster.port, 4, 400, 60)
        assert set(answers) == {b"done\n"}
        after = cluster.status()
        routed = {n: after[n]["routed"] - before[n] for n in ("fast", "slow")}
        assert sum(routed.values()) == len(answers)
        assert routed["slow"] * 3 < routed["fast"], routed
    finally:
        cluster.stopAll()


def test_clients_giving_up_together_do_not_make_a_slow_backend_look_fast(tmp_path):
    # 150 requests queue on the 10 ms backend and their clients give up
    # together, as a front's timeout would: those closes took no service.
    # The backend's cost stays about 10 ms (it used to fall to 1/capacity,
    # 1 ms, and least-load then took it for the fastest backend).
    cluster = LocalCluster(tmp_path)
    try:
        cluster.startBalancer()
        backend = cluster.startBackend(
            "slow", extra=["--service=tests.slowservice.slow", "--report-interval=0.2"]
        )
        cluster.waitUp(["slow"])
        assert set(load(cluster.port, 2, 60, 60)) == {b"done\n"}
        cluster.waitForStatus(lambda s: s["slow"]["cost"] >= 0.009, 10, "a cost of about 10 ms")
        waiting = []
        try:
            for _ in range(150):
                s = socket.create_connection(("127.0.0.1", backend.port), timeout=10)
                s.sendall(b"q\n")
                waiting.append(s)
            cluster.waitForStatus(
                lambda s: s["slow"]["connections"] >= 100, 10, "the queue to be reported"
            )
        finally:
            for s in waiting:
                s.close()
        # The report that says they are gone measured the cost after them.
        status = cluster.waitForStatus(
            lambda s: s["slow"]["connections"] == 0, 10, "the given-up requests to be gone"
        )
        assert status["slow"]["cost"] >= 0.009, status["slow"]
    finally:
        cluster.stopAll()
