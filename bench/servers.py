"""
The processes the benchmark measures, all on 127.0.0.1: one echo backend,
and in front of it the cluster balancer (proxy mode), Twisted's own
portforward and, when installed, HAProxy.  Every process is started here,
watched, and stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from twistedcluster.localcluster import (
    LocalCluster,
    Process,
    ProcessExited,
    freePort,
    twistdCommand,
    waitFor,
)

HOST = "127.0.0.1"
BACKEND = "bench-backend"
# Every backend connection is welcome: the capacity limit is not what is
# measured here.
BACKEND_CAPACITY = 1_000_000


class Target:
    """
    Somewhere the load generator connects to, and the process that serves it
    (whose CPU and memory are sampled).
    """

    def __init__(self, name: str, port: int, proc: Process, note: str = "") -> None:
        self.name = name
        self.host = HOST
        self.port = port
        self.proc = proc
        self.note = note

    @property
    def addr(self):
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid


def haproxyPath() -> Optional[str]:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )


def aptInstall(packages, flag: str, say, timeout: float) -> bool:
    """
    C{apt-get update} then C{apt-get install -y PACKAGES}, each within
    C{timeout} seconds; whether both succeeded (a failure is said, naming
    C{flag}, the option that asked for it).
    """
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            say(f"{flag}: {' '.join(argv)} took over {timeout:g} s; giving up")
            return False
        if r.returncode != 0:
            say(f"{flag}: {' '.join(argv)} failed:\n{r.stderr[-1500:]}")
            return False
    return True


def installHaproxy(say) -> Optional[str]:
    """
    C{apt-get update && apt-get install -y haproxy}, as asked by
    C{--install-haproxy}; the path of C{haproxy}, or C{None}.
    """
    if os.geteuid() != 0:
        say("--install-haproxy: not root, cannot apt-get install haproxy")
        return None
    if not shutil.which("apt-get"):
        say("--install-haproxy: no apt-get on this machine")
        return None
    say("installing haproxy: apt-get update && apt-get install -y haproxy ...")
    if not aptInstall(["haproxy"], "--install-haproxy", say, timeout=300):
        return None
    return haproxyPath()


def haproxyConfig(listenPort: int, backendPort, maxconn: int) -> str:
    """
    HAProxy in TCP mode, one thread, in front of one echo backend
    (C{backendPort}) or of several (a list of ports), least connections.
    """
    ports = [backendPort] if isinstance(backendPort, int) else list(backendPort)
    servers = "".join(
        f"    server {BACKEND if len(ports) == 1 else f'echo-{i + 1}'} {HOST}:{port}\n"
        for i, port in enumerate(ports)
    )
    return f"""\
# written by bench/run.py
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode tcp
    balance leastconn
    maxconn {maxconn}
    timeout connect 5s
    timeout client 600s
    timeout server 600s

frontend bench
    bind {HOST}:{listenPort}
    default_backend echo

