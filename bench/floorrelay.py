"""
The floor of a TCP relay in Python: the least Python a proxy can run per
connection and per message, as a reference for bench/run.py's nginx part
(target C{python-floor}), not a product.

    python bench/floorrelay.py LISTEN_PORT BACKEND_PORT [HOST]

One process, one thread, the standard library only: a level-triggered
epoll loop over non-blocking sockets; each accepted client gets a new
connection to the backend, and bytes go both ways with C{recv} and C{send}
as they come.  What a relay must do and nothing more: back-pressure (a
side whose peer cannot take more stops being read, what is left waits for
the peer to be writable), half-close (end of input becomes a write shutdown
on the peer), and a reset or a failed connect closes both sides.  No
framework, no routing, no logging, no limits, no timeouts: every Python
proxy does at least this much per connection, whatever else it does, so
its CPU per new connection and per request measure what Python itself
costs beside HAProxy (issue 16, item 2).
"""

from __future__ import annotations

import errno
import select
import socket
import sys

IN, OUT = select.EPOLLIN, select.EPOLLOUT
READ_SIZE = 65536


def listen(host: str, port: int) -> socket.socket:
    """
    A non-blocking listening socket; Linux copies its TCP_NODELAY to every
    socket it accepts (as HAProxy does).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((host, port))
    listener.listen(1024)
    listener.setblocking(False)
    return listener


def acceptClients(listener: socket.socket, most: int = 64):
    """
    Up to C{most} clients waiting on C{listener}, each a non-blocking
    socket; stops early when none is left, or when the process is out of
    descriptors or memory (the rest wait in the kernel's queue).
    """
    for _ in range(most):
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return
            continue
        client.setblocking(False)
        yield client


def dial(backend):
    """
    A non-blocking socket whose connect to C{backend} is under way (or
    done), or C{None} when the connect failed at once.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = server.connect_ex(backend)
    if err not in (0, errno.EINPROGRESS):
        server.close()
        return None
    return server


def acceptPairs(listener: socket.socket, backend, most: int = 64):
    """
    Up to C{most} clients waiting on C{listener}, each yielded with a
    non-blocking socket whose connect to C{backend} is under way (or done).
    """
    for client in acceptClients(listener, most):
        server = dial(backend)
        if server is None:
            client.close()
            continue
        yield client, server


def runScript(main, doc: str) -> None:
    """
    C{main(LISTEN_PORT, BACKEND_PORT[, HOST])} from the command line.
    """
    a = sys.argv[1:]
    if len(a) not in (2, 3):
        raise SystemExit(doc)
    main(int(a[0]), int(a[1]), *a[2:])


def main(listenPort: int, backendPort: int, host: str = "127.0.0.1") -> None:
    listener = listen(host, listenPort)
    backend = (host, backendPort)
    poller = select.epoll()
    lfd = listener.fileno()
    poller.register(lfd, IN)
    socks = {}  # fd -> socket
    peers = {}  # fd -> the peer's fd
    pending = {}  # fd -> bytes waiting to be written to it
    eof = set()  # fds whose input has ended
    paused = set()  # fds not read while their peer's pending data waits
    register, modify = poller.register, poller.modify

    def close(fd: int) -> None:
        s = socks.pop(fd, None)
        if s is None:
            return
        peer = peers.pop(fd, None)
        pending.pop(fd, None)
        eof.discard(fd)
        paused.discard(fd)
        s.close()  # also takes it out of epoll
        if peer is not None:
            close(peer)

    def flushed(fd: int) -> None:
        # Nothing is waiting for fd: read its peer again, or pass on the end.
        peer = peers[fd]
        if peer in eof:
            if fd in eof:
                close(fd)
                return
            socks[fd].shutdown(socket.SHUT_WR)
            modify(fd, IN)
        else:
            modify(fd, 0 if fd in eof else IN)
            if peer in paused:
                paused.discard(peer)
                modify(peer, IN)

    def send(fd: int, data: bytes) -> None:
        try:
            sent = socks[fd].send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            pending[fd] = data[sent:]
            modify(fd, OUT if fd in eof else IN | OUT)
            source = peers[fd]
            if source not in paused:  # back-pressure: stop reading it
                paused.add(source)
                modify(source, 0)

    while True:
        for fd, event in poller.poll():
            if fd == lfd:
                for client, server in acceptPairs(listener, backend):
                    c, b = client.fileno(), server.fileno()
                    socks[c], socks[b] = client, server
                    peers[c], peers[b] = b, c
                    register(c, IN)
                    # Writable once connected: what the client sent first
                    # waits for that (pending), as any write would.
                    pending[b] = b""
                    register(b, IN | OUT)
                continue
            s = socks.get(fd)
            if s is None:
                continue
            if event & OUT:
                data = pending.get(fd)
                if data is not None:
                    try:
                        sent = s.send(data) if data else 0
                    except BlockingIOError:
                        continue
                    except OSError:
                        close(fd)
                        continue
                    if sent < len(data):
                        pending[fd] = data[sent:]
                        continue
                    del pending[fd]
                    flushed(fd)
                    if fd not in socks:
                        continue
            if event & (IN | select.EPOLLHUP | select.EPOLLERR):
                if fd in eof:
                    # Its input is over (read no more): a hang-up now ends it.
                    if event & (select.EPOLLHUP | select.EPOLLERR):
                        close(fd)
                    continue
                try:
                    data = s.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    close(fd)  # a reset, or a connect refused: both sides go
                    continue
                peer = peers[fd]
                if data:
                    if peer in pending:
                        pending[peer] += data
                        if fd not in paused:
                            paused.add(fd)
                            modify(fd, 0)
                    else:
                        try:
                            send(peer, data)
                        except OSError:
                            close(fd)
                    continue
                # End of input: pass it on once the peer has what came before.
                eof.add(fd)
                if peer in eof:
                    close(fd)
                    continue
                modify(fd, 0)
                if peer not in pending:
                    try:
                        socks[peer].shutdown(socket.SHUT_WR)
                    except OSError:
                        close(fd)


if __name__ == "__main__":
    runScript(main, __doc__)
