"""
The pool across worker processes (C{--workers N}): pure book-keeping, no I/O.

The main process holds the one real pool (registrations, reports, operator
state).  Each worker routes on a mirror of it, so that a pick stays local
and as cheap as with one process.  Two flows keep them one cluster:

 - L{fold}: a worker's traffic (per backend: connections it has routed in
   total, those it holds now, its redirect answers and those of them it has
   handed off, in total) becomes tickets in the main pool, so that the main
   pool's C{routed}, C{active} and "added since report" count every
   worker's connections, and its answers until a report has seen them.  A
   worker holds an answer as a connection until its client has had time to
   connect: until then it is the worker's, within its share; then it is
   handed off, and counts in the main pool as one balancer's own answer.
 - L{viewFor} / L{applyView}: the main pool as one worker should see it.  For
   each backend, C{base} is what the main pool estimates on it less what it
   knows this worker holds there; the worker adds what it holds now, exactly,
   so its own picks count at once and the others' within one sync interval.
 - L{CapacityShares}: each worker's share of each backend's capacity, which
   it alone may fill, so that capacity holds across workers however fast
   clients come (the views alone would let every worker fill what it
   believed free within one sync interval).  A share grows only out of
   capacity no worker may be using; one that shrinks counts at its old size
   until the worker has said it applied the view that shrank it.
"""

from __future__ import annotations

import copy
import zlib
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.pool import RAMP_STEPS, AdminState, Pool, State

__all__ = ["TrafficBook", "CapacityShares", "fold", "forgetGone", "release", "ViewSender", "viewFor", "viewChanges", "applyView", "keepRamps", "trafficOf"]

#: One backend in a view: name, host, port, state, weight, slow start's
#: step (of RAMP_STEPS), capacity, base (connections on it not held by the
#: worker), the load its own figure adds beyond connections x cost (0
#: unless its service supplies one), the cost level least-load routes
#: it on (C{None}: none measured, 1/capacity), and the worker's share of
#: its capacity (L{CapacityShares}; C{None}: none given, capacity alone),
#: how many of the worker's redirect answers the main pool has counted as
#: handed off (those since are the worker's own to count: L{applyView}),
#: and the main pool's incarnation of it (L{Pool.incarnation}): a backend
#: forgotten and added again under its name starts again from nothing in
#: the worker too, and the worker's figures say which one they are of.
ViewEntry = Tuple[str, str, int, str, int, int, int, int, float, Optional[float], Optional[int], int, Optional[int]]


class TrafficBook:
    """
    What the main pool holds for one worker: per backend, the last routed
    total it said, and one ticket for each connection it holds (and for
    each redirect answer it holds, not handed off yet).
    """

    def __init__(self) -> None:
        self.routed: Dict[str, int] = {}
        self.tickets: Dict[str, Deque[int]] = {}
        #: Per backend: the tickets of the answers it holds, oldest first,
        #: and the last totals of answers and answers handed off it said.
        self.answers: Dict[str, Deque[int]] = {}
        self.answered: Dict[str, int] = {}
        self.handedOff: Dict[str, int] = {}
        #: Per backend, the main pool's incarnation of it (L{Pool.incarnation})
        #: that these figures are of.
        self.born: Dict[str, Optional[int]] = {}
        #: Backends whose count here changed since L{CapacityShares.plan}
        #: last looked, and since the worker was last sent a view.
        self.changed: set = set()
        self.unsent: set = set()

    def forget(self, name: str) -> None:
        """
        Drop what it has of C{name}: the backend of that name was forgotten
        or removed (its tickets went with it), and one added again starts
        from nothing here, as in the worker.
        """
        for d in (self.routed, self.tickets, self.answers, self.answered, self.handedOff, self.born):
            d.pop(name, None)
        self.touch(name)

    def touch(self, name: str) -> None:
        """
        What it has of C{name} changed: for the next plan and the next view.
        """
        self.changed.add(name)
        self.unsent.add(name)

    def holding(self, name: str) -> int:
        """
        The connections and answers it holds on C{name}: what its share
        bounds.
        """
        tickets = self.tickets.get(name)
        answers = self.answers.get(name)
        return (len(tickets) if tickets else 0) + (len(answers) if answers else 0)


