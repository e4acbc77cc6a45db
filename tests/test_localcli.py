"""
``cluster-local`` and L{LocalCluster}: a local cluster starts its backends
only next to its own balancer (issue 18, first steps).
"""

import socket
import subprocess
import sys
import time

import pytest

from tests.test_readme_commands import _env
from twistedcluster.localcluster import LocalCluster, NotOurBalancer, freePort, portInUse

pytestmark = pytest.mark.e2e


def test_a_port_in_use_fails_fast_and_starts_nothing(tmp_path):
    """
    With its admin port held by someone else, cluster-local says which port
    and option, exits 1 at once, and starts no process (its backends would
    have registered with the other balancer, and stayed there, down).
    """
    ports = {name: freePort() for name in ("port", "redirect-port", "control-port")}
    logs = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = taken.getsockname()[1]
        assert portInUse("127.0.0.1", admin)
        started = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "twistedcluster.cli.local", "--backends=1",
             f"--backend-port={freePort()}", f"--logs={logs}", f"--admin-port={admin}",
             *[f"--{name}={port}" for name, port in ports.items()]],
            capture_output=True, text=True, timeout=60, env=_env(),
        )
    assert r.returncode == 1
    assert time.monotonic() - started < 20
    assert r.stderr.splitlines()[0] == (
        f"cluster-local: port {admin} on 127.0.0.1 is in use (another cluster-local "
        "or balancer?); stop it, or choose another with --admin-port"
    )
    assert not logs.exists() or list(logs.glob("*.log")) == []


def test_a_balancer_that_is_not_ours_is_refused(tmp_path):
    """
    checkOwnBalancer tells our balancer from another one answering on the
    admin port: the other does not hold our secret.
    """
    other = LocalCluster(tmp_path / "other")
    other.useSecret()
    ours = LocalCluster(tmp_path / "ours")
    ours.useSecret()
    try:
        other.startBalancer()
        ours.startBalancer()
        ours.checkOwnBalancer()  # ours answers
        ours.adminPort = other.adminPort
        with pytest.raises(NotOurBalancer, match="another balancer's"):
            ours.checkOwnBalancer(timeout=20)
    finally:
        ours.stopAll()
        other.stopAll()
