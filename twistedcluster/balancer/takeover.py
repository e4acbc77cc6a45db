"""
``--takeover PATH``: a new balancer process takes the listening sockets and
the pool over from the running one, so an upgrade refuses no client.

The balancer listens on the unix socket PATH (mode 600).  A new process
started with the same PATH finds it alive, asks for the listeners and gets
each listening socket (proxy, redirect, control, admin, metrics and PATH's
own) as a file descriptor (C{SCM_RIGHTS}, Twisted's C{sendFileDescriptor}),
with a JSON snapshot: the operator's state as the state file has it, and the
backends whose control channels are live.  It adopts the sockets
(C{IReactorSocket.adoptStreamPort}), restores those backends as up until
the heartbeat timeout (they register again within it), and says C{ready}.
The old process then stops its listening ports without shutting the shared
sockets down (nor unlinking a unix socket's path), closes its control
channels so backends reconnect at once (to the new process: the same
sockets), and exits once its own relayed connections finish, or at its
C{--takeover-drain} deadline.

Between the new process listening and the old one stopping, both accept
from the same sockets; a connection is served by whichever accepts it.
The kernel's accept queue is never without a reader, so nothing is refused.

The new process asks before its reactor runs (from C{makeService}), on a
blocking socket with a deadline: there is nothing else for it to do yet.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from twistedcluster.fast.internals import letGoOfListener, raiseListenFailures
from twistedcluster.hangup import quietSecondStop

log = Logger()

#: Seconds a new process waits for the old one's answer.
ASK_TIMEOUT = 10.0
#: Default seconds the old process keeps relaying after the handover.
DEFAULT_TAKEOVER_DRAIN = 300.0
#: The role of PATH's own listening socket among the handed-over ones.
TAKEOVER_ROLE = "takeover"
_ASK = b"listeners"
_READY = b"ready"
_MAX_ANSWER = 16 * 1024 * 1024


class TakeoverError(Exception):
    """
    The process at PATH did not hand its listeners over.
    """


class Inherited:
    """
    Listening sockets this process got from elsewhere, by role: each a
    descriptor, its address family and the endpoint string it was opened
    from.  C{source} names where they came from in the log.
    """

    source = "takeover"
    former = "the old process's"

    def __init__(self, listeners: Dict[str, Tuple[int, int, str]]) -> None:
        self.listeners = listeners
        #: Roles whose socket was not taken because its endpoint changed.
        self.changed: List[str] = []

    def take(self, role: str, description: str, reactor) -> Optional["AdoptedEndpoint"]:
        """
        An endpoint listening on the C{role} socket, when it was opened from
        the same C{description}; else C{None} (the listener is opened afresh
        and the socket is closed here).
        """
        got = self.listeners.pop(role, None)
        if got is None:
            return None
        fd, family, was = got
        if was != description:
            log.warn(
                "{source}: the {role} listener was {old}, is now {new}: opening it afresh",
                source=self.source,
                role=role,
                old=was,
                new=description,
            )
            os.close(fd)
            self.changed.append(role)
            return None
        try:
            tls = tlsContextOf(description, reactor)
        except Exception:
            os.close(fd)
            raise
        return AdoptedEndpoint(reactor, fd, family, tls)

    def closeUnused(self) -> List[str]:
        """
        Close the sockets no listener took; their roles, and those of the
        sockets not taken because their endpoint changed.
        """
        unused = list(self.changed)
        for role, (fd, _, description) in self.listeners.items():
            log.info(
                "{source}: {former} {role} listener ({endpoint}) is not used here",
                source=self.source,
                former=self.former,
                role=role,
                endpoint=description,
            )
            os.close(fd)
            unused.append(role)
        self.listeners.clear()
        return unused


class Inheritance(Inherited):
    """
    What a new process got from the old one: its listening sockets by role
    and its state snapshot; and the channel on which to say C{ready}.
    """

    def __init__(self, channel: socket.socket, listeners: Dict[str, Tuple[int, int, str]], state: Dict[str, Any]) -> None:
        super().__init__(listeners)
        self.channel = channel
        self.state = state

    def ready(self) -> None:
        """
        Tell the old process to stop accepting: every listener here is open.
        """
        try:
            self.channel.sendall(_READY + b"\n")
        except OSError as e:
            log.warn("takeover: could not tell the old process to stop: {error}", error=e)
        finally:
            self.channel.close()


def tlsContextOf(description: str, reactor) -> Optional[Any]:
    """
    The TLS context factory of a C{ssl:} or C{mtls:} server endpoint string
    (read from the endpoint Twisted builds of it, so every option of the
    string applies), or C{None} for a plain one.  An adopted socket is a
    bare TCP socket: without this, a TLS listener taken over would serve
    its clients in clear.
    """
    kind = description.split(":", 1)[0].lower()
    if kind not in ("ssl", "mtls"):
        return None
    from twisted.internet.endpoints import serverFromString

    from twistedcluster.fast.internals import serverTLSContext

    context = serverTLSContext(serverFromString(reactor, description))
    if context is None:  # Twisted renamed it: refuse rather than serve in clear
        raise TakeoverError(f"cannot read the TLS settings of {description!r} to adopt it")
    return context


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    Listens on a socket that is already listening (inherited): Twisted's
    C{adoptStreamPort}, which duplicates the descriptor; ours is closed.
    With C{tls} (a context factory), connections speak TLS as on the
    listener the socket was opened for (as C{listenSSL} wraps a factory).
    """

    def __init__(self, reactor, fd: int, family: int, tls=None) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.tls = tls

    def listen(self, factory):
        if self.tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        try:
            port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        except Exception:
            return defer.fail()
        finally:
            os.close(self.fd)
        return defer.succeed(port)


