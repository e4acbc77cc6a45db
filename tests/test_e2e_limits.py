"""
End to end, issue 13 items 2 and 7: a real balancer's listeners hold a burst
(their backlog, as the kernel reports it), and a flood of idle clients on a
balancer with few file descriptors leaves the admin and control channels
working, with a log that says so once a second, not once a connection.
"""

import re
import socket
import subprocess
import time

import pytest

from twistedcluster.balancer.limits import defaultMaxConnections
from twistedcluster.balancer.listeners import defaultBacklog
from twistedcluster.localcluster import LocalCluster, freePort, waitFor

pytestmark = pytest.mark.e2e


def limitedCluster(tmp_path, nofile):
    """
    A LocalCluster whose balancer runs under an open-file limit of C{nofile}.
    """
    cluster = LocalCluster(tmp_path)
    start = cluster._start

    def limited(name, argv):
        if name == "balancer":
            argv = ["prlimit", f"--nofile={nofile}", "--", *argv]
        return start(name, argv)

    cluster._start = limited
    return cluster


def listenQueueLimit(port):
    """
    The backlog of the socket listening on 127.0.0.1:C{port}, as the kernel
    holds it (ss -ltn's Send-Q).
    """
    out = subprocess.run(
        ["ss", "-ltnH", f"src 127.0.0.1:{port}"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    return int(out[2])


def test_every_listener_of_a_real_balancer_holds_a_burst(tmp_path):
    cluster = LocalCluster(tmp_path)
    redirect, metrics = freePort(), freePort()
    try:
        cluster.startBalancer(extra=[
            f"--redirect=tcp:{redirect}:interface=127.0.0.1",
            f"--metrics=tcp:{metrics}:interface=127.0.0.1:backlog=9",
        ])
        cluster.startBackend("b1")
        cluster.waitUp(["b1"])
        for port in (cluster.port, cluster.controlPort, cluster.adminPort, redirect,
                     cluster.processes["b1"].port):
            assert listenQueueLimit(port) == defaultBacklog(), port
        assert listenQueueLimit(metrics) == 9
    finally:
        cluster.stopAll()


def holdIdle(port, count, seconds):
    """
    C{count} idle clients of 127.0.0.1:C{port}, opened at once (the backlog
    holds them),
    at most C{seconds} in all.
    """
    socks = []
    deadline = time.monotonic() + seconds
    for i in range(count):
        if time.monotonic() > deadline:
            break
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def test_a_flood_of_idle_clients_leaves_control_and_admin_working(tmp_path):
    nofile = 256
    limit = defaultMaxConnections(nofile)  # 96
    cluster = limitedCluster(tmp_path, nofile)
    socks = []
    try:
        cluster.startBalancer()
        cluster.startBackend("b1", extra=["--report-interval=0.2"])
        cluster.waitUp(["b1"])
        balancer = cluster.processes["balancer"]
        assert f"balancer client connection limit: {limit}" in balancer.logText()
        socks = holdIdle(cluster.port, 400, 20)
        waitFor(
            lambda: cluster.quickStatus()["b1"]["active"] == limit,
            20,
            "the limit's worth of clients relayed",
        )
        # The rest wait in the backlog; the balancer still answers its admin
        # and takes a new backend.
        cluster.startBackend("b2", extra=["--report-interval=0.2"])
        cluster.waitUp(["b1", "b2"])
        assert sum(b["active"] for b in cluster.quickStatus().values()) == limit
        text = balancer.logText()
        assert "EMFILE" not in text
        lines = re.findall(r"client connection limit \d+ \(--max-connections\).*", text)
        assert 1 <= len(lines) <= 30, lines
        # As clients leave, the waiting ones are served.
        for s in socks[:50]:
            s.close()
        waitFor(
            lambda: sum(b["active"] for b in cluster.quickStatus().values()) == limit,
            20,
            "waiting clients taken in",
        )
    finally:
        for s in socks:
            s.close()
        cluster.stopAll()


def test_out_of_descriptors_is_logged_once_a_second(tmp_path):
    # A limit set past what the descriptors allow: accept() meets EMFILE.
    cluster = limitedCluster(tmp_path, 128)
    socks = []
    try:
        cluster.startBalancer(extra=["--max-connections=1000"])
        cluster.startBackend("b1", extra=["--report-interval=0.2"])
        cluster.waitUp(["b1"])
        balancer = cluster.processes["balancer"]
        started = time.monotonic()
        socks = holdIdle(cluster.port, 400, 20)
        waitFor(
            lambda: "connection(s) closed unaccepted" in balancer.logText(),
            20,
            "the balancer to run out of descriptors",
        )
        # Let it go on refusing for a while: 2 s more of refusals.
        waitFor(lambda: time.monotonic() - started > 3, 10, "3 s")
        for s in socks:
            s.close()
        seconds = time.monotonic() - started
        text = balancer.logText()
        assert "EMFILE recovery" not in text and "Re-reserving" not in text
        lines = re.findall(r"accept failed \(EMFILE\).*", text)
        assert 1 <= len(lines) <= seconds + 2, lines
        closed = sum(int(n) for n in re.findall(r"(\d+) connection\(s\) closed unaccepted", text))
        assert closed >= 1
        # Still working.
        assert "b1" in cluster.quickStatus()
    finally:
        for s in socks:
            s.close()
        cluster.stopAll()
