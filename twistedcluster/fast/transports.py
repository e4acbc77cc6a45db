"""
What the balancer reads off a Twisted transport (who is on the other end,
and how much it still holds unsent), and how it ends one direction of any
transport, TLS included.
"""

from twistedcluster.fast.internals import fastPaths, tlsCloseNotify, tlsLayer, unsent


def peerText(transport) -> str:
    """
    The peer of C{transport} for log lines: ``host:port``, a unix socket's
    name, or ``?`` when there is no telling.
    """
    if transport is None:
        return "?"
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(getattr(peer, "name", None) or peer)


def unsentBytes(transport) -> int:
    """
    Bytes a Twisted file-descriptor transport holds that it has not sent
    yet; 0 for a transport that cannot say (a TLS wrapper, a test fake).
    """
    return unsent(transport)


def showProxied(transport, source, destination) -> None:
    """
    Make C{transport.getPeer()} and C{getHost()} answer what a PROXY header
    said (the client, and the address it connected to), as Twisted's
    C{haproxy:} wrapper does, while the protocol keeps the real transport
    (its fast paths, half-close, producers).  Everything that asks the
    transport who the client is (log lines, the hash policy, a service's own
    code) then sees the client.
    """
    transport.getPeer = lambda: source
    transport.getHost = lambda: destination


def readWaiting(transport, limit: int = 65536) -> bytes:
    """
    What a plain TCP transport's client has already sent and the reactor
    has not read yet, read now (C{b""} when nothing is waiting, or the
    socket has ended: the reactor then sees that as usual, on its own
    turn).  An error (a reset) ends the connection as a reset
    (C{abortConnection}), as L{twistedcluster.fast.internals.readNow}
    does: the socket reports it once, so the reactor would see only the
    end-of-file that follows, a clean close.

    For the PROXY header: sent together with the client's first bytes it
    costs no send of its own and no TCP segment of its own.
    """
    try:
        return transport.getHandle().recv(limit)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        transport.abortConnection()
        return b""


def endWrites(transport) -> None:
    """
    Half-close C{transport}: nothing more is sent, and what comes is still
    read.  Over TLS that is a close_notify alert: Twisted's
    C{loseWriteConnection} would shut the TCP connection down beneath TLS,
    which the peer reads as a truncated stream, not an end.  Where TLS
    cannot say it now (before its handshake is over), the connection is
    closed instead.
    """
    layer = tlsLayer(transport)
    if layer is None:
        transport.loseWriteConnection()
    elif not (fastPaths() and tlsCloseNotify(layer)):
        transport.loseConnection()
