"""
The balancer's optional metrics and status web listener (``--metrics``).

  - ``GET /metrics``: Prometheus' text format, read from the pool and the
    counters when scraped, on the reactor thread (Twisted renders the page
    there; nothing else touches the pool): the series a backend each are
    written here (L{_backendPieces}), the rest by C{prometheus_client} from
    a custom collector (L{BalancerCollector}), with the process' CPU, memory
    and descriptors (L{exposition});
  - ``GET /status.json``: what ``cluster-admin status --json`` prints
    (``?view=page``: the policy, totals and backends, for the status page);
  - ``GET /healthz``: 200 while the process serves;
  - ``GET /readyz``: 200 when at least one backend is up and every listener
    is open, else 503 with a one-line reason;
  - ``GET /``: the live status page (L{twistedcluster.balancer.statuspage}).

Read-only: it changes nothing, so it needs no secret, but like the admin
listener it is best kept on loopback or a private network.
"""

from __future__ import annotations

import json
from typing import Dict, Iterator, List, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.utils import floatToGoString
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.pool import State
from twistedcluster.wire.commands import backendItem

__all__ = ["BalancerCollector", "MetricsRoot", "exposition", "pageStatus", "readiness"]

_STATES = [s.value for s in State]
#: The Prometheus text format C{generate_latest} writes.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class BalancerCollector:
    """
    The balancer's series that are not a backend each (those are
    L{_backendPieces}), read from the cluster and the factories each time it
    is collected.

    @param root: the L{MetricsRoot} whose cluster and factories are read.
    """

    def __init__(self, root: "MetricsRoot") -> None:
        self.root = root

    def collect(self) -> Iterator[Metric]:
        root = self.root
        pool = root.cluster.pool
        proxy, redirect = root.proxyFactory, root.redirectFactory

        yield GaugeMetricFamily(
            "twistedcluster_clients",
            "Client connections open on the proxy listener.",
            value=len(proxy.clients) if proxy is not None else 0,
        )
        yield GaugeMetricFamily(
            "twistedcluster_clients_waiting",
            "Clients waiting for a backend with room.",
            value=proxy.waiting if proxy is not None else 0,
        )
        limit = root.clientLimit
        if limit is not None:
            yield GaugeMetricFamily(
                "twistedcluster_client_limit",
                "Client connections allowed open at once, proxy and redirect "
                "together (--max-connections).",
                value=limit.maxConnections,
            )
            yield GaugeMetricFamily(
                "twistedcluster_client_connections",
                "Client connections open now, proxy and redirect together.",
                value=limit.count,
            )
            yield GaugeMetricFamily(
                "twistedcluster_accepting_paused",
                "1 while the proxy and redirect listeners stop accepting (at "
                "the client limit).",
                value=int(limit.paused),
            )
        if redirect is not None:
            yield CounterMetricFamily(
                "twistedcluster_redirect_refused_total",
                "Redirect clients answered ERROR no-backend.",
                value=redirect.refused,
            )
        yield GaugeMetricFamily(
            "twistedcluster_backends_ejected",
            "Backends in service taken out by failures (the passive health check).",
            value=pool.ejected,
        )
        health = proxy.health if proxy is not None else None
        yield CounterMetricFamily(
            "twistedcluster_ejections_skipped_total",
            "Backends kept in that failed enough to be taken out, because "
            "--max-ejected-percent were out already.",
            value=health.ejectionsSkipped if health is not None else 0,
        )
        # -- added with prometheus_client ---------------------------------
        policy = GaugeMetricFamily(
            "twistedcluster_policy", "1 for the routing policy in use.", labels=["policy"]
        )
        policy.add_metric([root.cluster.policyName], 1)
        yield policy
        if health is not None:
            yield CounterMetricFamily(
                "twistedcluster_ejections_total",
                "Backends taken out by the passive health check.",
                value=health.ejections,
            )
            yield CounterMetricFamily(
                "twistedcluster_readmissions_total",
                "Backends taken out that were tried again after --eject-for.",
                value=health.readmissions,
            )
        traffic = root.traffic
        if traffic is not None:
            yield from self._traffic(traffic)
        if proxy is not None:
            admission = proxy.admission
            yield CounterMetricFamily(
                "twistedcluster_queue_waits_total",
                "Clients that waited for a backend with room.",
                value=admission.waited,
            )
            yield CounterMetricFamily(
                "twistedcluster_queue_timeouts_total",
                "Clients refused after waiting --queue-timeout.",
                value=admission.timedOut,
            )
        control = root.controlFactory
        if control is not None:
            yield CounterMetricFamily(
                "twistedcluster_reports_received_total",
                "Load reports and registrations received from backends.",
                value=control.reports,
            )
            yield GaugeMetricFamily(
                "twistedcluster_control_connections",
                "Control channels open (backends, and peers yet to register).",
                value=len(control.open),
            )
        admin = root.adminFactory
        if admin is not None:
            yield GaugeMetricFamily(
                "twistedcluster_admin_connections",
                "Admin channels open.",
                value=len(admin.open),
            )

    def _traffic(self, traffic) -> Iterator[Metric]:
        ended = CounterMetricFamily(
            "twistedcluster_connections_ended_total",
            "Client connections ended, by listener and how they ended "
            "(the access log's end field).",
            labels=["listener", "end"],
        )
        for (listener, end), n in sorted(traffic.ended.items()):
            ended.add_metric([listener, end], n)
        yield ended
        h = traffic.connectTime
        connect = HistogramMetricFamily(
            "twistedcluster_connect_seconds",
            "Seconds from a proxy client's accept to its backend's (retries "
            "and queue waits included).",
        )
        connect.add_metric([], h.cumulative(), h.sum)
        yield connect
        duration = HistogramMetricFamily(
            "twistedcluster_connection_duration_seconds",
            "Seconds client connections lasted, by listener.",
            labels=["listener"],
        )
        for listener, h in sorted(traffic.duration.items()):
            duration.add_metric([listener], h.cumulative(), h.sum)
        yield duration


