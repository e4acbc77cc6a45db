"""
Bursts against real ``twistd`` processes on 127.0.0.1: a burst of clients
arriving at once never takes a backend past its ``--capacity``; the clients
beyond it wait for room and are served when room frees up.
"""

import selectors
import socket
import time

import pytest

from twistedcluster.localcluster import LocalCluster, waitFor

pytestmark = pytest.mark.e2e

BACKENDS = ["cap-1", "cap-2", "cap-3"]
CAPACITY = 5


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path)
    try:
        c.startBalancer(extra=["--queue-timeout=60"])
        for name in BACKENDS:
            c.startBackend(name, extra=[f"--capacity={CAPACITY}", "--report-interval=0.2"])
        c.waitUp(BACKENDS)
        yield c
    finally:
        c.stopAll()


def burst(port, n):
    """
    Open C{n} connections at once and send one byte on each.
    """
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    pending = set(socks)
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            key.fileobj.send(b"x")
            sel.unregister(key.fileobj)
            pending.discard(key.fileobj)
    sel.close()
    assert not pending, "connects did not complete"
    return socks


def echoed(socks):
    """
    The sockets whose byte has come back so far.
    """
    done = []
    for s in socks:
        try:
            if s.recv(16) == b"x":
                done.append(s)
        except BlockingIOError:
            pass
    return done


def test_a_burst_never_takes_a_backend_past_its_capacity(cluster):
    socks = burst(cluster.port, 6 * CAPACITY)
    served = []
    try:
        # The first three capacities' worth are served...
        waitFor(
            lambda: served.extend(echoed([s for s in socks if s not in served]))
            or len(served) >= 3 * CAPACITY,
            20,
            "the first clients to be served",
        )
        status = cluster.waitForStatus(
            lambda s: sum(s[n]["connections"] for n in BACKENDS) >= 3 * CAPACITY,
            10,
            "the backends to report their connections",
        )
        # ...and no backend reports more than its capacity, over several
        # report intervals (a report must not make room that is not there).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for n in BACKENDS:
                assert status[n]["connections"] <= CAPACITY, status
            status = cluster.status()
        assert len(served) + len(echoed([s for s in socks if s not in served])) == 3 * CAPACITY
        # The rest waited: closing served clients lets them in, in turn.
        waiting = [s for s in socks if s not in served]
        for s in served:
            s.close()
        got = []
        waitFor(
            lambda: got.extend(echoed([s for s in waiting if s not in got]))
            or len(got) == len(waiting),
            20,
            "the waiting clients to be served",
        )
        status = cluster.status()
        for n in BACKENDS:
            assert status[n]["connections"] <= CAPACITY, status
    finally:
        for s in socks:
            s.close()
