"""
Shared-secret authentication: the secret file, the handshake in memory, and
the listener limits.
"""

import os

import pytest
from twisted.internet import defer
from twisted.protocols import amp

from twistedcluster.wire import auth

from twistedcluster.wire import commands
from twistedcluster.wire.guardedamp import GuardedAMP
from twistedcluster.core.pool import State
from twistedcluster.backend.reporter import Identity, Load, LoadReporter
from twistedcluster.testing import MemoryBalancer

SECRET = b"correct horse battery staple 42"
WRONG = b"incorrect horse battery staple 43"


def register(lb, client, name="web1"):
    return lb.resultOf(client.callRemote(
        commands.Register, name=name, host="127.0.0.1", port=9000, capacity=10,
        connections=0, load=0.0, interval=1.0,
    ))


def handshake(lb, client, secret, channel="control"):
    return lb.resultOf(defer.ensureDeferred(auth.authenticate(client, secret, channel)))


# -- secret files ----------------------------------------------------------------


def test_secret_file_is_read_and_stripped(tmp_path):
    p = tmp_path / "secret"
    p.write_bytes(SECRET + b"\n")
    os.chmod(p, 0o600)
    assert auth.loadSecret(str(p)) == SECRET


def test_missing_or_short_secret_files_are_clear_errors(tmp_path):
    with pytest.raises(auth.SecretFileError, match="cannot read secret file"):
        auth.loadSecret(str(tmp_path / "nope"))
    p = tmp_path / "short"
    p.write_bytes(b"hunter2\n")
    with pytest.raises(auth.SecretFileError, match="use at least 16"):
        auth.loadSecret(str(p))


def test_readable_secret_file_is_warned_about(tmp_path, logged):
    p = tmp_path / "secret"
    p.write_bytes(SECRET)
    os.chmod(p, 0o644)
    auth.loadSecret(str(p))
    assert any("may be read by any user" in line for line in logged)
    logged.clear()
    os.chmod(p, 0o640)  # group-readable, as a Kubernetes Secret with fsGroup
    auth.loadSecret(str(p))
    assert not any("may be read" in line for line in logged)


# -- the handshake -----------------------------------------------------------------


def test_right_secret_authenticates_then_commands_work():
    lb = MemoryBalancer(secret=SECRET)
    client, server, _ = lb.controlChannel()
    assert handshake(lb, client, SECRET) is None
    assert server.authenticated
    assert register(lb, client)["heartbeatTimeout"] == 3.0
    assert lb.pool.get("web1").state is State.UP


def test_wrong_secret_is_refused_logged_and_closed(logged):
    lb = MemoryBalancer(secret=SECRET)
    client, server, _ = lb.controlChannel()
    f = handshake(lb, client, WRONG)
    assert f.check(commands.AuthenticationFailed)
    assert "wrong secret" in f.getErrorMessage()
    lb.clock.advance(0)
    lb.flush()
    assert server.transport.disconnected
    assert "web1" not in lb.pool
    assert any("authentication failed from" in line for line in logged)


def test_commands_before_the_handshake_get_nothing_but_a_refusal(logged):
    lb = MemoryBalancer(secret=SECRET)
    client, server, _ = lb.controlChannel()
    f = register(lb, client)
    assert f.check(commands.NotAuthenticated)
    assert "requires authentication" in f.getErrorMessage()
    assert server.transport.disconnected or server.transport.disconnecting
    assert "web1" not in lb.pool
    assert any("before authenticating" in line for line in logged)


def test_admin_commands_are_refused_too():
    lb = MemoryBalancer(secret=SECRET)
    lb.pool.register("web1", "127.0.0.1", 9000)
    admin, _, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.DrainBackend, name="web1"))
    assert f.check(commands.NotAuthenticated)
    assert lb.pool.get("web1").state is State.UP
    admin, _, _ = lb.adminChannel()
    handshake(lb, admin, SECRET, "admin")
    assert lb.resultOf(admin.callRemote(commands.DrainBackend, name="web1")) == {"state": "draining", "notSaved": None}


