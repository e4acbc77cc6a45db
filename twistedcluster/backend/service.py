"""
``twistd cluster-backend``: run a service, count its connections, register
with the balancers and report load; drain on shutdown.

Shutdown (SIGTERM, or anything that stops the reactor) drains: every balancer
is told first, so no new connection is routed here; then the listener closes;
then the service factory's C{drain()} is called, when it has one (so that a
service can end keep-alive or tell its clients; it may return a Deferred,
waited for within the drain timeout); open connections may finish until the
drain deadline, after which they are aborted.
"""

from __future__ import annotations

import math
from typing import Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage

from twistedcluster.options import loadSecretOption, oneLineDoc, positive
from twistedcluster.address import formatHostPort, parseHostPort, parsedEndpoint
from twistedcluster.backend.cost import CostMeter
from twistedcluster.core.costlevels import DEFAULT_TOLERANCE as COST_LEVEL_TOLERANCE
from twistedcluster.backend.counting import CountingFactory
from twistedcluster.summary import Summary, window
from twistedcluster.balancer.limits import AcceptErrors
from twistedcluster.balancer.listeners import (
    explainListenError,
    proxyProtocolInner,
    quietListenFailures,
    readsProxyHeader,
    withBacklog,
)
from twistedcluster.backend.reporter import (
    DEFAULT_INTERVAL,
    Identity,
    Load,
    LoadReporter,
    reportStep,
)

log = Logger()

#: Seconds a draining backend waits for the balancers to acknowledge (so
#: that they stop sending clients) before it closes its listener.
DRAIN_ACK_TIMEOUT = 2.0

DEFAULT_LISTEN = "tcp:9000"
DEFAULT_BALANCER = "tcp:host=127.0.0.1:port=8100"
DEFAULT_CAPACITY = 1000
DEFAULT_DRAIN_TIMEOUT = 30.0
_WILDCARDS = {"0.0.0.0", "::", ""}


def importService(spec: str):
    """
    The object C{spec} (C{package.module.name}) names; a
    L{usage.UsageError} that shows the real import error, and, when the
    module itself is not found, that twistd does not put the current folder
    on the Python path.
    """
    import importlib
    import os

    parts = spec.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise usage.UsageError(
            f"--service {spec}: give 'echo' or package.module.name of a protocol factory"
        )
    for cut in range(len(parts) - 1, 0, -1):
        moduleName = ".".join(parts[:cut])
        try:
            module = importlib.import_module(moduleName)
        except Exception as e:
            missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
            if missing is not None and (moduleName + ".").startswith(missing + "."):
                continue  # that module (or its package) does not exist: look higher
            # It exists, and importing it failed: its own error says why.
            raise usage.UsageError(
                f"--service {spec}: importing {moduleName} failed: "
                f"{type(e).__name__}: {e}"
            ) from None
        obj = module
        for i, attribute in enumerate(parts[cut:], cut):
            try:
                obj = getattr(obj, attribute)
            except AttributeError:
                raise usage.UsageError(
                    f"--service {spec}: {'.'.join(parts[:i])} has no attribute {attribute!r}"
                ) from None
        return obj
    top = parts[0]
    hint = (
        "twistd does not put the current folder on the Python path: run it with "
        "PYTHONPATH set to the folder that holds it (PYTHONPATH=. for the current one)"
    )
    if os.path.exists(f"{top}.py") or os.path.isdir(top):
        hint = f"./{top}{'.py' if os.path.exists(f'{top}.py') else ''} is here, but " + hint
    raise usage.UsageError(f"--service {spec}: No module named {top!r}; {hint}")


