"""
Churned backend names and the state file (issue 13, items 6 and 7).

    python bench/churn.py [--names 20000] [--changes 20] [--forget-after S]
    python bench/churn.py --stall [--names 20000] [--changes 50]

Default: a real ``twistd cluster-balancer`` (LocalCluster) with a state file
and one echo backend.  One control channel registers --names backends one
after another; each new name marks the previous one down, as pods that came
and went under new names.  Printed: the balancer's memory per name, the
time of ``cluster-admin status``, the state file's size after an admin
change, and proxied echo latency (median, max) with no admin change and
while --changes admin changes are made one after another.  With
--forget-after (a balancer that has the option), the figures again once the
churned names are forgotten.

--stall: in this process, a balancer service on the real reactor with
--names down backends, and how long the reactor stalls per admin change:
the longest gap between the ticks of a 1 ms LoopingCall while changes are
made one after another over a real admin connection.

To compare with an older checkout, run this file with PYTHONPATH naming it
(the balancer's processes inherit it).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from twisted.protocols import amp

from twistedcluster.wire import commands
from twistedcluster.localcluster import LocalCluster, adminCommand, waitFor

HOST = "127.0.0.1"


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class RawAMP:
    """
    A blocking AMP client for one command at a time (no reactor here).
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.tag = 0
        self.buffer = b""

    def send(self, command, **kw) -> None:
        self.tag += 1
        box = command.makeArguments(kw, None)
        box[b"_ask"] = b"%d" % self.tag
        box[b"_command"] = command.commandName
        self.sock.sendall(amp.AmpBox(box).serialize())

    def receive(self, count: int = 1) -> list:
        """
        Read C{count} answers; raise on an error answer.
        """
        boxes: list = []
        while len(boxes) < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the balancer closed the channel")
            data = self.buffer + chunk
            # Parse the complete boxes: each ends with two zero bytes.
            while True:
                end = _boxEnd(data)
                if end is None:
                    break
                [box] = amp.parseString(data[:end])
                data = data[end:]
                if b"_error" in box:
                    self.buffer = data
                    raise RuntimeError(box[b"_error_description"].decode())
                boxes.append(box)
            self.buffer = data
        return boxes

    def call(self, command, **kw):
        self.send(command, **kw)
        return self.receive()[0]

    def close(self) -> None:
        self.sock.close()


def _boxEnd(data: bytes):
    """
    Where the first complete AMP box in C{data} ends, or C{None}.
    """
    i = 0
    while i + 2 <= len(data):
        n = int.from_bytes(data[i : i + 2], "big")
        i += 2
        if n == 0:
            return i
        i += n
        if i + 2 > len(data):
            return None
        v = int.from_bytes(data[i : i + 2], "big")
        i += 2 + v
    return None


def churn(controlPort: int, names: int, window: int = 200) -> float:
    """
    Register C{names} backends one after another on one control channel
    (pipelined, C{window} in flight); return the seconds it took.
    """
    c = RawAMP(controlPort)
    started = time.monotonic()
    sent = answered = 0
    try:
        while answered < names:
            while sent < names and sent - answered < window:
                c.send(
                    commands.Register, name=f"pod-{sent:05d}", host="10.9.0.1",
                    port=10000 + sent % 50000, capacity=100, connections=0,
                    load=0.0, interval=3600.0,
                )
                sent += 1
            answered += len(c.receive(min(window, sent - answered) or 1))
    finally:
        c.close()  # the last name goes down too
    return time.monotonic() - started


