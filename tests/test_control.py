"""
The balancer's control channel, in memory: registration, reports, heartbeat,
and what a broken or hostile peer gets.
"""

import pytest
from twisted.protocols import amp

from twistedcluster.wire import commands
from twistedcluster.core.pool import State
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
    # A backend that does not offer one-way reports is not told to use them.
    assert answer == {"heartbeatTimeout": 3.0, "mark": 0, "quiet": None}
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


def test_a_heartbeat_found_long_overdue_waits_one_turn_for_waiting_reports(logged):
    # The balancer was stalled past the heartbeat: when its timers run again
    # the reports that came meanwhile are still unread (the reactor runs
    # overdue timers first). The heartbeat looks again after one turn: a
    # report read then keeps the backend up, and nothing was marked down.
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    result(register(client, interval=0.5), lb)  # heartbeat 1.5 s
    # Read (here: delivered) only once the timers of the stall have run;
    # delivered as a reactor turn would, without running timers first.
    answers = []

    def report():
        client.callRemote(commands.ReportLoad, connections=0, load=0.0).addBoth(answers.append)
        pump.flush(advanceClock=False)

    lb.clock.callLater(9.9, report)
    lb.clock.advance(10)
    assert answers and "mark" in answers[0], answers
    assert lb.pool.get("a").state is State.UP
    assert not [line for line in logged if "marked down" in line], logged
    # A backend truly silent is marked down all the same, a turn later.
    lb.clock.advance(20)
    assert lb.pool.get("a").state is State.DOWN


def test_fixed_heartbeat_timeout_option():
    lb = MemoryBalancer(heartbeatTimeout=0.25)
    client, server, pump = lb.controlChannel()
    assert result(register(client, interval=5.0), lb)["heartbeatTimeout"] == 0.25


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
        (dict(host="127.0.0.1 1\r\nEVIL 2 PORT"), "host must be"),
        (dict(host="exa mple.com"), "host must be"),
        (dict(host="-bad.example"), "host must be"),
        (dict(host="[::1]"), "host must be"),
        (dict(capacity=10**9 + 1), "capacity must be"),
        (dict(connections=10**12), "connections must be"),
        (dict(load=1e308), "load must be"),
        (dict(load=float("inf")), "load must be"),
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


def test_a_live_name_is_not_taken_even_from_the_same_address():
    # A stranger copying a live backend's name and address must not close
    # its channel (and then drain it, or report load 0 in its name).
    lb = MemoryBalancer()
    c1, s1, _ = lb.controlChannel()
    c2, s2, _ = lb.controlChannel()
    result(register(c1), lb)
    f = result(register(c2), lb)
    assert f.check(commands.NameTaken)
    assert "still open" in f.getErrorMessage()
    assert not s1.transport.disconnecting
    assert lb.control.owners["a"] is s1
    assert result(c2.callRemote(commands.Drain), lb).check(commands.NotRegistered)
    assert lb.pool.get("a").state is State.UP


def test_a_restarted_backend_registers_once_its_old_channel_closes():
    # The restart case: the new process may ask before the old channel is
    # seen to close; it is refused, and its retry succeeds.
    lb = MemoryBalancer()
    c1, s1, _ = lb.controlChannel()
    c2, s2, _ = lb.controlChannel()
    result(register(c1), lb)
    assert result(register(c2), lb).check(commands.NameTaken)
    c1.transport.loseConnection()
    lb.flush()
    assert result(register(c2), lb)["heartbeatTimeout"] == 3.0
    assert lb.control.owners["a"] is s2
    assert lb.pool.get("a").state is State.UP


def test_a_restarted_backend_takes_over_a_silent_channel():
    # The old process hung (or its host vanished) with its channel open.
    lb = MemoryBalancer()
    c1, s1, _ = lb.controlChannel()
    result(register(c1), lb)
    lb.clock.advance(3.1)
    c2, s2, _ = lb.controlChannel()
    assert result(register(c2), lb)["heartbeatTimeout"] == 3.0
    assert s1.transport.disconnecting
    lb.flush()
    assert lb.pool.get("a").state is State.UP  # the old channel's close is not the backend's


