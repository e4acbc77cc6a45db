"""
Real etcd members on loopback for the state store's tests: Debian's
etcd-server (``.ci/run`` installs it), each member on free ports with its
own data folder, stopped by the PID this started.
"""

import json
import shutil
import urllib.request
from pathlib import Path
from typing import List, Optional

import pytest

from twistedcluster.localcluster import Process, freePort, waitFor

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)

needsEtcd = pytest.mark.skipif(
    ETCD is None, reason="etcd is not installed (Debian: apt-get install etcd-server)"
)


class EtcdMember:
    #: With TLS: (certificate, key, CA) paths for the client port, which
    #: then asks for client certificates from that CA.
    tls = None
    #: etcd's --auth-token-ttl (seconds a token lives after its last use).
    tokenTTL: Optional[int] = None

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.clientPort = freePort()
        self.peerPort = freePort()
        self.process: Optional[Process] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.clientPort}"

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    def start(self, cluster: str, state: str = "new") -> None:
        argv = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.workdir / f"{self.name}.etcd"),
            "--listen-client-urls", f"{self.scheme}://127.0.0.1:{self.clientPort}",
            "--advertise-client-urls", f"{self.scheme}://127.0.0.1:{self.clientPort}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peerPort}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peerPort}",
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "twistedcluster-test",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]
        if self.tokenTTL is not None:
            argv += ["--auth-token-ttl", str(self.tokenTTL)]
        if self.tls is not None:
            cert, key, ca = self.tls
            argv += ["--cert-file", str(cert), "--key-file", str(key),
                     "--client-cert-auth", "--trusted-ca-file", str(ca)]
        self.process = Process(self.name, argv, self.workdir / f"{self.name}.log")

    def healthy(self) -> bool:
        if self.tls is not None:
            # Asks for a client certificate: a running process with its
            # port open is as much as this can see.
            import socket

            try:
                socket.create_connection(("127.0.0.1", self.clientPort), timeout=1).close()
                return self.process is not None and self.process.alive()
            except OSError:
                return False
        try:
            with urllib.request.urlopen(
                f"http://{self.address}/health", timeout=1
            ) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process._log.close()
            self.process = None


class Etcd:
    """
    An etcd cluster of C{size} members.
    """

    #: (user, password) of etcd's root, once L{enableAuth} has run.
    root = None

    def __init__(self, workdir: Path, size: int = 1, tls=None, tokenTTL=None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.members: List[EtcdMember] = [
            EtcdMember(f"etcd{i}", self.workdir) for i in range(size)
        ]
        for m in self.members:
            m.tls = tls
            m.tokenTTL = tokenTTL
        self.initial = ",".join(
            f"{m.name}=http://127.0.0.1:{m.peerPort}" for m in self.members
        )

    @property
    def spec(self) -> str:
        return "etcd:" + ",".join(m.address for m in self.members)

    def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            if m.process is None:
                m.start(self.initial)
        waitFor(lambda: all(m.healthy() for m in self.members), timeout, "etcd healthy")

    def kill(self) -> None:
        for m in self.members:
            m.kill()

    def call(self, path: str, message: dict, token: Optional[str] = None) -> dict:
        """
        One request to etcd's JSON gateway (plain HTTP), on the first member
        that answers; C{OSError} for an error answer.
        """
        body = json.dumps(message).encode()
        errors = []
        for m in self.members:
            request = urllib.request.Request(
                f"http://{m.address}{path}", body, {"content-type": "application/json"})
            if token is not None:
                request.add_header("authorization", token)
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    return json.loads(r.read())
            except OSError as e:
                errors.append(e)
        raise OSError(f"no etcd member answered {path}: {errors}")

    def rootToken(self) -> Optional[str]:
        if self.root is None:
            return None
        name, password = self.root
        return self.call("/v3/auth/authenticate", {"name": name, "password": password})["token"]

    def enableAuth(self, user: str, password: str, prefix: str) -> None:
        """
        etcd's authentication, as ``etcdctl user add``, ``role add``,
        ``role grant-permission --prefix``, ``auth enable`` would set it:
        root (password "root-password"), and C{user} with readwrite on
        C{prefix} only.
        """
        import base64

        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode()

        from twistedcluster.balancer.statestore import _prefixEnd

        role = user + "-role"
        for path, message in [
            ("/v3/auth/user/add", {"name": "root", "password": "root-password"}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/role/add", {"name": role}),
            ("/v3/auth/role/grant", {"name": role, "perm": {
                "permType": "READWRITE", "key": b64(prefix.encode()),
                "range_end": b64(_prefixEnd(prefix.encode()))}}),
            ("/v3/auth/user/add", {"name": user, "password": password}),
            ("/v3/auth/user/grant", {"user": user, "role": role}),
            ("/v3/auth/enable", {}),
        ]:
            self.call(path, message)
        self.root = ("root", "root-password")

    def get(self, key: str) -> Optional[bytes]:
        import base64

        answer = self.call("/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()},
                           self.rootToken())
        kvs = answer.get("kvs", [])
        return base64.b64decode(kvs[0]["value"]) if kvs else None
