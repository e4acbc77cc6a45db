"""
Routing quality, measured from outside with real processes (issue 15, item
6): for every routing policy and for HAProxy (leastconn, roundrobin), in one
run, with the variants interleaved in each repetition, three set-ups:

- hetero: three backends that serve one request at a time, in 2, 2 and 8 ms;
  open-loop Poisson arrivals at 75% of their total capacity, a new
  connection per request.  p99 latency, and the share of requests the slow
  backend served.
- spread: two balancers in front of four echo backends that report to
  both and already hold 0, 20, 40 and 60 long-lived connections the
  balancers did not route; a burst of 200 more, alternately through one
  balancer and the other.  max/mean connections per backend (ideal 80 each:
  1.0; an even split of the burst gives 110/80 = 1.375).
- newcomer: three echo backends holding 100 connections each, a fourth one
  joins idle; a burst of 200 through one balancer, then (a fresh newcomer)
  through two.  What the newcomer draws (ideal 125) and max/mean.

    python bench/routing_quality.py            # about 7 minutes on 2 cores (5 variants)
    python bench/routing_quality.py --quick    # under a minute
    python bench/routing_quality.py --help

Prints, per set-up and variant, the median over the repetitions and the
min-max, then one PASS/FAIL line per target of issue 15.  Everything runs on
127.0.0.0/8; every load loop is bounded in count and time; every process
started here is stopped here, by PID.  Progress goes to standard error, the
tables to standard output.

The backends of the hetero set-up run this module's service:
``--service bench.routing_quality.serve_2ms`` (any whole number of
milliseconds) queues requests (a line each) and answers them one at a time,
each after that service time, with the port it listens on.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from twisted.internet.protocol import Factory, Protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twistedcluster.localcluster import LocalCluster, Process, ProcessExited, freePort, waitFor  # noqa: E402

HOST = "127.0.0.1"
HAPROXY_ALGORITHMS = ("leastconn", "roundrobin")
SETUPS = ("hetero", "spread", "newcomer")
# The policy the targets are about: least-load, the default.
JUDGED = "least-load"
#: The suffix of a variant routed by the --baseline balancer (hetero only).
BASE = "@base"


# -- the backend service: one request at a time, a fixed service time -----------


class _Request(Protocol):
    """
    One connection: its first line is a request; it waits in its factory's
    queue, is answered with the backend's port, and closed.
    """

    asked = False
    gone = False

    def dataReceived(self, data: bytes) -> None:
        if not self.asked and b"\n" in data:
            self.asked = True
            self.factory.enqueue(self)

    def connectionLost(self, reason=None) -> None:
        self.gone = True


class SerialFactory(Factory):
    """
    Serves the requests of all its connections one at a time, in arrival
    order, each taking C{seconds}: a server with one worker.  The next
    request starts when the last one was due to end, so the reactor's
    lateness does not lower the capacity below 1/C{seconds} per second.
    """

    protocol = _Request
    noisy = False

    def __init__(self, seconds: float, clock=None) -> None:
        self.seconds = seconds
        self._clock = clock
        self.queue: deque = deque()
        self.busy = False
        self.served = 0
        self._freeAt = 0.0

    @property
    def clock(self):
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def enqueue(self, request: _Request) -> None:
        self.queue.append(request)
        if not self.busy:
            self._next()

    def _next(self) -> None:
        while self.queue and self.queue[0].gone:
            self.queue.popleft()
        if not self.queue:
            self.busy = False
            return
        self.busy = True
        request = self.queue.popleft()
        now = self.clock.seconds()
        self._freeAt = max(now, self._freeAt) + self.seconds
        self.clock.callLater(self._freeAt - now, self._done, request)

    def _done(self, request: _Request) -> None:
        if not request.gone:
            request.transport.write(b"%d\n" % (request.transport.getHost().port,))
            request.transport.loseConnection()
            self.served += 1
        self._next()


def serial(milliseconds: float) -> SerialFactory:
    return SerialFactory(milliseconds / 1000.0)


def __getattr__(name: str):
    # serve_2ms, serve_8ms, ...: the names --service takes.
    match = re.fullmatch(r"serve_(\d+)ms", name)
    if match:
        ms = int(match.group(1))
        return lambda: serial(ms)
    raise AttributeError(name)


# -- open-loop Poisson load: a new connection per request -------------------------


def poissonArrivals(rate: float, duration: float, limit: int, seed: int) -> List[float]:
    """
    Arrival times (seconds from the start) of a Poisson process of C{rate}
    per second, within C{duration}, at most C{limit} of them.
    """
    rng = random.Random(seed)
    times: List[float] = []
    t = rng.expovariate(rate)
    while t < duration and len(times) < limit:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def sourceAddresses(third: int, count: int) -> List[str]:
    """
    Client addresses 127.0.THIRD.1 ... : clients that do not all share one
    address (as a policy hashing on the client's address would see them).
    """
    return [f"127.0.{third}.{i}" for i in range(1, count + 1)]


def openLoop(
    target: Tuple[str, int],
    arrivals: Sequence[float],
    sources: Sequence[str],
    drain: float = 5.0,
    request: bytes = b"q\n",
) -> dict:
    """
    At each arrival time connect (from the next source address), send
    C{request}, read one line, close; never wait for an answer before the
    next arrival.  Latency runs from the start of the connect to the answer.
    Stops C{drain} seconds after the last arrival at the latest; whatever is
    still unanswered then is a failure.

    @return: C{{"samples": [(arrival, latency, port)], "failures": n,
        "lagP99": seconds the generator started connects late}}
    """
    sel = selectors.DefaultSelector()
    samples: List[Tuple[float, float, int]] = []
    lags: List[float] = []
    failures = 0
    open_: Dict[int, list] = {}
    start = time.monotonic() + 0.05
    deadline = start + (arrivals[-1] if arrivals else 0.0) + drain
    i = 0

    def finish(sock: socket.socket, failed: bool) -> None:
        nonlocal failures
        sel.unregister(sock)
        open_.pop(sock.fileno(), None)
        sock.close()
        failures += failed

    while (i < len(arrivals) or open_) and time.monotonic() < deadline:
        now = time.monotonic()
        while i < len(arrivals) and start + arrivals[i] <= now:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.bind((sources[i % len(sources)], 0))
                began = time.monotonic()
                err = sock.connect_ex(target)
            except OSError:
                err = -1
            lags.append(now - (start + arrivals[i]))
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                failures += 1
            else:
                state = [began, arrivals[i], b"", False]
                open_[sock.fileno()] = state
                sel.register(sock, selectors.EVENT_WRITE, state)
            i += 1
        wait = 0.05 if i >= len(arrivals) else max(0.0, start + arrivals[i] - time.monotonic())
        for key, _ in sel.select(min(wait, 0.05)):
            sock, state = key.fileobj, key.data
            if not state[3]:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(sock, True)
                    continue
                try:
                    sock.send(request)
                except OSError:
                    finish(sock, True)
                    continue
                state[3] = True
                sel.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                data = sock.recv(64)
            except OSError:
                data = b""
            if not data:
                finish(sock, True)
                continue
            state[2] += data
            if b"\n" in state[2]:
                latency = time.monotonic() - state[0]
                try:
                    port = int(state[2].split(b"\n", 1)[0])
                except ValueError:
                    finish(sock, True)
                    continue
                samples.append((state[1], latency, port))
                finish(sock, False)
    for key in list(sel.get_map().values()):
        finish(key.fileobj, True)
    failures += len(arrivals) - i  # never started: the time ran out
    sel.close()
    return {"samples": samples, "failures": failures, "lagP99": percentile(lags, 99) if lags else 0.0}


def percentile(values: Sequence[float], p: float) -> float:
    """
    The C{p}th percentile, nearest rank.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


# -- bursts of long-lived connections ---------------------------------------------


def openHeld(
    ports: Sequence[int],
    n: int,
    sources: Sequence[str],
    seconds: float = 0.5,
    timeout: float = 10.0,
) -> Tuple[List[socket.socket], int]:
    """
    Open C{n} connections within C{seconds}, taking C{ports} in turn
    (several balancers sharing one burst), each sending one byte; return the
    sockets, still open, and how many got their echo within C{timeout}.
    """
    socks: List[socket.socket] = []
    sel = selectors.DefaultSelector()
    pace = seconds / n if n else 0.0
    start = time.monotonic()
    sent, echoed = set(), set()

    def pump(wait: float) -> None:
        for key, _ in sel.select(wait):
            s = key.fileobj
            if s not in sent:
                try:
                    s.send(b"x")
                except OSError:
                    sel.unregister(s)
                    continue
                sent.add(s)
                sel.modify(s, selectors.EVENT_READ)
            else:
                try:
                    data = s.recv(16)
                except OSError:
                    data = b""
                if data:
                    echoed.add(s)
                sel.unregister(s)

    for k in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.bind((sources[k % len(sources)], 0))
        try:
            s.connect((HOST, ports[k % len(ports)]))
        except BlockingIOError:
            pass
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE)
        due = start + (k + 1) * pace
        while time.monotonic() < due:
            pump(max(0.0, due - time.monotonic()))
    deadline = time.monotonic() + timeout
    while len(echoed) < n and time.monotonic() < deadline and sel.get_map():
        pump(0.05)
    sel.close()
    return socks, len(echoed)


