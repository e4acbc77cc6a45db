"""
A whole cluster on this machine — one balancer and backends as real
``twistd`` processes on loopback: L{LocalCluster} starts, watches and stops
them (plain subprocesses and sockets, every wait bounded).  It serves
``cluster-local`` (L{twistedcluster.cli.local}), the end-to-end tests and
the benchmarks.

``cluster-local`` gives its cluster a shared secret, a fresh one in its run
folder each time: even on loopback, any local user could otherwise register
a backend or drain one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

TWISTD = "from twisted.scripts.twistd import run; run()"


def twistdCommand(plugin: str, args: Sequence[str]) -> List[str]:
    """
    The command line of a foreground ``twistd`` running C{plugin}, logging to
    standard output, with no pid file.
    """
    return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", plugin, *args]


def adminCommand(admin: str, args: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", "twistedcluster.cli.admin", "--admin", admin, *args]


def _ephemeralRange() -> Tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handedOut: Set[int] = set()


def freePort(host: str = "127.0.0.1") -> int:
    """
    A TCP port that was free a moment ago, chosen outside the kernel's
    ephemeral range: a port the kernel picked (bind to 0) may be picked
    again as the source port of an outgoing connection before our process
    binds it, which then fails with "address already in use" (seen in CI
    once, after the listeners before it had opened).  Ports are not handed
    out twice by one process; random, so two test runs side by side rarely
    pick the same one, and checked free as Twisted binds (C{SO_REUSEADDR}).
    """
    low, high = _ephemeralRange()
    candidates = (10000, low) if low - 10000 >= 1000 else (high + 1, 65535)
    for _ in range(200):
        port = random.randrange(*candidates)
        if port in _handedOut or portInUse(host, port):
            continue
        _handedOut.add(port)
        return port
    # A machine whose ranges leave no room: the kernel's choice it is.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ProcessExited(RuntimeError):
    """
    A process we wait on has exited: no point waiting longer.
    """


class NotOurBalancer(ProcessExited):
    """
    Another process answers on our balancer's admin port (one that does not
    hold our secret): no point waiting longer.
    """


def portInUse(host: str, port: int) -> bool:
    """
    Whether a listener could not bind C{host}:C{port} now: another socket
    listens there.  Bound as Twisted binds (C{SO_REUSEADDR}), so ports left
    in TIME_WAIT by a process that just stopped count as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def waitFor(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.05,
):
    """
    Poll C{condition} until it returns something true, at most C{timeout}
    seconds; return that value, or raise C{TimeoutError} naming C{what}.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = condition()
        except ProcessExited:  # NotOurBalancer too
            raise
        except Exception as e:  # a poll that fails is a poll that says no
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class Process:
    """
    One ``twistd`` process we started, with its log file.
    """

    def __init__(
        self, name: str, argv: List[str], logPath: Path, env=None, cwd=None, session: bool = False
    ) -> None:
        self.name = name
        self.argv = argv
        self.logPath = logPath
        self._log = open(logPath, "ab")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            # Its own session: a terminal's Ctrl-C or hangup reaches only
            # the program that started it, which stops it in its turn.
            start_new_session=session,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        """
        SIGTERM (after SIGCONT: a stopped process would not act on it).
        """
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0, signalled: bool = False) -> Optional[int]:
        """
        L{terminate} (unless C{signalled} already), then SIGKILL if it has
        not exited within C{timeout}.
        """
        if self.alive():
            if not signalled:
                self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)

    def logText(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.logPath.read_text(errors="replace")


class LocalCluster:
    """
    Starts and stops a balancer and backends on loopback.

    @param workdir: where process logs go.
    @ivar secretFile: the shared secret every process started from now on
        is given, after L{useSecret}; C{None} for none.
    """

    secretFile: Optional[Path] = None
    #: Start each process in a session of its own (cluster-local: the
    #: terminal's signals reach it alone, and it stops them in order).
    ownSessions = False

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.processes: Dict[str, Process] = {}
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def useSecret(self) -> Path:
        """
        Write a fresh random secret to C{secret} in the work folder, readable
        by this user only, and give it to the balancer, the backends and
        cluster-admin started from now on.
        """
        import base64

        path = self.workdir / "secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # it may have existed with another mode
            os.write(fd, base64.b64encode(os.urandom(32)) + b"\n")
        finally:
            os.close(fd)
        self.secretFile = path
        return path

    def _secretArgs(self) -> List[str]:
        return [] if self.secretFile is None else [f"--secret-file={self.secretFile}"]

    # -- starting ----------------------------------------------------------

    def startBalancer(
        self,
        port: Optional[int] = None,
        controlPort: Optional[int] = None,
        adminPort: Optional[int] = None,
        extra: Sequence[str] = (),
        name: str = "balancer",
    ) -> Process:
        self.port = port or freePort(self.host)
        self.controlPort = controlPort or freePort(self.host)
        self.adminPort = adminPort or freePort(self.host)
        args = [
            f"--listen=tcp:{self.port}:interface={self.host}",
            f"--control=tcp:{self.controlPort}:interface={self.host}",
            f"--admin=tcp:{self.adminPort}:interface={self.host}",
            *self._secretArgs(),
            *extra,
        ]
        proc = self._start(name, twistdCommand("cluster-balancer", args))
        waitFor(
            lambda: self._check(proc) and self._connectable(self.adminPort),
            20,
            f"{name} to listen",
        )
        return proc

    @property
    def admin(self) -> str:
        return f"tcp:host={self.host}:port={self.adminPort}"

    def startBackend(
        self,
        name: str,
        port: Optional[int] = None,
        extra: Sequence[str] = (),
        balancers: Optional[Sequence[str]] = None,
    ) -> Process:
        """
        Start a backend reporting to this cluster's balancer, or to the
        given C{balancers} (client endpoint strings) instead.
        """
        port = port or freePort(self.host)
        if balancers is None:
            balancers = [f"tcp:host={self.host}:port={self.controlPort}"]
        args = [
            f"--name={name}",
            f"--listen=tcp:{port}:interface={self.host}",
            *[f"--balancer={b}" for b in balancers],
            *self._secretArgs(),
            *extra,
        ]
        proc = self._start(name, twistdCommand("cluster-backend", args))
        proc.port = port  # type: ignore[attr-defined]
        return proc

    def _start(self, name: str, argv: List[str]) -> Process:
        if name in self.processes and self.processes[name].alive():
            raise ValueError(f"{name} is already running")
        proc = Process(name, argv, self.workdir / f"{name}.log", env=self.env, session=self.ownSessions)
        self.processes[name] = proc
        return proc

    def _check(self, proc: Process) -> bool:
        if not proc.alive():
            raise ProcessExited(
                f"{proc.name} exited with status {proc.popen.returncode}:\n"
                + proc.logText()[-3000:]
            )
        return True

    def checkOwnBalancer(
        self, name: str = "balancer", timeout: float = 20, ports: Sequence[int] = ()
    ) -> None:
        """
        Wait until the admin listener at L{adminPort} answers with our secret
        (so it is our balancer, not another one holding the port), the
        other C{ports} it listens on (those opened after the admin one: a
        redirect listener) accept, and our balancer process is still
        running; raise L{NotOurBalancer} or L{ProcessExited} at once
        otherwise.  Needs L{useSecret}: without a secret any balancer would
        answer.
        """
        if self.secretFile is None:
            raise ValueError("checkOwnBalancer needs a secret (useSecret)")
        proc = self.processes[name]

        def answers() -> bool:
            self._check(proc)
            r = self.adminRun("status", check=False)
            if r.returncode == 4:  # EXIT_AUTH: another balancer, another secret
                raise NotOurBalancer(
                    f"the admin port {self.host}:{self.adminPort} is another "
                    f"balancer's (it does not hold our secret): {r.stderr.strip()}"
                )
            return r.returncode == 0

        waitFor(answers, timeout, f"{name} to answer on its admin port", interval=0.2)
        waitFor(
            lambda: self._check(proc) and all(self._connectable(p) for p in ports),
            timeout,
            f"{name} to listen on {', '.join(map(str, ports))}",
        )

    def _connectable(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=1):
                return True
        except OSError:
            return False

    # -- watching ----------------------------------------------------------

    def adminRun(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            adminCommand(self.admin, [*self._secretArgs(), *args]),
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"cluster-admin {' '.join(args)} failed ({result.returncode}): {result.stderr}"
            )
        return result

    def status(self) -> Dict[str, dict]:
        """
        ``cluster-admin status --json``, by backend name.
        """
        out = self.adminRun("status", "--json").stdout
        return {b["name"]: b for b in json.loads(out)}

    def quickStatus(self, timeout: float = 5.0) -> Dict[str, dict]:
        """
        The same as L{status}, asked in-process over a plain socket (no new
        process): for measuring how fast the balancer notices something.
        Only for a balancer without a secret (no L{useSecret}).
        """
        from twisted.protocols import amp

        from twistedcluster.wire import commands

        with socket.create_connection((self.host, self.adminPort), timeout=timeout) as s:
            s.sendall(amp.AmpBox(_ask=b"1", _command=b"ListBackends").serialize())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the balancer closed the admin connection")
                data += chunk
                # A whole box ends with an empty key: two zero bytes where a
                # key length would be.  Parse once that may be the case.
                if data.endswith(b"\x00\x00"):
                    try:
                        [box] = amp.parseString(data)
                        break
                    except Exception:
                        continue
        if b"_error" in box:
            raise RuntimeError(box[b"_error_description"].decode())
        answer = commands.ListBackends.parseResponse(box, None)
        return {b["name"]: b for b in answer["backends"]}

    def waitForStatus(
        self, predicate: Callable[[Dict[str, dict]], bool], timeout: float, what: str
    ) -> Dict[str, dict]:
        def poll():
            balancer = self.processes.get("balancer")
            if balancer is not None:
                self._check(balancer)  # a balancer that exited will not answer
            s = self.status()
            return s if predicate(s) else None

        return waitFor(poll, timeout, what, interval=0.1)

    def waitUp(self, names: Sequence[str], timeout: float = 20) -> Dict[str, dict]:
        for n in names:
            if n in self.processes:
                self._check(self.processes[n])
        return self.waitForStatus(
            lambda s: all(n in s and s[n]["state"] == "up" for n in names),
            timeout,
            f"backends {', '.join(names)} up",
        )

    # -- stopping ----------------------------------------------------------

    def stopAll(self, timeout: float = 10.0) -> None:
        """
        Stop the backends, all at once, then the balancers: the backends
        drain while the balancer still answers; each group has C{timeout}
        seconds before what is left is killed.
        """
        backends = [p for n, p in self.processes.items() if not n.startswith("balancer")]
        balancers = [p for n, p in self.processes.items() if n.startswith("balancer")]
        for group in (backends, balancers):
            for proc in group:
                proc.terminate()
            deadline = time.monotonic() + timeout
            for proc in group:
                proc.stop(max(0.0, deadline - time.monotonic()), signalled=True)


def echoOnce(host: str, port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """
    Connect, send C{payload}, shut down writing, read until the server closes.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)