#: The series a backend each: (name, type, help, the figure of a
#: L{twistedcluster.core.pool.BackendStatus}).  As C{prometheus_client}
#: would write them (a counter's name ends in C{_total}).
_PER_BACKEND = (
    ("twistedcluster_backend_weight", "gauge", "Routing weight.", lambda b: b.weight),
    (
        "twistedcluster_backend_slow_start_share",
        "gauge",
        "Share of its weight the backend takes now: below 1 while slow start ramps it up.",
        lambda b: b.ramp,
    ),
    (
        "twistedcluster_backend_connections",
        "gauge",
        "Active connections the backend last reported.",
        lambda b: b.connections,
    ),
    (
        "twistedcluster_backend_load",
        "gauge",
        "Last reported load (connections x cost, in seconds; a share of capacity "
        "from a backend that measures no cost).",
        lambda b: b.load,
    ),
    (
        "twistedcluster_backend_cost_seconds",
        "gauge",
        "What one connection costs the backend, as least-load routes on it: the "
        "cost it last reported, within 10% (costs that close count as one), "
        "1/capacity until measured.",
        lambda b: b.cost,
    ),
    (
        "twistedcluster_backend_active",
        "gauge",
        "Connections this balancer relays to the backend now.",
        lambda b: b.active,
    ),
    (
        "twistedcluster_backend_routed_total",
        "counter",
        "Connections this balancer sent the backend.",
        lambda b: b.routed,
    ),
    (
        "twistedcluster_backend_connect_failures",
        "gauge",
        "Connects to the backend that failed in a row.",
        lambda b: b.failures,
    ),
)


def _value(v) -> str:
    """
    A sample's value as C{prometheus_client} writes it (Go's float format),
    the common small integers without its float round trip.
    """
    if type(v) is int and -1000000 < v < 1000000:
        return f"{v}.0"
    return floatToGoString(v)


def _label(value: str) -> str:
    """
    A label value escaped for the text format.
    """
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _head(lines: List[str], name: str, kind: str, doc: str) -> None:
    doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
    lines.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")


#: Backends a piece of the page holds, each series: a page of thousands of
#: backends is written a piece a reactor turn (L{_Stream}), and the reactor
#: serves everyone else between pieces (a piece is about 3 ms).
PIECE = 500
#: Above this many backends a page is streamed, piece by piece; below, it
#: is written at once (a few milliseconds).
STREAM_ABOVE = 1000


