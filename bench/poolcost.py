"""
What the pool's own work costs per proxied connection, apart from any
socket: the pick, the connect accounted and the release, on the real
L{twistedcluster.core.cluster.Cluster} (issue 16, item 2).

    python bench/poolcost.py [--connections 200000] [--rounds 3]

Added to reactor-relay's CPU per new connection (bench/run.py
--reactor-relay), it gives the least a least-load balancer on Twisted's
reactor could cost: a relay of its own plus this accounting, which every
routed connection needs.  CPU is this process's (C{time.process_time}),
so another process on the machine slows it only through shared caches;
the best round is printed.
"""

from __future__ import annotations

import argparse
import time

from twistedcluster.core.cluster import Cluster


def perConnection(connections: int, backends: int, policy: str) -> float:
    """
    Microseconds of CPU per connection routed, connected and released.
    """
    cluster = Cluster(policy=policy)
    for i in range(backends):
        cluster.pool.register(f"b{i}", "127.0.0.1", 20000 + i, capacity=1 << 30, static=True)
    pool = cluster.pool
    start = time.process_time()
    for _ in range(connections):
        route = cluster.pick()
        pool.connected(route.name, route.ticket, served=True)
        pool.release(route.name, route.ticket)
    spent = time.process_time() - start
    if pool.get(route.name).active != 0:
        raise SystemExit("the pool kept a released connection: the figure means nothing")
    return spent / connections * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/poolcost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=200_000, help="connections per round (default 200,000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the best is printed (default 3)")
    p.add_argument("--backends", default="1,8,100", help="comma-separated backend counts (default 1,8,100)")
    p.add_argument("--policy", default="least-load", help="routing policy (default least-load)")
    args = p.parse_args(argv)
    print(f"pool work per connection (pick, connected, release), policy {args.policy}, best of {args.rounds}:")
    for backends in [int(b) for b in args.backends.split(",")]:
        best = min(perConnection(args.connections, backends, args.policy) for _ in range(args.rounds))
        print(f"  {backends:>5} backend(s): {best:6.2f} us CPU per connection")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
