"""
The nginx part of bench/run.py: every proxy in front of nginx serving small
and large files on 127.0.0.1, driven by wrk (HTTP, keep-alive and
C{Connection: close}).

The echo part's backend is a single Twisted process, slower than the
proxies: its cost hides part of theirs.  nginx is not: here each proxy's
own cost per request, per connection and per megabyte shows as users see
it.  Targets, each in front of the same nginx (one process, access log
off): direct, HAProxy one thread, HAProxy one thread with
C{option splice-auto}, the balancer (nginx as its one static backend),
Twisted's portforward, the balancer's relay with nothing around it
(bench/twistedrelay.py: Twisted's transports, the dialer and the relay, no
pool or accounting), the least relay Python can run (bench/floorrelay.py:
epoll, recv and send, no framework; what no Python proxy can go below), and
the baseline balancer with C{--baseline}.

Loads (wrk; figures from a Lua C{done} hook that prints them as JSON):

  - keepalive: requests/s for a 64-byte file on 64 persistent connections;
  - latency: p50/p99 of one connection's requests, one at a time;
  - close: new connections/s, 32 at a time, each one request with
    C{Connection: close} (nginx closes after answering);
  - bulk: a 50 MB file, again and again, on one connection.

The proxy process's CPU (user + system, from /proc) is sampled around each
wrk run and divided by what wrk did.  PASS/FAIL lines judge issue 16's
targets as ratios against HAProxy in the same run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

try:
    from servers import HOST, Target, _connectable, aptInstall, cpuSeconds, descendants, haproxyPath, treeCpuSeconds
except ImportError:  # imported as bench.nginx (the tests)
    from bench.servers import (
        HOST, Target, _connectable, aptInstall, cpuSeconds, descendants, haproxyPath, treeCpuSeconds,
    )
from twistedcluster.localcluster import (
    LocalCluster,
    Process,
    ProcessExited,
    freePort,
    twistdCommand,
    waitFor,
)

#: In the order the table shows them.
NGINX_TARGETS = [
    "direct", "haproxy", "haproxy-splice", "balancer", "balancer-workers", "portforward", "twisted-relay",
    "reactor-relay", "count-relay", "pool-relay", "python-floor", "baseline",
]
NGINX_LOADS = ["keepalive", "latency", "close", "bulk"]
#: The reference relays: name, script in bench/, note.  twisted-relay and
#: python-floor run with the balancer; reactor-relay, count-relay and
#: pool-relay with --reactor-relay.
REFERENCE_RELAYS = [
    ("twisted-relay", "twistedrelay.py", "bench/twistedrelay.py: the balancer's relay alone"),
    ("reactor-relay", "reactorrelay.py", "bench/reactorrelay.py: python-floor on Twisted's reactor"),
    ("count-relay", "countrelay.py", "bench/countrelay.py: reactor-relay routed least-conn by a dict"),
    ("pool-relay", "poolrelay.py", "bench/poolrelay.py: reactor-relay routed by the real pool"),
    ("python-floor", "floorrelay.py", "bench/floorrelay.py: epoll, recv, send"),
]
SMALL = "64.bin"
SMALL_SIZE = 64
LARGE = "50m.bin"
LARGE_SIZE = 50 * 1000 * 1000
KEEPALIVE_CONNS = 64
CLOSE_CONNS = 32

# name, label, unit, higher is better
NGINX_ROWS = [
    ("ka_rps", f"keep-alive req/s, {KEEPALIVE_CONNS} conns", "req/s", True),
    ("lat_p50", "p50 us, 1 conn", "us", False),
    ("lat_p99", "p99 us, 1 conn", "us", False),
    ("close_rate", f"new conn/s, {CLOSE_CONNS} conns, close", "conn/s", True),
    ("bulk_mbps", "bulk MB/s, 50 MB, 1 conn", "MB/s", True),
    ("cpu_per_req", "server CPU us per keep-alive req", "us", False),
    ("cpu_per_conn", "server CPU us per new conn", "us", False),
    ("cpu_per_mb", "server CPU us per MB", "us", False),
]

NGINX_RATIOS = [
    ("bal/hap", "balancer", "haproxy"),
    ("bal/hsp", "balancer", "haproxy-splice"),
    ("bal/pf", "balancer", "portforward"),
    ("bal/tw", "balancer", "twisted-relay"),
    ("bal/flr", "balancer", "python-floor"),
    ("flr/hap", "python-floor", "haproxy"),
    ("bal/base", "balancer", "baseline"),
    ("bw/hap", "balancer-workers", "haproxy"),
]

#: Printed by wrk's Lua done() hook: one line, easy to find among wrk's own.
WRK_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration": %d, "requests": %d, "bytes": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50": %d, "p99": %d, "max": %d}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50),
    latency:percentile(99), latency.max))
end
"""