def _backendPieces(root: "MetricsRoot", piece: int) -> Iterator[str]:
    """
    The series a backend each (states, weights, loads, counts, report ages,
    bytes) in Prometheus' text format, C{piece} backends of one series at a
    time, all from one snapshot of the pool.  Written here rather than by
    C{prometheus_client}: at thousands of backends they are nearly all of
    the page, and its per-sample path held the reactor for 0.6 s a scrape at
    3,000 backends and over 2 s at 10,000, every client waiting meanwhile
    (docs/benchmarks.md).  The text is the same, family by family.
    """
    snapshot = root.cluster.pool.snapshot()
    names = [_label(b.name) for b in snapshot]
    # Index ranges, not slices of (status, name) pairs: what lives across
    # the turns of a page is two lists, not thousands of small containers
    # for the garbage collector to promote, and later to walk (a full
    # collection of a balancer with 10,000 backends takes about 0.3 s).
    count = len(snapshot)
    slices = [range(i, min(count, i + piece)) for i in range(0, count, piece)] or [range(0)]
    lines: List[str] = []
    add = lines.append

    def done() -> str:
        text = "".join(lines)
        lines.clear()
        return text

    _head(lines, "twistedcluster_backend_state", "gauge", "1 for the state each backend is in.")
    for part in slices:
        for i in part:
            name, current = names[i], snapshot[i].state.value
            for s in _STATES:
                add(
                    f'twistedcluster_backend_state{{backend="{name}",state="{s}"}} '
                    f'{"1.0" if s == current else "0.0"}\n'
                )
        yield done()
    for metric, kind, doc, figure in _PER_BACKEND:
        _head(lines, metric, kind, doc)
        for part in slices:
            for i in part:
                add(f'{metric}{{backend="{names[i]}"}} {_value(figure(snapshot[i]))}\n')
            yield done()
    control = root.controlFactory
    if control is not None:
        metric = "twistedcluster_backend_report_age_seconds"
        _head(lines, metric, "gauge", "Seconds since the backend's last load report.")
        now = control.clock.seconds()
        last = control.lastReport
        for part in slices:
            for i in part:
                at = last.get(snapshot[i].name)
                if at is not None:
                    add(f'{metric}{{backend="{names[i]}"}} {floatToGoString(max(0.0, now - at))}\n')
            yield done()
    traffic = root.traffic
    if traffic is not None:
        traffic.forget(root.cluster.pool)
        metric = "twistedcluster_backend_bytes_total"
        _head(
            lines,
            metric,
            "counter",
            "Bytes relayed to and from each backend, counted when each connection ends.",
        )
        moved = traffic.bytes
        order = sorted(moved)
        for i in range(0, len(order), piece):
            for name in order[i : i + piece]:
                counts = moved.get(name)
                if counts is None:  # forgotten since the page began
                    continue
                toBackend, fromBackend = counts
                name = _label(name)
                add(
                    f'{metric}{{backend="{name}",direction="to_backend"}} {_value(toBackend)}\n'
                    f'{metric}{{backend="{name}",direction="from_backend"}} {_value(fromBackend)}\n'
                )
            yield done()
        yield done()


def _metricsPieces(root: "MetricsRoot") -> Iterator[bytes]:
    """
    The C{/metrics} page in pieces: the series a backend each, then the rest.
    """
    for piece in _backendPieces(root, PIECE):
        yield piece.encode("utf-8")
    yield generate_latest(root.registry)


def exposition(root: "MetricsRoot") -> bytes:
    """
    The whole C{/metrics} page at once (a pool small enough not to stream).
    """
    return b"".join(_metricsPieces(root))


def _statusPieces(root: "MetricsRoot", page: bool) -> Iterator[bytes]:
    """
    C{/status.json} in pieces of L{PIECE} backends, from one snapshot: one
    backend a line as C{cluster-admin status --json} prints them, or with
    C{page}, compact inside what the status page reads (L{pageStatus}).
    """
    snapshot = root.cluster.pool.snapshot()
    if page:
        head = json.dumps(pageStatus(root, []), separators=(",", ":"))
        # ... "backends":[]}: the backends go between the brackets.
        opening, between, closing = head[:-2], ",", "]}"
        dump = _compact
    else:
        if not snapshot:
            yield b"[]"
            return
        opening, between, closing = "[\n  ", ",\n  ", "\n]"
        dump = json.dumps
    yield opening.encode("utf-8")
    for i in range(0, len(snapshot), PIECE):
        text = between.join(dump(backendItem(b)) for b in snapshot[i : i + PIECE])
        yield ((between if i else "") + text).encode("utf-8")
    yield closing.encode("utf-8")


def _compact(item) -> str:
    return json.dumps(item, separators=(",", ":"))


@implementer(IPushProducer)
class _Stream:
    """
    A page of many backends (C{/metrics}, C{/status.json}), written one
    piece a reactor turn (L{PIECE} backends), so the reactor serves everyone
    else between pieces; paused while the reader's socket is full, so the
    memory a slow reader holds does not grow with the number of backends
    either.
    """

    _call = None
    _paused = False

    def __init__(self, request, pieces: Iterator[bytes], reactor) -> None:
        self.request = request
        self.reactor = reactor
        self.pieces: Optional[Iterator[bytes]] = pieces
        request.registerProducer(self, True)
        # A reader that goes away mid-page: nothing more is written.
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self._paused and self.pieces is not None:
            self._call = self.reactor.callLater(0, self._next)

    def _next(self) -> None:
        self._call = None
        pieces = self.pieces
        if pieces is None:
            return
        piece = next(pieces, None)
        if piece is None:
            self.pieces = None
            request = self.request
            request.unregisterProducer()
            request.finish()
            return
        if piece:
            self.request.write(piece)
        self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        # The reader went away.
        self.pieces = None
        self.pauseProducing()


