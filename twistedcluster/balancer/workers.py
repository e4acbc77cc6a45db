"""
C{--workers N}: N processes serve the proxy and redirect listeners, while the
cluster stays one cluster to its users.

The main process opens each client listener once and never accepts on it:
it passes the listening socket to every worker (C{spawnProcess} childFDs),
which adopts it (C{adoptStreamPort}).  One shared accept queue, rather than
one C{SO_REUSEPORT} socket per worker, because (1) the kernel hashes a new
connection to one C{SO_REUSEPORT} socket whatever that worker's load, and
resets the connections queued on a socket whose worker died, where a shared
queue hands them to the workers still alive; (2) the endpoint's options
(interface, backlog) are parsed once, in the main process.

The main process keeps the control, admin and metrics listeners and the one
real pool; each worker routes on a mirror of it (L{twistedcluster.core.mirror})
kept over a unix socket pair: the main process sends the pool as that worker
should see it, with the worker's share of each backend's capacity
(L{mirror.CapacityShares}: capacity holds across workers however fast
clients come), the worker sends what it routed and holds, the view it
applied and how many clients wait for room, each at most every
L{SYNC_INTERVAL} seconds and only when something changed, and each saying
only what changed (at thousands of backends a whole view each interval kept
every process busy).  A pick stays a local call.  A worker that exits is started again; only its clients lose
their connections.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional

from twisted.application.service import Service
from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from twistedcluster.core import mirror
from twistedcluster.fast.transports import unsentBytes

log = Logger()

#: Seconds between two messages either way on a worker's channel, at most:
#: the slack of capacity and least-load across workers.
SYNC_INTERVAL = 0.01
#: Seconds between a worker's client-level figures (for the metrics).
STATS_INTERVAL = 0.5
#: Seconds before a worker that exited is started again (doubled, up to
#: L{MAX_RESTART_DELAY}, while that worker keeps dying within
#: L{STABLE_AFTER}).
RESTART_DELAY = 0.2
MAX_RESTART_DELAY = 10.0
STABLE_AFTER = 5.0
#: Seconds between tries to send a view to a worker that has not read the
#: last one yet.
PUSH_RETRY = 0.25
#: Seconds a worker may leave a view unread before it is taken for hung
#: and killed (then started again).
HUNG_AFTER = 20.0
#: Seconds between the pings the main process sends each worker, which a
#: worker answers from its reactor: one that answers nothing for
#: L{HUNG_AFTER} is hung, even when nothing changes (a view left unread
#: shows a hung worker only once views change).
PING_INTERVAL = 1.0
#: Seconds after which a worker that answers nothing is killed sooner than
#: L{HUNG_AFTER}: when it reserves room it does not hold (its shares) while
#: another worker's clients wait for room.  A stopped worker would
#: otherwise keep that room from everyone for HUNG_AFTER seconds.
STRANDED_AFTER = 3.0
#: Endpoint kinds whose listening socket a worker can adopt (a TLS one with
#: the same TLS settings put on it again: L{listenerTLS}).
SHAREABLE = ("tcp", "tcp6", "unix", "ssl", "mtls")


class _Channel(LineOnlyReceiver):
    """
    One JSON object a line; no AMP, since a view of many backends outgrows
    AMP's 64 KiB values.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, onMessage, onLost) -> None:
        self.onMessage = onMessage
        self.onLost = onLost

    def send(self, message) -> None:
        self.sendLine(json.dumps(message, separators=(",", ":")).encode())

    #: Told whenever bytes come, before they make a whole message: a long
    #: message read over several turns is not silence.
    onBytes = None

    def dataReceived(self, data: bytes) -> None:
        if self.onBytes is not None:
            self.onBytes()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self.onMessage(json.loads(line))

    def lineLengthExceeded(self, line):
        log.error("worker channel: a message of over {n} bytes", n=self.MAX_LENGTH)
        return super().lineLengthExceeded(line)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.onLost()


# -- the main process ------------------------------------------------------


