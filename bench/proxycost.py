"""
What passing the client on and TLS cost the balancer: server CPU per new
connection and per MB, each set-up against plain proxying measured in the
same run.

    python bench/proxycost.py            # about 4 minutes on 2 cores
    python bench/proxycost.py --quick    # a smoke run, under a minute

Set-ups, each a balancer in front of its own echo backend on 127.0.0.1:

- plain: no PROXY header, no TLS (the reference);
- send-proxy-v1, send-proxy-v2: C{--send-proxy}, the backend reading it
  (C{--listen haproxy:tcp:...});
- behind-proxy: C{--listen haproxy:tcp:...} and C{--send-proxy v2}, clients
  sending a v1 header as a load balancer in front would;
- tls-listen: C{--listen ssl:...} (TLS 1.3, P-256 certificate), clients TLS;
- backend-tls: C{--backend-tls}, the backend on C{ssl:}.

A new connection: connect, 64 bytes echoed, close; connections run
C{--parallel} at a time from threads of this process.  Per MB: one
connection echoes C{--mb} MB in 64 KiB round trips.  CPU is user + system
time of the balancer (and, separately, of the backend) read from /proc over
the measured work, divided by the connections or MB; set-ups take turns
round after round, the best round is kept (other processes can only slow
one down; C{--stat median} keeps the median).  Every load is bounded in
count and time; every process started here is stopped here, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from servers import cpuSeconds  # noqa: E402

from twistedcluster.localcluster import LocalCluster, freePort, waitFor  # noqa: E402

SETUPS = ["plain", "send-proxy-v1", "send-proxy-v2", "behind-proxy", "tls-listen", "backend-tls"]
HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 80\r\n"
MESSAGE = b"m" * 64
BLOCK = 64 * 1024


def certificates(folder: Path):
    """
    A CA and a certificate for 127.0.0.1 (P-256), as PEM files; the client
    context trusting the CA.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from certificates import Authority, writePair

    ca = Authority()
    key, cert = writePair(folder, "server", *ca.issue("bench", ips=["127.0.0.1"]))
    caFile = ca.writeCA(folder / "ca")
    context = ssl.create_default_context(cafile=str(caFile))
    return key, cert, caFile, context


class Setup:
    """
    One balancer and its backend, and how a client talks to it.
    """

    def __init__(self, name: str, workdir: Path, pki) -> None:
        self.name = name
        key, cert, caFile, context = pki
        self.cluster = c = LocalCluster(workdir / name)
        c.env["PYTHONPATH"] = str(ROOT) + (os.pathsep + c.env["PYTHONPATH"] if c.env.get("PYTHONPATH") else "")
        port = freePort()
        balancer = ["--max-connections=20000"]
        backendListen = None
        self.context: Optional[ssl.SSLContext] = None
        self.header = b""
        if name.startswith("send-proxy"):
            balancer.append(f"--send-proxy={name.rsplit('-', 1)[1]}")
            backendListen = "haproxy:tcp:{port}:interface=127.0.0.1"
        elif name == "behind-proxy":
            balancer += [f"--listen=haproxy:tcp:{port}:interface=127.0.0.1", "--send-proxy=v2"]
            backendListen = "haproxy:tcp:{port}:interface=127.0.0.1"
            self.header = HEADER
        elif name == "tls-listen":
            balancer.append(f"--listen=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}")
            self.context = context
        elif name == "backend-tls":
            balancer.append(f"--backend-tls=ca={caFile}")
            backendListen = f"ssl:{{port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.balancer = c.startBalancer(port=port, extra=balancer)
        bport = freePort()
        extra = ["--report-interval=0.5", "--capacity=1000000"]
        if backendListen:
            extra.append("--listen=" + backendListen.format(port=bport))
        self.backend = c.startBackend("backend", port=bport, extra=extra)
        c.waitUp(["backend"], timeout=30)
        self.port = port
        waitFor(lambda: self.once() == MESSAGE, 20, f"{name} to echo")

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if self.header:
            s.sendall(self.header)
        if self.context is not None:
            s = self.context.wrap_socket(s, server_hostname="127.0.0.1")
        return s

    def once(self) -> bytes:
        with self.connect() as s:
            s.sendall(MESSAGE)
            got = b""
            while len(got) < len(MESSAGE):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            return got

    def stop(self) -> None:
        self.cluster.stopAll()


def measure(setup: Setup, work, amount: float) -> Dict[str, float]:
    """
    Run C{work()}; balancer and backend CPU microseconds per unit of
    C{amount}.
    """
    b0, k0 = cpuSeconds(setup.balancer.pid), cpuSeconds(setup.backend.pid)
    t0 = time.monotonic()
    done = work()
    seconds = time.monotonic() - t0
    b1, k1 = cpuSeconds(setup.balancer.pid), cpuSeconds(setup.backend.pid)
    units = amount * done
    return {
        "balancer": (b1 - b0) * 1e6 / units,
        "backend": (k1 - k0) * 1e6 / units,
        "seconds": seconds,
        "done": done,
    }


