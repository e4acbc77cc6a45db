"""
The backend's optional metrics listener (``--metrics``): ``GET /metrics``
in Prometheus' text format (its connections, capacity and load, and each
balancer's control channel: registered or not), and ``GET /healthz``.

As the balancer's, a custom C{prometheus_client} collector reads the
figures when scraped, on the reactor thread; read-only, no secret: keep it
on loopback or a private network.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.web.resource import Resource

__all__ = ["BackendCollector", "BackendMetricsRoot"]


class BackendCollector:
    """
    @param holder: where the L{twistedcluster.backend.service.BackendService}
        is, under C{"service"}, once made.
    @param measure: returns the backend's current L{Load}.
    @param balancers: the C{--balancer} endpoints, in order.
    """

    def __init__(self, holder, measure: Callable, capacity: int, balancers: Sequence[str]) -> None:
        self.holder = holder
        self.measure = measure
        self.capacity = capacity
        self.balancers = list(balancers)

    def collect(self) -> Iterator[Metric]:
        load = self.measure()
        yield GaugeMetricFamily(
            "twistedcluster_service_connections",
            "Connections the backend's service has open.",
            value=load.connections,
        )
        yield GaugeMetricFamily(
            "twistedcluster_service_load", "The load the backend reports.", value=load.load
        )
        yield GaugeMetricFamily(
            "twistedcluster_service_capacity", "Connections the backend is sized for (--capacity).",
            value=self.capacity,
        )
        reporter = self.holder["service"].reporter
        registered = {c.balancer for c in reporter.channels if c.registered}
        channel = GaugeMetricFamily(
            "twistedcluster_balancer_registered",
            "1 while the backend is registered with the balancer on this "
            "control endpoint, 0 while it is not (connecting, refused).",
            labels=["balancer"],
        )
        # Discovered balancers (--balancer srv:...) come and go.
        for b in getattr(reporter, "balancers", None) or self.balancers:
            channel.add_metric([b], int(b in registered))
        yield channel
        yield GaugeMetricFamily(
            "twistedcluster_backend_draining",
            "1 once the backend drains (SIGTERM).",
            value=int(bool(reporter._draining)),
        )


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.registry)


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class BackendMetricsRoot(Resource):
    """
    ``/metrics`` and ``/healthz``; anything else is a 404.
    """

    def __init__(self, collector: BackendCollector, processMetrics: bool = True) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        if processMetrics:
            ProcessCollector(registry=self.registry)
        self.putChild(b"metrics", _Metrics(self.registry))
        self.putChild(b"healthz", _Health())
