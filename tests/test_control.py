"""
The balancer's control channel, in memory: registration, reports, heartbeat,
and what a broken or hostile peer gets.
"""

import pytest
from twisted.protocols import amp

from twistedcluster import commands
from twistedcluster.pool import State
from twistedcluster.testing import MemoryBalancer


def register(client, name="a", host="127.0.0.1", port=9000, interval=1.0, **kw):
    args = dict(name=name, host=host, port=port, capacity=10, connections=0, load=0.0, interval=interval)
    args.update(kw)
    return client.callRemote(commands.Register, **args)


def result(d, balancer):
    return balancer.resultOf(d)


def test_register_and_report_reach_the_pool():
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    answer = result(register(client, capacity=20, connections=3, load=0.15), lb)
    assert answer == {"heartbeatTimeout": 3.0, "mark": 0}
    s = lb.pool.get("a")
    assert (s.state, s.host, s.port, s.capacity, s.connections) == (State.UP, "127.0.0.1", 9000, 20, 3)
    result(client.callRemote(commands.ReportLoad, connections=7, load=0.35), lb)
    s = lb.pool.get("a")
    assert (s.connections, s.load) == (7, 0.35)


def test_channel_closing_marks_down_at_once():
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    result(register(client), lb)
    client.transport.loseConnection()
    lb.flush()
    assert lb.pool.get("a").state is State.DOWN
    assert lb.pool.eligible() == ()


def test_silence_marks_down_and_a_report_brings_it_back():
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    result(register(client, interval=0.5), lb)  # heartbeat 1.5 s
    lb.clock.advance(1.0)
    result(client.callRemote(commands.ReportLoad, connections=0, load=0.0), lb)
    lb.clock.advance(1.0)
    assert lb.pool.get("a").state is State.UP  # the report reset the timer
    lb.clock.advance(1.0)
    assert lb.pool.get("a").state is State.DOWN
    result(client.callRemote(commands.ReportLoad, connections=1, load=0.1), lb)
    assert lb.pool.get("a").state is State.UP


def test_fixed_heartbeat_timeout_option():
    lb = MemoryBalancer(heartbeatTimeout=0.25)
    client, server, pump = lb.controlChannel()
    assert result(register(client, interval=5.0), lb) == {"heartbeatTimeout": 0.25, "mark": 0}


def test_report_before_register_is_a_clear_error():
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    f = result(client.callRemote(commands.ReportLoad, connections=1, load=0.1), lb)
    assert f.check(commands.NotRegistered)
    assert "register before" in f.getErrorMessage()
    assert not server.transport.disconnecting  # an error, not a dropped channel


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(name=""), "name must be"),
        (dict(name="has space"), "white space"),
        (dict(port=0), "port must be"),
        (dict(capacity=0), "capacity must be"),
        (dict(load=float("nan")), "load must be"),
        (dict(connections=-1), "connections must be"),
        (dict(interval=0.0), "interval must be"),
    ],
)
def test_invalid_registration_is_refused(kw, message):
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    f = result(register(client, **kw), lb)
    assert f.check(commands.InvalidArgument)
    assert message in f.getErrorMessage()
    assert len(lb.pool) == 0


def test_name_taken_by_another_live_backend():
    lb = MemoryBalancer()
    c1, _, _ = lb.controlChannel()
    c2, _, _ = lb.controlChannel()
    result(register(c1, port=9000), lb)
    f = result(register(c2, port=9001), lb)
    assert f.check(commands.NameTaken)
    assert "127.0.0.1:9000" in f.getErrorMessage()
    assert lb.pool.get("a").port == 9000


def test_same_backend_on_a_new_channel_takes_over():
    # A backend restarted before its old channel was seen to close.
    lb = MemoryBalancer()
    c1, s1, _ = lb.controlChannel()
    c2, s2, _ = lb.controlChannel()
    result(register(c1), lb)
    result(register(c2), lb)
    assert s1.transport.disconnecting
    lb.flush()
    assert lb.pool.get("a").state is State.UP  # the old channel's close is not the backend's