def connections(setup: Setup, count: int, parallel: int, deadline: float):
    """
    C{count} new connections, C{parallel} at a time; the share that
    completed (a connection not done by C{deadline} seconds is not counted).
    """
    left = [count]
    done = [0]
    lock = threading.Lock()
    end = time.monotonic() + deadline

    def worker():
        while time.monotonic() < end:
            with lock:
                if not left[0]:
                    return
                left[0] -= 1
            try:
                if setup.once() == MESSAGE:
                    with lock:
                        done[0] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline + 10)
    return lambda: done[0]


def newConnections(setup: Setup, count: int, parallel: int, deadline: float) -> Dict[str, float]:
    def work():
        return connections(setup, count, parallel, deadline)()

    return measure(setup, work, 1.0)


def bulk(setup: Setup, mb: int, deadline: float) -> Dict[str, float]:
    def work():
        block = bytes(range(256)) * (BLOCK // 256)
        end = time.monotonic() + deadline
        moved = 0
        with setup.connect() as s:
            while moved < mb * 1024 * 1024 and time.monotonic() < end:
                s.sendall(block)
                got = 0
                while got < BLOCK:
                    chunk = s.recv(BLOCK - got)
                    if not chunk:
                        raise ConnectionError("closed mid-echo")
                    got += len(chunk)
                moved += BLOCK
        return moved / (1024 * 1024)

    return measure(setup, work, 1.0)


def table(results: Dict[str, Dict[str, Dict[str, float]]], names: List[str]) -> str:
    rows = [
        ("conn", "balancer", "balancer CPU us per new conn"),
        ("conn", "backend", "backend CPU us per new conn"),
        ("mb", "balancer", "balancer CPU us per MB echoed"),
        ("mb", "backend", "backend CPU us per MB echoed"),
    ]
    lines = [f"{'metric':<32}" + "".join(f"{n:>15}" for n in names)]
    lines.append("-" * len(lines[0]))
    for load, who, label in rows:
        ref = results["plain"][load][who]
        cells, ratios = [], []
        for n in names:
            v = results[n][load][who]
            cells.append(f"{v:>15,.1f}")
            ratios.append(f"{v / ref:>14.2f}x" if ref else f"{'':>15}")
        lines.append(f"{label:<32}" + "".join(cells))
        lines.append(f"{'  against plain':<32}" + "".join(ratios))
    return "\n".join(lines)


def parseArgs(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {','.join(SETUPS)} (plain is always measured)")
    p.add_argument("--connections", type=int, default=None, help="new connections per set-up and round (default 10000; --quick: 300)")
    p.add_argument("--parallel", type=int, default=8, help="connections at a time (default 8)")
    p.add_argument("--mb", type=int, default=None, help="MB echoed per set-up and round (default 256; --quick: 8)")
    p.add_argument("--rounds", type=int, default=None, help="rounds, set-ups in rotated order (default 3; --quick: 1)")
    p.add_argument("--stat", choices=("best", "median"), default="best", help="figure kept of several rounds: the best (default; other processes can only slow a round down) or the median")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer connections and MB, one round")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every figure to FILE")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    unknown = set(names) - set(SETUPS)
    if unknown:
        p.error(f"unknown set-up(s): {', '.join(sorted(unknown))}")
    args.names = ["plain"] + [n for n in names if n != "plain"]
    args.connections = args.connections or (300 if args.quick else 10000)
    args.mb = args.mb or (8 if args.quick else 256)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv=None) -> int:
    args = parseArgs(argv)
    workdir = Path(tempfile.mkdtemp(prefix="twistedcluster-proxycost-"))
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    pki = certificates(workdir)
    setups: Dict[str, Setup] = {}
    rounds: Dict[str, List[Dict[str, Dict[str, float]]]] = {n: [] for n in args.names}
    try:
        for n in args.names:
            say(f"starting {n} ...")
            setups[n] = Setup(n, workdir, pki)
        for r in range(args.rounds):
            order = args.names[r % len(args.names):] + args.names[: r % len(args.names)]
            for n in order:
                s = setups[n]
                conn = newConnections(s, args.connections, args.parallel, 120)
                mb = bulk(s, args.mb, 120)
                say(f"round {r + 1} {n}: {conn['done']:.0f} conns in {conn['seconds']:.1f} s, "
                    f"{mb['done']:.0f} MB in {mb['seconds']:.1f} s")
                rounds[n].append({"conn": conn, "mb": mb})
    finally:
        for s in setups.values():
            s.stop()
    pick = min if args.stat == "best" else statistics.median
    chosen = {
        n: {
            load: {who: pick([r[load][who] for r in rs]) for who in ("balancer", "backend")}
            for load in ("conn", "mb")
        }
        for n, rs in rounds.items()
    }
    print(f"{args.connections} new connections ({args.parallel} at a time) and {args.mb} MB per set-up, "
          f"{args.stat} of {args.rounds} round(s); logs in {workdir}")
    print(table(chosen, args.names))
    if args.json:
        Path(args.json).write_text(json.dumps({args.stat: chosen, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