class WorkerFigures:
    """
    The workers' client-level figures, for the main process's metrics: each
    worker's gauges as it last said, counters summed over every worker that
    ever ran (a worker's increases are added as they come), and the traffic
    counts added into the main process's L{Traffic}.  L{proxy}, L{limit} and
    L{redirect} read as the factories the metrics read in one process.
    """

    def __init__(self, traffic=None) -> None:
        self.traffic = traffic
        self.gauges: Dict[int, Dict[str, int]] = {}
        self.counters: Dict[str, object] = {}
        self.proxy = _SummedProxy(self)
        self.limit = _SummedLimit(self)
        self.redirect = _SummedRedirect(self)

    def gauge(self, name: str) -> int:
        return sum(g.get(name, 0) for g in self.gauges.values())

    def counter(self, name: str) -> int:
        value = self.counters.get(name, 0)
        return value if isinstance(value, int) else 0

    def add(self, index: int, stats, live: bool = True) -> None:
        """
        A worker's figures; from one that has exited (C{live} false: its
        last figures, read after its end), the counters only.
        """
        if live:
            self.gauges[index] = stats.get("gauges", {})
        deltas = stats.get("counters", {})
        traffic = self.traffic
        if traffic is not None:
            for key, n in deltas.pop("ended", {}).items():
                listener, _, end = key.partition("|")
                traffic.ended[(listener, end)] = traffic.ended.get((listener, end), 0) + n
            for name, (to, back) in deltas.pop("bytes", {}).items():
                counts = traffic.bytes.setdefault(name, [0, 0])
                counts[0] += to
                counts[1] += back
            if "connect" in deltas:
                _addHistogram(traffic.connectTime, deltas.pop("connect"))
            for listener, d in deltas.pop("duration", {}).items():
                if listener in traffic.duration:
                    _addHistogram(traffic.duration[listener], d)
        mirror.addDeltas(self.counters, deltas)

    def gone(self, index: int) -> None:
        self.gauges.pop(index, None)


def _addHistogram(h, delta) -> None:
    *counts, total, n = delta
    if len(counts) == len(h.counts):
        for i, c in enumerate(counts):
            h.counts[i] += c
        h.sum += total
        h.count += n


class _SummedProxy:
    def __init__(self, figures: WorkerFigures) -> None:
        self.figures = figures
        self.health = self.admission = self

    @property
    def clients(self):
        return range(self.figures.gauge("clients"))

    @property
    def waiting(self) -> int:
        return self.figures.gauge("waiting")

    def __getattr__(self, name: str) -> int:
        if name in mirror.COUNTERS:
            return self.figures.counter(name)
        raise AttributeError(name)


class _SummedLimit:
    def __init__(self, figures: WorkerFigures) -> None:
        self.figures = figures

    @property
    def maxConnections(self) -> int:
        return self.figures.gauge("limit")

    @property
    def count(self) -> int:
        return self.figures.gauge("count")

    @property
    def paused(self) -> bool:
        gauges = self.figures.gauges.values()
        return bool(gauges) and all(g.get("paused") for g in gauges)


class _SummedRedirect:
    def __init__(self, figures: WorkerFigures) -> None:
        self.figures = figures

    @property
    def refused(self) -> int:
        return self.figures.counter("refused")


