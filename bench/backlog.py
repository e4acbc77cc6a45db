"""
Bursts and floods against a real balancer, from outside (issue 13, items 2
and 7): real ``twistd`` processes on 127.0.0.1, every loop bounded in count
and time, every process stopped at the end.

- ``burst``: N connects at once to the proxy listener, each then sends one
  line; counts the clients whose line came back within the deadline.
- ``sequential``: N connects one after another; counts those that took
  longer than 0.5 s (a SYN retransmit takes 1 s).
- ``flood``: the balancer started with a small open-file limit; N idle
  clients hold proxy connections; then an admin ``status`` and a new
  backend's registration are tried, and the balancer's log lines about
  accept errors are counted.

Usage::

    PYTHONPATH=. python bench/backlog.py burst --count 2000
    PYTHONPATH=. python bench/backlog.py sequential --count 500
    PYTHONPATH=. python bench/backlog.py flood --count 1500 --nofile 1024
"""

from __future__ import annotations

import argparse
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twistedcluster.localcluster import LocalCluster, waitFor

BACKENDS = ["backend-1", "backend-2", "backend-3"]


def startCluster(workdir: Path, balancerArgs=(), nofile=None) -> LocalCluster:
    cluster = LocalCluster(workdir)
    if nofile is not None:
        # Start the balancer under a smaller open-file limit.
        original = cluster._start

        def limited(name, argv):
            if name == "balancer":
                argv = ["prlimit", f"--nofile={nofile}", "--", *argv]
            return original(name, argv)

        cluster._start = limited  # type: ignore[method-assign]
    cluster.startBalancer(extra=list(balancerArgs))
    for name in BACKENDS:
        cluster.startBackend(name, extra=["--report-interval=0.2", "--capacity=100000"])
    cluster.waitUp(BACKENDS)
    return cluster


def burst(port: int, count: int, deadline: float) -> dict:
    """
    C{count} non-blocking connects at once; each client sends one line once
    connected and waits for it back; at most C{deadline} seconds in all.
    """
    sel = selectors.DefaultSelector()
    socks = []
    start = time.monotonic()
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE, [i, b"", "connecting"])
    connected = echoed = failed = 0
    slow = 0
    end = start + deadline
    try:
        while echoed + failed < count:
            left = end - time.monotonic()
            if left <= 0:
                break
            for key, events in sel.select(min(left, 0.5)):
                s, data = key.fileobj, key.data
                i, got, state = data
                line = b"client %d\n" % i
                if state == "connecting":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        failed += 1
                        sel.unregister(s)
                        continue
                    connected += 1
                    s.send(line)
                    sel.modify(s, selectors.EVENT_READ, [i, b"", "reading"])
                else:
                    try:
                        chunk = s.recv(4096)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        failed += 1
                        sel.unregister(s)
                        continue
                    got += chunk
                    data[1] = got
                    if got == line:
                        echoed += 1
                        if time.monotonic() - start > 0.9:
                            slow += 1
                        sel.unregister(s)
    finally:
        for s in socks:
            s.close()
        sel.close()
    return {
        "count": count,
        "connected (client side)": connected,
        "echoed": echoed,
        "closed or refused": failed,
        "never answered": count - echoed - failed,
        "echoed after 0.9 s": slow,
        "seconds": round(time.monotonic() - start, 2),
    }


def redirectBurst(port: int, count: int, deadline: float) -> dict:
    """
    C{count} connects at once to the redirect listener; counts the clients
    that got their answer line within C{deadline} seconds (the C{cluster:}
    endpoint's default timeout is 5 s).
    """
    sel = selectors.DefaultSelector()
    socks = []
    start = time.monotonic()
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, [b""])
    answered = closed = 0
    try:
        while answered + closed < count:
            left = start + deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.5)):
                try:
                    chunk = key.fileobj.recv(100)
                except OSError:
                    chunk = b""
                key.data[0] += chunk
                if key.data[0].endswith(b"\r\n") or not chunk:
                    if key.data[0].endswith(b"\r\n") and not key.data[0].startswith(b"ERROR"):
                        answered += 1
                    else:
                        closed += 1
                    sel.unregister(key.fileobj)
    finally:
        for s in socks:
            s.close()
        sel.close()
    return {"count": count, "answered": answered, "closed or ERROR": closed,
            "no answer in time": count - answered - closed}


