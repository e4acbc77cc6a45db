"""
Bursts, measured from outside with real processes: does the balancer hold
each backend's capacity, spread a burst onto a new backend sensibly, and keep
redirect answers for honest clients while one local process asks at full
speed?

    python bench/burst.py [--scenario capacity,newcomer,redirect] [--json FILE]

- capacity: three echo backends with --capacity 10; 45 clients connect to the
  proxy listener at once, each sends one byte and stays.  Prints what each
  backend reports, how many clients were served and how many wait.
- newcomer: three backends each hold 100 proxied connections, a fourth one
  joins idle; a burst of 200 more connections.  Prints the spread (ideal: 125
  in all on each backend, so the newcomer draws 125 of the 200).
- redirect: a redirect listener; one abusive process asks from 127.0.0.9 as
  fast as it can and never connects to the backend it is told; honest
  clients ask from 127.0.0.1 and then hold an echo connection to the backend.
  Prints the share of honest asks answered with a backend.

Every loop is bounded in count and time; every process started here is
stopped here, by PID.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twistedcluster.localcluster import LocalCluster, freePort, waitFor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_quality import openHeld  # noqa: E402


def _connectAll(port, n, timeout=10.0, pace=0.0):
    """
    Open C{n} connections to C{port} at once (or one every C{pace} seconds),
    sending one byte on each; return the sockets and how many got their
    echo within C{timeout} (L{routing_quality.openHeld}).
    """
    return openHeld([port], n, ["127.0.0.1"], seconds=pace * n, timeout=timeout)


def _reported(cluster):
    return {n: (b["connections"], b["active"], b["state"]) for n, b in sorted(cluster.status().items())}


def capacity(workdir):
    cluster = LocalCluster(workdir / "capacity")
    try:
        cluster.startBalancer(extra=["--queue-timeout=30"])
        names = ["b1", "b2", "b3"]
        for n in names:
            cluster.startBackend(n, extra=["--capacity=10"])
        cluster.waitUp(names)
        socks, served = _connectAll(cluster.port, 45, timeout=5.0)
        # Let every report catch up.
        time.sleep(2.5)
        status = _reported(cluster)
        for s in socks:
            s.close()
        over = sum(max(0, c - 10) for c, _, _ in status.values())
        return {
            "reported": {n: c for n, (c, _, _) in status.items()},
            "served": served,
            "waiting": 45 - served,
            "overCapacity": over,
        }
    finally:
        cluster.stopAll()


def newcomer(workdir, balancers=1):
    cluster = LocalCluster(workdir / f"newcomer{balancers}")
    held = []
    try:
        cluster.startBalancer()
        ports = [cluster.port]
        controls = [f"tcp:host=127.0.0.1:port={cluster.controlPort}"]
        second = None
        if balancers == 2:
            second = LocalCluster(workdir / "newcomer2b")
            second.startBalancer(name="balancer-b")
            ports.append(second.port)
            controls.append(f"tcp:host=127.0.0.1:port={second.controlPort}")
        old = ["old1", "old2", "old3"]
        for n in old:
            cluster.startBackend(n, balancers=controls)
        cluster.waitUp(old)
        if second is not None:
            second.waitUp(old)
        # 300 held connections: 100 on each, made directly (the balancers
        # know of them only from the backends' reports).
        for n in old:
            socks, _ = _connectAll(cluster.processes[n].port, 100, timeout=10.0)
            held += socks
        waitFor(
            lambda: sum(c for c, _, _ in _reported(cluster).values()) >= 300,
            20,
            "300 connections reported",
        )
        cluster.startBackend("new", balancers=controls)
        cluster.waitUp(["new"])
        if second is not None:
            second.waitUp(["new"])
        before = {n: c for n, (c, _, _) in _reported(cluster).items()}
        # The burst: 200 within about half a second, split between the
        # balancers (so that reports arrive while it goes on).
        per = 200 // len(ports)
        for p in ports:
            socks, _ = _connectAll(p, per, timeout=10.0, pace=float(os.environ.get("BURST_SECONDS", "0.5")) / 200)
            held += socks
        waitFor(
            lambda: sum(c for c, _, _ in _reported(cluster).values()) >= 500,
            20,
            "500 connections reported",
        )
        after = {n: c for n, (c, _, _) in _reported(cluster).items()}
        drew = {n: after[n] - before.get(n, 0) for n in after}
        return {"balancers": balancers, "before": before, "after": after, "drewOf200": drew}
    finally:
        for s in held:
            s.close()
        cluster.stopAll()
        if balancers == 2 and second is not None:
            second.stopAll()


def _abuser(port, seconds, counter):
    """
    Ask the redirect listener as fast as possible from 127.0.0.9; never
    connect to the answer.
    """
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end and n < 2_000_000:
        try:
            s = socket.socket()
            s.bind(("127.0.0.9", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.connect(("127.0.0.1", port))
            s.recv(100)
            s.close()
            n += 1
        except OSError:
            pass
    counter.value = n


def redirect(workdir, seconds=6.0, honest=300):
    cluster = LocalCluster(workdir / "redirect")
    abusers = []
    try:
        rport = freePort()
        cluster.startBalancer(extra=[f"--redirect=tcp:{rport}:interface=127.0.0.1"])
        names = ["b1", "b2", "b3"]
        for n in names:
            cluster.startBackend(n, extra=["--capacity=100"])
        cluster.waitUp(names)
        counters = []
        for _ in range(2):
            c = multiprocessing.Value("l", 0)
            p = multiprocessing.Process(target=_abuser, args=(rport, seconds, c))
            p.start()
            abusers.append(p)
            counters.append(c)
        time.sleep(1.0)  # the abuse is under way
        ok = refused = other = 0
        held = []
        end = time.monotonic() + seconds / 2
        asked = 0
        while asked < honest and time.monotonic() < end:
            asked += 1
            try:
                with socket.create_connection(("127.0.0.1", rport), timeout=5) as s:
                    line = s.recv(200)
            except OSError:
                other += 1
                continue
            if line.startswith(b"ERROR"):
                refused += 1
                continue
            host, port = line.split()
            try:
                b = socket.create_connection((host.decode(), int(port)), timeout=5)
                b.sendall(b"hi")
                if b.recv(10) == b"hi":
                    ok += 1
                    held.append(b)
                    if len(held) > 50:  # held for a while, then released
                        held.pop(0).close()
                else:
                    other += 1
            except OSError:
                other += 1
        for b in held:
            b.close()
        # Proxied clients meanwhile: how many wait more than 0.3 s.
        slow = proxied = 0
        while proxied < 200 and any(p.is_alive() for p in abusers):
            proxied += 1
            start = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as c:
                    c.sendall(b"p")
                    c.recv(10)
            except OSError:
                pass
            if time.monotonic() - start > 0.3:
                slow += 1
        for p in abusers:
            p.join(seconds + 10)
        abusive = sum(c.value for c in counters)
        return {
            "honestAsked": asked,
            "honestServed": ok,
            "honestNoBackend": refused,
            "honestOther": other,
            "servedShare": ok / asked if asked else 0.0,
            "abusiveAsksPerSecond": abusive / seconds,
            "proxied": proxied,
            "proxiedSlow": slow,
        }
    finally:
        for p in abusers:
            if p.is_alive():
                p.kill()
        cluster.stopAll()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/burst.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="capacity,newcomer,redirect")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="burst-") as tmp:
        workdir = Path(tmp)
        for name in args.scenario.split(","):
            if name == "capacity":
                results[name] = r = capacity(workdir)
                print(
                    f"capacity 10/10/10, 45 clients at once: backends report "
                    f"{'/'.join(str(v) for v in r['reported'].values())}, "
                    f"{r['served']} served, {r['waiting']} waiting, "
                    f"{r['overCapacity']} over capacity",
                    flush=True,
                )
            elif name in ("newcomer", "newcomer2"):
                n = 2 if name == "newcomer2" else 1
                results[name] = r = newcomer(workdir, n)
                print(
                    f"newcomer ({n} balancer{'s' if n > 1 else ''}): burst of 200 drew "
                    + ", ".join(f"{k} {v}" for k, v in r["drewOf200"].items())
                    + f" (ideal: new 125, others 25 each); totals {r['after']}",
                    flush=True,
                )
            elif name == "redirect":
                results[name] = r = redirect(workdir)
                print(
                    f"redirect under abuse ({r['abusiveAsksPerSecond']:.0f} abusive asks/s): "
                    f"{r['honestServed']}/{r['honestAsked']} honest asks served "
                    f"({100 * r['servedShare']:.1f}%), {r['honestNoBackend']} got "
                    f"ERROR no-backend, {r['honestOther']} other failures; "
                    f"{r['proxiedSlow']} of {r['proxied']} proxied clients waited > 0.3 s",
                    flush=True,
                )
            else:
                p.error(f"unknown scenario {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
