"""
Redirect mode: tell the client which backend to use, then leave the data
path.

On connect the balancer writes one line, ``HOST PORT\\r\\n``, naming the
backend the policy chose, and closes; with no backend available it writes
``ERROR no-backend\\r\\n`` (L{twistedcluster.wire.redirectline}).  Anything the
client sends is ignored.

An answer is a connection the balancer will never see: it counts as load on
the backend named (so least-load does not herd) until a report has seen it,
or for at most the hand-off window.  A report is taken to have seen it only
if it was measured after the client had had L{HANDOFF_SETTLE} seconds to
connect.  A client that asks and never connects would use up the cluster
that way, so each source address has only so many answers counted in a
window; past that it is still answered, with a backend chosen at random
among those with room, counting nothing.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twistedcluster.balancer import accesslog as ends
from twistedcluster.balancer.handshake import AwaitsHandshake, overTLS
from twistedcluster.balancer.traffic import Traffic
from twistedcluster.core.cluster import Cluster
from twistedcluster.wire.redirectline import NO_BACKEND, answerLine
from twistedcluster.summary import Summary, window

__all__ = [
    "DEFAULT_HANDOFFS_PER_SOURCE",
    "DEFAULT_HANDOFF_WINDOW",
    "HANDOFF_SETTLE",
    "HandOffs",
    "RedirectFactory",
    "RedirectProtocol",
    "sourceOf",
]

log = Logger()

#: Seconds a redirect answer counts as load on its backend when no report
#: has seen it, and counts against its source address's share.
DEFAULT_HANDOFF_WINDOW = 2.0
#: Answers counted as load per source address within one window.
DEFAULT_HANDOFFS_PER_SOURCE = 64
#: Seconds a client is given to connect to the backend it was named before
#: a report may count its connection (and cancel the answer's load).
HANDOFF_SETTLE = 0.25
#: The source the main process keeps its workers' answers under: each
#: worker has counted its clients' shares already.
WORKERS = "workers"


def sourceOf(address) -> str:
    """
    The source a client's share is kept by: its IPv4 address, or the /64 of
    its IPv6 address (one host's usual allotment); one source for anything
    else (unix sockets).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return "local"
    if ":" in host:
        try:
            return str(ipaddress.IPv6Network((host.split("%", 1)[0], 64), strict=False))
        except ValueError:
            return host
    return host


class HandOffs:
    """
    Which redirect answers count as load, and until when.  Pure: times are
    passed in.

    @param window: seconds an answer counts (against its source's share, and
        as load until a report sees it).
    @param perSource: answers counted per source within a window.
    @param settle: seconds after which the client has had time to connect
        (at most C{window}).
    """

    def __init__(
        self,
        window: float = DEFAULT_HANDOFF_WINDOW,
        perSource: int = DEFAULT_HANDOFFS_PER_SOURCE,
        settle: float = HANDOFF_SETTLE,
    ) -> None:
        self.window = window
        self.perSource = perSource
        self.settle = min(settle, window)
        self._queue: Deque[Tuple[float, str, str, int]] = deque()
        self._settling: Deque[Tuple[float, str, int]] = deque()
        self._bySource: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def admits(self, source: str) -> bool:
        """
        Whether another answer to C{source} may count as load.
        """
        return self._bySource.get(source, 0) < self.perSource

    def add(self, now: float, source: str, name: str, ticket: int) -> None:
        self._queue.append((now + self.window, source, name, ticket))
        self._settling.append((now + self.settle, name, ticket))
        self._bySource[source] = self._bySource.get(source, 0) + 1

    def due(self, now: float) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
        """
        The answers whose client has now had time to connect, and those whose
        window is over (dropped here): each one's backend name and ticket.
        """
        settled = []
        settling = self._settling
        while settling and settling[0][0] <= now:
            _, name, ticket = settling.popleft()
            settled.append((name, ticket))
        expired = []
        queue, bySource = self._queue, self._bySource
        while queue and queue[0][0] <= now:
            _, source, name, ticket = queue.popleft()
            left = bySource[source] - 1
            if left:
                bySource[source] = left
            else:
                del bySource[source]
            expired.append((name, ticket))
        return settled, expired

    def nextDue(self) -> Optional[float]:
        """
        When L{due} next has something to say; C{None} when nothing waits.
        """
        heads = [q[0][0] for q in (self._settling, self._queue) if q]
        return min(heads) if heads else None


class RedirectProtocol(AwaitsHandshake, Protocol):
    """
    Answers one client with one line and closes (over TLS, once its
    handshake is done).
    """

    factory: "RedirectFactory"
    #: For the metrics and the access log: when it started, the backend
    #: named, bytes each way, how it ended.
    _start = 0.0
    _backend: Optional[str] = None
    _end = ends.NO_BACKEND
    received = 0
    sent = 0
    #: When it is answered ERROR no-backend if it still waits for its
    #: worker's share (set when it first waits).
    _waitUntil: Optional[float] = None

    def connectionMade(self) -> None:
        factory = self.factory
        if factory.limit is not None:
            factory.limit.opened()
        self._start = factory.clock.seconds()
        if overTLS(self.transport):
            # TLS (ssl:): answered once the handshake is done, so that a
            # client that never handshakes is not counted as load on the
            # backend it would have been named.
            self.awaitHandshake(factory.clock, factory.handshakeTimeout)
            return
        self._answer()

    def handshakeDone(self) -> None:
        self._answer()

    def _answer(self) -> None:
        factory = self.factory
        cluster = factory.cluster
        pool = cluster.pool
        handOffs = factory.handOffs
        now = factory.clock.seconds()
        peer = self.transport.getPeer()
        source = sourceOf(peer)
        counted = handOffs.admits(source)
        # hash routes on the client's address; no other policy sees it.
        key = getattr(peer, "host", None) if cluster.keyed else None
        chosen = cluster.pick(key=key) if counted else cluster.pickUncounted(key)
        if chosen is None and cluster.roomElsewhere():
            # A worker (--workers) whose share is used, while the cluster
            # has room: the share moves to where clients wait, within a
            # sync interval or two.  An answer that counts nothing needs
            # no share.
            shareWait = factory.shareWait
            if counted and shareWait is not None:
                # Woken and queued again, it keeps its first deadline.
                self._waitUntil = shareWait.enqueue(
                    self, self._answer, self._refused, cluster.roomElsewhere, deadline=self._waitUntil
                )
                return
            chosen = cluster.pickBeyondShare(key, counted)
        line = NO_BACKEND
        if chosen is None:
            factory.noBackend()
        else:
            try:
                line = answerLine(chosen.host, chosen.port)
            except ValueError as e:
                log.warn("redirect: backend {name}: {why}", name=chosen.name, why=e)
                if counted:
                    pool.connectFailed(chosen.name, chosen.ticket, countFailure=False)
            else:
                self._backend = chosen.name
                self._end = ends.ANSWERED
                if counted:
                    if factory.holdAnswers:
                        # Held as a connection of this worker's until it
                        # settles (see holdAnswers).
                        pool.answered(chosen.name, chosen.ticket)
                    else:
                        # Added to the backend (so least-load sees it until
                        # a report does) but not a connection this
                        # balancer holds.
                        pool.handOff(chosen.name, chosen.ticket)
                    handOffs.add(now, source, chosen.name, chosen.ticket)
                    factory.scheduleHandOffs()
        self._say(line)

    def _refused(self, why: str) -> None:
        # Waited for a share in vain (or the worker is draining).
        self.factory.noBackend()
        self._say(NO_BACKEND)

    def _say(self, line: bytes) -> None:
        self.sent = len(line)
        self.transport.write(line)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason) -> None:
        if self._handshaking:
            # Left (or failed) before its TLS handshake: never answered.
            self._stopHandshakeWait()
            self._end = ends.CLIENT_CLOSED
        factory = self.factory
        if factory.shareWait is not None:
            factory.shareWait.dequeue(self)  # if it waited for a share
        if factory.limit is not None:
            factory.limit.closed()
        factory.traffic.redirectEnded(self, factory.clock.seconds())


