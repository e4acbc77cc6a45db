"""
``cluster-local``: a balancer and a few echo backends on 127.0.0.1, as real
``twistd`` processes, until Ctrl-C (the README's first command).  The
processes are started and watched by L{twistedcluster.localcluster}.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Optional, Sequence, Union

from twistedcluster.localcluster import LocalCluster, echoOnce, portInUse


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="cluster-local",
        description="Run a balancer and echo backends on 127.0.0.1 until Ctrl-C.",
    )
    p.add_argument("--backends", type=int, default=3, help="how many backends (default 3)")
    p.add_argument("--port", type=int, default=8000, help="proxy port (default 8000)")
    p.add_argument("--redirect-port", type=int, default=8002, help="redirect port (default 8002)")
    p.add_argument("--control-port", type=int, default=8100, help="control port (default 8100)")
    p.add_argument("--admin-port", type=int, default=8101, help="admin port (default 8101)")
    p.add_argument(
        "--backend-port", type=int, default=9001, help="first backend port (default 9001)"
    )
    p.add_argument(
        "--logs", default="cluster-run",
        help="folder for its logs and secret, one run at a time (default ./cluster-run)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.backends <= 50:
        p.error("--backends must be 1..50")
    for option, port in (
        ("--port", args.port),
        ("--redirect-port", args.redirect_port),
        ("--control-port", args.control_port),
        ("--admin-port", args.admin_port),
        ("--backend-port", args.backend_port),
        ("--backend-port", args.backend_port + args.backends - 1),
    ):
        if not 1 <= port <= 65535:
            p.error(f"{option} {port}: a port from 1 to 65535 (the backends take one each from --backend-port)")

    # Fail before starting anything when a port is taken: a backend started
    # next to another balancer would register there, and stay there, down.
    wanted = [
        ("--port", args.port),
        ("--redirect-port", args.redirect_port),
        ("--control-port", args.control_port),
        ("--admin-port", args.admin_port),
    ] + [("--backend-port", args.backend_port + i) for i in range(args.backends)]
    for option, port in wanted:
        if portInUse("127.0.0.1", port):
            print(
                f"cluster-local: port {port} on 127.0.0.1 is in use (another "
                f"cluster-local or balancer?); stop it, or choose another with {option}",
                file=sys.stderr,
            )
            return 1
    held = holdFolder(Path(args.logs))
    if isinstance(held, int):
        print(
            f"cluster-local: {args.logs}/ is in use by another cluster-local "
            f"(pid {held or 'unknown'}): its secret and logs are there; stop it, "
            "or choose another folder with --logs",
            file=sys.stderr,
        )
        return 1
    cluster = LocalCluster(Path(args.logs))
    cluster.ownSessions = True
    secret = cluster.useSecret()
    stopping = []

    def onSignal(signum, frame):
        stopping.append(signum)

    # Ctrl-C, a kill, or the terminal going away: everything stops, in
    # order (the processes are in sessions of their own: nothing else
    # stops them).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, onSignal)
    names = [f"backend-{i + 1}" for i in range(args.backends)]
    try:
        print(f"starting the balancer (logs in {cluster.workdir}/) ...", flush=True)
        cluster.startBalancer(
            args.port,
            args.control_port,
            args.admin_port,
            extra=[f"--redirect=tcp:{args.redirect_port}:interface=127.0.0.1"],
        )
        # Only our own balancer gets our backends (someone may have taken a
        # port since the check above).
        cluster.checkOwnBalancer(ports=[args.redirect_port])
        for i, name in enumerate(names):
            cluster.startBackend(name, args.backend_port + i)
        cluster.waitUp(names, timeout=30)
        # Prove it serves: a few echoes through the proxy.
        for i in range(3 * args.backends):
            payload = f"hello {i}\n".encode()
            if echoOnce("127.0.0.1", args.port, payload) != payload:
                raise RuntimeError("self-check failed: an echo came back wrong")
    except Exception as e:
        # Whatever went wrong, nothing started is left running.
        print(f"cluster-local: {e}", file=sys.stderr)
        print("(is a port in use? see --help for the port options)", file=sys.stderr)
        cluster.stopAll()
        return 1
    status = cluster.status()
    admin = "cluster-admin"
    bindir = Path(sys.executable).parent
    connect = "cluster-connect"
    if (bindir / "cluster-admin").exists():
        admin = str(bindir / admin)
        connect = str(bindir / connect)
    admin += f" --secret-file {secret}"
    if args.admin_port != 8101:
        admin += f" --admin tcp:host=127.0.0.1:port={args.admin_port}"
    print(
        f"""
twistedcluster is running: 1 balancer, {args.backends} echo backends, all on 127.0.0.1.
  {len(status)} backends up; a self-check sent {3 * args.backends} echoes through the proxy.

  proxy   (echo through the balancer):  127.0.0.1:{args.port}
      try:  {connect} --direct 127.0.0.1:{args.port}    (type a line, it comes back)
  redirect (ask which backend to use):  127.0.0.1:{args.redirect_port}
      try:  {connect} --print 127.0.0.1:{args.redirect_port}
            {connect} 127.0.0.1:{args.redirect_port}    (then talk to that backend)
  watch:    {admin} status
            {admin} drain backend-1    (then: enable backend-1)
  logs:     {cluster.workdir}/
  secret:   {secret}  (a new one each run; balancer, backends and
            cluster-admin need it: --secret-file)

Ctrl-C stops everything (backends drain first).""",
        flush=True,
    )
    try:
        while not stopping:
            for proc in cluster.processes.values():
                if not proc.alive():
                    print(f"cluster-local: {proc.name} exited (status {proc.popen.returncode}); see {proc.logPath}", file=sys.stderr)
                    stopping.append(proc.name)
                    break
            time.sleep(0.5)
    finally:
        print("\nstopping ...", flush=True)
        cluster.stopAll()
        print("stopped.", flush=True)
    return 0


#: In the log folder while a cluster-local runs from it: its pid, locked.
LOCK_NAME = "cluster-local.pid"


def holdFolder(folder: Path) -> Union[IO[str], int]:
    """
    Lock C{folder} for this run: the open lock file, held until this
    process exits (the kernel lets go of it however it ends), or the pid of
    the cluster-local that holds it already (0 if it wrote none).  Two runs
    in one folder would share the secret file, so the second would lock the
    first out of its own cluster (cluster-admin reads the new secret), and
    interleave their logs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        text = lock.read().strip()
        lock.close()
        return int(text) if text.isdigit() else 0
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


if __name__ == "__main__":
    sys.exit(main())
