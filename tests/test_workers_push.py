"""
The main process's pushes of the pool's view to a worker that stops
reading: its memory stays bounded (the newest view waits, no queue of
them), and a worker that reads nothing for HUNG_AFTER seconds is killed,
to be started again as a worker that died is.
"""

import signal

import pytest
from twisted.internet.task import Clock

from twistedcluster.balancer import workers
from twistedcluster.balancer.workers import WorkerSupervisor, _WorkerProcess
from twistedcluster.core.cluster import Cluster


class Transport:
    """
    Just what the push reads of a channel's transport: what it holds unsent.
    """

    def __init__(self):
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0


class Channel:
    def __init__(self):
        self.transport = Transport()
        self.sent = []

    def send(self, message):
        self.sent.append(message)


class Process:
    def __init__(self):
        self.signals = []

    def signalProcess(self, sig):
        self.signals.append(sig)


@pytest.mark.allow_errors  # the kill is logged as an error
def test_a_worker_that_stops_reading_gets_only_the_newest_view_then_is_killed(logged):
    clock = Clock()
    cluster = Cluster()
    supervisor = WorkerSupervisor(2, cluster, clock, [], [], 5.0)
    worker = _WorkerProcess(supervisor, 0)
    worker.channel = Channel()
    worker.transport = Process()
    supervisor.workers[0] = worker
    supervisor.shares.join(0)
    cluster.pool.register("a", "127.0.0.1", 9000, capacity=10)
    supervisor._pushTo(worker)
    assert len(worker.channel.sent) == 1
    # The worker stops reading: what was sent stays unsent.
    worker.channel.transport._tempDataLen = 500
    for n in range(50):
        cluster.pool.register(f"b{n}", "127.0.0.1", 9001 + n, capacity=10)
        supervisor._pushTo(worker)
        clock.advance(0.1)
    assert len(worker.channel.sent) == 1  # no view queued behind the unread one
    # It reads again: the newest view goes, once.
    worker.channel.transport._tempDataLen = 0
    clock.advance(workers.PUSH_RETRY)
    assert len(worker.channel.sent) == 2
    # It says what changed since the view the worker has: the 50 added.
    first, newest = worker.channel.sent
    assert [e[0] for e in first["backends"]] == ["a"] and "removed" not in first
    assert sorted(e[0] for e in newest["backends"]) == sorted(f"b{n}" for n in range(50))
    assert newest["removed"] == []
    # It stops for good: killed after HUNG_AFTER seconds without reading.
    worker.channel.transport._tempDataLen = 500
    cluster.pool.register("c", "127.0.0.1", 8000, capacity=10)
    supervisor._pushTo(worker)
    clock.advance(workers.HUNG_AFTER - 1)
    assert worker.transport.signals == []
    clock.advance(2)
    assert worker.transport.signals == [signal.SIGKILL]
    assert any("has read nothing from this process" in line and "hung, killed" in line for line in logged)


@pytest.mark.allow_errors
def test_a_worker_that_answers_nothing_is_killed_even_when_nothing_changes(logged):
    # Hung workers were found only when a view waited unread, and views
    # change only with the pool: in a quiet cluster a stopped worker held
    # its clients for ever.  Every worker is pinged; one silent for
    # HUNG_AFTER is killed (and started again, as a dead one is).
    from twisted.internet.task import Clock

    from twistedcluster.balancer import workers
    from twistedcluster.core.cluster import Cluster

    clock = Clock()
    sup = workers.WorkerSupervisor(2, Cluster(), clock, [], [], drainTimeout=1.0)

    class Channel:
        transport = object()

        def __init__(self):
            self.sent = []

        def send(self, m):
            self.sent.append(m)

    signals = []
    sup._signal = lambda worker, sig: signals.append((worker.index, sig))
    quiet, answering = workers._WorkerProcess(sup, 0), workers._WorkerProcess(sup, 1)
    for w in (quiet, answering):
        w.channel, w.heard, w.pid = Channel(), 0.0, 100 + w.index
        sup.workers[w.index] = w
    sup.startService = lambda: None  # no processes here
    sup._pings.start(workers.PING_INTERVAL, now=False)
    try:
        for _ in range(int(workers.HUNG_AFTER / workers.PING_INTERVAL) + 1):
            clock.advance(workers.PING_INTERVAL)
            answering.heard = clock.seconds()  # its pong
        assert {"ping": True} in quiet.channel.sent
        assert signals == [(0, signal.SIGKILL)]
        assert any("worker 0 (pid 100) has answered nothing for 20 s: hung, killed" in line for line in logged)
        clock.advance(workers.PING_INTERVAL * 3)
        assert signals == [(0, signal.SIGKILL)]  # killed once
    finally:
        sup._pings.stop()


