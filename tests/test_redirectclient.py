"""
The redirect-mode client endpoint: the pure answer parser; the endpoint with
in-memory balancers and backends on a C{task.Clock}; the C{cluster:} endpoint
string; then the endpoint on loopback against small fake balancers.
"""

import socket

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
    clientFromString,
    connectProtocol,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistedcluster.backend.echo import echoFactory
from twistedcluster.wire.redirectline import NO_BACKEND, answerLine
from twistedcluster.client.redirectclient import (
    MAX_ANSWER_LENGTH,
    BackendAddress,
    BackendsUnreachable,
    BadAnswer,
    BalancerClosed,
    BalancerError,
    BalancerUnreachable,
    NoBackendAvailable,
    RedirectClientEndpoint,
    RedirectFailed,
    parseAnswer,
    parseEndpointArguments,
    tcpEndpoint,
)

# -- the parser ----------------------------------------------------------------


@pytest.mark.parametrize(
    "line, host, port",
    [
        (b"127.0.0.1 9001\r\n", "127.0.0.1", 9001),
        (b"127.0.0.1 9001\n", "127.0.0.1", 9001),
        (b"127.0.0.1 9001", "127.0.0.1", 9001),
        (b"::1 9001\r\n", "::1", 9001),
        (b"2001:db8::17 1\r\n", "2001:db8::17", 1),
        (b"fe80::1%eth0 65535\r\n", "fe80::1%eth0", 65535),
        (b"backend-1.example.com 8080\r\n", "backend-1.example.com", 8080),
        (b"localhost 80\r\n", "localhost", 80),
        (b"web1 00443\r\n", "web1", 443),
    ],
)
def test_parse_a_backend(line, host, port):
    assert parseAnswer(line) == BackendAddress(host, port)


def test_no_backend():
    with pytest.raises(NoBackendAvailable) as e:
        parseAnswer(NO_BACKEND)
    assert e.value.code == "no-backend"
    assert "no backend available" in str(e.value)


def test_other_balancer_errors_keep_their_code():
    with pytest.raises(BalancerError) as e:
        parseAnswer(b"ERROR overloaded\r\n")
    assert not isinstance(e.value, NoBackendAvailable)
    assert e.value.code == "overloaded"
    assert "ERROR overloaded" in str(e.value)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r\n",
        b"hello",
        b"127.0.0.1",  # missing port
        b"127.0.0.1 \r\n",
        b" 9001\r\n",  # missing host
        b"127.0.0.1  9001\r\n",  # two spaces
        b"127.0.0.1\t9001\r\n",
        b"127.0.0.1 9001 extra\r\n",
        b"127.0.0.1:9001\r\n",
        b"[::1] 9001\r\n",
        b"::1:9001\r\n",
        b"127.0.0.1 0\r\n",  # port out of range
        b"127.0.0.1 65536\r\n",
        b"127.0.0.1 99999999999999999999\r\n",
        b"127.0.0.1 -1\r\n",
        b"127.0.0.1 +80\r\n",
        b"127.0.0.1 8_0\r\n",
        b"127.0.0.1 0x50\r\n",
        b"127.0.0.1 \xd9\xa1\r\n",  # an Arabic-Indic digit
        b"h\xc3\xa9 80\r\n",  # not ASCII
        b"host\x00 80\r\n",
        b"127.0.0.1 9001\n\n",
        b"-bad- 80\r\n",
        b"a..b 80\r\n",
        b"a/b 80\r\n",
        b"ERROR\r\n",
        b"ERROR \r\n",
        b"ERRORno-backend\r\n",
        b"ERROR no backend\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"\x00\x04_ask\x00\x011",
    ],
)
def test_garbage_is_a_bad_answer(line):
    with pytest.raises(BadAnswer):
        parseAnswer(line)


def test_too_long():
    line = b"a" * (MAX_ANSWER_LENGTH - 4) + b" 80\r\n"
    assert len(line) > MAX_ANSWER_LENGTH
    with pytest.raises(BadAnswer, match="longer than 1024"):
        parseAnswer(line)
    longHost = ".".join(["a" * 63] * 4)  # 255 characters: over DNS's 253
    with pytest.raises(BadAnswer, match="no valid host"):
        parseAnswer(f"{longHost} 80\r\n".encode())