def fold(
    pool: Pool,
    book: TrafficBook,
    traffic: Dict[str, List[int]],
    handedOff: Optional["HandedOff"] = None,
) -> None:
    """
    Count a worker's traffic in the main pool: C{name: [routed, held,
    answered, handed off]}, totals but C{held} (what it holds now, answers
    not handed off included).  A ticket for each connection or answer
    routed since its last word; one released, oldest first, for each
    connection it no longer holds.  An answer is handed off here at once
    (L{Pool.handOff}: added, not relayed) but counts as the worker's
    (L{TrafficBook.holding}) until the worker has handed it off; then a
    C{handedOff} (the main process's
    L{twistedcluster.balancer.redirect.RedirectFactory.handedOff}) settles
    it, from when a report may count it, and expires it, as one balancer
    does its own answers.
    """
    for name, figures in traffic.items():
        incarnation = pool.incarnation(name)
        if book.born.get(name, incarnation) != incarnation:
            book.forget(name)
        if incarnation is None or (len(figures) > 4 and figures[4] is not None and figures[4] != incarnation):
            # Figures of a backend of this name the main pool has forgotten
            # since: they are not of the one it has now.
            continue
        book.born[name] = incarnation
        routed, held = figures[0], figures[1]
        answered, handed = (figures[2], figures[3]) if len(figures) > 3 else (0, 0)
        tickets = book.tickets.setdefault(name, deque())
        answers = book.answers.setdefault(name, deque())
        book.touch(name)
        # Its routed total also falls (a connect that failed, a client that
        # left before it): answers are counted on their own total.
        newAnswers = max(0, answered - book.answered.get(name, 0))
        book.answered[name] = answered
        new = max(0, routed - book.routed.get(name, 0) - newAnswers)
        book.routed[name] = routed
        book.handedOff[name] = handed
        for _ in range(newAnswers):
            # Not a connection this balancer relays (as one balancer's own
            # answers are not), but added, until a report has seen it; and
            # its client may not have connected yet: no report may count it
            # before the worker has handed it off (no reach epoch till then).
            ticket = pool.acquire(name)
            pool.handOff(name, ticket)
            answers.append(ticket)
        for _ in range(new):
            ticket = pool.acquire(name)
            pool.connected(name, ticket, served=False)
            tickets.append(ticket)
        holdsAnswers = max(0, answered - handed)
        while len(answers) > holdsAnswers:
            _handOver(pool, name, answers.popleft(), handedOff, True)
        while len(tickets) > max(0, held - holdsAnswers):
            pool.release(name, tickets.popleft())


#: Told of an answer a worker handed off: (name, ticket, settled), settled
#: C{False} when its client may not have had time to connect yet.
HandedOff = Callable[[str, int, bool], None]


def forgetGone(pool: Pool, book: TrafficBook) -> None:
    """
    Drop from C{book} the backends the main pool has forgotten or removed
    since (or forgotten and added again): their figures there are of a
    backend that is gone, and would count as the worker's in its shares and
    its view until the worker next spoke of them.  Call it when the pool's
    L{Pool.incarnations} moved.
    """
    incarnation = pool.incarnations.get
    for name, born in list(book.born.items()):
        if incarnation(name) != born:
            book.forget(name)


def _handOver(pool: Pool, name: str, ticket: int, handedOff: Optional[HandedOff], settled: bool) -> None:
    """
    An answer a worker held (a ticket of L{TrafficBook.answers}) is handed
    off, C{settled} if its client has had time to connect: C{handedOff}
    settles it (from then on a report may count it) and expires it;
    without C{handedOff}, it is taken as settled now.
    """
    if handedOff is None:
        pool.connected(name, ticket, served=False)
    else:
        handedOff(name, ticket, settled)


def release(pool: Pool, book: TrafficBook, handedOff: Optional[HandedOff] = None) -> None:
    """
    The worker is gone and its connections with it: release all it held.
    The answers it held are given to C{handedOff} to settle: their clients
    connect to their backends whatever became of the worker, maybe not yet
    (a report taking one that had not for gone would leave it counted
    nowhere).  Without C{handedOff}, they are taken as settled now.
    """

    def answered(name: str, ticket: int) -> None:
        _handOver(pool, name, ticket, handedOff, False)

    for kept, end in ((book.tickets, pool.release), (book.answers, answered)):
        for name, tickets in kept.items():
            book.touch(name)
            while tickets:
                ticket = tickets.popleft()
                if name in pool:
                    end(name, ticket)
    book.tickets.clear()
    book.answers.clear()
    book.routed.clear()
    book.answered.clear()
    book.handedOff.clear()