def test_a_control_proof_does_not_open_the_admin_channel():
    lb = MemoryBalancer(secret=SECRET)
    admin, _, _ = lb.adminChannel()
    f = handshake(lb, admin, SECRET, channel="control")
    assert f.check(commands.AuthenticationFailed)


def test_unauthenticated_connection_is_closed_after_the_timeout(logged):
    lb = MemoryBalancer(secret=SECRET)
    client, server, _ = lb.controlChannel()
    lb.clock.advance(4.9)
    assert not server.transport.disconnecting
    lb.clock.advance(0.2)
    assert server.transport.disconnecting
    assert any("did not authenticate within" in line for line in logged)


def test_a_client_with_a_secret_refuses_a_balancer_without_one():
    lb = MemoryBalancer()
    client, _, _ = lb.controlChannel()
    f = handshake(lb, client, SECRET)
    assert f.check(commands.AuthenticationFailed)
    assert "no shared secret configured" in f.getErrorMessage()


class Impostor(GuardedAMP):
    """
    A 'balancer' that accepts any proof and answers with a made-up one.
    """

    @commands.Authenticate.responder
    def anyProof(self, nonce, proof):
        return {"proof": os.urandom(32)}


def test_a_client_refuses_a_balancer_that_cannot_prove_the_secret():
    lb = MemoryBalancer()
    client = amp.AMP()
    server = Impostor()
    lb._connect(server, client)
    f = handshake(lb, client, SECRET)
    assert f.check(commands.AuthenticationFailed)
    assert "could not prove" in f.getErrorMessage()


def test_connection_cap(logged):
    # Admin connections without a secret are admitted at once: none makes room.
    lb = MemoryBalancer()
    lb.admin.maxConnections = 2
    assert lb.admin.buildProtocol(None) is not None
    lb.adminChannel()
    lb.adminChannel()
    assert lb.admin.buildProtocol(None) is None
    assert any("2 connections open" in line for line in logged)
    # A flood of refusals is one line a second, with the count.
    for _ in range(500):
        assert lb.admin.buildProtocol(None) is None
    lb.clock.advance(1)
    lines = [line for line in logged if "admin listener: closing" in line]
    assert len(lines) == 2 and "500 refused" in lines[1], lines


def test_a_full_admin_listener_closes_the_connection_idle_the_longest(logged):
    # A script that left its admin connections open does not lock an
    # operator out: once idle for a while, the idlest makes room. One in
    # use is never cut, and a flood is one line a second.
    lb = MemoryBalancer()
    lb.admin.maxConnections = 2
    busy, busyServer, _ = lb.adminChannel()
    _, idleServer, _ = lb.adminChannel()
    lb.clock.advance(4)
    assert lb.admin.buildProtocol(None) is None  # idle 4 s only: kept
    lb.clock.advance(2)
    lb.resultOf(busy.callRemote(commands.ListBackends))  # in use
    _, newcomer, _ = lb.adminChannel()
    assert idleServer.transport.disconnecting
    assert not busyServer.transport.disconnecting and not newcomer.transport.disconnecting
    lines = [line for line in logged if "admin listener: closing" in line]
    assert any("idle for 6 s" in line and "1 closed to make room" in line for line in lines), logged


def test_a_peer_trickling_a_box_keeps_no_place_on_a_full_admin_listener():
    # Bytes that never make a whole box are not use: a peer sending one
    # now and then makes room as an idle one does.
    lb = MemoryBalancer()
    lb.admin.maxConnections = 1
    _, trickler, _ = lb.adminChannel()
    box = amp.AmpBox(_ask=b"1", _command=b"ListBackends").serialize()
    for i in range(6):
        lb.clock.advance(1)
        trickler.dataReceived(box[i:i + 1])
    _, newcomer, _ = lb.adminChannel()
    assert trickler.transport.disconnecting
    assert not newcomer.transport.disconnecting


