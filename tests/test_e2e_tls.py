"""
TLS on the control and admin channels, end to end: the balancer listens with
``ssl:`` (or ``mtls:`` for client certificates), backends and cluster-admin
connect with Twisted's ``tls:`` client strings, which verify the balancer's
certificate and host name.
"""


import pytest

from twistedcluster.localcluster import LocalCluster, echoOnce, freePort, waitFor

from .certificates import Authority, writePair

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(), Authority("rogue CA")
    ca.writeCA(d / "ca")
    rogue.writeCA(d / "rogue")
    files = {"dir": d, "ca": d / "ca", "rogue": d / "rogue", "caFile": d / "ca" / "ca.pem"}
    files["serverKey"], files["serverCert"] = writePair(
        d, "server", *ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"])
    )
    files["clientKey"], files["clientCert"] = writePair(
        d, "backend", *ca.issue("backend", client=True)
    )
    files["rogueKey"], files["rogueCert"] = writePair(
        d, "intruder", *rogue.issue("intruder", client=True)
    )
    return files


def tlsBalancer(cluster, pki, kind="ssl"):
    cluster.controlPort = freePort()
    cluster.adminPort = freePort()
    server = f"privateKey={pki['serverKey']}:certKey={pki['serverCert']}"
    extra = f":caCerts={pki['caFile']}" if kind == "mtls" else ""
    args = [
        f"--control={kind}:{cluster.controlPort}:interface=127.0.0.1:{server}{extra}",
        f"--admin={kind}:{cluster.adminPort}:interface=127.0.0.1:{server}{extra}",
    ]
    return args


def clientString(port, pki, trust="ca", cert=None):
    s = f"tls:host=localhost:port={port}:trustRoots={pki[trust]}"
    if cert:
        s += f":certificate={pki[cert + 'Cert']}:privateKey={pki[cert + 'Key']}"
    return s


class TLSCluster(LocalCluster):
    adminString = None

    @property
    def admin(self):
        return self.adminString


def start(tmp_path, pki, kind):
    cluster = TLSCluster(tmp_path)
    args = tlsBalancer(cluster, pki, kind)
    cluster.startBalancer(controlPort=cluster.controlPort, adminPort=cluster.adminPort, extra=args)
    return cluster


def backend(cluster, pki, name, **kw):
    return cluster.startBackend(
        name,
        balancers=[clientString(cluster.controlPort, pki, **kw)],
        extra=["--report-interval=0.2"],
    )


def test_tls_happy_path_and_an_untrusted_certificate(tmp_path, pki):
    cluster = start(tmp_path, pki, "ssl")
    try:
        cluster.adminString = clientString(cluster.adminPort, pki)
        backend(cluster, pki, "trusting")
        sceptic = backend(cluster, pki, "sceptic", trust="rogue")
        cluster.waitUp(["trusting"])
        waitFor(lambda: "certificate verify failed" in sceptic.logText(), 20, "the sceptic's TLS error")
        assert "TLS handshake" in sceptic.logText() and "trustRoots" in sceptic.logText()
        assert set(cluster.status()) == {"trusting"}
        assert echoOnce("127.0.0.1", cluster.port, b"over tls control") == b"over tls control"
        # cluster-admin that does not trust the balancer's certificate: refused.
        cluster.adminString = clientString(cluster.adminPort, pki, trust="rogue")
        r = cluster.adminRun("status", check=False)
        assert r.returncode == 3 and "certificate verify failed" in r.stderr
        assert "TLS handshake failed" in r.stderr
    finally:
        cluster.stopAll()


def test_mutual_tls_requires_a_client_certificate(tmp_path, pki):
    cluster = start(tmp_path, pki, "mtls")
    try:
        cluster.adminString = clientString(cluster.adminPort, pki, cert="client")
        backend(cluster, pki, "certified", cert="client")
        anonymous = backend(cluster, pki, "anonymous")
        impostor = backend(cluster, pki, "impostor", cert="rogue")
        cluster.waitUp(["certified"])
        waitFor(
            lambda: "failed" in anonymous.logText() and "failed" in impostor.logText(),
            20,
            "the uncertified backends to fail",
        )
        assert set(cluster.status()) == {"certified"}
        cluster.adminString = clientString(cluster.adminPort, pki)  # no client certificate
        r = cluster.adminRun("status", check=False)
        assert r.returncode == 3
    finally:
        cluster.stopAll()
