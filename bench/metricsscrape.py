"""
What a Prometheus scrape of ``/metrics`` costs everyone else, at thousands of
backends: the longest a proxied client waits for its echo while the page is
written.

    python bench/metricsscrape.py [--backends 3000,10000] [--seconds 8]
                                  [--baseline DIR] [--path /status.json...]

A real ``twistd cluster-balancer`` with ``--metrics`` and one real echo
backend (LocalCluster).  Clients hold connections through the proxy
listener to that backend; then --backends simulated backends register on
the control listener (a child process, each a real AMP connection that
registers as 127.0.0.2, where nothing listens, and stays; they take no
clients).  For --seconds, a pinger (a
child process, so that nothing here competes with it for the GIL) echoes
64 bytes on each held connection in turn, one at a time, and records each
round trip, while this process scrapes ``/metrics`` once a second and reads
the whole page.  Printed, per code and count of backends: the scrape's
seconds and size, and the round trips' p50, p99 and longest; with
``--baseline DIR`` (older code, e.g. ``git archive REF twistedcluster twisted
| tar -x -C DIR``), the same for it in the same run and this code's as
ratios of the baseline's.  The balancer's reactor writes the page; what it
holds the reactor for is what the longest round trip shows.  ``--path``
scrapes ``/status.json`` (or ``?view=page``, what the status page reads once a
second) instead.

Every wait is bounded; every process started here is stopped here, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"
HELD = 4


def simulate(control: int, n: int) -> None:
    """
    The child that registers C{n} backends on the control port, says
    C{ready} on standard output, and keeps them until its standard input
    closes.
    """
    from twisted.internet import defer, reactor, stdio
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    from twistedcluster.backend.reporter import ControlClient
    from twistedcluster.wire import commands

    class _Reporter:
        channels: set = set()

        def _channelLost(self, proto, reason):
            pass

    reporter = _Reporter()

    class Sim(ControlClient):
        def __init__(self) -> None:
            super().__init__(reporter, "bench")

    if hasattr(commands, "Mark"):

        class Sim(Sim):  # type: ignore[no-redef]
            @commands.Mark.responder
            def markPushed(self, mark, **kw):
                self.answered({"mark": mark})
                return {}

    endpoint = TCP4ClientEndpoint(reactor, HOST, control)
    held = []

    async def one(i: int) -> None:
        proto = await endpoint.connect(Factory.forProtocol(Sim))
        # A long interval: no reports are needed for as long as this runs.
        result = await proto.callRemote(
            commands.Register, name=f"sim-{i:05d}", host="127.0.0.2", port=20000 + i % 40000,
            capacity=100, connections=i % 50, load=(i % 50) / 100, interval=300.0,
        )
        proto.answered(result)
        held.append(proto)

    class Stdin(Protocol):
        def connectionLost(self, reason):
            if reactor.running:
                reactor.stop()

    async def run() -> None:
        for first in range(0, n, 200):
            await defer.gatherResults(
                [defer.ensureDeferred(one(i)) for i in range(first, min(n, first + 200))]
            )
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    def failed(f):
        sys.stderr.write(f.getTraceback())
        reactor.stop()

    stdio.StandardIO(Stdin())
    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addErrback(failed))
    reactor.run()


def ping(port: int, seconds: float) -> None:
    """
    The child that holds L{HELD} connections through the proxy on C{port}
    and echoes 64 bytes on each in turn for C{seconds}; prints the round
    trips (seconds) as JSON.
    """
    conns = [socket.create_connection((HOST, port), timeout=10) for _ in range(HELD)]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * 64
    for c in conns:  # each routed and answering
        c.sendall(payload)
        got = 0
        while got < len(payload):
            got += len(c.recv(65536))
    print("connected", flush=True)
    sys.stdin.readline()  # go
    trips = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        c = conns[i % HELD]
        i += 1
        t = time.perf_counter()
        c.sendall(payload)
        got = 0
        while got < len(payload):
            chunk = c.recv(65536)
            if not chunk:
                raise SystemExit("a held connection closed")
            got += len(chunk)
        trips.append(time.perf_counter() - t)
    for c in conns:
        c.close()
    print(json.dumps(trips))


PATH = ["/metrics"]


def scrape(port: int) -> tuple:
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://{HOST}:{port}{PATH[0]}", timeout=30) as r:
        body = r.read()
    return time.perf_counter() - t, len(body)


def run(code: Path, n: int, seconds: float) -> dict:
    from twistedcluster.localcluster import LocalCluster, freePort, waitFor

    with tempfile.TemporaryDirectory(prefix="metricsscrape-") as d:
        cluster = LocalCluster(Path(d))
        # The processes run the code measured: on PYTHONPATH, and started
        # elsewhere than in a checkout (python -c puts the current folder
        # first on the path).
        cluster.env["PYTHONPATH"] = str(code)
        metrics = freePort(HOST)
        here = os.getcwd()
        os.chdir(d)
        children = []
        try:
            cluster.startBalancer(extra=[
                f"--metrics=tcp:{metrics}:interface={HOST}",
                f"--max-control-connections={n + 100}",
            ])
            cluster.startBackend("echo")
            cluster.waitUp(["echo"])
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            pinger = subprocess.Popen(
                [sys.executable, __file__, "--ping", str(cluster.port), str(seconds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
            )
            children.append(pinger)
            if pinger.stdout.readline().strip() != "connected":
                raise RuntimeError("the pinger could not connect")
            sim = subprocess.Popen(
                [sys.executable, __file__, "--simulate", str(cluster.controlPort), str(n)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
            )
            children.append(sim)
            # The pinger's connections are made (and routed to echo) before
            # the simulated backends register: they take no client.
            if sim.stdout.readline().strip() != "ready":
                raise RuntimeError("the simulated backends did not register")
            waitFor(lambda: scrape(metrics)[1] > 100 * n, 30, f"the backends in {PATH[0]}")
            pinger.stdin.write("go\n")
            pinger.stdin.flush()
            scrapes = []
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                scrapes.append(scrape(metrics))
                time.sleep(max(0.0, 1.0 - scrapes[-1][0]))
            out, _ = pinger.communicate(timeout=seconds + 30)
            trips = sorted(json.loads(out))
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                child.wait(10)
            cluster.stopAll()
            os.chdir(here)
    return {
        "backends": n,
        "scrapes": len(scrapes),
        "scrapeSeconds": statistics.median(s for s, _ in scrapes),
        "pageBytes": scrapes[-1][1],
        "trips": len(trips),
        "p50": trips[len(trips) // 2],
        "p99": trips[int(len(trips) * 0.99)],
        "max": trips[-1],
        "longest": trips[-8:],
    }


def show(label: str, r: dict) -> None:
    print(
        f"  {label:<9} {r['backends']:>7,} backends: scrape {r['scrapeSeconds']:.3f} s "
        f"({r['pageBytes'] / 1e6:.1f} MB, {r['scrapes']} scrapes); echo round trips "
        f"({r['trips']:,}): p50 {r['p50'] * 1e3:.2f} ms, p99 {r['p99'] * 1e3:.2f} ms, "
        f"longest {r['max'] * 1e3:.1f} ms"
    )


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("--simulate", "--ping"):
        kind, port, value = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        if kind == "--simulate":
            simulate(port, int(value))
        else:
            ping(port, float(value))
        return 0
    a = argparse.ArgumentParser(prog="bench/metricsscrape.py", description=__doc__.split("\n\n")[0])
    a.add_argument("--backends", default="3000,10000")
    a.add_argument("--seconds", type=float, default=8.0)
    a.add_argument("--baseline", type=Path, default=None)
    a.add_argument("--path", default="/metrics", choices=["/metrics", "/status.json", "/status.json?view=page"],
                   help="the page scraped (the status page reads /status.json?view=page once a second)")
    args = a.parse_args(argv)
    PATH[0] = args.path
    counts = [int(x) for x in args.backends.split(",") if x.strip()]
    if not counts or min(counts) < 1 or max(counts) > 15000:
        a.error("--backends: counts from 1 to 15000")
    if not 1 <= args.seconds <= 60:
        a.error("--seconds: 1 to 60")
    codes = [("this", ROOT)]
    if args.baseline is not None:
        base = args.baseline.resolve()
        if not (base / "twistedcluster" / "__init__.py").exists():
            a.error(f"--baseline {base}: no twistedcluster package there")
        codes.append(("baseline", base))
    print(f"{args.path} scraped once a second for {args.seconds:g} s while {HELD} held proxied "
          "connections echo 64 bytes, one round trip at a time")
    for k, n in enumerate(counts):
        results = {}
        # Alternate which code goes first.
        for label, code in codes if k % 2 == 0 else codes[::-1]:
            results[label] = run(code, n, args.seconds)
        for label, _ in codes:
            show(label, results[label])
        if "baseline" in results:
            this, base = results["this"], results["baseline"]
            print(
                f"  this / baseline at {n:,}: scrape {this['scrapeSeconds'] / base['scrapeSeconds']:.2f}x, "
                f"p99 {this['p99'] / base['p99']:.2f}x, longest round trip {this['max'] / base['max']:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
