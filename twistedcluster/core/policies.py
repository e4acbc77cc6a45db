"""
Routing policies: which eligible backend gets the next connection.

Pure functions of a pool snapshot (a sequence of L{BackendStatus}) and a
random source.  Round-robin keeps a cursor, so every policy is an object with
one method, C{choose}; the others are stateless.

L{twistedcluster.core.cluster.Cluster.pick} hands a policy the pool's live
L{twistedcluster.core.pool.Candidates}; least-load, least-conn and
round-robin then ask its index (L{Candidates.lowest}) for the lowest score
instead of scanning every backend, so a pick costs about log(backends).
Given any other sequence they scan it, as before.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, Optional, Sequence

from twistedcluster.core.pool import BackendStatus

__all__ = [
    "DEFAULT_POLICY",
    "LeastConn",
    "LeastLoad",
    "POLICIES",
    "RoundRobin",
    "UnknownPolicy",
    "estimatedLoad",
    "relayedLoad",
    "makePolicy",
]


class UnknownPolicy(ValueError):
    """
    No policy has that name.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}"
        )
        self.name = name


def _lowest(
    candidates: Sequence[BackendStatus],
    score: Callable[[BackendStatus], float],
    rng: random.Random,
) -> Optional[BackendStatus]:
    """
    The candidate with the lowest score, ties broken at random so that
    balancers that see the same reports do not all pick the same backend.
    """
    if len(candidates) == 1:  # the common small case, without the lists
        only = candidates[0]
        return only if only.weight > 0 else None
    usable = [c for c in candidates if c.weight > 0]
    if not usable:
        return None
    scores = list(map(score, usable))
    low = min(scores) + 1e-12
    best = [c for c, s in zip(usable, scores) if s <= low]
    if len(best) == 1:
        return best[0]
    return best[rng.randrange(len(best))]


def estimatedLoad(b: BackendStatus) -> float:
    """
    The backend's load as least-load sees it: its last report, plus what this
    balancer has added to it that the report had not seen (each connection
    1/capacity), never less than what this balancer relays to it now; per
    unit weight.
    """
    capacity = b.capacity
    return max(b.load + b.addedSinceReport / capacity, b.active / capacity, 0.0) / b.weight


def relayedLoad(b: BackendStatus) -> float:
    """
    The connections this balancer relays to the backend, per unit weight:
    what least-conn sees.
    """
    return b.active / b.weight


class LeastLoad:
    """
    Route to the backend with the lowest estimated load (the default).

    Reports are always a little stale; adding what this balancer routed since
    the last report keeps a burst of new connections from all landing on the
    backend that looked idle a second ago.
    """

    name = "least-load"

    def choose(
        self, candidates: Sequence[BackendStatus], rng: random.Random
    ) -> Optional[BackendStatus]:
        indexed = getattr(candidates, "lowest", None)
        if indexed is not None:
            return indexed(estimatedLoad, rng)
        return _lowest(candidates, estimatedLoad, rng)


class LeastConn:
    """
    Route to the backend with the fewest connections relayed by this
    balancer, per unit weight (HAProxy's leastconn).  Ignores reports, so it
    suits backends shared with nobody else, or static ones.
    """

    name = "least-conn"

    def choose(
        self, candidates: Sequence[BackendStatus], rng: random.Random
    ) -> Optional[BackendStatus]:
        indexed = getattr(candidates, "lowest", None)
        if indexed is not None:
            return indexed(relayedLoad, rng)
        return _lowest(candidates, relayedLoad, rng)


class RoundRobin:
    """
    Smooth weighted round-robin: each backend in turn, in proportion to its
    weight, interleaved (weights 5,1,1 give a a b a c a a, not a a a a a b c).

    On the pool's L{Candidates} it is stride scheduling instead (the same
    shares, in log(backends) per pick): each backend has a pass, the
    lowest pass is chosen and moves on by 1/weight; a backend that joins
    (or comes back) starts at the pass of the last one chosen; ties go in
    name order.  Over whole
    rounds of sum(weights) picks each backend gets its weight's share to
    within one.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._current: Dict[str, int] = {}
        #: Stride scheduling on an index: each backend's pass, and the
        #: pass of the last one chosen.
        self._pass: Dict[str, float] = {}
        self._now = 0.0

    def _passOf(self, b: BackendStatus) -> float:
        passes = self._pass
        p = passes.get(b.name)
        if p is None or p < self._now:
            p = passes[b.name] = self._now
        return p

    def choose(
        self, candidates: Sequence[BackendStatus], rng: random.Random
    ) -> Optional[BackendStatus]:
        indexed = getattr(candidates, "lowest", None)
        if indexed is not None:
            return self._stride(candidates, indexed, rng)
        if not candidates:
            return None
        current = self._current
        names = {c.name for c in candidates}
        for gone in [n for n in current if n not in names]:
            del current[gone]
        total = 0
        best: Optional[BackendStatus] = None
        for c in candidates:
            if c.weight <= 0:
                continue
            value = current.get(c.name, 0) + c.weight
            current[c.name] = value
            total += c.weight
            if best is None or value > current[best.name]:
                best = c
        if best is None:
            return None
        current[best.name] -= total
        return best

    def _stride(self, candidates, indexed, rng: random.Random) -> Optional[BackendStatus]:
        chosen = indexed(self._passOf, rng, randomTies=False)  # name order, as ever
        if chosen is None:
            return None
        passes = self._pass
        self._now = now = passes.get(chosen.name, self._now)
        passes[chosen.name] = now + 1.0 / chosen.weight
        candidates.rescore(self._passOf, chosen.name)
        if len(passes) > 2 * len(candidates) + 64:
            # Forget the passes of backends no longer eligible.
            self._pass = {n: p for n, p in passes.items() if candidates.get(n) is not None}
        return chosen


#: Policies by the name used in ``--policy`` and ``cluster-admin policy``.
POLICIES: Dict[str, Callable[[], object]] = {
    LeastLoad.name: LeastLoad,
    LeastConn.name: LeastConn,
    RoundRobin.name: RoundRobin,
}

DEFAULT_POLICY = LeastLoad.name


def makePolicy(name: str):
    """
    A new policy object for C{name}; L{UnknownPolicy} if there is none.
    """
    try:
        factory = POLICIES[name]
    except KeyError:
        raise UnknownPolicy(name) from None
    return factory()
