"""
Benchmark the cluster balancer side by side with a direct connection, Twisted's
portforward and HAProxy, in one run on this machine, and print a table.

    .venv/bin/python bench/run.py            # about 8 minutes on 2 cores (--parts echo: 4)
    .venv/bin/python bench/run.py --quick    # under a minute
    .venv/bin/python bench/run.py --help

The nginx part (bench/nginx.py, --parts) then does the same in front of
nginx, driven by wrk.

Every target sits in front of the same single echo backend, so each figure
compares like with like: "direct" is the backend alone, and each proxy adds
its own hop.  Everything runs on 127.0.0.1 (client sockets are bound to
127.0.0.2, 127.0.0.3, ... so that held connections do not run out of
ephemeral ports).  Progress goes to standard error, the table to standard
output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TARGETS = ["direct", "balancer", "portforward", "haproxy", "baseline"]
DEFAULT_TARGETS = [t for t in TARGETS if t != "baseline"]
LOADS = ["held", "echo", "ping", "connect", "bulk"]
#: The nginx part's measurements (bench/nginx.py).
NGINX_LOADS = ["keepalive", "latency", "close", "bulk"]

# name, label (formatted with the run's settings), unit, higher is better
ROWS = [
    ("echo_rps", "echo req/s, {connections} conns", "req/s", True),
    ("echo_p50", "echo p50 ms, {connections} conns", "ms", False),
    ("echo_p99", "echo p99 ms, {connections} conns", "ms", False),
    ("ping_p50", "echo p50 ms, 1 conn", "ms", False),
    ("ping_p99", "echo p99 ms, 1 conn", "ms", False),
    ("conn_rate", "new conn/s, {inflight} in flight", "conn/s", True),
    ("conn_p50", "new conn p50 ms", "ms", False),
    ("bulk_mbps", "bulk MB/s echoed, {bulk} conns", "MB/s", True),
    ("rss_per_conn", "RSS KiB per held conn, {heldText}", "KiB", False),
    ("cpu_per_echo", "server CPU us per echo", "us", False),
    ("cpu_per_conn", "server CPU us per new conn", "us", False),
    ("cpu_per_mb", "server CPU us per MB echoed", "us", False),
]

RATIOS = [
    ("bal/pf", "balancer", "portforward"),
    ("hap/pf", "haproxy", "portforward"),
    ("bal/direct", "balancer", "direct"),
    ("pf/direct", "portforward", "direct"),
    ("hap/direct", "haproxy", "direct"),
    ("bal/base", "balancer", "baseline"),
]

SATURATED = 0.90  # a worker busy this much of its window is saturated
# Bulk: each connection writes up to BULK_CHUNK at a time (larger writes cost
# the load generator less CPU per MB, and it shares the cores with what it
# measures) and stops writing once BULK_WINDOW bytes are sent and not yet
# echoed (the last write may pass it, by less than BULK_CHUNK).
BULK_CHUNK = 256 * 1024
BULK_WINDOW = 1 << 20
NOISY = 0.25  # CPU (in cores) used by processes other than ours: a noisy measurement


class Progress:
    def __init__(self, stream=sys.stderr) -> None:
        self.start = time.monotonic()
        self.stream = stream

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {text}", file=self.stream, flush=True)


def raiseFileLimit() -> tuple:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    elif hard == resource.RLIM_INFINITY and soft < 1 << 20:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(sorted_values, q: float) -> Optional[float]:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def split(total: int, parts: int) -> List[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class Sampler:
    """
    CPU of the server processes and of the whole machine over a window.
    """

    def __init__(self, pids: Dict[str, int]) -> None:
        self.pids = pids
        self.cpu: Dict[str, float] = {}
        self.machine = None
        self.softirq = None
        self.busyCpus = None
        self.seconds = 0.0

    def window(self, start: float, end: float) -> None:
        from servers import cpuSeconds, machineBusy

        time.sleep(max(0.0, start - time.monotonic()))
        t0 = time.monotonic()
        before = {k: cpuSeconds(p) for k, p in self.pids.items()}
        m0 = machineBusy()
        time.sleep(max(0.0, end - time.monotonic()))
        t1 = time.monotonic()
        after = {k: cpuSeconds(p) for k, p in self.pids.items()}
        m1 = machineBusy()
        self.seconds = t1 - t0
        self.cpu = {k: (after[k] - before[k]) / self.seconds for k in self.pids}
        total = m1[1] - m0[1]
        self.machine = (m1[0] - m0[0]) / total if total else None
        # In CPUs (1.0 = one core busy): the kernel's packet processing
        # that no process is charged for, and everything else that ran.
        cpus = os.cpu_count() or 1
        self.softirq = (m1[2] - m0[2]) / total * cpus if total else None
        self.busyCpus = (m1[0] - m0[0]) / total * cpus if total else None


class Bench:
    def __init__(self, args, say: Progress) -> None:
        self.args = args
        self.say = say
        self.results: Dict[str, Dict[str, list]] = {}  # kind -> target -> rounds
        self.notes: List[str] = []
        self.saturation: List[str] = []
        self.noisy: List[str] = []
        self.sources = [f"127.0.0.{i}" for i in range(2, 2 + args.sources)]

    # -- one measurement ------------------------------------------------------

    @property
    def statText(self) -> str:
        if self.args.rounds == 1:
            return "one round (--rounds 1)"
        if self.args.stat == "median":
            return "medians"
        return "best (highest rate, lowest latency or cost; --stat median for medians)"

    def _pids(self, name: str) -> Dict[str, int]:
        t = self.targets[name]
        pids = {"server": t.pid}
        if name != "direct":
            pids["backend"] = self.servers.backend.pid
        return pids

    def _measure(self, kind: str, name: str, params, warmup, duration) -> dict:
        sampler = Sampler(self._pids(name))
        results = self.lg.run(kind, params, warmup, duration, onWindow=sampler.window)
        self.servers.check()
        seconds = statistics.mean(r["seconds"] for r in results)
        count = sum(r["count"] for r in results)
        lat = array("d")
        for r in results:
            if r.get("latencies"):
                lat.frombytes(r["latencies"])
        lat = sorted(lat)
        workerCpu = [r["cpu"] / r["seconds"] for r in results]
        fig = {
            "target": name,
            "rate": count / seconds,
            "count": count,
            "seconds": seconds,
            "p50": percentile(lat, 0.50),
            "p99": percentile(lat, 0.99),
            "errors": sum(r["errors"] + r.get("setupErrors", 0) + r.get("timeouts", 0) for r in results),
            "corrupt": sum(r["corrupt"] for r in results),
            "loadgenCpu": workerCpu,
            "serverCpu": sampler.cpu.get("server"),
            "backendCpu": sampler.cpu.get("backend"),
            "machineBusy": sampler.machine,
            "softirq": sampler.softirq,
        }
        if sampler.busyCpus is not None:
            ours = sum(v for v in sampler.cpu.values()) + sum(workerCpu)
            fig["otherCpu"] = max(0.0, sampler.busyCpus - (sampler.softirq or 0) - ours)
            if fig["otherCpu"] > NOISY:
                self.noisy.append(f"{kind} {name} ({fig['otherCpu']:.0%} of a core)")
        if fig["serverCpu"] is not None and count:
            # CPU seconds per second, over operations per second.
            fig["serverCpuPerOp"] = fig["serverCpu"] / fig["rate"]
        if max(workerCpu, default=0) >= SATURATED:
            self.saturation.append(
                f"{kind} {name}: a load generator worker was at "
                f"{max(workerCpu):.0%} CPU"
            )
        if fig["errors"] or fig["corrupt"]:
            self.notes.append(
                f"{kind} {name}: {fig['errors']} failed connections/exchanges, "
                f"{fig['corrupt']} corrupt echoes"
            )
        return fig

    def _cpuText(self, fig) -> str:
        parts = [f"server {fig['serverCpu']:.0%}"]
        if fig["backendCpu"] is not None:
            parts.append(f"backend {fig['backendCpu']:.0%}")
        parts.append("loadgen " + "/".join(f"{c:.0%}" for c in fig["loadgenCpu"]))
        if fig["machineBusy"] is not None:
            parts.append(f"softirq {fig['softirq']:.0%}, other {fig['otherCpu']:.0%}; machine {fig['machineBusy']:.0%}")
        return "cpu " + ", ".join(parts)

    def _record(self, kind: str, fig: dict) -> None:
        self.results.setdefault(kind, {}).setdefault(fig["target"], []).append(fig)

    # -- the measurements ------------------------------------------------------

    def echoParams(self, target, connections, workers=None) -> list:
        workers = workers or self.args.workers
        shares = split(connections, workers)
        return [
            {
                "addr": target.addr,
                "connections": n,
                "size": self.args.size,
                "cidBase": i * 1_000_000,
                "sources": self.sources,
            }
            if n
            else None
            for i, n in enumerate(shares)
        ] + [None] * (self.args.workers - workers)

    def echo(self, name: str, label: str, connections: int, duration: float, workers=None) -> dict:
        fig = self._measure(
            "echo", name, self.echoParams(self.targets[name], connections, workers),
            self.args.warmup, duration,
        )
        self.say(
            f"{label}: {name:<11} {fig['rate']:>9,.0f} req/s  p50 {ms(fig['p50'])} "
            f"p99 {ms(fig['p99'])} ms  ({self._cpuText(fig)})"
        )
        return fig

    def connect(self, name: str, label: str) -> dict:
        shares = split(self.args.inflight, self.args.workers)
        params = [
            {
                "addr": self.targets[name].addr,
                "concurrency": n,
                "size": self.args.size,
                "cidBase": i * 100_000_000,
                "sources": self.sources,
            }
            if n
            else None
            for i, n in enumerate(shares)
        ]
        fig = self._measure("connect", name, params, self.args.warmup, self.args.duration)
        self.say(
            f"{label}: {name:<11} {fig['rate']:>9,.0f} conn/s p50 {ms(fig['p50'])} ms  "
            f"({self._cpuText(fig)})"
        )
        return fig

    def bulk(self, name: str, label: str) -> dict:
        shares = split(self.args.bulk, self.args.workers)
        params = [
            {
                "addr": self.targets[name].addr,
                "connections": n,
                "chunk": BULK_CHUNK,
                "window": BULK_WINDOW,
                "cidBase": i,
                "sources": self.sources,
            }
            if n
            else None
            for i, n in enumerate(shares)
        ]
        fig = self._measure("bulk", name, params, self.args.warmup, self.args.duration)
        fig["mbps"] = fig["rate"] / 1e6
        self.say(f"{label}: {name:<11} {fig['mbps']:>9,.1f} MB/s echoed  ({self._cpuText(fig)})")
        return fig

    def held(self, name: str, count: int) -> dict:
        from servers import openFiles, rssKiB

        target = self.targets[name]
        pid = target.pid
        time.sleep(0.3)
        before = rssKiB(pid)
        fdsBefore = openFiles(pid)
        shares = split(count, self.args.workers)
        params = [
            {
                "addr": target.addr,
                "connections": n,
                "cidBase": i * 100_000_000,
                "sources": self.sources,
                "concurrency": 32,
            }
            if n
            else None
            for i, n in enumerate(shares)
        ]
        self.say(f"held: opening {count:,} connections through {name} and echoing once on each ...")
        seen = {}

        def whileHeld(infos):
            time.sleep(0.5)
            seen["rss"] = rssKiB(pid)
            seen["fds"] = openFiles(pid)
            seen["backendRss"] = rssKiB(self.servers.backend.pid)

        infos, _ = self.lg.hold(params, whileHeld, timeout=max(60.0, count / 100))
        self.servers.check()
        held = sum(i["held"] for i in infos)
        errors = sum(i["errors"] for i in infos)
        fig = {
            "target": name,
            "held": held,
            "asked": count,
            "errors": errors,
            "rssBefore": before,
            "rssAfter": seen["rss"],
            "fdsBefore": fdsBefore,
            "fdsAfter": seen["fds"],
            "perConn": (seen["rss"] - before) / held if held else None,
        }
        if held < count:
            self.notes.append(f"held {name}: only {held:,} of {count:,} connections opened ({errors} failed)")
        self.say(
            f"held: {name:<11} {held:,} connections: RSS {before:,} -> {seen['rss']:,} KiB, "
            f"{fig['perConn'] or 0:.2f} KiB each; open files {fdsBefore} -> {seen['fds']}"
        )
        return fig

    # -- the whole run -----------------------------------------------------------

    def run(self) -> dict:
        from loadgen import LoadGenerator
        from servers import Servers, haproxyPath, installHaproxy

        args = self.args
        names = list(args.targets)
        haproxy = None
        if "haproxy" in names:
            haproxy = haproxyPath()
            if haproxy is None and args.install_haproxy:
                haproxy = installHaproxy(self.say)
            if haproxy is None:
                names.remove("haproxy")
                self.notes.append(
                    "haproxy: not installed, skipped (--install-haproxy installs it "
                    "with apt-get)"
                )
                self.say("haproxy is not installed: skipping it (--install-haproxy installs it)")
        self.names = names

        # The load generator forks before any server starts.
        self.lg = LoadGenerator(args.workers)
        workdir = Path(args.logs or tempfile.mkdtemp(prefix="twistedcluster-bench-")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        # twistd runs as `python -c ...`, which puts its working directory
        # first on sys.path: run it where no twistedcluster package lies, so
        # that the code measured is the one chosen (PYTHONPATH, or installed).
        os.chdir(workdir)
        self.servers = Servers(
            workdir, names, self.pythonPath, self.maxHeld, haproxy, self.say, baseline=args.baseline,
            balancerArgs=shlex.split(args.balancer_args),
        )
        try:
            self.targets = self.servers.start()
            self.say(f"logs in {workdir}/; load generator: {args.workers} worker processes (pids {self.lg.pids})")
            for n in names:
                t = self.targets[n]
                self.say(f"  {n:<11} 127.0.0.1:{t.port} pid {t.pid} {t.note}")
            self._runAll()
        finally:
            self.say("stopping the load generator and every server ...")
            self.lg.close()
            self.servers.stop()
        pfLog = workdir / "portforward.log"
        if "portforward" in names and pfLog.exists():
            with open(pfLog, "rb") as f:
                lines = sum(1 for _ in f)
            self.notes.append(
                f"portforward as shipped logs two lines per connection (its client factory is "
                f"noisy): {lines:,} lines, {pfLog.stat().st_size / 1e6:.1f} MB in {pfLog} this run; "
                "that cost is part of its figures"
            )
        return self.report()

    def _order(self, r: int) -> List[str]:
        n = self.names
        k = r % len(n)
        return n[k:] + n[:k]

    def _runAll(self) -> None:
        args = self.args
        rounds = args.rounds
        # Memory first, in processes that have served nothing else.
        loads = args.loads
        if args.held and "held" in loads:
            for name in self.names:
                self._record("held", self.held(name, self.heldCount))
        # Is the load generator the limit?  The direct echo with one worker
        # against all of them.
        if args.workers > 1 and "direct" in self.names and "echo" in loads:
            fig = self.echo("direct", "loadgen check, 1 worker", args.connections, args.duration, workers=1)
            self._record("echo1", fig)
        for r in range(rounds if "echo" in loads else 0):
            for name in self._order(r):
                self._record("echo", self.echo(name, f"echo {r + 1}/{rounds}", args.connections, args.duration))
        for r in range(rounds if "ping" in loads else 0):
            for name in self._order(r):
                self._record("ping", self.echo(name, f"1-conn latency {r + 1}/{rounds}", 1, max(1.0, args.duration / 2), workers=1))
        for r in range(rounds if "connect" in loads else 0):
            for name in self._order(r):
                self._record("connect", self.connect(name, f"new conns {r + 1}/{rounds}"))
        for r in range(rounds if "bulk" in loads else 0):
            for name in self._order(r):
                self._record("bulk", self.bulk(name, f"bulk {r + 1}/{rounds}"))

    # -- figures -------------------------------------------------------------------

    def _aggregate(self, kind: str, name: str, key: str, stat: str) -> Optional[float]:
        """
        One figure from the rounds: their median, or the best of them (the
        highest rate; the lowest latency or cost), since other processes on
        a shared machine can only slow a measurement down.
        """
        values = [f[key] for f in self.results.get(kind, {}).get(name, []) if f.get(key) is not None]
        if not values:
            return None
        if stat == "median":
            return statistics.median(values)
        return max(values) if key in ("rate", "mbps") else min(values)

    def figures(self, stat: Optional[str] = None) -> Dict[str, Dict[str, Optional[float]]]:
        stat = stat or self.args.stat
        out: Dict[str, Dict[str, Optional[float]]] = {}
        for name in TARGETS:
            m = lambda kind, key: self._aggregate(kind, name, key, stat)
            ms_ = lambda v: None if v is None else v * 1000
            us_ = lambda v: None if v is None else v * 1e6
            # seconds per byte echoed, as us per MB (1e6 us, 1e6 bytes)
            usPerMB = lambda v: None if v is None else v * 1e12
            out[name] = {
                "echo_rps": m("echo", "rate"),
                "echo_p50": ms_(m("echo", "p50")),
                "echo_p99": ms_(m("echo", "p99")),
                "ping_p50": ms_(m("ping", "p50")),
                "ping_p99": ms_(m("ping", "p99")),
                "conn_rate": m("connect", "rate"),
                "conn_p50": ms_(m("connect", "p50")),
                "bulk_mbps": m("bulk", "mbps"),
                "rss_per_conn": m("held", "perConn"),
                "cpu_per_echo": us_(m("echo", "serverCpuPerOp")),
                "cpu_per_conn": us_(m("connect", "serverCpuPerOp")),
                "cpu_per_mb": usPerMB(m("bulk", "serverCpuPerOp")),
            }
        return out

    def roundRatios(self, kind: str, key: str, a: str, b: str) -> List[float]:
        ra = self.results.get(kind, {}).get(a, [])
        rb = self.results.get(kind, {}).get(b, [])
        return [x[key] / y[key] for x, y in zip(ra, rb) if x.get(key) and y.get(key)]

    def report(self) -> dict:
        args = self.args
        figs = self.figures()
        medians = self.medians = self.figures("median")
        best = self.figures("best")
        out = sys.stdout
        heldText = f"{self.heldCount:,}" if args.held else "not run"
        labels = {
            "connections": args.connections,
            "inflight": args.inflight,
            "bulk": args.bulk,
            "heldText": heldText,
        }
        print(file=out)
        print(
            f"twistedcluster benchmark: {args.rounds} round(s) of {args.duration:g} s per "
            f"measurement (+{args.warmup:g} s warm-up), {args.workers} load generator "
            f"processes, {args.size}-byte echo messages; every target in front of the SAME "
            f"single echo backend on 127.0.0.1; figures are the {self.statText} of the rounds.",
            file=out,
        )
        print(f"code measured: {self.codeText}", file=out)
        print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}", file=out)
        print(file=out)
        cols = [c for c in TARGETS if c != "baseline" or c in self.names]
        ratioCols = [r for r in RATIOS if r[2] != "baseline" or "baseline" in self.names]
        w0 = max(len(r[1].format(**labels)) for r in ROWS) + 2
        header = f"{'metric':<{w0}}" + "".join(f"{c:>13}" for c in cols) + "".join(f"{r[0]:>11}" for r in ratioCols)
        print(header, file=out)
        print("-" * len(header), file=out)
        for key, label, unit, higher in ROWS:
            line = f"{label.format(**labels):<{w0}}"
            for c in cols:
                v = figs[c][key] if c in self.names else None
                line += f"{fmt(v, unit):>13}"
            for rname, a, b in ratioCols:
                va, vb = figs[a][key], figs[b][key]
                if a in self.names and b in self.names and va is not None and vb:
                    line += f"{va / vb:>10.2f}x"
                else:
                    line += f"{'-':>11}"
            print(line, file=out)
        print(file=out)
        print(
            "direct = straight to the echo backend (its RSS per connection in the RSS row); "
            "server CPU = the proxy process's own CPU (for direct: the backend's);",
            file=out,
        )
        print(
            "bulk MB/s counts echoed payload (every byte crosses the proxy twice); "
            "ratios are the row's values divided (for ms and us rows lower is better);",
            file=out,
        )
        print(
            f"p50/p99 with {args.connections} conns are mostly queueing in a closed loop (about "
            "conns / req/s); the 1-conn figures are the latency a hop adds, mostly process wake-ups here.",
            file=out,
        )
        verdicts = self.targetsVerdicts(figs)
        print(file=out)
        print("issue 7 targets (ratios measured in this run):", file=out)
        for v in verdicts:
            print(f"  {v['mark']:<4} {v['text']}", file=out)
        hap = self.haproxyText(figs)
        if hap:
            print(file=out)
            print(hap, file=out)
        print(file=out)
        print("load generator:", file=out)
        for line in self.loadgenVerdict():
            print(f"  {line}", file=out)
        print(f"  fd limit: {self.fdText}", file=out)
        if self.notes:
            print(file=out)
            print("notes:", file=out)
            for n in self.notes:
                print(f"  - {n}", file=out)
        report = {
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "code": self.codeText,
            "heldCount": self.heldCount,
            "stat": args.stat,
            "figures": {c: figs[c] for c in self.names},
            "medians": {c: medians[c] for c in self.names},
            "best": {c: best[c] for c in self.names},
            "ratios": {
                rname: {key: (figs[a][key] / figs[b][key]) if (a in self.names and b in self.names and figs[a][key] is not None and figs[b][key]) else None for key, *_ in ROWS}
                for rname, a, b in RATIOS
            },
            "targets": verdicts,
            "rounds": self.results,
            "loadgen": self.loadgenVerdict(),
            "notes": self.notes,
            "noisy": self.noisy,
            "fdLimit": self.fdText,
        }
        return report

    def targetsVerdicts(self, figs) -> List[dict]:
        have = lambda *ns: all(n in self.names for n in ns)
        out = []

        def ratio(key, need, text):
            b, p = figs["balancer"][key], figs["portforward"][key]
            if not have("balancer", "portforward") or b is None or not p:
                out.append({"mark": "n/a", "text": f"{text} (needs balancer and portforward)", "ok": None})
                return
            rounds = self.roundRatios(
                {"echo_rps": "echo", "conn_rate": "connect", "bulk_mbps": "bulk"}[key],
                {"echo_rps": "rate", "conn_rate": "rate", "bulk_mbps": "mbps"}[key],
                "balancer", "portforward",
            )
            r = b / p
            spread = ""
            if len(rounds) > 1:
                mb, mp = self.medians["balancer"][key], self.medians["portforward"][key]
                if mb is not None and mp:
                    spread = f"; medians {mb / mp:.2f}x"
                spread += f"; per round {', '.join(f'{x:.2f}' for x in rounds)}"
            cpuKey = {"echo_rps": "cpu_per_echo", "conn_rate": "cpu_per_conn", "bulk_mbps": "cpu_per_mb"}[key]
            if figs["balancer"][cpuKey] and figs["portforward"][cpuKey]:
                spread += (
                    f"; by server CPU per {'MB' if key == 'bulk_mbps' else 'operation'} "
                    f"{figs['portforward'][cpuKey] / figs['balancer'][cpuKey]:.2f}x"
                )
            out.append({
                "mark": "PASS" if r >= need else "FAIL",
                "text": f"{text}: balancer/portforward = {r:.2f}x (need >= {need}x{spread})",
                "ok": r >= need,
                "value": r,
            })

        ratio("echo_rps", 1.3, "echo req/s")
        ratio("conn_rate", 1.5, "new connections/s")
        ratio("bulk_mbps", 1.3, "bulk MB/s")
        for key, what in (("ping_p50", "1 conn"), ("echo_p50", f"{self.args.connections} conns, under load")):
            d, b, p = figs["direct"][key], figs["balancer"][key], figs["portforward"][key]
            if not have("direct", "balancer", "portforward") or None in (d, b, p):
                out.append({"mark": "n/a", "text": f"p50 latency added over direct, {what} (needs direct, balancer, portforward)", "ok": None})
                continue
            ok = (b - d) <= (p - d)
            out.append({
                "mark": "PASS" if ok else "FAIL",
                "text": f"p50 latency added over direct, {what}: balancer {b - d:+.3f} ms, "
                f"portforward {p - d:+.3f} ms (need balancer <= portforward)",
                "ok": ok,
            })
        per = figs["balancer"]["rss_per_conn"]
        if per is None or "balancer" not in self.names:
            out.append({"mark": "n/a", "text": "held connections: not measured", "ok": None})
        else:
            held = self.results["held"]["balancer"][0]["held"]
            ok = per < 10.0 and held >= 9000
            mark = "PASS" if ok else "FAIL"
            cap = ""
            if held < 9000:
                cap = f" (only {held:,} held, the target is at 9,000: not a full test)"
                if per < 10.0:
                    mark, ok = "n/a", None
            out.append({
                "mark": mark,
                "text": f"{held:,} held connections: balancer {per:.2f} KiB RSS each (need < 10 KiB at 9,000){cap}",
                "ok": ok,
            })
        return out

    def haproxyText(self, figs) -> str:
        if not all(n in self.names for n in ("haproxy", "portforward")):
            return ""
        h, p, d = figs["haproxy"], figs["portforward"], figs["direct"]
        parts = []
        for key, what, seen in (("echo_rps", "req/s", 1.6), ("conn_rate", "conn/s", 2.7), ("bulk_mbps", "bulk", 1.3)):
            if h[key] and p[key]:
                parts.append(f"{what} {h[key] / p[key]:.2f}x (seen elsewhere ~{seen}x)")
        if "direct" in self.names and None not in (h["ping_p50"], p["ping_p50"], d["ping_p50"]):
            ph, pp = h["ping_p50"] - d["ping_p50"], p["ping_p50"] - d["ping_p50"]
            if pp > 0:
                parts.append(f"added p50 (1 conn) {ph / pp:.2f} of portforward's (seen elsewhere ~0.2)")
        return "haproxy vs portforward in this run: " + "; ".join(parts)

    def _pingCount(self) -> int:
        return sum(len(rs) for kind in ("ping", "echo1") for rs in self.results.get(kind, {}).values())

    def loadgenVerdict(self) -> List[str]:
        lines = []
        one = self.results.get("echo1", {}).get("direct", [])
        many = self.results.get("echo", {}).get("direct", [])
        if one and many:
            r1 = one[0]["rate"]
            c1 = max(one[0]["loadgenCpu"])
            rn = statistics.median(f["rate"] for f in many)
            backend = statistics.median(f["serverCpu"] for f in many)
            lg = max(max(f["loadgenCpu"]) for f in many)
            text = (
                f"direct echo with 1 worker {r1:,.0f} req/s (the worker at {c1:.0%} CPU), with "
                f"{self.args.workers} workers {rn:,.0f} req/s, median of the rounds ({rn / r1:.2f}x; "
                f"busiest worker {lg:.0%}, echo backend at {backend:.0%} of a core)"
            )
            lines.append(text)
            machine = statistics.median(f["machineBusy"] or 0 for f in many)
            if c1 >= SATURATED:
                lines.append("one worker alone saturates: the figures use all the workers")
            # The backend at its busiest: in the rounds, or alone with 1 worker.
            backendMax = max(backend, one[0]["serverCpu"] or 0)
            if rn < 1.1 * r1:
                if backendMax >= SATURATED:
                    lines.append(
                        f"adding workers does not raise the direct figure: the single-threaded echo backend "
                        f"(up to {backendMax:.0%} of a core) is the limit there, not the load generator"
                    )
                elif machine >= SATURATED:
                    lines.append(
                        f"adding workers does not raise the direct figure: the machine's cores were {machine:.0%} busy "
                        "(load generator, backend, kernel and whatever else runs here share them), no worker was saturated"
                    )
                elif lg >= SATURATED:
                    lines.append("adding workers does not raise the direct figure and neither the backend nor the machine is busy: the load generator saturates")
                else:
                    lines.append(
                        "adding workers does not raise the direct figure, and no worker, nor the backend, nor the "
                        "machine was saturated: the closed loop's round trips (process wake-ups) set it"
                    )
            elif c1 < SATURATED:
                lines.append(
                    "adding workers raised the direct figure although one worker was not saturated: in a "
                    "closed loop the load generator's own turnaround counts (or the rounds were noisy)"
                )
        proxied = [
            max(f["loadgenCpu"]) for kind in ("echo", "connect", "bulk")
            for name, rs in self.results.get(kind, {}).items() if name != "direct" for f in rs
        ]
        if proxied:
            lines.append(
                f"through the proxies the busiest load generator worker was at {max(proxied):.0%} CPU: "
                "the load generator is not what limits the proxied figures"
                if max(proxied) < SATURATED
                else f"through the proxies a load generator worker reached {max(proxied):.0%} CPU"
            )
        measured = [f for kind in ("echo", "connect", "bulk") for rs in self.results.get(kind, {}).values() for f in rs]
        busy = [f for f in measured if (f.get("machineBusy") or 0) >= SATURATED]
        if measured and len(busy) * 2 >= len(measured):
            lines.append(
                f"the machine was >= {SATURATED:.0%} busy in {len(busy)} of {len(measured)} load measurements: "
                "there the rates are set by the CPU that all processes spend per request on the shared cores, "
                "so read 'server CPU us per ...' (the proxy's own cost) beside them"
            )
        if self.noisy:
            others = sorted(f.get("otherCpu") or 0 for f in measured)
            lines.append(
                f"other processes on this machine (not ours, not the kernel's packet work) used more than "
                f"{NOISY:.0%} of a core in {len(self.noisy)} of {len(measured) + self._pingCount()} "
                f"measurements (median {statistics.median(others):.0%} of a core in the load measurements): "
                "those rounds are noisy; compare the per-round ratios and the CPU-per-operation rows"
            )
        if self.saturation:
            lines.append("saturated load generator workers (>= 90% CPU) in: " + "; ".join(self.saturation))
        else:
            lines.append("no load generator worker reached 90% CPU in any measurement")
        lines.append(
            f"the load generator, the echo backend and the proxy share this machine's {os.cpu_count()} cores: "
            "a proxy is compared at equal load-generator and backend cost, but the absolute figures are lower than on separate machines"
        )
        return lines


def ms(v) -> str:
    return f"{v * 1000:.3f}" if v is not None else "-"


def fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("req/s", "conn/s"):
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.3f}"
    if unit in ("MB/s", "us"):
        return f"{v:,.1f}"
    return f"{v:.2f}"


def codeText(useCheckout: bool, codeRoot: Path) -> str:
    import twistedcluster

    where = os.path.dirname(twistedcluster.__file__)
    text = where
    if useCheckout and (codeRoot / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "-C", str(codeRoot), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(codeRoot), "status", "--porcelain", "--", "twistedcluster", "twisted"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            if head:
                text += f" (checkout at {head}{', with uncommitted changes' if dirty else ''})"
        except (OSError, subprocess.SubprocessError):
            pass
    elif not useCheckout:
        text += " (installed package)"
    return text


def parseArgs(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description=(
            "Measure the cluster balancer (proxy mode) against a direct connection, "
            "Twisted's portforward and HAProxy, all in front of one echo backend on "
            "127.0.0.1, and print a table with ratios and the issue 7 targets; then "
            "(the nginx part, bench/nginx.py) every proxy in front of nginx driven by wrk, "
            "with issue 16's targets against HAProxy."
        ),
    )
    p.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 2; --quick: 1)")
    p.add_argument("--warmup", type=float, default=None, help="uncounted seconds before each measurement (default 0.5; --quick: 0.3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of each measurement, targets in rotated order (default 5; --quick: 1)")
    p.add_argument("--stat", choices=("best", "median"), default="best", help="figure shown for several rounds: the best one (default; other processes can only slow a round down) or the median; --json has both")
    p.add_argument("--quick", action="store_true", help="a smoke run of under a minute: short measurements, 1 round, 1,000 held connections")
    p.add_argument("--connections", type=int, default=None, help="persistent connections for the echo load (default 128; --quick: 64)")
    p.add_argument("--inflight", type=int, default=32, help="new connections in flight at once (default 32)")
    p.add_argument("--bulk", type=int, default=4, help="connections streaming for the bulk figure (default 4)")
    p.add_argument("--size", type=int, default=64, help="bytes per echo message (default 64)")
    p.add_argument("--held", type=int, default=None, help="idle connections held through each target for the RSS figure (default 9000; --quick: 1000; 0: skip)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--sources", type=int, default=8, help="client source addresses 127.0.0.2 ... (default 8)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help=f"comma-separated, from {','.join(DEFAULT_TARGETS)} (default all; --baseline adds baseline)")
    p.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated measurements, from {','.join(LOADS)} (default all)")
    p.add_argument("--baseline", default=None, metavar="DIR", help="also measure, as the target `baseline`, a second balancer running the twistedcluster package in DIR (e.g. `git archive HEAD twistedcluster twisted | tar -x -C DIR`), in front of the same backend: a before/after comparison in one run (column bal/base)")
    p.add_argument("--balancer-args", default="", metavar="ARGS", help="extra options for the measured balancer only (not the baseline), split like a shell would: with --baseline DIR holding the same code, an A/B of one option, e.g. --balancer-args='--access-log=/tmp/access.log' (column bal/base)")
    p.add_argument("--install-haproxy", action="store_true", help="apt-get install haproxy when it is missing (needs root)")
    p.add_argument("--parts", default="echo,nginx", help="comma-separated: echo (the table above, in front of a Twisted echo backend) and nginx (wrk -> proxy -> nginx, issue 16's targets); default both; the nginx part is skipped with a note when nginx or wrk is missing")
    p.add_argument("--nginx-loads", default=",".join(NGINX_LOADS), help=f"the nginx part's measurements, from {','.join(NGINX_LOADS)} (default all)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads for the nginx part's 64- and 32-connection loads (default 1)")
    p.add_argument("--balancer-workers", type=int, default=0, metavar="N", help="the nginx part also runs the balancer with --workers=N (target balancer-workers; its CPU is its processes' together): the new connection rate from every core, beside HAProxy's one thread (not one of issue 16's per-thread targets)")
    p.add_argument("--reactor-relay", action="store_true", help="the nginx part also runs bench/reactorrelay.py (python-floor's relay on Twisted's reactor: what the reactor costs apart from its transports), bench/countrelay.py (that relay routed least-conn by a dict of counts: what routing at all costs) and bench/poolrelay.py (that relay routed by the real pool: the least a least-load balancer on Twisted's reactor costs)")
    p.add_argument("--install-nginx", action="store_true", help="apt-get install nginx and wrk when missing (needs root)")
    p.add_argument("--installed", action="store_true", help="measure the installed twistedcluster, not the checkout this script sits in")
    p.add_argument("--code", default=None, metavar="DIR", help="measure the twistedcluster package in DIR (a checkout, or e.g. `git archive HEAD | tar -x -C DIR`), not the checkout this script sits in")
    p.add_argument("--logs", default=None, help="folder for the servers' logs (default: a new temporary folder)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    args = p.parse_args(argv)
    q = args.quick
    if args.duration is None:
        args.duration = 1.0 if q else 2.0
    if args.warmup is None:
        args.warmup = 0.3 if q else 0.5
    if args.rounds is None:
        args.rounds = 1 if q else 5
    if args.connections is None:
        args.connections = 64 if q else 128
    if args.held is None:
        args.held = 1000 if q else 9000
    # The run changes its working directory to the log folder.
    if args.json:
        args.json = str(Path(args.json).resolve())
    if args.logs:
        args.logs = str(Path(args.logs).resolve())
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        p.error(f"--targets: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(TARGETS)}")
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
        if not (Path(args.baseline) / "twistedcluster" / "__init__.py").exists():
            p.error(f"--baseline {args.baseline}: no twistedcluster package there")
        targets.append("baseline")
    elif "baseline" in targets:
        p.error("--targets baseline needs --baseline DIR")
    args.targets = [t for t in TARGETS if t in targets]
    loads = [t.strip() for t in args.loads.split(",") if t.strip()]
    bad = [t for t in loads if t not in LOADS]
    if bad or not loads:
        p.error(f"--loads: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(LOADS)}")
    args.loads = loads
    parts = [t.strip() for t in args.parts.split(",") if t.strip()]
    if not parts or any(t not in ("echo", "nginx") for t in parts):
        p.error(f"--parts: choose from echo,nginx (got {args.parts!r})")
    args.parts = parts
    nloads = [t.strip() for t in args.nginx_loads.split(",") if t.strip()]
    bad = [t for t in nloads if t not in NGINX_LOADS]
    if bad or not nloads:
        p.error(f"--nginx-loads: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(NGINX_LOADS)}")
    args.nginx_loads = [t for t in NGINX_LOADS if t in nloads]
    checks = [
        (args.duration > 0 and args.duration <= 120, "--duration must be in (0, 120]"),
        (0 <= args.warmup <= 30, "--warmup must be in [0, 30]"),
        (1 <= args.rounds <= 10, "--rounds must be 1..10"),
        (1 <= args.connections <= 5000, "--connections must be 1..5000"),
        (1 <= args.inflight <= 1000, "--inflight must be 1..1000"),
        (1 <= args.bulk <= 64, "--bulk must be 1..64"),
        (20 <= args.size <= 65536, "--size must be 20..65536"),
        (0 <= args.held <= 100_000, "--held must be 0..100000"),
        (1 <= args.workers <= 32, "--workers must be 1..32"),
        (1 <= args.sources <= 250, "--sources must be 1..250"),
        (1 <= args.wrk_threads <= 16, "--wrk-threads must be 1..16"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return args


def runNginx(args, say, pythonPath, codeText: str) -> dict:
    """
    The nginx part (bench/nginx.py), when nginx and wrk are there (or
    C{--install-nginx} installs them); a note saying why not otherwise.
    """
    import nginx

    if args.install_nginx:
        nginx.installNginx(say)
    missing = [n for n, path in (("nginx", nginx.nginxPath()), ("wrk", nginx.wrkPath())) if path is None]
    if missing:
        text = f"nginx part skipped: {' and '.join(missing)} not installed (--install-nginx installs them with apt-get)"
        say(text)
        print(f"\n{text}")
        return {"skipped": text}
    names = [
        t for t in nginx.NGINX_TARGETS
        if t in args.targets
        or (t == "haproxy-splice" and "haproxy" in args.targets)
        or (t in ("python-floor", "twisted-relay") and "balancer" in args.targets)
        or (t in ("reactor-relay", "count-relay", "pool-relay") and args.reactor_relay)
        or (t == "balancer-workers" and args.balancer_workers)
    ]
    return nginx.NginxBench(args, say, pythonPath, codeText).run(names)


def main(argv=None) -> int:
    args = parseArgs(argv)
    say = Progress()
    codeRoot = Path(args.code).resolve() if args.code else ROOT
    if args.code and not (codeRoot / "twistedcluster" / "__init__.py").exists():
        print(f"bench/run.py: --code {args.code}: no twistedcluster package there", file=sys.stderr)
        return 2
    useCheckout = not args.installed and (codeRoot / "twistedcluster" / "__init__.py").exists()
    pythonPath = str(codeRoot) if useCheckout else None
    if useCheckout:
        sys.path.insert(0, str(codeRoot))
    sys.path.insert(0, str(HERE))

    was, soft = raiseFileLimit()
    # The proxies need 2 descriptors per held connection, plus a few.
    maxHeld = max(0, (soft - 200) // 2)
    heldCount = min(args.held, maxHeld)
    fdText = f"RLIMIT_NOFILE soft limit raised from {was} to {soft} (the hard limit) here and in every process started"
    if heldCount < args.held:
        fdText += (
            f"; --held {args.held:,} CAPPED to {heldCount:,}: a proxy needs 2 descriptors per held "
            f"connection and may hold at most {soft}"
        )
    else:
        fdText += f"; {heldCount:,} held connections need about {2 * heldCount + 50:,} in a proxy"

    bench = Bench(args, say)
    bench.pythonPath = pythonPath
    bench.maxHeld = max(heldCount, 100)
    bench.heldCount = heldCount
    bench.fdText = fdText
    bench.codeText = codeText(useCheckout, codeRoot)
    say(f"twistedcluster benchmark: targets {', '.join(args.targets)}; code: {bench.codeText}")
    say(fdText)

    def onTerm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, onTerm)
    # Started in the background by a shell, SIGINT may come ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report: dict = {}
        if "echo" in args.parts:
            report = bench.run()
        if "nginx" in args.parts:
            report["nginx"] = runNginx(args, say, pythonPath, bench.codeText)
    except KeyboardInterrupt:
        say("interrupted: every process was stopped")
        return 130
    except Exception as e:
        say(f"benchmark failed: {type(e).__name__}: {e}")
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        say(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
