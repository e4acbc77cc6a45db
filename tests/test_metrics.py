"""
The metrics and status web listener.
"""

import json
import urllib.request

from twisted.web.test.requesthelper import DummyRequest
from twisted.web.resource import getChildForRequest

from twistedcluster.core.cluster import Cluster
from twistedcluster.localcluster import LocalCluster, freePort, waitFor
from twistedcluster.balancer.metrics import MetricsRoot, prometheusText


def cluster():
    c = Cluster()
    c.pool.register("web1", "127.0.0.1", 9001, capacity=10, connections=3, load=0.3)
    c.pool.register('odd"name', "127.0.0.1", 9002)
    c.pool.markDown('odd"name')
    c.pool.acquire("web1")
    return c


def test_prometheus_text_has_every_backend_and_state():
    text = prometheusText(cluster(), clients=5, waiting=1)
    assert 'twistedcluster_backend_state{backend="web1",state="up"} 1' in text
    assert 'twistedcluster_backend_state{backend="web1",state="down"} 0' in text
    assert 'twistedcluster_backend_state{backend="odd\\"name",state="down"} 1' in text
    assert 'twistedcluster_backend_connections{backend="web1"} 3' in text
    assert 'twistedcluster_backend_cost_seconds{backend="web1"} 0.1' in text
    assert 'twistedcluster_backend_routed_total{backend="web1"} 1' in text
    assert "twistedcluster_clients 5" in text
    assert "twistedcluster_clients_waiting 1" in text
    assert "# TYPE twistedcluster_backend_routed_total counter" in text


#: Every series name /metrics had before the client limit's: kept.
SERIES = [
    "twistedcluster_backend_state",
    "twistedcluster_backend_weight",
    "twistedcluster_backend_connections",
    "twistedcluster_backend_load",
    "twistedcluster_backend_active",
    "twistedcluster_backend_routed_total",
    "twistedcluster_backend_connect_failures",
    "twistedcluster_clients",
    "twistedcluster_clients_waiting",
]


def test_the_client_limit_redirect_refusals_and_ejections_are_shown():
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from twistedcluster.balancer.limits import ClientLimit
    from twistedcluster.balancer.proxy import ProxyFactory
    from twistedcluster.balancer.redirect import RedirectFactory

    c = cluster()
    limit = ClientLimit(2, Clock())
    wrapped = limit.wrap(Factory.forProtocol(Protocol))
    redirect = RedirectFactory(Cluster(), Clock())
    for _ in range(3):
        redirect.noBackend()
    proxy = ProxyFactory(c, MemoryReactorClock())
    proxy.health.ejectionsSkipped = 4
    root = MetricsRoot(c, proxy, clientLimit=limit, redirectFactory=redirect)

    def scrape():
        body, _ = render(root, "/metrics")
        return body.decode()

    text = scrape()
    for name in SERIES:
        assert f"# TYPE {name} " in text
    assert "twistedcluster_client_limit 2" in text
    assert "twistedcluster_client_connections 0" in text
    assert "twistedcluster_accepting_paused 0" in text
    assert "# TYPE twistedcluster_redirect_refused_total counter" in text
    assert "twistedcluster_redirect_refused_total 3" in text
    assert "twistedcluster_backends_ejected 0" in text
    assert "twistedcluster_ejections_skipped_total 4" in text
    for _ in range(2):
        wrapped.buildProtocol(None).makeConnection(StringTransport())
    text = scrape()
    assert "twistedcluster_client_connections 2" in text
    assert "twistedcluster_accepting_paused 1" in text


def render(root, path):
    request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
    resource = getChildForRequest(root, request)
    return resource.render(request), request


def test_status_json_matches_the_admin_fields():
    body, request = render(MetricsRoot(cluster()), "/status.json")
    data = json.loads(body)
    assert [b["name"] for b in data] == ['odd"name', "web1"]
    assert {"name", "host", "port", "state", "connections", "load", "routed"} <= set(data[1])


def test_metrics_listener_end_to_end(tmp_path):
    lc = LocalCluster(tmp_path)
    port = freePort()
    try:
        lc.startBalancer(extra=[f"--metrics=tcp:{port}:interface=127.0.0.1"])
        lc.startBackend("web1", extra=["--report-interval=0.2"])
        lc.waitUp(["web1"])

        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        text = waitFor(scrape, 10, "the metrics listener")
        assert 'twistedcluster_backend_state{backend="web1",state="up"} 1' in text
        # The balancer wires its client limit in (no redirect listener here).
        assert "twistedcluster_client_limit " in text
        assert "twistedcluster_accepting_paused 0" in text
        assert "twistedcluster_redirect_refused_total" not in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            assert json.load(r)[0]["name"] == "web1"
    finally:
        lc.stopAll()
