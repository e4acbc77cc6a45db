"""
The balancer's optional metrics and status web listener (``--metrics``).

``GET /metrics`` answers in Prometheus' text format; ``GET /status.json``
with what ``cluster-admin status --json`` prints.  Read-only: it changes
nothing, so it needs no secret, but like the admin listener it is best kept
on loopback or a private network.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, List

from twisted.web.resource import Resource

from twistedcluster.cluster import Cluster
from twistedcluster.pool import State

_STATES = [s.value for s in State]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheusText(cluster: Cluster, clients: int, waiting: int) -> str:
    """
    The cluster's figures in Prometheus' text exposition format.
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
    perBackend("twistedcluster_backend_load", "gauge", "Last reported load.", lambda b: repr(b.load))
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
    return "\n".join(lines) + "\n"


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, root: "MetricsRoot") -> None:
        super().__init__()
        self.root = root

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        proxy = self.root.proxyFactory
        text = prometheusText(
            self.root.cluster,
            len(proxy.clients) if proxy is not None else 0,
            proxy.waiting if proxy is not None else 0,
        )
        return text.encode("utf-8")


class _Status(Resource):
    isLeaf = True

    def __init__(self, root: "MetricsRoot") -> None:
        super().__init__()
        self.root = root

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        from twistedcluster.admin import _item

        body = [_item(b) for b in self.root.cluster.pool.snapshot()]
        return json.dumps(body, indent=2).encode("utf-8")


class MetricsRoot(Resource):
    """
    ``/metrics`` and ``/status.json``; anything else is a 404.
    """

    def __init__(self, cluster: Cluster, proxyFactory=None) -> None:
        super().__init__()
        self.cluster = cluster
        self.proxyFactory = proxyFactory
        self.putChild(b"metrics", _Metrics(self))
        self.putChild(b"status.json", _Status(self))