@settings(max_examples=200)
@given(
    host=st.one_of(st.ip_addresses().map(str), st.from_regex(r"\A[a-z][a-z0-9]{0,20}(\.[a-z]{1,10}){0,3}\Z")),
    port=st.integers(1, 65535),
)
def test_whatever_the_balancer_writes_parses_back(host, port):
    assert parseAnswer(answerLine(host, port)) == BackendAddress(host, port)


@given(st.binary(max_size=2000))
def test_any_bytes_give_an_address_or_a_redirect_error(data):
    try:
        parseAnswer(data)
    except RedirectFailed:
        pass


def test_errors_say_what_was_tried():
    e = BackendsUnreachable("gave up", [])
    assert str(e) == "gave up"
    from twistedcluster.client.redirectclient import Attempt

    e.tried = (
        Attempt(BackendAddress("::1", 9001), "connection refused"),
        Attempt(BackendAddress("10.0.0.1", 80), "no answer within 5 s"),
    )
    assert str(e) == (
        "gave up; tried [::1]:9001 (connection refused), "
        "10.0.0.1:80 (no answer within 5 s)"
    )
    # Many attempts: the same one in a row once, with a count, and at most
    # ten named (attempts=100000 printed megabytes).
    dead = Attempt(BackendAddress("127.0.0.1", 9), "connection refused")
    e.tried = (dead,) * 99999 + (Attempt(BackendAddress("127.0.0.1", 10), "refused"),)
    assert str(e) == (
        "gave up; tried 127.0.0.1:9 (connection refused) x99999, 127.0.0.1:10 (refused)"
    )
    e.tried = tuple(Attempt(BackendAddress("10.0.0.1", p), "refused") for p in range(1, 13))
    assert str(e).endswith("10.0.0.1:10 (refused), and 2 more")


# -- the endpoint, in memory -----------------------------------------------------


def result(d):
    """
    What C{d} has fired with, raising its failure; it must have fired.
    """
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure(d, kind):
    with pytest.raises(kind) as e:
        result(d)
    return e.value


@implementer(IStreamClientEndpoint)
class ScriptedBalancer:
    """
    A redirect listener in memory: each connection gets the next scripted
    answer (bytes), a refusal (an exception) or silence (C{None}).
    """

    def __init__(self, *answers):
        self.answers = list(answers)
        self.transports = []
        self.protocols = []

    def connect(self, factory):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        self.transports.append(t)
        self.protocols.append(proto)
        if answer is not None:
            proto.dataReceived(answer)
        return defer.succeed(proto)

    @property
    def asked(self):
        return len(self.transports)


class Backends:
    """
    In-memory backends by address: ``accept``, ``refuse`` or ``hang``.
    """

    def __init__(self, **behaviour):
        self.behaviour = behaviour
        self.dialled = []
        self.transports = []

    def __call__(self, address):
        backends = self

        @implementer(IStreamClientEndpoint)
        class Endpoint:
            def connect(self, factory):
                backends.dialled.append(str(address))
                how = backends.behaviour[f"p{address.port}"]
                if how == "refuse":
                    return defer.fail(error.ConnectionRefusedError())
                if how == "unresolvable":
                    return defer.fail(error.DNSLookupError("backend-a.nosuch.invalid"))
                if how == "hang":
                    return defer.Deferred()
                proto = factory.buildProtocol(None)
                t = StringTransport()
                proto.makeConnection(t)
                backends.transports.append(t)
                return defer.succeed(proto)

        return Endpoint()


def endpointFor(balancer, backends, clock=None, attempts=3):
    clock = clock or Clock()
    return RedirectClientEndpoint(
        clock,
        balancer,
        attempts=attempts,
        answerTimeout=2.0,
        connectTimeout=1.0,
        backendEndpoint=backends,
        description="lb",
    )


class Hello(Protocol):
    def connectionMade(self):
        self.transport.write(b"hello")


