"""
The dialers: which one a reactor gets, and the fast one on real loopback
sockets (production's path).
"""

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from tests.loopback import listening, until
from twistedcluster.balancer.dialer import FastDialer, ReactorDialer, dialerFor


def test_each_reactor_gets_its_dialer():
    assert isinstance(dialerFor(reactor, 1.0), FastDialer)
    assert isinstance(dialerFor(MemoryReactorClock(), 1.0), ReactorDialer)


class Made(Protocol):
    def __init__(self):
        self.made = defer.Deferred()

    def connectionMade(self):
        self.made.callback(self)


@pytest_twisted.ensureDeferred
async def test_the_fast_dialer_connects_a_ready_made_protocol():
    async with listening(Factory.forProtocol(Protocol), "tcp:0:interface=127.0.0.1") as portNumber:
        proto = Made()
        failures = []
        FastDialer(reactor, 1.0).dial("127.0.0.1", portNumber, proto, failures.append)
        made = await proto.made.addTimeout(5, reactor)
        assert made.transport.getPeer().port == portNumber
        assert failures == []
        made.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_refused_connect_is_reported_on_a_later_turn():
    async with listening(Factory.forProtocol(Protocol), "tcp:0:interface=127.0.0.1") as portNumber:
        free = portNumber
    failures = []
    FastDialer(reactor, 1.0).dial("127.0.0.1", free, Made(), failures.append)
    assert failures == []  # never inside dial()
    await until(lambda: failures, what="the refusal")
    assert failures[0].check(ConnectionRefusedError)


@pytest_twisted.ensureDeferred
async def test_a_host_name_goes_through_an_endpoint():
    async with listening(Factory.forProtocol(Protocol), "tcp:0:interface=127.0.0.1") as portNumber:
        proto = Made()
        failures = []
        FastDialer(reactor, 1.0).dial("localhost", portNumber, proto, failures.append)
        made = await proto.made.addTimeout(5, reactor)
        assert failures == []
        made.transport.loseConnection()
