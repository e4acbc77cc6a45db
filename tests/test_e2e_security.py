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


def test_cluster_local_runs_with_a_secret_and_says_how_to_use_it(tmp_path):
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from twistedcluster.localcluster import adminCommand, freePort

    ports = {name: freePort() for name in ("port", "redirect-port", "control-port", "admin-port")}
    first = freePort()
    logs = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twistedcluster.cli.local", "--backends=1",
         f"--backend-port={first}", f"--logs={logs}",
         *[f"--{name}={port}" for name, port in ports.items()]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    out = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Ctrl-C stops" in line for line in out):
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
        text = "".join(out)
        assert "Ctrl-C stops" in text, text
        secret = logs / "secret"
        assert secret.stat().st_mode & 0o077 == 0
        for name in ("balancer", "backend-1"):
            assert f"--secret-file={secret}" in " ".join(
                open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
                for pid in _children(proc.pid)
                if name in open(f"/proc/{pid}/cmdline").read()
            ), name
        [watch] = [line for line in out if line.strip().startswith("watch:")]
        command = shlex.split(watch.split("watch:", 1)[1])
        assert "--secret-file" in command and command[-1] == "status"
        admin = f"tcp:host=127.0.0.1:port={ports['admin-port']}"
        r = subprocess.run(
            adminCommand(admin, command[command.index("--secret-file"):command.index("--secret-file") + 2] + ["status", "--json"]),
            capture_output=True, text=True, timeout=30,
        )
        assert r.returncode == 0, r.stderr
        r = subprocess.run(adminCommand(admin, ["status"]), capture_output=True, text=True, timeout=30)
        assert r.returncode == 4 and "requires authentication" in r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_strangers_without_a_secret_neither_block_nor_displace_a_backend(tmp_path):
    import socket
    import time

    from twisted.protocols import amp

    cluster = LocalCluster(tmp_path)
    idle = []
    try:
        cluster.startBalancer(extra=["--max-control-connections=10", "--auth-timeout=1"])
        web1 = cluster.startBackend("web1", extra=["--report-interval=0.2"])
        status = cluster.waitUp(["web1"])
        host, port = status["web1"]["host"], status["web1"]["port"]

        def connect():
            return socket.create_connection(("127.0.0.1", cluster.controlPort), timeout=5)

        # A stranger copying web1's name and address is refused; web1 keeps its channel.
        with connect() as s:
            s.sendall(amp.AmpBox(
                _ask=b"1", _command=b"Register", name=b"web1", host=host.encode(),
                port=b"%d" % port, capacity=b"10", connections=b"0", load=b"0.0",
                interval=b"1.0",
            ).serialize())
            s.settimeout(5)
            assert b"NAME_TAKEN" in s.recv(65536)
        # Idle strangers fill the listener; web1 restarts and still gets in.
        idle.extend(connect() for _ in range(12))
        web1.kill()
        web1 = cluster.startBackend("web1", port=port, extra=["--report-interval=0.2"])
        started = time.monotonic()
        cluster.waitUp(["web1"], timeout=10)
        assert time.monotonic() - started < 5
        # The first web1 never lost its channel to the stranger.
        assert "control channel to balancer" not in web1.logText()
        log = cluster.processes["balancer"].logText()
        assert "did not register within 1" in log or "oldest connection yet to register" in log
    finally:
        for s in idle:
            s.close()
        cluster.stopAll()


def test_a_tool_pointed_at_the_wrong_listener_is_told_which_it_reached(tmp_path):
    # cluster-admin at the control, proxy, redirect or metrics listener, and
    # a backend at the admin listener, used to read "wrong secret", a raw
    # AMP error tuple, "TooLong" or a bare timeout.  Each now says what it
    # reached, or that it is not the admin listener; the balancer logs it.
    import subprocess

    from twistedcluster.localcluster import adminCommand, freePort

    cluster = LocalCluster(tmp_path)
    cluster.useSecret()
    redirect, metrics = freePort(), freePort()
    try:
        cluster.startBalancer(extra=[
            f"--redirect=tcp:{redirect}:interface=127.0.0.1",
            f"--metrics=tcp:{metrics}:interface=127.0.0.1",
        ])
        cluster.startBackend("echo")
        cluster.waitUp(["echo"], timeout=30)

        def adminAt(port):
            return subprocess.run(
                adminCommand(f"tcp:host=127.0.0.1:port={port}",
                             [f"--secret-file={cluster.secretFile}", "--timeout=3", "status"]),
                capture_output=True, text=True, timeout=60, env=cluster.env,
            )

        r = adminAt(cluster.controlPort)
        assert r.returncode == 4, r.stderr
        assert "this is the balancer's control listener, where backends register" in r.stderr
        assert "wrong secret" not in r.stderr
        for port in (cluster.port, redirect):  # echoes our box back; answers a line
            r = adminAt(port)
            assert r.returncode == 3, r.stderr
            assert "does not speak the balancer's admin protocol" in r.stderr, r.stderr
            assert "Is it the balancer's admin listener (--admin)?" in r.stderr
        r = adminAt(metrics)  # an HTTP server waits for a request
        assert r.returncode == 3 and "nothing came back: is it the balancer's admin listener" in r.stderr
        assert adminAt(cluster.adminPort).returncode == 0
        # A backend at the admin listener hears where backends register.
        lost = cluster.startBackend("lost", balancers=[f"tcp:host=127.0.0.1:port={cluster.adminPort}"])
        waitFor(lambda: "backends register at its control listener (--control)" in lost.logText(),
                20, "the lost backend told")
        log = cluster.processes["balancer"].logText()
        assert "control channel: 127.0.0.1:" in log and "proved the secret for the admin channel" in log
        assert "admin channel: 127.0.0.1:" in log and "proved the secret for the control channel" in log
        # A wrong secret is still just that.
        bad = secretFile(tmp_path, "bad", b"not-the-secret-at-all!")
        r = subprocess.run(
            adminCommand(cluster.admin, [f"--secret-file={bad}", "status"]),
            capture_output=True, text=True, timeout=60, env=cluster.env,
        )
        assert r.returncode == 4 and "wrong secret" in r.stderr
    finally:
        cluster.stopAll()