def test_a_name_taken_while_silent_goes_back_when_the_taker_is_silent(logged):
    lb = MemoryBalancer()
    real, realServer, _ = lb.controlChannel()
    result(register(real, port=9000), lb)
    lb.clock.advance(3.1)  # the real backend is silent
    stranger, _, _ = lb.controlChannel()
    result(register(stranger, port=6666), lb)
    assert lb.pool.get("a").port == 6666
    assert any("taken over" in line and "6666" in line for line in logged)
    # The real one is back: refused while the stranger reports...
    back, _, _ = lb.controlChannel()
    assert result(register(back, port=9000), lb).check(commands.NameTaken)
    # ... and has its name again as soon as the stranger is silent.
    lb.clock.advance(3.1)
    assert result(register(back, port=9000), lb)["heartbeatTimeout"] == 3.0
    assert lb.pool.get("a").port == 9000


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


def test_a_one_way_unknown_command_closes_the_channel_with_one_log_line(logged):
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    client.transport.write(amp.AmpBox(_command=b"Nope").serialize())  # no _ask
    lb.flush()
    assert server.transport.disconnecting
    closing = [line for line in logged if "closing connection" in line]
    assert closing and "Unhandled Command: b'Nope'" in closing[0]
    assert not [line for line in logged if "\n" in line or "Traceback" in line], logged


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
    result(register(c1, port=9000), lb)
    lb.clock.advance(10)
    assert lb.pool.get("a").state is State.DOWN
    c2, _, _ = lb.controlChannel()
    assert result(register(c2, port=9001), lb)["heartbeatTimeout"] == 3.0
    assert lb.pool.get("a").port == 9001
    assert s1.transport.disconnecting or s1.transport.disconnected


def test_a_backend_that_registers_again_after_silence_keeps_its_name():
    lb = MemoryBalancer()
    c1, _, _ = lb.controlChannel()
    result(register(c1, port=9000), lb)
    lb.clock.advance(10)  # silent, marked down
    result(register(c1, port=9000), lb)  # back, on the same channel
    c2, _, _ = lb.controlChannel()
    assert lb.pool.get("a").state is State.UP
    f = result(register(c2, port=9001), lb)
    assert f.check(commands.NameTaken)


def test_reports_are_answered_with_a_mark_and_cancel_only_what_they_saw():
    lb = MemoryBalancer()
    client, server, pump = lb.controlChannel()
    registered = result(register(client, capacity=20), lb)
    pool = lb.pool
    first = pool.acquire("a")
    pool.connected("a", first)
    # Measured with the registration's mark, from before the connection.
    answer = result(
        client.callRemote(commands.ReportLoad, connections=0, load=0.0, seen=registered["mark"]), lb
    )
    assert answer["mark"] > registered["mark"]
    assert pool.get("a").addedSinceReport == 1
    second = pool.acquire("a")
    pool.connected("a", second)
    # Measured after the mark that followed the first connection.
    result(
        client.callRemote(commands.ReportLoad, connections=1, load=0.05, seen=answer["mark"]), lb
    )
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
    mark = pool.mark("a")
    pool.report("a", 1, 0.05, seen=mark)
    assert pool.get("a").addedSinceReport == 1  # the slow one
    pool.connected("a", slow)
    pool.report("a", 1, 0.05, seen=mark)  # measured before it connected
    assert pool.get("a").addedSinceReport == 1
    pool.report("a", 2, 0.1, seen=pool.mark("a"))
    assert pool.get("a").addedSinceReport == 0


# -- forgetting backends that went away (--forget-after) ----------------------


def downAfterRegistering(lb, name="pod", close=True, interval=1.0):
    client, _, _ = lb.controlChannel()
    result(register(client, name=name, interval=interval), lb)
    if close:
        client.transport.loseConnection()
        lb.flush()
    return client


def forgottenWhileHung(lb):
    """
    pod registers, falls silent with its channel open, and is forgotten
    (C{forgetAfter} 60): its channel's client side.
    """
    hung = downAfterRegistering(lb, close=False)
    lb.clock.advance(3)  # the heartbeat timeout: down, channel still open
    lb.clock.advance(60)
    assert "pod" not in lb.pool
    return hung


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