def maxOverMean(counts: Sequence[int]) -> float:
    mean = sum(counts) / len(counts) if counts else 0
    return max(counts) / mean if mean else math.nan


def closeAll(socks: Sequence[socket.socket]) -> None:
    for s in socks:
        s.close()


# -- HAProxy ----------------------------------------------------------------------


def haproxyConfig(statsSocket: str, sections: Dict[str, Tuple[int, List[Tuple[str, int, bool]]]]) -> str:
    """
    One HAProxy (one thread, C{mode tcp}) with a frontend and a backend
    per section: C{sections[name] = (listenPort, [(server, port,
    healthChecked)])}; each section's balance algorithm is the suffix of its
    name (C{..._leastconn}, C{..._roundrobin}).
    """
    out = [
        "# written by bench/routing_quality.py",
        "global",
        "    nbthread 1",
        "    maxconn 8000",
        f"    stats socket {statsSocket} mode 600 level admin",
        "",
        "defaults",
        "    mode tcp",
        "    maxconn 8000",
        "    timeout connect 5s",
        "    timeout client 600s",
        "    timeout server 600s",
    ]
    for name, (listen, servers) in sections.items():
        algorithm = name.rsplit("_", 1)[1]
        out += ["", f"frontend f_{name}", f"    bind {HOST}:{listen}", f"    default_backend {name}"]
        out += ["", f"backend {name}", f"    balance {algorithm}"]
        for server, port, checked in servers:
            check = " check inter 100 rise 1 fall 1" if checked else ""
            out.append(f"    server {server} {HOST}:{port}{check}")
    return "\n".join(out) + "\n"


