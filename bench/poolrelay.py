"""
reactor-relay with every connection routed by the balancer's real pool: the
least a least-load balancer on Twisted's reactor can cost, as a reference
for bench/run.py's nginx part (target C{pool-relay}, run with
C{--reactor-relay}), not a product.

    python bench/poolrelay.py LISTEN_PORT BACKEND_PORT [HOST]

bench/reactorrelay.py's relay (the reactor's descriptors, C{recv} and
C{send}, back-pressure, half-close) with the work no least-load balancer
can skip: each accepted client is routed by
L{twistedcluster.core.cluster.Cluster.pick} to the one static backend
(least-load, as the balancer's default), its connect is accounted with
C{pool.connected} (or C{connectFailed}), and its close with
C{pool.release}, so the next pick sees the load.  No limits, timeouts,
health checks, logs or metrics: every least-load balancer does at least
this much.  Its CPU per new connection against HAProxy's says whether
issue 16's targets for new connections are within reach of such a
balancer in Python at all, in the same run.
"""

from __future__ import annotations

import socket

from floorrelay import acceptClients, dial, listen, runScript
from reactorrelay import Connecting, Listener, Side, serve

from twistedcluster.balancer.staticbackend import DEFAULT_STATIC_CAPACITY
from twistedcluster.core.cluster import Cluster


class RoutedSide(Side):
    """
    The client's side: its close hands the route back to the pool, once.
    """

    __slots__ = ("pool", "route")

    def close(self) -> None:
        if self.closed:
            return
        route, self.route = self.route, None
        if route is not None:
            self.pool.release(route.name, route.ticket)
        Side.close(self)


class RoutedConnecting(Connecting):
    """
    The backend's side until its connect is done: done is accounted with
    C{pool.connected}, failed (the reactor's connectionLost before any
    write) with C{connectFailed}, as the balancer accounts them.
    """

    __slots__ = ()

    def doWrite(self):
        client = self.peer
        client.pool.connected(client.route.name, client.route.ticket, served=True)
        return Connecting.doWrite(self)

    def connectionLost(self, reason) -> None:
        client = self.peer
        route, client.route = client.route, None
        if route is not None:
            client.pool.connectFailed(route.name, route.ticket)
        self.close()


class RoutingListener(Listener):
    """
    reactor-relay's listener, each client routed by C{cluster}'s pool.
    """

    def __init__(self, reactor, sock: socket.socket, cluster: Cluster) -> None:
        Listener.__init__(self, reactor, sock, None)
        self.cluster = cluster

    def doRead(self):
        reactor, cluster = self.reactor, self.cluster
        pool = cluster.pool
        for client in acceptClients(self.sock):
            route = cluster.pick()
            if route is None:
                client.close()
                continue
            server = dial((route.host, route.port))
            if server is None:
                pool.connectFailed(route.name, route.ticket)
                client.close()
                continue
            c = RoutedSide(reactor, client)
            c.pool, c.route = pool, route
            self.pair(c, RoutedConnecting(reactor, server))
        return None


def main(listenPort: int, backendPort: int, host: str = "127.0.0.1") -> None:
    cluster = Cluster(policy="least-load")
    cluster.pool.register(
        "nginx", host, backendPort, capacity=DEFAULT_STATIC_CAPACITY, static=True
    )
    serve(lambda reactor: RoutingListener(reactor, listen(host, listenPort), cluster))


if __name__ == "__main__":
    runScript(main, __doc__)