def viewFor(
    cluster: Cluster, book: TrafficBook, quotas: Optional[Dict[str, int]] = None
) -> Tuple[str, List[ViewEntry]]:
    """
    The main pool as the worker whose traffic is C{book} should route on it,
    with its C{quotas} (L{CapacityShares.plan}) if given.
    """
    return cluster.policyName, _entries(cluster.pool, cluster.pool.snapshot(), book, quotas)


class ViewSender:
    """
    What the main process last sent one worker of the pool, so that a view
    after the first says only what changed (L{viewChanges}): at thousands
    of backends, a whole view each sync interval kept the main process and
    every worker busy building, encoding and applying it, with no client
    about.

    The caller tells it the names of what may have changed that this worker
    does not hear of otherwise (L{touch}): the pool's changes
    (L{Pool.follow}) and the shares a plan moved (L{CapacityShares.moved});
    the worker's own book it reads itself (L{TrafficBook.unsent}).
    """

    def __init__(self) -> None:
        #: Each backend's entry as last sent, by name; C{None} until a
        #: whole view went.
        self.sent: Optional[Dict[str, ViewEntry]] = None
        self.policy: Optional[str] = None
        #: Backends whose entry may differ from what was sent.
        self.pending: set = set()

    def touch(self, names) -> None:
        if self.sent is not None:
            self.pending |= names

    def next(
        self, cluster: Cluster, book: TrafficBook, quotas: Optional[Dict[str, int]], force: bool = False
    ) -> Optional[Tuple[str, List[ViewEntry], Optional[List[str]]]]:
        """
        The view to send now: (policy, entries, removed), C{removed} C{None}
        for a whole view (the first), else the backends gone since (for
        L{applyView}); C{None} when nothing changed and not C{force}.
        """
        if self.sent is not None:
            self.pending |= book.unsent
        book.unsent.clear()
        if self.sent is None:
            policy, entries = viewFor(cluster, book, quotas)
            self.sent = {e[0]: e for e in entries}
            self.policy = policy
            self.pending.clear()
            return policy, entries, None
        names, self.pending = self.pending, set()
        policy, entries, gone = viewChanges(cluster, book, quotas, names)
        sent = self.sent
        entries = [e for e in entries if sent.get(e[0]) != e]
        gone = [name for name in gone if sent.pop(name, None) is not None]
        if not (entries or gone or force or policy != self.policy):
            return None
        for e in entries:
            sent[e[0]] = e
        self.policy = policy
        return policy, entries, gone


def viewChanges(
    cluster: Cluster, book: TrafficBook, quotas: Optional[Dict[str, int]], names
) -> Tuple[str, List[ViewEntry], List[str]]:
    """
    L{viewFor}, of the backends C{names} only: their entries, and those of
    them the main pool no longer has.  A worker kept up to date with what
    changed (L{Pool.follow}, L{TrafficBook.unsent}, L{CapacityShares.moved})
    costs what changed, not a view of every backend each sync interval.
    """
    pool = cluster.pool
    present, gone = [], []
    for name in names:
        if name in pool:
            present.append(pool.get(name))
        else:
            gone.append(name)
    return cluster.policyName, _entries(pool, present, book, quotas), gone


def _entries(pool: Pool, statuses, book: TrafficBook, quotas: Optional[Dict[str, int]]) -> List[ViewEntry]:
    entries: List[ViewEntry] = []
    share = quotas.get if quotas is not None else (lambda name: None)
    handed = book.handedOff.get
    incarnation = pool.incarnations.get
    # TrafficBook.holding, inlined: a view of thousands of backends.
    tickets, answers = book.tickets.get, book.answers.get
    for b in statuses:
        name = b.name
        capacity = max(1, b.capacity)
        held = len(tickets(name, ())) + len(answers(name, ()))
        base = max(0, b.estimatedConnections - held)
        extra = b.load - b.connections * b.cost
        # Workers route least-load on the main pool's costs; without one,
        # a connection costs 1/capacity there too.
        cost: Optional[float] = None if abs(b.cost * capacity - 1) < 1e-9 else b.cost
        step = round(b.ramp * RAMP_STEPS)
        entries.append(
            (
                name, b.host, b.port, b.state.value, b.weight, step, capacity, base,
                round(extra, 9), cost, share(name), handed(name, 0), incarnation(name),
            )
        )
    return entries


