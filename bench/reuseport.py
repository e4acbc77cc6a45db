"""
Several balancer processes accepting on one port: does it raise the rates?

    python bench/reuseport.py [--processes 1,2] [--rounds 3] [--duration 3]

For each count N in --processes, N ``twistd cluster-balancer`` processes
share one proxy port: each gets its own listening socket, bound with
SO_REUSEPORT (the kernel spreads new connections over them), handed over as
a systemd socket (``--listen=systemd:domain=INET:index=0``, LISTEN_FDS).
Each balancer has its own control and admin ports, and one echo backend
reports to every balancer (``--balancer`` repeated), so each one knows its
load without sharing anything.  Every set-up stays up for the whole run; the
new-connection and echo loads are measured on each in turn, in rounds, and
the table gives the best round, the balancers' CPU summed over their
processes, and the ratio to the first count.

Admin commands (drain, weight, policy) act on the balancer they are sent to:
with several processes, send them to each.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
# systemd hands sockets over from this descriptor on.
SD_LISTEN_FDS_START = 3


def _reusePortListener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((HOST, port))
    s.listen(1024)
    return s


class SetUp:
    """
    N balancer processes on one port.
    """

    def __init__(self, n: int, logs: Path, env: dict, twistdCommand, freePort) -> None:
        self.n = n
        self.port = freePort(HOST)
        self.controlPorts: List[int] = []
        self.procs: List[subprocess.Popen] = []
        self._sockets: List[socket.socket] = []
        try:
            self._start(n, logs, env, twistdCommand, freePort)
        except BaseException:
            self.stop()
            raise

    def _start(self, n, logs, env, twistdCommand, freePort) -> None:
        for i in range(n):
            listener = _reusePortListener(self.port)
            self._sockets.append(listener)
            control, admin = freePort(HOST), freePort(HOST)
            self.controlPorts.append(control)
            argv = twistdCommand("cluster-balancer", [
                "--listen=systemd:domain=INET:index=0",
                f"--control=tcp:{control}:interface={HOST}",
                f"--admin=tcp:{admin}:interface={HOST}",
            ])
            # LISTEN_PID must be the balancer's own pid: set by the shell
            # that then becomes it.
            shell = 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=proxy; exec "$@"'
            fd = listener.fileno()

            def handOver(fd=fd):
                os.dup2(fd, SD_LISTEN_FDS_START)

            with open(logs / f"balancers{n}-{i}.log", "ab") as log:
                self.procs.append(subprocess.Popen(
                    ["sh", "-c", shell, "sh", *argv],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    pass_fds=(SD_LISTEN_FDS_START,), preexec_fn=handOver,
                ))

    def cpu(self) -> float:
        from servers import cpuSeconds

        return sum(cpuSeconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for s in self._sockets:
            s.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/reuseport.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="1,2", help="comma-separated balancer process counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each measurement (default 3)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds before each (default 0.5)")
    p.add_argument("--inflight", type=int, default=32, help="new connections in flight (default 32)")
    p.add_argument("--connections", type=int, default=128, help="persistent connections for echo (default 128)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    args = p.parse_args(argv)
    try:
        counts = [int(c) for c in args.processes.split(",") if c.strip()]
    except ValueError:
        p.error("--processes: comma-separated whole numbers")
    if not counts or not all(1 <= c <= 32 for c in counts) or len(set(counts)) != len(counts):
        p.error("--processes: different counts from 1 to 32")
    if not (1 <= args.rounds <= 10 and 0 < args.duration <= 60 and 0 <= args.warmup <= 10):
        p.error("--rounds 1..10, --duration (0, 60], --warmup [0, 10]")
    if not hasattr(socket, "SO_REUSEPORT"):
        p.error("this platform has no SO_REUSEPORT")

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import run as benchRun
    from loadgen import LoadGenerator
    from twistedcluster.localcluster import echoOnce, freePort, twistdCommand, waitFor

    say = benchRun.Progress()
    benchRun.raiseFileLimit()
    logs = Path(tempfile.mkdtemp(prefix="twistedcluster-reuseport-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    sources = [f"127.0.0.{i}" for i in range(2, 10)]
    lg = LoadGenerator(args.workers)
    setups: Dict[int, SetUp] = {}
    backend = None
    best: Dict[tuple, dict] = {}
    try:
        for n in counts:
            setups[n] = SetUp(n, logs, env, twistdCommand, freePort)
        controls = [c for s in setups.values() for c in s.controlPorts]
        backendPort = freePort(HOST)
        with open(logs / "backend.log", "ab") as log:
            backend = subprocess.Popen(
                twistdCommand("cluster-backend", [
                    "--name=bench-backend", f"--listen=tcp:{backendPort}:interface={HOST}",
                    "--capacity=1000000", *[f"--balancer=tcp:host={HOST}:port={c}" for c in controls],
                ]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        say(f"{sum(counts)} balancer processes and one echo backend starting; logs in {logs}")

        def relays(port):
            try:
                return echoOnce(HOST, port, b"ready\n", timeout=2) == b"ready\n"
            except OSError:
                return False

        for n, s in setups.items():
            waitFor(lambda s=s: relays(s.port), 30, f"{n} balancer process(es) to relay")
        # Every process must know the backend: the kernel may hand any of
        # them the next connection.
        for n, s in setups.items():
            waitFor(lambda s=s: all(relays(s.port) for _ in range(8 * s.n)), 30, f"all {n} to relay")

        for r in range(args.rounds):
            order = counts[r % len(counts):] + counts[:r % len(counts)]
            for kind in ("connect", "echo"):
                for n in order:
                    s = setups[n]
                    shares = benchRun.split(args.inflight if kind == "connect" else args.connections, args.workers)
                    params = [
                        (
                            {"addr": (HOST, s.port), "concurrency": k, "size": 64,
                             "cidBase": i * 100_000_000, "sources": sources}
                            if kind == "connect" else
                            {"addr": (HOST, s.port), "connections": k, "size": 64,
                             "cidBase": i * 100_000, "sources": sources}
                        ) if k else None
                        for i, k in enumerate(shares)
                    ]
                    cpu0, t0 = s.cpu(), time.monotonic()
                    results = lg.run(kind, params, args.warmup, args.duration)
                    cpu1, t1 = s.cpu(), time.monotonic()
                    count = sum(x["count"] for x in results)
                    bad = sum(x["errors"] + x.get("corrupt", 0) for x in results)
                    rate = count / (sum(x["seconds"] for x in results) / len(results))
                    cores = (cpu1 - cpu0) / (t1 - t0)
                    unit = "conn/s" if kind == "connect" else "req/s"
                    say(f"{kind} {r + 1}/{args.rounds}: {n} process(es) {rate:>9,.0f} {unit}, "
                        f"balancers' CPU {cores:.0%} of a core" + (f", {bad} errors" if bad else ""))
                    if bad:
                        raise RuntimeError(f"{bad} failed or corrupt exchanges through {n} balancer(s)")
                    key = (kind, n)
                    if key not in best or rate > best[key]["rate"]:
                        # The CPU is sampled around the whole task (warm-up
                        # included), at about the measured rate.
                        best[key] = {"rate": rate, "cpuPerOp": cores / max(rate, 1e-9) * 1e6}
    finally:
        lg.close()
        for s in setups.values():
            s.stop()
        if backend is not None and backend.poll() is None:
            backend.terminate()
            try:
                backend.wait(40)
            except subprocess.TimeoutExpired:
                backend.kill()

    print()
    print(f"balancer processes on one SO_REUSEPORT port; best of {args.rounds} round(s) of "
          f"{args.duration:g} s; {os.cpu_count()} CPUs")
    print(f"{'processes':>9}  {'new conn/s':>11} {'ratio':>6} {'us CPU/conn':>11}  "
          f"{'echo req/s':>11} {'ratio':>6} {'us CPU/echo':>11}")
    first = counts[0]

    def ratio(kind, n):
        base = best[(kind, first)]["rate"]
        return best[(kind, n)]["rate"] / base if base else float("nan")

    for n in counts:
        c, e = best[("connect", n)], best[("echo", n)]
        print(f"{n:>9}  {c['rate']:>11,.0f} {ratio('connect', n):>5.2f}x "
              f"{c['cpuPerOp']:>11.1f}  {e['rate']:>11,.0f} {ratio('echo', n):>5.2f}x "
              f"{e['cpuPerOp']:>11.1f}")
    print("us CPU: all the balancer processes' CPU over the measurement, per operation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