def nginxPath() -> Optional[str]:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def wrkPath() -> Optional[str]:
    return shutil.which("wrk")


def installNginx(say) -> bool:
    """
    C{apt-get install -y nginx wrk}, as asked by C{--install-nginx}
    (root only); whether both are there afterwards.  The package's own
    service is not what is measured: the harness starts nginx itself, with
    its own configuration, on loopback.
    """
    if nginxPath() and wrkPath():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        say("--install-nginx: needs root and apt-get")
        return False
    say("installing nginx and wrk: apt-get update && apt-get install -y nginx wrk ...")
    if not aptInstall(["nginx", "wrk"], "--install-nginx", say, timeout=600):
        return False
    return bool(nginxPath() and wrkPath())


def nginxConfig(workdir: Path, port: int, root: Path, maxconn: int) -> str:
    """
    One nginx process (no master: its CPU is one PID's), no access log,
    every temporary path inside C{workdir}, files sent with sendfile.
    """
    tmp = workdir / "nginx-tmp"
    return f"""\
# written by bench/run.py
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {maxconn * 2 + 100};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{
    worker_connections {maxconn};
    use epoll;
    multi_accept on;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
"""


def haproxyHttpConfig(listenPort: int, backendPort: int, maxconn: int, splice: bool) -> str:
    # mode tcp, as for the echo backend: a layer-4 relay like the balancer.
    return f"""\
# written by bench/run.py
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 600s
    timeout server 600s
{"    option splice-auto" if splice else ""}

frontend bench
    bind {HOST}:{listenPort}
    default_backend web

backend web
    balance leastconn
    server nginx {HOST}:{backendPort}
"""