_ADMIN = {
    State.UP.value: AdminState.ENABLED,
    State.DRAINING.value: AdminState.DRAINING,
    State.DISABLED.value: AdminState.DISABLED,
}


def applyView(
    cluster: Cluster,
    policy: str,
    entries: List[ViewEntry],
    applied: Dict[str, tuple],
    removed: Optional[List[str]] = None,
) -> None:
    """
    Make a worker's pool what the main process says, keeping the connections
    the worker holds: each backend's connections become C{base} plus those.

    The worker's redirect answers handed off that the main pool had not
    counted as such when it made the view count here, on top of C{base} and
    against the worker's share, until a view says it has (they would
    otherwise count nowhere for a sync interval).

    C{applied} (kept by the caller, updated here) is the state, weight,
    incarnation and slow start's step last taken from the main process for
    each backend (L{keepRamps}): only
    what the main process changed is set again, so a backend this worker
    ejected (its passive health check is its own) stays out, and an idle
    cluster costs no re-indexing.  A backend of another incarnation (the
    main pool forgot the last one and added one of the same name) is added
    anew: what this worker counted on the old one goes with it, as in the
    main pool (whose book of this worker dropped it: L{forgetGone}).

    With C{removed} (L{viewChanges}), C{entries} are the backends that
    changed and C{removed} those the main pool has no longer; without, they
    are every backend, and any other goes.
    """
    if policy != cluster.policyName:
        cluster.setPolicy(policy)
    pool = cluster.pool
    named = set()
    for name, host, port, state, weight, step, capacity, base, extra, cost, quota, handed, born in entries:
        named.add(name)
        was = applied.get(name)
        if was is not None and was[2] != born and name in pool:
            pool.removeMany([name])
        if name not in pool:
            was = None
            applied.pop(name, None)
            pool.register(name, host, port, capacity=capacity)
        else:
            now = pool.get(name)
            if (now.host, now.port, now.capacity) != (host, port, capacity):
                pool.register(name, host, port, capacity=capacity)
        now = pool.get(name)
        pending = max(0, now.handedOff - handed)
        connections = base + now.active + pending
        perConnection = 1.0 / capacity if cost is None else cost
        load = max(0.0, extra + connections * perConnection)
        if (now.connections, now.load, now.addedSinceReport, now.cost) != (
            connections, load, 0, perConnection
        ):
            pool.report(name, connections, load, seen=None, cost=cost)
        if was is None or was[:2] != (state, weight):
            if state == State.DOWN.value:
                pool.markDown(name)
            else:
                pool.markUp(name)
                pool.setAdminState(name, _ADMIN[state])
            pool.setWeight(name, weight)
        applied[name] = (state, weight, born, step)
        pool.setRamp(name, step)
        # Its answers since count against its share too.
        pool.setQuota(name, None if quota is None else quota - pending)
    if removed is None:
        gone = [b.name for b in pool.snapshot() if b.name not in named]
    else:
        gone = [name for name in removed if name in pool and name not in named]
    if gone:
        pool.removeMany(gone)
        for name in gone:
            applied.pop(name, None)


#: Views a worker may leave unacknowledged before the oldest two shares
#: are kept as one (their larger values: never less than it may use).
_MAX_UNACKED = 8