def _streams(root: "MetricsRoot"):
    """
    The reactor to stream a page with, when the pool is large enough to be
    worth it and there is one (tests may give none); else C{None}.
    """
    reactor = root.clock
    if len(root.cluster.pool) <= STREAM_ABOVE or not hasattr(reactor, "callLater"):
        return None
    return reactor


def readiness(root: "MetricsRoot") -> Optional[str]:
    """
    Why the balancer is not ready to take clients, in one line, or C{None}
    when it is: at least one backend up and every listener open.
    """
    for role, port in root.listeners.items():
        if port is None:
            return f"the {role} listener is not open yet"
        if not getattr(port, "connected", True):
            return f"the {role} listener is closed"
    if root.cluster.pool.candidates():
        return None
    snapshot = root.cluster.pool.snapshot()
    if not snapshot:
        return "no backend has registered"
    up = [b for b in snapshot if b.state is State.UP]
    if not up:
        return f"no backend up ({len(snapshot)} known, none up)"
    return f"no backend can take a connection ({len(up)} up, all full or taken out)"


class _Page(Resource):
    """
    One page of the listener; answers from its L{MetricsRoot}'s figures.
    """

    isLeaf = True

    def __init__(self, root: "MetricsRoot") -> None:
        super().__init__()
        self.root = root


class _Metrics(_Page):
    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE)
        root = self.root
        reactor = _streams(root)
        if reactor is None:
            return exposition(root)
        _Stream(request, _metricsPieces(root), reactor)
        return NOT_DONE_YET


class _Status(_Page):
    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        root = self.root
        page = request.args.get(b"view") == [b"page"]
        pieces = _statusPieces(root, page)
        reactor = _streams(root)
        if reactor is None:
            return b"".join(pieces)
        _Stream(request, pieces, reactor)
        return NOT_DONE_YET


def pageStatus(root: "MetricsRoot", backends: List[Dict]) -> Dict:
    """
    What the status page shows: the policy, totals, readiness, backends.
    """
    proxy, traffic = root.proxyFactory, root.traffic
    ended = traffic.ended if traffic is not None else {}
    failed = sum(n for (_, end), n in ended.items() if end.startswith(("refused", "connect", "queue")))
    return {
        "time": root.clock.seconds() if root.clock is not None else None,
        "policy": root.cluster.policyName,
        "ready": readiness(root),
        "clients": len(proxy.clients) if proxy is not None else 0,
        "waiting": proxy.waiting if proxy is not None else 0,
        "ended": sum(ended.values()),
        "refused": failed,
        "backends": backends,
    }


class _Health(_Page):
    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class _Ready(_Page):
    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        why = readiness(self.root)
        if why is None:
            return b"ready\n"
        request.setResponseCode(503)
        return f"not ready: {why}\n".encode("utf-8")


class MetricsRoot(Resource):
    """
    ``/``, ``/metrics``, ``/status.json``, ``/healthz``, ``/readyz``;
    anything else is a 404.

    @param traffic: the client connections' counts
        (L{twistedcluster.balancer.traffic.Traffic}); the proxy factory's
        unless given.
    @param listeners: role: its listening port once open (C{None} before),
        for C{/readyz}; a dict the balancer fills in as ports open.
    @param processMetrics: add the process' CPU, memory and descriptors.
    """

    def __init__(
        self,
        cluster: Cluster,
        proxyFactory=None,
        clientLimit=None,
        redirectFactory=None,
        controlFactory=None,
        adminFactory=None,
        traffic=None,
        listeners: Optional[Dict[str, object]] = None,
        clock=None,
        processMetrics: bool = True,
    ) -> None:
        super().__init__()
        self.cluster = cluster
        self.proxyFactory = proxyFactory
        self.clientLimit = clientLimit
        self.redirectFactory = redirectFactory
        self.controlFactory = controlFactory
        self.adminFactory = adminFactory
        if traffic is None and proxyFactory is not None:
            traffic = proxyFactory.traffic
        self.traffic = traffic
        self.listeners = listeners if listeners is not None else {}
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BalancerCollector(self))
        if processMetrics:
            ProcessCollector(registry=self.registry)
        from twistedcluster.balancer.statuspage import StatusPage

        self.putChild(b"", StatusPage())
        self.putChild(b"metrics", _Metrics(self))
        self.putChild(b"status.json", _Status(self))
        self.putChild(b"healthz", _Health(self))
        self.putChild(b"readyz", _Ready(self))

