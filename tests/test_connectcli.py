"""
``cluster-connect``: the stdio relay with in-memory transports, then the real
program (a subprocess) against small fake balancers on loopback.
"""

import signal
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from twistedcluster.cli.connect import (
    EXIT_BROKEN,
    EXIT_NO_BACKEND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    StdioRelay,
)
from twistedcluster.backend.echo import echoFactory
from twistedcluster.wire.redirectline import NO_BACKEND, answerLine

# -- the relay, in memory ----------------------------------------------------


class HalfCloseTransport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


class Wired:
    def __init__(self):
        self.relay = StdioRelay()
        self.net = self.relay.networkProtocol()
        self.netT = HalfCloseTransport()
        self.net.makeConnection(self.netT)
        self.net.dataReceived(b"early ")  # before the relay starts

        def makeStdio(proto):
            self.stdio = proto
            self.stdioT = HalfCloseTransport()
            proto.makeConnection(self.stdioT)
            return self.stdioT

        self.relay.start(self.net, makeStdio)
        self.codes = []
        self.relay.done.addCallback(self.codes.append)


def test_relays_both_ways_with_producers_registered():
    w = Wired()
    assert w.netT.producer is w.stdioT and w.netT.streaming
    assert w.stdioT.producer is w.netT and w.stdioT.streaming
    w.stdio.dataReceived(b"to server")
    w.net.dataReceived(b"to stdout")
    assert w.netT.value() == b"to server"
    assert w.stdioT.value() == b"early to stdout"


def test_stdin_eof_half_closes_and_waits_for_the_server():
    w = Wired()
    w.stdio.readConnectionLost()
    assert w.netT.writeClosed and not w.netT.disconnecting
    assert w.netT.producer is None
    w.net.dataReceived(b"late answer")
    assert w.stdioT.value().endswith(b"late answer")
    w.net.readConnectionLost()
    assert w.stdioT.writeClosed
    assert not w.netT.disconnecting  # stdout is still flushing
    w.stdio.writeConnectionLost()
    assert w.netT.disconnecting and w.codes == []
    w.net.connectionLost(Failure(error.ConnectionDone()))
    assert w.codes == [EXIT_OK]


def test_server_eof_first_keeps_sending_stdin():
    w = Wired()
    w.net.readConnectionLost()
    w.stdio.writeConnectionLost()
    assert not w.netT.disconnecting and w.codes == []
    w.stdio.dataReceived(b"more")
    assert w.netT.value() == b"more"
    w.stdio.readConnectionLost()
    assert w.netT.disconnecting
    w.net.connectionLost(Failure(error.ConnectionDone()))
    assert w.codes == [EXIT_OK]


def test_reset_is_exit_4_after_stdout_is_flushed():
    w = Wired()
    w.net.connectionLost(Failure(error.ConnectionLost()))
    assert w.stdioT.producerState == "paused"  # stop reading stdin
    assert w.stdioT.writeClosed and w.codes == []
    w.stdio.writeConnectionLost()
    assert w.codes == [EXIT_BROKEN]


def test_stdout_gone_closes_the_connection():
    w = Wired()
    w.stdio.connectionLost(Failure(error.ConnectionLost()))
    assert w.netT.disconnecting
    w.net.connectionLost(Failure(error.ConnectionDone()))
    assert w.codes == [EXIT_OK]


# -- the program ---------------------------------------------------------------


class Scripted(Protocol):
    def connectionMade(self):
        self.transport.write(self.factory.answers.pop(0))
        self.transport.loseConnection()


async def listen(factory):
    factory.noisy = False
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


async def fakeBalancer(*answers):
    f = Factory.forProtocol(Scripted)
    f.answers = list(answers)
    return await listen(f)


