"""
The container image, run for real: built on a Python base made from Debian
packages (deploy/docker/build-base-image.sh: no container registry needed),
one balancer and two backends as containers on the host's network
(loopback), an echo through the balancer, then ``docker stop`` of one
backend while clients keep connecting -- and not one of them may fail.

That test (marked ``docker``) is opt-in, and skipped with its reason
otherwise: set TWISTEDCLUSTER_DOCKER=1 (deploy/README.md says why it is not
part of .ci/run).  It then needs a Docker engine that answers
(``docker info``) and, unless
TWISTEDCLUSTER_DOCKER_BASE names a base image to use instead (say
``python:3.11-slim`` where a registry is reachable), root and debootstrap
to make the base once (kept as ``twistedcluster-base:bookworm``, reused by
later runs).  The figures (build times, start to first echo, clients
during the stop) are printed: run with ``-s`` to see them.  The other tests
here check, without an engine, what that one depends on.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.test_deploy import DOCKER, DOCKERFILE, ROOT, ignored, loadCompose
from twistedcluster.localcluster import freePort, waitFor

OPT_IN = "TWISTEDCLUSTER_DOCKER"
BASE_TAG = "twistedcluster-base:bookworm"
IMAGE_TAG = "twistedcluster:docker-test"
SECRET_IN_CONTAINER = "/run/secrets/cluster_secret"
BACKEND_DRAIN = 10  # --drain-timeout of the backends, seconds
# What every container gets, as compose.yaml gives it.
CONFINED = [
    "--network=host",
    "--read-only",
    "--tmpfs=/tmp",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]


def figure(text: str) -> None:
    print(f"[docker figures] {text}", flush=True)


def run(argv: List[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def docker() -> str:
    """
    The docker client, once an engine answers it; skip (saying why) when
    the test was not asked for or no engine runs.
    """
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(
            f"opt-in: {OPT_IN}=1 builds the image and runs it in containers "
            "(1 to 3 minutes the first time; see deploy/README.md)"
        )
    client = shutil.which("docker")
    if client is None:
        pytest.skip("no docker client (Debian: apt-get install docker.io)")
    try:
        r = run([client, "info", "--format", "{{.ServerVersion}} {{.Driver}}"], 30)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine answers: docker info timed out after 30 s")
    if r.returncode != 0 or not r.stdout.strip():
        said = (r.stderr.strip() or r.stdout.strip()).splitlines()
        pytest.skip(f"no Docker engine answers: {said[-1] if said else r.returncode}")
    figure(f"engine: Docker {r.stdout.strip()} (server version, storage driver)")
    return client


def baseImage(docker: str) -> str:
    """
    The image the Dockerfile builds on: TWISTEDCLUSTER_DOCKER_BASE, or the
    one build-base-image.sh makes from Debian packages (once; it keeps it).
    """
    given = os.environ.get("TWISTEDCLUSTER_DOCKER_BASE")
    if given:
        return given
    started = time.monotonic()
    r = run([str(DOCKER / "build-base-image.sh"), BASE_TAG], 900,
            env={**os.environ, "DOCKER": docker})
    if r.returncode == 2:  # a missing prerequisite: root, debootstrap
        pytest.skip(f"cannot make the base image: {r.stderr.strip()}")
    assert r.returncode == 0, f"build-base-image.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if "exists" in r.stdout:
        figure(f"base image {BASE_TAG}: kept from an earlier run")
    else:
        figure(f"base image {BASE_TAG} (debootstrap + docker import): "
               f"{time.monotonic() - started:.1f} s")
    return BASE_TAG


def buildContext() -> bytes:
    """
    The build context as BuildKit would send it: the repository minus what
    Dockerfile.dockerignore leaves out, plus the Dockerfile itself -- as a
    tar, so that the legacy builder (which reads only a .dockerignore at
    the root) sends no more than that either (a checkout may hold .venv).
    """
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [s.strip() for s in lines if s.strip() and not s.startswith("#")]

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = int(info.mtime)
        return info

    out = io.BytesIO()
    # ustar: the docker client takes stdin for a tar only if its first 512
    # bytes are a whole tar header (a pax header's records follow it).
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(ROOT.rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not ignored(rel, patterns):
                tar.add(path, rel, recursive=False, filter=plain)
        tar.add(DOCKERFILE, DOCKERFILE.relative_to(ROOT).as_posix(), filter=plain)
    return out.getvalue()


def pipIndexArgs() -> List[str]:
    """
    --build-arg PIP_INDEX_URL=... when this machine's pip uses another index
    than PyPI (environment or pip config), so that pip in the build does too.
    """
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        r = run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], 60)
        url = r.stdout.strip() if r.returncode == 0 else ""
    if url.startswith(("http://", "https://")):
        return ["--build-arg", f"PIP_INDEX_URL={url}"]
    return []


@pytest.fixture(scope="module")
def image(docker: str) -> str:
    base = baseImage(docker)
    context = buildContext()
    started = time.monotonic()
    r = subprocess.run(
        [docker, "build", "--network=host", "--build-arg", f"PYTHON_IMAGE={base}",
         *pipIndexArgs(), "-f", DOCKERFILE.relative_to(ROOT).as_posix(),
         "-t", IMAGE_TAG, "-"],
        input=context, capture_output=True, timeout=900,
    )
    output = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, f"docker build failed:\n{output[-5000:]}"
    figure(f"image {IMAGE_TAG} on {base} (context {len(context) // 1024} KiB): "
           f"{time.monotonic() - started:.1f} s")
    return IMAGE_TAG


class Containers:
    """
    The containers one test started: logs kept, all removed at the end.
    """

    def __init__(self, docker: str, image: str, secret: Path) -> None:
        self.docker = docker
        self.image = image
        self.secret = secret
        self.prefix = f"twistedcluster-test-{uuid.uuid4().hex[:8]}"
        self.names: List[str] = []

    def start(self, role: str, args: List[str]) -> str:
        name = f"{self.prefix}-{role}"
        r = run([self.docker, "run", "--detach", f"--name={name}", *CONFINED,
                 f"--volume={self.secret}:{SECRET_IN_CONTAINER}:ro",
                 self.image, *args], 60)
        assert r.returncode == 0, f"docker run {role} failed: {r.stderr}"
        self.names.append(name)
        return name

    def running(self, name: str) -> bool:
        r = run([self.docker, "inspect", "--format", "{{.State.Running}}", name], 30)
        return r.stdout.strip() == "true"

    def exitCode(self, name: str) -> int:
        r = run([self.docker, "inspect", "--format", "{{.State.ExitCode}}", name], 30)
        return int(r.stdout.strip())

    def logs(self, name: str) -> str:
        r = run([self.docker, "logs", name], 30)
        return r.stdout + r.stderr

    def admin(self, balancer: str, adminPort: int, *args: str) -> subprocess.CompletedProcess:
        return run([self.docker, "exec", balancer, "cluster-admin",
                    f"--admin=tcp:host=127.0.0.1:port={adminPort}",
                    f"--secret-file={SECRET_IN_CONTAINER}", *args], 30)

    def removeAll(self) -> None:
        if self.names:
            run([self.docker, "rm", "--force", *self.names], 60)


def containerSecret(folder: Path) -> Path:
    """
    A secret file the image's user (10001) may read, only it: as compose
    hands it over (owner 10001, mode 0400).  Not root: readable by all (the
    balancer then warns), since we cannot give it away.
    """
    path = folder / "secret"
    path.write_bytes(os.urandom(32).hex().encode() + b"\n")
    try:
        os.chown(path, 10001, 10001)
        os.chmod(path, 0o400)
    except PermissionError:
        os.chmod(path, 0o444)
    return path


def echo(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = s.recv(65536)
            if not data:
                break
            got += data
    return got


class Clients:
    """
    C{n} threads, each connecting through the balancer again and again:
    per connection, three round trips of a payload of its own 10 ms apart,
    then close; every C{longEvery}th thread holds its connections for 20
    round trips 100 ms apart (2 s, so a backend stopped meanwhile has
    connections to drain).  A refused connect, a reset, a timeout, a short
    or wrong echo: a failure.
    """

    def __init__(self, port: int, n: int, longEvery: int = 4) -> None:
        self.port = port
        self.longEvery = longEvery
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.done: List[tuple] = []  # (started, ended, ok, what, long)
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                        for i in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(15)

    def _loop(self, i: int) -> None:
        long = i % self.longEvery == 0
        rounds, pause = (20, 0.1) if long else (3, 0.01)
        k = 0
        while not self.stopping.is_set():
            k += 1
            started = time.monotonic()
            ok, what = True, ""
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    for j in range(rounds):
                        payload = f"client {i} connection {k} round {j} ".encode() * 4
                        s.sendall(payload)
                        got = b""
                        while len(got) < len(payload):
                            data = s.recv(65536)
                            if not data:
                                raise ConnectionError(f"closed after {len(got)} bytes")
                            got += data
                        if got != payload:
                            raise ValueError(f"echoed {got[:60]!r}")
                        time.sleep(pause)
            except Exception as e:
                ok, what = False, repr(e)
            with self.lock:
                self.done.append((started, time.monotonic(), ok, what, long))

    def between(self, start: float, end: float) -> List[tuple]:
        """
        The connections that were open at some moment in [start, end].
        """
        with self.lock:
            return [c for c in self.done if c[0] <= end and c[1] >= start]

    def failures(self) -> List[tuple]:
        with self.lock:
            return [c for c in self.done if not c[2]]


def test_base_image_script_is_sound_shell():
    script = DOCKER / "build-base-image.sh"
    assert os.access(script, os.X_OK), "build-base-image.sh must be executable"
    r = run(["sh", "-n", str(script)], 30)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "--variant=minbase" in text and "--include=python3,python3-venv,ca-certificates" in text


def test_dockerfile_builds_without_a_registry():
    """
    Nothing in the Dockerfile reaches for a registry but its base: no
    "# syntax=" line (BuildKit would fetch that frontend from Docker Hub),
    and the build stage runs on what a Debian base has (python3, not python).
    """
    text = DOCKERFILE.read_text()
    assert not any(line.lower().replace(" ", "").startswith("#syntax=")
                   for line in text.splitlines())
    assert "python -m" not in text and "python3 -m venv" in text
    assert "ARG PIP_INDEX_URL" in text


def checkComposeHealthchecks(containers, balancer, metrics, backends, backendPorts) -> None:
    """
    compose.yaml's health checks, run in these containers as Docker would
    (their ports put in): the balancer is ready, each backend accepts.
    """
    try:
        compose = loadCompose()
    except pytest.skip.Exception:
        return  # no PyYAML: tests/test_deploy.py says so
    services = compose["services"]

    def check(service: str, container: str, ports: Dict[str, str]) -> None:
        kind, *argv = services[service]["healthcheck"]["test"]
        assert kind == "CMD"
        for old, new in ports.items():
            assert any(old in a for a in argv), (old, argv)
            argv = [a.replace(old, new) for a in argv]
        r = run([containers.docker, "exec", container, *argv], 30)
        assert r.returncode == 0, f"{service}'s health check {argv} failed here: {r.stderr}"

    check("balancer", balancer, {":8102/": f":{metrics}/"})
    for name, container in backends.items():
        check("backend-1", container, {", 9000)": f", {backendPorts[name]})"})


@pytest.mark.docker
@pytest.mark.e2e
def test_containers_serve_and_a_stopped_backend_drops_no_client(docker, image, tmp_path):
    secret = containerSecret(tmp_path)
    containers = Containers(docker, image, secret)
    port, control, admin, metrics = freePort(), freePort(), freePort(), freePort()
    backendPorts = {"docker-backend-1": freePort(), "docker-backend-2": freePort()}
    try:
        started = time.monotonic()
        balancer = containers.start("balancer", [
            "cluster-balancer",
            f"--listen=tcp:{port}:interface=127.0.0.1",
            f"--control=tcp:{control}:interface=127.0.0.1",
            f"--admin=tcp:{admin}:interface=127.0.0.1",
            f"--secret-file={SECRET_IN_CONTAINER}",
            f"--metrics=tcp:{metrics}:interface=127.0.0.1",
        ])
        backends: Dict[str, str] = {}
        for name, bport in backendPorts.items():
            backends[name] = containers.start(name, [
                "cluster-backend",
                f"--listen=tcp:{bport}:interface=127.0.0.1",
                f"--name={name}",
                f"--balancer=tcp:host=127.0.0.1:port={control}",
                f"--secret-file={SECRET_IN_CONTAINER}",
                "--report-interval=0.2",
                f"--drain-timeout={BACKEND_DRAIN}",
            ])
        runsReturned = time.monotonic() - started

        def firstEcho() -> bool:
            for c in [balancer, *backends.values()]:
                if not containers.running(c):
                    raise AssertionError(f"{c} exited:\n{containers.logs(c)[-3000:]}")
            return echo(port, b"hello from the host\n", timeout=2) == b"hello from the host\n"

        waitFor(firstEcho, 60, "an echo through the balancer container", interval=0.05)
        figure(f"three docker run: {runsReturned:.2f} s; "
               f"first docker run to first echo through the balancer: "
               f"{time.monotonic() - started:.2f} s")

        def bothUp() -> Optional[dict]:
            r = containers.admin(balancer, admin, "status", "--json")
            if r.returncode != 0:
                return None
            status = {b["name"]: b for b in json.loads(r.stdout)}
            return status if all(
                status.get(n, {}).get("state") == "up" for n in backendPorts
            ) else None

        waitFor(bothUp, 60, "both backends up (cluster-admin in the balancer container)",
                interval=0.2)
        figure(f"first docker run to both backends up: {time.monotonic() - started:.2f} s")
        checkComposeHealthchecks(containers, balancer, metrics, backends, backendPorts)

        clients = Clients(port, 16)
        clients.start()
        try:
            time.sleep(3)
            before = bothUp()
            assert before is not None
            # The one with more connections open (as last reported): the
            # stop then has some to drain.
            victim = max(sorted(backendPorts), key=lambda n: before[n]["connections"])
            (survivor,) = set(backendPorts) - {victim}
            stopStarted = time.monotonic()
            r = run([docker, "stop", f"--time={BACKEND_DRAIN + 10}", backends[victim]], 60)
            stopEnded = time.monotonic()
            assert r.returncode == 0, r.stderr
            time.sleep(3)
        finally:
            clients.stop()
        r = containers.admin(balancer, admin, "status", "--json")
        assert r.returncode == 0, r.stderr
        after = {b["name"]: b for b in json.loads(r.stdout)}

        total = len(clients.done)
        during = clients.between(stopStarted, stopEnded)
        failed = clients.failures()
        victimLog = containers.logs(backends[victim])
        held = re.search(r"waiting up to \S+ s for (\d+) connection", victimLog)
        figure(f"docker stop {victim} (on SIGTERM it had "
               f"{held.group(1) if held else '?'} connections open): "
               f"{stopEnded - stopStarted:.2f} s, exit status "
               f"{containers.exitCode(backends[victim])}")
        figure(f"16 clients over {clients.done[-1][1] - clients.done[0][0]:.1f} s: "
               f"{total} connections, {len(failed)} failed; "
               f"{len(during)} connections open during docker stop "
               f"({sum(1 for c in during if c[4])} of them 2 s long), "
               f"{sum(1 for c in during if not c[2])} of them failed")
        figure(f"routed before the stop: { {n: before[n]['routed'] for n in backendPorts} }; "
               f"after: { {n: after.get(n, {}).get('routed') for n in backendPorts} }")

        assert not failed, f"{len(failed)} of {total} client connections failed: {failed[:5]}"
        assert len(during) > 0, "no client connected while the backend stopped"
        # The stopped one had served; it drained (its connections finished:
        # it did not wait out its --drain-timeout) and exited cleanly; the
        # other took the rest.
        assert before[victim]["routed"] > 0, before
        assert stopEnded - stopStarted < BACKEND_DRAIN, "the backend waited out its drain"
        assert containers.exitCode(backends[victim]) == 0
        assert "draining: telling balancers" in victimLog, victimLog[-3000:]
        assert "drain deadline reached" not in victimLog, victimLog[-3000:]
        assert after[survivor]["routed"] > before[survivor]["routed"]
        assert after.get(victim, {}).get("state") != "up"
        assert echo(port, b"still here\n") == b"still here\n"
        for name in containers.names:
            text = containers.logs(name)
            for marker in ("Traceback", "Unhandled"):
                assert marker not in text, f"{name} logged:\n{text[-4000:]}"
    finally:
        containers.removeAll()