class HAProxy:
    """
    One haproxy process we started, and its stats socket.
    """

    def __init__(self, binary: str, workdir: Path, name: str, sections, env) -> None:
        self.name = name
        self.sections = sections
        self.statsSocket = str(workdir / f"{name}.sock")
        cfg = workdir / f"{name}.cfg"
        cfg.write_text(haproxyConfig(self.statsSocket, sections))
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c rejected {cfg}:\n{check.stdout}{check.stderr}")
        self.proc = Process(name, [binary, "-db", "-f", str(cfg)], workdir / f"{name}.log", env=env)
        waitFor(lambda: self._alive() and os.path.exists(self.statsSocket), 20, f"{name} to start")

    def _alive(self) -> bool:
        if not self.proc.alive():
            raise ProcessExited(f"{self.name} exited:\n{self.proc.logText()[-2000:]}")
        return True

    def port(self, section: str) -> int:
        return self.sections[section][0]

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.statsSocket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def serverStatus(self, section: str, server: str) -> str:
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        col = header.index("status")
        for line in lines[1:]:
            cells = line.split(",")
            if len(cells) > col and cells[0] == section and cells[1] == server:
                return cells[col]
        return ""

    def stop(self) -> None:
        try:
            self.proc.stop(5)
        except Exception:
            self.proc.kill()


# -- the set-ups ------------------------------------------------------------------


