"""
Slow start end to end: a real balancer with ``--slow-start``, real backends
on 127.0.0.1; a backend that comes up late takes a small share of a burst
at first, and its full share once the ramp is over.
"""

import socket
import urllib.request

import pytest

from twistedcluster.localcluster import LocalCluster, freePort, waitFor

pytestmark = pytest.mark.e2e

SLOW_START = 8.0
OLD = ["old-1", "old-2"]


def hold(port, n):
    """
    C{n} connections through the balancer, each echoing once, kept open.
    """
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        payload = f"held {i}\n".encode()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = s.recv(4096)
            assert data, "the backend closed a held connection"
            got += data
        assert got == payload
        socks.append(s)
    return socks


def share(metricsPort, name):
    url = f"http://127.0.0.1:{metricsPort}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    prefix = f'twistedcluster_backend_slow_start_share{{backend="{name}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def active(cluster):
    return {n: b["active"] for n, b in cluster.quickStatus().items()}


def test_a_backend_that_comes_up_takes_a_smaller_share_at_first(tmp_path):
    cluster = LocalCluster(tmp_path)
    metricsPort = freePort()
    held = []
    try:
        balancer = cluster.startBalancer(extra=[
            f"--slow-start={SLOW_START}",
            f"--metrics=tcp:{metricsPort}:interface=127.0.0.1",
        ])
        for name in OLD:
            cluster.startBackend(name, extra=["--report-interval=0.2"])
        cluster.waitUp(OLD)
        # Backends up as the balancer starts are warm: no ramp for them.
        assert [share(metricsPort, n) for n in OLD] == [1.0, 1.0]
        waitFor(
            lambda: "slow start: backends that come up from now on" in balancer.logText(),
            SLOW_START + 20,
            "slow start to apply",
        )
        held += hold(cluster.port, 40)  # 20 on each
        cluster.startBackend("new", extra=["--report-interval=0.2"])
        waitFor(
            lambda: cluster.quickStatus().get("new", {}).get("state") == "up",
            20,
            "the newcomer up",
        )
        assert share(metricsPort, "new") < 0.5
        # Least-load without slow start would pour the next 30 into the
        # idle newcomer (until it holds as many as the others: about 23).
        held += hold(cluster.port, 30)
        first = active(cluster)
        assert sum(first.values()) == 70
        assert first["new"] <= 10, first
        waitFor(lambda: share(metricsPort, "new") == 1.0, SLOW_START + 20, "the ramp to end")
        held += hold(cluster.port, 30)
        then = active(cluster)
        # Its full share now: the next ones go mostly to the one that lags.
        assert then["new"] - first["new"] >= 18, (first, then)
    finally:
        for s in held:
            s.close()
        cluster.stopAll()
