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

    def __init__(self, workdir: Path, size: int = 1, tls=None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.members: List[EtcdMember] = [
            EtcdMember(f"etcd{i}", self.workdir) for i in range(size)
        ]
        for m in self.members:
            m.tls = tls
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

    def get(self, key: str) -> Optional[bytes]:
        import base64

        body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
        for m in self.members:
            try:
                with urllib.request.urlopen(
                    f"http://{m.address}/v3/kv/range", body, timeout=2
                ) as r:
                    kvs = json.loads(r.read()).get("kvs", [])
                    return base64.b64decode(kvs[0]["value"]) if kvs else None
            except OSError:
                continue
        raise OSError("no etcd member answered")
