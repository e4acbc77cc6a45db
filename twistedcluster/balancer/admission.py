"""
Admission: clients that find every backend at capacity wait here for room,
in order, for a bounded time.

A waiting client is represented by two callables: C{retry()}, called when
room may have freed up (the client asks the cluster again, and may be
queued again), and C{refuse(why)}, called when it has waited too long or the
queue is full or closing.  The queue knows nothing of sockets or relays.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, FrozenSet, Hashable, Iterable, Optional, Tuple

from twistedcluster.balancer import accesslog as ends
from twistedcluster.core.pool import Pool

DEFAULT_QUEUE_SIZE = 1000
DEFAULT_QUEUE_TIMEOUT = 5.0


class Refusal(str):
    """
    Why a waiting client is refused, as text, with C{end}: how its
    connection ended, for the metrics and the access log
    (L{twistedcluster.balancer.accesslog.ENDS}).
    """

    end: str

    def __new__(cls, text: str, end: str) -> "Refusal":
        self = super().__new__(cls, text)
        self.end = end
        return self


def _queueFull(waiting: int) -> Refusal:
    return Refusal(f"every backend is at capacity and {waiting} clients already wait", ends.QUEUE_FULL)


class WaitQueue:
    """
    Clients waiting for a backend with room.

    @param pool: told to call back after every change while anyone waits.
    @param clock: for each client's deadline and to look again after the
        pool has finished changing.
    @param size: clients that may wait; more are refused at once.
    @param timeout: seconds a client may wait.
    """

    def __init__(
        self,
        pool: Pool,
        clock,
        size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_QUEUE_TIMEOUT,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.size = size
        self.timeout = timeout
        #: Clients that waited, and that waited too long, in total.
        self.waited = 0
        self.timedOut = 0
        #: Per client: its timer, retry, refuse, the backends it tried, and
        #: how to tell whether it may still wait past C{size} (C{forShare}).
        self._queue: "OrderedDict[Hashable, Tuple[object, Callable[[], None], Callable[[str], None], FrozenSet[str], Optional[Callable[[], bool]]]]" = (  # noqa: E501
            OrderedDict()
        )
        self._wake = None

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, client: Hashable) -> bool:
        return client in self._queue

    def enqueue(
        self,
        client: Hashable,
        retry: Callable[[], None],
        refuse: Callable[[str], None],
        forShare: Optional[Callable[[], bool]] = None,
        exclude: Iterable[str] = (),
        deadline: Optional[float] = None,
    ) -> Optional[float]:
        """
        Let C{client} wait; C{refuse} at once when the queue is full, unless
        C{forShare()} says it waits for a share: the cluster has room, but
        not in this worker's share of it
        (L{twistedcluster.core.cluster.Cluster.roomElsewhere}), which is no
        reason to refuse a client (one process would have served it); then
        up to L{DEFAULT_QUEUE_SIZE} may wait, whatever C{size}.

        @param exclude: backends it has tried: room on them alone does not
            wake it.  (Clients with the same C{exclude} must have the same
            C{forShare}: it is asked once for all of them.)
        @param deadline: when it is refused (the clock's time); by default
            C{timeout} from now.  A client woken and queued again keeps the
            deadline it had.
        @return: its deadline (to give again if it is queued again), or
            C{None} when it was refused at once.
        """
        n = len(self._queue)
        pastSize = n >= self.size
        if pastSize:
            mayWait = n < max(self.size, DEFAULT_QUEUE_SIZE) and forShare is not None and forShare()
            if not mayWait:
                refuse(_queueFull(n))
                return None
        self.waited += 1
        now = self.clock.seconds()
        if deadline is None:
            deadline = now + self.timeout
        timer = self.clock.callLater(max(0.0, deadline - now), self._timedOut, client)
        self._queue[client] = (timer, retry, refuse, frozenset(exclude), forShare)
        if len(self._queue) == 1:
            self.pool.watch(self._mayHaveRoom)
        return deadline

    def dequeue(self, client: Hashable) -> None:
        """
        Take C{client} out of the queue, if it is there (it left).
        """
        entry = self._queue.pop(client, None)
        if entry is None:
            return
        timer = entry[0]
        if timer.active():
            timer.cancel()
        if not self._queue:
            self.pool.unwatch(self._mayHaveRoom)

    def _timedOut(self, client: Hashable) -> None:
        entry = self._queue.get(client)
        if entry is None:
            return
        self.dequeue(client)
        self.timedOut += 1
        entry[2](Refusal(f"every backend stayed at capacity for {self.timeout} s", ends.QUEUE_TIMEOUT))

    def _mayHaveRoom(self) -> None:
        # Called from inside the pool: look again once it is done changing.
        if self._wake is None:
            self._wake = self.clock.callLater(0, self._retry)

    def _retry(self) -> None:
        self._wake = None
        # Each waiting client once, oldest first, while there is room (on a
        # backend it has not tried).
        pool = self.pool
        for client in list(self._queue):
            if not pool.candidates():
                break
            entry = self._queue.get(client)
            if entry is not None and (not entry[3] or pool.candidates(entry[3])):
                self.dequeue(client)
                entry[1]()
        if len(self._queue) > self.size:
            # Past the queue's size, each waits only while the room it waits
            # for lasts; once it is gone, it is refused now, as it would
            # have been had there been none.
            room: dict = {}
            for client in list(self._queue)[self.size :]:
                entry = self._queue.get(client)
                if entry is None:
                    continue
                exclude, forShare = entry[3], entry[4]
                left = room.get(exclude)
                if left is None:
                    left = room[exclude] = forShare is not None and forShare()
                if not left:
                    self.dequeue(client)
                    entry[2](_queueFull(self.size))

    def close(self, why: str) -> None:
        """
        Refuse everyone waiting, and stop watching.
        """
        for client in list(self._queue):
            entry = self._queue.get(client)
            if entry is not None:
                self.dequeue(client)
                entry[2](Refusal(why, ends.DRAINED))
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
