"""
``cluster-local`` and L{LocalCluster}: a local cluster starts its backends
only next to its own balancer (issue 18, first steps).
"""

import socket
import subprocess
import sys
import time

import pytest

from tests.test_e2e_workers import workerPids
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


def test_ports_out_of_range_are_usage_errors(tmp_path):
    # Port 0 used to start everything, then fail its self-check against
    # port 0 with a traceback, and leave every process running.
    for option in ("--port=0", "--admin-port=70000"):
        r = subprocess.run(
            [sys.executable, "-m", "twistedcluster.cli.local", option, f"--logs={tmp_path}"],
            capture_output=True, text=True, timeout=60, env=_env(),
        )
        assert r.returncode == 2, r.stderr
        assert "a port from 1 to 65535" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.glob("*.log")) == []


def localArgv(logs, backends):
    """
    cluster-local with C{backends} echo backends, free ports and its logs in
    C{logs}.
    """
    # Consecutive free ports for the backends.
    base = next(
        p for p in (freePort() for _ in range(50))
        if not any(portInUse("127.0.0.1", p + i) for i in range(1, backends))
    )
    return [sys.executable, "-m", "twistedcluster.cli.local", f"--backends={backends}", f"--logs={logs}",
            f"--port={freePort()}", f"--redirect-port={freePort()}", f"--control-port={freePort()}",
            f"--admin-port={freePort()}", f"--backend-port={base}"]


def startLocal(argv):
    """
    cluster-local started with C{argv}, once it says it is running.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    for line in proc.stdout:
        if "twistedcluster is running" in line:
            return proc
    proc.wait(60)
    pytest.fail("cluster-local did not start")


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGINT"])
def test_a_hangup_or_ctrl_c_stops_every_process_it_started(tmp_path, sig):
    # Its processes are in sessions of their own: a terminal's hangup (or
    # Ctrl-C) reaches cluster-local alone, which stops them all; before,
    # a hangup killed cluster-local and left the cluster running.
    import os
    import signal

    from twistedcluster.localcluster import waitFor

    children = set()
    proc = startLocal(localArgv(tmp_path, 2))
    try:
        children = workerPids(proc.pid)  # its children
        assert len(children) == 3  # the balancer and two backends
        assert all(os.getsid(c) == c for c in children)  # sessions of their own
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(60) == 0
        def gone():
            alive = []
            for c in children:
                try:
                    os.kill(c, 0)
                    alive.append(c)
                except OSError:
                    pass
            return not alive
        waitFor(gone, 20, "every process it started to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in children:
            try:
                os.kill(c, signal.SIGKILL)
            except OSError:
                pass


def test_a_second_run_in_the_same_folder_is_refused_and_the_first_keeps_its_secret(tmp_path):
    # Two runs in one log folder shared its secret file: the second wrote a
    # new one, so cluster-admin, reading it, was refused by the first
    # cluster, and their logs mixed.  Now the second says so and starts
    # nothing; the first keeps serving with its own secret.
    import os
    import signal

    from twistedcluster.localcluster import echoOnce

    first = localArgv(tmp_path, 1)
    proc = startLocal(first)
    try:
        secret = (tmp_path / "secret").read_bytes()
        logs = sorted(p.name for p in tmp_path.glob("*.log"))
        second = subprocess.Popen(localArgv(tmp_path, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        try:
            out, err = second.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # It started a second cluster: stopped as a user would, so that
            # nothing it started is left running.
            second.send_signal(signal.SIGINT)
            second.communicate(timeout=60)
            pytest.fail("a second cluster-local started in the same folder")
        assert second.returncode == 1, out + err
        assert err.splitlines()[0] == (
            f"cluster-local: {tmp_path}/ is in use by another cluster-local (pid {proc.pid}): "
            "its secret and logs are there; stop it, or choose another folder with --logs"
        )
        assert (tmp_path / "secret").read_bytes() == secret
        assert sorted(p.name for p in tmp_path.glob("*.log")) == logs
        port = int(next(a for a in first if a.startswith("--port=")).split("=")[1])
        assert echoOnce("127.0.0.1", port, b"still mine\n") == b"still mine\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        proc = None
        # Stopped, it lets go of the folder: the next run may use it.
        from twistedcluster.cli.local import holdFolder

        held = holdFolder(tmp_path)
        assert not isinstance(held, int)
        held.close()
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            proc.wait(60)
