"""
What routing one connection costs the balancer's pure core, as the number of
backends grows: Cluster.pick, then pool.connected and pool.release, per
policy, in microseconds of CPU (no sockets: the CPU the accept path spends
choosing; CPU time, not wall time, so other work on a busy machine does not
count; the best of 5 rounds, the one least disturbed), and whether each policy is within issue 15's 10 us at 10,000
backends.

    python bench/routing.py [--backends 1,10,100,1000] [--baseline DIR]

--baseline DIR measures the twistedcluster package in DIR the same way, in a
separate process, and prints the ratio (e.g. DIR made with
`git archive HEAD twistedcluster | tar -x -C DIR`).

Every policy the measured package names is measured (least-load, least-conn,
round-robin, and p2c and hash where they exist).  One routed connection
before the clock starts is not counted: the first pick builds the pool's
index by load, or the hash ring (once, O(backends): its time is printed
apart); what is timed is the steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The policies of a package that does not list them (all had these).
POLICIES = ("least-load", "least-conn", "round-robin")
# Every loop is bounded: each figure is the best of ROUNDS rounds, each of
# this many routed connections at most, and at most this many seconds.
ROUNDS = 5
MAX_PICKS = 4_000
MAX_SECONDS = 0.4
#: Issue 15's target: at most this many microseconds per routed connection
#: at 10,000 backends.
TARGET_US = 10.0
TARGET_BACKENDS = 10_000


def measure(counts) -> dict:
    """
    Microseconds per routed connection, by policy and backend count, for
    the twistedcluster importable here.
    """
    import inspect

    from twistedcluster.core.cluster import Cluster
    from twistedcluster.core.pool import Pool

    try:
        from twistedcluster.core.policies import POLICIES as named

        policies = [p for p in POLICIES if p in named] + sorted(p for p in named if p not in POLICIES)
    except ImportError:
        policies = list(POLICIES)
    ticketed = "ticket" in inspect.signature(Pool.release).parameters
    # hash routes on the client's address: a thousand clients in turn.
    clients = [f"10.0.{i // 256}.{i % 256}" for i in range(1000)]

    out = {}
    for policy in policies:
        for n in counts:
            cluster = Cluster(policy=policy)
            pool = cluster.pool
            for i in range(n):
                pool.register(f"backend-{i:05d}", "127.0.0.1", 9000 + i % 50000, capacity=10**9)
                pool.report(f"backend-{i:05d}", i % 7, (i % 7) / 100)
            keyed = getattr(cluster, "keyed", False)
            turn = [0]

            def route():
                if keyed:
                    turn[0] += 1
                    chosen = cluster.pick(key=clients[turn[0] % 1000])
                else:
                    chosen = cluster.pick()
                if ticketed:
                    pool.connected(chosen.name, chosen.ticket)
                    pool.release(chosen.name, chosen.ticket)
                else:  # a baseline from before connections had tickets
                    pool.connected(chosen.name)
                    pool.release(chosen.name)

            first = time.process_time()
            route()  # not counted: builds what the policy keeps
            out[f"first/{policy}/{n}"] = (time.process_time() - first) * 1e6
            best = float("inf")
            for _ in range(ROUNDS):
                picks = 0
                start = time.perf_counter()
                cpu = time.process_time()
                deadline = start + MAX_SECONDS
                while picks < MAX_PICKS and (picks % 64 or time.perf_counter() < deadline):
                    route()
                    picks += 1
                best = min(best, (time.process_time() - cpu) / picks * 1e6)
            out[f"{policy}/{n}"] = best
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/routing.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="1,10,100,1000", help="comma-separated backend counts")
    p.add_argument("--baseline", metavar="DIR", help="also measure the twistedcluster package in DIR")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.backends.split(",") if x.strip()]
    if not counts or min(counts) < 1 or max(counts) > 100_000:
        p.error("--backends: counts from 1 to 100000")
    if args.child:
        sys.path.insert(0, args.child)
        print(json.dumps(measure(counts)))
        return 0

    def run(code: Path) -> dict:
        env = dict(os.environ, PYTHONPATH=str(code))
        r = subprocess.run(
            [sys.executable, __file__, "--backends", args.backends, "--child", str(code)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        if r.returncode:
            raise SystemExit(f"measuring {code} failed:\n{r.stderr}")
        return json.loads(r.stdout)

    ours = run(ROOT)
    base = run(Path(args.baseline).resolve()) if args.baseline else None
    print(f"us of CPU per routed connection (pick + connected + release), code: {ROOT}")
    header = f"{'policy':<12}{'backends':>9}{'this code':>12}{'first pick':>12}"
    if base:
        header += f"{'baseline':>12}{'this/base':>11}"
    print(header)
    print("-" * len(header))
    printed = set()
    for policy in dict.fromkeys(list(ours) + list(base or ())):
        if policy.startswith("first/"):
            continue
        policy = policy.split("/")[0]
        if f"{policy}/{counts[0]}" not in ours:
            continue
        for n in counts:
            key = f"{policy}/{n}"
            if key in printed:
                continue
            printed.add(key)
            firstPick = ours.get(f"first/{key}")
            line = f"{policy:<12}{n:>9,}{ours[key]:>12.1f}"
            line += f"{firstPick / 1000:>10.1f}ms" if firstPick is not None else f"{'':>12}"
            if base and key not in base:
                print(line)
                continue
            if base:
                line += f"{base[key]:>12.1f}{ours[key] / base[key]:>10.2f}x"
            print(line)
    if TARGET_BACKENDS in counts:
        print(f"\nissue 15: at most {TARGET_US:g} us per routed connection at {TARGET_BACKENDS:,} backends")
        for key, us in ours.items():
            if key.endswith(f"/{TARGET_BACKENDS}") and not key.startswith("first/"):
                verdict = "PASS" if us <= TARGET_US else "FAIL"
                print(f"  {verdict}  {key.split('/')[0]}: {us:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