def test_a_forgotten_channel_that_closes_frees_its_place_and_marks_nothing(logged):
    # A hung backend is forgotten while its channel stays open; when that
    # channel closes at last, there is nothing to mark down (no error, no
    # traceback), and its place on the listener is free again.
    lb = MemoryBalancer(forgetAfter=60)
    lb.control.maxConnections = 2
    hung = downAfterRegistering(lb, close=False)
    other, _, _ = lb.controlChannel()
    result(register(other, name="b", port=9001), lb)
    lb.clock.advance(3)  # the heartbeat timeout: pod is down
    result(other.callRemote(commands.ReportLoad, connections=0, load=0.0), lb)
    lb.clock.advance(60)
    assert "pod" not in lb.pool
    assert lb.control.buildProtocol(None) is None  # full: pod's channel and b's
    hung.transport.loseConnection()
    lb.flush()
    assert not [line for line in logged if "Traceback" in line or "Unhandled" in line], logged
    newcomer, _, _ = lb.controlChannel()
    result(register(newcomer, name="c", port=9002), lb)
    assert lb.pool.get("c").state is State.UP


def test_a_forgotten_channel_does_not_speak_for_a_new_backend_of_its_name(logged):
    # pod is forgotten while its channel hangs; a new backend of the same
    # name is then added (here directly, as an operator's static backend
    # would be). The old channel closing, or its silence, is not the new
    # one's: it stays up.
    lb = MemoryBalancer(forgetAfter=60)
    hung = forgottenWhileHung(lb)
    lb.pool.register("pod", "127.0.0.1", 9100, 10, 0, 0.0, static=True)
    hung.transport.loseConnection()
    lb.flush()
    assert lb.pool.get("pod").state is State.UP and lb.pool.get("pod").port == 9100
    assert not [line for line in logged if "Traceback" in line], logged


def test_a_forgotten_channel_may_register_under_another_name(logged):
    lb = MemoryBalancer(forgetAfter=60)
    hung = forgottenWhileHung(lb)
    answer = result(register(hung, name="pod-2", port=9001), lb)
    assert "mark" in answer, answer
    assert lb.pool.get("pod-2").state is State.UP and "pod" not in lb.pool
    assert not [line for line in logged if "Traceback" in line], logged


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
    from twistedcluster.core.pool import AdminState

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

@pytest.mark.parametrize("host", ["10.0.0.5", "::1", "fe80::1", "web-1.example.com", "web_1", "localhost", "xn--bcher-kva.example"])
def test_addresses_and_host_names_are_accepted(host):
    lb = MemoryBalancer()
    client, _, _ = lb.controlChannel()
    assert result(register(client, host=host), lb)["heartbeatTimeout"] == 3.0
    assert lb.pool.get("a").host == host


def test_bounds_are_generous():
    lb = MemoryBalancer()
    client, _, _ = lb.controlChannel()
    big = dict(capacity=10**9, connections=10**9, load=1e6)
    assert result(register(client, **big), lb)["heartbeatTimeout"] == 3.0
    assert "mark" in result(client.callRemote(commands.ReportLoad, connections=10**9, load=1e6), lb)


def test_a_registration_with_thousands_of_digits_is_refused():
    lb = MemoryBalancer()
    client, server, _ = lb.controlChannel()
    f = result(register(client, capacity=int("9" * 4000)), lb)
    assert f.check(commands.InvalidArgument) or server.transport.disconnected
    assert "a" not in lb.pool


@pytest.mark.parametrize(
    "kw",
    [
        dict(connections=10**9 + 1, load=0.0),
        dict(connections=int("9" * 4000), load=0.0),
        dict(connections=0, load=1e308),
    ],
)
def test_reports_out_of_bounds_are_refused(kw):
    lb = MemoryBalancer()
    client, _, _ = lb.controlChannel()
    result(register(client), lb)
    f = result(client.callRemote(commands.ReportLoad, **kw), lb)
    assert f.check(commands.InvalidArgument)
    assert lb.pool.get("a").connections == 0


# -- strangers who never register ----------------------------------------------


def test_a_connection_that_does_not_register_in_time_is_closed(logged):
    lb = MemoryBalancer()
    _, server, _ = lb.controlChannel()
    lb.clock.advance(4.9)
    assert not server.transport.disconnecting
    lb.clock.advance(0.2)
    assert server.transport.disconnecting
    assert any("did not register within 5" in line for line in logged)


