"""
The balancer's optional metrics and status web listener (``--metrics``).

``GET /metrics`` answers in Prometheus' text format; ``GET /status.json``
with what ``cluster-admin status --json`` prints.  Read-only: it changes
nothing, so it needs no secret, but like the admin listener it is best kept
on loopback or a private network.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, List, Optional

from twisted.web.resource import Resource

from twistedcluster.core.cluster import Cluster
from twistedcluster.wire.commands import backendItem
from twistedcluster.core.pool import State

__all__ = ["MetricsRoot", "prometheusText"]

_STATES = [s.value for s in State]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheusText(
    cluster: Cluster,
    clients: int,
    waiting: int,
    clientLimit=None,
    redirectRefused: Optional[int] = None,
    ejectionsSkipped: int = 0,
) -> str:
    """
    The cluster's figures in Prometheus' text exposition format.

    @param clientLimit: the L{twistedcluster.balancer.limits.ClientLimit}
        (C{--max-connections}), if any.
    @param redirectRefused: clients the redirect listener answered C{ERROR
        no-backend}, in total; C{None} without a redirect listener.
    @param ejectionsSkipped: backends kept in though they failed enough to be
        taken out (C{--max-ejected-percent}), in total.
    """
    snapshot = cluster.pool.snapshot()
    lines: List[str] = []

    def family(name: str, kind: str, help: str, samples: Iterable[str]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)

    def perBackend(name, kind, help, value: Callable) -> None:
        family(
            name,
            kind,
            help,
            (f'{name}{{backend="{_label(b.name)}"}} {value(b)}' for b in snapshot),
        )

    family(
        "twistedcluster_backend_state",
        "gauge",
        "1 for the state each backend is in.",
        (
            f'twistedcluster_backend_state{{backend="{_label(b.name)}",state="{s}"}} '
            f"{int(b.state.value == s)}"
            for b in snapshot
            for s in _STATES
        ),
    )
    perBackend("twistedcluster_backend_weight", "gauge", "Routing weight.", lambda b: b.weight)
    perBackend(
        "twistedcluster_backend_connections",
        "gauge",
        "Active connections the backend last reported.",
        lambda b: b.connections,
    )
    perBackend(
        "twistedcluster_backend_load",
        "gauge",
        "Last reported load (connections x cost, in seconds; a share of capacity "
        "from a backend that measures no cost).",
        lambda b: repr(b.load),
    )
    perBackend(
        "twistedcluster_backend_cost_seconds",
        "gauge",
        "What one connection costs the backend, as it last reported (1/capacity "
        "until measured).",
        lambda b: repr(b.cost),
    )
    perBackend(
        "twistedcluster_backend_active",
        "gauge",
        "Connections this balancer relays to the backend now.",
        lambda b: b.active,
    )
    perBackend(
        "twistedcluster_backend_routed_total",
        "counter",
        "Connections this balancer sent the backend.",
        lambda b: b.routed,
    )
    perBackend(
        "twistedcluster_backend_connect_failures",
        "gauge",
        "Connects to the backend that failed in a row.",
        lambda b: b.failures,
    )
    family(
        "twistedcluster_clients",
        "gauge",
        "Client connections open on the proxy listener.",
        [f"twistedcluster_clients {clients}"],
    )
    family(
        "twistedcluster_clients_waiting",
        "gauge",
        "Clients waiting for a backend with room.",
        [f"twistedcluster_clients_waiting {waiting}"],
    )
    if clientLimit is not None:
        family(
            "twistedcluster_client_limit",
            "gauge",
            "Client connections allowed open at once, proxy and redirect "
            "together (--max-connections).",
            [f"twistedcluster_client_limit {clientLimit.maxConnections}"],
        )
        family(
            "twistedcluster_client_connections",
            "gauge",
            "Client connections open now, proxy and redirect together.",
            [f"twistedcluster_client_connections {clientLimit.count}"],
        )
        family(
            "twistedcluster_accepting_paused",
            "gauge",
            "1 while the proxy and redirect listeners stop accepting (at the "
            "client limit).",
            [f"twistedcluster_accepting_paused {int(clientLimit.paused)}"],
        )
    if redirectRefused is not None:
        family(
            "twistedcluster_redirect_refused_total",
            "counter",
            "Redirect clients answered ERROR no-backend.",
            [f"twistedcluster_redirect_refused_total {redirectRefused}"],
        )
    pool = cluster.pool
    family(
        "twistedcluster_backends_ejected",
        "gauge",
        "Backends in service taken out by failures (the passive health check).",
        [f"twistedcluster_backends_ejected {pool.ejected}"],
    )
    family(
        "twistedcluster_ejections_skipped_total",
        "counter",
        "Backends kept in that failed enough to be taken out, because "
        "--max-ejected-percent were out already.",
        [f"twistedcluster_ejections_skipped_total {ejectionsSkipped}"],
    )
    return "\n".join(lines) + "\n"


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
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        root = self.root
        proxy, redirect = root.proxyFactory, root.redirectFactory
        text = prometheusText(
            root.cluster,
            len(proxy.clients) if proxy is not None else 0,
            proxy.waiting if proxy is not None else 0,
            clientLimit=root.clientLimit,
            redirectRefused=redirect.refused if redirect is not None else None,
            ejectionsSkipped=proxy.ejectionsSkipped if proxy is not None else 0,
        )
        return text.encode("utf-8")


class _Status(_Page):
    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        body = [backendItem(b) for b in self.root.cluster.pool.snapshot()]
        return json.dumps(body, indent=2).encode("utf-8")


class MetricsRoot(Resource):
    """
    ``/metrics`` and ``/status.json``; anything else is a 404.
    """

    def __init__(
        self, cluster: Cluster, proxyFactory=None, clientLimit=None, redirectFactory=None
    ) -> None:
        super().__init__()
        self.cluster = cluster
        self.proxyFactory = proxyFactory
        self.clientLimit = clientLimit
        self.redirectFactory = redirectFactory
        self.putChild(b"metrics", _Metrics(self))
        self.putChild(b"status.json", _Status(self))
