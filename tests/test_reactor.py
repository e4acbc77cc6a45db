"""
twistedcluster.fast.reactor: the lean epoll reactor dispatches ready descriptors
like Twisted's, and an error from one descriptor is logged without stopping
the others.  Driven one poll at a time, never run, beside the test reactor.
"""

import socket

import pytest
from twisted.internet import main
from twisted.internet.epollreactor import EPollReactor

from twistedcluster.fast.reactor import LeanEPollReactor, installIfNone


class Reader:
    """
    A readable descriptor over one end of a socket pair.
    """

    def __init__(self, sock, result=None, lostRaises=False):
        self.sock = sock
        self.result = result
        self.lostRaises = lostRaises
        self.reads = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "Reader"

    def doRead(self):
        self.reads.append(self.sock.recv(100))
        return self.result

    def connectionLost(self, reason):
        self.lost.append(reason)
        if self.lostRaises:
            raise RuntimeError("connectionLost blew up")


@pytest.fixture
def lean():
    r = LeanEPollReactor()
    pairs = []
    yield r, pairs
    for reader in list(r._selectables.values()):
        if isinstance(reader, Reader):
            r.removeReader(reader)
    for a, b in pairs:
        a.close()
        b.close()
    r._poller.close()


def pair(pairs):
    a, b = socket.socketpair()
    pairs.append((a, b))
    return a, b


def test_it_is_an_epoll_reactor():
    assert issubclass(LeanEPollReactor, EPollReactor)
    assert LeanEPollReactor.doIteration is LeanEPollReactor.doPoll


def test_ready_descriptors_are_read(lean):
    r, pairs = lean
    a, b = pair(pairs)
    c, d = pair(pairs)
    first, second = Reader(a), Reader(c)
    r.addReader(first)
    r.addReader(second)
    b.send(b"one")
    d.send(b"two")
    r.doPoll(1)
    assert first.reads == [b"one"] and second.reads == [b"two"]
    # Nothing ready: a poll with a zero timeout returns at once.
    r.doPoll(0)
    assert first.reads == [b"one"]


@pytest.mark.allow_errors
def test_an_error_closing_one_descriptor_is_logged_and_the_others_served(lean, logged):
    r, pairs = lean
    a, b = pair(pairs)
    c, d = pair(pairs)
    bad = Reader(a, result=main.CONNECTION_DONE, lostRaises=True)
    good = Reader(c)
    r.addReader(bad)
    r.addReader(good)
    b.send(b"x")
    d.send(b"y")
    r.doPoll(1)
    assert len(bad.lost) == 1
    assert good.reads == [b"y"]
    assert any("unhandled error from <" in line for line in logged), logged
    # The bad one is no longer polled; the good one still is.
    d.send(b"z")
    r.doPoll(1)
    assert good.reads == [b"y", b"z"] and bad.reads == [b"x"]


def test_install_if_none_keeps_an_installed_reactor():
    # Under pytest-twisted a reactor is installed already.
    assert installIfNone() is False


# -- the reactor plugin: twistd --reactor=lean-epoll ----------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from twistedcluster.localcluster import TWISTD, freePort  # noqa: E402


def test_twistd_lists_the_lean_reactor():
    out = subprocess.run(
        [sys.executable, "-c", TWISTD, "--help-reactors"],
        capture_output=True, text=True, timeout=60,
    ).stdout
    line = [x for x in out.splitlines() if "lean-epoll" in x]
    assert line and not line[0].strip().startswith("!"), out


def runBalancer(prelude, *twistdArgs, until="balancer reactor:", timeout=30.0):
    """
    Run a real balancer under twistd with C{twistdArgs} until it logs
    C{until}; stop it (SIGTERM, by its PID) and return its log.
    """
    ports = [str(freePort()) for _ in range(3)]
    args = [
        "-n", "--pidfile=", "--logfile=-", *twistdArgs, "cluster-balancer",
        "--listen", f"tcp:{ports[0]}:interface=127.0.0.1",
        "--control", f"tcp:{ports[1]}:interface=127.0.0.1",
        "--admin", f"tcp:{ports[2]}:interface=127.0.0.1",
        "--drain-timeout=0.5",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", prelude + TWISTD, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out = b""
    try:
        import os
        import select

        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while until.encode() not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.terminate()
        try:
            rest, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
        out += rest
    return out.decode(errors="replace")


def test_twistd_runs_the_balancer_on_the_lean_reactor_by_name():
    log = runBalancer("", "--reactor=lean-epoll")
    assert "balancer reactor: LeanEPollReactor" in log, log


def test_a_balancer_whose_canary_fails_runs_on_twisteds_reactor_and_says_so():
    prelude = (
        "import twistedcluster.fast.internals as t\n"
        "def check():\n"
        "    raise t.Changed('forced for the test')\n"
        "t.check = check\n"
    )
    log = runBalancer(prelude)
    assert "balancer reactor: EPollReactor" in log, log
    said = [x for x in log.splitlines() if "fast paths rely on" in x]
    assert len(said) == 1 and "forced for the test" in said[0], log


@pytest.mark.allow_errors
def test_a_read_that_raises_is_logged_and_disconnected():
    # The lean poll loop's inlined read: what doRead raises is logged, and
    # the descriptor disconnected, as Twisted's _doReadOrWrite does.
    import socket

    from twisted.logger import globalLogPublisher

    from twistedcluster.fast.reactor import LeanEPollReactor

    events = []
    globalLogPublisher.addObserver(events.append)
    reactor = LeanEPollReactor()
    a, b = socket.socketpair()

    class Raising:
        lost = None

        def fileno(self):
            return a.fileno()

        def logPrefix(self):
            return "raising"

        def doRead(self):
            raise ValueError("on purpose")

        def connectionLost(self, reason):
            self.lost = reason

    try:
        r = Raising()
        reactor.addReader(r)
        b.send(b"x")
        reactor.doPoll(1)
        assert r.lost is not None and r.lost.check(ValueError)
        assert a.fileno() not in reactor._selectables
        assert any(e.get("log_failure") is not None and e["log_failure"].check(ValueError) for e in events)
    finally:
        globalLogPublisher.removeObserver(events.append)
        reactor._poller.close()
        a.close()
        b.close()
