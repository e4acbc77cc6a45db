"""
A backend at the balancer's own proxy or redirect address is refused: by
the listener addresses themselves, at start (--backend), on cluster-admin
add and when a backend registers.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from tests.test_control import register
from twistedcluster.balancer.selfloop import OwnListeners, isLocalAddress
from twistedcluster.testing import MemoryBalancer
from twistedcluster.wire import commands


class Port:
    def __init__(self, host, port):
        self.address = IPv4Address("TCP", host, port)

    def getHost(self):
        return self.address


def test_own_addresses_by_the_open_ports_and_else_by_their_endpoint_strings():
    own = OwnListeners(
        {"proxy": Port("127.0.0.1", 8000), "redirect": None},
        {"proxy": "tcp:1:interface=127.0.0.1", "redirect": "tcp:8002"},
    )
    assert own.loopsTo("127.0.0.1", 8000) == "proxy"  # the open port, not its string
    assert own.loopsTo("127.0.0.1", 1) is None
    assert own.loopsTo("127.0.0.2", 8000) is None  # another address, bound to one
    # Not open yet: its string, on every address of this host.
    assert own.loopsTo("127.0.0.1", 8002) == "redirect"
    assert own.loopsTo("127.5.6.7", 8002) == "redirect"
    assert own.loopsTo("192.0.2.1", 8002) is None  # TEST-NET-1: not this host's
    assert own.loopsTo("backend.example", 8002) is None  # names are not resolved
    assert "own redirect listener" in own.refusal("127.0.0.1", 8002)
    assert own.refusal("127.0.0.1", 8003) is None



@pytest.mark.parametrize("interface", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST.", "0.0.0.0", "::", "::ffff:127.0.0.1", "127.1", "2130706433"]
)
def test_this_host_however_it_is_written_loops_back(interface, host):
    # Each of these reaches a listener on 127.0.0.1 (or every interface)
    # from this host: the guard once compared the text, and any of them
    # wedged the proxy with one client.
    own = OwnListeners({"proxy": Port(interface, 8000)})
    assert own.refusal(host, 8000) is not None, host
    assert own.refusal(host, 8001) is None or host in ("0.0.0.0", "::"), host


def test_the_operators_listeners_are_no_backend_either():
    # A backend at the admin (or control, metrics) address would hand proxy
    # clients the operator's channel.
    own = OwnListeners(
        {"proxy": Port("127.0.0.1", 8000)},
        {"control": "tcp:8100:interface=127.0.0.1", "admin": "tcp:8101:interface=127.0.0.1",
         "metrics": "tcp:8102:interface=127.0.0.1"},
    )
    for port, role in ((8100, "control"), (8101, "admin"), (8102, "metrics")):
        assert own.loopsTo("127.0.0.1", port) == role
        assert f"own {role} listener" in own.refusal("localhost", port)


def test_the_unspecified_address_is_no_backend_address():
    own = OwnListeners({})
    for host in ("0.0.0.0", "::"):
        assert "no address to connect to" in own.refusal(host, 9000)
    assert own.refusal("127.0.0.1", 9000) is None

def test_local_addresses():
    assert isLocalAddress("127.0.0.1") and isLocalAddress("::1")
    assert not isLocalAddress("192.0.2.1") and not isLocalAddress("not an address")


def test_a_backend_may_not_register_at_the_proxy_listener(logged):
    lb = MemoryBalancer()
    lb.control.ownListeners = OwnListeners({"proxy": Port("0.0.0.0", 8000)})
    client, _, _ = lb.controlChannel()
    f = lb.resultOf(register(client, name="loop", port=8000))
    assert f.check(commands.InvalidArgument) and "own proxy listener" in f.getErrorMessage()
    assert "loop" not in lb.pool
    assert any("registration from" in line and "refused" in line for line in logged)
    answer = lb.resultOf(register(client, name="fine", port=8001))
    assert "mark" in answer


def test_cluster_admin_may_not_add_the_proxy_listener_as_a_backend():
    from twistedcluster.balancer.healthcheck import TCPHealthChecks

    lb = MemoryBalancer()
    statics = TCPHealthChecks(lb.pool, MemoryReactorClock(), [])
    statics.startService()
    lb.admin.statics = statics
    lb.admin.ownListeners = OwnListeners({"proxy": Port("127.0.0.1", 8000)})
    admin, _, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.AddBackend, name="loop", host="127.0.0.1", port=8000))
    assert f.check(commands.InvalidArgument) and "relay every client to itself" in f.getErrorMessage()
    assert "loop" not in lb.pool and not statics.checks
    statics.stopService()


def test_a_backend_option_at_the_proxy_listener_is_a_usage_error():
    from twistedcluster.balancer import service as balancer
    from tests.test_plugins import parse

    o = parse(balancer.Options, "--listen=tcp:8000", "--backend=127.0.0.1:8000")
    with pytest.raises(usage.UsageError, match="own proxy listener"):
        balancer.makeService(o, MemoryReactorClock())
    o = parse(balancer.Options, "--listen=tcp:8000", "--backend=127.0.0.1:8001")
    balancer.makeService(o, MemoryReactorClock())
