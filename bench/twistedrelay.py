"""
The balancer's relay with nothing around it: a reference for bench/run.py's
nginx part (target C{twisted-relay}), not a product.

    python bench/twistedrelay.py LISTEN_PORT BACKEND_PORT [HOST]

What the balancer's proxy path is built of, and no more: the lean epoll
reactor, Twisted's C{tcp.Port} and transports, the listener's lean accept
(L{twistedcluster.fast.fasttcp.prepareListener}), the dialer's connect
(L{twistedcluster.fast.fasttcp.Dialled}) and the relay
(L{twistedcluster.balancer.relay.Relay}: fast sends, half-close,
producers).  No pool, routing, limits, retries, timeouts, accounting,
PROXY header, logs or metrics.  Beside python-floor (no framework) and the
balancer it splits the balancer's CPU per connection into what Python
costs, what Twisted's transports add, and what the balancer's own work per
connection adds (issue 16, item 2).
"""

from __future__ import annotations


def main(listenPort: int, backendPort: int, host: str = "127.0.0.1") -> None:
    from twistedcluster.fast.reactor import installIfNone

    installIfNone()
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    from twistedcluster.balancer.relay import Relay
    from twistedcluster.fast.fasttcp import Dialled, prepareListener

    class BackendSide(Relay):
        client: "ClientSide"

        def connectionMade(self) -> None:
            client = self.client
            if client.transport is None or not client.transport.connected:
                self.transport.loseConnection()
                return
            client.link(self)
            client.transport.resumeProducing()

    class ClientSide(Relay):
        def connectionMade(self) -> None:
            # Read nothing until the backend is there to take it.
            self.transport.pauseProducing()
            backend = BackendSide()
            backend.client = self
            Dialled(reactor, host, backendPort, backend, 10.0, self._failed).dial()

        def _failed(self, reason) -> None:
            self.transport.abortConnection()

    factory = Factory.forProtocol(ClientSide)
    factory.noisy = False
    port = reactor.listenTCP(listenPort, factory, backlog=1024, interface=host)
    prepareListener(port)
    reactor.run()


if __name__ == "__main__":
    from floorrelay import runScript

    runScript(main, __doc__)
