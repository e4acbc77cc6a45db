"""
Active TCP health checks for static backends (``--backend
[NAME=]HOST:PORT[,...]`` at start-up, ``cluster-admin add`` at runtime):
the servers that do not speak AMP and so never report.

Each check connects and closes.  A backend that fails C{fall} checks in a row
is marked down; one that then passes C{rise} in a row is up again (HAProxy's
rise/fall).  Static backends start up, as in HAProxy: the first failing
checks take a dead one out, and meanwhile the proxy retries elsewhere.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple, Union

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twistedcluster.address import errorText, formatHostPort, tcpEndpoint
from twistedcluster.balancer.staticbackend import DEFAULT_STATIC_CAPACITY, StaticBackend
from twistedcluster.core.pool import Pool, State

log = Logger()

DEFAULT_CHECK_INTERVAL = 2.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
#: Kept for callers of old: the default capacity of a static backend.
STATIC_CAPACITY = DEFAULT_STATIC_CAPACITY


class StaticNameTaken(ValueError):
    """
    A static backend cannot be added under a name the pool already has.
    """


class StaticAtOwnListener(ValueError):
    """
    A static backend cannot be at this balancer's own proxy or redirect
    listener (L{twistedcluster.balancer.selfloop}): it would relay every
    client to itself.
    """


class NotStatic(ValueError):
    """
    Only static backends can be removed; the message says what to do instead.
    """


class _Probe(Protocol):
    def connectionMade(self) -> None:
        version = self.factory.sendProxy
        if version is not None:
            # A backend that expects a PROXY header gets one, naming this
            # connection itself, as HAProxy's checks do: v2's LOCAL command
            # (no client), v1 the check's own addresses (the spec's advice).
            from twistedcluster.wire.proxyheader import header

            t = self.transport
            self.transport.write(
                header(version, None, None) if version == "v2" else header(version, t.getHost(), t.getPeer())
            )
        self.transport.loseConnection()


class _Check:
    """
    One backend's check loop and its counts.
    """

    def __init__(self, checker: "TCPHealthChecks", name: str, host: str, port: int):
        self.checker = checker
        self.name = name
        self.host = host
        self.port = port
        self.successes = 0
        self.failures = 0
        self.inFlight = None
        #: Set by L{stop}: a check cancelled then is no verdict on the backend.
        self.stopped = False
        #: Whether the log said it passes its checks but stays out (taken
        #: out by the passive check); said again after it has been back.
        self.saidOut = False
        self.loop = task.LoopingCall(self.run)
        self.loop.clock = checker.reactor

    def run(self) -> None:
        if self.inFlight is not None:
            return  # the previous check has not finished: it will count
        checker = self.checker
        ep = tcpEndpoint(checker.reactor, self.host, self.port, checker.timeout)
        d = self.inFlight = ep.connect(checker.probeFactoryFor(self.name))
        d.addCallbacks(self._passed, self._failed)

    def _passed(self, proto) -> None:
        self.inFlight = None
        self.failures = 0
        self.successes += 1
        pool = self.checker.pool
        if self.name in pool and pool.get(self.name).state is not State.DOWN:
            self.saidOut = False
        if self.name in pool and pool.get(self.name).state is State.DOWN:
            if self.successes >= self.checker.rise:
                pool.markUp(self.name)
                if pool.get(self.name).state is not State.DOWN:
                    log.info(
                        "static backend {name} passed {n} checks: up",
                        name=self.name,
                        n=self.successes,
                    )
                elif not self.saidOut:
                    # Taken out by the passive check (its connects failed):
                    # it comes back when that time is over, not before.
                    self.saidOut = True
                    log.info(
                        "static backend {name} passed {n} checks, but stays out "
                        "until its connects' ejection is over",
                        name=self.name,
                        n=self.successes,
                    )

    def _failed(self, reason) -> None:
        self.inFlight = None
        if self.stopped:
            return
        self.successes = 0
        self.failures += 1
        pool = self.checker.pool
        if self.failures == self.checker.fall and self.name in pool:
            pool.markDown(self.name)
            log.warn(
                "static backend {name} failed {n} checks in a row ({error}): down",
                name=self.name,
                n=self.failures,
                error=errorText(reason),
            )

    def stop(self) -> None:
        self.stopped = True
        if self.loop.running:
            self.loop.stop()
        if self.inFlight is not None:
            d, self.inFlight = self.inFlight, None
            d.cancel()


class TCPHealthChecks(Service):
    """
    Keeps static backends in the pool, checked every C{interval} seconds.

    @param backends: the start-up ones: L{StaticBackend}s, or (host, port)
        pairs named ``HOST:PORT``.
    @ivar added: those added at runtime (L{add} with C{runtime=True}), by
        name: what the state file keeps.
    @param sendProxy: C{"v1"} or C{"v2"} when backends expect a PROXY
        header (C{--send-proxy}): each check sends one before closing.
    @param sendProxyFor: the version for some backends, by name, over
        C{sendProxy}.
    """

    def __init__(
        self,
        pool: Pool,
        reactor,
        backends: Iterable[Union[StaticBackend, Tuple[str, int]]] = (),
        interval: float = DEFAULT_CHECK_INTERVAL,
        timeout: float = 1.0,
        rise: int = DEFAULT_RISE,
        fall: int = DEFAULT_FALL,
        sendProxy=None,
        sendProxyFor=None,
    ) -> None:
        self.pool = pool
        self.reactor = reactor
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.probeFactory = Factory.forProtocol(_Probe)
        self.probeFactory.noisy = False
        self.probeFactory.sendProxy = sendProxy
        self._probes = {None: self.probeFactory}
        # The proxy's own dict (the balancer passes both the same one), so
        # that what add and remove change here, it sees.
        self.sendProxyFor = sendProxyFor if sendProxyFor is not None else {}
        self.checks: Dict[str, _Check] = {}
        #: Whether a control channel holds a name now (the balancer gives
        #: its control factory's); a static backend restored from the state
        #: file or the state store does not take such a name.
        self.registered: Callable[[str], bool] = lambda name: False
        #: Why a backend at (host, port) would be this balancer's own
        #: listener, or C{None} (the balancer gives its L{OwnListeners}'
        #: C{refusal}): checked for every static backend added, from the
        #: command line, an admin, the state file or the state store.
        self.loopsBack: Callable[[str, int], object] = lambda host, port: None
        #: The state store's static backends not added here for that
        #: reason, by name: their keys, kept in the store.
        self.heldBack: Dict[str, object] = {}
        self.backends: Dict[str, StaticBackend] = {}
        self.added: Dict[str, StaticBackend] = {}
        for b in backends:
            if not isinstance(b, StaticBackend):
                host, port = b
                b = StaticBackend(formatHostPort(host, port), host, port)
            self.backends[b.name] = b
            self.checks[b.name] = _Check(self, b.name, b.host, b.port)

    def probeFactoryFor(self, name: str):
        """
        The factory of C{name}'s check probes: with its own PROXY header
        version (C{--backend HOST:PORT,send-proxy=...}), or the shared one.
        """
        version = self.sendProxyFor.get(name)
        factory = self._probes.get(version)
        if factory is None:
            factory = self._probes[version] = Factory.forProtocol(_Probe)
            factory.noisy = False
            factory.sendProxy = version
        return factory

    def startService(self) -> None:
        super().startService()
        for name in list(self.checks):
            self._start(self.backends[name])

    def _start(self, b: StaticBackend) -> None:
        self.pool.register(b.name, b.host, b.port, capacity=b.capacity, static=True)
        if b.weight is not None:
            self.pool.setWeight(b.name, b.weight)
        log.info(
            "static backend {backend}: checked every {interval} s",
            backend=b.describe(),
            name=b.name,
            interval=self.interval,
        )
        self.checks[b.name].loop.start(self.interval, now=True)

    def add(self, b: StaticBackend, runtime: bool = True, restoring: bool = False) -> None:
        """
        Add a static backend now (or at start, before L{startService}).
        L{StaticAtOwnListener} if it is at this balancer's own listener;
        L{StaticNameTaken} if the pool has that name already, unless
        C{restoring} from the state file or the state store (where the pool
        holds the settings restored for it) and no control channel holds
        the name now (L{registered}).
        """
        name = b.name
        known = self.pool.get(name) if name in self.pool else None
        if name in self.checks or (known is not None and known.static and not restoring):
            raise StaticNameTaken(
                f"a static backend named {name} exists already: remove it first, "
                "or choose another name"
            )
        if known is not None and not known.static and (not restoring or self.registered(name)):
            # Restoring takes the name of a backend known only by its
            # settings, never one that a control channel holds now.
            raise StaticNameTaken(
                f"a backend named {name} registered itself (over the control "
                f"channel, serving at {formatHostPort(known.host, known.port)}): "
                "choose another name, or stop that backend and forget it first"
            )
        loop = self.loopsBack(b.host, b.port)
        if loop is not None:
            raise StaticAtOwnListener(str(loop))
        self.backends[b.name] = b
        self.checks[b.name] = _Check(self, b.name, b.host, b.port)
        if b.sendProxy is not None:
            self.sendProxyFor[b.name] = b.sendProxy
        else:
            self.sendProxyFor.pop(b.name, None)
        if runtime:
            self.added[b.name] = b
        if self.running:
            self._start(b)

    def remove(self, name: str) -> StaticBackend:
        """
        Stop checking a static backend and take it out of the pool (and of
        the state file, if it was added at runtime).  Connections it has
        open go on.  L{NotStatic} for a backend that registered itself.
        """
        check = self.checks.get(name)
        if check is None:
            if name in self.pool:
                raise NotStatic(
                    f"{name} registered itself: drain or stop it, then forget "
                    "it once it is down"
                )
            from twistedcluster.core.pool import UnknownBackend

            raise UnknownBackend(name)
        check.stop()
        del self.checks[name]
        self.added.pop(name, None)
        # A backend added again under this name has only its own setting.
        self.sendProxyFor.pop(name, None)
        b = self.backends.pop(name)
        if name in self.pool:
            self.pool.remove(name)
        return b

    def stopService(self):
        for check in self.checks.values():
            check.stop()
        return super().stopService()