class _WorkerProcess(protocol.ProcessProtocol):
    """
    A worker as its supervisor sees it: its log lines, its exit.
    """

    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.book = mirror.TrafficBook()
        self.channel: Optional[_Channel] = None
        #: What it was last sent of the pool (each view after the first
        #: says only what changed), and of the PROXY header versions.
        self.view = mirror.ViewSender()
        self.saidProxy: Optional[Dict[str, str]] = None
        #: Since when a view has waited for it to read the last one, and
        #: the call that tries again (L{WorkerSupervisor._pushLater}).
        self.stuckSince: Optional[float] = None
        self.retry = None
        #: When it last sent anything (an answer to a ping, figures), and
        #: whether it has since it started.
        self.heard: Optional[float] = None
        self.answered = False
        #: Whether its silence since it last answered was logged.
        self.warned = False
        self.started = 0.0
        self.pid: Optional[int] = None
        self.ended = defer.Deferred()
        self._partial = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                log.info(
                    "worker {index} (pid {pid}): {line}",
                    index=self.index,
                    pid=self.pid,
                    line=line.decode("utf-8", "replace"),
                )

    def processEnded(self, reason) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Opens the shared client listeners, runs the workers on them, and keeps
    their pools and the main pool one.

    @param listeners: (role, endpoint string) of the proxy and redirect
        listeners, as the options give them.
    @param argv: the balancer's own arguments, for the workers to parse.
    @param onPort: told (role, port) once a listener is open (for /readyz).
    """

    def __init__(
        self,
        count: int,
        cluster,
        reactor,
        listeners,
        argv: List[str],
        drainTimeout: float,
        onPort=None,
        syncInterval: float = SYNC_INTERVAL,
        traffic=None,
        sendProxyFor: Optional[Dict[str, str]] = None,
        shareStdout: bool = False,
        handedOff=None,
    ) -> None:
        self.count = count
        #: Told of each redirect answer a worker handed off, as the main
        #: pool counts it (L{mirror.fold}): the main process's redirect
        #: factory, which expires it.
        self.handedOff = handedOff
        #: Whether each worker writes to this process's standard output
        #: itself (C{--access-log -}: the records as they are) rather than
        #: to a pipe read as log lines.
        self.shareStdout = shareStdout
        #: The static backends' own PROXY header versions, by name (the
        #: main process's, which cluster-admin add and remove change): sent
        #: with the view, so that every worker has them as they are now.
        self.sendProxyFor = sendProxyFor if sendProxyFor is not None else {}
        self.cluster = cluster
        self.reactor = reactor
        self.listeners = listeners
        self.argv = argv
        self.drainTimeout = drainTimeout
        self.onPort = onPort
        self.syncInterval = syncInterval
        self.figures = WorkerFigures(traffic)
        self.ports: Dict[str, Any] = {}
        self.workers: Dict[int, _WorkerProcess] = {}
        #: Each worker's next restart delay, by index: one worker that keeps
        #: dying does not delay the restart of another (with one delay for
        #: all, workers killed in turn were all down at once, for seconds).
        self.restartDelays: Dict[int, float] = {}
        self.stopping = False
        self._pushed: tuple = (None, None, None)
        #: Each worker's share of each backend's capacity.
        self.shares = mirror.CapacityShares()
        #: Whether a worker's word (a view applied, clients waiting) may
        #: change the shares, and so call for a view though the pool did not
        #: change.
        self._sharesMoved = False
        #: The pool's incarnations when the books were last checked for
        #: backends gone (L{_forgetGone}): a new map, a backend came or went.
        self._incarnations: Optional[Dict[str, int]] = None
        #: The backends whose status changed since the workers' views
        #: were told (L{_gather}).
        self._changes = cluster.pool.follow()
        self._sync = LoopingCall(self._push)
        self._pings = LoopingCall(self._ping)
        self._sync.clock = reactor
        self._pings.clock = reactor

    def privilegedStartService(self) -> None:
        from twistedcluster.balancer.listeners import (
            ListenFailed,
            explainListenError,
            proxyProtocolInner,
            withBacklog,
        )
        from twistedcluster.balancer.takeover import TakeoverError

        super().privilegedStartService()

        for role, description in self.listeners:
            inner = proxyProtocolInner(description) or description
            try:
                listenerTLS(description, self.reactor)  # as each worker will
            except TakeoverError as e:
                raise ListenFailed(f"--workers: the {role} listener {description}: {e}") from None
            opened: list = []
            failed: list = []
            d = serverFromString(self.reactor, withBacklog(inner)).listen(_NoClients())
            d.addCallbacks(opened.append, failed.append)
            if failed:
                failed[0].trap(error.CannotListenError)
                raise explainListenError(role, description, failed[0].value)
            port = opened[0]
            port.stopReading()  # the workers accept; this process never does
            self.ports[role] = port
            if self.onPort is not None:
                self.onPort(role, port)

    def startService(self) -> None:
        super().startService()
        self.stopping = False
        pool = self.cluster.pool
        pool.unfollow(self._changes)
        self._changes = pool.follow()
        for index in range(self.count):
            self._spawn(index)
        self._sync.start(self.syncInterval, now=False)
        self._pings.start(PING_INTERVAL, now=False)

    def stopService(self):
        """
        SIGTERM every worker (each stops accepting and drains its clients,
        as one balancer does) and close this process's copy of the shared
        listeners at once: once the workers have closed theirs, a new client
        is refused, as by one balancer, not accepted into a backlog nobody
        serves and reset when the drain is over.  A worker still there after
        the drain timeout and a margin is killed.
        """
        super().stopService()
        self.stopping = True
        # No view goes any more: what changes in the pool need not be kept.
        self.cluster.pool.unfollow(self._changes)
        if self._sync.running:
            self._sync.stop()
        if self._pings.running:
            self._pings.stop()
        waits = []
        for worker in list(self.workers.values()):
            waits.append(worker.ended)
            self._signal(worker, signal.SIGTERM)
        listeners = defer.DeferredList(
            [defer.maybeDeferred(p.stopListening) for p in self.ports.values()]
        )
        killer = self.reactor.callLater(self.drainTimeout + 5.0, self._killAll)
        done = defer.DeferredList(waits)

        def closed(_):
            if killer.active():
                killer.cancel()
            return listeners

        return done.addCallback(closed)

    def _killAll(self) -> None:
        for worker in list(self.workers.values()):
            log.warn("worker {index} did not stop in time: killed", index=worker.index)
            self._signal(worker, signal.SIGKILL)

    def _signal(self, worker: _WorkerProcess, sig: int) -> None:
        try:
            worker.transport.signalProcess(sig)
        except error.ProcessExitedAlready:
            pass

    def pids(self) -> Dict[int, int]:
        """
        Each running worker's process id, by index (for tests and status).
        """
        return {i: w.pid for i, w in self.workers.items() if w.pid}

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {1: 1 if self.shareStdout else "r", 2: "r", 3: theirs.fileno()}
        args = [sys.executable, "-m", "twistedcluster.balancer.workers", str(index), "3"]
        fd = 4
        for role, port in self.ports.items():
            fds[fd] = port.fileno()
            args.append(f"{role}={fd}")
            fd += 1
        args.append("--")
        args.extend(self.argv)
        worker = _WorkerProcess(self, index)
        worker.started = self.reactor.seconds()
        process = self.reactor.spawnProcess(
            worker, sys.executable, args, env=os.environ.copy(), childFDs=fds
        )
        worker.pid = process.pid
        theirs.close()

        def message(m) -> None:
            # (When it was heard, its bytes' arrival says: heard() below.)
            worker.answered = True
            worker.warned = False
            if self.workers.get(index) is not worker:
                # Read after it exited: what it held is released; its last
                # counts (the clients that ended as it drained) still count.
                stats = m.get("stats")
                if stats is not None:
                    self.figures.add(index, stats, live=False)
                return
            traffic = m.get("traffic")
            if traffic:
                mirror.fold(self.cluster.pool, worker.book, traffic, self.handedOff)
            number = m.get("applied")
            if number is not None and self.shares.applied(index, number):
                self._sharesMoved = True
            waiting = m.get("waiting")
            if waiting is not None and waiting != self.shares.demand.get(index):
                self.shares.demand[index] = waiting
                self._sharesMoved = True
            stats = m.get("stats")
            if stats is not None:
                self.figures.add(index, stats)

        channel = _Channel(message, lambda: None)

        def heard() -> None:
            if self.workers.get(index) is worker:
                worker.heard = self.reactor.seconds()

        channel.onBytes = heard
        worker.channel = channel
        factory = protocol.Factory.forProtocol(lambda: channel)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        self.workers[index] = worker
        self.shares.join(index)
        self._sharesMoved = True
        worker.heard = self.reactor.seconds()
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)
        self._pushTo(worker)

    def _ended(self, worker: _WorkerProcess, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        mirror.release(self.cluster.pool, worker.book, self.handedOff)
        if self.workers.get(worker.index) is None:
            self.shares.leave(worker.index)
            self._sharesMoved = True  # what it may have used is free
        self.figures.gone(worker.index)
        if worker.retry is not None and worker.retry.active():
            worker.retry.cancel()
        worker.retry = None
        if worker.channel is not None and worker.channel.transport is not None:
            worker.channel.transport.loseConnection()
        if self.stopping:
            log.info("worker {index} stopped", index=worker.index)
            return
        lived = self.reactor.seconds() - worker.started
        delay = self.restartDelays.get(worker.index, RESTART_DELAY)
        if lived >= STABLE_AFTER:
            delay = RESTART_DELAY
        self.restartDelays[worker.index] = min(MAX_RESTART_DELAY, delay * 2)
        log.warn(
            "worker {index} (pid {pid}) exited ({why}){cut}; starting it again in {delay} s",
            index=worker.index,
            pid=worker.pid,
            why=reason.getErrorMessage(),
            # A clean exit (SIGTERM to that worker) drained its clients first.
            cut="" if reason.check(error.ProcessDone) else ": its clients are cut off",
            delay=delay,
        )
        self.reactor.callLater(delay, self._restart, worker.index)

    def _restart(self, index: int) -> None:
        if not self.stopping and self.running and index not in self.workers:
            self._spawn(index)

    def _push(self) -> None:
        # The pool's snapshot is cached until anything in it changes: an
        # idle cluster costs no view.
        marker = (
            self.cluster.pool.snapshot(),
            self.cluster.policyName,
            tuple(sorted(self.sendProxyFor.items())),
        )
        if marker[0] is self._pushed[0] and marker[1:] == self._pushed[1:] and not self._sharesMoved:
            return
        self._pushed = marker
        self._sharesMoved = False
        plan = self._plan()
        for worker in list(self.workers.values()):
            self._pushTo(worker, plan.get(worker.index))

    def _forgetGone(self) -> None:
        """
        Drop from every worker's book the backends the pool has forgotten
        or removed since (a backend of the same name that joins again must
        not inherit what a worker held on the old one, in its view or its
        shares): only when a backend was added or left.
        """
        pool = self.cluster.pool
        incarnations = pool.incarnations
        if incarnations is not self._incarnations:
            self._incarnations = incarnations
            for worker in self.workers.values():
                mirror.forgetGone(pool, worker.book)

    def _plan(self) -> Dict[int, Dict[str, int]]:
        self._forgetGone()
        books = {i: w.book for i, w in self.workers.items()}
        return self.shares.plan(self.cluster.pool, books)

    def _gather(self) -> None:
        """
        Tell every worker's view what changed in the pool and in the
        shares since: what its next view may have to say.
        """
        for changes in (self._changes, self.shares.moved):
            if changes:
                for worker in self.workers.values():
                    worker.view.touch(changes)
                changes.clear()

    def reopenAccessLogs(self) -> None:
        """
        Tell every worker to reopen its access log file (SIGHUP reached the
        main process; workers ignore the signal itself).
        """
        for worker in list(self.workers.values()):
            channel = worker.channel
            if channel is not None and channel.transport is not None:
                channel.send({"reopen": True})

    def _pushTo(self, worker: _WorkerProcess, shares: Optional[Dict[str, int]] = None) -> None:
        channel = worker.channel
        if channel is None or channel.transport is None:
            return
        if unsentBytes(channel.transport):
            # It has not read the last view yet: the newest goes once it
            # has (a worker that stopped reading must not grow this
            # process's memory by a view a change).
            self._pushLater(worker)
            return
        worker.stuckSince = None
        if worker.index not in self.shares:
            return
        if shares is None:
            shares = self._plan().get(worker.index, {})
        self._gather()
        sendProxy = self.sendProxyFor
        view = worker.view.next(self.cluster, worker.book, shares, force=sendProxy != worker.saidProxy)
        if view is not None:
            policy, entries, removed = view
            worker.saidProxy = sendProxy = dict(sendProxy)
            # The shares that may have moved are in what the view says.
            changed = None if removed is None else {e[0] for e in entries}.union(removed)
            number = self.shares.sent(worker.index, shares, changed)
            message = {"policy": policy, "backends": entries, "sendProxy": sendProxy, "number": number}
            if removed is not None:
                message["removed"] = removed
            channel.send(message)

    def _ping(self) -> None:
        """
        Ask every worker for an answer, and judge their silence once what
        they had sent by now has been read (L{_judge}).
        """
        for worker in list(self.workers.values()):
            channel = worker.channel
            if channel is not None and channel.transport is not None:
                channel.send({"ping": True})
        # A call made now runs after the reactor's next poll, which reads
        # every answer already there: a busy turn of this process (or a
        # stall) is not taken for the workers' silence.
        self.reactor.callLater(0, self._judge, self.reactor.seconds())

    def _judge(self, asOf: float) -> None:
        """
        Kill a worker that has answered nothing since L{HUNG_AFTER} seconds
        before C{asOf} (stopped, or stuck in a turn), or since
        L{STRANDED_AFTER} while it reserves room another worker's clients
        wait for, to be started again as a worker that died is.
        """
        for worker in list(self.workers.values()):
            if worker.heard is None:
                continue  # killed already
            silent = asOf - worker.heard
            if silent >= HUNG_AFTER:
                self._killHung(worker, "answered nothing", silent)
                worker.heard = None  # killed once
                continue
            if silent < STRANDED_AFTER or not worker.answered:
                # One that has not answered since it started is starting
                # (on a loaded machine, seconds): judged at HUNG_AFTER only.
                continue
            unused = self.shares.unused(worker.index, worker.book)
            waiting = self._waitingElsewhere(worker)
            if not worker.warned:
                worker.warned = True
                log.warn(
                    "worker {index} (pid {pid}) has answered nothing for {seconds:.0f} s; room it "
                    "keeps unused: {unused}; clients waiting in other workers: {waiting}",
                    index=worker.index,
                    pid=worker.pid,
                    seconds=silent,
                    unused=unused,
                    waiting=waiting,
                )
            if waiting and unused > 0:
                self._killHung(
                    worker, "answered nothing", silent, " while keeping room other workers' clients wait for"
                )
                worker.heard = None

    def _waitingElsewhere(self, worker: _WorkerProcess) -> int:
        """
        Clients waiting for room in the workers other than C{worker}.
        """
        return sum(n for i, n in self.shares.demand.items() if i != worker.index and i in self.workers)

    def _killHung(self, worker: _WorkerProcess, what: str, seconds: float, why: str = "") -> None:
        log.error(
            "worker {index} (pid {pid}) has {what} for {seconds:.0f} s{why}: hung, killed",
            index=worker.index,
            pid=worker.pid,
            what=what,
            seconds=seconds,
            why=why,
        )
        self._signal(worker, signal.SIGKILL)

    def _pushLater(self, worker: _WorkerProcess) -> None:
        """
        Try L{_pushTo} again shortly; a worker that has read nothing for
        L{HUNG_AFTER} seconds is hung (stopped, or stuck in a turn): it is
        killed, and started again as a worker that died is.
        """
        now = self.reactor.seconds()
        if worker.stuckSince is None:
            worker.stuckSince = now
        elif now - worker.stuckSince >= HUNG_AFTER:
            self._killHung(worker, "read nothing from this process", now - worker.stuckSince)
            worker.stuckSince = None
            return
        if worker.retry is None or not worker.retry.active():

            def again():
                worker.retry = None
                if self.workers.get(worker.index) is worker:
                    self._pushTo(worker)

            worker.retry = self.reactor.callLater(PUSH_RETRY, again)


class _NoClients(protocol.Factory):
    """
    The factory of a listener this process never accepts on.
    """

    noisy = False

    def buildProtocol(self, addr):
        return None


# -- a worker process ------------------------------------------------------


def listenerTLS(description: str, reactor):
    """
    The TLS context factory of a client listener's endpoint string
    (C{ssl:} or C{mtls:}, behind C{haproxy:} or not), or C{None} for a plain
    one: an adopted socket is a bare TCP socket, which each worker wraps in
    the TLS layer the main process listened with.  Raises
    L{twistedcluster.balancer.takeover.TakeoverError} when this Twisted
    keeps the settings where they cannot be read (rather than serve in
    clear).
    """
    from twistedcluster.balancer.listeners import proxyProtocolInner
    from twistedcluster.balancer.takeover import tlsContextOf

    return tlsContextOf(proxyProtocolInner(description) or description, reactor)


def _adopt(reactor, fd: int, factory, tls=None):
    if tls is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(tls, False, factory)
    sock = socket.socket(fileno=fd)  # learns the family
    try:
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        sock.close()  # adoptStreamPort took a copy


def workerFigures(proxyFactory, redirectFactory, clientLimit, traffic):
    """
    A worker's client-level counters and gauges, as the main process's
    metrics show them summed (L{WorkerFigures}).
    """
    health = proxyFactory.health
    admission = proxyFactory.admission
    counters = {
        "refused": redirectFactory.refused if redirectFactory is not None else 0,
        "ejections": health.ejections if health is not None else 0,
        "ejectionsSkipped": health.ejectionsSkipped if health is not None else 0,
        "readmissions": health.readmissions if health is not None else 0,
        "waited": admission.waited,
        "timedOut": admission.timedOut,
        "ended": {f"{listener}|{end}": n for (listener, end), n in traffic.ended.items()},
        "bytes": {name: list(counts) for name, counts in traffic.bytes.items()},
        "connect": [*traffic.connectTime.counts, traffic.connectTime.sum, traffic.connectTime.count],
        "duration": {
            listener: [*h.counts, h.sum, h.count] for listener, h in traffic.duration.items()
        },
    }
    gauges = {
        "clients": len(proxyFactory.clients),
        "waiting": proxyFactory.waiting,
        "limit": clientLimit.maxConnections,
        "count": clientLimit.count,
        "paused": int(clientLimit.paused),
    }
    return counters, gauges


def applyMessage(m: Dict[str, Any], cluster, applied: dict, proxyFactory) -> None:
    """
    What a worker does with a message from the main process: route on its
    view of the pool, and send each static backend the PROXY header the
    main process has for it now (C{cluster-admin add --send-proxy}, the
    state file, a C{remove}), not what the command line gave.
    """
    mirror.applyView(cluster, m["policy"], m["backends"], applied, m.get("removed"))
    sendProxy = m.get("sendProxy")
    if sendProxy is not None and sendProxy != proxyFactory.sendProxyFor:
        proxyFactory.sendProxyFor.clear()
        proxyFactory.sendProxyFor.update(sendProxy)


def runWorker(index: int, channelFd: int, fds: Dict[str, int], argv: List[str]) -> None:
    """
    Serve the proxy (and redirect) listener whose sockets are C{fds} with
    the balancer options C{argv}, routing on the pool the main process
    sends on C{channelFd}; stop when that channel closes (the main process
    is gone) or on SIGTERM, draining as one balancer does.
    """
    from twistedcluster.fast.reactor import installIfNone

    installIfNone()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    # Its log is the main process's (through a pipe), which SIGHUP reopens:
    # a SIGHUP sent to the whole group must not end a worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from twistedcluster.balancer.admission import WaitQueue
    from twistedcluster.balancer.limits import AcceptErrors, ClientLimit
    from twistedcluster.balancer.redirect import HandOffs, RedirectFactory
    from twistedcluster.balancer.service import Options, proxyFactoryFor, proxyListener
    from twistedcluster.balancer.traffic import Traffic
    from twistedcluster.core.cluster import Cluster
    from twistedcluster.fast.fasttcp import prepareListener

    options = Options()
    options.parseOptions(argv)
    from twistedcluster.fast.internals import tolerateALPN

    tolerateALPN()  # as the main process does: ssl: clients that offer ALPN
    cluster = Cluster(policy=options["policy"], hashBalance=options["hash-balance"])
    # The main process's view carries cost levels already: take them as they are.
    cluster.pool.levelCosts(0)
    from twistedcluster.balancer.accesslog import accessLogFor

    accessLog = accessLogFor(options, reactor)
    if accessLog is not None:
        accessLog.start()
    traffic = Traffic(accessLog)
    _, parsers = proxyListener(options["listen"])
    proxyFactory = proxyFactoryFor(options, cluster, reactor, traffic, parsers)
    clientLimit = ClientLimit(options["max-connections"], reactor)
    acceptErrors = AcceptErrors(reactor)
    ports = []
    redirectFactory = None
    for role, fd in fds.items():
        if role == "proxy":
            factory = clientLimit.wrap(proxyFactory)
        else:
            redirectFactory = RedirectFactory(
                cluster,
                reactor,
                HandOffs(options["redirect-window"], options["redirect-per-source"]),
                traffic=traffic,
            )
            redirectFactory.shareWait = WaitQueue(cluster.pool, reactor, 0, options["queue-timeout"])
            redirectFactory.holdAnswers = True
            factory = clientLimit.wrap(redirectFactory)
        description = options["listen" if role == "proxy" else "redirect"]
        port = _adopt(reactor, fd, factory, listenerTLS(description, reactor))
        acceptErrors.watch(port, role)
        clientLimit.listening(port)
        if role == "proxy":
            prepareListener(port)
        # No client before the first view of the pool: one accepted sooner
        # would be refused (no backend known yet), where it could have
        # waited in the shared queue for a worker that knows the pool.
        port.stopReading()
        ports.append(port)

    said: dict = {}
    applied: dict = {}
    beforeView = [True]
    #: The number of the last view applied, and what the main process was
    #: last told of it and of the clients waiting for room.
    viewNumber = [0]
    told = [0, 0]

    def message(m) -> None:
        if m.get("ping"):
            channel.send({"pong": True})
            return
        if m.get("reopen"):
            reopen()
            return
        applyMessage(m, cluster, applied, proxyFactory)
        if "number" in m:
            viewNumber[0] = m["number"]
        if beforeView and "policy" in m:
            beforeView.clear()
            if not clientLimit.paused:
                for port in ports:
                    port.startReading()

    def reopen() -> None:
        if accessLog is None or accessLog.path is None:
            return
        try:
            accessLog.reopen()
        except OSError as e:
            log.warn(
                "SIGHUP: cannot reopen the access log {path}: {error}; still "
                "writing to the old one",
                path=accessLog.path,
                error=e,
            )

    def lost() -> None:
        if reactor.running:
            log.info("worker {index}: the main process is gone: stopping", index=index)
            reactor.stop()

    channel = _Channel(message, lost)
    reactor.adoptStreamConnection(
        channelFd, socket.AF_UNIX, protocol.Factory.forProtocol(lambda: channel)
    )
    os.close(channelFd)

    changes = cluster.pool.follow()

    def flush() -> None:
        names = set(changes)
        changes.clear()
        mirror.keepRamps(cluster.pool, applied, names)
        figures = mirror.trafficOf(cluster.pool, said, applied, names)
        waiting = proxyFactory.waiting
        if redirectFactory is not None and redirectFactory.shareWait is not None:
            waiting += len(redirectFactory.shareWait)
        now = [viewNumber[0], waiting]
        if (figures or now != told) and channel.transport is not None:
            told[:] = now
            channel.send({"traffic": figures, "applied": now[0], "waiting": now[1]})

    sync = LoopingCall(flush)
    sync.clock = reactor
    sync.start(SYNC_INTERVAL, now=False)

    def drain():
        for port in ports:
            port.stopListening()
        d = proxyFactory.drain(options["drain-timeout"])

        def tell(result):
            # What they summed and have not told yet: the worker exits next.
            clientLimit.stop()
            acceptErrors.stop()
            # The last figures (what ended since the last ones) to the main
            # process, and a turn of the reactor for them to be sent: the
            # shutdown closes the channel without flushing it.
            if stats.running:
                stats.stop()
            figures()
            return task.deferLater(reactor, 0.01, lambda: result)

        d.addBoth(tell)
        if accessLog is not None:
            d.addBoth(lambda _: accessLog.close())
        return d

    counted: dict = {}
    lastGauges: dict = {}

    def figures() -> None:
        now, gauges = workerFigures(proxyFactory, redirectFactory, clientLimit, traffic)
        deltas = mirror.counterDeltas(now, counted)
        if (deltas or gauges != lastGauges) and channel.transport is not None:
            lastGauges.clear()
            lastGauges.update(gauges)
            channel.send({"stats": {"counters": deltas, "gauges": gauges}})

    stats = LoopingCall(figures)
    stats.clock = reactor
    stats.start(STATS_INTERVAL, now=False)

    reactor.addSystemEventTrigger("before", "shutdown", drain)
    log.info(
        "worker {index} serving {roles} (pid {pid}, {limit} client connections at most)",
        index=index,
        roles=", ".join(fds),
        pid=os.getpid(),
        limit=options["max-connections"],
    )
    reactor.run()


def main(argv: List[str]) -> None:
    """
    C{python -m twistedcluster.balancer.workers INDEX CHANNELFD ROLE=FD... --
    BALANCER-ARGS}: what the main process runs for each worker.
    """
    split = argv.index("--")
    head, rest = argv[:split], argv[split + 1 :]
    index, channelFd = int(head[0]), int(head[1])
    fds = {}
    for item in head[2:]:
        role, fd = item.split("=")
        fds[role] = int(fd)
    runWorker(index, channelFd, fds, rest)


if __name__ == "__main__":
    main(sys.argv[1:])
