"""
TLS on both sides of the proxy, end to end with real processes and
certificates made here: clients to the proxy listener (C{--listen ssl:...}),
the balancer to its backends (C{--backend-tls}), certificate and host name
checked; a backend with a wrong certificate is a failed connect, logged
with the reason, and its clients go to another backend.
"""

import socket
import ssl

import pytest
from cryptography.hazmat.primitives import serialization

from twistedcluster.localcluster import LocalCluster, freePort, waitFor

from .certificates import Authority, writePair

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(), Authority("rogue CA")
    files = {"ca": ca.writeCA(d / "ca"), "rogueCA": rogue.writeCA(d / "rogue"), "authority": ca}
    files["good"] = writePair(d, "good", *ca.issue("backend", ips=["127.0.0.1"]))
    files["rogue"] = writePair(d, "rogue", *rogue.issue("backend", ips=["127.0.0.1"]))
    files["misnamed"] = writePair(d, "misnamed", *ca.issue("other", dns=["other.example"]))
    files["named"] = writePair(d, "named", *ca.issue("web", dns=["web.internal"]))
    files["proxy"] = writePair(d, "proxy", *ca.issue("localhost", ips=["127.0.0.1"]))
    return files


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path)
    yield c
    c.stopAll()


def tlsBackend(cluster, name, pair):
    key, cert = pair
    port = freePort()
    return cluster.startBackend(
        name,
        port=port,
        extra=[
            f"--listen=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            "--report-interval=0.2",
        ],
    )


def exchange(port, payload=b"ping over tls", context=None):
    """
    Send C{payload}, read as much back, close: request and response, as
    most TLS traffic is.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
    with s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def test_backend_tls_verifies_and_a_wrong_certificate_is_a_failed_connect(cluster, pki):
    cluster.startBalancer(extra=[f"--backend-tls=ca={pki['ca']}", "--policy=round-robin"])
    tlsBackend(cluster, "good", pki["good"])
    tlsBackend(cluster, "rogue", pki["rogue"])
    tlsBackend(cluster, "misnamed", pki["misnamed"])
    cluster.waitUp(["good", "rogue", "misnamed"])
    for i in range(6):
        assert exchange(cluster.port, b"ping %d" % i) == b"ping %d" % i
    status = cluster.status()
    assert status["good"]["routed"] == 6
    log = cluster.processes["balancer"]
    waitFor(lambda: "certificate verify failed" in log.logText(), 10, "the rogue's refusal logged")
    text = log.logText()
    assert "connect to backend rogue at 127.0.0.1" in text
    assert "connect to backend misnamed at 127.0.0.1" in text
    misnamed = [line for line in text.splitlines() if "backend misnamed" in line and "TLS" in line]
    assert misnamed and "IPAddressMismatch" in misnamed[0]  # why, said
    assert "speaks TLS to every backend" in text


def test_backend_tls_with_a_hostname_for_all_backends(cluster, pki):
    cluster.startBalancer(extra=[f"--backend-tls=ca={pki['ca']},hostname=web.internal"])
    tlsBackend(cluster, "named", pki["named"])
    cluster.waitUp(["named"])
    assert exchange(cluster.port) == b"ping over tls"


def test_tls_termination_on_the_proxy_listener(cluster, pki):
    key, cert = pki["proxy"]
    port = freePort()
    cluster.startBalancer(
        port=port, extra=[f"--listen=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
    )
    cluster.startBackend("plain", extra=["--report-interval=0.2"])
    cluster.waitUp(["plain"])
    context = ssl.create_default_context(
        cadata=pki["authority"].cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    assert exchange(port, b"x" * 100000, context) == b"x" * 100000


@pytest.mark.parametrize(
    "value, why",
    [
        ("hostname=x", "give ca=PATH"),
        ("ca=/no/such/file", "No such file"),
        ("ca=system,cert=/x", "go together"),
        ("ca=system,colour=blue", "unknown key"),
        ("ca", "not KEY=VALUE"),
    ],
)
def test_bad_backend_tls_values_are_refused_clearly(value, why):
    from twisted.python import usage

    from twistedcluster.balancer.service import Options

    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions([f"--backend-tls={value}"])
    assert "--backend-tls" in str(e.value) and why in str(e.value)