def sequential(port: int, count: int) -> dict:
    slow = []
    for i in range(count):
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            took = time.monotonic() - t0
            s.sendall(b"x\n")
            s.recv(16)
        if took > 0.5:
            slow.append(round(took, 2))
    return {"count": count, "connects over 0.5 s": len(slow), "their seconds": slow[:20]}


def flood(cluster: LocalCluster, count: int, deadline: float) -> dict:
    """
    Hold C{count} idle proxy connections, then try the admin channel and a
    new backend's registration while they are held.
    """
    socks = []
    start = time.monotonic()
    for i in range(count):
        if time.monotonic() - start > deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", cluster.port))
        socks.append(s)
        if i % 50 == 49:
            time.sleep(0.05)  # paced: so that a small backlog does not drop them
    result = {"idle clients": len(socks)}
    pid = cluster.processes["balancer"].pid
    fds = Path(f"/proc/{pid}/fd")

    def settled(last=[-1]):
        n = len(list(fds.iterdir()))
        done, last[0] = n == last[0], n
        return done

    try:
        waitFor(settled, deadline, "the balancer's descriptors to settle", interval=0.5)
        result["balancer fds"] = len(list(fds.iterdir()))
        try:
            cluster.quickStatus(timeout=3)
            result["admin status while flooded"] = "answered"
        except Exception as e:
            result["admin status while flooded"] = f"failed: {type(e).__name__}: {e}"
        cluster.startBackend("backend-4", extra=["--report-interval=0.2"])
        try:
            waitFor(lambda: "backend-4" in cluster.quickStatus(timeout=2), 8, "backend-4")
            result["new backend registered while flooded"] = "yes"
        except Exception as e:
            result["new backend registered while flooded"] = f"no ({type(e).__name__})"
    finally:
        for s in socks:
            s.close()
    text = cluster.processes["balancer"].logText()
    lines = text.splitlines()
    result["balancer log lines"] = len(lines)
    result["log lines naming EMFILE or accept"] = sum(
        ("EMFILE" in line or "accept" in line.lower()) for line in lines
    )
    import collections
    import re

    kinds = collections.Counter(
        re.sub(r"\d+", "N", line.split("] ", 1)[-1])[:70] for line in lines
    )
    result["most frequent lines"] = kinds.most_common(6)
    result["sample"] = [l for l in lines if "EMFILE" in l or "accept" in l.lower()][:4]
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["burst", "redirect", "sequential", "flood"])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--deadline", type=float, default=10.0)
    p.add_argument("--nofile", type=int, default=1024)
    p.add_argument("--balancer-arg", action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        balancerArgs = list(args.balancer_arg)
        if args.what == "redirect":
            from twistedcluster.localcluster import freePort

            redirectPort = freePort()
            balancerArgs.append(f"--redirect=tcp:{redirectPort}:interface=127.0.0.1")
        cluster = startCluster(
            Path(d), balancerArgs, args.nofile if args.what == "flood" else None
        )
        try:
            if args.what == "burst":
                print(burst(cluster.port, args.count, args.deadline))
            elif args.what == "redirect":
                print(redirectBurst(redirectPort, args.count, args.deadline))
            elif args.what == "sequential":
                print(sequential(cluster.port, args.count))
            else:
                print(flood(cluster, args.count, args.deadline))
            bal = cluster.processes["balancer"]
            out = subprocess.run(
                ["ss", "-ltnH", f"sport = :{cluster.port}"], capture_output=True, text=True
            ).stdout.split()
            print({"proxy listener Send-Q (backlog)": out[2] if len(out) > 2 else "?"})
            print({"balancer alive": bal.alive()})
        finally:
            cluster.stopAll()
    return 0


if __name__ == "__main__":
    sys.exit(main())
