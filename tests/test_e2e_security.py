"""
End to end with a shared secret: real processes, real sockets.
"""

import os

import pytest

from twistedcluster.localcluster import LocalCluster, echoOnce, waitFor

pytestmark = pytest.mark.e2e

SECRET = b"0123456789abcdef-e2e-secret"


def secretFile(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content + b"\n")
    os.chmod(p, 0o600)
    return str(p)


def test_only_holders_of_the_secret_join_or_steer(tmp_path):
    good = secretFile(tmp_path, "good", SECRET)
    bad = secretFile(tmp_path, "bad", b"not-the-secret-at-all!")
    cluster = LocalCluster(tmp_path)
    try:
        cluster.startBalancer(extra=[f"--secret-file={good}", "--auth-timeout=2"])
        cluster.startBackend("honest", extra=[f"--secret-file={good}", "--report-interval=0.2"])
        intruder = cluster.startBackend("intruder", extra=[f"--secret-file={bad}"])
        lazy = cluster.startBackend("no-secret")

        def adminWith(*args):
            return cluster.adminRun(*args, check=False)

        # cluster-admin with the secret sees only the honest backend.
        waitFor(
            lambda: adminWith("--secret-file", good, "status", "--json").returncode == 0
            and '"honest"' in adminWith("--secret-file", good, "status", "--json").stdout,
            20,
            "the honest backend",
        )
        waitFor(
            lambda: "refused registration" in intruder.logText()
            and "wrong secret" in intruder.logText(),
            20,
            "the intruder to be refused",
        )
        waitFor(lambda: "requires authentication" in lazy.logText(), 20, "the secretless one refused")
        import json

        status = json.loads(adminWith("--secret-file", good, "status", "--json").stdout)
        assert [b["name"] for b in status] == ["honest"]
        # All traffic goes to the honest backend.
        for i in range(10):
            assert echoOnce("127.0.0.1", cluster.port, b"m%d" % i) == b"m%d" % i
        status = json.loads(adminWith("--secret-file", good, "status", "--json").stdout)
        assert status[0]["routed"] == 10
        # cluster-admin without the secret, or with the wrong one: refused, clearly.
        r = adminWith("status")
        assert r.returncode == 4 and "requires authentication" in r.stderr and "--secret-file" in r.stderr
        r = adminWith("--secret-file", bad, "drain", "honest")
        assert r.returncode == 4 and "wrong secret" in r.stderr
        assert json.loads(adminWith("--secret-file", good, "status", "--json").stdout)[0]["state"] == "up"
        # The balancer logged each refusal with the peer's address.
        log = cluster.processes["balancer"].logText()
        assert "authentication failed from 127.0.0.1:" in log
        assert "before authenticating" in log
    finally:
        cluster.stopAll()