def _httpGet(port: int, path: str, timeout: float = 5.0) -> Optional[bytes]:
    """
    One GET over a fresh connection; the body, or None.
    """
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET /{path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError:
        return None
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    return body


class NginxServers:
    """
    nginx and every proxy in front of it; C{stop()} stops each by PID.
    """

    def __init__(
        self, workdir: Path, wanted: List[str], pythonPath, maxconn: int, say, baseline=None, workers: int = 2
    ) -> None:
        self.workers = workers
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.wanted = wanted
        self.pythonPath = pythonPath
        self.baseline = baseline
        self.maxconn = maxconn
        self.say = say
        self.procs: List[Process] = []
        self.targets: Dict[str, Target] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if pythonPath:
            old = self.env.get("PYTHONPATH")
            self.env["PYTHONPATH"] = pythonPath + (os.pathsep + old if old else "")

    def _start(self, name: str, argv: List[str], env=None) -> Process:
        proc = Process(name, argv, self.workdir / f"{name}.log", env=env or self.env)
        self.procs.append(proc)
        return proc

    def _alive(self, proc: Process) -> bool:
        if not proc.alive():
            raise ProcessExited(f"{proc.name} exited with status {proc.popen.returncode}:\n" + proc.logText()[-3000:])
        return True

    def _serves(self, port: int) -> bool:
        return _httpGet(port, SMALL) == self.small

    def start(self) -> Dict[str, Target]:
        root = self.workdir / "www"
        root.mkdir(exist_ok=True)
        (self.workdir / "nginx-tmp").mkdir(exist_ok=True)
        self.small = (b"0123456789abcdef" * 4)[:SMALL_SIZE - 1] + b"\n"
        (root / SMALL).write_bytes(self.small)
        with open(root / LARGE, "wb") as f:
            block = bytes(range(256)) * 4096  # 1 MiB
            left = LARGE_SIZE
            while left:
                f.write(block[: min(left, len(block))])
                left -= min(left, len(block))
        port = freePort(HOST)
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginxConfig(self.workdir, port, root, self.maxconn))
        nginx = nginxPath()
        check = subprocess.run(
            [nginx, "-t", "-q", "-p", str(self.workdir), "-e", str(self.workdir / "nginx-error.log"), "-c", str(conf)],
            capture_output=True, text=True, timeout=30,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {conf}:\n{check.stdout}{check.stderr}")
        proc = self._start(
            "nginx", [nginx, "-p", str(self.workdir), "-e", str(self.workdir / "nginx-error.log"), "-c", str(conf)]
        )
        waitFor(lambda: self._alive(proc) and self._serves(port), 20, "nginx to serve")
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10).stderr.strip()
        self.nginxPort = port
        self.targets["direct"] = Target("direct", port, proc, f"{version}, one process, access log off")
        if "haproxy" in self.wanted or "haproxy-splice" in self.wanted:
            haproxy = haproxyPath()
            for name, splice in (("haproxy", False), ("haproxy-splice", True)):
                if name not in self.wanted:
                    continue
                hport = freePort(HOST)
                cfg = self.workdir / f"{name}.cfg"
                cfg.write_text(haproxyHttpConfig(hport, port, self.maxconn, splice))
                r = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
                if r.returncode != 0:
                    raise RuntimeError(f"haproxy -c rejected {cfg}:\n{r.stdout}{r.stderr}")
                hp = self._start(name, [haproxy, "-db", "-f", str(cfg)])
                waitFor(lambda: self._alive(hp) and self._serves(hport), 20, f"{name} to relay")
                self.targets[name] = Target(
                    name, hport, hp, "nbthread 1, mode tcp" + (", option splice-auto" if splice else "")
                )
        for name in ("balancer", "baseline"):
            if name not in self.wanted:
                continue
            cluster = LocalCluster(self.workdir / name, HOST)
            if name == "baseline":
                old = os.environ.get("PYTHONPATH")
                cluster.env["PYTHONPATH"] = self.baseline + (os.pathsep + old if old else "")
            else:
                cluster.env = dict(self.env)
            bp = cluster.startBalancer(name=f"{name}-nginx", extra=[f"--backend={HOST}:{port}"])
            self.procs.append(bp)
            waitFor(lambda: self._alive(bp) and self._serves(cluster.port), 30, f"the {name} to relay to nginx")
            where = cluster.env.get("PYTHONPATH", "").split(os.pathsep)[0] or "installed"
            self.targets[name] = Target(name, cluster.port, bp, f"twistd cluster-balancer from {where}, static backend")
        if "balancer-workers" in self.wanted:
            # The balancer on every core (--workers): its CPU is the main
            # process's and its workers' together.
            n = self.workers
            cluster = LocalCluster(self.workdir / "balancer-workers", HOST)
            cluster.env = dict(self.env)
            bp = cluster.startBalancer(
                name="balancer-workers-nginx", extra=[f"--backend={HOST}:{port}", f"--workers={n}"]
            )
            self.procs.append(bp)
            waitFor(
                lambda: self._alive(bp) and len(descendants(bp.pid)) >= n and self._serves(cluster.port),
                30,
                f"the balancer's {n} workers to relay to nginx",
            )
            target = Target("balancer-workers", cluster.port, bp, f"twistd cluster-balancer --workers={n}")
            target.cpuSeconds = treeCpuSeconds
            self.targets["balancer-workers"] = target
        if "portforward" in self.wanted:
            pport = freePort(HOST)
            pf = self._start(
                "portforward-nginx",
                twistdCommand(
                    "portforward", [f"--port=tcp:{pport}:interface={HOST}", f"--host={HOST}", f"--dest_port={port}"]
                ),
            )
            waitFor(lambda: self._alive(pf) and _connectable(pport) and self._serves(pport), 20, "portforward to relay")
            self.targets["portforward"] = Target("portforward", pport, pf, "twistd portforward")
        for name, script, note in REFERENCE_RELAYS:
            if name in self.wanted:
                self._startReference(name, script, note, port)
        return {n: t for n, t in self.targets.items() if n in self.wanted}

    def _startReference(self, name: str, script: str, note: str, backendPort: int) -> None:
        """
        One of L{REFERENCE_RELAYS}: C{python bench/SCRIPT LISTEN BACKEND HOST}.
        """
        port = freePort(HOST)
        path = Path(__file__).resolve().parent / script
        proc = self._start(name, [sys.executable, str(path), str(port), str(backendPort), HOST])
        waitFor(lambda: self._alive(proc) and _connectable(port) and self._serves(port), 20, f"{name} to relay")
        self.targets[name] = Target(name, port, proc, note)

    def check(self) -> None:
        for proc in self.procs:
            self._alive(proc)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(10)
            except Exception:
                proc.kill()


