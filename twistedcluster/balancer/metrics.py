"""
The balancer's optional metrics and status web listener (``--metrics``).

  - ``GET /metrics``: Prometheus' text format, written by
    C{prometheus_client} from a custom collector (L{BalancerCollector}) that
    reads the pool and the counters when scraped, on the reactor thread
    (Twisted renders the page there; nothing else touches the pool), plus
    the process' CPU, memory and descriptors;
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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from twisted.web.resource import Resource

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.pool import State
from twistedcluster.wire.commands import backendItem

__all__ = ["BalancerCollector", "MetricsRoot", "pageStatus", "readiness"]

_STATES = [s.value for s in State]
#: The Prometheus text format C{generate_latest} writes.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class BalancerCollector:
    """
    Every balancer series, read from the cluster and the factories each
    time it is collected.

    @param root: the L{MetricsRoot} whose cluster and factories are read.
    """

    def __init__(self, root: "MetricsRoot") -> None:
        self.root = root

    def collect(self) -> Iterator[Metric]:
        root = self.root
        pool = root.cluster.pool
        snapshot = pool.snapshot()
        proxy, redirect = root.proxyFactory, root.redirectFactory

        state = GaugeMetricFamily(
            "twistedcluster_backend_state",
            "1 for the state each backend is in.",
            labels=["backend", "state"],
        )
        for b in snapshot:
            for s in _STATES:
                state.add_metric([b.name, s], int(b.state.value == s))
        yield state

        def perBackend(cls, name, doc, value):
            family = cls(name, doc, labels=["backend"])
            for b in snapshot:
                family.add_metric([b.name], value(b))
            return family

        yield perBackend(GaugeMetricFamily, "twistedcluster_backend_weight", "Routing weight.", lambda b: b.weight)
        yield perBackend(
            GaugeMetricFamily,
            "twistedcluster_backend_slow_start_share",
            "Share of its weight the backend takes now: below 1 while slow start ramps it up.",
            lambda b: b.ramp,
        )
        yield perBackend(
            GaugeMetricFamily,
            "twistedcluster_backend_connections",
            "Active connections the backend last reported.",
            lambda b: b.connections,
        )
        yield perBackend(
            GaugeMetricFamily,
            "twistedcluster_backend_load",
            "Last reported load (connections x cost, in seconds; a share of capacity "
            "from a backend that measures no cost).",
            lambda b: b.load,
        )
        yield perBackend(
            GaugeMetricFamily,
            "twistedcluster_backend_cost_seconds",
            "What one connection costs the backend, as least-load routes on it: the "
            "cost it last reported, within 10% (costs that close count as one), "
            "1/capacity until measured.",
            lambda b: b.cost,
        )
        yield perBackend(
            GaugeMetricFamily,
            "twistedcluster_backend_active",
            "Connections this balancer relays to the backend now.",
            lambda b: b.active,
        )
        yield perBackend(
            CounterMetricFamily,
            "twistedcluster_backend_routed_total",
            "Connections this balancer sent the backend.",
            lambda b: b.routed,
        )
        yield perBackend(
            GaugeMetricFamily,
            "twistedcluster_backend_connect_failures",
            "Connects to the backend that failed in a row.",
            lambda b: b.failures,
        )
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
            yield from self._traffic(traffic, pool)
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
            now = control.clock.seconds()
            age = GaugeMetricFamily(
                "twistedcluster_backend_report_age_seconds",
                "Seconds since the backend's last load report.",
                labels=["backend"],
            )
            last = control.lastReport
            for b in snapshot:
                at = last.get(b.name)
                if at is not None:
                    age.add_metric([b.name], max(0.0, now - at))
            yield age
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

    def _traffic(self, traffic, pool) -> Iterator[Metric]:
        ended = CounterMetricFamily(
            "twistedcluster_connections_ended_total",
            "Client connections ended, by listener and how they ended "
            "(the access log's end field).",
            labels=["listener", "end"],
        )
        for (listener, end), n in sorted(traffic.ended.items()):
            ended.add_metric([listener, end], n)
        yield ended
        traffic.forget(pool)
        moved = CounterMetricFamily(
            "twistedcluster_backend_bytes_total",
            "Bytes relayed to and from each backend, counted when each "
            "connection ends.",
            labels=["backend", "direction"],
        )
        for name, (toBackend, fromBackend) in sorted(traffic.bytes.items()):
            moved.add_metric([name, "to_backend"], toBackend)
            moved.add_metric([name, "from_backend"], fromBackend)
        yield moved
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
    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return generate_latest(self.root.registry)


class _Status(_Page):
    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        root = self.root
        body = [backendItem(b) for b in root.cluster.pool.snapshot()]
        if request.args.get(b"view") != [b"page"]:
            return json.dumps(body, indent=2).encode("utf-8")
        return json.dumps(pageStatus(root, body), separators=(",", ":")).encode("utf-8")


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