def test_unknown_command_gets_an_error_and_is_logged(logged):
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()

    class Bogus(amp.Command):
        commandName = b"Bogus"

    f = result(client.callRemote(Bogus), lb)
    assert f.check(amp.UnhandledCommand)
    assert any("unknown command b'Bogus'" in line for line in logged)
    result(register(client), lb)  # the channel still works
    assert lb.pool.get("a").state is State.UP


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\nGET / HTTP/1.0\r\n\r\n",
        b"\x00\x00",  # an empty box
        b"\x00\x04name" + b"\xff\xff" + b"x" * 10,  # a value claiming 65535 bytes... then a bad key
        b"".join(b"\x00\x01k\x00\x01v" for _ in range(100)),  # a box with too many keys
    ],
)
def test_malformed_boxes_close_only_that_connection(data, logged):
    lb = MemoryBalancer()
    good, _, _ = lb.controlChannel()
    result(register(good, name="good"), lb)
    bad, badServer, _ = lb.controlChannel()
    badServer.dataReceived(data)
    if data.startswith(b"\x00\x04name"):
        badServer.dataReceived(b"y" * 70000)
    assert badServer.transport.disconnecting
    assert any("closing connection from" in line for line in logged)
    lb.flush()
    result(good.callRemote(commands.ReportLoad, connections=2, load=0.2), lb)
    assert lb.pool.get("good").connections == 2


def test_a_silent_owner_gives_up_its_name_to_a_new_address():
    # The old host is partitioned: its channel stays open, its reports stop.
    lb = MemoryBalancer()
    c1, s1, _ = lb.controlChannel()
    c2, _, _ = lb.controlChannel()
    result(register(c1, port=9000), lb)
    lb.clock.advance(10)
    assert lb.pool.get("a").state is State.DOWN
    assert result(register(c2, port=9001), lb) == {"heartbeatTimeout": 3.0, "mark": 0}
    assert lb.pool.get("a").port == 9001
    assert s1.transport.disconnecting or s1.transport.disconnected


def test_a_backend_that_registers_again_after_silence_keeps_its_name():
    lb = MemoryBalancer()
    c1, _, _ = lb.controlChannel()
    c2, _, _ = lb.controlChannel()
    result(register(c1, port=9000), lb)
    lb.clock.advance(10)  # silent, marked down
    result(register(c1, port=9000), lb)  # back, on the same channel
    assert lb.pool.get("a").state is State.UP
    f = result(register(c2, port=9001), lb)
    assert f.check(commands.NameTaken)


def test_reports_are_answered_with_a_mark_and_cancel_only_what_they_saw():
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    result(register(client, capacity=20), lb)
    pool = lb.pool
    first = pool.acquire("a")
    pool.connected("a", first)
    answer = result(client.callRemote(commands.ReportLoad, connections=0, load=0.0, seen=0), lb)
    assert answer == {"mark": first}
    assert pool.get("a").addedSinceReport == 1  # measured before the mark
    second = pool.acquire("a")
    pool.connected("a", second)
    result(client.callRemote(commands.ReportLoad, connections=1, load=0.05, seen=first), lb)
    s = pool.get("a")
    assert (s.connections, s.addedSinceReport) == (1, 1)
    # A backend that echoes nothing has everything taken as seen.
    result(client.callRemote(commands.ReportLoad, connections=2, load=0.1), lb)
    assert pool.get("a").addedSinceReport == 0


def test_the_mark_never_covers_a_connection_still_connecting():
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    result(register(client, capacity=20), lb)
    pool = lb.pool
    slow = pool.acquire("a")
    fast = pool.acquire("a")
    pool.connected("a", fast)
    assert pool.mark("a") == slow - 1
    pool.connected("a", slow)
    assert pool.mark("a") == fast


# -- forgetting backends that went away (--forget-after) ----------------------


def downAfterRegistering(lb, name="pod", close=True, interval=1.0):
    client, _, _ = lb.controlChannel()
    result(register(client, name=name, interval=interval), lb)
    if close:
        client.transport.loseConnection()
        lb.flush()
    return client


