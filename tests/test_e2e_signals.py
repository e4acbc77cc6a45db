"""
Signals with real processes (issue 18, item 2): SIGHUP is harmless, and
reopens the log file when logging to one; SIGTERM drains as before.
"""

import signal

import pytest

from tests.test_e2e import holdClients
from twistedcluster.localcluster import LocalCluster, twistdCommand, waitFor

pytestmark = pytest.mark.e2e


def test_sighup_reopens_log_files_and_drops_no_one(tmp_path, monkeypatch):
    """
    A balancer and a backend logging to files get SIGHUP after their files
    were moved away (as logrotate does): both carry on, a held connection
    through them keeps echoing, and each writes to a new file at its path.
    Then SIGTERM still drains and stops them.
    """
    cluster = LocalCluster(tmp_path)
    logs = {"balancer": tmp_path / "balancer-file.log", "backend-1": tmp_path / "backend-file.log"}
    original = twistdCommand

    def withLogFile(plugin, args):
        name = "balancer" if plugin == "cluster-balancer" else "backend-1"
        command = original(plugin, args)
        command[command.index("--logfile=-")] = f"--logfile={logs[name]}"
        return command

    import twistedcluster.localcluster as localcluster

    monkeypatch.setattr(localcluster, "twistdCommand", withLogFile)
    held = []
    try:
        cluster.startBalancer()
        cluster.startBackend("backend-1", extra=["--report-interval=0.2"])
        cluster.waitUp(["backend-1"], timeout=60)
        held = holdClients(cluster.port, 2, "held")
        rotated = {}
        for name, path in logs.items():
            assert "listening" in path.read_text() or "listener" in path.read_text()
            rotated[name] = path.with_suffix(".log.1")
            path.rename(rotated[name])
        for name in logs:
            cluster.processes[name].signal(signal.SIGHUP)
        for name, path in logs.items():
            waitFor(lambda: path.exists() and "reopened" in path.read_text(), 10,
                    f"{name} to reopen its log file")
            assert cluster.processes[name].alive()
            assert f"SIGHUP: log file {path} reopened" in path.read_text()
        for c in held:
            assert c.echo(b"after SIGHUP") == b"after SIGHUP"
        # A second SIGHUP, with nothing moved, is as harmless.
        for name in logs:
            cluster.processes[name].signal(signal.SIGHUP)
        waitFor(lambda: logs["balancer"].read_text().count("reopened") >= 2, 10, "second reopen")
        for c in held:
            assert c.echo(b"again") == b"again"
        assert cluster.status()["backend-1"]["state"] == "up"
        # SIGTERM drains as before: the held connections go on until closed.
        backend = cluster.processes["backend-1"]
        backend.signal(signal.SIGTERM)
        cluster.waitForStatus(lambda s: s["backend-1"]["state"] != "up", 10, "backend-1 draining")
        # Another SIGTERM, and a SIGINT, while it drains (systemd signals
        # every process of the unit; Ctrl-C twice): said, and nothing else
        # (the reactor stopping twice logged a traceback).
        backend.signal(signal.SIGTERM)
        backend.signal(signal.SIGINT)
        waitFor(lambda: logs["backend-1"].read_text().count("while stopping") >= 2, 10,
                "the second signals noted")
        for c in held:
            assert c.echo(b"draining") == b"draining"
            c.close()
        held = []
        waitFor(lambda: not backend.alive(), 20, "backend-1 to exit once idle")
        assert "drained: no connection left" in logs["backend-1"].read_text()
        for name, path in rotated.items():
            assert "Traceback" not in path.read_text() + logs[name].read_text()
    finally:
        for c in held:
            c.close()
        cluster.stopAll()


def test_sighup_logging_to_standard_output_is_noted_and_harmless(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        cluster.startBalancer()
        cluster.startBackend("backend-1", extra=["--report-interval=0.2"])
        cluster.waitUp(["backend-1"])
        for name in ("balancer", "backend-1"):
            cluster.processes[name].signal(signal.SIGHUP)
        for name in ("balancer", "backend-1"):
            proc = cluster.processes[name]
            waitFor(lambda: "SIGHUP: no log file to reopen" in proc.logText(), 10, f"{name} noting SIGHUP")
            assert proc.alive()
        cluster.waitUp(["backend-1"])
    finally:
        cluster.stopAll()