class EchoProbe:
    """
    Round trips of 16 bytes on one proxied connection, in a thread, until
    stopped (at most C{maxSeconds}).
    """

    def __init__(self, port: int, maxSeconds: float = 120.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.maxSeconds = maxSeconds
        self.latencies: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.maxSeconds
        payload = b"0123456789abcdef"
        while not self._stop.is_set() and time.monotonic() < deadline:
            t = time.perf_counter()
            self.sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = self.sock.recv(64)
                if not chunk:
                    return
                got += chunk
            self.latencies.append(time.perf_counter() - t)
            time.sleep(0.001)

    def measure(self, during) -> tuple:
        """
        (median ms, max ms, samples) of the round trips made while
        C{during()} runs.
        """
        self.latencies = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            during()
        finally:
            self._stop.set()
            self._thread.join(30)
        ms = [x * 1000 for x in self.latencies]
        return statistics.median(ms), max(ms), len(ms)


def statusSeconds(cluster: LocalCluster, runs: int = 3) -> tuple:
    times, count = [], 0
    for _ in range(runs):
        t = time.monotonic()
        r = subprocess.run(
            adminCommand(cluster.admin, ["status", "--json"]),
            capture_output=True, text=True, timeout=120, env=cluster.env,
        )
        times.append(time.monotonic() - t)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        count = r.stdout.count('"name"')
    return min(times), count


def figures(cluster, balancer, state: Path, probe, changes: int, label: str) -> None:
    seconds, listed = statusSeconds(cluster)
    admin = RawAMP(cluster.adminPort)
    try:
        def changeMany():
            for i in range(changes):
                admin.call(commands.SetWeight, name="echo-1", weight=2 + i % 2)

        idle = probe.measure(lambda: time.sleep(2))
        busy = probe.measure(changeMany)
    finally:
        admin.close()
    size = state.stat().st_size if state.exists() else 0
    print(f"\n{label}")
    print(f"  backends listed by status:        {listed}")
    print(f"  cluster-admin status --json:      {seconds:.2f} s (best of 3)")
    print(f"  balancer RSS:                     {rssKiB(balancer.pid) / 1024:.1f} MiB")
    print(f"  state file after {changes} changes:    {size} bytes")
    print(f"  proxied echo, no admin change:    median {idle[0]:.2f} ms, max {idle[1]:.2f} ms ({idle[2]} round trips)")
    print(f"  proxied echo, {changes} admin changes:  median {busy[0]:.2f} ms, max {busy[1]:.2f} ms ({busy[2]} round trips)")


def realBalancer(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="churn-"))
    state = work / "state.json"
    cluster = LocalCluster(work / "logs")
    extra = [f"--state-file={state}"]
    if args.forget_after is not None:
        extra.append(f"--forget-after={args.forget_after}")
    try:
        balancer = cluster.startBalancer(extra=extra)
        cluster.startBackend("echo-1", extra=["--report-interval=0.5"])
        cluster.waitUp(["echo-1"])
        probe = EchoProbe(cluster.port)
        before = rssKiB(balancer.pid)
        took = churn(cluster.controlPort, args.names)
        waitFor(
            lambda: cluster.quickStatus().get(f"pod-{args.names - 1:05d}", {}).get("state") != "up",
            30, "the last churned name to be down",
        )
        after = rssKiB(balancer.pid)
        print(f"registered {args.names} churned names in {took:.1f} s; balancer RSS "
              f"{before / 1024:.1f} -> {after / 1024:.1f} MiB, "
              f"{(after - before) * 1024 / args.names:.0f} bytes per name")
        figures(cluster, balancer, state, probe, args.changes,
                f"with {args.names} churned names down:")
        if args.forget_after is not None:
            waitFor(lambda: len(cluster.quickStatus()) <= 1,
                    args.forget_after + 60, "the churned names to be forgotten")
            figures(cluster, balancer, state, probe, args.changes,
                    f"after --forget-after={args.forget_after} s:")
        probe.sock.close()
    finally:
        cluster.stopAll()
    print(f"\n(logs in {work})")


def inProcessStall(args) -> None:
    from twisted.internet import defer, task
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from twistedcluster.balancer import service as balancer
    from twistedcluster.localcluster import freePort

    work = Path(tempfile.mkdtemp(prefix="stall-"))
    state = work / "state.json"

    async def main(reactor):
        o = balancer.Options()
        adminPort = freePort()
        o.parseOptions([
            f"--listen=tcp:{freePort()}:interface={HOST}",
            f"--control=tcp:{freePort()}:interface={HOST}",
            f"--admin=tcp:{adminPort}:interface={HOST}",
            f"--state-file={state}",
        ])
        top = balancer.makeService(o, reactor)
        top.startService()
        pool = top.cluster.pool
        for i in range(args.names):
            pool.register(f"pod-{i:05d}", "10.9.0.1", 10000 + i % 50000)
            pool.markDown(f"pod-{i:05d}")
        admin = await connectProtocol(
            TCP4ClientEndpoint(reactor, HOST, adminPort), amp.AMP()
        )
        gaps: list = []
        last = [time.perf_counter()]

        def tick():
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

        ticker = task.LoopingCall(tick)
        ticker.start(0.001)
        cpu, wall = time.thread_time(), time.perf_counter()
        await task.deferLater(reactor, 1.0, lambda: None)
        idleRate = (time.thread_time() - cpu) / (time.perf_counter() - wall)
        idle = max(gaps)
        gaps.clear()
        trips = []
        cpu, wall = time.thread_time(), time.perf_counter()
        for i in range(args.changes):
            t = time.perf_counter()
            await admin.callRemote(commands.SetWeight, name="pod-00000", weight=2 + i % 2)
            trips.append(time.perf_counter() - t)
            await task.deferLater(reactor, 0.01, lambda: None)
        # The reactor thread's own CPU (the admin client's included), less
        # what the idle ticker costs: not inflated by other processes.
        busyCPU = time.thread_time() - cpu - idleRate * (time.perf_counter() - wall)
        ticker.stop()
        print(f"{args.names} down backends, {args.changes} admin changes, state file "
              f"{state.stat().st_size} bytes")
        print(f"  longest reactor gap, idle:          {idle * 1000:.1f} ms (1 ms ticker)")
        print(f"  longest reactor gap, during changes: {max(gaps) * 1000:.1f} ms")
        big = sorted(gaps)[-args.changes:]
        print(f"  the {args.changes} longest gaps:  median {statistics.median(big) * 1000:.1f} ms")
        print(f"  reactor thread CPU per change:      {busyCPU / args.changes * 1000:.2f} ms "
              "(admin client's share included)")
        print(f"  admin change answered in:           median "
              f"{statistics.median(trips) * 1000:.1f} ms, max {max(trips) * 1000:.1f} ms")
        admin.transport.loseConnection()
        await top.stopService()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def mainArgs(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--names", type=int, default=20000)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--forget-after", type=float, default=None)
    p.add_argument("--stall", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.names <= 100000 or not 1 <= args.changes <= 1000:
        p.error("--names 1..100000, --changes 1..1000")
    return args


if __name__ == "__main__":
    a = mainArgs()
    (inProcessStall if a.stall else realBalancer)(a)
    sys.exit(0)
