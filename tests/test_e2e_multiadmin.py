"""
cluster-admin for a cluster (issue 20, item 3): --admin repeated sends a
change to every balancer and reports each one's result; status merges
their views; a balancer that cannot be reached is named and the exit
status says so.  Real balancers, a real backend, the real cluster-admin.
"""

import json
import subprocess

import pytest

from twistedcluster.cli.admin import EXIT_UNREACHABLE
from twistedcluster.localcluster import LocalCluster, adminCommand, freePort

pytestmark = pytest.mark.e2e


def admin(clusters, *args, extra=()):
    argv = adminCommand(clusters[0].admin, [])
    argv = argv[: argv.index("--admin")]
    for c in clusters:
        argv += ["--admin", c.admin]
    argv += [*extra, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=clusters[0].env)


def test_a_change_goes_to_every_balancer_and_status_merges_them(tmp_path):
    a, b = LocalCluster(tmp_path / "a"), LocalCluster(tmp_path / "b")
    try:
        a.startBalancer()
        b.startBalancer()
        a.startBackend("web1", balancers=[f"tcp:host=127.0.0.1:port={c.controlPort}"
                                          for c in (a, b)])
        a.waitUp(["web1"])
        b.waitUp(["web1"])

        r = admin([a, b], "drain", "web1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"{a.admin}: web1: draining", f"{b.admin}: web1: draining"]
        assert a.quickStatus()["web1"]["state"] == b.quickStatus()["web1"]["state"] == "draining"

        r = admin([a, b], "weight", "web1", "3", "--json")
        assert [(x["admin"], x["weight"]) for x in json.loads(r.stdout)] == [
            (a.admin, 3), (b.admin, 3)]

        # One row per backend; a field they disagree on shows each one's value.
        subprocess.run(adminCommand(b.admin, ["enable", "web1"]), check=True, env=a.env,
                       capture_output=True)
        r = admin([a, b], "status")
        [row] = [line for line in r.stdout.splitlines() if line.startswith("web1")]
        assert "draining/up" in row, r.stdout
        merged = json.loads(admin([a, b], "status", "--json").stdout)
        assert len(merged) == 1 and merged[0]["state"] == ["draining", "up"]
        assert set(merged[0]["balancers"]) == {a.admin, b.admin}

        # A balancer away: the others still take the change; it is named.
        b.processes["balancer"].stop()
        r = admin([a, b], "enable", "web1", extra=["--timeout", "3"])
        assert r.returncode == EXIT_UNREACHABLE
        assert f"{a.admin}: web1: up" in r.stdout
        assert "failed on 1 of 2 balancers" in r.stderr and b.admin in r.stderr
        assert a.quickStatus()["web1"]["state"] == "up"
    finally:
        a.stopAll()
        b.stopAll()
