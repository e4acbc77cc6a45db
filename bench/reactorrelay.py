"""
python-floor's relay hosted on Twisted's reactor: a reference for
bench/run.py's nginx part (target C{reactor-relay}, run when named in
C{--targets}), not a product.

    python bench/reactorrelay.py LISTEN_PORT BACKEND_PORT [HOST]

The same work per connection as bench/floorrelay.py (non-blocking sockets,
C{recv} and C{send}, back-pressure, half-close), but each socket is a
descriptor of the balancer's lean epoll reactor (C{addReader},
C{removeReader}, C{addWriter}, C{removeWriter}, its poll loop and dispatch)
instead of a loop of its own; no Twisted transport, protocol or factory.
Between python-floor and twisted-relay it tells what Twisted's reactor
costs per connection, apart from its transports (issue 16, item 2): how
close a relay of our own on Twisted's reactor could come to the floor.
"""

from __future__ import annotations

import socket

from floorrelay import acceptPairs, listen, runScript


class Side:
    """
    One socket of a relayed pair, as the reactor's descriptor.
    """

    __slots__ = ("sock", "fd", "peer", "reactor", "pending", "eof", "paused", "closed")

    def __init__(self, reactor, sock: socket.socket) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: "Side" = None  # type: ignore[assignment]
        self.pending = b""
        self.eof = False
        self.paused = False
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "relay"

    def connectionLost(self, reason) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        self.sock.close()
        self.peer.close()

    def doRead(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            self.close()  # a reset, or a connect refused: both sides go
            return None
        peer = self.peer
        if data:
            if peer.pending:
                peer.pending += data
                self._pause()
                return None
            try:
                sent = peer.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return None
            if sent < len(data):
                peer.pending = data[sent:]
                self.reactor.addWriter(peer)
                self._pause()
            return None
        # End of input: pass it on once the peer has what came before.
        self.eof = True
        self.reactor.removeReader(self)
        if peer.eof:
            self.close()
        elif not peer.pending:
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()
        return None

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.reactor.removeReader(self)

    def doWrite(self):
        data = self.pending
        if data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                return None
            except OSError:
                self.close()
                return None
            if sent < len(data):
                self.pending = data[sent:]
                return None
            self.pending = b""
        self.reactor.removeWriter(self)
        peer = self.peer
        if peer.eof:
            if self.eof:
                self.close()
                return None
            self.sock.shutdown(socket.SHUT_WR)
        elif peer.paused:
            peer.paused = False
            self.reactor.addReader(peer)
        return None


class Connecting(Side):
    """
    The backend's side until its connect is done: writable means done (or
    failed: the first C{recv} says so).
    """

    __slots__ = ()

    def doWrite(self):
        self.__class__ = Side
        self.reactor.addReader(self)
        return Side.doWrite(self)


class Listener:
    def __init__(self, reactor, sock: socket.socket, backend) -> None:
        self.reactor = reactor
        self.sock = sock
        self.backend = backend

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "listener"

    def connectionLost(self, reason) -> None:
        self.sock.close()

    def doRead(self):
        reactor = self.reactor
        for client, server in acceptPairs(self.sock, self.backend):
            self.pair(Side(reactor, client), Connecting(reactor, server))
        return None

    def pair(self, c: Side, b: "Connecting") -> None:
        """
        Relay client side C{c} and backend side C{b}, whose connect is under
        way: the client is read once the backend is connected (its first
        bytes wait in the kernel meanwhile).
        """
        c.peer, b.peer = b, c
        c.paused = True
        self.reactor.addWriter(b)


def serve(listener) -> None:
    """
    Run the balancer's lean reactor with C{listener(reactor)} on it, until
    stopped.
    """
    from twistedcluster.fast.reactor import installIfNone

    installIfNone()
    from twisted.internet import reactor

    reactor.addReader(listener(reactor))
    reactor.run()


def main(listenPort: int, backendPort: int, host: str = "127.0.0.1") -> None:
    serve(lambda reactor: Listener(reactor, listen(host, listenPort), (host, backendPort)))


if __name__ == "__main__":
    runScript(main, __doc__)