backend echo
    balance leastconn
{servers}"""


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _echoes(port: int) -> bool:
    payload = b"bench self-check\n"
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = s.recv(4096)
            if not data:
                return False
            got += data
    return got == payload


class Servers:
    """
    Starts the backend, the balancer and the other proxies named in
    C{targets}; C{stop()} stops every one of them by PID.

    @param pythonPath: prepended to C{PYTHONPATH} of the processes (the
        checkout whose code is measured), or C{None}.
    """

    def __init__(
        self,
        workdir: Path,
        targets: List[str],
        pythonPath: Optional[str],
        maxHeld: int,
        haproxy: Optional[str],
        say,
        baseline: Optional[str] = None,
        balancerArgs: Sequence[str] = (),
    ) -> None:
        self.balancerArgs = list(balancerArgs)
        self.workdir = Path(workdir)
        self.wanted = targets
        self.cluster = LocalCluster(self.workdir, HOST)
        if pythonPath:
            old = self.cluster.env.get("PYTHONPATH")
            self.cluster.env["PYTHONPATH"] = pythonPath + (os.pathsep + old if old else "")
        self.maxHeld = maxHeld
        self.haproxy = haproxy
        self.say = say
        self.baselineCluster: Optional[LocalCluster] = None
        if baseline and "baseline" in targets:
            # A second balancer from another copy of the code, registered by
            # the same backend: before and after, measured in one run.
            self.baselineCluster = LocalCluster(self.workdir / "baseline", HOST)
            old = os.environ.get("PYTHONPATH")
            self.baselineCluster.env["PYTHONPATH"] = baseline + (os.pathsep + old if old else "")
        self.targets: Dict[str, Target] = {}
        self.backend: Optional[Process] = None
        self.balancer: Optional[Process] = None
        self.extra: List[Process] = []

    def start(self) -> Dict[str, Target]:
        c = self.cluster
        self.say("starting the echo backend and the balancer ...")
        self.balancer = c.startBalancer(extra=self.balancerArgs)
        balancers = [f"tcp:host={HOST}:port={c.controlPort}"]
        base = self.baselineCluster
        if base is not None:
            self.extra.append(base.startBalancer(name="baseline"))
            balancers.append(f"tcp:host={HOST}:port={base.controlPort}")
        self.backend = c.startBackend(
            BACKEND, extra=[f"--capacity={BACKEND_CAPACITY}"], balancers=balancers
        )
        backendPort = self.backend.port  # type: ignore[attr-defined]
        c.waitUp([BACKEND], timeout=30)
        if base is not None:
            # Asked in-process: the baseline's code may lay out its
            # cluster-admin module differently from this checkout's.
            waitFor(
                lambda: base.quickStatus().get(BACKEND, {}).get("state") == "up",
                30,
                "the backend up at the baseline balancer",
            )
            waitFor(lambda: _echoes(base.port), 20, "the baseline balancer to relay an echo")
            self.targets["baseline"] = Target(
                "baseline", base.port, self.extra[-1],
                f"twistd cluster-balancer from {base.env['PYTHONPATH'].split(os.pathsep)[0]}",
            )
        waitFor(lambda: _echoes(backendPort), 20, "the backend to echo")
        waitFor(lambda: _echoes(c.port), 20, "the balancer to relay an echo")
        self.targets["direct"] = Target("direct", backendPort, self.backend)
        self.targets["balancer"] = Target(
            "balancer", c.port, self.balancer, "twistd cluster-balancer, proxy mode, 1 backend"
        )
        if "portforward" in self.wanted:
            port = freePort(HOST)
            proc = self._start(
                "portforward",
                twistdCommand(
                    "portforward",
                    [f"--port=tcp:{port}:interface={HOST}", f"--host={HOST}", f"--dest_port={backendPort}"],
                ),
            )
            waitFor(lambda: self._alive(proc) and _connectable(port), 20, "portforward to listen")
            waitFor(lambda: _echoes(port), 20, "portforward to relay an echo")
            self.targets["portforward"] = Target("portforward", port, proc, "twistd portforward")
        if "haproxy" in self.wanted and self.haproxy:
            port = freePort(HOST)
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(haproxyConfig(port, backendPort, self.maxHeld + 200))
            check = subprocess.run(
                [self.haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
            )
            if check.returncode != 0:
                raise RuntimeError(f"haproxy -c rejected {cfg}:\n{check.stdout}{check.stderr}")
            proc = self._start("haproxy", [self.haproxy, "-db", "-f", str(cfg)])
            waitFor(lambda: self._alive(proc) and _connectable(port), 20, "haproxy to listen")
            waitFor(lambda: _echoes(port), 20, "haproxy to relay an echo")
            version = subprocess.run(
                [self.haproxy, "-v"], capture_output=True, text=True, timeout=10
            ).stdout.split("\n")[0]
            self.targets["haproxy"] = Target(
                "haproxy", port, proc, f"{version.strip()}, nbthread 1, mode tcp, leastconn"
            )
        return {n: t for n, t in self.targets.items() if n in self.wanted}

    def _start(self, name: str, argv: List[str]) -> Process:
        proc = Process(name, argv, self.workdir / f"{name}.log", env=self.cluster.env)
        self.extra.append(proc)
        return proc

    def _alive(self, proc: Process) -> bool:
        if not proc.alive():
            raise ProcessExited(
                f"{proc.name} exited with status {proc.popen.returncode}:\n"
                + proc.logText()[-3000:]
            )
        return True

    def check(self) -> None:
        """
        Raise if any process has exited.
        """
        for proc in [self.backend, self.balancer, *self.extra]:
            if proc is not None:
                self._alive(proc)

    def stop(self) -> None:
        for proc in self.extra:
            try:
                proc.stop(5)
            except Exception:
                proc.kill()
        # The backend drains on SIGTERM: nothing is connected any more.
        for proc in (self.backend, self.balancer):
            if proc is not None:
                try:
                    proc.stop(10)
                except Exception:
                    proc.kill()


# -- sampling a process ----------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpuTimes(pid: int) -> tuple:
    """
    (user, system) CPU seconds of a process (and its threads).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3): utime, stime are fields 14, 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpuSeconds(pid: int) -> float:
    """
    User + system CPU seconds of a process (and its threads).
    """
    return sum(cpuTimes(pid))


def descendants(pid: int) -> List[int]:
    """
    The processes C{pid} started, and theirs (a balancer's workers).
    """
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(children)
            todo.extend(children)
    return out


def treeCpuSeconds(pid: int) -> float:
    """
    User + system CPU seconds of a process and of every process it started
    that is still running (a balancer with --workers: its workers).
    """
    total = 0.0
    for p in [pid] + descendants(pid):
        try:
            total += cpuSeconds(p)
        except OSError:  # exited meanwhile
            pass
    return total


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def openFiles(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machineBusy() -> tuple:
    """
    (busy, total, softirq) jiffies of the whole machine (all CPUs), from
    /proc/stat.
    """
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total, parts[6] if len(parts) > 6 else 0
