"""
The canary: what twistedcluster relies on in Twisted's internals still holds
in the installed Twisted, probe by probe (a failure names what changed); and
when it does not, the balancer and backend take Twisted's plain paths and say
so in one log line.
"""

import subprocess
import sys

import pytest
from twisted.internet import reactor as globalReactor

from twistedcluster.balancer import dialer

from twistedcluster.fast import fasttcp

from twistedcluster.balancer import limits

from twistedcluster.fast import internals
from twistedcluster.fast.internals import PROBES, Changed


@pytest.mark.parametrize("probe", PROBES, ids=[p.__name__ for p in PROBES])
def test_each_meaning_holds_in_this_twisted(probe):
    try:
        probe()
    except Changed as e:
        pytest.fail(f"Twisted changed what twistedcluster relies on: {e}")


def test_the_canary_passes_and_the_fast_paths_are_on():
    internals.check()
    assert internals.fastPaths() is True


def test_a_changed_log_format_is_named(monkeypatch):
    # As if a release worded its EMFILE recovery line otherwise.
    monkeypatch.setattr(internals, "EMFILE_CLOSED", "EMFILE: closed {address}")
    with pytest.raises(Changed, match="EMFILE log formats changed"):
        internals.checkPort()


def test_a_changed_buffer_meaning_is_named(monkeypatch):
    # As if written bytes were no longer counted where unsent() looks.
    monkeypatch.setattr(internals, "unsent", lambda transport: 0)
    with pytest.raises(Changed, match="do not count written bytes"):
        internals.checkTransport()


def test_a_changed_server_init_is_named(monkeypatch):
    # As if a Twisted release set one more attribute in tcp.Server.__init__:
    # LeanServer, which copies it, would lack it.
    from twisted.internet import tcp

    init = tcp.Server.__init__

    def more(self, *a, **kw):
        init(self, *a, **kw)
        self.newInTwisted = 1

    monkeypatch.setattr(tcp.Server, "__init__", more)
    with pytest.raises(Changed, match="LeanServer differs from tcp.Server: __init__ sets"):
        internals.checkLeanServer()


def test_a_changed_connection_lost_is_named(monkeypatch):
    from twisted.internet import tcp

    def lost(self, reason):
        self.somethingNew(reason)

    monkeypatch.setattr(tcp.Connection, "connectionLost", lost)
    with pytest.raises(Changed, match="tcp.Connection.connectionLost uses"):
        internals.checkLeanServer()


def test_a_changed_amp_parser_is_named(monkeypatch):
    monkeypatch.setattr(internals, "AMP_VALUE_STATE", "val")
    with pytest.raises(Changed, match="proto_key changed"):
        internals.checkAMP()


@pytest.fixture
def broken(monkeypatch):
    """
    Twisted as if the canary failed: fastPaths() runs it afresh, and no
    transport type is taken as checked already.
    """

    def check():
        raise Changed("a probe failed")

    monkeypatch.setattr(internals, "check", check)
    monkeypatch.setattr(internals, "_usable", None)
    monkeypatch.setattr(fasttcp, "_CHECKED", set())


def test_a_failed_canary_means_plain_paths_and_one_log_line(broken, logged):
    assert internals.fastPaths() is False
    assert internals.fastPaths() is False
    lines = [line for line in logged if "fast paths rely on" in line]
    assert len(lines) == 1, logged
    assert "a probe failed" in lines[0] and "plain" in lines[0]
    # Twisted's connector, not Dialled.
    assert isinstance(dialer.dialerFor(globalReactor, 3.0), dialer.ReactorDialer)


async def test_a_failed_canary_means_no_fast_writes_or_splice(broken):
    import socket

    from twisted.internet.protocol import Factory, Protocol

    from tests.loopback import listening, until

    held = []

    class Hold(Protocol):
        def connectionMade(self):
            held.append(self.transport)

    async with listening(Factory.forProtocol(Hold)) as port:
        client = socket.create_connection(("127.0.0.1", port))
        try:
            await until(lambda: held, what="accepted")
            # A plain tcp.Server, which the relay and echo would drive
            # directly: now they use Twisted's write and close (and so never
            # splice, which needs both sides driven directly).
            assert type(held[0]).__name__ == "Server"
            assert fasttcp.plainTCP(held[0]) is False
            held[0].loseConnection()
        finally:
            client.close()


def test_a_failed_canary_leaves_the_ports_logging_alone(broken):
    class Port:
        def __init__(self):
            self._logger = internals.Logger()

    port = Port()
    before = port._logger
    errors = limits.AcceptErrors(globalReactor)
    try:
        errors.watch(port, "proxy")
    finally:
        errors.stop()
    assert port._logger is before


FORCED = (
    "import twistedcluster.fast.internals as t\n"
    "def check():\n"
    "    raise t.Changed('forced for the test')\n"
    "t.check = check\n"
)


@pytest.mark.parametrize("how", ["installIfNone()", "install()"])
def test_a_failed_canary_installs_twisteds_own_reactor(how):
    code = FORCED + (
        f"from twistedcluster.fast.reactor import {how.split('(')[0]}\n"
        f"{how}\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # installIfNone leaves Twisted to pick its default; install() picks epoll.
    assert r.stdout.strip() == "EPollReactor", r.stdout


def test_a_passed_canary_installs_the_lean_reactor():
    code = (
        "from twistedcluster.fast.reactor import install\n"
        "install()\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "LeanEPollReactor"
