"""
The balancer's routing brain: a pool, the current policy and a random source.

Pure core, like the pool and the policies: the proxy and redirect listeners
ask it for a backend, the admin protocol changes its policy.
"""

from __future__ import annotations

import random
from typing import AbstractSet, Optional

from twistedcluster.policies import DEFAULT_POLICY, makePolicy
from twistedcluster.pool import BackendStatus, Pool


class Cluster:
    """
    Picks a backend for each new connection.

    @ivar pool: the backends.
    @ivar policyName: the name of the policy in force.
    """

    def __init__(
        self,
        pool: Optional[Pool] = None,
        policy: str = DEFAULT_POLICY,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.pool = pool if pool is not None else Pool()
        self.rng = rng if rng is not None else random.Random()
        self.policyName = policy
        self._policy = makePolicy(policy)

    def setPolicy(self, name: str) -> None:
        """
        Switch policy; L{UnknownPolicy} leaves the current one in force.
        """
        self._policy = makePolicy(name)
        self.policyName = name

    def pick(self, exclude: AbstractSet[str] = frozenset()) -> Optional[BackendStatus]:
        """
        Choose a backend for a new connection and count it as routed there
        (the caller reports back with C{pool.connected}, C{connectFailed} and
        C{release}).  C{None} when no backend may take it.

        @param exclude: backends already tried for this connection.
        """
        candidates = self.pool.eligible()
        if exclude:
            candidates = tuple(c for c in candidates if c.name not in exclude)
        chosen = self._policy.choose(candidates, self.rng)
        if chosen is not None:
            self.pool.acquire(chosen.name)
        return chosen
