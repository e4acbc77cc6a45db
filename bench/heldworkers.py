"""
With ``--workers``, one process's open-file limit is no longer the cluster's:
hold 2 x 9,000 idle connections through a balancer with two workers.

    PYTHONPATH=. python bench/heldworkers.py [--held 18000] [--workers 2]

Each held connection costs a worker two descriptors (client and backend),
so one process under a 20,000 open-file limit holds at most about 9,500.
Two load-generator processes open the connections (each proven by one
echo), from 127.0.0.2-9, to two echo backends; while they are all open the
script prints, for each worker, its open files and RSS, and what the main
process's pool counts (``active`` summed over the workers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--held", type=int, default=18000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    from loadgen import LoadGenerator
    from run import raiseFileLimit
    from servers import openFiles, rssKiB

    raiseFileLimit()
    lg = LoadGenerator(2)  # forked before any server starts
    from twistedcluster.localcluster import LocalCluster, waitFor

    from tests.test_e2e_workers import workerPids

    work = Path(tempfile.mkdtemp(prefix="heldworkers-"))
    cluster = LocalCluster(work)
    try:
        balancer = cluster.startBalancer(extra=[f"--workers={args.workers}", "--queue-size=0"])
        for name in ("echo-1", "echo-2"):
            cluster.startBackend(name, extra=["--capacity=20000", "--report-interval=1"])
        cluster.waitUp(["echo-1", "echo-2"])
        pids = waitFor(lambda: len(w := workerPids(balancer.pid)) == args.workers and w, 20, "workers")
        time.sleep(1.0)  # noqa: idle RSS settles after start-up
        before = {pid: rssKiB(pid) for pid in pids}
        sources = [f"127.0.0.{i}" for i in range(2, 10)]
        half = args.held // 2
        params = [
            {"addr": ("127.0.0.1", cluster.port), "connections": n, "cidBase": i * 100_000_000,
             "sources": sources, "concurrency": 32}
            for i, n in enumerate((half, args.held - half))
        ]
        seen = {}

        def whileHeld(infos):
            time.sleep(0.5)  # noqa: the workers' last messages reach the main pool
            seen["workers"] = {pid: (openFiles(pid), rssKiB(pid)) for pid in pids}
            status = cluster.quickStatus()
            seen["active"] = sum(b["active"] for b in status.values())
            seen["connections"] = {n: b["connections"] for n, b in status.items()}

        started = time.monotonic()
        infos, _ = lg.hold(params, whileHeld, timeout=max(120.0, args.held / 100))
        held = sum(i["held"] for i in infos)
        errors = sum(i["errors"] for i in infos)
        print(f"held {held:,} of {args.held:,} connections ({errors} failed) in {time.monotonic() - started:.0f} s")
        for pid, (fds, rss) in sorted(seen["workers"].items()):
            print(f"  worker pid {pid}: {fds:,} open files (~{fds // 2:,} connections held), "
                  f"RSS {before[pid]:,} -> {rss:,} KiB")
        print(f"  main pool: active {seen['active']:,} summed over the workers; backends report {seen['connections']}")
        return 0 if held == args.held and seen["active"] == held else 1
    finally:
        lg.close()
        cluster.stopAll()


if __name__ == "__main__":
    sys.exit(main())
