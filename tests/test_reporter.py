"""
The backend's load reporter against in-memory balancers, on a Clock.
"""

import pytest
from twisted.python.failure import Failure

from twistedcluster.wire import commands
from twistedcluster.core.pool import State
from twistedcluster.backend.reporter import Identity, Load, LoadReporter, reportStep
from twistedcluster.testing import MemoryBalancer


class Backend:
    """
    What the reporter measures: a connection count we set by hand.
    """

    def __init__(self, name="web1", capacity=100):
        self.connections = 0
        self.identity = Identity(name=name, host="127.0.0.1", port=9000, capacity=capacity)

    def measure(self):
        return Load(self.connections, self.connections / self.identity.capacity)


def startReporter(backend, balancers, clock, interval=1.0, step=1):
    r = LoadReporter(
        clock,
        lambda channel: backend.identity,
        backend.measure,
        [(f"lb{i}", lb.endpoint()) for i, lb in enumerate(balancers)],
        interval=interval,
        step=step,
    )
    r.startService()
    for lb in balancers:
        lb.flush()
    return r


def test_registers_then_reports_every_interval():
    lb = MemoryBalancer()
    b = Backend()
    b.connections = 2
    r = startReporter(b, [lb], lb.clock, step=1000)
    s = lb.pool.get("web1")
    assert (s.state, s.connections, s.capacity) == (State.UP, 2, 100)
    b.connections = 30
    lb.clock.advance(1.0)
    lb.flush()
    assert lb.pool.get("web1").connections == 30
    assert lb.pool.get("web1").load == 0.3
    r.stopService()


def test_reports_at_once_on_a_noticeable_step():
    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=5)
    b.connections = 3
    r.connectionsChanged(3)
    lb.clock.advance(0)
    lb.flush()
    assert lb.pool.get("web1").connections == 0  # below the step: waits for the tick
    b.connections = 6
    r.connectionsChanged(6)
    lb.clock.advance(0)
    lb.flush()
    assert lb.pool.get("web1").connections == 6
    r.stopService()


def test_reports_at_once_when_the_cost_moved():
    lb = MemoryBalancer()
    b = Backend()
    moved = []
    r = startReporter(b, [lb], lb.clock, step=1000)
    r.costMoved = lambda: bool(moved)
    b.connections = 3
    r.connectionsChanged(3)
    lb.clock.advance(0)
    lb.flush()
    assert lb.pool.get("web1").connections == 0  # nothing new: waits for the tick
    moved.append(True)
    b.connections = 2
    r.connectionsChanged(2)
    r.connectionsChanged(2)  # two asks in one turn: one report
    lb.clock.advance(0)
    lb.flush()
    assert lb.pool.get("web1").connections == 2
    assert lb.pool.get("web1").reports == 1  # one report for both asks
    r.stopService()


def test_report_step_is_two_percent_of_capacity():
    assert reportStep(1000) == 20
    assert reportStep(10) == 1


def test_reconnects_and_reregisters_after_the_balancer_restarts():
    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock)
    assert lb.pool.get("web1").state is State.UP
    # The balancer goes away: its channel closes and it refuses connections.
    lb.accepting = False
    for p in lb.pumps:
        p.server.transport.loseConnection()
    lb.flush()
    assert lb.pool.get("web1").state is State.DOWN
    assert not r.channels
    for _ in range(5):
        lb.clock.advance(1.0)
    lb.accepting = True
    for _ in range(20):
        lb.clock.advance(1.0)
        lb.flush()
    assert lb.pool.get("web1").state is State.UP
    assert len(r.channels) == 1
    r.stopService()


def test_reports_to_every_balancer():
    lbs = [MemoryBalancer(), MemoryBalancer()]
    lbs[1].clock = lbs[0].clock
    lbs[1].control.clock = lbs[0].clock
    b = Backend()
    r = startReporter(b, lbs, lbs[0].clock)
    b.connections = 42
    lbs[0].clock.advance(1.0)
    for lb in lbs:
        lb.flush()
    assert [lb.pool.get("web1").connections for lb in lbs] == [42, 42]
    r.stopService()


def test_drain_tells_every_balancer():
    lbs = [MemoryBalancer(), MemoryBalancer()]
    b = Backend()
    r = startReporter(b, lbs, lbs[0].clock)
    r.drain()
    for lb in lbs:
        lb.flush()
    assert [lb.pool.get("web1").state for lb in lbs] == [State.DRAINING, State.DRAINING]
    r.stopService()


