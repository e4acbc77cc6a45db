"""
Balancers found by SRV, with a fake resolver and a Clock: what is added and
let go, when it looks again, and that a failed lookup keeps what it had.
The real DNS server is in tests/test_e2e_srv.py.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error

from twistedcluster.backend.discovery import SRVBalancers, srvName

NAME = "_cluster-control._tcp.example"


class Reporter:
    def __init__(self):
        self.balancers = {}
        self.onChannelFailed = None

    def addBalancer(self, description, endpoint):
        self.balancers[description] = endpoint

    def removeBalancer(self, description):
        del self.balancers[description]


class Resolver:
    def __init__(self):
        self.srv = []  # (target, port)
        self.hosts = {}
        self.fail = None
        self.lookups = 0

    def lookupService(self, name):
        assert name == NAME
        self.lookups += 1
        if self.fail is not None:
            return defer.fail(self.fail)
        answers = [
            dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(0, 0, port, target))
            for target, port in self.srv
        ]
        return defer.succeed((answers, [], []))

    def lookupAddress(self, name):
        return defer.succeed((
            [dns.RRHeader(name, dns.A, payload=dns.Record_A(a)) for a in self.hosts[name]], [], []))


def started(interval=30.0):
    clock, reporter, resolver = Clock(), Reporter(), Resolver()
    srv = SRVBalancers(NAME, reporter, resolver, clock, interval)
    return clock, reporter, resolver, srv


def test_srv_name():
    assert srvName("srv:" + NAME + ".") == NAME
    for bad in ("srv:", "srv:a b", "srv:host:1"):
        with pytest.raises(ValueError):
            srvName(bad)


def test_balancers_follow_the_record_every_period():
    clock, reporter, resolver, srv = started()
    resolver.srv = [("lb0.example", 8100)]
    resolver.hosts = {"lb0.example": ["10.0.0.1", "10.0.0.2"], "lb1.example": ["10.0.0.3"]}
    srv.startService()
    assert sorted(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100",
                                          "tcp:host=10.0.0.2:port=8100"]
    resolver.srv = [("lb1.example", 8200), ("192.0.2.7", 8100)]
    clock.advance(29)
    assert len(reporter.balancers) == 2
    clock.advance(1)
    assert sorted(reporter.balancers) == ["tcp:host=10.0.0.3:port=8200",
                                          "tcp:host=192.0.2.7:port=8100"]
    srv.stopService()


@pytest.mark.parametrize("failure", [error.DNSServerError(), error.DomainError(),
                                     defer.TimeoutError()])
def test_a_failed_lookup_keeps_the_balancers(failure):
    clock, reporter, resolver, srv = started()
    resolver.srv, resolver.hosts = [("lb0.example", 8100)], {"lb0.example": ["10.0.0.1"]}
    srv.startService()
    resolver.fail = failure
    clock.advance(30)
    assert list(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100"]
    srv.stopService()


def test_a_failed_channel_looks_again_soon_but_not_in_a_loop():
    clock, reporter, resolver, srv = started(interval=600)
    resolver.srv, resolver.hosts = [("lb0.example", 8100)], {"lb0.example": ["10.0.0.1"]}
    srv.startService()
    assert resolver.lookups == 1 and reporter.onChannelFailed is not None
    reporter.onChannelFailed("tcp:host=10.0.0.1:port=8100")
    reporter.onChannelFailed("tcp:host=10.0.0.1:port=8100")
    clock.advance(0.5)
    assert resolver.lookups == 1
    clock.advance(0.5)
    assert resolver.lookups == 2
    srv.stopService()
