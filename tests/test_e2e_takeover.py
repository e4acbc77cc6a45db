"""
Seamless upgrade with real processes (issue 18, item 1): ``--takeover PATH``
hands the listening sockets and the pool to a new balancer process while
clients keep connecting and 50 held connections keep echoing.
"""

import os
import stat
import time

import pytest

from tests.churn import Churn
from tests.test_e2e import BACKENDS, assertNoTracebacks, holdClients
from twistedcluster.localcluster import LocalCluster, freePort, waitFor

pytestmark = pytest.mark.e2e

UPGRADES = 5
HELD = 50


def test_five_upgrades_under_load_drop_no_one(tmp_path):
    """
    Five upgrades in a row under continuous new connections (proxied and
    redirected) with 50 held connections: no connect refused or failed, no
    byte corrupted, no redirect client without a backend; the held
    connections echo through every upgrade (their old processes relay them)
    and, once closed, let those processes exit; backends move their control
    channels without being marked down.
    """
    cluster = LocalCluster(tmp_path)
    path = tmp_path / "takeover.sock"
    redirectPort = freePort()
    metricsPort = freePort()
    extra = [
        f"--takeover={path}",
        f"--redirect=tcp:{redirectPort}:interface=127.0.0.1",
        f"--metrics=tcp:{metricsPort}:interface=127.0.0.1",
        "--takeover-drain=120",
    ]
    held = []
    load = None
    try:
        cluster.startBalancer(extra=extra, name="balancer-0")
        # The takeover socket may come a moment after the admin port.
        waitFor(path.exists, 10, "the takeover socket")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for name in BACKENDS:
            cluster.startBackend(name, extra=["--report-interval=0.5"])
        cluster.waitUp(BACKENDS)
        held = holdClients(cluster.port, HELD, "held")
        load = Churn(cluster.port, redirectPort, echoRedirects=True)
        load.start()
        waitFor(lambda: load.figures["proxied"] > 20 and load.figures["redirected"] > 20, 20, "load to run")
        for i in range(1, UPGRADES + 1):
            old = cluster.processes[f"balancer-{i - 1}"]
            new = cluster.startBalancer(
                port=cluster.port,
                controlPort=cluster.controlPort,
                adminPort=cluster.adminPort,
                extra=extra,
                name=f"balancer-{i}",
            )
            waitFor(lambda: "listeners adopted" in new.logText(), 30, f"balancer-{i} to take over")
            waitFor(lambda: "stopped accepting" in old.logText(), 30, f"balancer-{i - 1} to let go")
            # Every backend registers with the new process.
            waitFor(
                lambda: new.logText().count("registered from") >= len(BACKENDS),
                30,
                f"backends to register with balancer-{i}",
            )
            status = cluster.waitUp(BACKENDS)
            assert all(status[n]["state"] == "up" for n in BACKENDS)
            for c in held:
                payload = f"after upgrade {i} {c.tag} ".encode() + os.urandom(32)
                assert c.echo(payload) == payload
            before = sum(load.figures[k] for k in ("proxied", "redirected"))
            waitFor(
                lambda: sum(load.figures[k] for k in ("proxied", "redirected")) > before + 20,
                20,
                "load to go on through the new process",
            )
        figures = load.stop()
        errors, load = load.errors, None
        print(
            f"\ntakeover: {UPGRADES} upgrades, {HELD} held connections echoing "
            f"through all of them; new connections: {figures['proxied']} proxied, "
            f"{figures['redirected']} redirected; failed connects "
            f"{figures['refused'] + figures['connectFailed']}, cut short {figures['cut']}, "
            f"corrupted {figures['corrupted']}, "
            f"NoBackendAvailable {figures['noBackend']}"
        )
        assert figures["refused"] == 0, errors
        assert figures["connectFailed"] == 0, errors
        assert figures["cut"] == 0, errors
        assert figures["corrupted"] == 0, errors
        assert figures["noBackend"] == 0, errors
        # No backend was ever marked down by any balancer.
        for i in range(UPGRADES + 1):
            text = cluster.processes[f"balancer-{i}"].logText()
            assert "marked down" not in text, text[-3000:]
        # The old processes still relay the held connections...
        olds = [cluster.processes[f"balancer-{i}"] for i in range(UPGRADES)]
        assert olds[0].alive()
        for c in held:
            c.close()
        held = []
        # ...and exit once those are closed.
        waitFor(lambda: not any(p.alive() for p in olds), 30, "the old balancers to exit")
        assert cluster.processes[f"balancer-{UPGRADES}"].alive()
        assert path.exists()
    finally:
        if load is not None:
            load.stop()
        for c in held:
            c.close()
        cluster.stopAll()
    assertNoTracebacks(cluster)


def test_the_old_process_ends_at_its_takeover_drain_deadline(tmp_path):
    """
    After a takeover the old process relays its connections until
    --takeover-drain, then resets what is left and exits; a SIGTERM in the
    meantime (systemctl stop signals every process of the unit) neither
    ends it with a traceback nor cuts its connections before the deadline.
    """
    cluster = LocalCluster(tmp_path)
    path = tmp_path / "t.sock"
    extra = [f"--takeover={path}", "--takeover-drain=4"]
    held = []
    try:
        old = cluster.startBalancer(extra=extra, name="balancer-0")
        cluster.startBackend("backend-1", extra=["--report-interval=0.5"])
        cluster.waitUp(["backend-1"])
        held = holdClients(cluster.port, 3, "held")
        new = cluster.startBalancer(
            port=cluster.port,
            controlPort=cluster.controlPort,
            adminPort=cluster.adminPort,
            extra=extra,
            name="balancer-1",
        )
        waitFor(lambda: "stopped accepting" in old.logText(), 30, "the old balancer to let go")
        let = time.monotonic()
        old.signal(15)
        waitFor(lambda: "signal 15 while stopping" in old.logText(), 10, "the signal to be logged")
        # Said with what it finishes: the takeover's words, not the generic
        # ones the process's own shutdown would install after them.
        assert "finish until --takeover-drain" in old.logText()
        for c in held:
            assert c.echo(b"still relayed") == b"still relayed"
        waitFor(lambda: not old.alive(), 30, "the old balancer to exit")
        assert time.monotonic() - let >= 3.5, "ended before its deadline"
        for c in held:
            try:
                got = c.echo(b"after the deadline")
            except OSError:  # reset
                got = b""
            assert got == b""
        assert "drain deadline reached: resetting 3 connection(s)" in old.logText()
        cluster.waitUp(["backend-1"])
        again = holdClients(cluster.port, 2, "new")
        for c in again:
            c.close()
        assert new.alive()
    finally:
        for c in held:
            c.close()
        cluster.stopAll()
    assertNoTracebacks(cluster)