def loadServiceFactory(spec: str):
    """
    The protocol factory ``--service`` names: ``echo``, or the dotted name of
    a factory instance, a factory class, or a callable returning a factory.
    """
    if spec == "echo":
        from twistedcluster.backend.echo import echoFactory

        return echoFactory()
    obj = importService(spec)
    if IProtocolFactory.providedBy(obj):
        return obj
    if callable(obj):
        try:
            made = obj()
        except Exception as e:
            raise usage.UsageError(
                f"--service {spec}: not a protocol factory, and calling it "
                f"failed ({type(e).__name__}: {e})"
            ) from None
        if IProtocolFactory.providedBy(made):
            return made
    raise usage.UsageError(
        f"--service {spec}: not a protocol factory, nor a callable returning one"
    )


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a backend: serve --service on --listen, and register with each "
        "--balancer over its control channel, reporting load."
    )

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Service listener endpoint."],
        [
            "advertise",
            None,
            None,
            "HOST:PORT where clients reach this backend (default: the listening "
            "port, at the address this backend reaches the balancer from).",
        ],
        [
            "service",
            None,
            "echo",
            "'echo', or package.module.name of a protocol factory (or of a "
            "callable returning one).",
        ],
        ["name", None, None, "Name in the cluster (default: the advertised HOST:PORT)."],
        [
            "capacity",
            None,
            DEFAULT_CAPACITY,
            "Connections this backend is sized for (or serves at once); a "
            "connection costs it at least 1/capacity.",
            positive(int),
        ],
        [
            "report-interval",
            None,
            DEFAULT_INTERVAL,
            "Seconds between load reports.",
            positive(float),
        ],
        [
            "secret-file",
            None,
            None,
            "File holding the balancers' shared secret (see the balancer's "
            "--secret-file).",
        ],
        [
            "srv-interval",
            None,
            30.0,
            "With --balancer srv:NAME: seconds between lookups of the SRV "
            "record (it is looked up again too when a channel fails).",
            positive(float),
        ],
        [
            "dns-server",
            None,
            None,
            "With --balancer srv:NAME: HOST:PORT of the DNS server to ask "
            "(default: the name servers of --resolv-conf).",
        ],
        [
            "resolv-conf",
            None,
            "/etc/resolv.conf",
            "With --balancer srv:NAME: resolver(5) file whose search (or "
            "domain) list and options ndots:N apply to a NAME that does not "
            "end in a dot, as the system's resolver applies them; its name "
            "servers are asked unless --dns-server is given.",
        ],
        [
            "metrics",
            None,
            None,
            "Metrics web listener (off unless given): /metrics in Prometheus' "
            "format (connections, load, each balancer's channel), /healthz.",
        ],
        [
            "drain-timeout",
            None,
            DEFAULT_DRAIN_TIMEOUT,
            "Seconds open connections may take to finish on shutdown.",
            positive(float),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["balancers"] = []

    @oneLineDoc
    def opt_balancer(self, description: str) -> None:
        """
        Control endpoint of a balancer (repeatable; default
        tcp:host=127.0.0.1:port=8100); or srv:_cluster-control._tcp.DOMAIN,
        a DNS SRV record naming every balancer's control host and port.
        """
        if description.startswith("srv:"):
            from twistedcluster.backend.discovery import srvName

            try:
                srvName(description)
            except ValueError as e:
                raise usage.UsageError(f"--balancer: {e}") from None
        self["balancers"].append(description)

    def postOptions(self) -> None:
        self["secret"] = loadSecretOption(self["secret-file"])
        if not self["balancers"]:
            self["balancers"] = [DEFAULT_BALANCER]
        if self["dns-server"] is not None:
            try:
                self["dns-server"] = parseHostPort(self["dns-server"])
            except ValueError as e:
                raise usage.UsageError(f"--dns-server: {e}") from None
        if self["advertise"] is not None:
            try:
                self["advertise"] = parseHostPort(self["advertise"])
            except ValueError as e:
                raise usage.UsageError(f"--advertise: {e}") from None
        elif ":" in (inner := proxyProtocolInner(self["listen"]) or self["listen"]) and inner.split(
            ":", 1
        )[0] not in ("tcp", "tcp6", "ssl", "systemd"):
            # (A string with no type at all is no endpoint: makeService
            # says so, not this.)
            raise usage.UsageError(
                f"--listen {self['listen']}: give --advertise HOST:PORT, clients "
                "cannot reach this kind of endpoint by address"
            )
        if self["name"] is not None:
            from twistedcluster.balancer.control import validName
            from twistedcluster.wire.commands import InvalidArgument

            try:
                validName(self["name"])
            except InvalidArgument as e:
                raise usage.UsageError(f"--name: {e}") from None
        self["factory"] = loadServiceFactory(self["service"])


def _discoverBalancers(options, reporter, reactor) -> None:
    """
    One L{twistedcluster.backend.discovery.SRVBalancers} per C{--balancer
    srv:NAME}, run with the reporter.
    """
    from twistedcluster.backend.discovery import (
        SRVBalancers,
        isSRV,
        readResolvConf,
        srvName,
        systemResolver,
    )

    names = [srvName(b) for b in options["balancers"] if isSRV(b)]
    if not names:
        return
    from twisted.names import client

    if options["dns-server"] is not None:
        resolver = client.Resolver(servers=[options["dns-server"]], reactor=reactor)
    else:
        resolver = systemResolver(reactor, options["resolv-conf"])
    search, ndots = readResolvConf(options["resolv-conf"])
    for name in names:
        SRVBalancers(
            name, reporter, resolver, reactor, options["srv-interval"], search, ndots
        ).setServiceParent(reporter)
        log.info(
            "backend looks balancers up in SRV {name} every {interval} s{search}",
            name=name,
            interval=options["srv-interval"],
            search="" if name.endswith(".") or not search
            else f" (search {' '.join(search)}, ndots {ndots})",
        )


class BackendService(Service):
    """
    Listens with a counted service factory and runs the L{LoadReporter};
    drains on stop.
    """

    port = None
    #: The metrics listener's port, with C{--metrics}.
    metricsPort = None
    #: What SIGHUP does (L{twistedcluster.hangup}); set by L{makeService}.
    hangUp = None
    #: Log lines summed once in a while (L{twistedcluster.summary.Summary}),
    #: told at once when the service stops; set by L{makeService}.
    summaries: tuple = ()

    def __init__(
        self,
        reactor,
        listen: str,
        factory: CountingFactory,
        reporter: LoadReporter,
        drainTimeout: float = DEFAULT_DRAIN_TIMEOUT,
        metrics: Optional[str] = None,
        metricsSite=None,
    ) -> None:
        self.metrics = metrics
        self.metricsSite = metricsSite
        self.reactor = reactor
        self.listen = listen
        self.factory = factory
        self.reporter = reporter
        self.drainTimeout = drainTimeout
        self._idle: Optional[defer.Deferred] = None
        # Out of descriptors, Twisted's port logs a line or three per
        # connection it cannot accept: summed into one a second.
        self.acceptErrors = AcceptErrors(reactor)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._startListening()

    def _startListening(self) -> None:
        if self.port is not None:
            return
        failures = []
        d = serverFromString(self.reactor, withBacklog(self.listen)).listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if self.metrics is not None and self.metricsSite is not None and not failures:
            m = serverFromString(self.reactor, withBacklog(self.metrics)).listen(self.metricsSite)
            m.addCallbacks(self._metricsListening, failures.append)
        if failures:
            # Raised here, twistd reports it and exits non-zero.
            from twisted.internet.error import CannotListenError

            if failures[0].check(CannotListenError):
                raise explainListenError("service", self.listen, failures[0].value)
            failures[0].raiseException()

    def _metricsListening(self, port) -> None:
        self.metricsPort = port
        log.info("backend metrics listening on {address}", address=port.getHost())

    def _listening(self, port) -> None:
        self.port = port
        self.acceptErrors.watch(port, "service")
        # Kept: once the port stops listening (draining) it can no longer say.
        self.address = port.getHost()
        log.info("backend service listening on {address}", address=self.address)

    def startService(self) -> None:
        super().startService()
        self._startListening()
        self.reporter.startService()
        if self.hangUp is not None:
            self.hangUp.startService()

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        count = self.factory.count
        log.info(
            "draining: telling balancers, closing the listener, waiting up to "
            "{timeout} s for {count} connection(s)",
            timeout=self.drainTimeout,
            count=count,
        )
        # The deadline counts from the signal: what waits for the balancers'
        # answers comes out of the connections' time, not on top of it.
        deadline = self.reactor.seconds() + self.drainTimeout
        told = self.reporter.drain()
        told.addTimeout(min(DRAIN_ACK_TIMEOUT, self.drainTimeout), self.reactor)
        try:
            await told
        except defer.TimeoutError:
            log.warn(
                "draining: balancer(s) {balancers} did not acknowledge within {timeout:g} s; "
                "they stop sending clients when the channel closes",
                balancers=", ".join(sorted(self.reporter.unacknowledged)) or "?",
                timeout=min(DRAIN_ACK_TIMEOUT, self.drainTimeout),
            )
        if self.port is not None:
            await self.port.stopListening()
        await self._serviceDrain(deadline)
        if self.factory.count:
            idle = self._idle = defer.Deferred()
            idle.addTimeout(max(0.0, deadline - self.reactor.seconds()), self.reactor)
            try:
                await idle
                log.info("drained: no connection left")
            except defer.TimeoutError:
                log.warn(
                    "drain deadline reached: closing {count} connection(s)",
                    count=self.factory.count,
                )
                self.factory.closeAll()
            self._idle = None
        await self.reporter.stopService()
        self.acceptErrors.stop()
        for summary in self.summaries:
            summary.stop()
        if self.metricsPort is not None:
            await self.metricsPort.stopListening()

    async def _serviceDrain(self, deadline: float) -> None:
        """
        Call the service factory's C{drain()}, when it has one, and wait for
        what it returns (a Deferred, or a coroutine) until the drain
        C{deadline}.  A failure or a timeout there is logged and the drain
        goes on: the connections still get what is left of the deadline.
        """
        drain = getattr(self.factory.wrappedFactory, "drain", None)
        if not callable(drain):
            return
        log.info("draining: calling the service's drain()")
        joined = defer.maybeDeferred(lambda: defer.ensureDeferred(_awaitable(drain())))
        left = max(0.0, deadline - self.reactor.seconds())
        joined.addTimeout(left, self.reactor)
        try:
            await joined
        except defer.TimeoutError:
            log.warn(
                "draining: the service's drain() had not finished after {timeout:g} s",
                timeout=round(left, 1),
            )
        except Exception as e:
            log.error(
                "draining: the service's drain() failed: {error!r}; draining goes on",
                error=e,
            )

    def connectionsChanged(self, count: int) -> None:
        self.reporter.connectionsChanged(count)
        if count == 0 and self._idle is not None and not self._idle.called:
            self._idle.callback(None)


async def _awaitable(result):
    """
    What a service's C{drain()} returned, awaited if it can be (a Deferred
    or a coroutine), as it is otherwise.
    """
    import inspect

    if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
        return await result
    return result


def makeService(options: Options, reactor=None) -> BackendService:
    """
    Compose the backend: the counted service, its listener and the load
    reporter.

    Under twistd with no --reactor, the built-in echo service runs on
    L{twistedcluster.fast.reactor.LeanEPollReactor} (it logs nothing with the
    legacy log context that reactor leaves out); a --service of your own
    keeps Twisted's default reactor, since its protocols may.
    """
    if reactor is None:
        if options["service"] == "echo":
            from twistedcluster.fast.reactor import installIfNone

            installIfNone()
        from twisted.internet import reactor

    quietListenFailures("cluster-backend")
    from twistedcluster.fast.internals import tolerateALPN

    tolerateALPN()  # an ssl: listener takes clients that offer ALPN
    capacity = options["capacity"]
    inner = options["factory"]
    listen, parsers = readsProxyHeader(options["listen"], "backend service")
    # A string Twisted cannot make an endpoint of is one line here, not a
    # traceback when the service starts.
    def server(r, d):
        return serverFromString(r, withBacklog(d))

    parsedEndpoint(server, reactor, listen, "--listen")
    if options["metrics"]:
        parsedEndpoint(server, reactor, options["metrics"], "--metrics")
    counting = CountingFactory(inner, proxyParsers=parsers, clock=reactor)
    customLoad = getattr(inner, "currentLoad", None)
    meter = CostMeter(reactor, capacity)

    def tellLoadFailures(counts, seconds: float) -> None:
        log.error(
            "backend: the service's currentLoad() failed ({error}); reporting the "
            "connections' load instead ({count} time(s) {window})",
            error=loadFailures.last,
            count=sum(counts.values()),
            window=window(seconds),
        )

    # A service whose figure fails is said once a minute, not per report.
    loadFailures = Summary(reactor, tellLoadFailures, interval=60.0)

    def measure() -> Load:
        # The load on the cost scale: the work queued, connections x cost;
        # a service's own figure (1.0 = full) as that share of a full
        # backend's work, capacity x cost.  Without a measured cost (cost
        # 1/capacity) both are what they always were.
        n = counting.count
        cost = meter.cost()
        load = n * cost
        if callable(customLoad):
            # A figure that raises, or is not a finite number >= 0, must not
            # stop the reports (the balancer would take the backend for
            # dead): the connections' load stands in for it, said in the log.
            try:
                figure = float(customLoad())
                if not (math.isfinite(figure) and figure >= 0):
                    raise ValueError(f"currentLoad() returned {figure!r}")
            except Exception as e:
                loadFailures.count("failed", example=f"{type(e).__name__}: {e}")
            else:
                load = figure * capacity * cost
        return Load(connections=n, load=load, cost=cost)

    holder = {}

    def identify(channel) -> Identity:
        if options["advertise"] is not None:
            host, port = options["advertise"]
        else:
            listening = holder["service"].address
            host, port = listening.host, listening.port
            if host in _WILDCARDS:
                host = channel.transport.getHost().host
        name = options["name"] or formatHostPort(host, port)
        return Identity(name=name, host=host, port=port, capacity=capacity)

    from twistedcluster.backend.discovery import isSRV

    balancers = [
        (b, parsedEndpoint(clientFromString, reactor, b, "--balancer", client=True))
        for b in options["balancers"]
        if not isSRV(b)
    ]
    reporter = LoadReporter(
        reactor,
        identify,
        measure,
        balancers,
        interval=options["report-interval"],
        step=reportStep(capacity),
        secret=options["secret"],
        # A cost that left its level is news: the balancers route on it.
        costMoved=lambda: meter.moved(COST_LEVEL_TOLERANCE),
    )
    _discoverBalancers(options, reporter, reactor)
    site = None
    if options["metrics"]:
        from twistedcluster.backend.metrics import BackendCollector, BackendMetricsRoot
        from twistedcluster.wire.guardedweb import GuardedSite

        root = BackendMetricsRoot(
            BackendCollector(holder, measure, capacity, options["balancers"])
        )
        site = GuardedSite(root, reactor)
    svc = holder["service"] = BackendService(
        reactor,
        listen,
        counting,
        reporter,
        drainTimeout=options["drain-timeout"],
        metrics=options["metrics"],
        metricsSite=site,
    )
    svc.summaries = (loadFailures,)

    def connectionsChanged(count: int, served: bool) -> None:
        meter.changed(count, served)
        svc.connectionsChanged(count)

    counting.onChange = connectionsChanged
    from twistedcluster.hangup import HangUpService

    svc.hangUp = HangUpService(reactor)  # SIGHUP reopens the log
    log.info("backend reactor: {reactor}", reactor=type(reactor).__qualname__)
    return svc