def deadPort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def connect(*args, stdin=b""):
    """
    Run cluster-connect in a thread (the reactor serves the fakes
    meanwhile), bounded by a timeout.
    """
    return await deferToThread(
        subprocess.run,
        [sys.executable, "-m", "twistedcluster.cli.connect", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture
def echo():
    port = pytest_twisted.blockon(defer.ensureDeferred(listen(echoFactory())))
    yield port.getHost().port
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_relays_stdin_to_a_backend_after_a_dead_one(echo):
    dead = deadPort()
    lb = await fakeBalancer(answerLine("127.0.0.1", dead), answerLine("127.0.0.1", echo))
    try:
        r = await connect("-v", f"127.0.0.1:{lb.getHost().port}", stdin=b"line 1\nline 2\n")
    finally:
        await lb.stopListening()
    assert (r.returncode, r.stdout) == (EXIT_OK, b"line 1\nline 2\n"), r.stderr
    err = r.stderr.decode()
    assert f"backend 127.0.0.1:{dead} named by" in err and "connection refused" in err
    assert f"connected to 127.0.0.1 {echo}" in err


@pytest_twisted.ensureDeferred
async def test_print():
    lb = await fakeBalancer(b"::1 9001\r\n")
    try:
        r = await connect("--print", f"127.0.0.1:{lb.getHost().port}")
    finally:
        await lb.stopListening()
    assert (r.returncode, r.stdout, r.stderr) == (EXIT_OK, b"::1 9001\n", b"")


@pytest_twisted.ensureDeferred
async def test_no_backend_exit_1():
    lb = await fakeBalancer(NO_BACKEND, NO_BACKEND)
    try:
        r = await connect("--print", f"127.0.0.1:{lb.getHost().port}")
        r2 = await connect(f"127.0.0.1:{lb.getHost().port}")
    finally:
        await lb.stopListening()
    for out in (r, r2):
        assert out.returncode == EXIT_NO_BACKEND
        assert out.stderr == (
            b"cluster-connect: no backend available "
            b"(the balancer answered ERROR no-backend)\n"
        )


@pytest_twisted.ensureDeferred
async def test_every_backend_dead_exit_1():
    dead = deadPort()
    lb = await fakeBalancer(*[answerLine("127.0.0.1", dead)] * 2)
    try:
        r = await connect("--attempts=2", f"127.0.0.1:{lb.getHost().port}")
    finally:
        await lb.stopListening()
    assert r.returncode == EXIT_NO_BACKEND
    assert b"accepted a connection in 2 attempts" in r.stderr
    assert f"tried 127.0.0.1:{dead} (connection refused)".encode() in r.stderr


@pytest_twisted.ensureDeferred
async def test_not_a_balancer_or_no_balancer_exit_3():
    lb = await fakeBalancer(b"220 smtp.example ESMTP\r\n")
    try:
        r = await connect(f"127.0.0.1:{lb.getHost().port}")
    finally:
        await lb.stopListening()
    assert r.returncode == EXIT_UNREACHABLE
    assert b"not a redirect listener at 127.0.0.1:" in r.stderr
    r = await connect("--print", f"127.0.0.1:{deadPort()}")
    assert r.returncode == EXIT_UNREACHABLE
    assert b"cannot reach the balancer at 127.0.0.1:" in r.stderr


@pytest_twisted.ensureDeferred
async def test_direct_mode_is_a_small_nc(echo):
    payload = bytes(range(256)) * 4096  # 1 MiB: backpressure both ways
    r = await connect("--direct", f"127.0.0.1:{echo}", stdin=payload)
    assert (r.returncode, len(r.stdout), r.stderr) == (EXIT_OK, len(payload), b"")
    assert r.stdout == payload
    r = await connect("--direct", f"127.0.0.1:{deadPort()}")
    assert r.returncode == EXIT_UNREACHABLE
    assert b"cannot connect to 127.0.0.1:" in r.stderr and b"connection refused" in r.stderr


@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2():
    for args in (["127.0.0.1"], ["[::1]"], ["--print", "--direct", "h:1"], ["h:1", "--attempts=0"], []):
        r = await connect(*args)
        assert r.returncode == EXIT_USAGE, (args, r.stderr)
        assert r.stderr, args


class Silent(Protocol):
    def connectionMade(self):
        self.factory.connected.callback(None)


@pytest_twisted.ensureDeferred
async def test_interrupted_is_exit_130():
    f = Factory.forProtocol(Silent)
    f.connected = defer.Deferred()
    lb = await listen(f)
    proc = subprocess.Popen(
        [sys.executable, "-m", "twistedcluster.cli.connect", f"127.0.0.1:{lb.getHost().port}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A test run started in the background inherits SIGINT ignored, and
        # so would the child: give it the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        await f.connected.addTimeout(20, reactor)  # it is waiting for the answer
        proc.send_signal(signal.SIGINT)
        out, err = await deferToThread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        await lb.stopListening()
    assert (proc.returncode, out, err) == (130, b"", b"cluster-connect: interrupted\n")


@pytest_twisted.ensureDeferred
async def test_direct_says_so_when_the_server_closes_without_a_byte():
    """
    A balancer with no backend available closes its client without a word:
    --direct says so and exits 1, not 0 as if served.
    """
    lb = await fakeBalancer(b"")
    try:
        r = await connect("--direct", f"127.0.0.1:{lb.getHost().port}", stdin=b"hello\n")
    finally:
        await lb.stopListening()
    assert r.returncode == EXIT_NO_BACKEND, r.stderr
    assert r.stdout == b""
    assert b"closed the connection without sending anything" in r.stderr
    assert b"no backend is available" in r.stderr


@pytest_twisted.ensureDeferred
async def test_unix_addresses_direct_and_redirect(tmp_path, echo):
    """
    unix:PATH works where HOST:PORT does: straight to a unix socket, and
    asking a redirect listener that listens on one.
    """
    from twisted.internet.endpoints import UNIXServerEndpoint

    direct = tmp_path / "echo.sock"
    f = echoFactory()
    f.noisy = False
    port = await UNIXServerEndpoint(reactor, str(direct)).listen(f)
    scripted = Factory.forProtocol(Scripted)
    scripted.answers = [answerLine("127.0.0.1", echo)]
    scripted.noisy = False
    redirect = tmp_path / "lb.sock"
    lb = await UNIXServerEndpoint(reactor, str(redirect)).listen(scripted)
    try:
        r = await connect("--direct", f"unix:{direct}", stdin=b"over unix\n")
        r2 = await connect(f"unix:{redirect}", stdin=b"redirected\n")
        r3 = await connect("--direct", f"unix:{tmp_path / 'none.sock'}")
    finally:
        await port.stopListening()
        await lb.stopListening()
    assert (r.returncode, r.stdout) == (EXIT_OK, b"over unix\n"), r.stderr
    assert (r2.returncode, r2.stdout) == (EXIT_OK, b"redirected\n"), r2.stderr
    assert r3.returncode == EXIT_UNREACHABLE and b"cannot connect to unix:" in r3.stderr
    r4 = await connect("unix:")
    assert r4.returncode == EXIT_USAGE
