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
paused (this process and the balancer take cores cluster-admin would use),
with the CPU each call took in cluster-admin and in the balancer.

    python bench/controlplane.py [--backends 1000,10000] [--seconds 10]
        [--mode auto|answered] [--status-calls 3] [--workers N] [--baseline DIR]

--mode answered makes every report ask for an answer (as backends before
one-way reports did); auto (the default) speaks as today's backend does,
one-way when the balancer offers it.  --workers N runs the balancer with
``--workers N`` and also measures its workers' CPU together (they route no
client here: what they take is what keeping their pools the main one's
costs).  --baseline DIR also measures, in the
same run and alternating with this code, a balancer and a cluster-admin
from the twistedcluster package in DIR (e.g. ``git archive REF
twistedcluster twisted | tar -x -C DIR``; the simulated backends stay this
code's), and prints this code's figures as ratios of the baseline's: a
before/after comparison on a machine whose load moves.

Every wait is bounded; the balancer is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def childrenOf(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def workersCpuSeconds(pid: int) -> float:
    total = 0.0
    for child in childrenOf(pid):
        try:
            total += cpuSeconds(child)
        except OSError:
            pass
    return total


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
            # Where nothing listens: on 127.0.0.1 one of them could fall on
            # the balancer's own proxy port, which it refuses.
            host="127.0.0.2",
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
        wcpu0 = workersCpuSeconds(balancerPid)
        own0 = ownCpuSeconds()
        await task.deferLater(reactor, seconds, lambda: None)
        cpu1, t1, r1 = cpuSeconds(balancerPid), time.monotonic(), Sim.reports
        wcpu1 = workersCpuSeconds(balancerPid)
        own1 = ownCpuSeconds()
        rss1 = rssKiB(balancerPid)
        result = {
            "backends": n,
            "connectSeconds": connectTime,
            "reportsPerSecond": (r1 - r0) / (t1 - t0),
            "balancerCpuPercent": 100 * (cpu1 - cpu0) / (t1 - t0),
            "workersCpuPercent": 100 * (wcpu1 - wcpu0) / (t1 - t0),
            "workerProcesses": len(childrenOf(balancerPid)),
            "usPerReport": 1e6 * (cpu1 - cpu0) / max(1, r1 - r0),
            "senderUsPerReport": 1e6 * (own1 - own0) / max(1, r1 - r0),
            "balancerRssKiB": rss1,
            "kibPerBackend": (rss1 - rss0) / n,
            "errors": Sim.errors,
            "oneWay": sum(1 for p in protos if p.oneWay),
            "marksPushed": Sim.marks,
        }
        # status while they keep reporting, in a thread so the reports go on.
        result["status"] = await _threads().deferToThread(_timeStatus, balancerPid)
        # ... and with the reports paused: on a small machine this process
        # and the balancer compete with cluster-admin for the cores.
        loop.stop()
        await task.deferLater(reactor, 1.5, lambda: None)
        result["statusQuiet"] = await _threads().deferToThread(_timeStatus, balancerPid)
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


def _childCpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timeStatus(balancerPid: int) -> list:
    """
    Run C{cluster-admin status --json} C{ADMIN["calls"]} times; for each,
    its wall time, cluster-admin's CPU and the balancer's CPU meanwhile
    (which counts the reports it handled too), in seconds.
    """
    calls = []
    for _ in range(ADMIN["calls"]):
        # Output to a file, not a pipe: this thread reading a pipe would
        # wait for the GIL behind the busy reactor thread, and that is not
        # cluster-admin's time.
        with tempfile.TemporaryFile() as out:
            cpu0, bal0 = _childCpu(), cpuSeconds(balancerPid)
            start = time.monotonic()
            r = subprocess.run(
                adminCommand(ADMIN["endpoint"], ["status", "--json"]),
                stdout=out, stderr=subprocess.PIPE, timeout=60, env=ADMIN["env"],
            )
            elapsed = time.monotonic() - start
            cpu1, bal1 = _childCpu(), cpuSeconds(balancerPid)
            failed = None
            if r.returncode:
                # Counted (as its wall time, marked), not fatal: one call that
                # did not get its answer in cluster-admin's --timeout says
                # as much as the others.
                failed = f"exit {r.returncode}: " + r.stderr.decode(errors="replace").strip()[-300:]
                print(f"status failed after {elapsed:.1f} s: {failed}", file=sys.stderr, flush=True)
            else:
                out.seek(0)
                ADMIN["count"] = len(json.loads(out.read()))
        calls.append({"wall": elapsed, "adminCpu": cpu1 - cpu0, "balancerCpu": bal1 - bal0,
                      "failed": failed})
    return calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/controlplane.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="1000,10000")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--mode", choices=["auto", "answered"], default="auto")
    p.add_argument("--status-calls", type=int, default=3, metavar="N",
                   help="cluster-admin status calls in each phase (default 3)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="run the balancer with --workers N (default: one process)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also measure the balancer and cluster-admin of the package in DIR")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.backends.split(",") if x.strip()]
    if not counts or min(counts) < 1 or max(counts) > 15000:
        p.error("--backends: counts from 1 to 15000")
    if not 1 <= args.seconds <= 120:
        p.error("--seconds: 1 to 120")
    if not 1 <= args.status_calls <= 20:
        p.error("--status-calls: 1 to 20")
    ADMIN["calls"] = args.status_calls
    if not 0 <= args.workers <= 16:
        p.error("--workers: 0 to 16")
    workerArgs = ["--workers", str(args.workers)] if args.workers else []
    codes = [("this", ROOT)]
    if args.baseline:
        base = Path(args.baseline).resolve()
        if not (base / "twistedcluster" / "__init__.py").exists():
            p.error(f"--baseline {base}: no twistedcluster package there")
        codes.append(("baseline", base))
    from twisted.internet import reactor

    results = []

    async def work():
        for k, n in enumerate(counts):
            # Alternate which code goes first, so neither always meets the
            # machine in the same state.
            for label, code in codes if k % 2 == 0 else codes[::-1]:
                env = dict(os.environ, PYTHONPATH=str(code))
                with tempfile.TemporaryDirectory(prefix="controlplane-") as d:
                    # The processes start in an empty directory: `python -c`
                    # and `-m` put their working directory first on the
                    # path, where a checkout's own twistedcluster would
                    # shadow --baseline's.
                    os.chdir(d)
                    cluster = LocalCluster(Path(d))
                    cluster.env = env
                    balancer = cluster.startBalancer(
                        extra=["--max-control-connections", str(n + 100)] + workerArgs
                    )
                    try:
                        ADMIN["endpoint"], ADMIN["env"] = cluster.admin, env
                        control = f"tcp:host=127.0.0.1:port={cluster.controlPort}"
                        r = await simulate(reactor, control, n, args.seconds, args.mode, balancer.pid)
                        r["listed"] = ADMIN.get("count")
                        r["code"] = label
                        results.append(r)
                        print(json.dumps(r), file=sys.stderr, flush=True)
                    finally:
                        cluster.stopAll()

    def done(_):
        reactor.stop()

    def failed(f):
        f.printTraceback(file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: __import__("twisted.internet.defer", fromlist=["x"])
                            .ensureDeferred(work()).addCallbacks(done, failed))
    reactor.run()
    _print(results, codes, args.mode, args.workers)
    return 0 if len(results) == len(counts) * len(codes) else 1


def _summary(runs: list) -> dict:
    """
    Over the status calls of one or more runs (lists of calls): the median
    first call, the median of the later ones, and the median CPU per call in
    cluster-admin and in the balancer.
    """
    calls = [c for run in runs for c in run]
    later = [c for run in runs for c in run[1:]] or calls
    return {
        "first": statistics.median(run[0]["wall"] for run in runs),
        "later": statistics.median(c["wall"] for c in later),
        "adminCpu": statistics.median(c["adminCpu"] for c in calls),
        "balancerCpu": statistics.median(c["balancerCpu"] for c in calls),
    }


def _print(results: list, codes: list, mode: str, workers: int = 0) -> None:
    for label, code in codes:
        print(f"{label}: {code}")
    if workers:
        print(f"--workers {workers}: cpu % is the main process's, workers % theirs together")
    print(f"mode: {mode}; status: wall s of each call (! failed: no answer in cluster-admin's"
          " --timeout); cpu: median s per call of cluster-admin and of the balancer (its"
          " reports included)")
    print(f"{'code':>9}{'backends':>9}{'reports/s':>11}{'cpu %':>7}{'workers %':>10}{'us/report':>10}"
          f"{'sender us':>10}{'RSS MiB':>9}{'KiB/backend':>12}"
          f"{'one-way':>8}{'status s, reporting':>28}{'cpu':>11}"
          f"{'status s, paused':>28}{'cpu':>11}")
    for r in results:
        row = []
        for phase in ("status", "statusQuiet"):
            calls = r[phase]
            row.append(" ".join(f"{c['wall']:.2f}" + ("!" if c.get("failed") else "") for c in calls))
            s = _summary([calls])
            row.append(f"{s['adminCpu']:.2f}/{s['balancerCpu']:.2f}")
        print(f"{r['code']:>9}{r['backends']:>9,}{r['reportsPerSecond']:>11.0f}"
              f"{r['balancerCpuPercent']:>7.1f}{r.get('workersCpuPercent', 0):>10.1f}{r['usPerReport']:>10.1f}"
              f"{r['senderUsPerReport']:>10.1f}{r['balancerRssKiB'] / 1024:>9.1f}"
              f"{r['kibPerBackend']:>12.1f}{r['oneWay']:>8}"
              f"{row[0]:>28}{row[1]:>11}{row[2]:>28}{row[3]:>11}")
    if len(codes) < 2:
        return
    print("this / baseline, medians over the runs of each (first call; later calls;"
          " cluster-admin CPU; balancer CPU per call; us per report):")
    for n in sorted({r["backends"] for r in results}):
        mine = [r for r in results if r["backends"] == n and r["code"] == "this"]
        base = [r for r in results if r["backends"] == n and r["code"] == "baseline"]
        if not (mine and base):
            continue
        parts = []
        for phase, name in (("status", "reporting"), ("statusQuiet", "paused")):
            sm, sb = _summary([r[phase] for r in mine]), _summary([r[phase] for r in base])
            parts.append(name + " " + ", ".join(
                f"{sm[k] / sb[k]:.2f}x" if sb[k] > 0 else "-"
                for k in ("first", "later", "adminCpu", "balancerCpu")))
        report = statistics.median(r["usPerReport"] for r in mine) / statistics.median(
            r["usPerReport"] for r in base)
        parts.append(f"report {report:.2f}x")
        if workers:
            def cpu(rs):
                return statistics.median(r["balancerCpuPercent"] + r.get("workersCpuPercent", 0) for r in rs)
            parts.append(f"main + workers CPU {cpu(mine) / max(0.1, cpu(base)):.2f}x")
        print(f"  {n:,} backends ({len(mine)} and {len(base)} runs): " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