def test_a_worker_that_keeps_dying_does_not_delay_the_others_restart():
    # One delay for all once doubled as workers died in turn, until every
    # worker was down at once for seconds.
    from twisted.internet import error
    from twisted.python.failure import Failure

    clock = Clock()
    sup = WorkerSupervisor(2, Cluster(), clock, [], [], drainTimeout=1.0)
    sup._restart = lambda index: None

    def dies(index, lived=0.0):
        w = _WorkerProcess(sup, index)
        w.pid, w.started = 100 + index, clock.seconds() - lived
        sup.workers[index] = w
        before = {id(c) for c in clock.getDelayedCalls()}
        sup._ended(w, Failure(error.ProcessTerminated(signal=9)))
        [call] = [c for c in clock.getDelayedCalls() if id(c) not in before]
        return round(call.getTime() - clock.seconds(), 3)

    assert [dies(0) for _ in range(4)] == [0.2, 0.4, 0.8, 1.6]
    assert dies(1) == workers.RESTART_DELAY
    assert dies(0, lived=workers.STABLE_AFTER) == workers.RESTART_DELAY  # it had lived long enough


class _Quiet:
    """
    A worker's channel that takes what is sent (the pings) and drops it.
    """

    transport = object()

    def send(self, m):
        pass


def _supervised(n):
    """
    A supervisor on a fake clock with C{n} workers that have answered once
    (at 0), each of its index, backend a of capacity 10 in the pool, and
    the signals it sends.
    """
    clock = Clock()
    cluster = Cluster()
    cluster.pool.register("a", "127.0.0.1", 9000, capacity=10)
    sup = WorkerSupervisor(2, cluster, clock, [], [], drainTimeout=1.0)
    signals = []
    sup._signal = lambda worker, sig: signals.append((worker.index, sig))
    for index in range(n):
        w = _WorkerProcess(sup, index)
        w.channel, w.heard, w.pid, w.answered = _Quiet(), 0.0, 100 + index, True
        sup.workers[index] = w
        sup.shares.join(index)
    return clock, sup, signals


@pytest.mark.allow_errors
def test_a_silent_worker_keeping_room_others_wait_for_is_killed_sooner(logged):
    # A stopped worker keeps its unused share from every other worker until
    # it is killed: at HUNG_AFTER (20 s) its room was lost to everyone that
    # long.  When another worker's clients wait for room and it reserves
    # room it does not hold, it goes after STRANDED_AFTER.
    clock, sup, signals = _supervised(2)
    stopped, busy = sup.workers[0], sup.workers[1]
    plan = sup.shares.plan(sup.cluster.pool, {0: stopped.book, 1: busy.book})
    for w in (stopped, busy):
        sup.shares.sent(w.index, plan[w.index])
    assert sup.shares.unused(0, stopped.book) == 5  # half of a's room, none of it held
    sup._pings.start(workers.PING_INTERVAL, now=False)
    try:
        # Nobody waits: a silent worker is only killed at HUNG_AFTER.
        for _ in range(int(workers.STRANDED_AFTER / workers.PING_INTERVAL) + 2):
            clock.advance(workers.PING_INTERVAL)
            busy.heard = clock.seconds()
        assert signals == []
        assert any("worker 0 (pid 100) has answered nothing for 3 s; room it keeps unused: 5" in line
                   for line in logged)
        # Clients wait for room in the other worker: killed at once.
        sup.shares.demand[1] = 3
        clock.advance(workers.PING_INTERVAL)
        assert signals == [(0, signal.SIGKILL)]
        assert any("worker 0 (pid 100) has answered nothing for" in line
                   and "while keeping room other workers' clients wait for: hung, killed" in line for line in logged)
    finally:
        sup._pings.stop()


@pytest.mark.allow_errors  # the kill at the end is logged as an error
def test_answers_left_unread_by_a_busy_main_process_are_not_silence(logged):
    # The main process learns a worker spoke when it reads its messages; a
    # long turn of its own (reports, a GC pause) leaves them unread.  The
    # silence is judged after the reactor's next poll (a call made now runs
    # after it), which reads what had come: a healthy worker is not killed
    # for this process's slowness; one that sent nothing is.
    clock, sup, signals = _supervised(1)
    w = sup.workers[0]
    clock.advance(workers.HUNG_AFTER + 5)  # this process busy: nothing read
    sup._ping()
    w.heard = clock.seconds()  # the poll after the ping reads its answers
    clock.advance(0)
    assert signals == []
    clock.advance(workers.HUNG_AFTER + 5)
    sup._ping()
    clock.advance(0)  # nothing came: silent since the answers read above
    assert signals == [(0, signal.SIGKILL)]


def test_bytes_of_a_message_not_yet_whole_are_heard():
    # A long message read over several turns is not silence.
    from twistedcluster.balancer.workers import _Channel

    got, heard = [], []
    channel = _Channel(got.append, lambda: None)
    channel.onBytes = lambda: heard.append(True)
    channel.makeConnection(Transport())
    channel.transport.disconnecting = False
    channel.dataReceived(b'{"traffic": {"a": [1')
    assert heard and not got
    channel.dataReceived(b', 1, 0, 0, 1]}}\n')
    assert got == [{"traffic": {"a": [1, 1, 0, 0, 1]}}]