def test_a_registered_connection_is_not_closed_by_the_deadline():
    lb = MemoryBalancer()
    client, server, _ = lb.controlChannel()
    result(register(client), lb)
    for _ in range(10):
        lb.clock.advance(1.0)
        result(client.callRemote(commands.ReportLoad, connections=0, load=0.0), lb)
    assert not server.transport.disconnecting


def test_a_full_listener_closes_the_oldest_unregistered_connection(logged):
    lb = MemoryBalancer()
    lb.control.maxConnections = 3
    good, goodServer, _ = lb.controlChannel()
    result(register(good), lb)
    _, idle1, _ = lb.controlChannel()
    lb.clock.advance(1)
    _, idle2, _ = lb.controlChannel()
    # A restarted backend still gets in: the oldest stranger makes room.
    newcomer, newServer, _ = lb.controlChannel()
    assert idle1.transport.disconnecting
    assert not idle2.transport.disconnecting and not goodServer.transport.disconnecting
    assert any("oldest connection yet to register" in line for line in logged)
    result(register(newcomer, name="b", port=9001), lb)
    assert lb.pool.get("b").state is State.UP


def test_a_listener_full_of_registered_backends_refuses():
    lb = MemoryBalancer()
    lb.control.maxConnections = 2
    for name in ("a", "b"):
        client, _, _ = lb.controlChannel()
        result(register(client, name=name), lb)
    assert lb.control.buildProtocol(None) is None


def test_an_unregistered_connection_may_not_send_long_values(logged):
    lb = MemoryBalancer()
    _, server, _ = lb.controlChannel()
    server.dataReceived(b"\x00\x04name\x08\x00" + b"v" * 100)  # a 2,048-byte value
    assert server.transport.disconnecting
    assert any("too long" in line for line in logged)


def test_an_unregistered_connection_may_send_only_so_much(logged):
    # Many small boxes, each harmless, add up: before registering, a
    # connection has a budget of bytes.
    lb = MemoryBalancer()
    _, server, _ = lb.controlChannel()
    for i in range(100):
        server.dataReceived(amp.AmpBox(_ask=b"%d" % i, _command=b"Drain", pad=b"x" * 1000).serialize())
        if server.transport.disconnecting:
            break
    assert server.transport.disconnecting
    assert any("before it registers" in line for line in logged)


def test_a_registered_connection_may_not_send_a_huge_box(logged):
    lb = MemoryBalancer()
    client, server, _ = lb.controlChannel()
    result(register(client), lb)
    # Keys of ~60 KiB values, never finished: 4 MiB in plain AMP.
    for k in range(64):
        server.dataReceived(b"\x00\x03k%02d" % k + b"\xff\xff" + b"x" * 65535)
        if server.transport.disconnecting:
            break
    assert server.transport.disconnecting
    assert k < 2
    assert any("closing connection from" in line for line in logged)


def test_backends_restored_from_the_state_file_are_forgotten_too():
    # An older state file lists backends with no setting; and a restored
    # drained one whose drain is undone while it is away.
    from twistedcluster.core.pool import AdminState

    lb = MemoryBalancer(forgetAfter=60)
    lb.pool.restore("plain", "127.0.0.1", 9000, AdminState.ENABLED, 1)
    lb.pool.restore("drained", "127.0.0.1", 9001, AdminState.DRAINING, 1)
    lb.control.doStart()
    lb.clock.advance(60)
    assert "plain" not in lb.pool and "drained" in lb.pool
    lb.pool.setAdminState("drained", AdminState.ENABLED)
    lb.clock.advance(61)
    assert "drained" not in lb.pool


def _withStatic(lb, name="web", port=6379):
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer.healthcheck import TCPHealthChecks
    from twistedcluster.balancer.staticbackend import StaticBackend

    statics = TCPHealthChecks(lb.pool, MemoryReactorClock(), [StaticBackend(name, "127.0.0.1", port)])
    statics.startService()
    return statics


