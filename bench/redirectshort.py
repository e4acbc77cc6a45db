"""
Redirect mode under short connections: how many a second the redirect
listener serves before it answers C{ERROR no-backend}.

    python bench/redirectshort.py [--capacity 200] [--clients 3] [--seconds 6]
                                  [--baseline DIR]

A real ``twistd cluster-balancer`` with a redirect listener and two echo
backends of --capacity each (LocalCluster).  --clients threads each loop:
ask the redirect listener, connect to the backend it names, echo one byte,
close; so at most --clients connections are open at once, far below the
backends' capacity.  A redirect answer counts as load on its backend until
a report has seen the connection (docs/internals.md, "What a report had
seen"); the sooner that happens, the more short connections a second are
served rather than refused.  Printed: connections served a second and
answers refused, for this checkout and, with --baseline DIR (a checkout
of older code, e.g. ``git archive REF twistedcluster twisted | tar -x -C
DIR``), for that one in the same run, then the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"


def ask(port: int, source: str) -> str:
    s = socket.socket()
    try:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect((HOST, port))
        answer = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                return answer.decode().strip()
            answer += chunk
    finally:
        s.close()


def loop(port: int, k: int, seconds: float, out: list) -> None:
    served = refused = 0
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        # One source address per ask, in turn: --redirect-per-source does not
        # bound what is measured here.
        answer = ask(port, f"127.0.{k + 1}.{1 + i % 200}")
        i += 1
        if answer.startswith("ERROR"):
            refused += 1
            time.sleep(0.005)
            continue
        host, backendPort = answer.split()
        with socket.create_connection((host, int(backendPort)), timeout=5) as c:
            c.sendall(b"x")
            c.recv(1)
        served += 1
    out.append((served, refused))


def run(code: Path, capacity: int, clients: int, seconds: float) -> tuple:
    """
    Served a second and refused in total, with the code at C{code}.
    """
    from twistedcluster.localcluster import LocalCluster, freePort

    with tempfile.TemporaryDirectory() as d:
        cluster = LocalCluster(Path(d))
        # The processes run the code measured: on PYTHONPATH, and started
        # elsewhere than in a checkout (python -c puts the current folder
        # first on the path).
        cluster.env["PYTHONPATH"] = str(code)
        redirect = freePort(HOST)
        here = os.getcwd()
        os.chdir(d)
        try:
            cluster.startBalancer(extra=[f"--redirect=tcp:{redirect}:interface={HOST}"])
            for name in ("a", "b"):
                cluster.startBackend(name, extra=[f"--capacity={capacity}"])
            cluster.waitUp(["a", "b"])
            out: list = []
            threads = [
                threading.Thread(target=loop, args=(redirect, k, seconds, out))
                for k in range(clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 30)
        finally:
            cluster.stopAll()
            os.chdir(here)
    served = sum(s for s, _ in out)
    refused = sum(r for _, r in out)
    return served / seconds, refused


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--capacity", type=int, default=200)
    a.add_argument("--clients", type=int, default=3)
    a.add_argument("--seconds", type=float, default=6.0)
    a.add_argument("--baseline", type=Path, default=None)
    args = a.parse_args(argv)
    print(
        f"redirect listener, 2 echo backends of capacity {args.capacity}, {args.clients} "
        f"client(s) looping ask/connect/echo/close for {args.seconds:g} s"
    )
    rate, refused = run(ROOT, args.capacity, args.clients, args.seconds)
    print(f"  this checkout: {rate:,.0f} served/s, {refused:,} answered ERROR no-backend")
    if args.baseline is not None:
        baseRate, baseRefused = run(args.baseline.resolve(), args.capacity, args.clients, args.seconds)
        print(f"  baseline:      {baseRate:,.0f} served/s, {baseRefused:,} answered ERROR no-backend")
        print(f"  served/s: {rate / baseRate:.2f}x the baseline's" if baseRate else "  baseline served none")


if __name__ == "__main__":
    main()