class NginxBench:
    """
    Runs the nginx loads over every target, in rounds with the targets in
    rotated order, and prints the table and issue 16's verdicts.
    """

    def __init__(self, args, say, pythonPath, codeText: str) -> None:
        self.args = args
        self.say = say
        self.pythonPath = pythonPath
        self.codeText = codeText
        self.results: Dict[str, Dict[str, List[dict]]] = {}
        self.notes: List[str] = []
        self.duration = max(1, int(math.ceil(args.duration)))

    def wrk(self, name: str, path: str, connections: int, threads: int, extra: List[str], latency=False) -> dict:
        target = self.targets[name]
        argv = [
            self.wrkPath, f"-t{threads}", f"-c{connections}", f"-d{self.duration}s",
            "--timeout", "5s", "-s", str(self.script),
            *extra, f"http://{HOST}:{target.port}/{path}",
        ]
        if latency:
            argv.insert(1, "--latency")
        cpuOf = getattr(target, "cpuSeconds", cpuSeconds)
        cpu0 = cpuOf(target.pid)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=self.duration + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError(f"wrk against {name} did not finish in {self.duration + 30} s")
        wall = time.monotonic() - t0
        cpu1 = cpuOf(target.pid)
        self.servers.check()
        line = next((l for l in out.splitlines() if l.startswith("WRKJSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk against {name} failed ({proc.returncode}):\n{out[-2000:]}{err[-2000:]}")
        fig = json.loads(line[len("WRKJSON "):])
        fig["target"] = name
        fig["seconds"] = fig["duration"] / 1e6
        fig["serverCpu"] = cpu1 - cpu0
        fig["serverCpuShare"] = (cpu1 - cpu0) / wall if wall else None
        fig["errors"] = sum(fig[k] for k in ("connect", "read", "write", "status", "timeout"))
        if fig["errors"]:
            self.notes.append(
                f"{name} {path}: wrk counted {fig['errors']} errors "
                f"(connect {fig['connect']}, read {fig['read']}, write {fig['write']}, "
                f"status {fig['status']}, timeout {fig['timeout']})"
            )
        return fig

    def _record(self, kind: str, fig: dict) -> None:
        self.results.setdefault(kind, {}).setdefault(fig["target"], []).append(fig)

    def measure(self, kind: str, name: str, label: str) -> dict:
        if kind == "keepalive":
            fig = self.wrk(name, SMALL, KEEPALIVE_CONNS, self.args.wrk_threads, [])
            fig["rate"] = fig["requests"] / fig["seconds"]
            fig["cpuPerOp"] = fig["serverCpu"] / fig["requests"] if fig["requests"] else None
            text = f"{fig['rate']:>9,.0f} req/s"
        elif kind == "latency":
            fig = self.wrk(name, SMALL, 1, 1, [], latency=True)
            fig["rate"] = fig["requests"] / fig["seconds"]
            fig["cpuPerOp"] = None
            text = f"p50 {fig['p50']} us p99 {fig['p99']} us ({fig['rate']:,.0f} req/s)"
        elif kind == "close":
            fig = self.wrk(name, SMALL, CLOSE_CONNS, self.args.wrk_threads, ["-H", "Connection: close"])
            fig["rate"] = fig["requests"] / fig["seconds"]
            fig["cpuPerOp"] = fig["serverCpu"] / fig["requests"] if fig["requests"] else None
            text = f"{fig['rate']:>9,.0f} conn/s"
        else:
            fig = self.wrk(name, LARGE, 1, 1, [])
            fig["rate"] = fig["bytes"] / fig["seconds"] / 1e6
            mb = fig["bytes"] / 1e6
            fig["cpuPerOp"] = fig["serverCpu"] / mb if mb else None
            text = f"{fig['rate']:>9,.1f} MB/s"
        cpu = f"server {fig['serverCpuShare']:.0%} of a core" if fig["serverCpuShare"] is not None else ""
        self.say(f"nginx {label}: {name:<14} {text}  ({cpu})")
        return fig

    def run(self, names: List[str]) -> dict:
        import tempfile

        self.wrkPath = wrkPath()
        names = list(names)
        if not haproxyPath():
            for n in ("haproxy", "haproxy-splice"):
                if n in names:
                    names.remove(n)
            self.notes.append("haproxy: not installed, skipped: no verdicts against it")
        self.names = names
        workdir = Path(self.args.logs or tempfile.mkdtemp(prefix="twistedcluster-bench-")).resolve() / "nginx"
        self.script = workdir / "report.lua"
        workdir.mkdir(parents=True, exist_ok=True)
        # As in the echo part: twistd must not find this checkout's package
        # in its working directory (the code measured is PYTHONPATH's).
        os.chdir(workdir)
        self.script.write_text(WRK_SCRIPT)
        self.servers = NginxServers(
            workdir, names, self.pythonPath, 4096, self.say, baseline=self.args.baseline,
            workers=self.args.balancer_workers or 2,
        )
        try:
            self.say("nginx part: starting nginx and the proxies in front of it ...")
            self.targets = self.servers.start()
            for n in names:
                t = self.targets[n]
                self.say(f"  {n:<14} 127.0.0.1:{t.port} pid {t.pid} {t.note}")
            rounds = self.args.rounds
            for kind in self.args.nginx_loads:
                for r in range(rounds):
                    k = r % len(names)
                    for name in names[k:] + names[:k]:
                        self._record(kind, self.measure(kind, name, f"{kind} {r + 1}/{rounds}"))
        finally:
            self.say("nginx part: stopping nginx and every proxy ...")
            self.servers.stop()
        return self.report()

    # -- figures -------------------------------------------------------------

    def _agg(self, kind: str, name: str, key: str, stat: str, higher: bool) -> Optional[float]:
        values = [f[key] for f in self.results.get(kind, {}).get(name, []) if f.get(key) is not None]
        if not values:
            return None
        if stat == "median":
            return statistics.median(values)
        return max(values) if higher else min(values)

    def figures(self, stat: str) -> Dict[str, Dict[str, Optional[float]]]:
        out = {}
        us = lambda v: None if v is None else v * 1e6
        for name in NGINX_TARGETS:
            a = lambda kind, key, higher=False: self._agg(kind, name, key, stat, higher)
            out[name] = {
                "ka_rps": a("keepalive", "rate", True),
                "lat_p50": a("latency", "p50"),
                "lat_p99": a("latency", "p99"),
                "close_rate": a("close", "rate", True),
                "bulk_mbps": a("bulk", "rate", True),
                "cpu_per_req": us(a("keepalive", "cpuPerOp")),
                "cpu_per_conn": us(a("close", "cpuPerOp")),
                "cpu_per_mb": us(a("bulk", "cpuPerOp")),
            }
        return out

    def roundRatios(self, kind: str, key: str, a: str, b: str) -> List[float]:
        ra = self.results.get(kind, {}).get(a, [])
        rb = self.results.get(kind, {}).get(b, [])
        return [x[key] / y[key] for x, y in zip(ra, rb) if x.get(key) and y.get(key)]

    def verdicts(self, figs, medians) -> List[dict]:
        out = []
        have = lambda *ns: all(n in self.names for n in ns)
        bal, hap, hsp, d = (figs[n] for n in ("balancer", "haproxy", "haproxy-splice", "direct"))

        def judge(ok, text):
            out.append({"mark": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "text": text, "ok": ok})

        def rate(key, kind, other, need, what):
            o = figs[other]
            if not have("balancer", other) or bal[key] is None or not o[key]:
                return judge(None, f"{what} (needs balancer and {other}, and the {kind} load)")
            r = bal[key] / o[key]
            per = self.roundRatios(kind, "rate", "balancer", other)
            mb, mo = medians["balancer"][key], medians[other][key]
            extra = f"; medians {mb / mo:.2f}x" if mb and mo and len(per) > 1 else ""
            extra += f"; per round {', '.join(f'{x:.2f}' for x in per)}" if len(per) > 1 else ""
            judge(r >= need, f"{what}: balancer/{other} = {r:.2f}x (need >= {need}x{extra}){floor(key, other, True, r >= need)}")

        def floor(key, other, higher, passed):
            # What the least Python relay (recv and send, no splice) reaches
            # on the same target, and, when run, a relay on Twisted's reactor
            # that routes by a dict of counts (count-relay) and the least
            # least-load balancer there (pool-relay): whether a target the
            # balancer misses is within Python's reach at all on this
            # machine, with routing, and with a least-load pool's.
            o = figs[other][key]
            text = ""
            for name, missed in (
                ("python-floor", "the least Python relay misses it too"),
                ("count-relay", "a relay on Twisted's reactor that routes by a dict of counts misses it too"),
                ("pool-relay", "the least least-load balancer on Twisted's reactor misses it too"),
            ):
                f = figs.get(name, {}).get(key)
                if not f or not o:
                    continue
                r = f / o
                text += f"; {name} {r:.2f}x"
                if passed:
                    continue
                reach = r >= need_of[key] if higher else r <= need_of[key]
                text += ": within reach" if reach else f": out of reach ({missed})"
            return text

        need_of = {"close_rate": 0.8, "cpu_per_conn": 1.3, "ka_rps": 1.0, "bulk_mbps": 1.0}

        rate("close_rate", "close", "haproxy", 0.8, "new conn/s")
        if have("balancer", "haproxy") and bal["cpu_per_conn"] and hap["cpu_per_conn"]:
            r = bal["cpu_per_conn"] / hap["cpu_per_conn"]
            judge(
                r <= 1.3,
                f"server CPU per new conn: balancer {bal['cpu_per_conn']:.1f} us, haproxy "
                f"{hap['cpu_per_conn']:.1f} us = {r:.2f}x (need <= 1.3x){floor('cpu_per_conn', 'haproxy', False, r <= 1.3)}",
            )
        else:
            judge(None, "server CPU per new conn (needs balancer, haproxy and the close load)")
        if have("balancer", "haproxy", "direct") and None not in (bal["lat_p50"], hap["lat_p50"], d["lat_p50"]):
            ab, ah = bal["lat_p50"] - d["lat_p50"], hap["lat_p50"] - d["lat_p50"]
            base = f"balancer {ab:+.0f} us, haproxy {ah:+.0f} us over direct's p50 {d['lat_p50']:.0f} us"
            if ah > 0:
                judge(ab <= 2 * ah, f"p50 latency added at 1 conn: {base} (need balancer <= 2 x haproxy's = {2 * ah:+.0f} us)")
            else:
                # A hop that seems to take time off is process wake-ups on a
                # busy machine: then the balancer may add no more than HAProxy.
                judge(ab <= ah, f"p50 latency added at 1 conn: {base} (haproxy added none measurable: need balancer <= haproxy)")
        else:
            judge(None, "p50 latency added at 1 conn (needs direct, balancer, haproxy and the latency load)")
        rate("ka_rps", "keepalive", "haproxy", 1.0, "keep-alive req/s")
        rate("bulk_mbps", "bulk", "haproxy-splice", 1.0, "bulk MB/s")
        bw = figs.get("balancer-workers", {})
        if have("balancer-workers", "haproxy") and bw.get("close_rate") and figs["haproxy"]["close_rate"]:
            # Not one of the targets (they are per thread): what a
            # user gets from every core on this machine, wrk and nginx on
            # the same cores.
            text = (
                f"new conn/s with --workers={self.servers.workers} (every core; not a target): "
                f"balancer-workers/haproxy one thread = {bw['close_rate'] / figs['haproxy']['close_rate']:.2f}x"
            )
            if bw.get("cpu_per_conn"):
                text += f", {bw['cpu_per_conn']:.1f} us of its processes' CPU per new conn"
            out.append({"mark": "info", "ok": None, "text": text})
        return out

    def report(self) -> dict:
        args = self.args
        figs = self.figures(args.stat)
        medians = self.figures("median")
        out = __import__("sys").stdout
        cols = [c for c in NGINX_TARGETS if c in self.names]
        ratios = [r for r in NGINX_RATIOS if r[1] in self.names and r[2] in self.names]
        w0 = max(len(r[1]) for r in NGINX_ROWS) + 2
        print(file=out)
        print(
            f"nginx part: wrk -> proxy -> nginx (one process, access log off) on 127.0.0.1; "
            f"{args.rounds} round(s) of {self.duration} s per measurement, targets in rotated order; "
            f"figures are the {'medians' if args.stat == 'median' else 'best'} of the rounds; "
            f"wrk -t{args.wrk_threads} (1 for the 1-connection loads).",
            file=out,
        )
        print(f"code measured: {self.codeText}", file=out)
        print(file=out)
        width = {c: max(15, len(c) + 2) for c in cols}
        header = f"{'metric':<{w0}}" + "".join(f"{c:>{width[c]}}" for c in cols) + "".join(f"{r[0]:>10}" for r in ratios)
        print(header, file=out)
        print("-" * len(header), file=out)
        for key, label, unit, higher in NGINX_ROWS:
            line = f"{label:<{w0}}"
            for c in cols:
                line += f"{_fmt(figs[c][key], unit):>{width[c]}}"
            for _, a, b in ratios:
                va, vb = figs[a][key], figs[b][key]
                line += f"{va / vb:>9.2f}x" if va is not None and vb else f"{'-':>10}"
            print(line, file=out)
        print(file=out)
        print(
            "server CPU = the proxy process's own CPU (user + system) over the wrk run, per operation wrk counted "
            "(for direct: nginx's); ratios are the row's values divided (for us rows lower is better).",
            file=out,
        )
        verdicts = self.verdicts(figs, medians)
        print(file=out)
        print("issue 16 targets (ratios against HAProxy one thread, measured in this run):", file=out)
        for v in verdicts:
            print(f"  {v['mark']:<4} {v['text']}", file=out)
        if self.notes:
            print(file=out)
            print("nginx notes:", file=out)
            for n in self.notes:
                print(f"  - {n}", file=out)
        return {
            "figures": {c: figs[c] for c in self.names},
            "medians": {c: medians[c] for c in self.names},
            "targets": verdicts,
            "rounds": self.results,
            "notes": self.notes,
        }


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("req/s", "conn/s"):
        return f"{v:,.0f}"
    if unit == "us":
        return f"{v:,.1f}"
    if unit == "MB/s":
        return f"{v:,.0f}"
    return f"{v:.2f}"
