"""
Profile the balancer under load with py-spy: where its CPU goes on the data
path (persistent connections echoing) and on the accept path (new
connections, one exchange each).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_balancer.py [--duration 10] [--out DIR]

Starts one echo backend and the balancer on 127.0.0.1 (as bench/run.py
does), drives each load for --duration seconds while ``py-spy record``
samples the balancer, writes the collapsed stacks of each load to --out
(flamegraph.pl and speedscope read them), and prints the functions with the most samples: by
self time (the innermost Python frame) and by total time (anywhere on the
stack).  ``--process backend`` drives the load straight to the echo backend
and profiles that instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pySpy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def shortFrame(frame: str) -> str:
    """
    C{func (path/to/file.py:123)} -> C{func (file.py)}: one entry per
    function, not per line.
    """
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{m.group('func')} ({short})"


# Innermost Python frames whose own time is mostly one system call (py-spy
# charges a C call to the Python frame that made it).
SYSCALL_HINTS = {
    "untilConcludes (python/util.py)": "send() (called from Connection.writeSomeData)",
    "sendNow (twistedcluster/fast/fasttcp.py)": "send() (the relay writing at once)",
    "Dialled.__init__ (twistedcluster/fast/fasttcp.py)": "socket()",
    "Dialled.dial (twistedcluster/fast/fasttcp.py)": "connect(), twice when the kernel completes it at once",
    "LeanEPollReactor.doPoll (twistedcluster/fast/reactor.py)": "epoll_wait() and the loop around it",
    "Dialled._connectDone (twistedcluster/fast/fasttcp.py)": "connect() again, when the connect was not over at once",
    "Connection.doRead (internet/tcp.py)": "recv()",
    "EPollReactor.doPoll (internet/epollreactor.py)": "epoll_wait() and the loop around it",
    "EPollReactor._add (internet/epollreactor.py)": "epoll_ctl() when a transport starts writing or reading",
    "EPollReactor._remove (internet/epollreactor.py)": "epoll_ctl() when a transport stops writing or reading",
    "BaseClient.doConnect (internet/tcp.py)": "connect() and getsockopt()",
    "socket.accept (socket.py)": "accept()",
    "_SocketCloser._closeSocket (internet/tcp.py)": "close(), and shutdown() before it unless the relay turned that off",
    "socket._real_close (socket.py)": "close()",
    "Connection._closeWriteConnection (internet/tcp.py)": "shutdown(SHUT_WR)",
    "socket.__init__ (socket.py)": "socket()",
}


def summarise(collapsed: Path, top: int, seconds: float, rate: int, who: str = "balancer") -> str:
    selfCounts: collections.Counter = collections.Counter()
    totalCounts: collections.Counter = collections.Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [shortFrame(f) for f in stack.split(";")]
        # py-spy puts the process and thread first when asked; keep frames.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += n
        selfCounts[frames[-1]] += n
        for f in set(frames):
            totalCounts[f] += n
    expected = seconds * rate
    lines = [
        f"  {samples:,} samples of the {who}'s main thread at {rate}/s over "
        f"{seconds:g} s: busy (not waiting in epoll) about {samples / expected:.0%} of the time"
        if expected
        else f"  {samples:,} samples",
        "",
        f"  {'self %':>7}  {'samples':>8}  function (innermost Python frame)",
    ]
    for f, n in selfCounts.most_common(top):
        hint = SYSCALL_HINTS.get(f)
        lines.append(f"  {100 * n / samples:>6.1f}%  {n:>8,}  {f}" + (f"  <- mostly {hint}" if hint else ""))
    lines += ["", f"  {'total %':>7}  {'samples':>8}  function (anywhere on the stack; the reactor's outer frames left out)"]
    shown = 0
    for f, n in totalCounts.most_common():
        if n >= 0.97 * samples:
            continue
        lines.append(f"  {100 * n / samples:>6.1f}%  {n:>8,}  {f}")
        shown += 1
        if shown >= top:
            break
    ours = sorted(
        ((n, f) for f, n in totalCounts.items() if f.endswith("py)") and "twistedcluster/" in f),
        reverse=True,
    )
    lines += ["", "  twistedcluster's own functions (total %):"]
    for n, f in ours[:top]:
        lines.append(f"  {100 * n / samples:>6.1f}%  {n:>8,}  {f}")
    return "\n".join(lines)


LOADS = ("echo", "connect", "bulk")

SYSCALL_EVENTS = [
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_ctl",
    "syscalls:sys_enter_accept4",
    "syscalls:sys_enter_connect",
    "syscalls:sys_enter_socket",
    "syscalls:sys_enter_getsockopt",
    "syscalls:sys_enter_setsockopt",
    "syscalls:sys_enter_getsockname",
    "syscalls:sys_enter_getpeername",
    "syscalls:sys_enter_shutdown",
    "syscalls:sys_enter_close",
]


def _params(load, bench, benchRun, args):
    target = bench.targets[_TARGET[args.process]]
    addr = target.addr
    if load == "echo":
        return "echo", "req/s", bench.echoParams(target, args.connections)
    if load == "connect":
        shares = benchRun.split(args.inflight, args.workers)
        return "connect", "conn/s", [
            {"addr": addr, "concurrency": n, "size": 64, "cidBase": i * 100_000_000,
             "sources": bench.sources} if n else None
            for i, n in enumerate(shares)
        ]
    shares = benchRun.split(4, args.workers)
    return "bulk", "MB/s", [
        {"addr": addr, "connections": n, "chunk": benchRun.BULK_CHUNK, "window": benchRun.BULK_WINDOW, "cidBase": i,
         "sources": bench.sources} if n else None
        for i, n in enumerate(shares)
    ]


# The load goes through the balancer, or straight to the backend to profile it.
_TARGET = {"balancer": "balancer", "backend": "direct"}


def _finish(proc) -> str:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err.decode(errors="replace")


def _syscallText(perfOut: str, ops: float, perOp: str) -> str:
    counts = {}
    for line in perfOut.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and parts[0].strip().isdigit():
            name = parts[2].split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "all")
            counts[name] = int(parts[0])
    if not counts or not ops:
        return "  (perf counted no system calls)"
    total = counts.pop("all", None)
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{n} {c / ops:.2f}" for n, c in items if c)
    head = f"  system calls {perOp}: {total / ops:.2f} in all" if total else "  system calls"
    return f"{head} ({text}) [perf stat over the same window]"


def _perfReport(perf: str, data: Path, top: int) -> str:
    """
    The balancer's own symbols (kernel and C) with the most samples.
    """
    try:
        r = subprocess.run(
            [perf, "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
             "--stdio", "-g", "none", "--percent-limit", "0.5"],
            capture_output=True, text=True, timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "  (perf report took too long)"
    rows = [l for l in r.stdout.splitlines() if l.strip() and not l.startswith("#")]
    lines = [f"  perf record (user and kernel code, by symbol; {data}):"]
    lines += [f"  {l.strip()}" for l in rows[:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/profile_balancer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each load (default 10)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    p.add_argument("--connections", type=int, default=128, help="persistent connections for the echo load (default 128)")
    p.add_argument("--inflight", type=int, default=32, help="new connections in flight (default 32)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    p.add_argument("--loads", default="echo,connect,bulk", help="comma-separated: echo, connect, bulk (default all three)")
    p.add_argument("--no-perf", action="store_true", help="do not count system calls with perf stat (used when perf is installed)")
    p.add_argument("--kernel", action="store_true", help="also perf record the balancer and list its hottest C and kernel symbols")
    p.add_argument("--native", action="store_true", help="also sample C frames (py-spy --native: pauses the balancer for each sample, so slower)")
    p.add_argument("--out", default=None, help="folder for the collapsed stacks (default: a temporary folder)")
    p.add_argument("--process", choices=sorted(_TARGET), default="balancer", help="the process profiled: the balancer (load through it; default) or the echo backend (load straight to it)")
    p.add_argument("--installed", action="store_true", help="profile the installed twistedcluster, not this checkout")
    p.add_argument("--code", default=None, metavar="DIR", help="profile the twistedcluster package in DIR instead of this checkout")
    args = p.parse_args(argv)
    if not 1 <= args.duration <= 120:
        p.error("--duration must be 1..120")
    spy = pySpy()
    perf = None if args.no_perf else shutil.which("perf")
    codeRoot = Path(args.code).resolve() if args.code else ROOT
    if args.code and not (codeRoot / "twistedcluster" / "__init__.py").exists():
        p.error(f"--code {args.code}: no twistedcluster package there")
    useCheckout = not args.installed and (codeRoot / "twistedcluster" / "__init__.py").exists()
    if useCheckout:
        sys.path.insert(0, str(codeRoot))
    sys.path.insert(0, str(HERE))
    import run as benchRun
    from loadgen import LoadGenerator
    from servers import Servers, cpuTimes

    say = benchRun.Progress()
    benchRun.raiseFileLimit()
    out = Path(args.out or tempfile.mkdtemp(prefix="twistedcluster-profile-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # twistd (`python -c ...`) puts its working directory first on sys.path.
    os.chdir(out)
    benchArgs = benchRun.parseArgs(
        [
            "--targets", "direct,balancer",
            "--connections", str(args.connections),
            "--inflight", str(args.inflight),
            "--workers", str(args.workers),
            "--duration", str(args.duration),
            "--warmup", "1",
            "--held", "0",
        ]
    )
    bench = benchRun.Bench(benchArgs, say)
    bench.lg = LoadGenerator(args.workers)
    bench.servers = Servers(out / "logs", ["direct", "balancer"], str(codeRoot) if useCheckout else None, 1000, None, say)
    reports = []
    try:
        bench.targets = bench.servers.start()
        who = args.process
        pid = bench.targets[_TARGET[who]].pid
        say(f"{who} pid {pid}; profiles go to {out}/")
        for load in [l.strip() for l in args.loads.split(",") if l.strip()]:
            if load not in LOADS:
                p.error(f"unknown load {load!r}: choose from {', '.join(LOADS)}")
            kind, unit, params = _params(load, bench, benchRun, args)
            collapsed = out / f"{who}-{load}.txt"
            seen: dict = {}

            def window(start, end, collapsed=collapsed, seen=seen):
                # Sample only the measured window, after the warm-up.
                time.sleep(max(0.0, start - time.monotonic()))
                seconds = max(1, int(round(end - start)))
                seen["cpu0"] = cpuTimes(pid)
                seen["t0"] = time.monotonic()
                cmd = [spy, "record", "--pid", str(pid), "--rate", str(args.rate),
                       "--duration", str(seconds), "--format", "raw",
                       "--output", str(collapsed)]
                # --native needs to stop the process for each sample.
                cmd.append("--native" if args.native else "--nonblocking")
                seen["spy"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                if perf:
                    seen["perf"] = subprocess.Popen(
                        [perf, "stat", "-x,", "-e", ",".join(SYSCALL_EVENTS), "-p", str(pid),
                         "--", "sleep", str(seconds)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )
                if perf and args.kernel:
                    seen["record"] = subprocess.Popen(
                        [perf, "record", "-F", "499", "-g", "-p", str(pid), "-o",
                         str(out / f"perf-{load}.data"), "--", "sleep", str(seconds)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )
                seen["seconds"] = seconds
                time.sleep(max(0.0, end - time.monotonic()))
                seen["cpu1"] = cpuTimes(pid)
                seen["t1"] = time.monotonic()

            say(f"{load}: {args.duration:g} s of load on the {who}, py-spy sampling at {args.rate}/s"
                + (", perf counting its system calls" if perf else "") + " ...")
            results = bench.lg.run(kind, params, 1.0, args.duration, onWindow=window)
            spyErr = _finish(seen["spy"])
            perfOut = _finish(seen["perf"]) if "perf" in seen else ""
            if seen["spy"].returncode != 0 or not collapsed.exists():
                say(f"py-spy failed ({seen['spy'].returncode}): {spyErr[-1500:]}")
                continue
            count = sum(r["count"] for r in results)
            seconds = sum(r["seconds"] for r in results) / len(results)
            rate = count / seconds
            shown = rate / 1e6 if kind == "bulk" else rate
            wall = seen["t1"] - seen["t0"]
            user = (seen["cpu1"][0] - seen["cpu0"][0]) / wall
            system = (seen["cpu1"][1] - seen["cpu0"][1]) / wall
            perOp = "per MB" if kind == "bulk" else ("per connection" if kind == "connect" else "per echo")
            opsPerSecond = rate / 1e6 if kind == "bulk" else rate
            text = [
                f"{who} under the {load} load: {shown:,.{1 if kind == 'bulk' else 0}f} {unit} while sampled; "
                f"collapsed stacks in {collapsed}",
                f"  {who} CPU: {user:.0%} user (Python) + {system:.0%} system (kernel: system calls, "
                f"loopback TCP) of one core = {(user + system) / opsPerSecond * 1e6:.1f} us {perOp} "
                f"({user / opsPerSecond * 1e6:.1f} user + {system / opsPerSecond * 1e6:.1f} system)",
            ]
            if perfOut:
                text.append(_syscallText(perfOut, opsPerSecond * seen["seconds"], perOp))
            if "record" in seen:
                _finish(seen["record"])
                text.append(_perfReport(perf, out / f"perf-{load}.data", args.top))
            text.append(summarise(collapsed, args.top, seen["seconds"], args.rate, who))
            reports.append("\n".join(text))
    finally:
        bench.lg.close()
        bench.servers.stop()
    print()
    print("\n\n".join(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