def test_a_backend_cannot_register_under_a_static_backends_name(logged):
    # A static backend (--backend web=..., or cluster-admin add) holds its
    # name: a backend registering it is refused, said on the channel and in
    # the log, and the static one stays as it was (address, checks, routing).
    lb = MemoryBalancer()
    statics = _withStatic(lb)
    client, server, _ = lb.controlChannel()
    f = result(register(client, name="web", port=9000), lb)
    assert f.check(commands.NameTaken)
    assert "static backend" in f.getErrorMessage()
    s = lb.pool.get("web")
    assert (s.static, s.host, s.port, s.capacity, s.state) == (True, "127.0.0.1", 6379, 1000, State.UP)
    assert "web" not in lb.control.owners and server.name is None
    assert any("static backend" in line and "web" in line and "refused" in line for line in logged)
    # The channel stays usable: it may register under another name.
    assert result(register(client, name="web-2", port=9000), lb)["heartbeatTimeout"] == 3.0
    statics.stopService()


# -- one-way reports (ControlProtocol.shortcut) --------------------------------


def oneWay(server, **args):
    """
    Hand the balancer's side a one-way ReportLoad box, as the wire gives it.
    """
    box = amp.AmpBox(_command=b"ReportLoad")
    for key, value in args.items():
        box[key.encode()] = value if isinstance(value, bytes) else repr(value).encode()
    server.ampBoxReceived(box)


def test_the_shortcut_parses_the_arguments_report_load_declares():
    # ControlProtocol.shortcut parses ReportLoad by hand: a change to the
    # command's arguments must change it too.
    from twistedcluster.balancer.control import _REPORT_ARGUMENTS

    declared = [(name, type(a), a.optional) for name, a in commands.ReportLoad.arguments]
    assert declared == _REPORT_ARGUMENTS


def test_a_one_way_report_reaches_the_pool_and_resets_the_heartbeat():
    lb = MemoryBalancer()
    client, server, _ = lb.controlChannel()
    result(register(client, interval=0.5), lb)  # heartbeat 1.5 s
    lb.clock.advance(1.0)
    oneWay(server, connections=4, load=0.012, seen=0, cost=0.003)
    s = lb.pool.get("a")
    assert (s.connections, s.load, s.cost, s.reports) == (4, 0.012, 0.003, 1)
    lb.clock.advance(1.0)
    assert lb.pool.get("a").state is State.UP  # the report reset the timer
    assert not server.transport.disconnecting


@pytest.mark.parametrize(
    "args, why",
    [
        (dict(connections=-1, load=0.0), "connections"),
        (dict(connections=1, load=float("nan")), "load"),
        (dict(connections=1, load=0.1, cost=0.0), "cost"),
    ],
)
def test_a_one_way_report_out_of_bounds_closes_only_that_channel(args, why, logged):
    lb = MemoryBalancer()
    good, goodServer, _ = lb.controlChannel()
    result(register(good, name="good"), lb)
    bad, badServer, _ = lb.controlChannel()
    result(register(bad, name="bad"), lb)
    oneWay(badServer, **args)
    assert badServer.transport.disconnecting
    assert any("closing connection from" in line and why in line for line in logged), logged
    assert lb.pool.get("bad").connections == 0
    oneWay(goodServer, connections=2, load=0.2)
    assert lb.pool.get("good").connections == 2


def test_a_malformed_one_way_report_goes_amps_way_and_is_refused(logged):
    lb = MemoryBalancer()
    client, server, _ = lb.controlChannel()
    result(register(client), lb)
    oneWay(server, connections=b"many", load=b"0.1")
    lb.flush()
    assert server.transport.disconnecting
    assert any("malformed" in line and "ReportLoad" in line for line in logged), logged
    assert lb.pool.get("a").connections == 0


def test_a_one_way_report_before_registering_is_not_taken():
    lb = MemoryBalancer()
    client, server, _ = lb.controlChannel()
    oneWay(server, connections=4, load=0.4)
    lb.flush()
    assert "a" not in lb.pool
    assert server.transport.disconnecting  # NotRegistered, one-way: the channel closes


def test_two_names_at_one_address_are_said(logged):
    # A copied --advertise: the same server under two names, each claiming
    # its whole capacity; nothing said it.
    lb = MemoryBalancer()
    a, _, _ = lb.controlChannel()
    b, _, _ = lb.controlChannel()
    c, _, _ = lb.controlChannel()
    lb.resultOf(register(a, name="a", port=9000))
    lb.resultOf(register(c, name="c", port=9001))
    assert not [line for line in logged if "registered too" in line]
    lb.resultOf(register(b, name="b", port=9000))
    [line] = [line for line in logged if "registered too" in line]
    assert "backend b registered at 127.0.0.1:9000, where backend a is registered too" in line
