"""
The metrics and status web listener.
"""

import json
import socket
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.test.requesthelper import DummyRequest
from twisted.web.resource import getChildForRequest

from tests.loopback import listening, until
from tests.test_guardedweb import exchange
from twistedcluster.balancer import metrics
from twistedcluster.balancer.metrics import _PER_BACKEND, MetricsRoot, exposition
from twistedcluster.core.cluster import Cluster
from twistedcluster.localcluster import LocalCluster, freePort, waitFor
from twistedcluster.wire.guardedweb import GuardedSite


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
    path, _, query = path.partition("?")
    request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        request.args.setdefault(key.encode(), []).append(value.encode())
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


# -- a page of thousands of backends ------------------------------------------


def manyBackends(n):
    c = Cluster()
    for i in range(n):
        odd = '"' if i % 7 == 0 else ""
        c.pool.register(f"b{i:05d}{odd}", "127.0.0.1", 10000 + i,
                        capacity=100, connections=i % 50, load=(i % 50) / 100)
    return c


def test_the_backend_series_read_as_prometheus_client_writes_them():
    # The per-backend series are written by hand (prometheus_client's
    # per-sample path took 1.8 s at 10,000 backends): a scraper must read
    # the same page as before, odd names, counters and all.
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    c = manyBackends(40)
    c.pool.register('we"i\\rd\nname', "127.0.0.1", 9)
    c.pool.markDown("b00003")
    c.pool.acquire("b00002")
    root, proxy = proxyRoot(c, processMetrics=False)
    proxy.traffic.bytes.update({"b00001": [5, 12345678901], 'we"i\\rd\nname': [0, 7]})
    ours = samples(exposition(root).decode())

    class Reference:
        """The families as prometheus_client would write them."""

        def collect(self):
            snapshot = c.pool.snapshot()
            state = GaugeMetricFamily("twistedcluster_backend_state", "s", labels=["backend", "state"])
            for b in snapshot:
                for s in ("up", "draining", "disabled", "down"):
                    state.add_metric([b.name, s], int(b.state.value == s))
            yield state
            for name, kind, _, figure in _PER_BACKEND:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = cls(name, "h", labels=["backend"])
                for b in snapshot:
                    family.add_metric([b.name], figure(b))
                yield family
            moved = CounterMetricFamily("twistedcluster_backend_bytes_total", "b", labels=["backend", "direction"])
            for name, (to, frm) in proxy.traffic.bytes.items():
                moved.add_metric([name, "to_backend"], to)
                moved.add_metric([name, "from_backend"], frm)
            yield moved

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference())
    reference = samples(generate_latest(registry).decode())
    assert reference and all(ours.get(k) == v for k, v in reference.items()), [
        (k, v, ours.get(k)) for k, v in reference.items() if ours.get(k) != v
    ][:5]
    assert ours[("twistedcluster_backend_bytes_total",
                 (("backend", "b00001"), ("direction", "from_backend")))] == 12345678901


class Ticker:
    """
    Counts reactor turns: a call scheduled for the next turn at every turn.
    """

    def __init__(self):
        self.turns = 0
        self.call = reactor.callLater(0, self.tick)

    def tick(self):
        self.turns += 1
        self.call = reactor.callLater(0, self.tick)

    def stop(self):
        if self.call.active():
            self.call.cancel()


def streams(monkeypatch):
    """
    Record each page being streamed, and the reactor turns at each piece.
    """
    seen = []

    class Recorded(metrics._Stream):
        def __init__(self, *a, **kw):
            self.turnsAtPieces = []
            seen.append(self)
            super().__init__(*a, **kw)

        def _next(self):
            self.turnsAtPieces.append(ticker.turns)
            super()._next()

    ticker = Ticker()
    monkeypatch.setattr(metrics, "_Stream", Recorded)
    return seen, ticker


def fetch(port, path="/metrics"):
    return exchange(port, f"GET {path} HTTP/1.0\r\n\r\n".encode())


def readAtOnce(c, path):
    """
    The page as written at once (no reactor to stream with), parsed.
    """
    body, _ = render(MetricsRoot(c, processMetrics=False), path)
    return parsed(path, body)


def parsed(path, body):
    if path == "/metrics":
        return samples(body.decode())
    value = json.loads(body)
    if isinstance(value, dict):
        value.pop("time")
    return value


@pytest.mark.parametrize("path", ["/metrics", "/status.json", "/status.json?view=page"])
@pytest_twisted.ensureDeferred
async def test_a_page_of_thousands_of_backends_leaves_the_reactor_between_pieces(monkeypatch, path):
    n = metrics.STREAM_ABOVE + 1500
    c = manyBackends(n)
    root = MetricsRoot(c, clock=reactor, processMetrics=False)
    seen, ticker = streams(monkeypatch)
    try:
        async with listening(GuardedSite(root, reactor)) as port:
            got = await deferToThread(fetch, port, path)
    finally:
        ticker.stop()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    # The page is the one written at once, whole.
    page = parsed(path, body)
    assert page == readAtOnce(c, path)
    assert len(page if path == "/metrics" else json.loads(body)) >= (10 * n if path == "/metrics" else 1)
    # Written in pieces, each in a turn of its own: the reactor served
    # everything else between them.
    [stream] = seen
    turns = stream.turnsAtPieces
    assert len(turns) > 5 and all(b > a for a, b in zip(turns, turns[1:])), turns


def test_status_json_is_one_backend_a_line_as_cluster_admin_prints_it():
    from twistedcluster.cli.admin import formatJSON

    c = cluster()
    body, _ = render(MetricsRoot(c), "/status.json")
    items = json.loads(body)
    assert [i["name"] for i in items] == ['odd"name', "web1"]
    assert body.decode() == formatJSON(items)
    empty, _ = render(MetricsRoot(Cluster()), "/status.json")
    assert json.loads(empty) == []


@pytest_twisted.ensureDeferred
async def test_a_scraper_that_stops_reading_pauses_the_page_and_one_that_leaves_ends_it(monkeypatch):
    # About 12 MB of page: more than the kernel's socket buffers take.
    c = manyBackends(15000)
    root = MetricsRoot(c, clock=reactor, processMetrics=False)
    seen, ticker = streams(monkeypatch)
    try:
        async with listening(GuardedSite(root, reactor)) as port:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                await until(lambda: seen, what="the page begun")
                [stream] = seen
                # It runs until the socket's buffers are full, then pauses
                # for good: a slow scraper holds what the kernel does and a
                # piece, not the page.
                written = -1
                for _ in range(50):
                    before, written = written, len(stream.turnsAtPieces)
                    if stream._paused and before == written:
                        break
                    await deferLater(reactor, 0.2, lambda: None)
                else:
                    raise AssertionError(f"never paused for 0.2 s: {written} pieces written")
                assert stream.pieces is not None
                assert written < 0.8 * len(_PER_BACKEND) * 15000 / metrics.PIECE
            finally:
                s.close()
            await until(lambda: stream.pieces is None, what="the page given up")
            assert stream._call is None
            # The listener serves the next scraper.
            got = await deferToThread(fetch, port, "/healthz")
            assert got.endswith(b"ok\n")
    finally:
        ticker.stop()