def test_a_backend_down_for_forget_after_is_forgotten(logged):
    lb = MemoryBalancer(forgetAfter=60)
    downAfterRegistering(lb)
    lb.clock.advance(59)
    assert lb.pool.get("pod").state is State.DOWN
    lb.clock.advance(1)
    assert "pod" not in lb.pool
    assert any("forgot 1 backend(s) down for 60 s" in line and "pod" in line for line in logged)


def test_a_silent_backend_is_forgotten_and_told_to_register_again():
    lb = MemoryBalancer(forgetAfter=60)
    client = downAfterRegistering(lb, close=False)
    lb.clock.advance(3)  # the heartbeat timeout: down, channel still open
    assert lb.pool.get("pod").state is State.DOWN
    lb.clock.advance(60)
    assert "pod" not in lb.pool
    f = result(client.callRemote(commands.ReportLoad, connections=0, load=0.0), lb)
    assert f.check(commands.NotRegistered)
    result(register(client, name="pod"), lb)
    assert lb.pool.get("pod").state is State.UP


def test_a_backend_back_in_time_is_kept_and_its_next_absence_counts_afresh():
    lb = MemoryBalancer(forgetAfter=60)
    downAfterRegistering(lb)
    lb.clock.advance(50)
    client = downAfterRegistering(lb, close=False, interval=100.0)  # back up
    lb.clock.advance(100)  # under its heartbeat timeout (300 s)
    assert lb.pool.get("pod").state is State.UP
    client.transport.loseConnection()
    lb.flush()
    lb.clock.advance(59)
    assert "pod" in lb.pool
    lb.clock.advance(1)
    assert "pod" not in lb.pool


def test_a_backend_that_came_back_by_reporting_is_kept():
    lb = MemoryBalancer(forgetAfter=60)
    client = downAfterRegistering(lb, close=False)
    lb.clock.advance(3)  # silent: down
    result(client.callRemote(commands.ReportLoad, connections=0, load=0.0), lb)
    for _ in range(40):  # reports keep it up while time passes
        lb.clock.advance(2)
        result(client.callRemote(commands.ReportLoad, connections=0, load=0.0), lb)
    assert lb.pool.get("pod").state is State.UP


def test_operator_settings_keep_a_down_backend_until_they_are_undone():
    from twistedcluster.pool import AdminState

    lb = MemoryBalancer(forgetAfter=60)
    downAfterRegistering(lb, "drained")
    downAfterRegistering(lb, "weighted")
    lb.pool.setAdminState("drained", AdminState.DRAINING)
    lb.pool.setWeight("weighted", 5)
    lb.clock.advance(600)
    assert "drained" in lb.pool and "weighted" in lb.pool
    lb.pool.setAdminState("drained", AdminState.ENABLED)
    lb.clock.advance(120)
    assert "drained" not in lb.pool and "weighted" in lb.pool


def test_forget_after_zero_never_forgets():
    lb = MemoryBalancer(forgetAfter=0)
    downAfterRegistering(lb)
    lb.clock.advance(10 ** 6)
    assert lb.pool.get("pod").state is State.DOWN
    assert lb.clock.getDelayedCalls() == []


def test_churned_names_do_not_accumulate():
    # Pods come and go, each under a new name, on one channel each.
    lb = MemoryBalancer(forgetAfter=60)
    for i in range(200):
        downAfterRegistering(lb, f"pod-{i}")
        lb.clock.advance(1)
    assert len(lb.pool) <= 61
    lb.clock.advance(60)
    assert len(lb.pool) == 0


def test_backends_due_in_the_same_second_are_forgotten_together(logged):
    lb = MemoryBalancer(forgetAfter=60)
    lb.clock.advance(0.5)
    for i in range(50):
        downAfterRegistering(lb, f"pod-{i:02d}")
        lb.clock.advance(0.01)
    assert len(lb.control._batches) == 1  # one timer for the burst
    lb.clock.advance(61 - lb.clock.seconds())
    assert len(lb.pool) == 0
    [line] = [line for line in logged if "forgot " in line]
    assert "forgot 50 backend(s)" in line and "pod-00" in line and "and 40 more" in line