class RedirectFactory(Factory):
    """
    Serves the redirect listener.

    @param handOffs: the answers counted as load (L{HandOffs}).
    @ivar refused: clients answered C{ERROR no-backend}, in total.
    @ivar pushMarks: told the names of backends whose hand-offs have just
        settled (the control listener's L{ControlFactory.pushMarks}, which
        sends them newer marks); nothing by default (a worker process).
    @ivar holdAnswers: in a worker (C{--workers}), an answer is held as a
        connection (L{Pool.answered}), within the worker's share, until its
        client has had time to connect, and handed off then: the main
        process counts a worker's answers as that worker's until they are
        handed off, and as any balancer's answers after, so that the
        shares it gives out never count an answer twice nor leave it out.
    @ivar shareWait: in a worker (C{--workers}), where a client whose
        answer would exceed the worker's share of a backend with room
        waits for the share to move: a
        L{twistedcluster.balancer.admission.WaitQueue} of size 0, so that
        its clients are answered C{ERROR no-backend} as soon as the room
        is gone, as one process answers them at once.  C{None} in one
        process (no shares).
    """

    noisy = False
    protocol = RedirectProtocol
    refused = 0
    #: Seconds a TLS client (C{ssl:}) has to finish its handshake before
    #: it is closed unanswered.
    handshakeTimeout = 10.0
    #: The client connection limit its connections count against, if any.
    limit = None
    shareWait = None
    holdAnswers = False
    _handOffCall = None

    @staticmethod
    def pushMarks(names) -> None:
        pass

    def buildProtocol(self, addr):
        limit = self.limit
        if limit is not None and not limit.admits():
            self.traffic.refusedAtLimit("redirect", addr, self.clock.seconds())
            return None
        return Factory.buildProtocol(self, addr)

    def __init__(
        self,
        cluster: Cluster,
        clock,
        handOffs: HandOffs = None,
        traffic: Optional[Traffic] = None,
    ) -> None:
        #: What became of the clients (shared with the proxy's, in the
        #: balancer): counts, and the access log.
        self.traffic = traffic if traffic is not None else Traffic()
        self.cluster = cluster
        self.clock = clock
        self.handOffs = handOffs if handOffs is not None else HandOffs()
        self._refusals = Summary(clock, self._report)

    def noBackend(self) -> None:
        """
        A client gets no backend: say so in the log, at most once a second
        (a burst must not become a burst of log lines).
        """
        self.refused += 1
        self._refusals.count("refused")

    def _report(self, counts, seconds: float) -> None:
        log.warn(
            "redirect: no backend available ({count} client(s) answered "
            "ERROR no-backend {window})",
            count=counts["refused"],
            window=window(seconds),
        )

    def handedOff(self, name: str, ticket: int, settled: bool = True) -> None:
        """
        A worker (C{--workers}) handed off an answer naming C{name}, which
        the main pool counts under C{ticket}
        (L{twistedcluster.core.mirror.fold}): it counts until a report has
        seen it or its window is over, as this factory's own answers do.
        C{settled}: its client has had time to connect (the worker held it
        that long), so it settles here at once (its backend gets a newer
        mark, for its next report to count it); else (the worker died
        holding it) it settles here in its own time.
        """
        handOffs = self.handOffs
        given = self.clock.seconds() - (handOffs.settle if settled else 0.0)
        handOffs.add(given, WORKERS, name, ticket)
        self.scheduleHandOffs()

    def scheduleHandOffs(self) -> None:
        """
        Make sure the next hand-off to settle or expire is seen to in time.
        """
        if self._handOffCall is None:
            when = self.handOffs.nextDue()
            if when is not None:
                delay = max(0.0, when - self.clock.seconds())
                self._handOffCall = self.clock.callLater(delay, self._handOffsDue)

    def _handOffsDue(self) -> None:
        self._handOffCall = None
        pool = self.cluster.pool
        settled, expired = self.handOffs.due(self.clock.seconds())
        if self.holdAnswers:
            for name, ticket in settled:
                pool.handOff(name, ticket)
        else:
            for name, ticket in settled:
                pool.connected(name, ticket, served=False)
        for name, ticket in expired:
            pool.forgetHandOff(name, ticket)
        if settled:
            # Their backends' next reports can count them once these have
            # a newer mark: sent now, not after a report.
            self.pushMarks({name for name, _ in settled})
        self.scheduleHandOffs()

    def stopFactory(self) -> None:
        if self.shareWait is not None:
            self.shareWait.close("the balancer is stopping")
        self._refusals.stop()
        if self._handOffCall is not None and self._handOffCall.active():
            self._handOffCall.cancel()
        self._handOffCall = None