def _receive(channel: socket.socket) -> Tuple[bytes, List[int]]:
    """
    One newline-ended answer and the descriptors that came with it (Twisted
    sends one descriptor with each of the answer's first bytes).
    """
    data = b""
    fds: List[int] = []
    while not data.endswith(b"\n"):
        chunk, got, _, _ = socket.recv_fds(channel, 65536, 64)
        fds.extend(got)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise TakeoverError("the old process closed the channel before answering")
        data += chunk
        if len(data) > _MAX_ANSWER:
            raise TakeoverError("the old process's answer is too long")
    return data, fds


def inherit(path: str, timeout: float = ASK_TIMEOUT) -> Optional[Inheritance]:
    """
    Ask the balancer listening at C{path} for its listeners: L{Inheritance},
    or C{None} when no process listens there (a stale path is removed).
    Raises L{TakeoverError} when one listens but does not hand over.
    """
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.settimeout(timeout)
    try:
        channel.connect(path)
    except OSError as e:
        channel.close()
        if e.errno == errno.ECONNREFUSED:
            os.unlink(path)  # left by a process that is gone
            return None
        if e.errno == errno.ENOENT:
            return None
        raise TakeoverError(f"cannot reach the balancer at {path}: {e.strerror or e}") from None
    try:
        channel.sendall(_ASK + b"\n")
        data, fds = _receive(channel)
    except (OSError, socket.timeout) as e:
        channel.close()
        raise TakeoverError(f"the balancer at {path} did not answer: {e}") from None
    except TakeoverError:
        channel.close()
        raise
    answer = json.loads(data)
    if "error" in answer:
        channel.close()
        for fd in fds:
            os.close(fd)
        raise TakeoverError(f"the balancer at {path} refused: {answer['error']}")
    roles = answer["listeners"]
    if len(roles) != len(fds):
        channel.close()
        for fd in fds:
            os.close(fd)
        raise TakeoverError(f"{len(fds)} socket(s) came for {len(roles)} listener(s)")
    channel.settimeout(None)
    listeners = {
        r["role"]: (fd, int(r["family"]), r["description"]) for r, fd in zip(roles, fds)
    }
    return Inheritance(channel, listeners, answer["state"])