class CapacityShares:
    """
    Each worker's share of each backend's capacity, kept by the main
    process: the connections that worker may hold there at once (its pool's
    quota, L{Pool.setQuota}).

    For each backend, what the workers may hold at once never exceeds the
    capacity the rest of the cluster leaves (the main pool's estimate less
    the workers' own connections): a worker may be acting on any share sent
    to it since the last view it said it applied, so each worker counts at
    the largest of those (or at what it holds, if more), and a share grows
    only out of what is left.  The room nobody holds is shared out by
    demand: first to the clients waiting for room in each worker, the rest
    evenly.
    """

    def __init__(self) -> None:
        #: Per worker: (view number, shares, the backends whose share may
        #: differ from the view before or C{None}) sent since, and
        #: including, the last view it said it applied; oldest first.
        self._sent: Dict[int, List[Tuple[int, Dict[str, int], Optional[set]]]] = {}
        #: Per worker and backend: the largest share in C{_sent}.
        self._inForce: Dict[int, Dict[str, int]] = {}
        self._numbers: Dict[int, int] = {}
        #: Per worker: clients waiting for room there, as it last said.
        self.demand: Dict[int, int] = {}
        #: Per backend, what the last plan worked its shares out of, and
        #: the shares: a backend whose status did not change (L{Pool.follow})
        #: and that is not in C{_dirty} (its counts and reserves unchanged)
        #: keeps them without being looked at (most of thousands, in a busy
        #: cluster); and the workers and the demand they were made for.
        self._planned: Dict[str, Tuple[tuple, List[int]]] = {}
        #: Each worker's shares, by backend, as the last plan left them.
        self._out: Dict[int, Dict[str, int]] = {}
        #: The pool planned for, and its changes since (L{Pool.follow}).
        self._pool: Optional[Pool] = None
        self._changes: set = set()
        self._plannedFor: List[int] = []
        self._plannedWants: List[int] = []
        #: Backends where some worker holds its whole share: the only ones a
        #: change of demand moves.
        self._tight: set = set()
        #: Backends whose reserve in some worker changed since the last plan.
        self._dirty: set = set()
        #: Backends whose share in some worker a plan changed, for the
        #: caller to take (and empty): what a view must tell again.
        self.moved: set = set()

    def join(self, worker: int) -> None:
        """
        A worker started: it holds nothing and has been given nothing.
        """
        self._sent[worker] = []
        self._plannedFor = []  # every backend planned again
        self._inForce[worker] = {}
        self._numbers[worker] = 0
        self.demand[worker] = 0

    def leave(self, worker: int) -> None:
        """
        A worker is gone, and its connections with it: its shares are free.
        """
        for d in (self._sent, self._inForce, self._numbers, self.demand):
            d.pop(worker, None)
        self._plannedFor = []

    def __contains__(self, worker: object) -> bool:
        return worker in self._sent

    def unused(self, worker: int, book: TrafficBook) -> int:
        """
        The room C{worker} may be acting on and does not hold (what its
        shares in force reserve beyond what C{book} says it holds): room no
        other worker may use until it says it applied a smaller share.
        """
        holding = book.holding
        return sum(max(0, share - holding(name)) for name, share in self._inForce.get(worker, {}).items())

    def sent(self, worker: int, shares: Dict[str, int], changed=None) -> int:
        """
        C{shares} went to C{worker} in a view: return that view's number,
        for the worker to say it applied (L{applied}).  C{changed}: the
        backends whose share may differ from the last view sent to it (a
        view that says only what changed, L{ViewSender}); C{None}, any.
        """
        number = self._numbers[worker] = self._numbers[worker] + 1
        sent = self._sent[worker]
        shares = dict(shares)  # the plan's own, which the next plan changes
        sent.append((number, shares, None if changed is None else set(changed)))
        if len(sent) > _MAX_UNACKED:
            (_, a, _), (n, b, moved) = sent[0], sent[1]
            sent[:2] = [(n, {k: max(a.get(k, 0), b.get(k, 0)) for k in a.keys() | b.keys()}, None)]
            # The next differs from the merged one where it differs from
            # either of the two.
            if len(sent) > 1:
                m, c, after = sent[1]
                sent[1] = (m, c, None if moved is None or after is None else moved | after)
        inForce = self._inForce[worker]
        dirty = self._dirty
        get = shares.get
        for name in shares if changed is None else changed:
            share = get(name, 0)
            if share > inForce.get(name, 0):
                inForce[name] = share
                dirty.add(name)
        return number

    def applied(self, worker: int, number: int) -> bool:
        """
        C{worker} has applied the view numbered C{number}: the shares sent
        before it no longer bind it.  Whether that freed any room.
        """
        sent = self._sent.get(worker)
        if not sent or sent[0][0] >= number:
            return False
        # Only a backend whose share moved between the views sent since the
        # last one applied can have a largest share other than it had.
        names: Optional[set] = set()
        for _, _, changed in sent[1:]:
            if changed is None:
                names = None
                break
            names |= changed
        sent[:] = [v for v in sent if v[0] >= number]
        was = self._inForce[worker]
        if names is None:
            inForce: Dict[str, int] = {}
            for _, shares, _ in sent:
                for name, share in shares.items():
                    if share > inForce.get(name, 0):
                        inForce[name] = share
            self._inForce[worker] = inForce
            if inForce == was:
                return False
            self._dirty.update(k for k in was.keys() | inForce.keys() if inForce.get(k, 0) != was.get(k, 0))
            return True
        freed = False
        for name in names:
            largest = max(shares.get(name, 0) for _, shares, _ in sent)
            if largest != was.get(name, 0):
                freed = True
                self._dirty.add(name)
                if largest:
                    was[name] = largest
                else:
                    was.pop(name, None)
        return freed

    def plan(self, pool: Pool, books: Dict[int, TrafficBook]) -> Dict[int, Dict[str, int]]:
        """
        Each worker's share of each of C{pool}'s backends (the main pool)
        now, C{books} being what the main pool knows each holds.  The
        dicts returned are this planner's own, changed by the next plan
        (only the backends whose status, holdings or reserves changed since
        are worked out again).
        """
        if pool is not self._pool:
            if self._pool is not None:
                self._pool.unfollow(self._changes)
            self._pool = pool
            self._changes = pool.follow()
            self._plannedFor = []
        workers = sorted(self._sent)
        n = len(workers)
        if not n:
            self._out, self._plannedFor = {}, []
            return {}
        wants = [max(0, self.demand.get(w, 0)) for w in workers]
        wanted = sum(wants)
        empty = TrafficBook()
        held = [books.get(w, empty) for w in workers]
        inForce = [self._inForce[w] for w in workers]
        everyone = range(n)
        planned = self._planned
        tight = self._tight
        dirty = self._dirty
        changes = self._changes
        names = None
        if self._plannedFor != workers:
            planned.clear()
            tight.clear()
            self._out = {w: {} for w in workers}
            self._plannedFor = workers
            self._plannedWants = wants
            names = [b.name for b in pool.snapshot()]
            self.moved.update(names)
        elif self._plannedWants != wants:
            # Demand moves only the room of backends where some worker has
            # used its share: elsewhere every worker may still pick, so no
            # client waits on their account (and at 10,000 backends, working
            # them all out again whenever a count of waiting clients moves
            # took 100 ms a plan).
            dirty |= tight
            self._plannedWants = wants
        for w in workers:
            book = books.get(w)
            if book is not None and book.changed:
                dirty |= book.changed
                book.changed.clear()
        out = self._out
        shareOut = [out[w] for w in workers]
        if names is None:
            names = changes | dirty
        changes.clear()
        for name in names:
            if name not in pool:
                for d in shareOut:
                    d.pop(name, None)
                if planned.pop(name, None) is not None:
                    self.moved.add(name)
                tight.discard(name)
                continue
            b = pool.get(name)
            last = planned.get(name)
            helds = [book.holding(name) for book in held]
            reserves = [max(f.get(name, 0), h) for f, h in zip(inForce, helds)]
            # What its shares follow from: a report that moved none of it
            # (most, in a quiet cluster) leaves them as they are.
            inputs = (b.estimatedConnections, b.capacity, helds, reserves, wants)
            if last is not None and last[0] == inputs:
                continue
            heldSum = sum(helds)
            others = max(0, b.estimatedConnections - heldSum)
            budget = max(0, max(1, b.capacity) - others)
            free = budget - sum(reserves)
            headroom = max(0, budget - heldSum)
            start = zlib.crc32(name.encode()) % n
            if wanted >= headroom:
                # Not enough for the waiting clients: shared in proportion.
                shares = [headroom * d // wanted for d in wants] if wanted else [0] * n
                order = sorted(everyone, key=lambda i: (-wants[i], (i - start) % n))
            else:
                # Each its waiting clients, and the rest evenly; what does
                # not divide goes first to those left without any (a client
                # that comes to one finds room at once), then from a worker
                # that depends on the backend (not always the first).
                even = (headroom - wanted) // n
                shares = [d + even for d in wants]
                order = sorted(everyone, key=lambda i: (shares[i] > 0, (i - start) % n))
            for i in order[: headroom - sum(shares)]:
                shares[i] += 1
            grows = []
            for i in everyone:
                want = helds[i] + shares[i]
                if want <= reserves[i]:
                    shareOut[i][name] = want
                else:
                    grows.append(i)
            for i in sorted(grows, key=lambda i: -wants[i]):
                give = max(0, min(helds[i] + shares[i] - reserves[i], free))
                free -= give
                shareOut[i][name] = reserves[i] + give
            mine = [shareOut[i][name] for i in everyone]
            if last is None or last[1] != mine:
                self.moved.add(name)
            planned[name] = (inputs, mine)
            if any(h >= m for h, m in zip(helds, mine)):
                tight.add(name)
            else:
                tight.discard(name)
        dirty.clear()
        return out


def keepRamps(pool: Pool, applied: Dict[str, tuple], names) -> None:
    """
    Give the backends C{names} (what changed in a worker's pool since:
    L{Pool.follow}) the slow start step the main process last sent again.
    A backend the worker readmitted itself (its passive health check, or
    to keep the share of backends it may eject) comes back at full weight
    in its pool, which has no slow start of its own: whole views set the
    step again a sync interval later; views that say only what changed
    would not until the main pool's next step.
    """
    for name in names:
        was = applied.get(name)
        if was is not None and name in pool:
            pool.setRamp(name, was[3])


def trafficOf(
    pool: Pool,
    said: Dict[str, tuple],
    applied: Optional[Dict[str, tuple]] = None,
    names=None,
) -> Dict[str, list]:
    """
    A worker's traffic to tell the main process (L{fold}): C{name: [routed,
    held, answered, handed off, incarnation]} for each backend whose figures
    changed since C{said} (updated in place); the main pool's incarnation
    of the backend as C{applied} (L{applyView}'s) last took it, so that
    figures of one forgotten since count for nothing.  With C{names} (what
    changed in the pool since: L{Pool.follow}), only those are looked at.
    """
    out: Dict[str, list] = {}
    born = (lambda name: (applied.get(name) or (None, None, None))[2]) if applied is not None else (lambda name: None)
    if names is None:
        statuses = pool.snapshot()
    else:
        statuses = [pool.get(name) for name in names if name in pool]
        for name in names:
            if name not in pool:
                said.pop(name, None)
    for b in statuses:
        figures = (b.routed, b.active, b.answered, b.handedOff, born(b.name))
        if said.get(b.name) != figures:
            said[b.name] = figures
            out[b.name] = list(figures)
    return out


# -- client-level figures --------------------------------------------------

#: Counters a worker reports as increases since its last word.
COUNTERS = ("refused", "ejections", "ejectionsSkipped", "readmissions", "waited", "timedOut")
#: Gauges a worker reports as they are now.
GAUGES = ("clients", "waiting", "limit", "count", "paused")


def counterDeltas(now: Dict[str, object], last: Dict[str, object]) -> Dict[str, object]:
    """
    What grew since C{last} (which becomes a copy of C{now}), for counters
    that are numbers, dicts of them, or lists of numbers (histogram
    buckets): only the parts that changed.
    """
    out = _diff(now, last)
    last.clear()
    last.update(copy.deepcopy(now))
    return out


def _diff(now: Dict[str, object], before: Dict[str, object]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for key, value in now.items():
        was = before.get(key)
        if isinstance(value, dict):
            sub = _diff(value, was if isinstance(was, dict) else {})
            if sub:
                out[key] = sub
        elif isinstance(value, list):
            base = was if isinstance(was, list) and len(was) == len(value) else [0] * len(value)
            diff = [a - b for a, b in zip(value, base)]
            if any(diff):
                out[key] = diff
        elif value != (was or 0):
            out[key] = value - (was or 0)  # type: ignore[operator]
    return out


def addDeltas(totals: Dict[str, object], deltas: Dict[str, object]) -> None:
    """
    Add what L{counterDeltas} gave into C{totals}.
    """
    for key, value in deltas.items():
        if isinstance(value, dict):
            sub = totals.setdefault(key, {})
            addDeltas(sub, value)  # type: ignore[arg-type]
        elif isinstance(value, list):
            base = totals.get(key)
            if not isinstance(base, list) or len(base) != len(value):
                base = totals[key] = [0] * len(value)
            for i, v in enumerate(value):
                base[i] += v
        else:
            totals[key] = totals.get(key, 0) + value  # type: ignore[operator]