def test_is_an_endpoint():
    verifyObject(IStreamClientEndpoint, endpointFor(ScriptedBalancer(), Backends()))


def test_connects_to_the_named_backend_with_the_callers_factory():
    lb = ScriptedBalancer(b"127.0.0.1 9001\r\n")
    backends = Backends(p9001="accept")
    proto = result(endpointFor(lb, backends).connect(Factory.forProtocol(Hello)))
    assert isinstance(proto, Hello)
    assert backends.dialled == ["127.0.0.1:9001"]
    assert backends.transports[0].value() == b"hello"
    assert lb.transports[0].disconnecting  # we hang up on the balancer


def test_dead_backend_asks_again(logged):
    lb = ScriptedBalancer(b"127.0.0.1 9001\r\n", b"::1 9002\r\n")
    backends = Backends(p9001="refuse", p9002="accept")
    proto = result(endpointFor(lb, backends).connect(Factory.forProtocol(Hello)))
    assert isinstance(proto, Hello)
    assert lb.asked == 2
    assert backends.dialled == ["127.0.0.1:9001", "[::1]:9002"]
    assert any(
        "backend 127.0.0.1:9001 named by lb failed: connection refused (attempt 1/3)" in m
        for m in logged
    )


def test_a_backend_whose_name_does_not_resolve_is_dead_and_another_is_asked_for(logged):
    # DNSLookupError is no ConnectError: it escaped as it was, and no other
    # backend was tried.
    lb = ScriptedBalancer(b"backend-a.nosuch.invalid 9001\r\n", b"127.0.0.1 9002\r\n")
    backends = Backends(p9001="unresolvable", p9002="accept")
    proto = result(endpointFor(lb, backends).connect(Factory.forProtocol(Hello)))
    assert isinstance(proto, Hello) and lb.asked == 2
    assert any("backend-a.nosuch.invalid" in m and "does not resolve" in m for m in logged)


def test_an_error_of_the_callers_own_factory_is_not_a_backend_failure():
    # Raised by the caller's buildProtocol: the caller's bug, told as it is,
    # not retried on other backends as "no backend accepted".
    class Broken(Factory):
        def buildProtocol(self, addr):
            raise ZeroDivisionError("the caller's bug")

    lb = ScriptedBalancer(b"127.0.0.1 9001\r\n", b"127.0.0.1 9002\r\n")
    backends = Backends(p9001="accept", p9002="accept")
    failure(endpointFor(lb, backends).connect(Broken()), ZeroDivisionError)
    assert lb.asked == 1


def test_backend_that_does_not_accept_in_time_counts_as_dead():
    clock = Clock()
    lb = ScriptedBalancer(b"127.0.0.1 9001\r\n", b"127.0.0.1 9002\r\n")
    backends = Backends(p9001="hang", p9002="accept")
    d = endpointFor(lb, backends, clock).connect(Factory.forProtocol(Hello))
    assert not d.called
    clock.advance(0.9)
    assert not d.called and lb.asked == 1
    clock.advance(0.2)
    assert isinstance(result(d), Hello)
    assert backends.dialled == ["127.0.0.1:9001", "127.0.0.1:9002"]


def test_gives_up_after_the_attempts_naming_what_was_tried():
    clock = Clock()
    lb = ScriptedBalancer(b"10.0.0.1 9001\r\n", b"10.0.0.2 9002\r\n", b"10.0.0.3 9003\r\n")
    backends = Backends(p9001="refuse", p9002="hang", p9003="refuse")
    d = endpointFor(lb, backends, clock).connect(Factory.forProtocol(Hello))
    clock.advance(1.0)
    e = failure(d, BackendsUnreachable)
    assert [str(a.backend) for a in e.tried] == ["10.0.0.1:9001", "10.0.0.2:9002", "10.0.0.3:9003"]
    assert str(e) == (
        "no backend named by the balancer at lb accepted a connection in 3 attempts; "
        "tried 10.0.0.1:9001 (connection refused), 10.0.0.2:9002 (no answer within 1 s), "
        "10.0.0.3:9003 (connection refused)"
    )
    assert lb.asked == 3 and not lb.answers