@pytest.mark.allow_errors
def test_refused_registration_is_logged_and_retried(logged):
    lb = MemoryBalancer()
    lb.pool.register("web1", "127.0.0.9", 1234)
    other, _, _ = lb.controlChannel()
    lb.resultOf(other.callRemote(
        commands.Register,
        name="web1", host="127.0.0.9", port=1234, capacity=1, connections=0,
        load=0.0, interval=1.0,
    ))
    b = Backend()
    r = startReporter(b, [lb], lb.clock)
    assert any("refused registration as web1" in line and "in use" in line for line in logged)
    assert lb.pool.get("web1").host == "127.0.0.9"
    # The impostor goes away; the retry with backoff succeeds.
    other.transport.loseConnection()
    for _ in range(20):
        lb.clock.advance(1.0)
        lb.flush()
    assert lb.pool.get("web1").host == "127.0.0.1"
    assert lb.pool.get("web1").state is State.UP
    r.stopService()


def test_reports_echo_the_balancers_last_mark():
    # A connection routed before the balancer's answer is in the next report,
    # so that report cancels it; one routed after stays added to it.
    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=1000)
    pool = lb.pool
    before = pool.acquire("web1")
    pool.connected("web1", before)
    lb.clock.advance(1.0)  # a report (measured before the backend knew of it)
    lb.flush()
    assert pool.get("web1").addedSinceReport == 1  # not seen yet
    b.connections = 1  # the backend accepted it
    after = pool.acquire("web1")  # routed after that answer's mark
    pool.connected("web1", after)
    lb.clock.advance(1.0)
    lb.flush()
    s = pool.get("web1")
    assert (s.connections, s.addedSinceReport, s.estimatedConnections) == (1, 1, 2)
    b.connections = 2
    lb.clock.advance(1.0)
    lb.flush()
    s = pool.get("web1")
    assert (s.connections, s.addedSinceReport, s.estimatedConnections) == (2, 0, 2)
    r.stopService()


def test_reports_are_one_way_and_marks_come_only_when_needed():
    # The balancer accepts one-way reports: an idle backend's reports get no
    # answer and no mark; once a connection reached it, one mark follows the
    # next report, and the report after it sees the connection.
    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=1000)
    (channel,) = r.channels
    assert channel.oneWay
    server = lb.control.owners["web1"]
    first = channel.mark
    for _ in range(3):
        lb.clock.advance(1.0)
        lb.flush()
    assert channel.mark == first == server._lastMark
    pool = lb.pool
    ticket = pool.acquire("web1")
    pool.connected("web1", ticket)
    b.connections = 1
    lb.clock.advance(1.0)
    lb.flush()
    assert channel.mark > first  # pushed after that report
    assert pool.get("web1").addedSinceReport == 1
    lb.clock.advance(1.0)
    lb.flush()
    s = pool.get("web1")
    assert (s.connections, s.addedSinceReport) == (1, 0)
    pushed = channel.mark
    lb.clock.advance(1.0)
    lb.flush()
    assert channel.mark == pushed  # nothing new reached it: no mark
    r.stopService()


def test_a_balancer_that_does_not_offer_one_way_reports_gets_answered_ones(monkeypatch):
    from twistedcluster.balancer.control import ControlProtocol

    register = ControlProtocol.register

    def oldRegister(self, name, host, port, capacity, connections, load, interval, quiet=None, cost=None):
        # A balancer from before one-way reports ignores the offer.
        return register(self, name, host, port, capacity, connections, load, interval)

    monkeypatch.setitem(
        ControlProtocol._commandDispatch, commands.Register.commandName, (commands.Register, oldRegister)
    )
    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=1000)
    (channel,) = r.channels
    assert not channel.oneWay
    first = channel.mark
    lb.clock.advance(1.0)
    lb.flush()
    assert channel.mark > first  # each report is answered with a mark
    r.stopService()


def test_retries_name_the_balancer_as_written_and_say_why(logged):
    """
    ClientService's retry line names the endpoint string, not an object's
    repr; the first failed connect of a run says why, once.
    """
    from twisted.internet import defer, error, task

    class Refusing:
        def connect(self, factory):
            return defer.fail(error.ConnectionRefusedError("111: Connection refused"))

    clock = task.Clock()
    backend = Backend()
    r = LoadReporter(clock, lambda channel: backend.identity, backend.measure,
                     [("tcp:host=127.0.0.1:port=8100", Refusing())])
    r.startService()
    for _ in range(5):
        clock.advance(5)
    r.stopService()
    retries = [line for line in logged if "Scheduling retry" in line]
    assert len(retries) >= 3
    assert all("to connect tcp:host=127.0.0.1:port=8100 in " in line for line in retries)
    assert all(" object at 0x" not in line for line in logged)
    why = [line for line in logged if "cannot reach balancer" in line]
    assert why == [
        "cannot reach balancer tcp:host=127.0.0.1:port=8100: connection refused; "
        "retrying with backoff"
    ]


