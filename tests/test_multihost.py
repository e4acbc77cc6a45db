"""
Several hosts, for real: Linux network namespaces that this test makes,
each a host with its own address on a private bridge, real ``twistd``
processes in them.

    client 10.200.0.100 ─┐
    balancer 10.200.0.1 ─┼─ bridge (in a namespace of its own)
    backend-1 10.200.0.11┤
    backend-2 10.200.0.12┘

Clients in the client namespace reach both backends through the balancer.
Then backend-1's link is cut at the bridge (``ip link set down``): no FIN,
no RST, its control channel stays open, so only the heartbeat can tell.
The balancer must mark it down within the heartbeat timeout, clients must
keep succeeding, and once the link is back backend-1 takes traffic again.

The 10.200.0.0/24 addresses exist only inside these namespaces; this
process (in the host's own namespace) sends nothing to them: it reaches the
balancer's admin listener through a unix socket, and runs clients with
``ip netns exec``.  Needs root and ``ip``; skipped otherwise.  Everything
made is torn down (processes by pid, then the namespaces), pass or fail.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from twistedcluster.localcluster import Process, adminCommand, twistdCommand, waitFor

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.200.0"
ADDRESSES = {"balancer": 1, "backend-1": 11, "backend-2": 12, "client": 100}
BACKENDS = ["backend-1", "backend-2"]
PROXY, CONTROL, SERVICE = 8000, 8100, 9000
REPORT_INTERVAL = 0.2
HEARTBEAT = 3 * REPORT_INTERVAL  # the balancer's default: 3 report intervals
CONNECT_TIMEOUT = 0.5
# Detection is at most HEARTBEAT after the cut; allow for polling and two
# busy shared cores.
SLACK = 0.5
SECRET = b"multihost-test-secret-0123456789"


def address(role: str) -> str:
    return f"{SUBNET}.{ADDRESSES[role]}"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class Hosts:
    """
    The namespaces this test made, by role; deletes them all, and only them.
    """

    def __init__(self) -> None:
        self.tag = f"tc{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
        self.names: Dict[str, str] = {}

    def make(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        run("ip", "netns", "add", name)
        self.names[role] = name
        return name

    def ip(self, role: str, *args: str) -> None:
        run("ip", "-n", self.names[role], *args)

    def build(self) -> None:
        self.make("bridge")
        self.ip("bridge", "link", "set", "lo", "up")
        self.ip("bridge", "link", "add", "br0", "type", "bridge")
        self.ip("bridge", "link", "set", "br0", "up")
        for role, n in ADDRESSES.items():
            ns = self.make(role)
            port = self.port(role)
            # The veth pair is born in the bridge's namespace, its other end
            # in the host's: nothing appears in this process's namespace.
            self.ip("bridge", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.ip("bridge", "link", "set", port, "master", "br0", "up")
            self.ip(role, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
            self.ip(role, "link", "set", "eth0", "up")
            self.ip(role, "link", "set", "lo", "up")

    @staticmethod
    def port(role: str) -> str:
        return f"p{ADDRESSES[role]}"

    def cut(self, role: str) -> None:
        self.ip("bridge", "link", "set", self.port(role), "down")

    def mend(self, role: str) -> None:
        self.ip("bridge", "link", "set", self.port(role), "up")

    def exec(self, role: str, argv: List[str]) -> List[str]:
        return ["ip", "netns", "exec", self.names[role], *argv]

    def destroy(self) -> None:
        for name in reversed(list(self.names.values())):
            run("ip", "netns", "del", name, check=False)
        self.names.clear()


def netnsUnavailable() -> str:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no ip command (Debian: apt-get install iproute2)"
    probe = f"tcprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=15)
    if r.returncode != 0:
        return f"cannot make a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=15)
    return ""


# One echo per line of output; runs inside the client namespace.
CLIENT = r"""
import json, socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + seconds
i = 0
while i < count or time.monotonic() < end:
    payload = b"echo %d from the client host\n" % i
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
        ok, error = got == payload, None if got == payload else repr(got)
    except OSError as e:
        ok, error = False, repr(e)
    print(json.dumps({"start": start, "took": time.monotonic() - start, "ok": ok, "error": error}), flush=True)
    i += 1
    if i >= count:
        time.sleep(0.01)  # a steady stream, not a flood, once past count
