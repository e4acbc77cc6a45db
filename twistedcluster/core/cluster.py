"""
The balancer's routing brain: a pool, the current policy and a random source.

Pure core, like the pool and the policies: the proxy and redirect listeners
ask it for a backend, the admin protocol changes its policy.
"""

from __future__ import annotations

import random
from typing import AbstractSet, Optional

from twistedcluster.core.policies import DEFAULT_HASH_BALANCE, DEFAULT_POLICY, makePolicy
from twistedcluster.core.pool import BackendStatus, Pool, State

__all__ = [
    "Cluster",
    "Route",
]


class Route:
    """
    A new connection routed to a backend (made once per connection: a plain
    slotted class, cheaper to make than an attrs one).

    @ivar backend: the backend's status when it was chosen.
    @ivar ticket: the connection's ticket in the pool, to hand back to
        C{pool.connected}, C{connectFailed}, C{release} or C{handOff}.
    """

    __slots__ = ("backend", "ticket", "name", "host", "port")

    def __init__(self, backend: BackendStatus, ticket: int) -> None:
        self.backend = backend
        self.ticket = ticket
        self.name = backend.name
        self.host = backend.host
        self.port = backend.port

    def __repr__(self) -> str:
        return f"Route({self.name!r}, ticket={self.ticket})"


class Cluster:
    """
    Picks a backend for each new connection.

    @ivar pool: the backends.
    @ivar policyName: the name of the policy in force.
    @ivar keyed: whether that policy routes on the client's key (hash):
        callers work the key out for L{pick} only then.
    @ivar hashBalance: the hash policy's bound factor, kept for when an
        operator switches to it.
    @ivar chosenPolicy: the policy an operator chose at runtime (C{setPolicy}
        with C{chosen}), which a restart keeps; C{None} while the policy is
        the configured one, which a restart with another C{--policy}
        replaces.
    """

    def __init__(
        self,
        pool: Optional[Pool] = None,
        policy: str = DEFAULT_POLICY,
        rng: Optional[random.Random] = None,
        hashBalance: float = DEFAULT_HASH_BALANCE,
    ) -> None:
        self.pool = pool if pool is not None else Pool()
        self.rng = rng if rng is not None else random.Random()
        self.hashBalance = hashBalance
        self.policyName = policy
        self._policy = makePolicy(policy, hashBalance=hashBalance)
        self.keyed = getattr(self._policy, "keyed", False)
        self.chosenPolicy: Optional[str] = None

    def setPolicy(self, name: str, chosen: bool = False) -> None:
        """
        Switch policy; L{UnknownPolicy} leaves the current one in force.

        @param chosen: an operator chose it (or chose it before a restart):
            it is kept across restarts (L{chosenPolicy}).
        """
        self._policy = makePolicy(name, hashBalance=self.hashBalance)
        self.policyName = name
        self.keyed = getattr(self._policy, "keyed", False)
        if chosen:
            self.chosenPolicy = name

    def pick(
        self, exclude: AbstractSet[str] = frozenset(), key: Optional[str] = None
    ) -> Optional[Route]:
        """
        Choose a backend for a new connection and count it as routed there
        (the caller reports back with C{pool.connected}, C{connectFailed},
        C{release} or C{handOff}, with the route's ticket).  C{None} when no
        backend may take it.

        @param exclude: backends already tried for this connection.
        @param key: the client's key (its address), for a policy that routes
            on it (L{keyed}); others never see it.
        """
        candidates = self.pool.candidates(exclude)
        if key is not None and self.keyed:
            chosen = self._policy.choose(candidates, self.rng, key)
        else:
            chosen = self._policy.choose(candidates, self.rng)
        if chosen is None:
            return None
        return Route(chosen, self.pool.acquire(chosen.name))

    def pickUncounted(self, key: Optional[str] = None) -> Optional[BackendStatus]:
        """
        Choose a backend at random among those that may take a new
        connection, counting nothing: for an answer that must not use up
        capacity (a redirect client past its share, which may never come).
        With a keyed policy and a key, the key's backend instead, so the
        client keeps its backend.
        """
        candidates = self.pool.candidates()  # all with a weight
        if key is not None and self.keyed:
            return self._policy.choose(candidates, self.rng, key)
        if not candidates:
            return None
        return candidates[self.rng.randrange(len(candidates))]

    def pickBeyondShare(self, key: Optional[str] = None, counted: bool = True):
        """
        For a redirect answer in a worker whose shares (L{Pool.setQuota})
        left it no backend: one at random among those up with room.  For an
        answer that counts nothing (past its source's share), which needs
        no share; or, C{counted}, for one that cannot wait for a share.  A
        L{Route} when C{counted}, else the backend's status; C{None} when
        none has room.
        """
        room = [
            b
            for b in self.pool.snapshot()
            if b.state is State.UP and b.weight > 0 and b.estimatedConnections < b.capacity
        ]
        if not room:
            return None
        chosen = room[self.rng.randrange(len(room))]
        return Route(chosen, self.pool.acquire(chosen.name)) if counted else chosen

    def noRoomOnly(self, exclude: AbstractSet[str] = frozenset()) -> bool:
        """
        Whether no backend (but those in C{exclude}, already tried) may take
        a new connection only because every one that could is at capacity
        (rather than down, drained or absent): then a client may wait for
        room.
        """
        return not self.pool.candidates(exclude) and any(
            b.full for b in self.pool.snapshot() if b.state is State.UP and b.weight > 0 and b.name not in exclude
        )

    def roomElsewhere(self, exclude: AbstractSet[str] = frozenset()) -> bool:
        """
        Whether some backend (not in C{exclude}) that this pool finds full
        has room, only not in this worker's share of it (C{--workers}): the
        share moves to where clients wait within a sync interval or two, so
        a client may wait for it even where the queue would refuse it.
        """
        return any(
            b.quota is not None and b.estimatedConnections < b.capacity and b.name not in exclude
            for b in self.pool.snapshot()
            if b.state is State.UP and b.weight > 0
        )