def test_stopping_while_a_registration_is_answered_later_is_clean():
    """
    A backend stopped while its Register is still unanswered (a SIGTERM
    right after start) waits for that answer, then closes the channel:
    cancelling the registration instead made ClientService fail with
    NoTransition (_connectionMade while Disconnecting), an unhandled error.
    """
    from twisted.internet import task

    clock = task.Clock()
    lb = MemoryBalancer(clock=clock)
    backend = Backend()
    r = LoadReporter(clock, lambda channel: backend.identity, backend.measure,
                     [("lb0", lb.endpoint())])
    r.startService()
    stopped = []
    r.stopService().addBoth(stopped.append)
    assert stopped == []  # waiting for the registration's answer
    lb.flush()
    clock.advance(0)
    lb.flush()
    assert len(stopped) == 1 and not isinstance(stopped[0], Failure), stopped
    assert r.channels == set()


def test_a_registration_never_answered_does_not_hold_the_stop(observeErrors):
    """
    A balancer that accepted and never answers: after the grace the channel
    is aborted (ending the registration as a refusal does) and the stop
    completes, with no error.
    """
    from twisted.internet import defer, error, task
    from twisted.internet.testing import StringTransport

    class Silent(StringTransport):
        def abortConnection(self):
            self.protocol.connectionLost(Failure(error.ConnectionLost()))

    class SilentBalancer:
        def connect(self, factory):
            proto = factory.buildProtocol(None)
            transport = Silent()
            transport.protocol = proto
            proto.makeConnection(transport)
            return defer.succeed(proto)

    clock = task.Clock()
    backend = Backend()
    r = LoadReporter(clock, lambda channel: backend.identity, backend.measure,
                     [("lb0", SilentBalancer())])
    r.startService()
    stopped = []
    r.stopService().addBoth(stopped.append)
    assert stopped == []
    clock.advance(2.5)  # the grace is over: the channel is aborted
    for _ in range(3):
        clock.advance(1)
    assert len(stopped) == 1 and not isinstance(stopped[0], Failure), stopped
    assert observeErrors == []


def test_a_drain_a_balancer_is_slow_to_answer_times_out_and_keeps_the_channel():
    """
    reporter.drain() under a timeout: the timeout is a TimeoutError (so the
    backend says "did not acknowledge in time"), and the channel to the slow
    balancer stays open (a DeferredList would have cancelled the question
    and closed it as an error).
    """
    from twisted.internet import defer, task

    clock = task.Clock()
    lb = MemoryBalancer(clock=clock)
    backend = Backend()
    r = startReporter(backend, [lb], clock)
    [channel] = r.channels
    lb.pumps.clear()  # from now on the balancer hears nothing
    told = r.drain()
    told.addTimeout(2, clock)
    failures = []
    told.addErrback(failures.append)
    clock.advance(2)
    assert failures and failures[0].check(defer.TimeoutError)
    assert r.channels == {channel} and not channel.transport.disconnecting


@pytest.mark.allow_errors
def test_a_measure_that_raises_skips_one_report_not_all_of_them(logged):
    # The reports run in a LoopingCall, which stops at its first error.
    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=1000)
    good = b.measure
    b.measure = lambda: 1 / 0
    r.measure = b.measure
    lb.clock.advance(1.0)
    lb.flush()
    assert any("cannot measure the load" in line for line in logged)
    b.connections = 7
    r.measure = good
    lb.clock.advance(1.0)
    lb.flush()
    assert lb.pool.get("web1").connections == 7
    r.stopService()


def test_a_balancer_that_never_answers_the_registration_is_left_and_tried_again(logged):
    # One that accepts and then says nothing (a host lost after the accept)
    # held the channel for ever: no reconnect, no log line.
    from twisted.internet.protocol import Protocol

    from twistedcluster.backend.reporter import REGISTER_TIMEOUT

    lb = MemoryBalancer()
    silent = []

    def buildSilent(addr):
        p = Protocol()
        silent.append(p)
        return p

    answering = lb.control.buildProtocol
    lb.control.buildProtocol = buildSilent
    b = Backend()
    r = startReporter(b, [lb], lb.clock)
    assert len(silent) == 1 and "web1" not in lb.pool
    lb.clock.advance(REGISTER_TIMEOUT)
    lb.flush()
    assert silent[0].transport.disconnected or silent[0].transport.disconnecting
    assert any("did not answer the registration within 10 s" in line for line in logged), logged
    lb.control.buildProtocol = answering
    for _ in range(10):  # the retry's backoff
        lb.clock.advance(1)
        lb.flush()
    assert lb.pool.get("web1").state == State.UP
    r.stopService()