def restoreLive(
    state: Dict[str, Any], cluster, controlFactory, clock, statics=None
) -> List[str]:
    """
    Put the backends whose control channels were live in the old process
    into the pool as up, each until its heartbeat timeout: it registers
    here within that (its channel was closed with a fast retry), or it is
    marked down as if its reports had stopped.

    Not one whose name a static backend of this process holds (C{statics},
    its L{twistedcluster.balancer.healthcheck.TCPHealthChecks}): that name
    is the static one's here, and the backend's registration is refused.
    """
    pool = cluster.pool
    restored = []
    for b in state.get("live", []):
        name = b["name"]
        if name in controlFactory.owners:
            continue
        if statics is not None and name in statics.checks:
            log.warn(
                "takeover: backend {name} registered with the old process, but "
                "here {name} is a static backend: not restored",
                name=name,
            )
            continue
        pool.register(
            name,
            b["host"],
            int(b["port"]),
            int(b["capacity"]),
            int(b["connections"]),
            float(b["load"]),
        )
        if b.get("selfDraining"):
            pool.setSelfDraining(name)

        def expire(name=name) -> None:
            if name in controlFactory.owners or name not in pool:
                return
            pool.markDown(name)
            controlFactory.wentDown(name)
            log.warn(
                "takeover: backend {name} did not register again within its "
                "heartbeat timeout: marked down",
                name=name,
            )

        clock.callLater(float(b["timeout"]), expire)
        restored.append(name)
    return restored


def liveBackends(cluster, controlFactory) -> List[Dict[str, Any]]:
    """
    The backends this process hears from, as L{restoreLive} takes them.
    """
    pool = cluster.pool
    live = []
    for name, owner in controlFactory.owners.items():
        if owner._silent or name not in pool:
            continue
        s = pool.get(name)
        live.append(
            {
                "name": name,
                "host": s.host,
                "port": s.port,
                "capacity": s.capacity,
                "connections": s.connections,
                "load": s.load,
                "selfDraining": _selfDraining(pool, name),
                "timeout": owner._timeout,
            }
        )
    return live


def _selfDraining(pool, name: str) -> bool:
    m = pool._members.get(name)
    return bool(m is not None and m.selfDraining)


