"""
Active TCP health checks for static backends (``--backend HOST:PORT``): the
servers that do not speak AMP and so never report.

Each check connects and closes.  A backend that fails C{fall} checks in a row
is marked down; one that then passes C{rise} in a row is up again (HAProxy's
rise/fall).  Static backends start up, as in HAProxy: the first failing
checks take a dead one out, and meanwhile the proxy retries elsewhere.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from twistedcluster.address import formatHostPort, tcpEndpoint
from twistedcluster.core.pool import Pool, State

log = Logger()

DEFAULT_CHECK_INTERVAL = 2.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
STATIC_CAPACITY = 1000


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
        if self.name in pool and pool.get(self.name).state is State.DOWN:
            if self.successes >= self.checker.rise:
                pool.markUp(self.name)
                log.info(
                    "static backend {name} passed {n} checks: up",
                    name=self.name,
                    n=self.successes,
                )

    def _failed(self, reason) -> None:
        self.inFlight = None
        self.successes = 0
        self.failures += 1
        pool = self.checker.pool
        if self.failures == self.checker.fall and self.name in pool:
            pool.markDown(self.name)
            log.warn(
                "static backend {name} failed {n} checks in a row ({error}): down",
                name=self.name,
                n=self.failures,
                error=reason.getErrorMessage(),
            )

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        if self.inFlight is not None:
            d, self.inFlight = self.inFlight, None
            d.cancel()


class TCPHealthChecks(Service):
    """
    Keeps static backends in the pool, checked every C{interval} seconds.

    @param backends: (host, port) pairs; each is named ``HOST:PORT``.
    @param sendProxy: C{"v1"} or C{"v2"} when backends expect a PROXY
        header (C{--send-proxy}): each check sends one before closing.
    @param sendProxyFor: the version for some backends, by name, over
        C{sendProxy}.
    """

    def __init__(
        self,
        pool: Pool,
        reactor,
        backends: List[Tuple[str, int]],
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
        self.sendProxyFor = sendProxyFor or {}
        self.checks: Dict[str, _Check] = {}
        for host, port in backends:
            name = formatHostPort(host, port)
            self.checks[name] = _Check(self, name, host, port)

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
        for name, check in self.checks.items():
            self.pool.register(
                name, check.host, check.port, capacity=STATIC_CAPACITY, static=True
            )
            log.info("static backend {name}: checked every {interval} s", name=name, interval=self.interval)
            check.loop.start(self.interval, now=True)

    def stopService(self):
        for check in self.checks.values():
            check.stop()
        return super().stopService()
