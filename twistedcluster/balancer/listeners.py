"""
Listeners that hold a burst: a listen backlog as deep as the system allows.

Twisted's server endpoints default to a backlog of 50.  A burst of new
connections larger than that overflows the kernel's accept queue before the
reactor's next turn: Linux then drops the handshake's last packet, the
client believes it is connected, and its data waits for a retransmit (1 s,
then 2, 4...) or is never accepted at all; the balancer sees nothing and
logs nothing.  bench/backlog.py shows it with a burst of concurrent
connects to the proxy listener (its figures are in docs/benchmarks.md).

So every listener the project opens gets C{backlog=N}, with N the system's
own ceiling (C{net.core.somaxconn}: Linux caps any larger backlog at it),
unless its endpoint string names one.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Optional

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

from twistedcluster.address import endpointParts, parsedEndpoint

SOMAXCONN = "/proc/sys/net/core/somaxconn"
#: Linux's somaxconn since 5.4; used where the system does not say.
FALLBACK_BACKLOG = 4096

#: Server endpoint kinds that take a backlog, and the position among their
#: arguments where one may be given without its name.
_BACKLOG_POSITION: Dict[str, int] = {
    "tcp": 2,  # tcp:PORT:INTERFACE:BACKLOG
    "tcp6": 1,  # tcp6:PORT:BACKLOG:INTERFACE
    "unix": 2,  # unix:PATH:MODE:BACKLOG
    "ssl": 5,  # ssl:PORT:KEY:CERT:METHOD:INTERFACE:BACKLOG
    "tls": 2,  # tls:PATH:PORT:BACKLOG
    "mtls": 5,  # mtls:PORT:KEY:CERT:CAS:INTERFACE:BACKLOG
}
#: Kinds that wrap the endpoint string after their prefix.
_WRAPPERS = ("haproxy",)


def defaultBacklog(path: str = SOMAXCONN) -> int:
    """
    The deepest accept queue the system gives a listener: C{somaxconn}, or
    L{FALLBACK_BACKLOG} where it cannot be read.
    """
    try:
        with open(path) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return FALLBACK_BACKLOG
    return value if value > 0 else FALLBACK_BACKLOG


def withBacklog(description: str, backlog: Optional[int] = None) -> str:
    """
    C{description} with C{backlog=N} added (L{defaultBacklog} unless given),
    when it is a kind that takes one and does not name one already.

    A wrapping kind (C{haproxy:tcp:...}) passes its arguments to the endpoint
    it wraps, so the backlog goes there.  Other kinds are left as they are:
    C{systemd:} adopts a socket systemd made (its backlog is the socket
    unit's C{Backlog=}, SOMAXCONN by default), and a plugin's kind may not
    take one.
    """
    kind, args, kwargs = endpointParts(description)
    inner = description
    while kind.lower() in _WRAPPERS:
        inner = inner.split(":", 1)[1] if ":" in inner else ""
        kind, args, kwargs = endpointParts(inner)
    position = _BACKLOG_POSITION.get(kind.lower())
    if position is None or "backlog" in kwargs or len(args) > position:
        return description
    trailing = len(description) - len(description.rstrip("\\"))
    if trailing % 2:
        # Ends in an escape: a colon added would be part of the last value.
        return description
    if backlog is None:
        backlog = defaultBacklog()
    return f"{description}:backlog={backlog}"


@implementer(IStreamServerEndpoint)
class Noting:
    """
    An endpoint that tells C{onPort} the port it listens on.
    """

    def __init__(self, endpoint, onPort: Callable[[IListeningPort], None]) -> None:
        self.endpoint = endpoint
        self.onPort = onPort

    def listen(self, factory):
        def noted(port):
            self.onPort(port)
            return port

        return self.endpoint.listen(factory).addCallback(noted)


def listenerService(
    description: str,
    factory,
    reactor,
    onPort: Optional[Callable[[IListeningPort], None]] = None,
    role: str = "",
    endpoint: Optional[IStreamServerEndpoint] = None,
) -> StreamServerEndpointService:
    """
    C{strports.service} for C{description} with the burst backlog
    (L{withBacklog}); C{onPort} is told the listening port once there is one
    (to pause accepting, or watch its accept errors).  When it cannot
    listen, starting it raises L{ListenFailed} naming C{role}.  C{endpoint},
    when given, is listened on instead of C{description}'s (a socket
    inherited with C{--takeover}).
    """
    if endpoint is not None:
        # Not parsed: a systemd: string would look for the descriptors
        # systemd gave the first process, not this one.
        from twistedcluster.fast.internals import raiseListenFailures

        svc = StreamServerEndpointService(endpoint, factory)
        raiseListenFailures(svc)
    else:
        svc = parsedEndpoint(
            lambda r, d: strports.service(withBacklog(d), factory, reactor=r),
            reactor,
            description,
            # The option that names it: the proxy listener's is --listen.
            "--listen" if role == "proxy" else f"--{role}" if role else "a listener",
        )
    # strports' service raises a listen failure at start-up (twistd then
    # exits); said with the role and the endpoint as the operator wrote it.
    listen = svc.privilegedStartService

    def privilegedStartService() -> None:
        try:
            listen()
        except CannotListenError as e:
            raise explainListenError(role or "?", description, e) from None

    svc.privilegedStartService = privilegedStartService  # type: ignore[method-assign]
    if onPort is not None:
        svc.endpoint = Noting(svc.endpoint, onPort)
    return svc


class ListenFailed(Exception):
    """
    A listener could not open (its port taken, an interface this host does
    not have): said in one line at start-up, without a traceback (see
    L{quietListenFailures}).
    """


def explainListenError(role: str, description: str, e: CannotListenError) -> ListenFailed:
    """
    What to tell the operator when the C{role} listener at C{description}
    cannot listen: the endpoint as they wrote it and the system's reason.
    """
    why = e.socketError
    reason = getattr(why, "strerror", None) or str(why)
    text = f"cannot open the {role} listener {description}: {reason[:1].lower()}{reason[1:]}"
    if getattr(why, "errno", None) == 98:  # EADDRINUSE
        text += " (another process listens there: stop it, or choose another endpoint)"
    return ListenFailed(text)


def quietListenFailures(program: str) -> None:
    """
    Make an uncaught L{ListenFailed} at start-up one line,
    C{PROGRAM: cannot open ...}, instead of a forty-line traceback: in the
    log (where twistd -n shows it on standard output, and where a daemon's
    "look at log file" points), and also on the real standard error when the
    log goes to a file.  Other exceptions keep Python's traceback.
    """
    previous = sys.excepthook

    def hook(kind, value, tb) -> None:
        if not isinstance(value, ListenFailed):
            previous(kind, value, tb)
            return
        from twisted.logger import Logger

        from twistedcluster.hangup import logFiles

        line = f"{program}: {value}"
        Logger().critical("{line}", line=line)
        out = sys.__stderr__
        if logFiles() and out is not None:
            out.write(line + "\n")
            out.flush()

    sys.excepthook = hook


def proxyProtocolInner(description: str) -> Optional[str]:
    """
    For C{haproxy:INNER} (clients send a PROXY header first), C{INNER};
    C{None} for any other endpoint string.

    The balancer and the backend read that header themselves on the
    listener INNER describes, instead of Twisted's C{haproxy:} wrapper, which
    stands in for the transport (so no fast path and no half-close).
    """
    kind, sep, inner = description.partition(":")
    if sep and kind.strip().lower() in _WRAPPERS:
        return inner
    return None


def readsProxyHeader(description: str, who: str):
    """
    The endpoint string to listen on, and Twisted's PROXY header parsers when
    clients send one first (C{haproxy:INNER}): then C{who} (the balancer's
    proxy listener, the backend's connection counter) reads the header
    itself on INNER, keeping the real transport (its fast path, half-close).
    Should this Twisted lack the parsers, Twisted's own C{haproxy:} wrapper
    is used as it is, and a line says so.
    """
    from twisted.logger import Logger

    from twistedcluster.fast import internals

    inner = proxyProtocolInner(description)
    if inner is None:
        return description, None
    parsers = internals.proxyParsers()
    if parsers is None:
        Logger().warn(
            "this Twisted has no PROXY header parsers where twistedcluster looks "
            "for them: {endpoint} uses Twisted's haproxy: wrapper (no fast path)",
            endpoint=description,
        )
        return description, None
    Logger().info("{who} expects a PROXY header (v1 or v2) from every client", who=who)
    return inner, parsers
