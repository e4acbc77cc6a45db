"""
The passive health check against a backend that accepts and then fails:
real processes, two echo backends and one whose service resets every
connection (right after accept, or on the first request bytes) while it
registers and reports like a healthy backend.
"""

import concurrent.futures
import os

import pytest

from twistedcluster.localcluster import LocalCluster, echoOnce

pytestmark = pytest.mark.e2e

FAST = ["--report-interval=0.2"]
CLIENTS = 300


def clients(port, count=CLIENTS, parallel=10):
    """
    C{count} clients, C{parallel} at a time, each sending one message and
    expecting its echo; return how many failed.
    """

    def one(i):
        payload = b"client %d " % i + os.urandom(8)
        try:
            return echoOnce("127.0.0.1", port, payload, timeout=10) == payload
        except OSError:
            return False

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(count))).count(False)


@pytest.mark.parametrize("service", ["resetOnAccept", "resetOnData"])
def test_a_backend_that_accepts_then_resets_is_taken_out(tmp_path, service):
    cluster = LocalCluster(tmp_path)
    try:
        # Out for longer than the test runs: "down" at the end means taken
        # out, not a lucky moment.
        cluster.startBalancer(extra=["--eject-for=60"])
        for name in ("good-1", "good-2"):
            cluster.startBackend(name, extra=FAST)
        cluster.startBackend("bad", extra=FAST + [f"--service=tests.faulty.{service}"])
        cluster.waitUp(["good-1", "good-2", "bad"])
        failed = clients(cluster.port)
        status = cluster.status()
        print(f"\n{service}: {failed} of {CLIENTS} clients failed; bad is "
              f"{status['bad']['state']} with {status['bad']['failures']} failures")
        assert status["bad"]["state"] == "down"
        assert status["good-1"]["state"] == status["good-2"]["state"] == "up"
        # Three in a row take it out; a few more were already on their way
        # to it (ten clients at a time).  Before: about a third of them.
        assert failed <= 15
        assert "taken out for 60.0 s" in cluster.processes["balancer"].logText()
    finally:
        cluster.stopAll()
