"""
The metrics and status web listener.
"""

import json
import urllib.request

from twisted.web.test.requesthelper import DummyRequest
from twisted.web.resource import getChildForRequest

from twistedcluster.core.cluster import Cluster
from twistedcluster.localcluster import LocalCluster, freePort, waitFor
from twistedcluster.balancer.metrics import MetricsRoot


def cluster():
    c = Cluster()
    c.pool.register("web1", "127.0.0.1", 9001, capacity=10, connections=3, load=0.3)
    c.pool.register('odd"name', "127.0.0.1", 9002)
    c.pool.markDown('odd"name')
    c.pool.acquire("web1")
    return c


def families(text):
    """
    The exposition as a scraper reads it: C{prometheus_client}'s parser.
    """
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text):
    """
    Every sample: (name, sorted labels) -> value.
    """
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families(text).values()
        for s in f.samples
    }


def proxyRoot(c, **kw):
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer.proxy import ProxyFactory

    proxy = ProxyFactory(c, MemoryReactorClock())
    return MetricsRoot(c, proxy, **kw), proxy


def scrape(root):
    body, request = render(root, "/metrics")
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
    return body.decode()


def test_prometheus_text_has_every_backend_and_state():
    root, proxy = proxyRoot(cluster())
    text = scrape(root)
    got = samples(text)
    assert got[("twistedcluster_backend_state", (("backend", "web1"), ("state", "up")))] == 1
    assert got[("twistedcluster_backend_state", (("backend", "web1"), ("state", "down")))] == 0
    assert got[("twistedcluster_backend_state", (("backend", 'odd"name'), ("state", "down")))] == 1
    assert got[("twistedcluster_backend_connections", (("backend", "web1"),))] == 3
    assert got[("twistedcluster_backend_routed_total", (("backend", "web1"),))] == 1
    assert got[("twistedcluster_clients", ())] == 0
    assert got[("twistedcluster_backend_cost_seconds", (("backend", "web1"),))] == 0.1
    assert "# TYPE twistedcluster_backend_routed_total counter" in text
    # Process metrics come with it.
    assert got[("process_open_fds", ())] > 0
    assert got[("process_resident_memory_bytes", ())] > 0


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

    text = scrape(root)
    for name in SERIES:
        assert f"# TYPE {name} " in text
    got = samples(text)
    assert got[("twistedcluster_client_limit", ())] == 2
    assert got[("twistedcluster_client_connections", ())] == 0
    assert got[("twistedcluster_accepting_paused", ())] == 0
    assert "# TYPE twistedcluster_redirect_refused_total counter" in text
    assert got[("twistedcluster_redirect_refused_total", ())] == 3
    assert got[("twistedcluster_backends_ejected", ())] == 0
    assert got[("twistedcluster_ejections_skipped_total", ())] == 4
    for _ in range(2):
        wrapped.buildProtocol(None).makeConnection(StringTransport())
    got = samples(scrape(root))
    assert got[("twistedcluster_client_connections", ())] == 2
    assert got[("twistedcluster_accepting_paused", ())] == 1


#: Every series name /metrics had before it moved to prometheus_client
#: (with the client limit, redirect and ejection ones): kept, same types.
KEPT = {
    "twistedcluster_backend_state": "gauge",
    "twistedcluster_backend_weight": "gauge",
    "twistedcluster_backend_connections": "gauge",
    "twistedcluster_backend_load": "gauge",
    "twistedcluster_backend_active": "gauge",
    "twistedcluster_backend_routed_total": "counter",
    "twistedcluster_backend_connect_failures": "gauge",
    "twistedcluster_clients": "gauge",
    "twistedcluster_clients_waiting": "gauge",
    "twistedcluster_client_limit": "gauge",
    "twistedcluster_client_connections": "gauge",
    "twistedcluster_accepting_paused": "gauge",
    "twistedcluster_redirect_refused_total": "counter",
    "twistedcluster_backends_ejected": "gauge",
    "twistedcluster_ejections_skipped_total": "counter",
}


def typesOf(text):
    return dict(
        line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE ")
    )


def test_every_series_name_and_type_from_before_prometheus_client_is_kept():
    from twisted.internet.task import Clock

    from twistedcluster.balancer.limits import ClientLimit
    from twistedcluster.balancer.redirect import RedirectFactory

    root, _ = proxyRoot(
        cluster(),
        clientLimit=ClientLimit(2, Clock()),
        redirectFactory=RedirectFactory(Cluster(), Clock()),
    )
    types = typesOf(scrape(root))
    assert {name: types.get(name) for name in KEPT} == KEPT


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


def test_healthz_and_readyz_say_why_in_one_line():
    c = Cluster()
    root = MetricsRoot(c, listeners={"proxy": None})
    body, request = render(root, "/healthz")
    assert body == b"ok\n"
    body, request = render(root, "/readyz")
    assert request.responseCode == 503
    assert body == b"not ready: the proxy listener is not open yet\n"

    class Port:
        connected = True

    root.listeners["proxy"] = Port()
    body, request = render(root, "/readyz")
    assert (request.responseCode, body) == (503, b"not ready: no backend has registered\n")
    c.pool.register("web1", "127.0.0.1", 9001)
    c.pool.markDown("web1")
    body, _ = render(root, "/readyz")
    assert body == b"not ready: no backend up (1 known, none up)\n"
    c.pool.markUp("web1")
    body, request = render(root, "/readyz")
    assert (request.responseCode or 200, body) == (200, b"ready\n")
    root.listeners["proxy"].connected = False
    body, request = render(root, "/readyz")
    assert (request.responseCode, body) == (503, b"not ready: the proxy listener is closed\n")


def test_the_status_page_is_self_contained_and_its_data_has_the_totals():
    body, request = render(MetricsRoot(cluster()), "/")
    page = body.decode()
    assert "status.json?view=page" in page
    # No external asset: nothing loaded from anywhere else.
    for needle in ("http://", "https://", "src=", "<link"):
        assert needle not in page
    assert b"default-src 'none'" in request.responseHeaders.getRawHeaders(b"content-security-policy")[0]
    request = DummyRequest([b"status.json"])
    request.args = {b"view": [b"page"]}
    root = MetricsRoot(cluster())
    data = json.loads(getChildForRequest(root, request).render(request))
    assert data["policy"] == "least-load"
    assert data["ready"] is None or "not ready" not in data["ready"]
    assert [b["name"] for b in data["backends"]] == ['odd"name', "web1"]
    assert {"clients", "waiting", "ended", "refused"} <= set(data)