def test_a_backend_named_twice_is_not_dialled_twice():
    lb = ScriptedBalancer(b"127.0.0.1 9001\r\n", b"127.0.0.1 9001\r\n")
    backends = Backends(p9001="refuse")
    e = failure(endpointFor(lb, backends, attempts=2).connect(Factory()), BackendsUnreachable)
    assert backends.dialled == ["127.0.0.1:9001"]
    assert [a.reason for a in e.tried] == ["connection refused", "named again after it failed"]


def test_no_backend_is_a_clear_error_and_not_retried():
    lb = ScriptedBalancer(b"127.0.0.1 9001\r\n", NO_BACKEND)
    backends = Backends(p9001="refuse")
    e = failure(endpointFor(lb, backends).connect(Factory()), NoBackendAvailable)
    assert lb.asked == 2
    assert str(e) == (
        "no backend available (the balancer answered ERROR no-backend); "
        "tried 127.0.0.1:9001 (connection refused)"
    )


def test_garbage_from_the_balancer_is_a_clear_error():
    lb = ScriptedBalancer(b"SSH-2.0-OpenSSH_9.6\r\n")
    e = failure(endpointFor(lb, Backends()).connect(Factory()), BadAnswer)
    assert str(e) == (
        "not a redirect listener at lb? answer is not 'HOST PORT': b'SSH-2.0-OpenSSH_9.6'"
    )
    assert lb.asked == 1 and lb.transports[0].disconnected


def test_endless_line_is_cut_off_at_the_limit():
    lb = ScriptedBalancer(None)
    d = endpointFor(lb, Backends()).connect(Factory())
    t = lb.transports[0]
    proto = lb.protocols[0]
    for _ in range(MAX_ANSWER_LENGTH // 100):
        proto.dataReceived(b"x" * 100)
    assert not d.called
    proto.dataReceived(b"x" * 100)
    assert "longer than 1024" in str(failure(d, BadAnswer))
    assert t.disconnected


def test_answer_in_pieces():
    lb = ScriptedBalancer(None)
    backends = Backends(p9001="accept")
    d = endpointFor(lb, backends).connect(Factory.forProtocol(Hello))
    proto = lb.protocols[0]
    for byte in b"::1 9001\r\n":
        assert not d.called
        proto.dataReceived(bytes([byte]))
    assert isinstance(result(d), Hello)


def test_balancer_closing_without_a_line():
    lb = ScriptedBalancer(b"127.0.0.1 90")
    d = endpointFor(lb, Backends()).connect(Factory())
    lb.protocols[0].connectionLost(error.ConnectionDone())
    e = failure(d, BadAnswer)
    assert "closed the connection without a full answer line after b'127.0.0.1 90'" in str(e)


def test_balancer_closing_before_answering_is_named_so():
    # Not a bad answer: no answer at all (a balancer at its connection
    # limit, or stopping).
    lb = ScriptedBalancer(None)
    d = endpointFor(lb, Backends()).connect(Factory())
    lb.protocols[0].connectionLost(error.ConnectionDone())
    e = failure(d, BalancerClosed)
    assert not isinstance(e, BadAnswer)
    assert isinstance(e, BalancerUnreachable)
    assert str(e) == "the balancer at lb closed the connection without answering"


def test_silent_balancer_times_out():
    clock = Clock()
    lb = ScriptedBalancer(None)
    d = endpointFor(lb, Backends(), clock).connect(Factory())
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.2)
    e = failure(d, BalancerUnreachable)
    assert str(e) == "the balancer at lb did not answer within 2 s"
    assert lb.transports[0].disconnected
    assert not clock.getDelayedCalls()


def test_balancer_that_cannot_be_reached():
    lb = ScriptedBalancer(error.ConnectionRefusedError())
    e = failure(endpointFor(lb, Backends()).connect(Factory()), BalancerUnreachable)
    assert str(e).startswith("cannot reach the balancer at lb: Connection was refused")


