"""
Smoke test of the benchmark harness (bench/run.py): its quickest run, direct
and balancer only, tiny numbers; the table must come out with every row.
"""

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"


def _loadRun():
    spec = importlib.util.spec_from_file_location("bench_run_under_test", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skipUnlessPossible():
    if not RUN.exists():
        pytest.skip(f"no benchmark harness at {RUN} (not a checkout)")
    if not hasattr(select, "epoll"):
        pytest.skip("the benchmark's load generator needs Linux epoll")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError as e:
        pytest.skip(f"cannot bind a client socket to 127.0.0.2 ({e}); the harness needs 127.0.0.0/8 on loopback")


def test_quickRunPrintsTheTable(tmp_path):
    _skipUnlessPossible()
    run = _loadRun()
    out = tmp_path / "figures.json"
    argv = [
        sys.executable, str(RUN), "--quick", "--parts", "echo",
        "--targets", "direct,balancer",
        "--duration", "0.4", "--warmup", "0.1",
        "--connections", "8", "--inflight", "4", "--bulk", "2", "--held", "100",
        "--logs", str(tmp_path / "logs"), "--json", str(out),
    ]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stdout.splitlines()
    header = next((l for l in lines if l.startswith("metric")), None)
    assert header is not None, result.stdout
    for column in ("direct", "balancer", "portforward", "haproxy", "bal/pf", "bal/direct"):
        assert column in header.split()
    labels = {
        "connections": 8, "inflight": 4, "bulk": 2, "heldText": "100",
    }
    for key, label, unit, higher in run.ROWS:
        text = label.format(**labels)
        row = next((l for l in lines if l.startswith(text)), None)
        assert row is not None, f"no row {text!r} in:\n{result.stdout}"
        values = row[len(text):].split()
        # direct and balancer measured; portforward and haproxy not asked for.
        assert values[0] != "-" and values[1] != "-", row
        assert values[2] == "-" and values[3] == "-", row
    assert "issue 7 targets" in result.stdout
    assert "load generator:" in result.stdout
    # Progress went to standard error while it ran.
    assert "echo 1/1: balancer" in result.stderr
    figures = json.loads(out.read_text())
    assert set(figures["figures"]) == {"direct", "balancer"}
    for name in ("direct", "balancer"):
        assert figures["figures"][name]["echo_rps"] > 0
        assert figures["figures"][name]["bulk_mbps"] > 0
    # Nothing failed or came back corrupt on the way.
    assert not [n for n in figures["notes"] if "corrupt" in n or "only" in n], figures["notes"]


def test_baselineAndLoadsMeasureTwoCopiesSideBySide(tmp_path):
    # --baseline runs a second balancer from another copy of the code in
    # front of the same backend; --loads runs only the measurements named.
    _skipUnlessPossible()
    base = tmp_path / "base"
    base.mkdir()
    subprocess.run(
        ["cp", "-r", str(ROOT / "twistedcluster"), str(base / "twistedcluster")], check=True
    )
    out = tmp_path / "figures.json"
    argv = [
        sys.executable, str(RUN), "--quick", "--parts", "echo",
        "--targets", "balancer", "--baseline", str(base), "--loads", "echo,connect",
        "--duration", "0.4", "--warmup", "0.1", "--connections", "8", "--inflight", "4",
        "--logs", str(tmp_path / "logs"), "--json", str(out),
    ]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    header = next(l for l in result.stdout.splitlines() if l.startswith("metric")).split()
    assert "baseline" in header and "bal/base" in header
    figures = json.loads(out.read_text())
    assert set(figures["figures"]) == {"balancer", "baseline"}
    for name in ("balancer", "baseline"):
        f = figures["figures"][name]
        assert f["echo_rps"] > 0 and f["conn_rate"] > 0
        assert f["bulk_mbps"] is None and f["rss_per_conn"] is None  # not asked for
    assert figures["ratios"]["bal/base"]["echo_rps"] > 0
    # The baseline balancer ran the copy's code, the other one this checkout's.
    assert f"twistd cluster-balancer from {base}" in result.stderr


def test_nginxPartPrintsItsTableAndTheIssue16Targets(tmp_path):
    # wrk -> proxy -> nginx: every row for direct, HAProxy (both ways), the
    # balancer, its relay alone (twisted-relay), the least relay Python can
    # run (python-floor; both come with the balancer) and that relay on
    # Twisted's reactor (reactor-relay, asked for), routed by a dict of
    # counts (count-relay) and by the real pool (pool-relay, with it), the
    # balancer with two workers (asked for; its CPU is its processes'), and
    # a verdict line for each target of issue 16.
    _skipUnlessPossible()
    import shutil

    missing = [t for t in ("nginx", "wrk", "haproxy") if not (shutil.which(t) or os.path.exists(f"/usr/sbin/{t}"))]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/run installs them with apt-get)")
    out = tmp_path / "figures.json"
    argv = [
        sys.executable, str(RUN), "--parts", "nginx", "--rounds", "1", "--duration", "1",
        "--targets", "direct,balancer,haproxy", "--reactor-relay", "--balancer-workers", "2",
        "--logs", str(tmp_path / "logs"), "--json", str(out),
    ]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    from bench import nginx

    lines = result.stdout.splitlines()
    header = next(l for l in lines if l.startswith("metric")).split()
    assert header[1:11] == [
        "direct", "haproxy", "haproxy-splice", "balancer", "balancer-workers", "twisted-relay", "reactor-relay",
        "count-relay", "pool-relay", "python-floor",
    ], header
    for key, label, unit, higher in nginx.NGINX_ROWS:
        row = next((l for l in lines if l.startswith(label)), None)
        assert row is not None, f"no row {label!r} in:\n{result.stdout}"
        values = row[len(label):].split()
        # Every target has the rates and latencies; only the proxies' CPU
        # per operation, and direct's (nginx's), are there too.
        assert all(v != "-" for v in values[:10]), row
    verdicts = [l.split(None, 1) for l in lines if l.startswith(("  PASS", "  FAIL", "  n/a"))]
    assert len(verdicts) == 5, result.stdout
    assert all(mark in ("PASS", "FAIL") for mark, _ in verdicts), result.stdout
    figures = json.loads(out.read_text())["nginx"]
    assert set(figures["figures"]) == {
        "direct", "haproxy", "haproxy-splice", "balancer", "balancer-workers", "twisted-relay", "reactor-relay",
        "count-relay", "pool-relay", "python-floor",
    }
    for name, f in figures["figures"].items():
        assert f["ka_rps"] > 0 and f["close_rate"] > 0 and f["bulk_mbps"] > 0, name
    # wrk saw no errors through any of them: the reference relays too relay
    # keep-alive, Connection: close and a 50 MB stream (back-pressure) whole.
    assert not figures["notes"], figures["notes"]
    # Every target but the added latency says what the least Python relay
    # reaches on it, in the same run, and what a relay on Twisted's reactor
    # reaches routing by a dict of counts, and with the real pool.
    assert sum("python-floor" in text for _, text in verdicts) == 4, result.stdout
    assert sum("pool-relay" in text for _, text in verdicts) == 4, result.stdout
    assert sum("count-relay" in text for _, text in verdicts) == 4, result.stdout
    # The workers' rate, beside HAProxy's one thread, with their CPU.
    info = [l for l in lines if l.startswith("  info new conn/s with --workers=2")]
    assert len(info) == 1 and "us of its processes' CPU per new conn" in info[0], result.stdout


