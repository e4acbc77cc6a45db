"""
Many clients at once on one machine (issue 21): build a population of
long-lived client connections, each holding its connection open and sending
one small echo every few seconds, step by step (1,000 then 10,000, 25,000,
50,000 and 100,000 by default), and report at each step what it costs.

    PYTHONPATH=. python bench/manyconn.py                    # the full run, about 15 minutes
    PYTHONPATH=. python bench/manyconn.py --steps 200,500    # a smoke run
    PYTHONPATH=. python bench/manyconn.py --help

Set-ups, each on fresh processes:

- ``redirect``: clients ask the balancer's redirect listener (one process),
  then hold their connection to the backend it named;
- ``proxy``: through ``twistd cluster-balancer --workers N``, N chosen so
  that file descriptors suffice (a proxied connection costs a worker 2);
- ``haproxy``: HAProxy, one process, in front of the same kind of backends
  (its maxconn is what its open-file limit allows);
- ``direct``: every client on one echo backend.

A set-up that holds less than 99% of a step stops there; whenever clients
fail, the table says how many it held and why (the failures' reasons, the descriptors
of its busiest process against its limit, the machine's free memory).

Per step: clients held and failed, the time to build the step and its
connect rate, echo p50/p99 over a window of 2 echo intervals, RSS growth
per held client of each group of processes (balancer main, balancer
workers, backends; HAProxy in the main column), their CPU in a quiet window
(no echoes sent: idle, holding the population), and how evenly least-load
spread the clients (max/mean of the backends' held connections, read from
their open descriptors).

The load generator is several processes (bench/loadgen.py, ``population``)
binding 127.0.0.2 and up as source addresses.  Every process started here
is stopped at the end, also on error, SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from loadgen import LoadGenerator  # noqa: E402
from run import Progress, percentile, raiseFileLimit, split  # noqa: E402
from servers import cpuSeconds, haproxyConfig, haproxyPath, machineBusy, openFiles, rssKiB  # noqa: E402

from twistedcluster.localcluster import LocalCluster, Process, freePort, waitFor  # noqa: E402

HOST = "127.0.0.1"
SETUPS = ["redirect", "proxy", "haproxy", "direct"]
GROUPS = ["main", "workers", "backends"]
#: Clients one load-generator process or one backend is given at most
#: (under the 20,000 descriptors a process may hold here).
PER_PROCESS = 15_000
#: Proxied clients one balancer worker is given on average (its
#: --max-connections, from the open-file limit, is about 9,500).
PER_WORKER = 8_000
#: Targets (issue 21).
P99_FACTOR = 10.0
RSS_PER_PROXIED_KIB = 3.0
SPREAD = 1.1
#: A set-up that holds less than this share of a step goes no further.
STOP_BELOW = 0.99


def fdLimit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def memAvailableMiB() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return -1


def workerPids(pid: int) -> List[int]:
    from tests.test_e2e_workers import workerPids as children

    return sorted(children(pid))


class SetUp:
    """
    The processes of one set-up, grouped, and where clients connect.
    """

    def __init__(self, name: str, work: Path, pythonPath: str) -> None:
        self.name = name
        self.cluster = LocalCluster(work / name, HOST)
        old = self.cluster.env.get("PYTHONPATH")
        self.cluster.env["PYTHONPATH"] = pythonPath + (os.pathsep + old if old else "")
        self.groups: Dict[str, List[int]] = {}
        self.backendPids: List[int] = []
        self.addr = None
        self.redirect = name == "redirect"
        self.extra: List[Process] = []
        self.note = ""

    def start(self, backends: int, workers: int, say) -> None:
        c = self.cluster
        names = [f"echo-{i + 1}" for i in range(backends if self.name != "direct" else 1)]
        if self.name in ("redirect", "proxy"):
            extra = ["--queue-size=0"]
            if self.name == "redirect":
                self.redirectPort = freePort(HOST)
                # The load generator's 16 addresses are no real clients: no
                # per-source bound on what counts as load.
                extra += [f"--redirect=tcp:{self.redirectPort}:interface={HOST}",
                          "--redirect-per-source=1000000"]
            else:
                extra += [f"--workers={workers}"]
            balancer = c.startBalancer(extra=extra)
        else:
            c.controlPort = freePort(HOST)  # nobody listens: the backends retry quietly
        for n in names:
            c.startBackend(n, extra=[f"--capacity={PER_PROCESS}", "--report-interval=1"])
        if self.name in ("redirect", "proxy"):
            c.waitUp(names, timeout=60)
        procs = [c.processes[n] for n in names]
        self.backendPids = [p.pid for p in procs]
        for p in procs:
            waitFor(lambda p=p: c._check(p) and c._connectable(p.port), 30, f"{p.name} to listen")
        self.groups["backends"] = self.backendPids
        if self.name == "redirect":
            self.groups["main"] = [balancer.pid]
            self.addr = (HOST, self.redirectPort)
            self.note = "balancer (1 process, redirect listener) + %d echo backends" % len(names)
        elif self.name == "proxy":
            pids = waitFor(lambda: len(w := workerPids(balancer.pid)) == workers and w, 30, "workers") \
                if workers > 1 else []
            self.groups["main"] = [balancer.pid]
            self.groups["workers"] = pids
            self.addr = (HOST, c.port)
            self.note = f"balancer --workers {workers} + {len(names)} echo backends"
        elif self.name == "haproxy":
            exe = haproxyPath()
            if exe is None:
                raise RuntimeError("no haproxy installed (apt-get install haproxy)")
            port = freePort(HOST)
            maxconn = (fdLimit() - 100) // 2
            cfg = c.workdir / "haproxy.cfg"
            cfg.write_text(haproxyConfig(port, [p.port for p in procs], maxconn))
            proc = Process("haproxy", [exe, "-db", "-f", str(cfg)], c.workdir / "haproxy.log", env=c.env)
            self.extra.append(proc)
            waitFor(lambda: proc.alive() and c._connectable(port), 20, "haproxy to listen")
            self.groups["main"] = [proc.pid]
            self.addr = (HOST, port)
            self.note = f"haproxy, 1 process, maxconn {maxconn:,} (open-file limit {fdLimit():,}), leastconn over {len(names)} echo backends"
        else:
            self.addr = (HOST, procs[0].port)
            self.note = f"1 echo backend (open-file limit {fdLimit():,})"
        time.sleep(1.0)  # noqa: start-up settles before the baseline

    def allPids(self) -> Dict[int, str]:
        out = {}
        for g, pids in self.groups.items():
            for p in pids:
                out[p] = g
        return out

    def stop(self) -> None:
        for p in self.extra:
            try:
                p.stop(5)
            except Exception:
                p.kill()
        self.cluster.stopAll(5)


def sample(pids: Dict[int, str]) -> Dict[int, dict]:
    out = {}
    for pid in pids:
        try:
            out[pid] = {"rss": rssKiB(pid), "cpu": cpuSeconds(pid), "fds": openFiles(pid)}
        except (OSError, RuntimeError):
            out[pid] = {"rss": 0, "cpu": 0.0, "fds": 0, "gone": True}
    return out


class CpuMeter:
    """
    CPU over a span, in cores: of each of our processes (servers and load
    generator) and of the whole machine, so that what other work on the
    machine took is known too.
    """

    def __init__(self, pids) -> None:
        self.pids = list(pids)
        self.t0 = time.monotonic()
        self.m0 = machineBusy()
        self.c0 = {p: self._cpu(p) for p in self.pids}

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            return cpuSeconds(pid)
        except OSError:
            return 0.0

    def stop(self) -> dict:
        span = max(1e-6, time.monotonic() - self.t0)
        m1 = machineBusy()
        per = {p: (self._cpu(p) - self.c0[p]) / span for p in self.pids}
        total = m1[1] - self.m0[1]
        cores = os.cpu_count() or 1
        busy = (m1[0] - self.m0[0]) / total * cores if total else None
        return {"seconds": span, "per": per, "busy": busy}


def cpuSplit(meter: dict, groups: Dict[int, str]) -> dict:
    """
    Cores used over a span by our servers, by our load generator, by the
    kernel's work that no process is charged for plus everything else on the
    machine (``others``: the machine's busy time less ours).
    """
    servers = sum(v for p, v in meter["per"].items() if groups.get(p) != "generator")
    gens = sum(v for p, v in meter["per"].items() if groups.get(p) == "generator")
    busy = meter["busy"]
    return {"servers": servers, "generator": gens, "busy": busy,
            "others": None if busy is None else max(0.0, busy - servers - gens)}


def latencies(results, key: str) -> List[float]:
    lat = array("d")
    for r in results:
        lat.frombytes(r.pop(key, b""))
    return sorted(lat)


class Bench:
    def __init__(self, args, say) -> None:
        self.args = args
        self.say = say
        self.sources = [f"127.0.0.{i}" for i in range(2, 2 + args.sources)]
        self.results: Dict[str, dict] = {}

    def runSetUp(self, lg: LoadGenerator, setup: SetUp) -> dict:
        args, say = self.args, self.say
        gens = len(lg.workers)
        pids = setup.allPids()
        meterPids = {**pids, **{p: "generator" for p in lg.pids}}
        base = sample(pids)
        record = {"note": setup.note, "steps": [], "stopped": None}
        params = [
            {"addr": setup.addr, "redirect": setup.redirect, "sources": self.sources,
             "interval": args.interval, "size": 32, "concurrency": args.concurrency,
             "cidBase": i * 10_000_000}
            for i in range(gens)
        ]
        pop = lg.population(params)
        try:
            held = 0
            for step in args.steps:
                new = step - held
                say(f"{setup.name}: building {step:,} clients ({new:,} new) ...")
                t0 = time.monotonic()
                meter = CpuMeter(meterPids)
                grown = pop.grow(split(new, gens), args.max_failures,
                                 timeout=60 + new / 200 + 2 * args.attempt_timeout)
                seconds = time.monotonic() - t0
                buildCpu = cpuSplit(meter.stop(), meterPids)
                held = sum(g["held"] for g in grown)
                failed = sum(g["failed"] for g in grown)
                reasons: Dict[str, int] = {}
                for g in grown:
                    for k, v in g["failures"].items():
                        reasons[k] = reasons.get(k, 0) + v
                self._checkAlive(setup)
                say(f"{setup.name}: {held:,} held, {failed:,} failed in {seconds:.1f} s; echo window ...")
                rounds = []
                meter = CpuMeter(meterPids)
                for _ in range(args.rounds):
                    echo = pop.measure(args.window)
                    lat = latencies(echo, "latencies")
                    lags = latencies(echo, "lags")
                    rounds.append({
                        "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99),
                        "max": lat[-1] if lat else None, "echoes": len(lat),
                        "sent": sum(e["sent"] for e in echo), "late": sum(e["late"] for e in echo),
                        "lagP99": percentile(lags, 0.99),
                    })
                echoCpu = cpuSplit(meter.stop(), meterPids)
                say(f"{setup.name}: quiet window ...")
                box = {}

                def quiet():
                    time.sleep(0.2)  # noqa: echoes in flight as the window opens come back
                    box["a"] = sample(pids)
                    box["t"] = time.monotonic()
                    time.sleep(max(0.1, args.quiet - 0.4))
                    box["b"] = sample(pids)
                    box["u"] = time.monotonic()

                quietRes = pop.measure(args.quiet, echo=False, during=quiet)
                self._checkAlive(setup)
                row = self._row(setup, step, held, failed, seconds, new, grown, rounds,
                                quietRes, base, box, reasons)
                row["buildCpu"], row["echoCpu"] = buildCpu, echoCpu
                record["steps"].append(row)
                self._say(setup.name, row)
                if failed or held < step:
                    row["why"] = self._whyStopped(setup, row, reasons)
                    say(f"{setup.name}: {held:,} of {step:,} held: {row['why']}")
                if held < STOP_BELOW * step:
                    record["stopped"] = row["why"]
                    break
        finally:
            try:
                pop.release()
            except Exception as e:
                say(f"{setup.name}: release failed: {e}")
        return record

    def _checkAlive(self, setup: SetUp) -> None:
        for p in [*setup.cluster.processes.values(), *setup.extra]:
            if not p.alive():
                raise RuntimeError(f"{setup.name}: {p.name} exited:\n{p.logText()[-2000:]}")

    def _row(self, setup, step, held, failed, seconds, new, grown, rounds, quietRes,
             base, box, reasons) -> dict:
        a, b = box["a"], box["b"]
        span = box["u"] - box["t"]
        pids = setup.allPids()
        rss: Dict[str, Optional[float]] = {}
        cpu: Dict[str, Optional[float]] = {}
        for g in GROUPS:
            members = [p for p, gg in pids.items() if gg == g]
            if not members:
                rss[g] = cpu[g] = None
                continue
            grow = sum(b[p]["rss"] - base[p]["rss"] for p in members)
            rss[g] = grow / held if held else None
            cpu[g] = 100.0 * sum(b[p]["cpu"] - a[p]["cpu"] for p in members) / span
        perBackend = [b[p]["fds"] - base[p]["fds"] for p in setup.backendPids]
        mean = sum(perBackend) / len(perBackend) if perBackend else 0
        spread = max(perBackend) / mean if len(perBackend) > 1 and mean > 0 else None
        best = min(rounds, key=lambda r: (r["p99"] is None, r["p99"] or 0))
        p99s = sorted(r["p99"] for r in rounds if r["p99"] is not None)
        return {
            "clients": step, "held": held, "failed": failed, "seconds": seconds,
            "rate": (sum(g["new"] for g in grown) / seconds) if seconds else None,
            "p50": best["p50"], "p99": best["p99"],
            "p99median": p99s[len(p99s) // 2] if p99s else None, "rounds": rounds,
            "echoes": sum(r["echoes"] for r in rounds), "echoesSent": sum(r["sent"] for r in rounds),
            "late": sum(r["late"] for r in rounds),
            "dropped": sum(e["dropped"] for e in quietRes),
            "quietEchoes": sum(e["answered"] for e in quietRes),
            "rssPerConn": rss, "idleCpu": cpu, "perBackend": perBackend, "spread": spread,
            "processes": {str(p): {"group": pids[p], "rssKiB": b[p]["rss"], "baseRssKiB": base[p]["rss"],
                                   "fds": b[p]["fds"]} for p in pids},
            "failures": reasons,
            "memAvailableMiB": memAvailableMiB(),
        }

    def _whyStopped(self, setup: SetUp, row: dict, reasons: Dict[str, int]) -> str:
        procs = row["processes"]
        pid, top = max(procs.items(), key=lambda kv: kv[1]["fds"])
        limit = fdLimit()
        names = {str(p.pid): p.name for p in [*setup.cluster.processes.values(), *setup.extra]}
        names.update({str(p): f"balancer worker {p}" for p in setup.groups.get("workers", [])})
        where = names.get(pid, f"pid {pid}")
        logHits = []
        for p in [*setup.cluster.processes.values(), *setup.extra]:
            text = p.logText()
            for needle in ("Too many open files", "EMFILE", "Out of file descriptors",
                           "(--max-connections) reached", "Cannot raise FD limit"):
                if needle in text:
                    logHits.append(f"{p.name} log: {needle!r} x{text.count(needle)}")
        why = ", ".join(f"{k} x{v:,}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        b, e = row["buildCpu"], row["echoCpu"]
        text = (f"failures: {why or 'none'}; most descriptors: {where} {top['fds']:,} of its "
                f"limit {limit:,}; MemAvailable {row['memAvailableMiB']:,} MiB; cores busy "
                f"while building {cores(b)}, in the echo windows {cores(e)}")
        if logHits:
            text += "; " + "; ".join(logHits)
        return text

    def _say(self, name: str, row: dict) -> None:
        rounds = "/".join(f"{ms(r['p99'])} (lag {ms(r['lagP99'])})" for r in row["rounds"])
        self.say(f"{name} {row['clients']:,}: p50 {ms(row['p50'])} ms, p99 of each round {rounds} ms, "
                 f"KiB/conn {row['rssPerConn']}, idle CPU% {row['idleCpu']}, spread {row['spread']}")


def cores(c: dict) -> str:
    return (f"{num(c['busy'])} of {os.cpu_count()} (servers {num(c['servers'])}, "
            f"load generator {num(c['generator'])}, others {num(c['others'])})")


def ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def num(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(results: Dict[str, dict]) -> str:
    head = ("set-up", "clients", "held", "failed", "build s", "conn/s", "p50 ms", "p99 ms", "p99 med",
            "KiB/c main", "workers", "backends", "idle CPU% main", "workers", "backends", "max/mean",
            "busy", "others")
    widths = (8, 8, 8, 6, 7, 7, 7, 7, 7, 10, 7, 8, 14, 7, 8, 8, 5, 6)
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("-" * len(lines[0]))
    for name, rec in results.items():
        for r in rec["steps"]:
            cells = (
                name, f"{r['clients']:,}", f"{r['held']:,}", f"{r['failed']:,}", f"{r['seconds']:.1f}",
                num(r["rate"], "{:,.0f}"), ms(r["p50"]), ms(r["p99"]), ms(r["p99median"]),
                num(r["rssPerConn"]["main"]), num(r["rssPerConn"]["workers"]),
                num(r["rssPerConn"]["backends"]),
                num(r["idleCpu"]["main"], "{:.1f}"), num(r["idleCpu"]["workers"], "{:.1f}"),
                num(r["idleCpu"]["backends"], "{:.1f}"), num(r["spread"]),
                num(r["echoCpu"]["busy"], "{:.1f}"), num(r["echoCpu"]["others"], "{:.1f}"),
            )
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    lines.append("")
    for name, rec in results.items():
        lines.append(f"{name}: {rec['note']}")
        for r in rec["steps"]:
            if r.get("why") and not (rec.get("stopped") and r is rec["steps"][-1]):
                lines.append(f"  {r['held']:,} of {r['clients']:,} held: {r['why']}")
        if rec.get("stopped"):
            lines.append(f"  stopped at {rec['steps'][-1]['held']:,} held: {rec['stopped']}")
        if rec.get("error"):
            lines.append(f"  error: {rec['error']}")
    return "\n".join(lines)


def verdicts(results: Dict[str, dict], steps: List[int]) -> List[tuple]:
    top, ref = steps[-1], steps[0]
    out = []

    def last(name):
        rec = results.get(name)
        return rec["steps"][-1] if rec and rec["steps"] else None

    def at(name, clients):
        rec = results.get(name) or {"steps": []}
        return next((r for r in rec["steps"] if r["clients"] == clients), None)

    for name in ("redirect", "proxy"):
        if name not in results:
            continue
        r = last(name)
        ok = r is not None and r["clients"] == top and r["held"] == top and r["failed"] == 0
        got = f"{r['held']:,} held, {r['failed']:,} failed" if r else "not run"
        out.append((ok, f"{name}: {top:,} concurrent clients held with 0 failed connects: {got}"))
    for name in ("redirect", "proxy"):
        if name not in results:
            continue
        r, r0 = at(name, top), at(name, ref)
        ok = bool(r and r0 and r["p99"] is not None and r0["p99"] and r["p99"] <= P99_FACTOR * r0["p99"])
        got = (f"{ms(r['p99'])} ms at {top:,} against {ms(r0['p99'])} ms at {ref:,} "
               f"({r['p99'] / r0['p99']:.1f}x)") if r and r0 and r["p99"] and r0["p99"] else "not reached"
        out.append((ok, f"{name}: echo p99 at {top:,} held <= {P99_FACTOR:g}x its value at {ref:,}: {got}"))
    r = at("proxy", top)
    if "proxy" in results:
        if r:
            kib = (r["rssPerConn"]["main"] or 0) + (r["rssPerConn"]["workers"] or 0)
            out.append((kib <= RSS_PER_PROXIED_KIB,
                        f"proxy: balancer RSS (main + workers) <= {RSS_PER_PROXIED_KIB:g} KiB per proxied "
                        f"connection: {kib:.2f} KiB with {r['held']:,} held (step {top:,})"))
        else:
            out.append((False, f"proxy: balancer RSS per proxied connection: {top:,} not reached"))
    for name in ("redirect", "proxy"):
        if name not in results:
            continue
        r = at(name, top)
        ok = bool(r and r["spread"] is not None and r["spread"] <= SPREAD)
        got = f"{r['spread']:.3f} ({', '.join(f'{n:,}' for n in r['perBackend'])})" if r and r["spread"] else "not reached"
        out.append((ok, f"{name}: spread max/mean per backend <= {SPREAD:g}: {got}"))
    return out


def parseArgs(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--steps", default="1000,10000,25000,50000,100000",
                   help="populations, comma-separated; the first is the latency reference, "
                        "the last the target (default: %(default)s)")
    p.add_argument("--setups", default=",".join(SETUPS), help="of " + ", ".join(SETUPS))
    p.add_argument("--interval", type=float, default=5.0, help="seconds between one client's echoes")
    p.add_argument("--window", type=float, default=None,
                   help="seconds of the echo window (default: 2 intervals)")
    p.add_argument("--rounds", type=int, default=3,
                   help="echo windows per step; the table shows the best (lowest p99) and the median p99")
    p.add_argument("--quiet", type=float, default=4.0, help="seconds of the quiet (idle) window")
    p.add_argument("--backends", type=int, default=None, help=f"default: one per {PER_PROCESS:,} clients, at least 2")
    p.add_argument("--workers", type=int, default=None, help=f"proxy mode; default: one per {PER_WORKER:,} clients")
    p.add_argument("--generators", type=int, default=None,
                   help=f"load-generator processes; default: one per {PER_PROCESS:,} clients, at least 2")
    p.add_argument("--sources", type=int, default=16, help="source addresses 127.0.0.2 and up")
    p.add_argument("--concurrency", type=int, default=64, help="connects in flight per generator process")
    p.add_argument("--attempt-timeout", type=float, default=10.0, help="seconds one new client may take")
    p.add_argument("--max-failures", type=int, default=200,
                   help="failed clients per generator process after which a step stops growing")
    p.add_argument("--logs", default=None, help="folder for the processes' logs (default: a temporary one)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    args = p.parse_args(argv)
    args.steps = [int(s.replace("_", "")) for s in args.steps.split(",") if s.strip()]
    if args.steps != sorted(set(args.steps)) or args.steps[0] < 1:
        p.error("--steps: increasing positive numbers")
    args.setups = [s for s in args.setups.split(",") if s]
    if not set(args.setups) <= set(SETUPS):
        p.error(f"--setups: of {', '.join(SETUPS)}")
    if args.window is None:
        args.window = 2 * args.interval
    top = args.steps[-1]
    args.backends = args.backends or max(2, math.ceil(top / PER_PROCESS))
    args.workers = args.workers or max(2, math.ceil(top / PER_WORKER))
    args.generators = args.generators or max(2, math.ceil(top / PER_PROCESS))
    return args


def main(argv=None) -> int:
    args = parseArgs(argv)
    say = Progress()
    was, soft = raiseFileLimit()
    say(f"open-file limit {soft:,} per process (hard; raised from {was:,}); steps "
        f"{', '.join(f'{s:,}' for s in args.steps)}; {args.generators} generator processes, "
        f"{args.backends} backends, {args.workers} proxy workers, {args.sources} source addresses; "
        f"somaxconn {Path('/proc/sys/net/core/somaxconn').read_text().strip()}, "
        f"ephemeral ports {' '.join(Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split())}, "
        f"MemAvailable {memAvailableMiB():,} MiB")
    work = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="manyconn-"))
    work.mkdir(parents=True, exist_ok=True)

    def onTerm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, onTerm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lg = LoadGenerator(args.generators)  # forked before any server starts
    bench = Bench(args, say)
    results: Dict[str, dict] = {}
    status = 0
    try:
        for name in args.setups:
            setup = SetUp(name, work, str(HERE.parent))
            try:
                say(f"{name}: starting ...")
                setup.start(args.backends, args.workers, say)
                results[name] = bench.runSetUp(lg, setup)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                say(f"{name}: failed: {type(e).__name__}: {e}")
                results.setdefault(name, {"note": setup.note, "steps": [], "stopped": None})
                results[name]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                status = 2
            finally:
                setup.stop()
    except KeyboardInterrupt:
        say("interrupted: every process started was stopped")
        return 130
    finally:
        lg.close()
    print(f"Many clients at once: {', '.join(f'{s:,}' for s in args.steps)}; one echo of 32 bytes per "
          f"client every {args.interval:g} s; {args.rounds} echo windows of {args.window:g} s per step "
          f"(p50/p99 of the best, p99 med: the median window's), idle (quiet) window "
          f"{args.quiet:g} s; KiB/c = RSS growth per held client; busy: "
          f"cores busy in the echo windows (of {os.cpu_count()}), others: of them, what no process of this "
          f"run used (other work, unattributed kernel time); logs in {work}")
    print(table(results))
    print()
    checks = verdicts(results, args.steps)
    for ok, text in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "checks": checks}, indent=2, default=str))
    if status:
        return status
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