def test_cancel_while_asking_hangs_up():
    clock = Clock()
    lb = ScriptedBalancer(None)
    d = endpointFor(lb, Backends(), clock).connect(Factory())
    d.cancel()
    failure(d, defer.CancelledError)
    assert lb.transports[0].disconnected
    assert not clock.getDelayedCalls()


def test_ask_only_asks():
    lb = ScriptedBalancer(b"::1 9001\r\n")
    backends = Backends()
    assert result(endpointFor(lb, backends).ask()) == BackendAddress("::1", 9001)
    assert backends.dialled == []


def test_default_backend_endpoints_dial_the_named_address_with_the_timeout():
    mr = MemoryReactorClock()
    lb = ScriptedBalancer(b"::1 9001\r\n", b"127.0.0.1 9002\r\n")
    ep = RedirectClientEndpoint(mr, lb, connectTimeout=1.5)
    d = ep.connect(Factory.forProtocol(Hello))
    host, port, _, timeout, _ = mr.tcpClients[0]
    assert (host, port, timeout) == ("::1", 9001, 1.5)
    # Our own timeout, on the injected clock, works whatever the reactor.
    mr.advance(1.5)
    assert not d.called and lb.asked == 2
    assert mr.connectors[0].stoppedConnecting
    assert mr.tcpClients[1][:2] == ("127.0.0.1", 9002)
    d.cancel()  # the caller gives up: the connect attempt stops
    failure(d, error.ConnectingCancelledError)
    assert mr.connectors[1].stoppedConnecting


def test_tcpEndpoint_picks_by_address_family():
    assert isinstance(tcpEndpoint(reactor, "127.0.0.1", 1), TCP4ClientEndpoint)
    assert isinstance(tcpEndpoint(reactor, "::1", 1), TCP6ClientEndpoint)
    assert isinstance(tcpEndpoint(reactor, "lb.example", 1), HostnameEndpoint)


def test_bad_settings():
    with pytest.raises(ValueError):
        RedirectClientEndpoint(Clock(), ScriptedBalancer(), attempts=0)
    with pytest.raises(ValueError):
        RedirectClientEndpoint(Clock(), ScriptedBalancer(), answerTimeout=0)


# -- the endpoint string ---------------------------------------------------------


def test_endpoint_string():
    ep = clientFromString(reactor, "cluster:host=127.0.0.1:port=8002")
    assert isinstance(ep, RedirectClientEndpoint)
    assert (ep.attempts, ep.answerTimeout, ep.connectTimeout) == (3, 5.0, 5.0)
    assert ep.description == "127.0.0.1:8002"
    assert isinstance(ep.balancer, TCP4ClientEndpoint)
    ep = clientFromString(reactor, r"cluster:\:\:1:8002:timeout=0.5:attempts=5")
    assert (ep.attempts, ep.answerTimeout, ep.connectTimeout) == (5, 0.5, 0.5)
    assert ep.description == "[::1]:8002"
    assert isinstance(ep.balancer, TCP6ClientEndpoint)
    ep = clientFromString(reactor, "CLUSTER:host=lb.example:port=8002")
    assert isinstance(ep.balancer, HostnameEndpoint)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((), {"host": "lb"}, "host and port are required"),
        ((), {"host": "lb", "port": "x"}, "port 'x' is not in 1..65535"),
        ((), {"host": "lb", "port": "0"}, "port '0' is not in 1..65535"),
        ((), {"host": "", "port": "1"}, "host is empty"),
        ((), {"host": "lb", "port": "1", "timeout": "-1"}, "timeout '-1'"),
        ((), {"host": "lb", "port": "1", "timeout": "nan"}, "timeout 'nan'"),
        ((), {"host": "lb", "port": "1", "attempts": "0"}, "attempts '0'"),
        ((), {"host": "lb", "port": "1", "retries": "2"}, "unknown argument retries"),
        (("lb",), {"host": "lb", "port": "1"}, "host given twice"),
        (("lb", "1", "2"), {}, "too many positional"),
    ],
)
def test_endpoint_string_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        parseEndpointArguments(*args, **kwargs)


def test_endpoint_string_error_through_clientFromString():
    with pytest.raises(ValueError, match="port 'http' is not in 1..65535"):
        clientFromString(reactor, "cluster:host=lb:port=http")