class Plan:
    """
    The numbers of a run.
    """

    def __init__(self, quick: bool) -> None:
        self.serviceMs = (2, 2, 8)
        self.utilization = 0.75
        self.heteroSeconds = 1.5 if quick else 4.0
        self.heteroWarmup = 0.3 if quick else 0.5
        self.spreadBackends = 4
        self.spreadBurst = 40 if quick else 200
        # Held before the burst, on the four backends: 0, 10%, 20%, 30% of
        # the burst (ideal after it: an equal total on each).
        self.spreadHeld = [k * self.spreadBurst // 10 for k in range(self.spreadBackends)]
        self.held = 20 if quick else 100
        self.newcomerBurst = 40 if quick else 200
        self.burstSeconds = 0.2 if quick else 0.5
        self.seed = 15
        #: The balancers' --slow-start (0: off).
        self.slowStart = 0.0

    @property
    def capacity(self) -> float:
        return sum(1000.0 / ms for ms in self.serviceMs)

    @property
    def rate(self) -> float:
        return self.utilization * self.capacity


def variantNames(policies: Sequence[str], haproxy: bool) -> List[str]:
    return list(policies) + ([f"haproxy-{a}" for a in HAPROXY_ALGORITHMS] if haproxy else [])


def _algorithm(variant: str) -> Optional[str]:
    return variant.split("-", 1)[1] if variant.startswith("haproxy-") else None


def stablePort(low: int = 20000, high: int = 32000) -> int:
    """
    A free port below the ephemeral range: one a process listens on, stops
    and listens on again, which no client socket takes in between.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        try:
            with socket.socket() as s:
                s.bind((HOST, port))
                return port
        except OSError:
            continue
    raise RuntimeError(f"no free port between {low} and {high}")


def _waitUp(cluster: LocalCluster, names: Sequence[str], timeout: float = 30) -> None:
    """
    Wait until the balancer has every one of C{names} up (asked in-process).
    """
    for n in names:
        if n in cluster.processes:
            cluster._check(cluster.processes[n])

    def up() -> bool:
        for n in names:
            if n in cluster.processes:
                cluster._check(cluster.processes[n])
        status = cluster.quickStatus()
        return all(n in status and status[n]["state"] == "up" for n in names)

    waitFor(up, timeout, f"backends {', '.join(names)} up", interval=0.05)


def _counts(cluster: LocalCluster, names: Sequence[str]) -> Dict[str, int]:
    status = cluster.quickStatus()
    return {n: status[n]["connections"] if n in status else 0 for n in names}


class Bench:
    """
    Starts the processes of the set-ups asked for, runs their rounds, and
    stops everything it started.
    """

    def __init__(self, workdir: Path, plan: Plan, setups, haproxy: Optional[str], say,
                 baseline: Optional[Path] = None) -> None:
        self.workdir = workdir
        #: A second hetero balancer from the package in this directory, in
        #: front of the same backends (variants POLICY@base).
        self.baseline = baseline
        self.plan = plan
        self.setups = setups
        self.haproxyBinary = haproxy
        self.say = say
        self.clusters: List[LocalCluster] = []
        self.haproxies: List[HAProxy] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        old = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = str(ROOT) + (os.pathsep + old if old else "")
        self.held: List[socket.socket] = []

    def _cluster(self, name: str) -> LocalCluster:
        c = LocalCluster(self.workdir / name, HOST)
        c.env = dict(self.env)
        self.clusters.append(c)
        return c

    def _balancer(self, name: str) -> LocalCluster:
        c = self._cluster(name)
        extra = [f"--slow-start={self.plan.slowStart:g}"] if self.plan.slowStart else []
        c.startBalancer(name=f"balancer-{name}", extra=extra)
        return c

    def _slowStartApplies(self, c: LocalCluster) -> None:
        """
        Wait until slow start applies on C{c}'s balancer: not to backends
        that come up in its first seconds.
        """
        if self.plan.slowStart:
            proc = next(p for n, p in c.processes.items() if n.startswith("balancer-"))
            waitFor(lambda: "slow start: backends that come up" in proc.logText(),
                    self.plan.slowStart + 30, "slow start to apply")

    @staticmethod
    def _control(c: LocalCluster) -> str:
        return f"tcp:host={HOST}:port={c.controlPort}"

    def start(self) -> None:
        plan = self.plan
        sections: Dict[str, tuple] = {}
        second: Dict[str, tuple] = {}
        if "hetero" in self.setups:
            self.say("hetero: a balancer and three one-at-a-time backends ...")
            self.hetero = self._balancer("hetero")
            controls = [self._control(self.hetero)]
            self.heteroBase = None
            if self.baseline is not None:
                # The same backends report to both; a round routes through
                # one of them only.
                self.heteroBase = self._cluster("hetero-base")
                self.heteroBase.env["PYTHONPATH"] = str(self.baseline)
                self.heteroBase.startBalancer(name="balancer-hetero-base")
                controls.append(self._control(self.heteroBase))
            self.heteroPorts = {}
            for k, ms in enumerate(plan.serviceMs, 1):
                name = f"h{k}-{ms}ms"
                port = freePort()
                self.heteroPorts[port] = ms
                self.hetero.startBackend(name, port=port, extra=[f"--service=bench.routing_quality.serve_{ms}ms"],
                                         balancers=controls)
            self.slowPort = max(self.heteroPorts, key=self.heteroPorts.get)
            names = [f"h{k}-{ms}ms" for k, ms in enumerate(plan.serviceMs, 1)]
            _waitUp(self.hetero, names, timeout=30)
            if self.heteroBase is not None:
                _waitUp(self.heteroBase, names, timeout=30)
            for a in HAPROXY_ALGORITHMS:
                sections[f"hetero_{a}"] = (freePort(), [(f"s{p}", p, False) for p in self.heteroPorts])
        if "spread" in self.setups:
            self.say("spread: two balancers and four echo backends reporting to both ...")
            self.spread = [self._balancer("spread-a"), self._balancer("spread-b")]
            controls = [self._control(c) for c in self.spread]
            self.spreadNames = [f"s{k}" for k in range(1, plan.spreadBackends + 1)]
            ports = []
            for n in self.spreadNames:
                ports.append(self.spread[0].startBackend(n, balancers=controls).port)
            for c in self.spread:
                _waitUp(c, self.spreadNames, timeout=30)
            # Uneven load the balancers did not route (clients of another
            # entry, or of a balancer since restarted): they learn of it only
            # from the backends' reports.
            self.spreadHeld = plan.spreadHeld
            for k, (p, n) in enumerate(zip(ports, self.spreadHeld)):
                if n:
                    socks, ok = openHeld([p], n, sourceAddresses(20 + k, 20), seconds=0.1)
                    self.held += socks
                    if ok < n:
                        raise RuntimeError(f"only {ok} of {n} held connections to {self.spreadNames[k]} echoed")
            for c in self.spread:
                waitFor(
                    lambda c=c: sum(_counts(c, self.spreadNames).values()) >= sum(self.spreadHeld),
                    20,
                    "the held connections reported",
                )
            for a in HAPROXY_ALGORITHMS:
                servers = [(n, p, False) for n, p in zip(self.spreadNames, ports)]
                sections[f"spread_{a}"] = (freePort(), servers)
                second[f"spread_{a}"] = (freePort(), servers)
        if "newcomer" in self.setups:
            self.say(f"newcomer: two balancers, three echo backends holding {plan.held} connections each ...")
            self.newcomer = [self._balancer("newcomer-a"), self._balancer("newcomer-b")]
            controls = [self._control(c) for c in self.newcomer]
            self.oldNames = ["old1", "old2", "old3"]
            ports = []
            for n in self.oldNames:
                ports.append(self.newcomer[0].startBackend(n, balancers=controls).port)
            for c in self.newcomer:
                _waitUp(c, self.oldNames, timeout=30)
            # Held directly: the balancers know of them only from reports.
            for k, p in enumerate(ports):
                socks, ok = openHeld([p], plan.held, sourceAddresses(10 + k, 20), seconds=0.1)
                self.held += socks
                if ok < plan.held:
                    raise RuntimeError(f"only {ok} of {plan.held} held connections to {self.oldNames[k]} echoed")
            for c in self.newcomer:
                waitFor(
                    lambda c=c: sum(_counts(c, self.oldNames).values()) >= 3 * plan.held,
                    20,
                    "the held connections reported",
                )
            for c in self.newcomer:
                self._slowStartApplies(c)
            self.newPort = stablePort()
            for a in HAPROXY_ALGORITHMS:
                servers = [(n, p, False) for n, p in zip(self.oldNames, ports)] + [("new", self.newPort, True)]
                sections[f"newcomer_{a}"] = (freePort(), servers)
                second[f"newcomer_{a}"] = (freePort(), servers)
        if self.haproxyBinary:
            self.say("starting haproxy (two, for the two-balancer set-ups) ...")
            self.haproxies.append(HAProxy(self.haproxyBinary, self.workdir, "haproxy-a", sections, self.env))
            if second:
                self.haproxies.append(HAProxy(self.haproxyBinary, self.workdir, "haproxy-b", second, self.env))

    def stop(self) -> None:
        closeAll(self.held)
        for h in self.haproxies:
            h.stop()
        for c in self.clusters:
            try:
                c.stopAll(10)
            except Exception:
                for p in c.processes.values():
                    p.kill()

    # -- choosing a variant ---------------------------------------------------

    def setPolicy(self, policy: str) -> None:
        if policy.endswith(BASE):
            self.heteroBase.adminRun("policy", policy[: -len(BASE)])
            return
        for c in self.clusters:
            if c is not getattr(self, "heteroBase", None):
                c.adminRun("policy", policy)

    # -- rounds ---------------------------------------------------------------

    def heteroRound(self, variant: str, rep: int) -> dict:
        plan = self.plan
        algorithm = _algorithm(variant)
        if algorithm:
            port = self.haproxies[0].port(f"hetero_{algorithm}")
        elif variant.endswith(BASE):
            port = self.heteroBase.port
        else:
            port = self.hetero.port
        arrivals = poissonArrivals(
            plan.rate, plan.heteroSeconds, int(plan.rate * plan.heteroSeconds * 2), plan.seed + rep
        )
        run = openLoop((HOST, port), arrivals, sourceAddresses(2, 100))
        kept = [s for s in run["samples"] if s[0] >= plan.heteroWarmup]
        latencies = [s[1] * 1000.0 for s in kept]
        slow = sum(1 for s in kept if s[2] == self.slowPort)
        # Where the tail comes from: each backend's share and latencies, in
        # the order of plan.serviceMs.
        backends = []
        p99 = percentile(latencies, 99)
        tail = max(1, sum(1 for v in latencies if v > p99))
        for port in self.heteroPorts:
            mine = [s[1] * 1000.0 for s in kept if s[2] == port]
            backends.append({
                "share": len(mine) / len(kept) if kept else math.nan,
                "p50": percentile(mine, 50),
                "p99": percentile(mine, 99),
                # Of the requests over the round's p99, those it served.
                "ofTail": sum(1 for v in mine if v > p99) / tail,
            })
        # Let the queues empty and the reports catch up before the next round.
        time.sleep(1.0)
        return {
            "p99": p99,
            "p50": percentile(latencies, 50),
            "slowShare": slow / len(kept) if kept else math.nan,
            "requests": len(kept),
            "failures": run["failures"],
            "lagP99": run["lagP99"] * 1000.0,
            "backends": backends,
        }

    def spreadRound(self, variant: str, rep: int) -> dict:
        plan = self.plan
        algorithm = _algorithm(variant)
        if algorithm:
            ports = [h.port(f"spread_{algorithm}") for h in self.haproxies]
        else:
            ports = [c.port for c in self.spread]
        watch = self.spread[0]
        held = sum(self.spreadHeld)
        socks, ok = openHeld(ports, plan.spreadBurst, sourceAddresses(3, 50), plan.burstSeconds)
        try:
            counts = waitFor(
                lambda: (lambda c: c if sum(c.values()) >= held + ok else None)(_counts(watch, self.spreadNames)),
                20,
                "the burst reported",
            )
        finally:
            closeAll(socks)
        held = sum(self.spreadHeld)
        waitFor(lambda: sum(_counts(watch, self.spreadNames).values()) <= held, 20, "the burst closed")
        values = [counts[n] for n in self.spreadNames]
        return {"maxMean": maxOverMean(values), "counts": values, "failures": plan.spreadBurst - ok}

    def newcomerRound(self, variant: str, rep: int, balancers: int) -> dict:
        plan = self.plan
        algorithm = _algorithm(variant)
        watch = self.newcomer[0]
        names = self.oldNames + ["new"]
        proc = watch.startBackend(
            "new", port=self.newPort, balancers=[self._control(c) for c in self.newcomer]
        )
        socks: List[socket.socket] = []
        try:
            for c in self.newcomer:
                _waitUp(c, ["new"], timeout=30)
            if algorithm:
                section = f"newcomer_{algorithm}"
                fronts = self.haproxies[:balancers]
                for h in fronts:
                    waitFor(lambda h=h: h.serverStatus(section, "new").startswith("UP"), 10, "haproxy: new UP")
                ports = [h.port(section) for h in fronts]
            else:
                ports = [c.port for c in self.newcomer[:balancers]]
            before = _counts(watch, names)
            socks, ok = openHeld(ports, plan.newcomerBurst, sourceAddresses(4, 50), plan.burstSeconds)
            after = waitFor(
                lambda: (lambda c: c if sum(c.values()) >= sum(before.values()) + ok else None)(
                    _counts(watch, names)
                ),
                20,
                "the burst reported",
            )
        finally:
            closeAll(socks)
            proc.stop(15)
        for c in self.newcomer:
            waitFor(lambda c=c: "new" not in c.quickStatus() or c.quickStatus()["new"]["state"] != "up",
                    20, "the newcomer gone")
        if algorithm:
            for h in self.haproxies[:balancers]:
                waitFor(lambda h=h: not h.serverStatus(section, "new").startswith("UP"), 10, "haproxy: new DOWN")
        waitFor(lambda: sum(_counts(watch, self.oldNames).values()) <= 3 * plan.held, 20, "the burst closed")
        values = [after[n] for n in names]
        return {
            "maxMean": maxOverMean(values),
            "newDrew": after["new"] - before["new"],
            "counts": values,
            "failures": plan.newcomerBurst - ok,
        }


# -- the tables and the targets ---------------------------------------------------


def medianRange(values: Sequence[float]) -> Tuple[float, float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    return statistics.median(finite), min(finite), max(finite)


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


#: A hetero round whose load generator started its connects later than this
#: at p99 ran on a machine busy with something else.
LATE_MS = 5.0

#: (set-up key, title, [(column, field, digits)])
TABLES = [
    ("hetero", "hetero", [("p99 ms", "p99", 1), ("p50 ms", "p50", 1), ("slow share", "slowShare", 3),
                          ("gen. lag p99 ms", "lagP99", 1)]),
    ("spread", "spread (two balancers)", [("max/mean", "maxMean", 3)]),
    ("newcomer1", "newcomer, one balancer", [("max/mean", "maxMean", 3), ("new drew", "newDrew", 0)]),
    ("newcomer2", "newcomer, two balancers", [("max/mean", "maxMean", 3), ("new drew", "newDrew", 0)]),
]


def table(results: Dict[str, Dict[str, List[dict]]], variants: Sequence[str]) -> List[str]:
    """
    Lines of text: per set-up, per variant, each column's median over the
    repetitions and its min-max.
    """
    lines: List[str] = []
    for key, title, columns in TABLES:
        rounds = results.get(key)
        if not rounds:
            continue
        reps = max(len(r) for r in rounds.values())
        lines.append(f"{title} ({reps} repetition{'s' if reps != 1 else ''}; median, min-max)")
        head = f"  {'variant':<20}" + "".join(f"{c:>24}" for c, _, _ in columns) + f"{'failures':>10}"
        lines.append(head)
        for v in variants:
            if v not in rounds:
                continue
            cells = ""
            for _, field, digits in columns:
                med, lo, hi = medianRange([r[field] for r in rounds[v]])
                cells += f"{_fmt(med, digits) + ' (' + _fmt(lo, digits) + '-' + _fmt(hi, digits) + ')':>24}"
            failures = sum(r["failures"] for r in rounds[v])
            lines.append(f"  {v:<20}{cells}{failures:>10}")
        lines.append("")
    return lines


def backendTable(results: Dict[str, Dict[str, List[dict]]], variants: Sequence[str], serviceMs) -> List[str]:
    """
    Lines of text: per hetero variant, each backend's share of the requests,
    its p50 and p99, and its share of the requests over the round's p99
    (medians over the repetitions).
    """
    rounds = results.get("hetero")
    if not rounds:
        return []
    labels = [f"{ms} ms #{k}" for k, ms in enumerate(serviceMs, 1)]
    lines = ["hetero per backend (median over the repetitions): share / p50 ms / p99 ms / share of the tail over the round's p99"]
    lines.append(f"  {'variant':<20}" + "".join(f"{label:>33}" for label in labels))
    for v in variants:
        if v not in rounds or not all("backends" in r for r in rounds[v]):
            continue
        cells = ""
        for k in range(len(labels)):
            med = [medianRange([r["backends"][k][f] for r in rounds[v]])[0] for f in ("share", "p50", "p99", "ofTail")]
            cells += f"{_fmt(med[0], 3) + ' / ' + _fmt(med[1], 1) + ' / ' + _fmt(med[2], 1) + ' / ' + _fmt(med[3], 2):>33}"
        lines.append(f"  {v:<20}{cells}")
    lines.append("")
    return lines


def verdicts(results: Dict[str, Dict[str, List[dict]]]) -> List[Tuple[str, Optional[bool], str]]:
    """
    The targets of issue 15 that this run measured: (target, passed or
    C{None} when not measured, the figures behind it).
    """
    out: List[Tuple[str, Optional[bool], str]] = []
    hetero = results.get("hetero", {})
    target = "hetero: least-load p99 <= 0.6 x haproxy-leastconn p99 in >= 5 of 6 repetitions"
    if JUDGED in hetero and "haproxy-leastconn" in hetero:
        ratios = [a["p99"] / b["p99"] for a, b in zip(hetero[JUDGED], hetero["haproxy-leastconn"])]
        good = sum(1 for r in ratios if r <= 0.6)
        # 5 of 6, in proportion for other repetition counts.
        need = math.ceil(5 / 6 * len(ratios))
        late = [
            k + 1 for k, (a, b) in enumerate(zip(hetero[JUDGED], hetero["haproxy-leastconn"]))
            if max(a["lagP99"], b["lagP99"]) > LATE_MS
        ]
        note = (
            f"; repetition {', '.join(map(str, late))} disturbed: the load generator was over "
            f"{LATE_MS:g} ms late at p99, the machine busy" if late else ""
        )
        out.append((
            target, good >= need,
            f"{good} of {len(ratios)} (ratios " + ", ".join(f"{r:.2f}" for r in ratios) + f"){note}",
        ))
    else:
        out.append((target, None, "not measured (needs least-load and haproxy-leastconn)"))
    for key, what in (("spread", "spread, two balancers"), ("newcomer1", "newcomer, one balancer"),
                      ("newcomer2", "newcomer, two balancers")):
        target = f"{what}: least-load max/mean <= 1.2 (median of the repetitions)"
        rounds = results.get(key, {}).get(JUDGED)
        if rounds:
            med, lo, hi = medianRange([r["maxMean"] for r in rounds])
            good = sum(1 for r in rounds if r["maxMean"] <= 1.2)
            out.append((target, med <= 1.2, f"{med:.3f} ({lo:.3f}-{hi:.3f}; {good} of {len(rounds)} at or under 1.2)"))
        else:
            out.append((target, None, "not measured"))
    return out


def baselineLines(results) -> List[str]:
    """
    Each policy against the same policy in the --baseline balancer, per
    repetition (the two ran back to back): p99 and p50 ratios.
    """
    hetero = results.get("hetero", {})
    lines = []
    for variant in hetero:
        base = hetero.get(variant + BASE)
        if variant.endswith(BASE) or not base:
            continue
        mine = hetero[variant]
        p99 = [a["p99"] / b["p99"] for a, b in zip(mine, base)]
        p50 = [a["p50"] / b["p50"] for a, b in zip(mine, base)]
        lines.append(
            f"  {variant} / {variant}{BASE}: p99 median {statistics.median(p99):.2f}x (per repetition "
            + ", ".join(f"{r:.2f}" for r in p99) + f"), p50 median {statistics.median(p50):.2f}x"
        )
    return ["this code against --baseline (hetero):", *lines, ""] if lines else []


def verdictLines(results) -> List[str]:
    lines = ["issue 15 targets:"]
    for target, passed, figures in verdicts(results):
        mark = "----" if passed is None else ("PASS" if passed else "FAIL")
        lines.append(f"  {mark}  {target}: {figures}")
    return lines


# -- main -------------------------------------------------------------------------


def main(argv=None) -> int:
    from twistedcluster.core.policies import POLICIES

    p = argparse.ArgumentParser(prog="bench/routing_quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 6; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short rounds, small bursts, one repetition")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    p.add_argument("--policies", default=None, help="comma-separated (default: every policy the balancer has)")
    p.add_argument("--no-haproxy", action="store_true", help="leave HAProxy out")
    p.add_argument("--install-haproxy", action="store_true", help="apt-get install haproxy when it is missing (root)")
    p.add_argument("--hetero-seconds", type=float, default=None, help="length of a hetero round")
    p.add_argument("--utilization", type=float, default=None,
                   help="hetero arrivals as a share of the backends' capacity (default 0.75, the"
                        " target's; a low one, e.g. 0.1, shows what each proxy adds by itself)")
    p.add_argument("--slow-start", type=float, default=0.0, metavar="SECONDS",
                   help="run the balancers with --slow-start SECONDS (default off)")
    p.add_argument("--baseline", metavar="DIR",
                   help="hetero only: also route each policy through a second balancer running the"
                        " package in DIR, in front of the same backends (variants POLICY@base), e.g."
                        " `git archive REF twistedcluster twisted | tar -x -C DIR`")
    p.add_argument("--json", metavar="FILE", help="write every round's figures")
    p.add_argument("--logs", metavar="DIR", help="keep the processes' logs there")
    args = p.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 6)
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        p.error(f"unknown set-up {', '.join(unknown)}")
    policies = args.policies.split(",") if args.policies else list(POLICIES)
    for name in policies:
        if name not in POLICIES:
            p.error(f"unknown policy {name}; the balancer has {', '.join(POLICIES)}")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    haproxy = None
    if not args.no_haproxy:
        sys.path.insert(0, str(HERE))
        from servers import haproxyPath, installHaproxy

        haproxy = haproxyPath() or (installHaproxy(say) if args.install_haproxy else None)
        if haproxy is None:
            say("haproxy is not installed: skipped (--install-haproxy installs it)")
    plan = Plan(args.quick)
    if args.hetero_seconds:
        plan.heteroSeconds = args.hetero_seconds
    if args.utilization is not None:
        if not 0 < args.utilization < 1:
            p.error("--utilization: more than 0, less than 1")
        plan.utilization = args.utilization
    if not args.slow_start >= 0:
        p.error("--slow-start: 0 (off) or more seconds")
    plan.slowStart = args.slow_start
    variants = variantNames(policies, haproxy is not None)
    baseline = None
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        if not (baseline / "twistedcluster" / "__init__.py").exists():
            p.error(f"--baseline {baseline}: no twistedcluster package there")
        if setups != ["hetero"]:
            p.error("--baseline: with --setups hetero only")
        variants[len(policies):len(policies)] = [v + BASE for v in policies]
    began = time.monotonic()
    results: Dict[str, Dict[str, List[dict]]] = {}
    errors: List[str] = []

    def record(key: str, variant: str, figures: dict) -> None:
        results.setdefault(key, {}).setdefault(variant, []).append(figures)

    jsonPath = Path(args.json).resolve() if args.json else None
    with tempfile.TemporaryDirectory(prefix="routing-quality-") as tmp:
        workdir = Path(args.logs).resolve() if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        # The processes start there: `python -c` and `-m` put their working
        # directory first on the path, where a checkout's own twistedcluster
        # would shadow --baseline's.
        os.chdir(workdir)
        bench = Bench(workdir, plan, setups, haproxy, say, baseline)
        try:
            bench.start()
            for rep in range(repeat):
                for variant in variants:
                    say(f"repetition {rep + 1}/{repeat}: {variant}")
                    if not _algorithm(variant):
                        bench.setPolicy(variant)
                    rounds = []
                    if "hetero" in setups:
                        rounds.append(("hetero", lambda: bench.heteroRound(variant, rep)))
                    if "spread" in setups:
                        rounds.append(("spread", lambda: bench.spreadRound(variant, rep)))
                    if "newcomer" in setups:
                        rounds.append(("newcomer1", lambda: bench.newcomerRound(variant, rep, 1)))
                        rounds.append(("newcomer2", lambda: bench.newcomerRound(variant, rep, 2)))
                    for key, run in rounds:
                        try:
                            record(key, variant, run())
                        except (TimeoutError, RuntimeError) as e:
                            # One round lost, not the run: said in the output.
                            errors.append(f"{key} {variant} repetition {rep + 1}: {e}")
                            say(f"round failed: {errors[-1]}")
        finally:
            bench.stop()
    seconds = time.monotonic() - began
    print(
        f"routing quality: {repeat} repetition{'s' if repeat != 1 else ''}, variants interleaved; "
        f"hetero: backends {'/'.join(str(m) for m in plan.serviceMs)} ms one at a time, Poisson "
        f"{plan.rate:.0f}/s ({plan.utilization:.0%} of {plan.capacity:.0f}/s) for {plan.heteroSeconds:g} s "
        f"(first {plan.heteroWarmup:g} s left out), a new connection per request; spread: "
        f"{plan.spreadBackends} backends holding {'/'.join(map(str, plan.spreadHeld))}, a burst of "
        f"{plan.spreadBurst} alternately via 2 balancers in {plan.burstSeconds:g} s; "
        f"newcomer: 3 x {plan.held} held, burst of {plan.newcomerBurst} in {plan.burstSeconds:g} s"
        + (f"; balancers with --slow-start {plan.slowStart:g}" if plan.slowStart else "")
    )
    print()
    for line in (table(results, variants) + backendTable(results, variants, plan.serviceMs)
                 + baselineLines(results) + verdictLines(results)):
        print(line)
    for e in errors:
        print(f"round lost: {e[:300]}")
    print(f"\ntook {seconds:.0f} s")
    if jsonPath:
        jsonPath.write_text(json.dumps({"plan": vars(plan), "results": results, "errors": errors, "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
