"""
The pool across worker processes (C{--workers N}): pure book-keeping, no I/O.

The main process holds the one real pool (registrations, reports, operator
state).  Each worker routes on a mirror of it, so that a pick stays local
and as cheap as with one process.  Two flows keep them one cluster:

 - L{fold}: a worker's traffic (per backend: connections it has routed in
   total, and those it holds now) becomes tickets in the main pool, so that
   the main pool's C{routed}, C{active} and "added since report" count every
   worker's connections.
 - L{viewFor} / L{applyView}: the main pool as one worker should see it.  For
   each backend, C{base} is what the main pool estimates on it less what it
   knows this worker holds there; the worker adds what it holds now, exactly,
   so its own picks count at once and the others' within one sync interval.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.pool import RAMP_STEPS, AdminState, Pool, State

__all__ = ["TrafficBook", "fold", "release", "viewFor", "applyView", "trafficOf"]

#: One backend in a view: name, host, port, state, weight, slow start's
#: step (of RAMP_STEPS), capacity, base (connections on it not held by the
#: worker), the load its own figure adds beyond connections x cost (0
#: unless its service supplies one), and the cost level least-load routes
#: it on (C{None}: none measured, 1/capacity).
ViewEntry = Tuple[str, str, int, str, int, int, int, int, float, Optional[float]]


class TrafficBook:
    """
    What the main pool holds for one worker: per backend, the last routed
    total it said, and one ticket for each connection it holds.
    """

    def __init__(self) -> None:
        self.routed: Dict[str, int] = {}
        self.tickets: Dict[str, Deque[int]] = {}

    def holding(self, name: str) -> int:
        tickets = self.tickets.get(name)
        return len(tickets) if tickets else 0


def fold(pool: Pool, book: TrafficBook, traffic: Dict[str, List[int]]) -> None:
    """
    Count a worker's traffic (C{name: [routed total, held now]}) in the main
    pool: a ticket for each connection routed since its last word, and one
    released, oldest first, for each it no longer holds.
    """
    for name, (routed, held) in traffic.items():
        if name not in pool:
            continue
        tickets = book.tickets.setdefault(name, deque())
        new = routed - book.routed.get(name, 0)
        book.routed[name] = routed
        for _ in range(max(0, new)):
            ticket = pool.acquire(name)
            pool.connected(name, ticket, served=False)
            tickets.append(ticket)
        while len(tickets) > max(0, held):
            pool.release(name, tickets.popleft())


def release(pool: Pool, book: TrafficBook) -> None:
    """
    The worker is gone and its connections with it: release all it held.
    """
    for name, tickets in book.tickets.items():
        while tickets:
            ticket = tickets.popleft()
            if name in pool:
                pool.release(name, ticket)
    book.tickets.clear()
    book.routed.clear()


def viewFor(cluster: Cluster, book: TrafficBook) -> Tuple[str, List[ViewEntry]]:
    """
    The main pool as the worker whose traffic is C{book} should route on it.
    """
    entries: List[ViewEntry] = []
    for b in cluster.pool.snapshot():
        capacity = max(1, b.capacity)
        base = max(0, b.estimatedConnections - book.holding(b.name))
        extra = b.load - b.connections * b.cost
        # Workers route least-load on the main pool's costs; without one,
        # a connection costs 1/capacity there too.
        cost: Optional[float] = None if abs(b.cost * capacity - 1) < 1e-9 else b.cost
        step = round(b.ramp * RAMP_STEPS)
        entries.append(
            (b.name, b.host, b.port, b.state.value, b.weight, step, capacity, base, round(extra, 9), cost)
        )
    return cluster.policyName, entries


_ADMIN = {
    State.UP.value: AdminState.ENABLED,
    State.DRAINING.value: AdminState.DRAINING,
    State.DISABLED.value: AdminState.DISABLED,
}


def applyView(
    cluster: Cluster, policy: str, entries: List[ViewEntry], applied: Dict[str, tuple]
) -> None:
    """
    Make a worker's pool what the main process says, keeping the connections
    the worker holds: each backend's connections become C{base} plus those.

    C{applied} (kept by the caller, updated here) is the state and weight
    last taken from the main process for each backend: only what the main
    process changed is set again, so a backend this worker ejected (its
    passive health check is its own) stays out, and an idle cluster costs
    no re-indexing.
    """
    if policy != cluster.policyName:
        cluster.setPolicy(policy)
    pool = cluster.pool
    named = set()
    for name, host, port, state, weight, step, capacity, base, extra, cost in entries:
        named.add(name)
        if name not in pool:
            applied.pop(name, None)
            pool.register(name, host, port, capacity=capacity)
        else:
            now = pool.get(name)
            if (now.host, now.port, now.capacity) != (host, port, capacity):
                pool.register(name, host, port, capacity=capacity)
        now = pool.get(name)
        connections = base + now.active
        perConnection = 1.0 / capacity if cost is None else cost
        load = max(0.0, extra + connections * perConnection)
        if (now.connections, now.load, now.addedSinceReport, now.cost) != (
            connections, load, 0, perConnection
        ):
            pool.report(name, connections, load, seen=None, cost=cost)
        if applied.get(name) != (state, weight):
            applied[name] = (state, weight)
            if state == State.DOWN.value:
                pool.markDown(name)
            else:
                pool.markUp(name)
                pool.setAdminState(name, _ADMIN[state])
            pool.setWeight(name, weight)
        pool.setRamp(name, step)
    gone = [b.name for b in pool.snapshot() if b.name not in named]
    if gone:
        pool.removeMany(gone)
        for name in gone:
            applied.pop(name, None)


def trafficOf(pool: Pool, said: Dict[str, Tuple[int, int]]) -> Dict[str, List[int]]:
    """
    A worker's traffic to tell the main process: C{name: [routed, held]} for
    each backend whose figures changed since C{said} (updated in place).
    """
    out: Dict[str, List[int]] = {}
    for b in pool.snapshot():
        figures = (b.routed, b.active)
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
