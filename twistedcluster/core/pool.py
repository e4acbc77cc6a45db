"""
The backend pool: who is in the cluster, in what state, how loaded.

Pure core: no sockets, no reactor, no clock.  The control and admin protocols
and the proxy call into it; the routing policies read its snapshots.

A backend's visible state is derived from three independent facts, so that no
one of them overwrites another:

  - health: is its control channel registered and reporting (up) or not (down);
  - the operator's admin state (enabled, draining, disabled), which survives
    the backend going down and coming back;
  - whether the backend itself announced it is draining (SIGTERM).
"""

from __future__ import annotations

import bisect
import enum
import heapq
import math
import random
from collections import OrderedDict
from itertools import compress
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    overload,
)

import attr

from twistedcluster.core.costlevels import CostLevels

__all__ = [
    "AdminState",
    "BackendStatus",
    "Candidates",
    "DEFAULT_MAX_EJECTED_PERCENT",
    "DEFAULT_WEIGHT",
    "InvalidWeight",
    "MAX_WEIGHT",
    "MIN_WEIGHT",
    "Pool",
    "PoolError",
    "RAMP_STEPS",
    "State",
    "UnknownBackend",
    "allowedEjections",
    "names",
    "validWeight",
]

#: Weights follow HAProxy: 0 takes no new connections, 256 is the most.
MIN_WEIGHT = 0
MAX_WEIGHT = 256
DEFAULT_WEIGHT = 1
#: Slow start ramps a backend's share of its weight up in this many steps:
#: from 1/RAMP_STEPS when it comes up to all of it after ``--slow-start``.
RAMP_STEPS = 20
#: The most of the backends in service the passive health check may take
#: out, in percent; 100 is no limit.
DEFAULT_MAX_EJECTED_PERCENT = 50


