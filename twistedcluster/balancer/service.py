"""
``twistd cluster-balancer``: options and service composition.

The listeners (proxy, optional redirect, control, admin) share one
L{Cluster}; each is a Twisted server endpoint string.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from twistedcluster.options import loadSecretOption, oneLineDoc, positive
from twistedcluster.address import endpointParts
from twistedcluster.balancer.limits import AcceptErrors, ClientLimit, defaultMaxConnections
from twistedcluster.balancer.listeners import (
    listenerService,
    proxyProtocolInner,
    quietListenFailures,
    readsProxyHeader,
    withBacklog,
)
from twistedcluster.balancer.control import DEFAULT_FORGET_AFTER
from twistedcluster.balancer.healthcheck import DEFAULT_CHECK_INTERVAL, DEFAULT_FALL, DEFAULT_RISE
from twistedcluster.core.pool import DEFAULT_MAX_EJECTED_PERCENT
from twistedcluster.core.policies import (
    DEFAULT_HASH_BALANCE,
    DEFAULT_POLICY,
    POLICIES,
    UnknownPolicy,
    checkHashBalance,
    makePolicy,
)
from twistedcluster.balancer.redirect import DEFAULT_HANDOFF_WINDOW, DEFAULT_HANDOFFS_PER_SOURCE
from twistedcluster.balancer.slowstart import DEFAULT_SLOW_START, checkSlowStart
from twistedcluster.balancer.admission import DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT
from twistedcluster.balancer.passivehealth import (
    DEFAULT_EARLY_CLOSE_WINDOW,
    DEFAULT_EJECT_AFTER,
    DEFAULT_EJECT_FOR,
)
from twistedcluster.balancer.proxy import DEFAULT_ATTEMPTS, DEFAULT_CONNECT_TIMEOUT
from twistedcluster.wire.proxyheader import checkVersion
from twistedcluster.balancer.selfloop import OwnListeners
from twistedcluster.fast.fasttcp import prepareListener
from twistedcluster.fast.internals import tolerateALPN

log = Logger()

DEFAULT_LISTEN = "tcp:8000"
DEFAULT_CONTROL = "tcp:8100:interface=127.0.0.1"
DEFAULT_ADMIN = "tcp:8101:interface=127.0.0.1"
DEFAULT_BALANCER_DRAIN = 5.0


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a load balancer: clients connect to the proxy listener (or ask the "
        "redirect listener) and are sent to the least-loaded backend; backends "
        "register and report load on the control listener; cluster-admin talks "
        "to the admin listener. Every listener is a Twisted server endpoint "
        "string."
    )

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Proxy listener endpoint."],
        ["redirect", None, None, "Redirect listener endpoint (off unless given)."],
        [
            "backend-tls",
            None,
            None,
            "Speak TLS to every backend, verifying its certificate and host "
            "name: ca=PATH (PEM authorities; or ca=system)[,hostname=NAME "
            "(default: each backend's own host)][,cert=PATH,key=PATH (a client "
            "certificate)]. Off unless given.",
        ],
        [
            "send-proxy",
            None,
            None,
            "Start every connection to a backend with a PROXY protocol header "
            "(v1 or v2) naming the client, for backends that read one (off "
            "unless given).",
            checkVersion,
        ],
        ["control", None, DEFAULT_CONTROL, "Control listener endpoint, for backends."],
        ["admin", None, DEFAULT_ADMIN, "Admin listener endpoint, for cluster-admin."],
        [
            "metrics",
            None,
            None,
            "Metrics and status web listener (off unless given): /metrics in "
            "Prometheus' format, /status.json.",
        ],
        [
            "access-log",
            None,
            None,
            "Write one record per client connection, when it ends, to this "
            "file (appended; '-': standard output). Off unless given.",
        ],
        [
            "access-log-format",
            None,
            "text",
            "Access log records as 'text' (one line of key=value) or 'json' "
            "(one JSON object a line).",
        ],
        [
            "redirect-window",
            None,
            DEFAULT_HANDOFF_WINDOW,
            "Seconds a redirect answer counts as load on the backend it names "
            "until a report has seen the client's connection (at most).",
            positive(float),
        ],
        [
            "redirect-per-source",
            None,
            DEFAULT_HANDOFFS_PER_SOURCE,
            "Redirect answers counted as load per client address (IPv6: per "
            "/64) within one --redirect-window; past that a client still gets "
            "a backend with room, chosen at random, counting nothing.",
            positive(int),
        ],
        [
            "policy",
            None,
            DEFAULT_POLICY,
            f"Routing policy: {', '.join(sorted(POLICIES))}.",
        ],
        [
            "hash-balance",
            None,
            DEFAULT_HASH_BALANCE,
            "The hash policy's bound: no backend above FACTOR x the mean load "
            "(HAProxy's hash-balance-factor / 100); 0: no bound.",
            checkHashBalance,
        ],
        [
            "slow-start",
            None,
            DEFAULT_SLOW_START,
            "Seconds over which a backend that comes up (new, back after a "
            "failure, re-enabled) ramps from 1/20 of its weight to all of it "
            "(HAProxy's slowstart); not for those up as the balancer starts. "
            "0: off.",
            checkSlowStart,
        ],
        [
            "connect-timeout",
            None,
            DEFAULT_CONNECT_TIMEOUT,
            "Seconds to wait for a backend to accept a proxied connection.",
            positive(float),
        ],
        [
            "attempts",
            None,
            DEFAULT_ATTEMPTS,
            "Backends tried for one client connection before giving up.",
            positive(int),
        ],
        [
            "eject-after",
            None,
            DEFAULT_EJECT_AFTER,
            "Connects in a row that may fail before a backend is taken out for "
            "--eject-for seconds (0: never).",
            int,
        ],
        [
            "eject-for",
            None,
            DEFAULT_EJECT_FOR,
            "Seconds a backend taken out by failed connects stays out.",
            positive(float),
        ],
        [
            "max-ejected-percent",
            None,
            DEFAULT_MAX_EJECTED_PERCENT,
            "The most of the backends in service (up were they not taken "
            "out) that failures may take out at once, in percent, rounded "
            "down; one may always go, never the last one (100: no limit).",
            int,
        ],
        [
            "early-close-window",
            None,
            DEFAULT_EARLY_CLOSE_WINDOW,
            "A backend that closes or resets a proxied connection before "
            "sending anything, within this many seconds of the connect and "
            "while the client's side is open, counts as a failed connect "
            "(0: only failed connects count).",
            float,
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds without data either way after which a proxied connection "
            "is closed (default: never)",
            positive(float),
        ],
        [
            "queue-size",
            None,
            DEFAULT_QUEUE_SIZE,
            "Clients that may wait when every backend is at capacity; more "
            "are refused at once (0: refuse at once).",
            int,
        ],
        [
            "queue-timeout",
            None,
            DEFAULT_QUEUE_TIMEOUT,
            "Seconds a client may wait for a backend with room.",
            positive(float),
        ],
        [
            "check-interval",
            None,
            DEFAULT_CHECK_INTERVAL,
            "Seconds between TCP health checks of static backends.",
            positive(float),
        ],
        [
            "rise",
            None,
            DEFAULT_RISE,
            "Checks a down static backend must pass in a row to be up.",
            positive(int),
        ],
        [
            "fall",
            None,
            DEFAULT_FALL,
            "Checks a static backend may fail in a row before it is down.",
            positive(int),
        ],
        [
            "state-file",
            None,
            None,
            "JSON file where the balancer keeps operators' settings (drain, "
            "disable, weight, policy, static backends added by cluster-admin "
            "add) across restarts (default: not kept).",
        ],
        [
            "state-store",
            None,
            None,
            "Share operators' settings with every balancer on the same store "
            "and --state-prefix: etcd:HOST:PORT[,HOST:PORT...] (etcd members' "
            "client addresses, v3 API). Instead of --state-file.",
        ],
        [
            "state-prefix",
            None,
            "/twistedcluster/",
            "With --state-store: the etcd key prefix of this cluster's "
            "settings; balancers with the same prefix share them.",
        ],
        [
            "state-store-tls",
            None,
            None,
            "With --state-store: speak TLS to etcd, verifying its certificate: "
            "ca=PATH (or ca=system)[,hostname=NAME][,cert=PATH,key=PATH (a "
            "client certificate, for etcd's --client-cert-auth)].",
        ],
        [
            "state-store-user",
            None,
            None,
            "With --state-store: the etcd user to authenticate as (etcd's "
            "--auth, user/password); its roles must grant readwrite on "
            "--state-prefix. Needs --state-store-password-file.",
        ],
        [
            "state-store-password-file",
            None,
            None,
            "With --state-store-user: file holding that user's password (its "
            "first line; never give a password on the command line); readable "
            "by the balancer's user only (warned otherwise). If etcd refuses "
            "the credentials at start, the balancer exits with status 78.",
        ],
        [
            "drain-timeout",
            None,
            DEFAULT_BALANCER_DRAIN,
            "On SIGTERM, seconds proxied connections may take to finish (the "
            "listeners close at once) before they are reset.",
            positive(float),
        ],
        [
            "takeover",
            None,
            None,
            "Unix socket (mode 600) where a new balancer process started with "
            "the same --takeover PATH takes this one's listening sockets and "
            "pool over (a seamless upgrade); started with it while another "
            "balancer listens there, this one takes over from it. Off unless "
            "given.",
        ],
        [
            "takeover-drain",
            None,
            300.0,
            "After handing its listeners to a new process (--takeover), "
            "seconds this one keeps relaying its own connections before it "
            "resets what is left and exits.",
            positive(float),
        ],
        [
            "heartbeat-timeout",
            None,
            None,
            "Seconds without a load report after which a backend is marked "
            "down (default: 3 of the backend's report intervals)",
            positive(float),
        ],
        [
            "forget-after",
            None,
            DEFAULT_FORGET_AFTER,
            "Seconds a backend that registered itself may stay down before it "
            "is forgotten, unless an operator drained, disabled or weighted "
            "it (0: never).",
            float,
        ],
        [
            "secret-file",
            None,
            None,
            "File holding the shared secret that backends and cluster-admin "
            "must prove they hold (never sent over the network).",
        ],
        [
            "auth-timeout",
            None,
            5.0,
            "With --secret-file: seconds a control or admin connection has to "
            "authenticate.",
            positive(float),
        ],
        [
            "max-connections",
            None,
            None,
            "Client connections (proxy and redirect together) open at once; at "
            "the limit those listeners stop accepting and new clients wait in "
            "the listen backlog (default: from the open-file limit N, "
            "(N - min(N/4, 1024)) / 2, which keeps descriptors for the control "
            "and admin channels)",
            positive(int),
        ],
        [
            "workers",
            None,
            1,
            "Processes that serve the proxy and redirect listeners, on one "
            "shared listening socket each; this process keeps the control, "
            "admin and metrics listeners and the one view of the pool, and "
            "starts a worker again if it exits. --max-connections is per "
            "worker. 1: this process serves them itself.",
            positive(int),
        ],
        [
            "max-control-connections",
            None,
            4096,
            "Control connections open at once; more are closed at once.",
            positive(int),
        ],
        [
            "max-admin-connections",
            None,
            64,
            "Admin connections open at once; more are closed at once.",
            positive(int),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["backends"] = []
        self["backend-send-proxy"] = {}

    @oneLineDoc
    def opt_backend(self, spec: str) -> None:
        """
        A static backend that does not speak AMP, kept in the pool by TCP
        health checks: [NAME=]HOST:PORT[,weight=W][,capacity=C][,send-proxy=v1|v2] (name:
        HOST:PORT, capacity: 1000, unless given; repeatable).
        """
        from twistedcluster.balancer.staticbackend import parseStaticBackend

        try:
            backend = parseStaticBackend(spec)
        except ValueError as e:
            raise usage.UsageError(f"--backend {spec}: {e}") from None
        if any(b.name == backend.name for b in self["backends"]):
            raise usage.UsageError(f"--backend {spec}: a backend named {backend.name} is given twice")
        self["backends"].append(backend)
        if backend.sendProxy is not None:
            self["backend-send-proxy"][backend.name] = backend.sendProxy

    def parseOptions(self, options=None) -> None:
        # Kept for --workers: each worker parses the same arguments.
        import sys

        self["argv"] = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        if self["workers"] > 1 and self["takeover"]:
            # The workers share the listening sockets: a takeover would hand
            # over the main process's copies while the old workers kept
            # accepting on them.  Not built yet; refused rather than half done.
            raise usage.UsageError("--takeover cannot be used with --workers above 1 (yet)")
        if self["workers"] > 1:
            from twistedcluster.balancer.workers import SHAREABLE

            for role in ("listen", "redirect"):
                description = self[role]
                if description is None:
                    continue
                kind = endpointParts(proxyProtocolInner(description) or description)[0]
                if kind.lower() not in SHAREABLE and not kind.isdigit():
                    raise usage.UsageError(
                        f"--workers: the --{role} endpoint must be one of "
                        f"{', '.join(SHAREABLE)} (a worker adopts its socket), "
                        f"not {kind}"
                    )
        if self["eject-after"] < 0 or self["queue-size"] < 0:
            raise usage.UsageError("--eject-after and --queue-size must be >= 0")
        if not 0 <= self["max-ejected-percent"] <= 100:
            raise usage.UsageError("--max-ejected-percent must be from 0 to 100")
        if not self["early-close-window"] >= 0:
            raise usage.UsageError("--early-close-window must be >= 0")
        if not self["forget-after"] >= 0:
            raise usage.UsageError("--forget-after must be >= 0 (0: never)")
        self["state"] = None
        if self["state-file"]:
            from twistedcluster.balancer.statefile import StateFileError, load

            try:
                self["state"] = load(self["state-file"])
            except StateFileError as e:
                raise usage.UsageError(str(e)) from None
        self["state-members"] = None
        if self["state-store"]:
            from twistedcluster.balancer.statestore import parseStateStore

            if self["state-file"]:
                raise usage.UsageError("give --state-file or --state-store, not both")
            try:
                self["state-members"] = parseStateStore(self["state-store"])
            except ValueError as e:
                raise usage.UsageError(f"--state-store: {e}") from None
            if not self["state-prefix"]:
                raise usage.UsageError("--state-prefix must not be empty")
        self["state-tls"] = None
        if self["state-store-tls"] is not None:
            from twistedcluster.balancer.backendtls import parseBackendTLS

            if not self["state-store"]:
                raise usage.UsageError("--state-store-tls goes with --state-store")
            try:
                self["state-tls"] = parseBackendTLS(self["state-store-tls"])
            except ValueError as e:
                raise usage.UsageError(f"--state-store-tls: {e}") from None
        self["state-credentials"] = None
        if self["state-store-user"] is not None or self["state-store-password-file"] is not None:
            from twistedcluster.balancer.statestore import loadPassword

            if not self["state-store"]:
                raise usage.UsageError(
                    "--state-store-user and --state-store-password-file go with --state-store"
                )
            if not self["state-store-user"] or self["state-store-password-file"] is None:
                raise usage.UsageError(
                    "give --state-store-user and --state-store-password-file together"
                )
            try:
                password = loadPassword(self["state-store-password-file"])
            except ValueError as e:
                raise usage.UsageError(f"--state-store-password-file: {e}") from None
            self["state-credentials"] = (self["state-store-user"], password)
        self["secret"] = loadSecretOption(self["secret-file"])
        from twistedcluster.balancer.accesslog import FORMATS, openOutput

        if self["access-log-format"] not in FORMATS:
            raise usage.UsageError(
                f"--access-log-format must be one of {', '.join(FORMATS)}, "
                f"not {self['access-log-format']!r}"
            )
        self["access-log-output"] = None
        if self["access-log"]:
            try:
                self["access-log-output"] = openOutput(self["access-log"])
            except OSError as e:
                raise usage.UsageError(f"--access-log {self['access-log']}: {e}") from None
        if self["backend-tls"] is not None:
            from twistedcluster.balancer.backendtls import parseBackendTLS

            try:
                self["backend-tls"] = parseBackendTLS(self["backend-tls"])
            except ValueError as e:
                raise usage.UsageError(f"--backend-tls: {e}") from None
        if self["max-connections"] is None:
            self["max-connections"] = defaultMaxConnections()
        try:
            makePolicy(self["policy"])
        except UnknownPolicy as e:
            raise usage.UsageError(str(e)) from None


def isLocalOnly(description: str) -> bool:
    """
    Whether a server endpoint can only be reached from this host: a unix
    socket, or TCP bound to a loopback interface.
    """
    import ipaddress

    kind, args, kwargs = endpointParts(description)
    if kind.isdigit():  # the old "8100" form means tcp:8100
        kind, args = "tcp", [kind, *args]
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl", "mtls"):
        return False
    # tcp:PORT:INTERFACE may name the interface by position; ssl may not.
    positional = args[1] if kind in ("tcp", "tcp6") and len(args) > 1 else ""
    interface = kwargs.get("interface", positional)
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def writableByOthers(description: str) -> bool:
    """
    Whether a server endpoint is a unix socket that every local user may
    connect to: Twisted makes them mode 666 unless C{mode=} says otherwise.
    """
    kind, args, kwargs = endpointParts(description)
    if kind != "unix":
        return False
    try:
        return bool(int(kwargs.get("mode", "666"), 8) & 0o002)
    except ValueError:
        return False  # the endpoint parser will say what is wrong


def warnAboutExposure(options: Options) -> None:
    """
    Warn about listeners that let strangers act or look: control and admin
    reachable by others without a secret, metrics beyond loopback.
    """
    what = {
        "control": "register a backend and take traffic",
        "admin": "drain or reconfigure the cluster",
    }
    if options["secret"] is None:
        for role in ("control", "admin"):
            if not isLocalOnly(options[role]):
                log.warn(
                    "the {role} listener {endpoint} is reachable from other hosts "
                    "and no --secret-file is set: anyone who reaches it can "
                    "{what}",
                    role=role,
                    endpoint=options[role],
                    what=what[role],
                )
            elif writableByOthers(options[role]):
                log.warn(
                    "the {role} listener {endpoint} is a unix socket any local "
                    "user may write to, and no --secret-file is set: any local "
                    "user can {what}; add :mode=660 (or 600) to it",
                    role=role,
                    endpoint=options[role],
                    what=what[role],
                )
    if options["metrics"] and not isLocalOnly(options["metrics"]):
        log.warn(
            "the metrics listener {endpoint} is reachable from other hosts, and "
            "it has no authentication: anyone who reaches it can read every "
            "backend's name, address and load; bind it to 127.0.0.1 or a "
            "private network",
            endpoint=options["metrics"],
        )


class _DrainOnStop(Service):
    """
    Stops after the proxied connections have finished (or the deadline):
    twistd waits for it before stopping the reactor.  The access log, if
    any, is closed after them, so that their records are written.
    """

    #: Told to tell what they have summed when the drain is over (the
    #: client limit's and the accept errors' lines): the process exits next.
    summaries: tuple = ()

    def __init__(self, factory, timeout: float, accessLog=None) -> None:
        self.factory = factory
        self.timeout = timeout
        self.accessLog = accessLog

    def startService(self):
        super().startService()
        if self.accessLog is not None:
            self.accessLog.start()

    def stopService(self):
        super().stopService()
        d = self.factory.drain(self.timeout)

        def tell(result):
            for summary in self.summaries:
                summary.stop()
            return result

        d.addBoth(tell)
        if self.accessLog is not None:
            accessLog = self.accessLog
            d.addBoth(lambda _: accessLog.close())
        return d


class _WorkersAccessLogs:
    """
    The workers' access logs, as SIGHUP reopens them: each worker is told
    over its channel (workers ignore the signal).
    """

    def __init__(self, path: str) -> None:
        self.path = f"{path} (every worker's)"
        #: The L{twistedcluster.balancer.workers.WorkerSupervisor}, once made.
        self.workers: Optional[Any] = None

    def reopen(self) -> None:
        if self.workers is not None:
            self.workers.reopenAccessLogs()


def _logFilesAnd(accessLog, workers=None):
    """
    What SIGHUP reopens: twistd's log file, and the access log when it
    writes to a file (with C{--workers}, each worker's too: C{workers} is
    a L{_WorkersAccessLogs}).
    """
    from twistedcluster.hangup import logFiles

    if accessLog is None or accessLog.path is None:
        return logFiles
    extra = [accessLog] if workers is None else [accessLog, workers]
    return lambda: [*logFiles(), *extra]


def proxyListener(description: str):
    """
    The proxy listener's endpoint string and PROXY header parsers
    (L{readsProxyHeader}).
    """
    return readsProxyHeader(description, "balancer proxy listener")


def _stateStore(options: Options, cluster, statics, reactor, parent):
    """
    The shared state store (etcd): what it holds now is applied before the
    balancer starts; the returned service keeps it in step from then on.
    """
    from twistedcluster.balancer.statestore import (
        EXIT_STORE_AUTH,
        EtcdStateStore,
        StoreAuthFailed,
        loadBlocking,
        reconcile,
    )

    members, prefix = options["state-members"], options["state-prefix"]
    credentials = options.get("state-credentials")
    try:
        known = loadBlocking(
            members, prefix, tlsText=options.get("state-store-tls"), credentials=credentials
        )
    except StoreAuthFailed as e:
        # twistd has not begun its log yet: until it does, Twisted writes
        # critical events to standard error.  Out with a status of its own
        # (restarting will not help).
        log.critical("cluster-balancer: state store: {error}", error=str(e))
        raise SystemExit(EXIT_STORE_AUTH) from None
    if known is None:
        log.warn(
            "state store: no etcd member answered; starting without the cluster's "
            "settings, catching up once etcd answers",
        )
    else:
        reconcile(cluster, statics, known)
        log.info(
            "state store: {n} key(s) under {prefix} applied",
            n=len(known),
            prefix=prefix,
        )
    store = EtcdStateStore(
        members, prefix, cluster, statics, reactor, known=known, tls=options.get("state-tls"),
        credentials=credentials,
    )
    store.setServiceParent(parent)
    log.info(
        "balancer state store: etcd {members}, prefix {prefix}{tls}{user}",
        members=options["state-store"],
        prefix=prefix,
        tls=", TLS" if options.get("state-tls") is not None else "",
        user=f", as user {credentials[0]}" if credentials else "",
    )
    return store


def proxyFactoryFor(options: Options, cluster, reactor, traffic, parsers):
    """
    The proxy listener's factory as the options say: one place for the
    balancer and for each of its workers (L{twistedcluster.balancer.workers}).
    """
    from twistedcluster.balancer.proxy import ProxyFactory

    return ProxyFactory(
        cluster,
        reactor,
        connectTimeout=options["connect-timeout"],
        maxAttempts=options["attempts"],
        ejectAfter=options["eject-after"],
        ejectFor=options["eject-for"],
        maxEjectedPercent=options["max-ejected-percent"],
        earlyCloseWindow=options["early-close-window"],
        idleTimeout=options["idle-timeout"],
        queueSize=options["queue-size"],
        queueTimeout=options["queue-timeout"],
        traffic=traffic,
        sendProxy=options["send-proxy"],
        sendProxyFor=options["backend-send-proxy"],
        proxyParsers=parsers,
        backendTLS=options["backend-tls"],
    )


def _fdStore(listeners):
    """
    Under systemd with a file-descriptor store: its room, and the sockets
    it passed back (L{twistedcluster.balancer.fdstore.Stored}, or C{None}).
    """
    from twistedcluster.balancer import fdstore

    room = fdstore.capacity()
    if not room:
        return 0, None
    from twistedcluster.fast.internals import systemdDescriptors

    stored = fdstore.fromSystemd(
        systemdDescriptors(),
        skip=fdstore.systemdNames(description for _, description, _ in listeners),
    )
    log.info("balancer under systemd with a file-descriptor store (room for {n})", n=room)
    return room, stored


def makeService(options: Options, reactor=None):
    """
    Compose the balancer's listeners into one service.

    Under twistd with no --reactor, the balancer runs on
    L{twistedcluster.fast.reactor.LeanEPollReactor}.
    """
    if reactor is None:
        from twistedcluster.fast.reactor import installIfNone

        installIfNone()
        from twisted.internet import reactor
    from twistedcluster.balancer.admin import AdminFactory
    from twistedcluster.core.cluster import Cluster
    from twistedcluster.balancer.control import ControlFactory
    from twistedcluster.balancer.redirect import HandOffs, RedirectFactory

    from twistedcluster.balancer.healthcheck import TCPHealthChecks
    from twistedcluster.balancer.statefile import (
        StateKeeper,
        removeTemporaries,
        restore,
        restoreStatics,
    )

    quietListenFailures("cluster-balancer")
    # An ssl: listener takes clients that offer ALPN (curl, browsers).
    tolerateALPN()
    inherited = None
    if options["takeover"]:
        from twistedcluster.balancer import takeover

        try:
            inherited = takeover.inherit(options["takeover"])
        except takeover.TakeoverError as e:
            raise usage.UsageError(f"--takeover {options['takeover']}: {e}") from None
    cluster = Cluster(policy=options["policy"], hashBalance=options["hash-balance"])
    top = MultiService()
    top.cluster = cluster  # for embedding and tests
    # Always there: cluster-admin add may bring static backends at runtime.
    statics = TCPHealthChecks(
        cluster.pool,
        reactor,
        options["backends"],
        interval=options["check-interval"],
        timeout=min(options["connect-timeout"], options["check-interval"]),
        rise=options["rise"],
        fall=options["fall"],
        sendProxy=options["send-proxy"],
        sendProxyFor=options["backend-send-proxy"],
    )
    statics.setServiceParent(top)
    top.statics = statics  # for embedding and tests
    listen, parsers = proxyListener(options["listen"])
    #: role: its listening port once open, for /readyz.
    openPorts: Dict[str, object] = {}
    # No backend at this balancer's own proxy or redirect address: it would
    # relay every client to itself.  Known before any static backend is
    # restored (state file, state store, takeover), which is then refused.
    own = OwnListeners(
        openPorts,
        {
            "proxy": listen,
            "redirect": options["redirect"],
            "control": options["control"],
            "admin": options["admin"],
            "metrics": options["metrics"],
        },
    )
    statics.loopsBack = own.refusal
    onChange = None
    if options["state-file"]:
        from twistedcluster.balancer.statefile import StateFileError, checkFolder

        try:
            checkFolder(options["state-file"])
        except StateFileError as e:
            raise usage.UsageError(str(e)) from None
        state = options["state"]
        restore(cluster, state)
        restoreStatics(statics, state)
        for leftover in removeTemporaries(options["state-file"]):
            log.info(
                "removed {name}, a temporary state file left by an earlier crash",
                name=leftover,
            )
        onChange = StateKeeper(options["state-file"], cluster, reactor, statics=statics)
        log.info(
            "balancer state file {path}: {n} backend setting(s) and {m} static "
            "backend(s) added by cluster-admin restored",
            path=options["state-file"],
            n=len(state["backends"]),
            m=len(statics.added),
        )
    beforeChange = None
    if options.get("state-members"):
        onChange = beforeChange = _stateStore(options, cluster, statics, reactor, top)
    if inherited is not None:
        # The old process's operator state is the newest (its state file
        # is written a moment after each change).
        snap = inherited.state["operator"]
        if options.get("state-members"):
            # The policy is the store's (applied above, or once it answers)
            # when an operator set one, else this process's own --policy:
            # not the old process's.
            snap = {**snap, "policy": None}
        restore(cluster, snap)
        restoreStatics(
            statics,
            {"static": {n: b for n, b in snap.get("static", {}).items() if n not in statics.checks}},
        )
    if options["slow-start"]:
        from twistedcluster.balancer.slowstart import SlowStart

        SlowStart(cluster.pool, options["slow-start"], reactor).setServiceParent(top)

    secret = options["secret"]
    warnAboutExposure(options)
    from twistedcluster.balancer.accesslog import accessLogFor
    from twistedcluster.balancer.traffic import Traffic

    accessLog = accessLogFor(options, reactor)
    if accessLog is not None:
        log.info(
            "balancer access log: {path} ({logFormat})",
            path=options["access-log"],
            logFormat=options["access-log-format"],
        )
    traffic = top.traffic = Traffic(accessLog)
    proxyFactory = proxyFactoryFor(options, cluster, reactor, traffic, parsers)
    if options["backend-tls"] is not None:
        log.info(
            "balancer speaks TLS to every backend ({tls})", tls=options["backend-tls"].text
        )
    if options["send-proxy"]:
        log.info(
            "balancer sends a PROXY {version} header first on every backend connection",
            version=options["send-proxy"],
        )
    drainOnStop = _DrainOnStop(proxyFactory, options["drain-timeout"], accessLog)
    drainOnStop.setServiceParent(top)
    from twistedcluster.hangup import HangUpService

    # SIGHUP reopens the log, and the access log (logrotate moves both).
    workersAccessLogs = None
    if options["workers"] > 1 and accessLog is not None and accessLog.path is not None:
        workersAccessLogs = _WorkersAccessLogs(accessLog.path)
    HangUpService(
        reactor, findLogFiles=_logFilesAnd(accessLog, workersAccessLogs)
    ).setServiceParent(top)
    # Proxy and redirect clients share one limit; control and admin have
    # their own, and the descriptors the limit leaves.
    clientLimit = ClientLimit(options["max-connections"], reactor)
    acceptErrors = AcceptErrors(reactor)
    drainOnStop.summaries = (clientLimit, acceptErrors)
    controlFactory = ControlFactory(
        cluster,
        reactor,
        heartbeatTimeout=options["heartbeat-timeout"],
        secret=secret,
        maxConnections=options["max-control-connections"],
        authTimeout=options["auth-timeout"],
        forgetAfter=options["forget-after"],
    )
    # A static backend restored from the store never takes a registered name.
    statics.registered = controlFactory.owners.__contains__
    adminFactory = AdminFactory(
        cluster,
        reactor,
        onChange=onChange,
        beforeChange=getattr(beforeChange, "checkWritable", None),
        statics=statics,
        secret=secret,
        maxConnections=options["max-admin-connections"],
        authTimeout=options["auth-timeout"],
    )
    listeners = [
        ("proxy", listen, clientLimit.wrap(proxyFactory)),
        ("control", options["control"], controlFactory),
        ("admin", options["admin"], adminFactory),
    ]
    openPorts.update({role: None for role, _, _ in listeners})
    controlFactory.ownListeners = adminFactory.ownListeners = own
    for backend in options["backends"]:
        loop = own.refusal(backend.host, backend.port)
        if loop is not None:
            raise usage.UsageError(f"--backend {backend.describe()}: {loop}")
    redirectFactory = None
    if options["redirect"]:
        redirectFactory = RedirectFactory(
            cluster,
            reactor,
            HandOffs(options["redirect-window"], options["redirect-per-source"]),
            traffic=traffic,
        )
        # A hand-off stops counting once a report has seen it: its backend
        # gets the mark such a report echoes as soon as it has settled.
        redirectFactory.pushMarks = controlFactory.pushMarks
        listeners.append(("redirect", options["redirect"], clientLimit.wrap(redirectFactory)))
        openPorts["redirect"] = None
    workers = None
    if options["workers"] > 1:
        from twistedcluster.balancer.workers import WorkerSupervisor

        shared = [(role, description) for role, description, _ in listeners if role in ("proxy", "redirect")]
        listeners = [entry for entry in listeners if entry[0] not in ("proxy", "redirect")]

        def sharedPort(role, port):
            openPorts[role] = port

        workers = top.workers = WorkerSupervisor(
            options["workers"],
            cluster,
            reactor,
            shared,
            options["argv"],
            options["drain-timeout"],
            onPort=sharedPort,
            traffic=traffic,
            sendProxyFor=options["backend-send-proxy"],
            # --access-log -: the workers' records go to standard output as
            # they are (the workers log to standard error).
            shareStdout=options["access-log"] == "-",
            # The workers' redirect answers count here until a report has
            # seen them, as one balancer's own do.
            handedOff=redirectFactory.handedOff if redirectFactory is not None else None,
        )
        workers.setName("workers")
        workers.setServiceParent(top)
        if workersAccessLogs is not None:
            workersAccessLogs.workers = workers
        log.info(
            "balancer {n} workers serve {roles} on shared listening sockets",
            n=options["workers"],
            roles=", ".join(role for role, _ in shared),
        )
    if options["metrics"]:
        from twistedcluster.balancer.metrics import MetricsRoot
        from twistedcluster.wire.guardedweb import GuardedSite

        site = GuardedSite(
            MetricsRoot(
                cluster,
                # With --workers, what they relay, summed.
                workers.figures.proxy if workers is not None else proxyFactory,
                workers.figures.limit if workers is not None else clientLimit,
                (workers.figures.redirect if workers is not None else redirectFactory) if redirectFactory else None,
                controlFactory=controlFactory,
                adminFactory=adminFactory,
                traffic=traffic,
                # /readyz: every listener that takes clients or backends.
                listeners=openPorts,
                clock=reactor,
            ),
            reactor,
        )
        listeners.append(("metrics", options["metrics"], site))
    if inherited is not None:
        from twistedcluster.balancer.takeover import restoreLive

        restored = restoreLive(inherited.state, cluster, controlFactory, reactor, statics=statics)
        log.info(
            "takeover: {n} backend(s) up as the old process saw them, until "
            "they register here: {names}",
            n=len(restored),
            names=", ".join(restored) or "-",
        )
    #: role: its listening port, for --takeover.
    allPorts = {}

    def onPort(role):
        def listening(port):
            allPorts[role] = port
            if role in openPorts:
                openPorts[role] = port
            acceptErrors.watch(port, role)
            if role in ("proxy", "redirect"):
                clientLimit.listening(port)
            if role == "proxy":
                prepareListener(port)

        return listening

    storeRoom, stored = _fdStore(listeners)
    if stored is not None and inherited is None:
        from twistedcluster.balancer.takeover import restoreLive

        restored = restoreLive(stored.state, cluster, controlFactory, reactor)
        log.info(
            "fd store: {n} backend(s) up as the last process saw them, until "
            "they register here: {names}",
            n=len(restored),
            names=", ".join(restored) or "-",
        )
    for role, description, factory in listeners:
        adopted = inherited.take(role, description, reactor) if inherited else None
        if stored is not None and adopted is None:
            adopted = stored.take(role, description, reactor)
        svc = listenerService(description, factory, reactor, onPort(role), role, endpoint=adopted)
        svc.setName(role)
        svc.setServiceParent(top)
        log.info(
            "balancer {role} listener on {endpoint}",
            role=role,
            endpoint=withBacklog(description),
        )
    if stored is not None:
        stored.release()
    if storeRoom:
        from twistedcluster.balancer.fdstore import FDStoreService

        from twistedcluster.balancer.takeover import liveBackends

        FDStoreService(
            allPorts,
            {role: description for role, description, _ in listeners},
            stored,
            storeRoom,
            live=lambda: liveBackends(cluster, controlFactory),
            clock=reactor,
        ).setServiceParent(top)
    if options["takeover"]:
        from twistedcluster.balancer.takeover import takeoverService

        takeoverService(
            options, reactor, inherited, allPorts, listeners, cluster, statics,
            controlFactory, drainOnStop,
        ).setServiceParent(top)
    log.info(
        "balancer client connection limit: {limit} (proxy and redirect together)",
        limit=options["max-connections"],
    )
    log.info("balancer routing policy: {policy}", policy=cluster.policyName)
    log.info("balancer reactor: {reactor}", reactor=type(reactor).__qualname__)
    return top