def test_plugin_module_does_not_import_the_reactor():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import twisted.plugins.twistedcluster_endpoints as m\n"
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'\n"
        "assert 'twistedcluster.client.redirectclient' not in sys.modules\n"
        "print(m.clusterEndpointParser.prefix)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cluster"


# -- on loopback -----------------------------------------------------------------


class Scripted(Protocol):
    def connectionMade(self):
        answer = self.factory.answers.pop(0)
        self.factory.served += 1
        self.transport.write(answer)
        self.transport.loseConnection()


async def fakeBalancer(*answers, host="127.0.0.1"):
    """
    A redirect listener on loopback that answers from a script.
    """
    f = Factory.forProtocol(Scripted)
    f.answers = list(answers)
    f.served = 0
    f.noisy = False
    server = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    port = await server(reactor, 0, interface=host).listen(f)
    return port, f


async def echoServer(host="127.0.0.1"):
    server = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    return await server(reactor, 0, interface=host).listen(echoFactory())


def deadPort(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EchoClient(Protocol):
    def __init__(self):
        self.received = b""
        self.want = 0
        self.got = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        if len(self.received) >= self.want and not self.got.called:
            self.got.callback(self.received)

    async def roundTrip(self, payload):
        self.want = len(payload)
        self.transport.write(payload)
        return await self.got.addTimeout(5, reactor)


def ipv6Available():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_loopback_dead_backend_then_live_one_echoes(logged):
    echo = await echoServer()
    dead = deadPort()
    lb, lbf = await fakeBalancer(
        answerLine("127.0.0.1", dead), answerLine("127.0.0.1", echo.getHost().port)
    )
    try:
        ep = clientFromString(reactor, f"cluster:host=127.0.0.1:port={lb.getHost().port}:timeout=2")
        client = await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
        assert await client.roundTrip(b"through redirect\n") == b"through redirect\n"
        assert client.transport.getPeer().port == echo.getHost().port
        client.transport.loseConnection()
        assert lbf.served == 2
        assert any(f"127.0.0.1:{dead} named by" in m and "connection refused" in m for m in logged)
    finally:
        await lb.stopListening()
        await echo.stopListening()


@pytest.mark.skipif(not ipv6Available(), reason="no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_loopback_ipv6_backend_and_balancer():
    echo = await echoServer("::1")
    lb, _ = await fakeBalancer(answerLine("::1", echo.getHost().port), host="::1")
    try:
        ep = clientFromString(reactor, rf"cluster:host=\:\:1:port={lb.getHost().port}")
        client = await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
        assert await client.roundTrip(b"v6") == b"v6"
        assert client.transport.getPeer().host == "::1"
        client.transport.loseConnection()
    finally:
        await lb.stopListening()
        await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_loopback_no_backend():
    lb, _ = await fakeBalancer(NO_BACKEND)
    try:
        ep = clientFromString(reactor, f"cluster:host=127.0.0.1:port={lb.getHost().port}")
        with pytest.raises(NoBackendAvailable):
            await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
    finally:
        await lb.stopListening()


@pytest_twisted.ensureDeferred
async def test_loopback_garbage_and_endless_answers():
    lb, _ = await fakeBalancer(b"HTTP/1.0 200 OK\r\n\r\nhi", b"y" * 5000)
    try:
        ep = clientFromString(reactor, f"cluster:host=127.0.0.1:port={lb.getHost().port}")
        with pytest.raises(BadAnswer, match="answer is not 'HOST PORT'"):
            await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
        with pytest.raises(BadAnswer, match="longer than 1024"):
            await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
    finally:
        await lb.stopListening()


@pytest_twisted.ensureDeferred
async def test_loopback_balancer_not_listening():
    ep = clientFromString(reactor, f"cluster:host=127.0.0.1:port={deadPort()}:timeout=2")
    with pytest.raises(BalancerUnreachable, match="cannot reach the balancer at 127.0.0.1:"):
        await connectProtocol(ep, EchoClient()).addTimeout(10, reactor)