def test_a_balancer_pushes_marks_as_hand_offs_settle_at_most_four_a_second():
    # Redirect mode: a hand-off counts as added until a report has seen it.
    # The mark such a report echoes now goes as the hand-off settles, not
    # after the backend's next report: a hand-off counted two report
    # intervals, and the redirect listener refused short connections far
    # below the backends' capacity.
    from twistedcluster.balancer.control import MARK_SPACING

    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=1000)
    (channel,) = r.channels
    asked = []
    r.reportSoonTo = asked.append  # the marks alone, not the reports they ask for
    pool = lb.pool
    first = channel.mark
    lb.control.pushMarks({"web1"})  # nothing reached it: no mark
    lb.flush()
    assert channel.mark == first and asked == []
    pool.connected("web1", pool.acquire("web1"))
    lb.control.pushMarks({"web1"})
    lb.flush()
    assert channel.mark > first and asked == [channel]
    second = channel.mark
    pool.connected("web1", pool.acquire("web1"))
    lb.control.pushMarks({"web1", "not-registered"})
    lb.flush()
    assert channel.mark == second  # too soon after the last
    lb.clock.advance(MARK_SPACING)
    lb.flush()
    assert channel.mark > second and asked == [channel, channel]
    r.stopService()


def test_a_backend_reports_to_the_balancer_whose_mark_asks_at_most_four_times_a_second():
    from twistedcluster.backend.reporter import MARK_REPORT_SPACING

    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=1000)
    (channel,) = r.channels
    reports = lb.pool.get("web1").reports
    b.connections = 3
    r.reportSoonTo(channel)
    lb.flush()
    assert lb.pool.get("web1").reports == reports + 1
    assert lb.pool.get("web1").connections == 3
    r.reportSoonTo(channel)
    r.reportSoonTo(channel)  # one waiting already: nothing more
    lb.flush()
    assert lb.pool.get("web1").reports == reports + 1
    lb.clock.advance(MARK_REPORT_SPACING)
    lb.flush()
    assert lb.pool.get("web1").reports == reports + 2
    r.stopService()
    assert not [c for c in lb.clock.getDelayedCalls() if c.active() and c.func == r._reportTo]


def test_marks_that_follow_reports_ask_for_no_report_of_their_own():
    # Under steady proxied traffic every report finds a connection newer
    # than the last mark, so a mark follows every report: were each mark to
    # ask for a report, the reports would run at the marks' pace (4 a
    # second), not the backend's interval.
    lb = MemoryBalancer()
    b = Backend()
    r = startReporter(b, [lb], lb.clock, step=1000)
    pool = lb.pool
    reports = pool.get("web1").reports
    for _ in range(40):  # 10 s
        pool.connected("web1", pool.acquire("web1"))
        b.connections += 1
        lb.clock.advance(0.25)
        lb.flush()
    assert pool.get("web1").reports - reports <= 11
    r.stopService()


def test_refusals_in_a_row_space_the_tries_out_to_half_a_minute():
    # A refusal counts as a made connect to ClientService, whose backoff
    # stops at 3 s: a wrong secret was a log line on each side every 3 s for
    # ever.  Past a couple of refusals the tries space out, up to 30 s.
    from twisted.application.internet import backoffPolicy

    from twistedcluster.backend.reporter import REFUSED_MAX_DELAY

    lb = MemoryBalancer()
    r = startReporter(Backend(), [lb], lb.clock)
    delay = r._backoff(backoffPolicy(initialDelay=0.2, maxDelay=3.0, factor=1.6, jitter=lambda: 0), "b")
    r._refusals["b"] = 0
    assert delay(1) == 0.32  # a failed connect: the connect backoff
    delays = []
    for refusals in range(1, 12):
        r._refusals["b"] = refusals
        delays.append(delay(1))
    assert delays == sorted(delays) and delays[0] < 1
    assert delays[-1] == REFUSED_MAX_DELAY == 30.0
    assert sum(1 for d in delays if d >= 10) >= 5, delays
    r.stopService()
