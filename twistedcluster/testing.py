"""
In-memory balancer for tests, ours and yours (like C{treq.testing}).

L{MemoryBalancer} is a real balancer core — L{Cluster}, control and admin
protocols — on a C{task.Clock}, with channels connected through Twisted's
C{iosim} instead of sockets.  Its L{MemoryBalancer.endpoint} is a client
endpoint that a backend's L{LoadReporter} can use as it would a real one.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim
from zope.interface import implementer

from twistedcluster.balancer.admin import AdminFactory
from twistedcluster.core.cluster import Cluster
from twistedcluster.balancer.control import DEFAULT_FORGET_AFTER, ControlFactory
from twistedcluster.wire.guardedamp import GuardedAMP

__all__ = [
    "MemoryBalancer",
]


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, balancer: "MemoryBalancer") -> None:
        self.balancer = balancer

    def connect(self, factory):
        if not self.balancer.accepting:
            return defer.fail(ConnectionRefusedError("memory balancer is not accepting"))
        client = factory.buildProtocol(None)
        server = self.balancer.control.buildProtocol(None)
        self.balancer._connect(server, client)
        return defer.succeed(client)


class MemoryBalancer:
    """
    A balancer with no sockets.

    @ivar accepting: set to C{False} to make L{endpoint} refuse connections
        (a balancer that is down).
    """

    def __init__(
        self,
        policy: str = "least-load",
        clock: Optional[Clock] = None,
        heartbeatTimeout: Optional[float] = None,
        seed: int = 0,
        secret: Optional[bytes] = None,
        forgetAfter: float = DEFAULT_FORGET_AFTER,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.cluster = Cluster(policy=policy, rng=random.Random(seed))
        self.control = ControlFactory(
            self.cluster, self.clock, heartbeatTimeout, secret=secret,
            forgetAfter=forgetAfter,
        )
        self.admin = AdminFactory(self.cluster, self.clock, secret=secret)
        self.accepting = True
        self.pumps: List[iosim.IOPump] = []

    @property
    def pool(self):
        return self.cluster.pool

    def _connect(self, server, client) -> iosim.IOPump:
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        return pump

    def endpoint(self) -> IStreamClientEndpoint:
        """
        A client endpoint that connects to this balancer's control listener.
        """
        return _MemoryEndpoint(self)

    def controlChannel(
        self, client: Optional[amp.AMP] = None
    ) -> Tuple[amp.AMP, object, iosim.IOPump]:
        """
        A connected control channel: (client protocol, server protocol, pump).
        """
        client = client if client is not None else GuardedAMP()
        server = self.control.buildProtocol(None)
        return client, server, self._connect(server, client)

    def adminChannel(self) -> Tuple[amp.AMP, object, iosim.IOPump]:
        """
        A connected admin channel: (client protocol, server protocol, pump).
        """
        client = GuardedAMP()
        server = self.admin.buildProtocol(None)
        return client, server, self._connect(server, client)

    def flush(self) -> None:
        """
        Deliver everything in flight on every channel.
        """
        for _ in range(10):
            if not any([p.flush() for p in self.pumps]):
                break
        self.pumps = [
            p
            for p in self.pumps
            if not (p.clientIO.disconnected and p.serverIO.disconnected)
        ]

    def resultOf(self, d: defer.Deferred):
        """
        Flush every channel and return what C{d} fired with (a C{Failure} if
        it failed).  Attach it as soon as the call is made: AMP drops a
        channel whose error nobody handles.
        """
        out: list = []
        d.addBoth(out.append)
        self.flush()
        assert out, "the call got no answer"
        return out[0]
