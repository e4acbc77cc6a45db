"""
Who is the client, end to end, with real processes on loopback: a client
connecting from 127.0.0.5, through the balancer sending the PROXY protocol
(C{--send-proxy}), to a backend that reads it (C{--listen haproxy:tcp:...});
checked by peers nobody here wrote: Debian's nginx behind the balancer
(C{listen ... proxy_protocol}), HAProxy in front of it (C{send-proxy-v2}).
"""

import shutil
import socket
import subprocess
import time

import pytest

from twistedcluster.localcluster import LocalCluster, Process, echoOnce, freePort, waitFor

pytestmark = pytest.mark.e2e

CLIENT = "127.0.0.5"
WHOAMI = "--service=twistedcluster.backend.whoami.site"


def httpGet(port, source=CLIENT, path="/"):
    """
    GET C{path} from C{source}: the body.
    """
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], data[:200]
    return body.decode()


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path)
    yield c
    c.stopAll()


def proxiedBackend(cluster, name, service=WHOAMI):
    port = freePort()
    return cluster.startBackend(
        name,
        port=port,
        extra=[f"--listen=haproxy:tcp:{port}:interface=127.0.0.1", service, "--report-interval=0.2"],
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_web_backend_sees_the_client_not_the_balancer(cluster, version):
    cluster.startBalancer(extra=[f"--send-proxy={version}"])
    proxiedBackend(cluster, "web")
    cluster.waitUp(["web"])
    body = httpGet(cluster.port)
    assert body.startswith(f"you are {CLIENT} port "), body
    assert f"sends a PROXY {version} header" in cluster.processes["balancer"].logText()


def test_the_echo_backend_behind_proxy_counts_and_drains(cluster):
    cluster.startBalancer(extra=["--send-proxy=v2"])
    proxiedBackend(cluster, "echo", service="--service=echo")
    cluster.waitUp(["echo"])
    assert echoOnce("127.0.0.1", cluster.port, b"half-close " * 1000) == b"half-close " * 1000
    # Held open: the backend counts it (its report), then drains with it open.
    s = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    try:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        cluster.waitForStatus(lambda st: st["echo"]["connections"] == 1, 20, "the connection counted")
        proc = cluster.processes["echo"]
        proc.signal(15)
        cluster.waitForStatus(lambda st: st["echo"]["state"] != "up", 20, "the backend draining")
        s.sendall(b"y")
        assert s.recv(1) == b"y"  # still served while draining
    finally:
        s.close()
    # Its last connection gone, the backend exits by itself.
    waitFor(lambda: not proc.alive(), 20, "the backend to exit")
    assert proc.popen.returncode in (0, -15)  # as test_e2e: twistd may end by the signal
    assert "drained: no connection left" in proc.logText()


def test_garbage_at_the_balancer_is_refused_logged_and_it_keeps_serving(cluster):
    port = freePort()
    cluster.startBalancer(
        port=port, extra=[f"--listen=haproxy:tcp:{port}:interface=127.0.0.1", "--send-proxy=v1"]
    )
    proxiedBackend(cluster, "web")
    cluster.waitUp(["web"])
    for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", b"PROXY TCP4 1.2"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(garbage)
            if garbage.endswith(b"1.2"):
                s.shutdown(socket.SHUT_WR)  # truncated: the end comes first
            assert s.recv(100) == b""
    log = cluster.processes["balancer"]
    waitFor(lambda: log.logText().count("PROXY header") >= 3, 10, "the refusals logged")
    # A client that sends a header is served, under its own name.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 198.51.100.4 127.0.0.1 4321 80\r\nGET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.endswith(b"you are 198.51.100.4 port 4321\n"), data


# -- peers nobody here wrote ---------------------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if shutil.os.path.exists("/usr/sbin/nginx") else None)
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if shutil.os.path.exists("/usr/sbin/haproxy") else None
)


def startNginx(tmp_path, port, tls=""):
    """
    nginx reading the PROXY protocol on C{port}; C{tls}: C{ssl} and its
    certificate directives, for TLS after the header.
    """
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    log_format client '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    access_log {tmp_path}/nginx-access.log client;
    server {{
        listen 127.0.0.1:{port} {"ssl" if tls else ""} proxy_protocol;
        {tls}
        location / {{ return 200 "nginx saw $proxy_protocol_addr\\n"; }}
    }}
}}
""")
    proc = Process("nginx", [NGINX, "-e", str(tmp_path / "nginx-error.log"), "-c", str(conf)],
                   tmp_path / "nginx.out")
    return proc


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it with apt)")
@pytest.mark.parametrize(
    "version, tls", [("v1", False), ("v2", False), ("v2", True), ("v1,static", False)]
)
def test_nginx_behind_the_balancer_logs_the_client(cluster, tmp_path, version, tls):
    nginxPort = freePort()
    extra = []
    directives = ""
    if tls:
        # The header in clear, then TLS: nginx's "listen ... ssl proxy_protocol".
        from .certificates import Authority, writePair

        ca = Authority()
        key, cert = writePair(tmp_path, "nginx", *ca.issue("nginx", ips=["127.0.0.1"]))
        directives = f"ssl_certificate {cert}; ssl_certificate_key {key};"
        extra = [f"--backend-tls=ca={ca.writeCA(tmp_path / 'ca')}"]
    nginx = startNginx(tmp_path, nginxPort, directives)
    try:
        waitFor(lambda: cluster._connectable(nginxPort), 20, "nginx to listen")
        if version.endswith(",static"):  # that backend's own setting
            options = [f"--backend=127.0.0.1:{nginxPort},send-proxy={version.split(',')[0]}"]
        else:
            options = [f"--send-proxy={version}", f"--backend=127.0.0.1:{nginxPort}"]
        cluster.startBalancer(extra=[*options, "--check-interval=0.2", "--rise=1", *extra])
        cluster.waitForStatus(
            lambda st: any(b["state"] == "up" for b in st.values()), 20, "nginx up"
        )
        assert httpGet(cluster.port) == f"nginx saw {CLIENT}\n"
        access = tmp_path / "nginx-access.log"
        waitFor(lambda: access.exists() and access.read_text().strip(), 10, "nginx's access log")
        addr, port, remote = access.read_text().strip().splitlines()[-1].split()
        assert addr == CLIENT and remote == "127.0.0.1"  # the balancer connected; the client was 127.0.0.5
        assert port.isdigit() and port != "0"
    finally:
        nginx.stop()


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it with apt)")
def test_haproxy_in_front_then_the_balancer_then_the_backend(cluster, tmp_path):
    port = freePort()
    cluster.startBalancer(
        port=port, extra=[f"--listen=haproxy:tcp:{port}:interface=127.0.0.1", "--send-proxy=v2"]
    )
    proxiedBackend(cluster, "web")
    cluster.waitUp(["web"])
    front = freePort()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{front}
    default_backend balancer
backend balancer
    server balancer 127.0.0.1:{port} send-proxy-v2
""")
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    haproxy = Process("haproxy", [HAPROXY, "-db", "-f", str(cfg)], tmp_path / "haproxy.out")
    try:
        waitFor(lambda: cluster._connectable(front), 20, "haproxy to listen")
        body = httpGet(front)
        assert body.startswith(f"you are {CLIENT} port "), body
    finally:
        haproxy.stop()