def test_an_admin_change_waiting_on_the_shared_store_keeps_its_place():
    # A change is answered once saved; the connection waiting for that is
    # in use however long the store takes, and idle again once answered.
    saved = defer.Deferred()
    lb = MemoryBalancer()
    lb.admin.onChange = lambda **hints: saved
    lb.admin.maxConnections = 1
    lb.pool.register("web1", "127.0.0.1", 8001)
    client, server, _ = lb.adminChannel()
    answer = client.callRemote(commands.DrainBackend, name="web1")
    lb.flush()
    lb.clock.advance(10)
    assert lb.admin.buildProtocol(None) is None
    assert not server.transport.disconnecting
    saved.callback(None)
    lb.resultOf(answer)
    lb.clock.advance(5)
    _, newcomer, _ = lb.adminChannel()
    assert server.transport.disconnecting and not newcomer.transport.disconnecting


def test_a_full_listener_makes_room_by_closing_the_oldest_stranger(logged):
    lb = MemoryBalancer(secret=SECRET)
    lb.admin.maxConnections = 2
    admin, adminServer, _ = lb.adminChannel()
    handshake(lb, admin, SECRET, "admin")
    _, stranger, _ = lb.adminChannel()
    _, newcomer, _ = lb.adminChannel()
    assert stranger.transport.disconnecting
    assert not adminServer.transport.disconnecting and not newcomer.transport.disconnecting
    assert any("oldest connection yet to authenticate" in line for line in logged)


def test_authenticated_but_unregistered_is_closed_after_the_timeout(logged):
    lb = MemoryBalancer(secret=SECRET)
    client, server, _ = lb.controlChannel()
    handshake(lb, client, SECRET)
    lb.clock.advance(5.1)
    assert server.transport.disconnecting
    assert any("did not register within" in line for line in logged)


def test_with_a_secret_a_stranger_cannot_take_even_a_silent_name():
    lb = MemoryBalancer(secret=SECRET)
    real, realServer, _ = lb.controlChannel()
    handshake(lb, real, SECRET)
    register(lb, real)
    lb.clock.advance(10)  # silent: marked down, its name free to a holder of the secret
    stranger, _, _ = lb.controlChannel()
    f = register(lb, stranger)
    assert f.check(commands.NotAuthenticated)
    assert lb.control.owners["web1"] is realServer
    assert not realServer.transport.disconnecting


# -- the backend's reporter with a secret ------------------------------------------


def reporter(lb, secret):
    r = LoadReporter(
        lb.clock,
        lambda channel: Identity("web1", "127.0.0.1", 9000, 10),
        lambda: Load(0, 0.0),
        [("lb", lb.endpoint())],
        secret=secret,
    )
    r.startService()
    for _ in range(5):
        lb.clock.advance(0)
        lb.flush()
    return r


def test_reporter_authenticates_before_registering():
    lb = MemoryBalancer(secret=SECRET)
    r = reporter(lb, SECRET)
    assert lb.pool.get("web1").state is State.UP
    r.stopService()


@pytest.mark.allow_errors
def test_reporter_with_the_wrong_secret_never_registers(logged):
    lb = MemoryBalancer(secret=SECRET)
    r = reporter(lb, WRONG)
    for _ in range(10):
        lb.clock.advance(1.0)
        lb.flush()
    assert "web1" not in lb.pool
    assert any("refused registration as web1" in line and "wrong secret" in line for line in logged)
    r.stopService()


def test_strangers_cannot_send_long_values_before_authenticating(logged):
    lb = MemoryBalancer(secret=SECRET)
    _, server, _ = lb.controlChannel()
    server.dataReceived(b"\x00\x04name\x08\x00" + b"v" * 100)  # a 2,048-byte value
    assert server.transport.disconnecting
    assert any("too long" in line for line in logged)