"""

# Polls the balancer's status over the admin unix socket as fast as it
# answers; one JSON line per answer, stamped with this machine's monotonic
# clock (the same clock the test reads).
WATCHER = r"""
import json, sys, time
from twisted.internet import defer, task
from twistedcluster.cli import admin as admincli

async def main(reactor, admin, secret, seconds):
    args = admincli.parser().parse_args(
        ["--admin", admin, "--secret-file", secret, "--timeout", "2", "status", "--json"])
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        asked = time.monotonic()
        try:
            out = await admincli.run(reactor, args)
            line = {"backends": {b["name"]: b["state"] for b in json.loads(out)}}
        except admincli.CommandFailed as e:
            line = {"error": str(e)}
        line.update(asked=asked, answered=time.monotonic())
        print(json.dumps(line), flush=True)
        await task.deferLater(reactor, 0.01, lambda: None)

task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
"""


class Lines:
    """
    A child's standard output, line by line, read with a deadline.
    """

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.queue: "queue.Queue[str]" = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.queue.put(line)

    def next(self, deadline: float) -> dict:
        try:
            return json.loads(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            raise TimeoutError("no line from the child in time") from None


@pytest.fixture
def cluster(tmp_path):
    reason = netnsUnavailable()
    if reason:
        pytest.skip(reason)
    hosts = Hosts()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    os.chmod(secret, 0o600)
    admin = f"unix:{tmp_path / 'admin.sock'}"
    state = {
        "hosts": hosts,
        "env": env,
        "secret": str(secret),
        "admin": admin,
        "tmp": tmp_path,
        "processes": {},
        "children": [],
    }
    try:
        hosts.build()

        def start(role: str, plugin: str, args: List[str]) -> Process:
            argv = hosts.exec(role, twistdCommand(plugin, [f"--secret-file={secret}", *args]))
            proc = Process(role, argv, tmp_path / f"{role}.log", env=env)
            state["processes"][role] = proc
            return proc

        balancer = start("balancer", "cluster-balancer", [
            f"--listen=tcp:{PROXY}:interface={address('balancer')}",
            f"--control=tcp:{CONTROL}:interface={address('balancer')}",
            f"--admin={admin}",
            f"--connect-timeout={CONNECT_TIMEOUT}",
        ])

        def listening():
            if not balancer.alive():
                raise RuntimeError(f"the balancer exited:\n{balancer.logText()[-3000:]}")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(tmp_path / "admin.sock"))
            return True

        waitFor(listening, 20, "the balancer's admin socket")
        for name in BACKENDS:
            start(name, "cluster-backend", [
                f"--name={name}",
                f"--listen=tcp:{SERVICE}:interface={address(name)}",
                f"--balancer=tcp:host={address('balancer')}:port={CONTROL}",
                f"--report-interval={REPORT_INTERVAL}",
            ])
        yield state
    finally:
        for popen in state["children"]:
            if popen.poll() is None:
                popen.kill()
                popen.wait(5)
        for proc in state["processes"].values():
            proc.stop(5)
        hosts.destroy()


def status(cluster) -> Dict[str, dict]:
    r = subprocess.run(
        adminCommand(cluster["admin"], ["--secret-file", cluster["secret"], "status", "--json"]),
        capture_output=True, text=True, timeout=30, env=cluster["env"],
    )
    if r.returncode != 0:
        raise RuntimeError(f"cluster-admin status failed ({r.returncode}): {r.stderr}")
    return {b["name"]: b for b in json.loads(r.stdout)}


def startClient(cluster, count: int, seconds: float) -> subprocess.Popen:
    argv = cluster["hosts"].exec("client", [
        sys.executable, "-c", CLIENT, address("balancer"), str(PROXY), str(count), str(seconds),
    ])
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster["env"])
    cluster["children"].append(popen)
    return popen


def echoes(cluster, count: int = 0, seconds: float = 0.0) -> List[dict]:
    popen = startClient(cluster, count, seconds)
    out, err = popen.communicate(timeout=seconds + count * 5 + 30)
    assert popen.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def routed(s: Dict[str, dict]) -> Dict[str, int]:
    return {n: s[n]["routed"] for n in BACKENDS}


def test_balancer_routes_around_a_backend_host_whose_link_is_cut(cluster):
    hosts = cluster["hosts"]
    procs = cluster["processes"]
    began = time.monotonic()

    def bothUp():
        for p in procs.values():
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.logText()[-3000:]}")
        s = status(cluster)
        return s if all(n in s and s[n]["state"] == "up" for n in BACKENDS) else None

    s = waitFor(bothUp, 20, "both backends up", interval=0.1)
    for name in BACKENDS:
        # Each registered from its own host, and is reached there.
        assert (s[name]["host"], s[name]["port"]) == (address(name), SERVICE)
        told = re.search(r"heartbeat timeout ([0-9.]+) s", procs[name].logText())
        assert told and abs(float(told.group(1)) - HEARTBEAT) < 1e-6, procs[name].logText()

    # -- traffic from the client host flows to both backend hosts ----------
    before = routed(s)
    results = echoes(cluster, count=20)
    assert len(results) == 20 and all(r["ok"] for r in results), results
    spread = {n: c - before[n] for n, c in routed(status(cluster)).items()}
    assert sum(spread.values()) == 20 and all(c > 0 for c in spread.values()), spread

    # -- cut backend-1's link: its channel stays open, its reports stop -----
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, cluster["admin"], cluster["secret"], "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster["env"],
    )
    cluster["children"].append(watcher)
    lines = Lines(watcher)
    first = lines.next(time.monotonic() + 15)
    assert first.get("backends", {}).get("backend-1") == "up", first

    cutAt = time.monotonic()
    hosts.cut("backend-1")
    # Clients keep coming while the balancer has not noticed yet.
    during = startClient(cluster, 0, 2.0)
    lastUp, downAt = cutAt, None
    deadline = cutAt + HEARTBEAT + 5
    while downAt is None:
        line = lines.next(deadline)
        state = line.get("backends", {}).get("backend-1")
        if state == "up":
            lastUp = line["asked"]
        elif state is not None:
            downAt = line["answered"]
    detected = downAt - cutAt
    print(f"backend-1 down {detected:.3f} s after its link was cut "
          f"(still up at {lastUp - cutAt:.3f} s); heartbeat timeout {HEARTBEAT:.2f} s")
    assert detected <= HEARTBEAT + SLACK, f"marked down {detected:.3f} s after the cut"
    assert procs["backend-1"].alive() and procs["backend-2"].alive()

    out, err = during.communicate(timeout=30)
    assert during.returncode == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert results and all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    # A client routed to backend-1 before the balancer noticed waited one
    # connect timeout, then was relayed to backend-2.
    assert max(r["took"] for r in results) < CONNECT_TIMEOUT + 2, results
    print(f"{len(results)} echoes during and after the cut, all served; "
          f"slowest {max(r['took'] for r in results):.3f} s")

    # -- once it is known down, everything goes to backend-2, at once --------
    before = routed(status(cluster))
    results = echoes(cluster, count=20)
    assert all(r["ok"] for r in results), results
    assert max(r["took"] for r in results) < CONNECT_TIMEOUT, results
    after = status(cluster)
    assert after["backend-1"]["state"] == "down"
    assert routed(after)["backend-1"] == before["backend-1"]
    assert routed(after)["backend-2"] == before["backend-2"] + 20

    # The heartbeat, not a closed channel, took it out.
    log = procs["balancer"].logText()
    assert "backend backend-1: no report for" in log, log[-3000:]
    assert "backend-1: control channel" not in log, log[-3000:]

    # -- the link comes back: its reports resume on the same channel ---------
    hosts.mend("backend-1")
    waitFor(
        lambda: status(cluster)["backend-1"]["state"] == "up",
        10,
        "backend-1 up again once its link is back",
        interval=0.2,
    )
    before = routed(status(cluster))
    results = echoes(cluster, count=20)
    assert all(r["ok"] for r in results), results
    assert routed(status(cluster))["backend-1"] > before["backend-1"]
    assert "backend backend-1 is reporting again: up" in procs["balancer"].logText()

    for p in procs.values():
        text = p.logText()
        assert "Traceback" not in text and "Unhandled" not in text, f"{p.name}:\n{text[-3000:]}"
    print(f"multi-host test body took {time.monotonic() - began:.1f} s")
