"""
Listen backlogs: every listener the balancer and the backend open holds a
burst (issue 13, item 2) unless its endpoint string names a backlog.
"""

import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from twistedcluster.backend import service as backend

from twistedcluster.balancer import service as balancer
from twistedcluster.balancer.listeners import defaultBacklog, withBacklog

B = 4321


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:8000", "tcp:8000:backlog=4321"),
        ("tcp:8100:interface=127.0.0.1", "tcp:8100:interface=127.0.0.1:backlog=4321"),
        (r"tcp6:8000:interface=\:\:1", r"tcp6:8000:interface=\:\:1:backlog=4321"),
        ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem:backlog=4321"),
        ("unix:/run/lb.sock", "unix:/run/lb.sock:backlog=4321"),
        ("mtls:8100:privateKey=k:caCerts=ca", "mtls:8100:privateKey=k:caCerts=ca:backlog=4321"),
        ("tls:/etc/certs:port=443", "tls:/etc/certs:port=443:backlog=4321"),
        ("TCP:8000", "TCP:8000:backlog=4321"),
        # Wrapping endpoints: the wrapped one gets it.
        ("haproxy:tcp:8000", "haproxy:tcp:8000:backlog=4321"),
        # Named already, by keyword or by position: kept.
        ("tcp:8000:backlog=7", "tcp:8000:backlog=7"),
        ("tcp:8000:127.0.0.1:7", "tcp:8000:127.0.0.1:7"),
        ("tcp6:8000:7", "tcp6:8000:7"),
        ("unix:/s:600:7", "unix:/s:600:7"),
        ("haproxy:tcp:8000:backlog=7", "haproxy:tcp:8000:backlog=7"),
        # Kinds that take no backlog: the socket is made elsewhere (systemd's
        # Backlog=), or the kind is unknown.
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ("haproxy:systemd:domain=INET:index=0", "haproxy:systemd:domain=INET:index=0"),
        ("stdio:", "stdio:"),
        ("someplugin:8000", "someplugin:8000"),
        # A trailing escape would swallow the added colon: left alone.
        ("unix:/odd\\", "unix:/odd\\"),
    ],
)
def test_withBacklog(description, expected):
    assert withBacklog(description, B) == expected


def test_the_default_is_the_systems_somaxconn(tmp_path):
    f = tmp_path / "somaxconn"
    f.write_text("8192\n")
    assert defaultBacklog(str(f)) == 8192
    assert withBacklog("tcp:1") == f"tcp:1:backlog={defaultBacklog()}"


def test_without_somaxconn_the_default_is_4096(tmp_path):
    assert defaultBacklog(str(tmp_path / "missing")) == 4096
    bad = tmp_path / "bad"
    bad.write_text("lots")
    assert defaultBacklog(str(bad)) == 4096


def startBalancer(tmp_path, *args):
    o = balancer.Options()
    o.parseOptions([
        "--listen=tcp:8000:interface=127.0.0.1",
        "--redirect=tcp:8002:interface=127.0.0.1",
        "--metrics=tcp:8003:interface=127.0.0.1",
        f"--admin=unix:{tmp_path}/admin.sock",
        *args,
    ])
    memory = MemoryReactorClock()
    svc = balancer.makeService(o, memory)
    svc.privilegedStartService()
    svc.startService()
    tcp = {port: backlog for port, _, backlog, _ in memory.tcpServers}
    unix = {path: backlog for path, _, backlog, _, _ in memory.unixServers}
    svc.stopService()
    return tcp, unix


def test_every_balancer_listener_defaults_to_the_burst_backlog(tmp_path):
    tcp, unix = startBalancer(tmp_path)
    # proxy, redirect, metrics, control
    assert tcp == {8000: defaultBacklog(), 8002: defaultBacklog(), 8003: defaultBacklog(),
                   8100: defaultBacklog()}
    assert unix == {f"{tmp_path}/admin.sock": defaultBacklog()}


def test_a_backlog_the_endpoint_names_is_kept(tmp_path):
    tcp, _ = startBalancer(tmp_path, "--listen=tcp:8000:interface=127.0.0.1:backlog=7")
    assert tcp[8000] == 7
    assert tcp[8002] == defaultBacklog()


def test_the_backends_service_listener_defaults_to_the_burst_backlog():
    memory = MemoryReactorClock()
    o = backend.Options()
    o.parseOptions(["--listen=tcp:9000:interface=127.0.0.1"])
    svc = backend.makeService(o, memory)
    svc.privilegedStartService()
    [(port, _, backlog, _)] = memory.tcpServers
    assert (port, backlog) == (9000, defaultBacklog())


def listenQueueLimit(port) -> int:
    """
    The listening socket's backlog as the kernel holds it: Linux's TCP_INFO
    reports it as tcpi_sacked for a listening socket (what ss -ltn shows as
    Send-Q).
    """
    s = socket.socket(fileno=socket.dup(port.fileno()))
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    finally:
        s.close()
    return struct.unpack_from("I", info, 28)[0]


@pytest_twisted.ensureDeferred
async def test_the_backlog_reaches_the_kernel():
    port = await serverFromString(reactor, withBacklog("tcp:0:interface=127.0.0.1")).listen(
        Factory.forProtocol(Protocol)
    )
    try:
        assert listenQueueLimit(port) == defaultBacklog()
    finally:
        await port.stopListening()


# -- a listener that cannot open ------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("plugin, option", [
    ("cluster-balancer", "--listen"),
    ("cluster-balancer", "--admin"),
    ("cluster-backend", "--listen"),
])
def test_a_port_in_use_is_one_clear_line(plugin, option, tmp_path):
    """
    twistd with a port another process holds exits non-zero with one line
    naming the listener and the reason, not Twisted's forty-line traceback.
    """
    import subprocess
    import sys

    from twistedcluster.localcluster import freePort, twistdCommand

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [f"{option}=tcp:{port}:interface=127.0.0.1"]
        if plugin == "cluster-balancer":
            for other in ("--listen", "--control", "--admin"):
                if other != option:
                    args.append(f"{other}=tcp:{freePort()}:interface=127.0.0.1")
        command = twistdCommand(plugin, args)
        command.remove("--logfile=-")  # the log to stdout, as twistd -n does
        r = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    role = {"--listen": "proxy" if plugin == "cluster-balancer" else "service",
            "--admin": "admin"}[option]
    line = (
        f"{plugin}: cannot open the {role} listener tcp:{port}:interface=127.0.0.1: "
        "address already in use (another process listens there: stop it, or "
        "choose another endpoint)"
    )
    assert r.returncode != 0
    output = r.stdout + r.stderr
    assert "Traceback" not in output, output
    # twistd -n logs to standard output: the line is there, once.
    [logged] = [x for x in output.splitlines() if "cannot open the" in x]
    assert logged.endswith(f"#critical] {line}"), output
    assert r.stderr == ""
    # Logging to a file, the file says it, and so does standard error.
    logFile = tmp_path / "twistd.log"
    command[command.index("-n") + 1:command.index("-n") + 1] = [f"--logfile={logFile}"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.splitlines() == [line], r.stderr
    assert f"#critical] {line}" in logFile.read_text()
    assert "Traceback" not in logFile.read_text() + r.stdout