def allowedEjections(inService: int, maxPercent: int) -> int:
    """
    How many of C{inService} backends may be ejected at once: C{maxPercent}
    of them, rounded down.  As Envoy's C{max_ejection_percent}, one may
    always go whatever the percent; unlike Envoy (whose panic mode then
    routes to ejected hosts anyway), never the last one, unless
    C{maxPercent} is 100 (no limit): a client that makes backends fail must
    not be able to take the whole cluster down.
    """
    if maxPercent >= 100:
        return inService
    if inService < 2:
        return 0
    return min(inService - 1, max(1, inService * maxPercent // 100))


class State(enum.Enum):
    """
    What a backend is doing, as the operator sees it.  Only ``UP`` backends
    get new connections.
    """

    UP = "up"
    DRAINING = "draining"
    DISABLED = "disabled"
    DOWN = "down"


class AdminState(enum.Enum):
    """
    What the operator asked for.  Kept across the backend's reconnects.
    """

    ENABLED = "enabled"
    DRAINING = "draining"
    DISABLED = "disabled"


class PoolError(Exception):
    """
    Base of the errors the pool raises for a request it cannot honour.
    """


class UnknownBackend(PoolError):
    """
    No backend of that name is in the pool.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"no backend named {name!r}")
        self.name = name


class InvalidWeight(PoolError):
    """
    A weight outside ``MIN_WEIGHT``..``MAX_WEIGHT``.
    """

    def __init__(self, weight: int) -> None:
        super().__init__(
            f"weight {weight} is out of range ({MIN_WEIGHT}..{MAX_WEIGHT})"
        )
        self.weight = weight


@attr.s(slots=True, auto_attribs=True)
class BackendStatus:
    """
    A backend as the pool knew it at one moment: what policies route on and
    what ``cluster-admin status`` shows.  Read-only by convention (the pool
    hands the same one to every reader until the backend changes), not
    frozen: a frozen class's generated C{__init__} sets each field through
    C{object.__setattr__}, and one is built per routed connection, where
    that was 0.9 of the 10 us a pick may cost at 10,000 backends.

    @ivar connections: active connections the backend itself last reported,
        whoever routed them.
    @ivar load: the backend's last reported load, on the scale of C{cost}:
        connections x cost (the work it has queued, in seconds), or its
        service's own figure scaled to it; connections / capacity from a
        backend that does not measure its cost.
    @ivar cost: what one more connection adds to C{load}: the seconds per
        connection the backend last reported, or 1/capacity when it reports
        none (or is static).
    @ivar addedSinceReport: connections this balancer has added to the
        backend that its last report had not seen (routed after the mark the
        report echoed, still open or still to come), less those the report
        had seen that closed since (negative when more closed).  Least-load
        and the capacity limit add it to the report, so stale reports cause
        neither herding nor phantom load.
    @ivar active: connections this balancer currently relays to it.
    @ivar routed: connections this balancer has sent it, in total.
    @ivar ramp: the share of its weight it takes now, in (0, 1]: below 1
        while slow start ramps it up after it came up.
    @ivar quota: in a worker (C{--workers}), the connections this worker
        may hold on it at once, its share of the capacity the others leave
        (L{twistedcluster.core.mirror.CapacityShares}) less its redirect
        answers handed off since the main process last counted them;
        C{None}: no share, the capacity alone limits it.
    @ivar answered: redirect answers a worker gave it, in total (L{answered}).
    @ivar handedOff: redirect answers handed off (L{Pool.handOff}), in
        total.  A worker tells the main process of its answers with these.
    """

    name: str
    host: str
    port: int
    state: State
    weight: int = DEFAULT_WEIGHT
    ramp: float = 1.0
    capacity: int = 1
    connections: int = 0
    load: float = 0.0
    addedSinceReport: int = 0
    active: int = 0
    routed: int = 0
    failures: int = 0
    static: bool = False
    reports: int = 0
    cost: float = attr.Factory(lambda self: 1.0 / self.capacity, takes_self=True)
    quota: Optional[int] = None
    answered: int = 0
    handedOff: int = 0

    @property
    def estimatedConnections(self) -> int:
        """
        Its connections as this balancer can best tell: the report, plus what
        this balancer added that the report had not seen; never fewer than
        this balancer itself relays to it now.
        """
        return max(self.connections + self.addedSinceReport, self.active)

    @property
    def full(self) -> bool:
        """
        At capacity: its estimated connections leave no room for another,
        or this worker holds its whole share of it.
        """
        quota = self.quota
        return self.estimatedConnections >= self.capacity or (quota is not None and self.active >= quota)


@attr.s(slots=True, auto_attribs=True)
class _Member:
    """
    The pool's mutable record of one backend.  Never handed out: callers
    get L{BackendStatus} snapshots.
    """

    name: str
    host: str
    port: int
    capacity: int = 1
    weight: int = DEFAULT_WEIGHT
    healthy: bool = False
    ejected: bool = False
    admin: AdminState = AdminState.ENABLED
    selfDraining: bool = False
    connections: int = 0
    load: float = 0.0
    active: int = 0
    routed: int = 0
    failures: int = 0
    static: bool = False
    reports: int = 0
    #: Seconds per connection, as the backend last reported it; C{None}:
    #: 1/capacity.
    cost: Optional[float] = None
    #: The cost level it routes on (L{CostLevels}): C{cost} within the
    #: measurement noise of other backends' costs; C{None} with C{cost}, or
    #: when static.
    level: Optional[float] = None
    #: The pool's last ticket when this member was added: tickets at or
    #: below it belong to a backend of the same name that was forgotten.
    bornAfter: int = 0
    #: Which of the members ever added under its name this is (see
    #: L{Pool.incarnation}).
    incarnation: int = 0
    #: Connections routed here that no report has seen yet, still open or
    #: still to come: each one's ticket, and the pool's epoch when it
    #: reached the backend (C{None} while it is still on its way).
    unseen: Dict[int, Optional[int]] = attr.ib(factory=dict)
    #: Connections the last report had seen that have closed since.
    closedSinceReport: int = 0
    #: The pool's epoch when the last report came (see L{Pool.release}).
    reportedEpoch: int = -1
    #: Whether the pool counts it in service (L{inService}), and ejected
    #: among those: kept by L{Pool._changed}.
    countedIn: bool = False
    countedEjected: bool = False
    #: Slow start: the steps of L{RAMP_STEPS} of its weight it takes now,
    #: and when its ramp began (C{None} until the pool's next tick).
    rampStep: int = RAMP_STEPS
    rampFrom: Optional[float] = None
    #: Whether it was up (L{Pool._noteUp}) at the last change, and the
    #: weight it has on the hash ring as the pool last logged it (0: off).
    wasUp: bool = False
    ringWeight: int = 0
    #: What it adds to the eligible backends' totals (L{Pool._place}).
    countedConnections: int = 0
    countedUnits: int = 0
    #: In a worker: the connections it may hold here at once (L{Pool.setQuota}).
    quota: Optional[int] = None
    #: Redirect answers a worker gave (L{Pool.answered}) and answers handed
    #: off (L{Pool.handOff}), in total.
    answered: int = 0
    handedOff: int = 0

    @property
    def inService(self) -> bool:
        """
        Whether it would take new connections were it not ejected: what the
        share of ejections is a share of.
        """
        return self.healthy and self.admin is AdminState.ENABLED and not self.selfDraining

    @property
    def addedSinceReport(self) -> int:
        return len(self.unseen) - self.closedSinceReport

    @property
    def configured(self) -> bool:
        """
        Whether the operator set something on it: drain, disable or weight.
        """
        return self.admin is not AdminState.ENABLED or self.weight != DEFAULT_WEIGHT

    @property
    def eligible(self) -> bool:
        """
        What L{_isEligible} says of its status, without making one: up,
        with a weight, and not at capacity.
        """
        if not (
            self.healthy
            and not self.ejected
            and self.admin is AdminState.ENABLED
            and not self.selfDraining
            and self.weight > 0
        ):
            return False
        active = self.active
        if self.static:
            estimated = active + len(self.unseen) - self.closedSinceReport
        else:
            estimated = self.connections + len(self.unseen) - self.closedSinceReport
        quota = self.quota
        return max(estimated, active) < self.capacity and (quota is None or active < quota)

    @property
    def state(self) -> State:
        if not self.healthy or self.ejected:
            return State.DOWN
        if self.admin is AdminState.DISABLED:
            return State.DISABLED
        if self.admin is AdminState.DRAINING or self.selfDraining:
            return State.DRAINING
        return State.UP

    def status(self) -> BackendStatus:
        # Built once per routed connection (the chosen backend changed):
        # positional arguments, in BackendStatus's field order, and the
        # state inlined (each keyword and property call showed in the pick's
        # cost at 10,000 backends).
        static, capacity, active, level = self.static, self.capacity, self.active, self.level
        if static:
            # Nothing reports for a static backend: what this balancer
            # relays is all it knows.
            connections = active
            load = active / capacity
        else:
            connections = self.connections
            load = self.load
            cost = self.cost
            if level is not None and cost:
                # The report's load is on the scale of the cost it measured.
                load = load * (level / cost)
        if not self.healthy or self.ejected:
            state = State.DOWN
        elif self.admin is _ENABLED:
            state = State.DRAINING if self.selfDraining else State.UP
        elif self.admin is AdminState.DISABLED:
            state = State.DISABLED
        else:
            state = State.DRAINING
        return BackendStatus(
            self.name,
            self.host,
            self.port,
            state,
            self.weight,
            self.rampStep / RAMP_STEPS,
            capacity,
            connections,
            load,
            len(self.unseen) - self.closedSinceReport,
            active,
            self.routed,
            self.failures,
            static,
            self.reports,
            1.0 / capacity if level is None else level,
            self.quota,
            self.answered,
            self.handedOff,
        )


def validWeight(weight: int) -> int:
    """
    Return C{weight} if it is a valid weight, else raise L{InvalidWeight}.
    """
    if not (MIN_WEIGHT <= weight <= MAX_WEIGHT):
        raise InvalidWeight(weight)
    return weight


class Pool:
    """
    Membership, states, weights and load of the cluster's backends.

    Each backend's status is cached until that backend changes, and the
    snapshots until any does: a new client connection changes one backend,
    so routing the next one rebuilds one status, not one per backend, and
    the snapshots are copied from lists kept in order, in which only that
    status is replaced (no Python work per backend).

    @ivar maxEjectedPercent: the most of the backends in service that
        L{eject} takes out at once (L{allowedEjections}); 100 for no limit.
    @ivar inService: backends that would take new connections were they not
        ejected (L{_Member.inService}).
    @ivar ejected: those of them ejected.
    """

    maxEjectedPercent = 100
    #: Slow start, in seconds (0: off): a backend that comes up takes a
    #: share of its weight that grows over this time (L{rampTick}).
    slowStart = 0.0

    def __init__(self) -> None:
        self._members: Dict[str, _Member] = {}
        self.inService = 0
        self.ejected = 0
        #: The ejected backends, longest ejected first.
        self._ejectedOrder: Dict[str, None] = {}
        self._rebalancing = False
        self._names: List[str] = []  # sorted
        #: Each backend's status, until it changes.
        self._statuses: Dict[str, BackendStatus] = {}
        # The snapshot's parts, in the order of _names: statuses, whether
        # each is eligible, and where each name is.  Rebuilt whole after a
        # backend joins or leaves (_layoutStale); otherwise only the entries
        # of the backends that changed (_stale) are replaced.
        self._ordered: List[BackendStatus] = []
        self._eligibleFlags: List[bool] = []
        self._index: Dict[str, int] = {}
        self._layoutStale = False
        self._stale: Set[str] = set()
        self._snapshot: Optional[Tuple[BackendStatus, ...]] = None
        self._eligible: Optional[Tuple[BackendStatus, ...]] = None
        self._watchers: List[Callable[[], None]] = []
        #: The sets L{follow} gave out.
        self._followers: List[Set[str]] = []
        #: The last ticket given to a routed connection, and the epoch that
        #: every mark moves on (see L{mark}).
        self._ticket = 0
        #: Members added so far (L{incarnation}).
        self._added = 0
        self._incarnations: Optional[Tuple[Tuple[int, int], Dict[str, int]]] = None
        self._epoch = 0
        #: The backends with an operator setting (L{_Member.configured}),
        #: kept as they change so that saving them costs nothing per backend.
        self._configured: Set[str] = set()
        #: The eligible members, in no particular order, and where each is
        #: in that list: kept as each member changes (a member that leaves
        #: swaps places with the last), so that L{candidates} costs nothing
        #: per backend.  C{_eligibleVersion} moves whenever the set does.
        self._eligibleMembers: List[_Member] = []
        self._eligiblePosition: Dict[str, int] = {}
        self._eligibleVersion = 0
        #: The indexes L{lowest} keeps, by score function, most recently
        #: used last.
        self._indexes: "OrderedDict[Callable[[BackendStatus], float], _Index]" = OrderedDict()
        #: The eligible members' estimated connections and weights (in
        #: units of 1/RAMP_STEPS of a weight, slow start included), summed
        #: as each member changes: the hash policy's bound.
        self._eligibleConnections = 0
        self._eligibleUnits = 0
        #: Members ramping up (slow start).
        self._ramping: Dict[str, _Member] = {}
        #: The names of members whose ring weight changed, in order
        #: (L{ringChanges}); C{_ringLogBase} is the position of its first.
        self._ringLog: List[str] = []
        self._ringLogBase = 0
        self._candidates = Candidates(self)
        #: The cost levels the members route on (L{_Member.level}).
        self._costLevels = CostLevels()

    def watch(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback()} after every change until L{unwatch}: for waiters
        that need to know when capacity may have freed up.  It must not
        change the pool itself.
        """
        if callback not in self._watchers:
            self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def follow(self) -> Set[str]:
        """
        A set into which the name of every backend whose status changes, or
        that joins or leaves, is put from now on (until L{unfollow}): for a
        reader that keeps a copy of the pool up to date without going over
        every backend (a worker's view of thousands).  The reader empties it.
        """
        changes: Set[str] = set()
        self._followers.append(changes)
        return changes

    def unfollow(self, changes: Set[str]) -> None:
        self._followers = [f for f in self._followers if f is not changes]

    # -- reading ---------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def incarnation(self, name: str) -> Optional[int]:
        """
        A number for the backend of this name as added, which changes when
        it is forgotten and a backend of the same name added again; C{None}
        when there is none.  Whoever speaks for a backend (its control
        channel) checks it speaks for the same one still.
        """
        m = self._members.get(name)
        return None if m is None else m.incarnation

    @property
    def incarnations(self) -> Dict[str, int]:
        """
        L{incarnation} of every backend, by name: made again only when a
        backend was added or left (for a view of thousands, where a call
        per backend showed), so a new map says that one was.  Read it, do
        not change it.
        """
        key = (self._added, len(self._members))
        cached = self._incarnations
        if cached is None or cached[0] != key:
            cached = self._incarnations = (key, {n: m.incarnation for n, m in self._members.items()})
        return cached[1]

    def __len__(self) -> int:
        return len(self._members)

    def get(self, name: str) -> BackendStatus:
        """
        The status of one backend; L{UnknownBackend} if there is none.
        """
        return self._status(self._member(name))

    def snapshot(self) -> Tuple[BackendStatus, ...]:
        """
        Every backend, whatever its state, sorted by name.
        """
        if self._snapshot is None:
            members, status = self._members, self._status
            if self._layoutStale:
                self._ordered = [status(members[n]) for n in self._names]
                self._eligibleFlags = [_isEligible(s) for s in self._ordered]
                self._index = {n: i for i, n in enumerate(self._names)}
                self._layoutStale = False
            else:
                ordered, flags, index = self._ordered, self._eligibleFlags, self._index
                for name in self._stale:
                    i = index[name]
                    ordered[i] = s = status(members[name])
                    flags[i] = _isEligible(s)
            self._stale.clear()
            self._snapshot = tuple(self._ordered)
        return self._snapshot

    def eligible(self) -> Tuple[BackendStatus, ...]:
        """
        The backends that may take a new connection: up, with a weight, and
        not at capacity.
        """
        if self._eligible is None:
            self._eligible = tuple(compress(self.snapshot(), self._eligibleFlags))
        return self._eligible

    def candidates(self, exclude: Iterable[str] = ()) -> "Candidates":
        """
        The backends that may take a new connection, as L{eligible}, but as
        a live sequence that costs nothing to make however many backends
        there are: in no particular order, read at once (it follows the
        pool's changes), with L{Candidates.lowest} for the policies that
        route to the lowest score.

        @param exclude: names to leave out (backends already tried).
        """
        if not exclude:
            return self._candidates  # the same every time: nothing to make
        return Candidates(self, frozenset(exclude))

    def lowest(
        self,
        score: Callable[[BackendStatus], float],
        rng: random.Random,
        exclude: Iterable[str] = (),
        randomTies: bool = True,
    ) -> Optional[BackendStatus]:
        """
        The eligible backend with the lowest C{score}, ties broken at random
        (with C{rng}), or by name when not C{randomTies}; C{None} if there
        is none (once C{exclude} is left out).

        The pool keeps an index (a heap) for each score function asked for
        (the few most recently used): a change to a backend re-scores that
        backend only, when the index is next read, so a pick costs about
        log(backends).  C{score} must be a function of the status alone,
        or the caller must say when it changes otherwise (L{rescore}).
        Scores within 1e-12 of each other are ties.
        """
        index = self._indexes.get(score)
        if index is None:
            index = self._indexes[score] = _Index(score, randomTies)
            index.dirty.update(self._eligiblePosition)
            if len(self._indexes) > _MAX_INDEXES:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(score)
        if index.dirty:
            index.refresh(self, rng)
        return index.lowest(exclude, rng)

    def rescore(self, score: Callable[[BackendStatus], float], name: str) -> None:
        """
        The score C{score} gives backend C{name} changed though its status
        did not (a policy's own state moved): re-score it at the next
        L{lowest}.
        """
        index = self._indexes.get(score)
        if index is not None:
            index.dirty.add(name)

    # -- slow start and the hash ring ------------------------------------

    def rampTick(self, now: float) -> None:
        """
        The clock says C{now}: move slow start on.  A backend that came up
        since the last tick starts its ramp now; the others take
        M{ceil(RAMP_STEPS * elapsed / slowStart)} steps of L{RAMP_STEPS} of
        their weight (at least one), all of it after L{slowStart}.  Only
        the ramping backends are re-scored, so picks stay O(log n).  The
        balancer calls this on a timer, every 1/RAMP_STEPS of L{slowStart}.
        """
        if not self._ramping:
            return
        seconds = self.slowStart
        done = []
        for name, m in self._ramping.items():
            if m.rampFrom is None:
                m.rampFrom = now
                continue
            if seconds <= 0:
                step = RAMP_STEPS
            else:
                elapsed = (now - m.rampFrom) / seconds
                step = min(RAMP_STEPS, max(1, math.ceil(RAMP_STEPS * elapsed - 1e-9)))
            if step != m.rampStep:
                m.rampStep = step
                self._loadChanged(m)
            if step >= RAMP_STEPS:
                done.append(name)
        for name in done:
            del self._ramping[name]

    def setRamp(self, name: str, step: int) -> None:
        """
        Take C{step} of L{RAMP_STEPS} of the weight now, as another pool
        (a worker's main process, L{twistedcluster.core.mirror}) says.
        """
        m = self._member(name)
        step = min(RAMP_STEPS, max(1, step))
        if step != m.rampStep:
            m.rampStep = step
            self._loadChanged(m)

    def setQuota(self, name: str, quota: Optional[int]) -> None:
        """
        Let this pool (a worker's) hold at most C{quota} connections on
        C{name} at once, as its main process shares the capacity out
        (L{twistedcluster.core.mirror.CapacityShares}); C{None}: no limit
        but the capacity.  Each redirect answer handed off (L{handOff})
        takes one from it, as the connection it held did.
        """
        m = self._member(name)
        if quota is not None:
            quota = max(0, quota)
        if quota != m.quota:
            m.quota = quota
            self._loadChanged(m)

    @property
    def ramping(self) -> int:
        """
        How many backends slow start is ramping up now.
        """
        return len(self._ramping)

    def ringChanges(self, since: Optional[int]) -> Tuple[bool, List[Tuple[str, int]], int]:
        """
        What changed on the hash ring since the cursor C{since}: the ring
        holds the backends that are up (L{_noteUp}) with their weight, so it
        changes only when one comes up, goes down, is reweighted or
        forgotten, never when one fills up.

        @return: C{(whole, changes, cursor)}: C{changes} are C{(name,
            weight)} pairs (weight 0: off the ring); when C{whole}, they
            are the whole ring instead (C{since} was C{None} or too old);
            C{cursor} is what to pass next time.
        """
        log, base = self._ringLog, self._ringLogBase
        cursor = base + len(log)
        members = self._members
        if since is None or since < base or since > cursor:
            return True, [(n, m.ringWeight) for n, m in members.items() if m.ringWeight], cursor
        changes = []
        for name in dict.fromkeys(log[since - base :]):
            m = members.get(name)
            changes.append((name, m.ringWeight if m is not None else 0))
        return False, changes, cursor

    # -- membership ------------------------------------------------------

    def register(
        self,
        name: str,
        host: str,
        port: int,
        capacity: int = 1,
        connections: int = 0,
        load: float = 0.0,
        static: bool = False,
        cost: Optional[float] = None,
    ) -> BackendStatus:
        """
        Add a backend, or bring a known one back up at (possibly) a new
        address.  Its admin state and weight are kept.

        @param cost: seconds per connection (see L{report}).
        """
        m = self._members.get(name)
        if m is None:
            m = self._add(name, host, port)
        m.host = host
        m.port = port
        m.capacity = max(1, capacity)
        m.static = static
        m.healthy = True
        m.selfDraining = False
        m.connections = connections
        m.load = load
        self._setCost(m, cost)
        # The registration counts what had reached the backend; connects
        # still on their way stay added.
        for ticket in [t for t, reached in m.unseen.items() if reached is not None]:
            del m.unseen[ticket]
        m.closedSinceReport = 0
        m.failures = 0
        self._changed(m)
        return self._status(m)

    def markDown(self, name: str) -> None:
        """
        The backend's control channel closed or its reports stopped: it gets
        no new connections until it registers or reports again.
        """
        m = self._member(name)
        if m.healthy:
            m.healthy = False
            self._changed(m)

    def markUp(self, name: str) -> None:
        """
        A backend that was marked down is healthy again without re-registering
        (its reports resumed, or a health check passed).
        """
        m = self._member(name)
        if not m.healthy:
            m.healthy = True
            m.failures = 0
            self._changed(m)

    def eject(self, name: str) -> bool:
        """
        Take a backend out for a while: connections to it keep failing (the
        passive health check).  L{readmit} brings it back.

        Return whether it is out: not when that would take more than
        L{maxEjectedPercent} of the backends in service out.  A registration
        does not bring it back: it proves the control channel, not the
        service.

        Should backends leave service later (down, drained), the longest
        ejected are readmitted at once as far as needed to keep to the share.
        """
        m = self._member(name)
        if m.ejected:
            return True
        if m.inService and self.ejected >= allowedEjections(
            self.inService, self.maxEjectedPercent
        ):
            return False
        m.ejected = True
        self._ejectedOrder[name] = None
        self._changed(m)
        return True

    def readmit(self, name: str) -> None:
        m = self._members.get(name)
        if m is not None and m.ejected:
            m.ejected = False
            m.failures = 0
            del self._ejectedOrder[name]
            self._changed(m)

    def restore(
        self, name: str, host: str, port: int, admin: AdminState, weight: int
    ) -> None:
        """
        Recreate what the operator had set on a backend (from the balancer's
        state file), before the backend registers again: it is listed down
        until it does.
        """
        m = self._members.get(name)
        if m is None:
            m = self._add(name, host, port)
        m.admin = admin
        m.weight = validWeight(weight)
        self._noteSettings(m)
        self._changed(m)

    def remove(self, name: str) -> None:
        """
        Forget a backend, admin state included.
        """
        m = self._members.pop(self._member(name).name)
        self._setCost(m, None)
        self._names.remove(m.name)
        self._configured.discard(m.name)
        self._uncount(m)
        self._keepShare()
        self._changed(m)
        self._stale.discard(m.name)
        self._layoutStale = True

    def removeMany(self, names: Iterable[str]) -> None:
        """
        Forget several backends at once (those of them in the pool): one
        pass over the pool however many go, where L{remove} takes one each.
        """
        gone = {n for n in names if n in self._members}
        if not gone:
            return
        for n in gone:
            m = self._members.pop(n)
            self._setCost(m, None)
            self._uncount(m)
            self._noteUp(m)
            self._place(m)
            self._statuses.pop(n, None)
            self._stale.discard(n)
            self._configured.discard(n)
        self._names = [n for n in self._names if n not in gone]
        for changes in self._followers:
            changes |= gone
        self._layoutStale = True
        self._snapshot = None
        self._eligible = None
        self._keepShare()
        for callback in list(self._watchers):
            callback()

    # -- reports from the backend ---------------------------------------

    def report(
        self,
        name: str,
        connections: int,
        load: float,
        seen: Optional[int] = None,
        cost: Optional[float] = None,
    ) -> None:
        """
        Record a load report.

        @param cost: what one connection costs the backend, in seconds; the
            report's C{load} is on that scale.  C{None}: 1/capacity, with
            C{load} a share of the capacity.

        @param seen: the mark of the last answer the backend had received
            when it measured (see L{mark}): the connections that had
            reached it before that mark left are in the report, the others
            are not.  C{None} (a backend that does not echo marks) counts
            every connection routed so far as seen.
        """
        m = self._member(name)
        m.connections = max(0, connections)
        m.load = max(0.0, load)
        self._setCost(m, cost)
        unseen = m.unseen
        if seen is None:
            unseen.clear()
        elif unseen:
            for ticket in [t for t, reached in unseen.items() if reached is not None and reached <= seen]:
                del unseen[ticket]
        m.closedSinceReport = 0
        m.reports += 1
        # Connections that reach the backend from now on have a later epoch
        # (see release).
        m.reportedEpoch = self._epoch
        self._epoch += 1
        self._loadChanged(m)

    def markDue(self, name: str, mark: Optional[int]) -> bool:
        """
        Whether the backend needs a newer mark than C{mark} (the last one
        it was given): a connection reached it after that mark left, and no
        report has seen it.  Without one, its reports could never count
        that connection.
        """
        m = self._member(name)
        for reached in m.unseen.values():
            if reached is not None and (mark is None or reached > mark):
                return True
        return False

    def mark(self, name: str) -> int:
        """
        A mark to send a backend in the answer to its registration or
        report, for it to echo in its next report (C{seen}): the pool's
        epoch, which every mark moves on.  A connection that had reached the
        backend before the mark left reached it at an epoch at or below the
        mark, so a report measured after the backend read the mark counts
        it; one still on its way, or that arrives later, is above it.
        """
        self._member(name)
        epoch = self._epoch
        self._epoch = epoch + 1
        return epoch

    def setSelfDraining(self, name: str, draining: bool = True) -> None:
        """
        The backend itself announced it is shutting down.
        """
        m = self._member(name)
        m.selfDraining = draining
        self._changed(m)

    # -- the operator ----------------------------------------------------

    def setAdminState(self, name: str, state: AdminState) -> BackendStatus:
        m = self._member(name)
        m.admin = state
        self._noteSettings(m)
        self._changed(m)
        return self._status(m)

    def setWeight(self, name: str, weight: int) -> BackendStatus:
        m = self._member(name)
        m.weight = validWeight(weight)
        self._noteSettings(m)
        self._changed(m)
        return self._status(m)

    def adminSettings(self) -> Dict[str, Dict[str, object]]:
        """
        What the operator set, with its last address, for each backend that
        has an operator setting: what must survive a balancer restart.  The
        others would only come back as names that never register.
        """
        members = self._members
        return {
            n: {"host": m.host, "port": m.port, "admin": m.admin.value, "weight": m.weight}
            for n, m in ((n, members[n]) for n in sorted(self._configured))
        }

    def forgettable(self, name: str) -> bool:
        """
        Whether forgetting a backend loses nothing: it is down, it
        registered itself (not static), and has no operator setting.  Such
        a backend comes back as new if it registers again.
        """
        m = self._members.get(name)
        return (
            m is not None
            and m.state is State.DOWN
            and not m.static
            and not m.configured
        )

    # -- this balancer's own traffic --------------------------------------

    def acquire(self, name: str) -> int:
        """
        The balancer chose this backend for a new connection and is
        connecting to it; return the connection's ticket, to hand back to
        L{connectFailed}, L{release} or L{handOff}.
        """
        m = self._member(name)
        m.active += 1
        m.routed += 1
        self._ticket = ticket = self._ticket + 1
        if not m.static:
            m.unseen[ticket] = None
        self._loadChanged(m)
        return ticket

    def handOff(self, name: str, ticket: int) -> None:
        """
        The connection chosen by L{acquire} is the client's own to make
        (redirect mode): this balancer will not see it, so it stays added
        until a report has seen it (or L{forgetHandOff}), but is not held
        here.  Until L{connected} says the client has had time to connect,
        no report is taken to have seen it.
        """
        m = self._mine(name, ticket)
        if m is not None and m.active > 0:
            m.active -= 1
            m.handedOff += 1
            if m.quota:
                # In a worker the answer uses its share as a connection it
                # held would, until the main process has counted it as
                # handed off (L{twistedcluster.core.mirror.applyView}).
                m.quota -= 1
            self._loadChanged(m)

    def answered(self, name: str, ticket: int) -> None:
        """
        In a worker (C{--workers}): the connection chosen by L{acquire} is a
        redirect answer, held here as a connection (it uses the worker's
        share) until its client has had time to connect (then
        L{handOff}); counted for the main process to tell it from the
        connections the worker relays.
        """
        m = self._mine(name, ticket)
        if m is not None:
            m.answered += 1
            # A figure of its status: every view of the pool shows it now.
            self._loadChanged(m)

    def forgetHandOff(self, name: str, ticket: int) -> None:
        """
        A handed-off connection that no report has seen yet stops counting:
        its client has had long enough to connect.
        """
        m = self._mine(name, ticket)
        if m is not None and ticket in m.unseen:
            del m.unseen[ticket]
            self._loadChanged(m)

    def connected(self, name: str, ticket: int, served: bool = True) -> None:
        """
        The connection chosen by L{acquire} was established (for a hand-off:
        its client has had time to connect): from the next mark on, a
        report counts it.

        @param served: whether that is proof enough that the backend works
            (ending its failures in a row); C{False} when it must prove
            itself later (L{backendServed}), or for a hand-off.
        """
        m = self._mine(name, ticket)
        if m is None:
            return
        # Not a change any snapshot shows: only what the next report cancels.
        if ticket in m.unseen:
            m.unseen[ticket] = self._epoch
        if served and m.failures:
            m.failures = 0
            self._loadChanged(m)

    def connectFailed(self, name: str, ticket: int, countFailure: bool = True) -> int:
        """
        The connection chosen by L{acquire} could not be made: undo it and
        return how many connects in a row have now failed.

        @param countFailure: C{False} when the attempt was abandoned (the
            client left) rather than refused by the backend.
        """
        m = self._mine(name, ticket)
        if m is None:
            return 0
        m.active = max(0, m.active - 1)
        m.routed = max(0, m.routed - 1)
        m.unseen.pop(ticket, None)
        if countFailure:
            m.failures += 1
        self._loadChanged(m)
        return m.failures

    def backendFailed(self, name: str) -> int:
        """
        A connection made after L{acquire} was closed or reset by the backend
        before it sent anything: count it with the failed connects, and
        return how many failures in a row there are now.  Its accounting is
        L{release}'s, as for any connection that closes.
        """
        m = self._members.get(name)
        if m is None:
            return 0
        m.failures += 1
        self._loadChanged(m)
        return m.failures

    def backendServed(self, name: str) -> None:
        """
        The backend proved itself on a connection (it sent a byte, or kept
        the connection past the proxy's early-close window): the failures in
        a row are over.
        """
        m = self._members.get(name)
        if m is not None and m.failures:
            m.failures = 0
            self._loadChanged(m)

    def release(self, name: str, ticket: int) -> None:
        """
        A connection made after L{acquire} has closed.
        """
        m = self._mine(name, ticket)
        if m is not None and m.active > 0:
            m.active -= 1
            reached = m.unseen.pop(ticket, _ABSENT)
            if reached is _ABSENT:
                if not m.static:
                    m.closedSinceReport += 1
            elif reached is not None and reached <= m.reportedEpoch:
                # It had reached the backend before the last report came,
                # and was open then: that report counted it, though the
                # mark it echoed was older (short connections that reach
                # the backend after each mark would otherwise count twice
                # until the next report, its queue added to its load).
                m.closedSinceReport += 1
            self._loadChanged(m)

    # -- internals ---------------------------------------------------------

    def _member(self, name: str) -> _Member:
        try:
            return self._members[name]
        except KeyError:
            raise UnknownBackend(name) from None

    def _mine(self, name: str, ticket: int) -> Optional[_Member]:
        """
        The member a ticket was given for; C{None} if it has been forgotten
        since, even if a backend of the same name has joined again.
        """
        m = self._members.get(name)
        if m is None or ticket <= m.bornAfter:
            return None
        return m

    def _add(self, name: str, host: str, port: int) -> _Member:
        self._added += 1
        m = self._members[name] = _Member(
            name=name, host=host, port=port, bornAfter=self._ticket, incarnation=self._added
        )
        bisect.insort(self._names, name)
        self._layoutStale = True
        return m

    def levelCosts(self, tolerance: float) -> None:
        """
        From now on, measured costs within C{tolerance} (a share) of a level
        in use take that level (L{CostLevels}); 0: each cost as measured (a
        mirror of a pool that levels them already).
        """
        if not 0 <= tolerance < 1:
            raise ValueError("the tolerance must be in [0, 1)")
        self._costLevels.tolerance = tolerance

    def _setCost(self, m: _Member, cost: Optional[float]) -> None:
        """
        The backend measured C{cost} (C{None}: none, or it left): keep its
        cost level (L{CostLevels}) with it.  A static backend has none.
        """
        m.cost = cost
        if cost is None or m.static:
            self._costLevels.release(m.level)
            m.level = None
        else:
            m.level = self._costLevels.place(m.level, cost)

    def _status(self, m: _Member) -> BackendStatus:
        status = self._statuses.get(m.name)
        if status is None:
            status = self._statuses[m.name] = m.status()
        return status

    def _noteSettings(self, m: _Member) -> None:
        if m.configured:
            self._configured.add(m.name)
        else:
            self._configured.discard(m.name)

    def _uncount(self, m: _Member) -> None:
        """
        C{m} leaves the pool: out of the counts.
        """
        self.inService -= m.countedIn
        self.ejected -= m.countedEjected
        m.countedIn = m.countedEjected = False
        self._ejectedOrder.pop(m.name, None)

    def _keepShare(self) -> None:
        """
        Readmit the longest ejected while more are ejected than the backends
        in service allow (some left service after the ejections).
        """
        if self._rebalancing:
            return
        self._rebalancing = True
        try:
            for name in list(self._ejectedOrder):
                if self.ejected <= allowedEjections(self.inService, self.maxEjectedPercent):
                    break
                if self._members[name].countedEjected:
                    self.readmit(name)
        finally:
            self._rebalancing = False

    def _changed(self, m: _Member) -> None:
        if m.name in self._members:
            counted = m.inService
            if counted is not m.countedIn:
                self.inService += 1 if counted else -1
                m.countedIn = counted
            ejected = counted and m.ejected
            if ejected is not m.countedEjected:
                self.ejected += 1 if ejected else -1
                m.countedEjected = ejected
            if self.ejected and self.ejected > allowedEjections(
                self.inService, self.maxEjectedPercent
            ):
                self._keepShare()
        self._noteUp(m)
        self._loadChanged(m)

    def _noteUp(self, m: _Member) -> None:
        """
        Follow C{m} going up or down: up is in the pool, healthy, not
        ejected, enabled and not draining itself (whatever its load and
        weight).  Coming up starts its slow start; going down ends it.
        Its weight while up is its weight on the hash ring: a change is
        logged for L{ringChanges}.
        """
        up = (
            m.healthy
            and not m.ejected
            and m.admin is _ENABLED
            and not m.selfDraining
            and self._members.get(m.name) is m
        )
        if up is not m.wasUp:
            m.wasUp = up
            if up and self.slowStart > 0:
                m.rampStep = 1
                m.rampFrom = None
                self._ramping[m.name] = m
            else:
                m.rampStep = RAMP_STEPS
                m.rampFrom = None
                if self._ramping.get(m.name) is m:
                    del self._ramping[m.name]
        weight = m.weight if up else 0
        if weight != m.ringWeight:
            m.ringWeight = weight
            log = self._ringLog
            log.append(m.name)
            if len(log) > 2 * len(self._members) + 1024:
                # Readers this far behind take the whole ring instead.
                drop = len(log) // 2
                del log[:drop]
                self._ringLogBase += drop

    def _loadChanged(self, m: _Member) -> None:
        """
        What L{_changed} does for a change of load or counts only (one that
        leaves health, admin state and ejection alone): the routing path's.
        """
        name = m.name
        self._statuses.pop(name, None)
        self._stale.add(name)
        for changes in self._followers:
            changes.add(name)
        self._snapshot = None
        self._eligible = None
        self._place(m)
        if self._watchers:
            for callback in list(self._watchers):
                callback()


    def _place(self, m: _Member) -> None:
        """
        Keep C{m}'s place among the eligible members, and have every index
        re-score it.
        """
        name = m.name
        position = self._eligiblePosition
        where = position.get(name)
        estimated = max(
            (m.active if m.static else m.connections) + len(m.unseen) - m.closedSinceReport,
            m.active,
        )
        # m.eligible, inlined: this runs on every change.
        if (
            m.healthy
            and not m.ejected
            and m.admin is _ENABLED
            and not m.selfDraining
            and m.weight > 0
            and estimated < m.capacity
            and (m.quota is None or m.active < m.quota)
            and self._members.get(name) is m
        ):
            if where is None:
                position[name] = len(self._eligibleMembers)
                self._eligibleMembers.append(m)
                self._eligibleVersion += 1
            units = m.weight * m.rampStep
        else:
            if where is not None:
                members = self._eligibleMembers
                last = members.pop()
                if last is not m:
                    members[where] = last
                    position[last.name] = where
                del position[name]
                self._eligibleVersion += 1
            estimated = units = 0
        if estimated != m.countedConnections:
            self._eligibleConnections += estimated - m.countedConnections
            m.countedConnections = estimated
        if units != m.countedUnits:
            self._eligibleUnits += units - m.countedUnits
            m.countedUnits = units
        for index in self._indexes.values():
            index.dirty.add(name)


_ENABLED = AdminState.ENABLED
#: Not there.
_ABSENT = object()
#: How many score functions L{Pool.lowest} keeps an index for.
_MAX_INDEXES = 4
#: Scores are rounded to this many decimals: closer ones are ties.
_TIE_DIGITS = 12
#: Backends tied at the lowest score among which L{Pool.lowest} draws.
_TIED = 2


def _noDraw() -> float:
    return 0.0


class _Index:
    """
    The eligible backends in a heap by score, for L{Pool.lowest}.

    Each entry is (score, random tie-break, name, status); the one in
    C{current} for a name is its valid entry, any other is stale and
    dropped when it reaches the top.  Ties go to the lowest random key,
    drawn when the entry was made: among backends of equal score, each is
    as likely to come first.
    """

    __slots__ = ("score", "randomTies", "heap", "current", "dirty")

    def __init__(self, score: Callable[[BackendStatus], float], randomTies: bool = True) -> None:
        self.score = score
        #: Whether ties go at random; else by name.
        self.randomTies = randomTies
        self.heap: List[Tuple[float, float, str, BackendStatus]] = []
        self.current: Dict[str, Tuple[float, float, str, BackendStatus]] = {}
        #: Names to re-score before the next read.
        self.dirty: Set[str] = set()

    def refresh(self, pool: "Pool", rng: random.Random) -> None:
        members = pool._members
        position = pool._eligiblePosition
        status = pool._status
        score = self.score
        heap, current = self.heap, self.current
        draw = rng.random if self.randomTies else _noDraw
        push, replace = heapq.heappush, heapq.heapreplace
        for name in self.dirty:
            if name not in position:
                current.pop(name, None)
                continue
            s = status(members[name])
            entry = (round(score(s), _TIE_DIGITS), draw(), name, s)
            old = current.get(name)
            current[name] = entry
            if heap and heap[0] is old:
                # Most often the backend just picked: its old entry is the
                # top, replaced in one sift rather than a push and a pop.
                replace(heap, entry)
            else:
                push(heap, entry)
        self.dirty.clear()
        if len(heap) > 2 * len(current) + 64:
            # Mostly stale entries: start again from the valid ones.
            heap[:] = current.values()
            heapq.heapify(heap)

    def lowest(self, exclude: Iterable[str], rng: random.Random) -> Optional[BackendStatus]:
        """
        The valid entry of lowest score, less those in C{exclude}.  With
        random ties, one of the first few tied at that score, at random:
        each entry's key was drawn when it was made, so without this a
        backend whose score does not move would keep winning (or losing)
        every tie against one whose score moves and comes back.
        """
        heap, current = self.heap, self.current
        pop = heapq.heappop
        while heap and current.get(heap[0][2]) is not heap[0]:
            pop(heap)  # stale
        if not heap:
            return None
        top = heap[0]
        if not (exclude and top[2] in exclude):
            # Most picks: the lowest and the next lowest (a child of the
            # top) are valid, so nothing need leave the heap.
            if not self.randomTies or len(heap) == 1:
                return top[3]
            second = heap[1] if len(heap) == 2 or heap[1] <= heap[2] else heap[2]
            if current.get(second[2]) is second and not (exclude and second[2] in exclude):
                if second[0] != top[0]:
                    return top[3]
                # rng.random, not randrange(2): a tenth of the time.
                return top[3] if rng.random() < 0.5 else second[3]
        put_back = []
        tied: List[Tuple[float, float, str, BackendStatus]] = []
        limit = _TIED if self.randomTies else 1
        while heap and len(tied) < limit:
            entry = heap[0]
            name = entry[2]
            if current.get(name) is not entry:
                pop(heap)
            elif exclude and name in exclude:
                put_back.append(pop(heap))
            elif tied and entry[0] != tied[0][0]:
                break
            else:
                tied.append(pop(heap))
        for entry in put_back:
            heapq.heappush(heap, entry)
        for entry in tied:
            heapq.heappush(heap, entry)
        if not tied:
            return None
        if len(tied) == 1:
            return tied[0][3]
        return tied[int(rng.random() * len(tied))][3]


class Candidates(Sequence[BackendStatus]):
    """
    The pool's eligible backends (L{Pool.candidates}): a live sequence of
    their L{BackendStatus}es, in no particular order, less any excluded by
    name; what L{twistedcluster.core.cluster.Cluster.pick} hands a policy.

    Cheap to make and to index; read it at once, as the pool changes under
    it.  Beyond a sequence's methods: L{lowest} (the indexed minimum),
    L{rescore}, L{get} (a candidate by name) and L{version} (moves whenever
    the set of eligible backends does, not when their load does: for a
    policy that caches something per set, such as a hash ring).
    """

    __slots__ = ("_pool", "_exclude")

    def __init__(self, pool: Pool, exclude: frozenset = frozenset()) -> None:  # noqa: B008
        self._pool = pool
        self._exclude = exclude

    @property
    def version(self) -> int:
        return self._pool._eligibleVersion

    @property
    def excluded(self) -> frozenset:
        return self._exclude

    def _excludedPositions(self) -> List[int]:
        position = self._pool._eligiblePosition
        return sorted(position[n] for n in self._exclude if n in position)

    def __len__(self) -> int:
        n = len(self._pool._eligibleMembers)
        if self._exclude:
            position = self._pool._eligiblePosition
            n -= sum(1 for name in self._exclude if name in position)
        return n

    def __bool__(self) -> bool:
        return len(self) > 0

    @overload
    def __getitem__(self, i: int) -> BackendStatus: ...

    @overload
    def __getitem__(self, i: slice) -> Tuple[BackendStatus, ...]: ...

    def __getitem__(self, i: Union[int, slice]) -> Any:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("candidate index out of range")
        if self._exclude:
            for p in self._excludedPositions():
                if p <= i:
                    i += 1
                else:
                    break
        pool = self._pool
        return pool._status(pool._eligibleMembers[i])

    def __iter__(self) -> Iterator[BackendStatus]:
        pool = self._pool
        exclude = self._exclude
        status = pool._status
        for m in list(pool._eligibleMembers):
            if m.name not in exclude:
                yield status(m)

    def __contains__(self, item: object) -> bool:
        return isinstance(item, BackendStatus) and self.get(item.name) == item

    def get(self, name: str) -> Optional[BackendStatus]:
        """
        The candidate named C{name}, or C{None} if it is not one.
        """
        pool = self._pool
        where = pool._eligiblePosition.get(name)
        if where is None or name in self._exclude:
            return None
        return pool._status(pool._eligibleMembers[where])

    def lowest(
        self,
        score: Callable[[BackendStatus], float],
        rng: random.Random,
        randomTies: bool = True,
    ) -> Optional[BackendStatus]:
        """
        The candidate with the lowest C{score}, ties at random (or by name):
        see L{Pool.lowest}.
        """
        return self._pool.lowest(score, rng, self._exclude, randomTies)

    def rescore(self, score: Callable[[BackendStatus], float], name: str) -> None:
        self._pool.rescore(score, name)

    def totals(self) -> Tuple[int, int]:
        """
        The candidates' estimated connections and weights, summed (weights
        in units of 1/L{RAMP_STEPS}, slow start included), kept by the pool
        as backends change: what the hash policy bounds each by.
        """
        pool = self._pool
        connections, units = pool._eligibleConnections, pool._eligibleUnits
        if self._exclude:
            members, position = pool._members, pool._eligiblePosition
            for name in self._exclude:
                if name in position:
                    m = members[name]
                    connections -= m.countedConnections
                    units -= m.countedUnits
        return connections, units

    def ringChanges(self, since: Optional[int]) -> Tuple[bool, List[Tuple[str, int]], int]:
        """
        The pool's L{Pool.ringChanges}, for a policy that keeps a ring of
        the backends that are up: every candidate is on it.
        """
        return self._pool.ringChanges(since)

    @property
    def ringCursor(self) -> int:
        """
        Where L{ringChanges} is now: a reader at this cursor is up to date.
        """
        pool = self._pool
        return pool._ringLogBase + len(pool._ringLog)

    @property
    def pool(self) -> "Pool":
        return self._pool

    def __repr__(self) -> str:
        return f"<Candidates of {len(self)} backend(s)>"


def _isEligible(s: BackendStatus) -> bool:
    """
    Whether a backend may take a new connection: up, with a weight, and not
    at capacity.
    """
    return s.state is State.UP and s.weight > 0 and not s.full


def names(statuses: Iterable[BackendStatus]) -> Tuple[str, ...]:
    """
    The names of some backends, in order: handy in logs and tests.
    """
    return tuple(s.name for s in statuses)