class _Giver(LineOnlyReceiver):
    """
    The old process's side: answers C{listeners}, then waits for C{ready}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64
    _asked = False

    def lineReceived(self, line: bytes) -> None:
        handover = self.factory.handover
        if line == _ASK and not self._asked:
            self._asked = True
            if handover.done or handover.busy:
                why = (
                    "this balancer has handed its listeners over already"
                    if handover.done
                    else "this balancer is handing its listeners to another new process "
                    "now (which has yet to say ready); try again if that one fails"
                )
                self._answer({"error": why})
                self.transport.loseConnection()
                return
            handover.busy = self._handing = True
            listeners, state = handover.describe()
            for r in listeners:
                self.transport.sendFileDescriptor(r.pop("fd"))
            self._answer({"listeners": listeners, "state": state})
            log.info(
                "takeover: {n} listening socket(s) handed to a new process; "
                "waiting for it to say ready",
                n=len(listeners),
            )
        elif line == _READY and self._handing:
            self._ready = True
            handover.release()
            self.transport.loseConnection()
        else:
            self.transport.loseConnection()

    _ready = False
    #: Whether this is the new process the listeners went to (a second one,
    #: refused meanwhile, must not end that handover when it goes).
    _handing = False

    def _answer(self, value: Dict[str, Any]) -> None:
        self.transport.write(json.dumps(value).encode("utf-8") + b"\n")

    def connectionLost(self, reason) -> None:
        handover = self.factory.handover
        if self._handing and not self._ready and not handover.done:
            handover.busy = False
            log.warn(
                "takeover: the new process went away before it was ready; "
                "this balancer carries on"
            )


class Handover:
    """
    What the old process hands over and what it does once the new one is
    ready.

    @param ports: role -> listening port (as opened), and descriptions:
        role -> endpoint string.
    @param state: returns the JSON-able snapshot.
    @param stop: called once the new process is ready: closes control
        channels, sets the long drain deadline, stops the reactor.
    """

    def __init__(self, ports: Dict[str, Any], descriptions: Dict[str, str], state: Callable[[], Dict[str, Any]], stop: Callable[[], None]) -> None:
        self.ports = ports
        self.descriptions = descriptions
        self.state = state
        self.stop = stop
        self.busy = False
        self.done = False

    def describe(self):
        listeners = []
        for role, port in self.ports.items():
            if port is None or not getattr(port, "connected", False):
                continue
            listeners.append(
                {
                    "role": role,
                    "fd": port.fileno(),
                    "family": int(port.socket.family),
                    "description": self.descriptions[role],
                }
            )
        return listeners, self.state()

    def release(self) -> None:
        """
        The new process listens: stop accepting here, leaving the shared
        sockets open for it.
        """
        self.done = True
        self.busy = False
        for role, port in self.ports.items():
            if port is None or not getattr(port, "connected", False):
                continue
            letGoOfListener(port)
        log.info("takeover: the new process is ready; this one stopped accepting and finishes its connections")
        self.stop()


class TakeoverService(MultiService):
    """
    Listens at PATH (mode 600) for a successor; after the balancer's
    listeners have started, tells the predecessor (if any) it is ready.

    Added to the balancer's service after its listeners, so it starts last.
    """

    def __init__(self, path: str, reactor, handover: Handover, inherited: Optional[Inheritance]) -> None:
        super().__init__()
        self.path = path
        self.inherited = inherited
        endpoint = None
        if inherited is not None:
            endpoint = inherited.take(TAKEOVER_ROLE, path, reactor)
        if endpoint is None:
            from twisted.internet.endpoints import UNIXServerEndpoint

            endpoint = UNIXServerEndpoint(reactor, path, mode=0o600)
        factory = protocol.Factory.forProtocol(_Giver)
        factory.noisy = False
        factory.handover = handover
        from twistedcluster.balancer.listeners import Noting, explainListenError

        # Told the port: the takeover port is one a successor gets.
        svc = StreamServerEndpointService(Noting(endpoint, self._listening), factory)
        raiseListenFailures(svc)
        original = svc.privilegedStartService

        def privilegedStartService() -> None:
            from twisted.internet.error import CannotListenError

            try:
                original()
            except CannotListenError as e:
                raise explainListenError(TAKEOVER_ROLE, path, e) from None

        svc.privilegedStartService = privilegedStartService  # type: ignore[method-assign]
        handover.descriptions[TAKEOVER_ROLE] = path
        self.handover = handover
        svc.setServiceParent(self)

    def _listening(self, port) -> None:
        self.handover.ports[TAKEOVER_ROLE] = port

    def startService(self) -> None:
        super().startService()
        log.info("balancer takeover socket {path}: a new process started with --takeover {path} takes over", path=self.path)
        if self.inherited is None:
            notifySystemd("READY=1")
            return
        inherited, self.inherited = self.inherited, None
        inherited.closeUnused()
        inherited.ready()
        log.info("takeover: listeners adopted from the old process, told it to stop accepting")
        # Under systemd (Type=notify, NotifyAccess=all) this process is the
        # service's main process from now on: the old one exits alone.
        notifySystemd(f"MAINPID={os.getpid()}\nREADY=1")


def notifySystemd(state: str, environ=None, fds=()) -> bool:
    """
    Tell systemd C{state} (sd_notify(3)'s protocol: one datagram to
    C{$NOTIFY_SOCKET}, C{@} for the abstract namespace), with C{fds} as
    C{SCM_RIGHTS} when given (sd_pid_notify_with_fds); whether it was sent.
    Without C{$NOTIFY_SOCKET} (not under a Type=notify unit) it does
    nothing.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            if fds:
                socket.send_fds(s, [state.encode("utf-8")], list(fds))
            else:
                s.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warn("cannot notify systemd at {address}: {error}", address=address, error=e)
        return False
    return True


def takeoverService(
    options, reactor, inherited, ports, listeners, cluster, statics, controlFactory, drainOnStop
) -> TakeoverService:
    """
    The balancer's L{TakeoverService}: C{ports} (role -> listening port,
    filled as they open) and C{listeners} ((role, endpoint string, factory)
    triples) are what a successor gets.
    """
    from twistedcluster.balancer.statefile import snapshot

    def state() -> Dict[str, Any]:
        return {
            "operator": snapshot(cluster, statics),
            "live": liveBackends(cluster, controlFactory),
        }

    def stop() -> None:
        # Handed over, not down: the channels are closed without marking
        # their backends down here, and their reporters reconnect at once
        # (to the new process, which listens on the same socket).
        for owner in list(controlFactory.owners.values()):
            owner._disown(close=True)
        drainOnStop.timeout = options["takeover-drain"]
        quietSecondStop(
            reactor,
            why="the connections it had before the takeover finish until --takeover-drain",
        )
        reactor.stop()

    descriptions = {role: description for role, description, _ in listeners}
    return TakeoverService(
        options["takeover"], reactor, Handover(ports, descriptions, state, stop), inherited
    )
