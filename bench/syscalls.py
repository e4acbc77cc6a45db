"""
System calls per proxied connection, the balancer against HAProxy: each
proxy in front of nginx (as in bench/run.py's nginx part), wrk opening new
connections (one request each, C{Connection: close}) while C{strace -c -f}
counts the proxy's system calls; the counts divided by wrk's requests.

    .venv/bin/python bench/syscalls.py [--targets balancer,haproxy] [--baseline DIR]

Needs nginx, wrk and strace (apt-get install nginx wrk strace).  strace
slows the proxy down many times over: the rates it prints mean nothing,
the calls per connection are what this is for.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(?P<calls>\d+)\s+(?:(?P<errors>\d+)\s+)?(?P<name>\w+)\s*$")


def parseStrace(text: str) -> dict:
    """
    C{strace -c}'s table: system call name -> (calls, errors).
    """
    counts = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group("name") != "total":
            counts[m.group("name")] = (int(m.group("calls")), int(m.group("errors") or 0))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/syscalls.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="balancer,haproxy", help="comma-separated, from balancer, haproxy, haproxy-splice, portforward, baseline")
    p.add_argument("--duration", type=int, default=3, help="seconds of wrk per target (default 3)")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--baseline", default=None, metavar="DIR", help="the twistedcluster package in DIR as target baseline")
    p.add_argument("--logs", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from nginx import HOST, SMALL, WRK_SCRIPT, NginxServers

    for tool in ("nginx", "wrk", "strace"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            print(f"bench/syscalls.py: {tool} is not installed", file=sys.stderr)
            return 2
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    workdir = Path(args.logs or tempfile.mkdtemp(prefix="twistedcluster-syscalls-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    script = workdir / "report.lua"
    script.write_text(WRK_SCRIPT)
    say = lambda t: print(t, file=sys.stderr, flush=True)
    servers = NginxServers(workdir, ["direct", *names], str(ROOT), 4096, say, baseline=args.baseline)
    results = {}
    try:
        targets = servers.start()
        for name in names:
            t = targets[name]
            out = workdir / f"strace-{name}.txt"
            strace = subprocess.Popen(
                ["strace", "-c", "-f", "-o", str(out), "-p", str(t.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached
            r = subprocess.run(
                ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "-s", str(script),
                 "-H", "Connection: close", f"http://{HOST}:{t.port}/{SMALL}"],
                capture_output=True, text=True, timeout=args.duration + 60,
            )
            strace.send_signal(signal.SIGINT)
            strace.wait(timeout=30)
            time.sleep(0.5)
            line = next(l for l in r.stdout.splitlines() if l.startswith("WRKJSON "))
            import json

            fig = json.loads(line[len("WRKJSON "):])
            counts = parseStrace(out.read_text())
            results[name] = (fig["requests"], counts)
    finally:
        servers.stop()
    print("system calls per new connection (one request, Connection: close), strace -c -f while wrk ran:")
    for name, (requests, counts) in results.items():
        total = sum(c for c, _ in counts.values())
        print(f"\n{name}: {requests:,} connections, {total / requests:.1f} system calls each")
        for call, (c, e) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
            if c / requests >= 0.05:
                err = f" ({e / requests:.2f} failed)" if e else ""
                print(f"  {c / requests:6.2f}  {call}{err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
