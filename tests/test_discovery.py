"""
Balancers found by SRV, with a fake resolver and a Clock: what is added and
let go, when it looks again, and that a failed lookup keeps what it had.
The real DNS server is in tests/test_e2e_srv.py.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error

from twistedcluster.backend.discovery import (
    SRVBalancers,
    lookupNames,
    parseResolvConf,
    readResolvConf,
    srvName,
)

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
    def __init__(self, name=NAME):
        self.name = name
        self.srv = []  # (target, port)
        self.hosts = {}
        self.fail = None
        self.lookups = 0
        self.asked = []

    def lookupService(self, name):
        self.asked.append(name)
        if name != self.name:
            return defer.fail(error.DomainError(name))
        self.lookups += 1
        if self.fail is not None:
            return defer.fail(self.fail)
        answers = [
            dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(0, 0, port, target))
            for target, port in self.srv
        ]
        return defer.succeed((answers, [], []))

    def lookupAddress(self, name):
        failure = self.hosts[name]
        if isinstance(failure, Exception):
            return defer.fail(failure)
        return defer.succeed((
            [dns.RRHeader(name, dns.A, payload=dns.Record_A(a))
             for a in self.hosts[name] if ":" not in a], [], []))

    def lookupIPV6Address(self, name):
        return defer.succeed((
            [dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(a))
             for a in self.hosts[name] if ":" in a], [], []))


def started(interval=30.0):
    clock, reporter, resolver = Clock(), Reporter(), Resolver()
    srv = SRVBalancers(NAME, reporter, resolver, clock, interval)
    return clock, reporter, resolver, srv


def test_srv_name():
    assert srvName("srv:" + NAME) == NAME
    assert srvName("srv:" + NAME + ".") == NAME + "."  # absolute: no search
    for bad in ("srv:", "srv:.", "srv:a b", "srv:host:1", "srv:a.."):
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


KUBERNETES_RESOLV_CONF = """\
# as the kubelet writes it
nameserver 10.96.0.10
search shop.svc.cluster.local svc.cluster.local cluster.local
options ndots:5
"""


def test_resolv_conf_search_and_ndots():
    assert parseResolvConf(KUBERNETES_RESOLV_CONF) == (
        ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"], 5)
    assert parseResolvConf("domain example.org.\n") == (["example.org"], 1)
    # The last of domain and search wins; a bad ndots is ignored, a big one capped.
    assert parseResolvConf("search a b\ndomain c\noptions ndots:x\n") == (["c"], 1)
    assert parseResolvConf("domain c\nsearch a b\noptions rotate ndots:30\n") == (["a", "b"], 15)
    assert parseResolvConf("nameserver 127.0.0.1\n; search x\n") == ([], 1)


def test_resolv_conf_missing_is_no_search(tmp_path):
    assert readResolvConf(str(tmp_path / "none")) == ([], 1)
    (tmp_path / "r").write_text("search x.test\n")
    assert readResolvConf(str(tmp_path / "r")) == (["x.test"], 1)


def test_lookup_names_in_resolver_order():
    short = "_cluster-control._tcp.peers"
    search = ["shop.svc.cluster.local", "cluster.local"]
    assert lookupNames(short, search, 5) == [
        short + ".shop.svc.cluster.local", short + ".cluster.local", short]
    assert lookupNames(short, search, 2) == [
        short, short + ".shop.svc.cluster.local", short + ".cluster.local"]
    assert lookupNames(short + ".", search, 5) == [short]
    assert lookupNames(short, [], 5) == [short]


def searching(search, ndots, found):
    clock, reporter = Clock(), Reporter()
    resolver = Resolver(found)
    resolver.srv, resolver.hosts = [("lb0.example", 8100)], {"lb0.example": ["10.0.0.1"]}
    srv = SRVBalancers("_cluster-control._tcp.peers", reporter, resolver, clock, 30.0,
                       search, ndots)
    return reporter, resolver, srv


def test_a_short_name_is_found_under_a_search_domain():
    reporter, resolver, srv = searching(
        ["shop.svc.cluster.local", "svc.cluster.local"], 5,
        "_cluster-control._tcp.peers.svc.cluster.local")
    srv.startService()
    assert list(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100"]
    assert resolver.asked == ["_cluster-control._tcp.peers.shop.svc.cluster.local",
                              "_cluster-control._tcp.peers.svc.cluster.local"]
    assert srv.foundAs == "_cluster-control._tcp.peers.svc.cluster.local"
    srv.stopService()


def test_no_name_found_keeps_the_balancers():
    reporter, resolver, srv = searching(["a.test"], 1, "_cluster-control._tcp.peers.a.test")
    srv.startService()
    assert list(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100"]
    srv.names = ["gone.a.test", "gone"]
    srv.lookUp()
    assert list(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100"]
    srv.stopService()


def test_a_server_failure_ends_the_search():
    reporter, resolver, srv = searching(["a.test", "b.test"], 5, "_cluster-control._tcp.peers.b.test")
    def failing(name):
        resolver.asked.append(name)
        return defer.fail(error.DNSServerError())

    resolver.lookupService = failing
    srv.startService()
    assert resolver.asked == ["_cluster-control._tcp.peers.a.test"]
    assert reporter.balancers == {}
    srv.stopService()


def test_a_name_with_no_entries_under_the_first_domain_searches_on():
    reporter, resolver, srv = searching(["a.test", "b.test"], 5, "_cluster-control._tcp.peers.b.test")
    lookup = resolver.lookupService

    def emptyUnderA(name):
        if name.endswith(".a.test"):
            resolver.asked.append(name)
            return defer.succeed(([], [], []))
        return lookup(name)

    resolver.lookupService = emptyUnderA
    srv.startService()
    assert list(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100"]
    # None has entries: the first that exists answers (every balancer let go).
    resolver.srv = []
    srv.lookUp()
    assert reporter.balancers == {}
    srv.stopService()


def test_a_backend_without_dns_server_uses_the_resolv_conf(tmp_path):
    """
    The system's resolver, as a backend in Kubernetes has it (no
    --dns-server): its name servers and search list from --resolv-conf.
    """
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.backend import service as backend

    conf = tmp_path / "resolv.conf"
    conf.write_text(KUBERNETES_RESOLV_CONF)
    o = backend.Options()
    o.parseOptions(["--listen=tcp:0:interface=127.0.0.1", f"--resolv-conf={conf}",
                    "--balancer=srv:_cluster-control._tcp.peers"])
    top = backend.makeService(o, MemoryReactorClock())
    (srv,) = [s for s in _walk(top.reporter) if isinstance(s, SRVBalancers)]
    assert srv.names[0] == "_cluster-control._tcp.peers.shop.svc.cluster.local"
    client = srv.resolver.resolvers[-1]
    assert client.dynServers == [("10.96.0.10", 53)]


def _walk(service):
    yield service
    for child in getattr(service, "services", []):
        yield from _walk(child)


def test_a_target_with_ipv6_addresses_only_is_reached_over_ipv6():
    clock, reporter, resolver, srv = started()
    resolver.srv = [("lb-v6.example", 7001), ("lb-both.example", 7002)]
    resolver.hosts = {"lb-v6.example": ["fd00::7"], "lb-both.example": ["10.0.0.2", "fd00::8"]}
    srv.startService()
    assert sorted(reporter.balancers) == [
        "tcp:host=10.0.0.2:port=7002",  # IPv4 when there is some: not both
        "tcp:host=fd00\\:\\:7:port=7001",
    ]
    srv.stopService()


def test_one_target_that_cannot_be_looked_up_costs_none_of_the_others(logged):
    # One bad SRV target made the whole lookup fail: a new backend found
    # no balancer at all.
    clock, reporter, resolver, srv = started()
    resolver.srv = [("lb0.example", 8100), ("ghost.example", 8100), ("lb1.example", 8100)]
    resolver.hosts = {
        "lb0.example": ["10.0.0.1"],
        "ghost.example": error.DNSNameError("ghost.example"),
        "lb1.example": ["10.0.0.2"],
    }
    srv.startService()
    assert sorted(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100", "tcp:host=10.0.0.2:port=8100"]
    assert any("cannot look up target ghost.example: no such name; left out" in line for line in logged)
    # A target that cannot be asked now (a timeout) keeps what it had.
    resolver.hosts["lb1.example"] = error.DNSQueryTimeoutError("lb1.example")
    clock.advance(30)
    assert sorted(reporter.balancers) == ["tcp:host=10.0.0.1:port=8100", "tcp:host=10.0.0.2:port=8100"]
    assert any("lb1.example: no answer in time; keeping its 1 address(es)" in line for line in logged)
    srv.stopService()
