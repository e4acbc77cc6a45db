"""
reactor-relay with the least routing a balancer can do, as a reference for
bench/run.py's nginx part (target C{count-relay}, run with
C{--reactor-relay}), not a product.

    python bench/countrelay.py LISTEN_PORT BACKEND_PORT [HOST]

bench/reactorrelay.py's relay, each accepted client routed least-conn by a
dict of connection counts: the backend with the fewest (min over the
dict), counted up at accept and down at close.  None of the pool's work
(bench/poolrelay.py): no capacity, weights, health, slow start, nor the
tickets that reconcile backends' reports with what was routed.  Between
reactor-relay and pool-relay it tells what routing at all costs a live
relay, and what the pool's features cost beyond that (issue 16, item 2).
"""

from __future__ import annotations

import socket
from typing import Dict, Tuple

from floorrelay import acceptClients, dial, listen, runScript
from reactorrelay import Connecting, Listener, Side, serve


class CountedSide(Side):
    """
    The client's side: its close counts its backend down, once.
    """

    __slots__ = ("counts", "name")

    def close(self) -> None:
        if self.closed:
            return
        name, self.name = self.name, None
        if name is not None:
            self.counts[name] -= 1
        Side.close(self)


class CountingListener(Listener):
    """
    reactor-relay's listener, each client sent to the backend of C{backends}
    (name: address) with the fewest connections.
    """

    def __init__(self, reactor, sock: socket.socket, backends: Dict[str, Tuple[str, int]]) -> None:
        Listener.__init__(self, reactor, sock, None)
        self.backends = backends
        self.counts = {name: 0 for name in backends}

    def doRead(self):
        reactor, counts, backends = self.reactor, self.counts, self.backends
        for client in acceptClients(self.sock):
            name = min(counts, key=counts.get)
            server = dial(backends[name])
            if server is None:
                client.close()
                continue
            counts[name] += 1
            c = CountedSide(reactor, client)
            c.counts, c.name = counts, name
            self.pair(c, Connecting(reactor, server))
        return None


def main(listenPort: int, backendPort: int, host: str = "127.0.0.1") -> None:
    serve(lambda reactor: CountingListener(reactor, listen(host, listenPort), {"nginx": (host, backendPort)}))


if __name__ == "__main__":
    runScript(main, __doc__)
