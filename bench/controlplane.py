"""
What the control plane costs the balancer with many backends: N simulated
backends in this one process, each a real AMP control connection on
loopback to a real ``twistd cluster-balancer``, registering and then
reporting load once a second (each at its own phase in the second, as
independent backends would).  Measures the balancer's CPU from
/proc/PID/stat while they report, its memory (VmRSS before the backends
register and once they report, so KiB per registered backend), this
process's own CPU per report sent (an upper bound on what sending one
costs a backend: it includes the simulation's timer), and the wall time of
``cluster-admin status --json``, while they report and with their reports
paused (this process and the balancer take cores cluster-admin would use).

    python bench/controlplane.py [--backends 1000,10000] [--seconds 10]
        [--mode auto|answered]

--mode answered makes every report ask for an answer (as backends before
one-way reports did); auto (the default) speaks as today's backend does,
one-way when the balancer offers it.  --baseline DIR runs the balancer from
the twistedcluster package in DIR (the simulated backends stay this code's).

Every wait is bounded; the balancer is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twistedcluster.localcluster import LocalCluster, adminCommand  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ownCpuSeconds() -> float:
    t = os.times()
    return t.user + t.system


def simulate(reactor, control: str, n: int, seconds: float, mode: str, balancerPid: int):
    """
    Connect C{n} backends, let them report for C{seconds}, and return what
    was measured.
    """
    from twisted.internet import defer, task
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.protocol import Factory

    from twistedcluster.backend.reporter import ControlClient
    from twistedcluster.wire import commands

    class Sim:
        reports = 0
        errors = 0
        marks = 0

    class _Reporter:
        # What ControlClient asks of its reporter.
        channels: set = set()

        def _channelLost(self, proto, reason):
            Sim.errors += 1

    reporter = _Reporter()

    class SimClient(ControlClient):
        def __init__(self) -> None:
            super().__init__(reporter, "bench")

    if hasattr(commands, "Mark"):

        class SimClient(SimClient):  # type: ignore[no-redef]
            @commands.Mark.responder
            def markPushed(self, mark):
                Sim.marks += 1
                self.answered({"mark": mark})
                return {}

    endpoint = clientFromString(reactor, control)
    protos = []

    async def connectOne(i: int):
        proto = await endpoint.connect(Factory.forProtocol(SimClient))
        result = await proto.callRemote(
            commands.Register,
            name=f"sim-{i:05d}",
            host="127.0.0.1",
            port=20000 + i % 40000,
            capacity=100,
            connections=0,
            load=0.0,
            interval=1.0,
            **({"quiet": True} if mode == "auto" and _hasQuiet() else {}),
        )
        proto.answered(result)
        proto.oneWay = mode == "auto" and bool(result.get("quiet"))
        proto.simIndex = i
        protos.append(proto)

    def report(proto) -> None:
        i = proto.simIndex
        connections = (i + Sim.reports) % 7
        kw = dict(connections=connections, load=connections / 100, seen=proto.mark)
        Sim.reports += 1
        if proto.oneWay:
            proto.callRemote(commands.ReportLoadOneWay, **kw)
            return
        d = proto.callRemote(commands.ReportLoad, **kw)
        d.addCallbacks(proto.answered, lambda f: setattr(Sim, "errors", Sim.errors + 1))

    async def run():
        rss0 = rssKiB(balancerPid)
        started = time.monotonic()
        batch = 200
        for first in range(0, n, batch):
            await defer.gatherResults(
                [defer.ensureDeferred(connectOne(i)) for i in range(first, min(n, first + batch))]
            )
        connectTime = time.monotonic() - started
        # Reports go out in 100 slots of 10 ms: each backend once a second.
        slots = [protos[s::100] for s in range(100)]
        tick = [0]

        def sendSlot():
            for p in slots[tick[0] % 100]:
                if p.transport is not None and p.transport.connected:
                    report(p)
            tick[0] += 1

        loop = task.LoopingCall(sendSlot)
        loop.clock = reactor
        loop.start(0.01)
        await task.deferLater(reactor, 3.0, lambda: None)  # settle
        cpu0, t0, r0 = cpuSeconds(balancerPid), time.monotonic(), Sim.reports
        own0 = ownCpuSeconds()
        await task.deferLater(reactor, seconds, lambda: None)
        cpu1, t1, r1 = cpuSeconds(balancerPid), time.monotonic(), Sim.reports
        own1 = ownCpuSeconds()
        rss1 = rssKiB(balancerPid)
        result = {
            "backends": n,
            "connectSeconds": connectTime,
            "reportsPerSecond": (r1 - r0) / (t1 - t0),
            "balancerCpuPercent": 100 * (cpu1 - cpu0) / (t1 - t0),
            "usPerReport": 1e6 * (cpu1 - cpu0) / max(1, r1 - r0),
            "senderUsPerReport": 1e6 * (own1 - own0) / max(1, r1 - r0),
            "balancerRssKiB": rss1,
            "kibPerBackend": (rss1 - rss0) / n,
            "errors": Sim.errors,
            "oneWay": sum(1 for p in protos if p.oneWay),
            "marksPushed": Sim.marks,
        }
        # status while they keep reporting, in a thread so the reports go on.
        result["statusSeconds"] = await _threads().deferToThread(_timeStatus, control)
        # ... and with the reports paused: on a small machine this process
        # and the balancer compete with cluster-admin for the cores.
        loop.stop()
        await task.deferLater(reactor, 1.5, lambda: None)
        result["statusQuietSeconds"] = await _threads().deferToThread(_timeStatus, control)
        for p in protos:
            p.transport.loseConnection()
        await task.deferLater(reactor, 0.5, lambda: None)
        return result

    return defer.ensureDeferred(run())


def _threads():
    from twisted.internet import threads

    return threads


def _hasQuiet() -> bool:
    from twistedcluster.wire import commands

    return any(name == b"quiet" for name, _ in commands.Register.arguments)


ADMIN = {}


def _timeStatus(control: str) -> list:
    times = []
    for _ in range(3):
        # Output to a file, not a pipe: this thread reading a pipe would
        # wait for the GIL behind the busy reactor thread, and that is not
        # cluster-admin's time.
        with tempfile.TemporaryFile() as out:
            start = time.monotonic()
            r = subprocess.run(
                adminCommand(ADMIN["endpoint"], ["status", "--json"]),
                stdout=out, stderr=subprocess.DEVNULL, timeout=60, env=ADMIN["env"],
            )
            elapsed = time.monotonic() - start
            if r.returncode:
                raise RuntimeError(f"status failed: exit {r.returncode}")
            out.seek(0)
            ADMIN["count"] = len(json.loads(out.read()))
        times.append(elapsed)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/controlplane.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="1000,10000")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--mode", choices=["auto", "answered"], default="auto")
    p.add_argument("--baseline", metavar="DIR", help="run the balancer from the package in DIR")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.backends.split(",") if x.strip()]
    if not counts or min(counts) < 1 or max(counts) > 15000:
        p.error("--backends: counts from 1 to 15000")
    if not 1 <= args.seconds <= 120:
        p.error("--seconds: 1 to 120")
    from twisted.internet import reactor

    code = Path(args.baseline).resolve() if args.baseline else ROOT
    env = dict(os.environ, PYTHONPATH=str(code))
    results = []

    async def work():
        for n in counts:
            with tempfile.TemporaryDirectory(prefix="controlplane-") as d:
                cluster = LocalCluster(Path(d))
                cluster.env = env
                balancer = cluster.startBalancer(
                    extra=["--max-control-connections", str(n + 100)]
                )
                try:
                    ADMIN["endpoint"], ADMIN["env"] = cluster.admin, env
                    control = f"tcp:host=127.0.0.1:port={cluster.controlPort}"
                    r = await simulate(reactor, control, n, args.seconds, args.mode, balancer.pid)
                    r["listed"] = ADMIN.get("count")
                    results.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                finally:
                    cluster.stopAll()

    def done(_):
        reactor.stop()

    def failed(f):
        f.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: __import__("twisted.internet.defer", fromlist=["x"])
                            .ensureDeferred(work()).addCallbacks(done, failed))
    reactor.run()
    print(f"balancer control plane, code: {code}, mode: {args.mode}")
    print(f"{'backends':>9}{'reports/s':>11}{'cpu %':>8}{'us/report':>11}{'sender us':>10}"
          f"{'RSS MiB':>9}{'KiB/backend':>12}{'one-way':>9}"
          f"{'marks':>7}{'status s, reporting':>24}{'status s, paused':>20}")
    for r in results:
        status = " ".join(f"{t:.2f}" for t in r["statusSeconds"])
        quiet = " ".join(f"{t:.2f}" for t in r["statusQuietSeconds"])
        print(f"{r['backends']:>9,}{r['reportsPerSecond']:>11.0f}{r['balancerCpuPercent']:>8.1f}"
              f"{r['usPerReport']:>11.1f}{r['senderUsPerReport']:>10.1f}"
              f"{r['balancerRssKiB'] / 1024:>9.1f}{r['kibPerBackend']:>12.1f}"
              f"{r['oneWay']:>9}{r['marksPushed']:>7}{status:>24}{quiet:>20}")
    return 0 if len(results) == len(counts) else 1


if __name__ == "__main__":
    sys.exit(main())