def test_straceSummaryIsParsed():
    if not (ROOT / "bench" / "syscalls.py").exists():
        pytest.skip("not a checkout")
    from bench import syscalls

    text = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 30.00    0.030000           3     10000           recvfrom
 20.00    0.020000           2     10000      5000 connect
------ ----------- ----------- --------- --------- ----------------
100.00    0.050000           2     20000      5000 total
"""
    assert syscalls.parseStrace(text) == {"recvfrom": (10000, 0), "connect": (10000, 5000)}


def test_routingCostIsPrinted():
    routing = ROOT / "bench" / "routing.py"
    if not routing.exists():
        pytest.skip("not a checkout")
    result = subprocess.run(
        [sys.executable, str(routing), "--backends", "1,20"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [l.split() for l in result.stdout.splitlines() if l.startswith(("least-", "round-"))]
    assert [(r[0], r[1]) for r in rows] == [
        (p, n) for p in ("least-load", "least-conn", "round-robin") for n in ("1", "20")
    ]
    assert all(float(r[2]) > 0 for r in rows)


def test_redirectShortConnectionsPrintsServedAndRefused():
    script = ROOT / "bench" / "redirectshort.py"
    if not script.exists():
        pytest.skip("not a checkout")
    result = subprocess.run(
        [sys.executable, str(script), "--seconds", "1", "--clients", "1", "--capacity", "50"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    [line] = [l for l in result.stdout.splitlines() if "this checkout:" in l]
    served = float(line.split(":")[1].split()[0].replace(",", ""))
    assert served > 0 and "answered ERROR no-backend" in line



def test_controlPlaneWithWorkersPrintsTheWorkersCpu():
    # The main process's view of 50 reporting backends reaches both
    # workers, and their CPU is measured beside its own.
    script = ROOT / "bench" / "controlplane.py"
    if not script.exists():
        pytest.skip("not a checkout")
    result = subprocess.run(
        [sys.executable, str(script), "--backends", "50", "--seconds", "1", "--status-calls", "1",
         "--workers", "2"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "--workers 2: cpu % is the main process's, workers % theirs together" in result.stdout
    [row] = [l for l in result.stdout.splitlines() if l.split()[:2] == ["this", "50"]]
    reports, cpu, workers = (float(x.replace(",", "")) for x in row.split()[2:5])
    assert reports > 0 and cpu > 0 and workers >= 0
    [measured] = [json.loads(l) for l in result.stderr.splitlines() if l.startswith('{"backends"')]
    assert measured["workerProcesses"] == 2


def test_metricsScrapePrintsTheScrapeAndTheRoundTrips():
    # Enough backends that the page is streamed (above STREAM_ABOVE).
    script = ROOT / "bench" / "metricsscrape.py"
    if not script.exists():
        pytest.skip("not a checkout")
    result = subprocess.run(
        [sys.executable, str(script), "--backends", "1100", "--seconds", "1"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    [line] = [l for l in result.stdout.splitlines() if "1,100 backends: scrape" in l]
    # The whole page, every backend in it, and the echoes went on.
    assert float(line.split("scrape ")[1].split()[0]) > 0
    assert float(line.split("(")[1].split()[0]) > 0.5  # MB: 1,100 backends' series
    trips = int(line.split("echo round trips (")[1].split(")")[0].replace(",", ""))
    assert trips > 0 and "longest" in line

def test_reusePortRunsSeveralBalancersOnOnePort(tmp_path):
    # Two balancer processes share one port (each its own SO_REUSEPORT
    # socket, handed over as a systemd socket); both relay without errors.
    _skipUnlessPossible()
    script = ROOT / "bench" / "reuseport.py"
    result = subprocess.run(
        [sys.executable, str(script), "--processes", "1,2", "--rounds", "1",
         "--duration", "0.4", "--warmup", "0.1", "--inflight", "4", "--connections", "8"],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    rows = {}
    for line in result.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("1", "2"):
            rows[cells[0]] = cells
    assert set(rows) == {"1", "2"}, result.stdout
    for cells in rows.values():
        assert float(cells[1].replace(",", "")) > 0 and float(cells[4].replace(",", "")) > 0
    assert "errors" not in result.stderr


# -- bench/routing_quality.py: its pieces, then a tiny run ----------------------


def _routingQuality():
    if not (ROOT / "bench" / "routing_quality.py").exists():
        pytest.skip("not a checkout")
    from bench import routing_quality

    return routing_quality


def test_poissonArrivalsAreSeededAndBounded():
    rq = _routingQuality()
    a = rq.poissonArrivals(1000.0, 2.0, 10_000, seed=3)
    assert a == rq.poissonArrivals(1000.0, 2.0, 10_000, seed=3)
    assert a != rq.poissonArrivals(1000.0, 2.0, 10_000, seed=4)
    assert all(0 < x < 2.0 for x in a) and a == sorted(a)
    assert 1800 < len(a) < 2200
    assert len(rq.poissonArrivals(1000.0, 2.0, 50, seed=3)) == 50


def test_serialServiceAnswersOneRequestAtATime():
    # The hetero set-up's backend: requests wait their turn, each takes the
    # service time, a client gone before its turn costs nothing.
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twistedcluster.backend.service import loadServiceFactory

    rq = _routingQuality()
    made = loadServiceFactory("bench.routing_quality.serve_8ms")
    assert isinstance(made, rq.SerialFactory) and made.seconds == 0.008
    clock = Clock()
    factory = rq.SerialFactory(0.002, clock)
    clients = []
    for _ in range(3):
        proto = factory.buildProtocol(None)
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 9001))
        proto.makeConnection(transport)
        proto.dataReceived(b"q\n")
        clients.append((proto, transport))
    clients[1][0].connectionLost(None)
    clock.advance(0.0019)
    assert [t.value() for _, t in clients] == [b"", b"", b""]
    clock.advance(0.0001)
    assert clients[0][1].value() == b"9001\n" and clients[0][1].disconnecting
    assert clients[2][1].value() == b""
    clock.advance(0.002)
    assert clients[2][1].value() == b"9001\n" and clients[1][1].value() == b""
    assert factory.served == 2 and not factory.busy


def test_routingQualityVerdicts():
    rq = _routingQuality()

    def hetero(p99s):
        return [{"p99": p, "p50": 1.0, "slowShare": 0.1, "lagP99": 0.1, "failures": 0} for p in p99s]

    def spread(values):
        return [{"maxMean": v, "newDrew": 100, "failures": 0} for v in values]

    results = {
        "hetero": {"least-load": hetero([31.7] * 6), "haproxy-leastconn": hetero([31.6] * 6)},
        "spread": {"least-load": spread([1.1, 1.3, 1.1])},
        "newcomer1": {"least-load": spread([1.3, 1.3, 1.1])},
    }
    v = {target.split(":")[0]: passed for target, passed, _ in rq.verdicts(results)}
    assert v == {
        "hetero": False, "spread, two balancers": True,
        "newcomer, one balancer": False, "newcomer, two balancers": None,
    }
    results["hetero"]["least-load"] = hetero([15.0] * 5 + [40.0])
    assert rq.verdicts(results)[0][1] is True
    lines = rq.table(results, ["least-load", "haproxy-leastconn"])
    assert any(l.split()[:2] == ["least-load", "31.7"] or l.split()[:2] == ["least-load", "15.0"] for l in lines)
    assert "FAIL" in "\n".join(rq.verdictLines(results))


def test_routingQualityQuickRunPrintsTablesAndTargets(tmp_path):
    # Real processes, one policy, no HAProxy, the two cheapest set-ups.
    _skipUnlessPossible()
    script = ROOT / "bench" / "routing_quality.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--setups", "hetero,spread",
         "--policies", "least-load", "--no-haproxy", "--hetero-seconds", "0.6",
         "--json", str(tmp_path / "q.json"), "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    assert "hetero (1 repetition" in out and "spread (two balancers)" in out
    assert "----  hetero: least-load p99" in out  # no HAProxy to compare with
    assert ("PASS  spread" in out) or ("FAIL  spread" in out)
    figures = json.loads((tmp_path / "q.json").read_text())["results"]
    [round_] = figures["hetero"]["least-load"]
    assert round_["requests"] > 100 and round_["p99"] > 2.0 and round_["failures"] == 0
    [spread] = figures["spread"]["least-load"]
    assert sum(spread["counts"]) == 40 + sum([0, 4, 8, 12]) and spread["failures"] == 0


# -- bench/proxycost.py: the PROXY protocol's and TLS's cost ---------------------


def test_proxyCostQuickRunPrintsRatiosAgainstPlain(tmp_path):
    script = ROOT / "bench" / "proxycost.py"
    out = tmp_path / "cost.json"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--setups", "send-proxy-v2,tls-listen",
         "--connections", "60", "--mb", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stdout.splitlines()
    header = next(l for l in lines if l.startswith("metric"))
    assert header.split()[1:] == ["plain", "send-proxy-v2", "tls-listen"]
    for label in ("balancer CPU us per new conn", "balancer CPU us per MB echoed"):
        assert any(l.startswith(label) for l in lines), label
    assert sum(1 for l in lines if l.strip().startswith("against plain")) == 4
    figures = json.loads(out.read_text())
    assert figures["rounds"]["send-proxy-v2"][0]["conn"]["done"] == 60
