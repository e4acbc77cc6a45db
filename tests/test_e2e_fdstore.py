"""
systemd's file-descriptor store with real processes (issue 18, item 1): a
balancer under a fake but faithful systemd (tests/fakesystemd.py) stores
its listening sockets; killed with SIGKILL (a crash) or stopped with SIGTERM
(systemctl restart) while clients keep connecting, it is started again
with them, as systemd restarts a service: no client is refused, and the new
process routes from its first accept.  bench/systemd_restart.sh does the
same under the real systemd.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from tests.churn import Churn
from tests.fakesystemd import FakeSystemd
from tests.test_e2e import assertNoTracebacks
from twistedcluster.localcluster import LocalCluster, freePort, twistdCommand, waitFor

pytestmark = pytest.mark.e2e

BACKENDS = ["backend-1", "backend-2", "backend-3"]
#: Seconds between the kill and the new start (the unit's RestartSec= is 2).
RESTART_DELAY = 1.0


def isListening(fd):
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)), probe.getsockname()
    finally:
        probe.close()


def readMemfd(fd):
    return json.loads(os.pread(fd, 1 << 20, 0))


@pytest.fixture
def shortDir():
    d = tempfile.mkdtemp(prefix="fds-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    "how",
    [
        # A crash: Restart=on-failure starts it again.
        signal.SIGKILL,
        # systemctl restart: SIGTERM, the old process drains and exits, then
        # the new one starts.  Its ports must close without shutting the
        # stored sockets down.
        signal.SIGTERM,
    ],
    ids=["crash", "restart"],
)
def test_a_balancer_restarted_with_its_stored_sockets_refuses_no_one(tmp_path, shortDir, how):
    systemd = FakeSystemd(os.path.join(shortDir, "notify"))
    cluster = LocalCluster(tmp_path)
    ports = {role: freePort() for role in ("proxy", "redirect", "control", "admin", "metrics")}
    takeoverPath = os.path.join(shortDir, "takeover.sock")
    args = [
        f"--listen=tcp:{ports['proxy']}:interface=127.0.0.1",
        f"--redirect=tcp:{ports['redirect']}:interface=127.0.0.1",
        f"--control=tcp:{ports['control']}:interface=127.0.0.1",
        f"--admin=tcp:{ports['admin']}:interface=127.0.0.1",
        f"--metrics=tcp:{ports['metrics']}:interface=127.0.0.1",
        f"--takeover={takeoverPath}",
    ]
    cluster.port = ports["proxy"]
    cluster.controlPort = ports["control"]
    cluster.adminPort = ports["admin"]
    env = dict(cluster.env, **systemd.environ())
    procs = []
    logs = []
    load = None

    def start(tag, argv, passFds=()):
        log = open(tmp_path / f"{tag}.log", "wb")
        logs.append(log)
        p = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, pass_fds=passFds,
        )
        procs.append(p)
        return p

    def logOf(tag):
        return (tmp_path / f"{tag}.log").read_text(errors="replace")

    try:
        first = start("balancer-0", twistdCommand("cluster-balancer", args))
        want = {"proxy", "redirect", "control", "admin", "metrics", "listeners.json", "pool.json"}
        waitFor(lambda: set(systemd.names()) == want or first.poll() is not None, 30, "the sockets to be stored")
        assert first.poll() is None, logOf("balancer-0")
        assert sorted(systemd.names()) == sorted(want)
        # Each stored socket is the listener of its role, listening.
        for role, port in ports.items():
            listening, address = isListening(systemd.stored(role))
            assert listening and address == ("127.0.0.1", port), role
        described = readMemfd(systemd.stored("listeners.json"))["listeners"]
        assert described == {
            "proxy": args[0].split("=", 1)[1],
            "redirect": args[1].split("=", 1)[1],
            "control": args[2].split("=", 1)[1],
            "admin": args[3].split("=", 1)[1],
            "metrics": args[4].split("=", 1)[1],
        }
        # The takeover socket (a unix socket) is not stored.
        assert systemd.said("READY")
        stores = systemd.said("FDSTORE")
        assert all(m["FDNAME"] in want for m in stores)

        for name in BACKENDS:
            cluster.startBackend(name, extra=["--report-interval=0.5"])
        cluster.waitUp(BACKENDS)
        # The pool memfd is rewritten every second: the live backends.
        waitFor(
            lambda: len(readMemfd(systemd.stored("pool.json"))["live"]) == len(BACKENDS),
            10,
            "the live pool to be written to the store",
        )

        load = Churn(ports["proxy"], ports["redirect"])
        load.start()
        waitFor(lambda: load.figures["proxied"] > 20 and load.figures["redirected"] > 20, 20, "load to run")

        first.send_signal(how)
        first.wait(15)
        killed = time.monotonic()
        beforeRestart = load.total()
        time.sleep(RESTART_DELAY)  # RestartSec=: nothing accepts meanwhile
        argv, passFds = systemd.activationCommand(twistdCommand("cluster-balancer", args))
        second = start("balancer-1", argv, passFds)
        waitFor(
            lambda: "proxy listener (" in logOf("balancer-1") and "kept by systemd" in logOf("balancer-1")
            or second.poll() is not None,
            30,
            "the new balancer to adopt the stored sockets",
        )
        assert second.poll() is None, logOf("balancer-1")
        text = logOf("balancer-1")
        for role in ports:
            assert f"the {role} listener (" in text and "is the socket systemd kept" in text, role
        # Routes before the backends have registered again: the pool came
        # from the store.
        assert "fd store: 3 backend(s) up as the last process saw them" in text
        waitFor(lambda: load.total() > beforeRestart + 50, 30, "load to go on through the new process")
        firstServed = time.monotonic()
        waitFor(
            lambda: logOf("balancer-1").count("registered from") >= len(BACKENDS),
            30,
            "backends to register with the new balancer",
        )
        status = cluster.waitUp(BACKENDS)
        assert all(status[n]["state"] == "up" for n in BACKENDS)
        figures = load.stop()
        errors, load = load.errors, None
        print(
            f"\nfd store: {signal.Signals(how).name}, new process {RESTART_DELAY} s later with the "
            f"stored sockets; new connections: {figures['proxied']} proxied, "
            f"{figures['redirected']} redirected; refused {figures['refused']}, "
            f"other failed connects {figures['connectFailed']}, "
            f"cut (in flight in the killed process) {figures['cut']}, "
            f"NoBackendAvailable {figures['noBackend']}, corrupted "
            f"{figures['corrupted']}; 50 connections through the new process "
            f"{firstServed - killed:.2f} s after the kill"
        )
        assert figures["refused"] == 0, errors
        assert figures["connectFailed"] == 0, errors
        assert figures["corrupted"] == 0, errors
        assert figures["noBackend"] == 0, errors
        # Only the connections the killed process was relaying: at most
        # one per load thread; none after a SIGTERM (they finish first).
        assert figures["cut"] <= (4 if how == signal.SIGKILL else 0), errors
        # The sockets are stored once: the adopted ones were not sent again.
        assert sorted(systemd.names()) == sorted(want)
        assert systemd.refused == 0
        # The takeover socket was bound afresh (the killed process's path
        # was stale) and works: a reload after the restart still has a
        # process to take over from.
        assert os.path.exists(takeoverPath)
    finally:
        if load is not None:
            load.stop()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        cluster.stopAll()
        for log in logs:
            log.close()
        systemd.close()
    for tag in ("balancer-0", "balancer-1"):
        text = logOf(tag)
        assert "Traceback" not in text and "Unhandled" not in text, f"{tag}:\n{text[-3000:]}"
    assertNoTracebacks(cluster)
