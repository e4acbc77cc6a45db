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
