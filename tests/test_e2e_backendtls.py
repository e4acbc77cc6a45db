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
    # Failed connects are summed once a second: the second backend's may
    # come in the line after.
    waitFor(lambda: "connect to backend misnamed" in log.logText(), 10, "the misnamed one's")
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


class ThreadServer:
    """
    A backend of the standard library's own (OpenSSL's TLS, not Twisted's),
    one thread per connection: C{serve(sock)} runs for each accepted socket.
    Connections that fail before serving (the balancer's health checks, which
    connect and close) are ignored.
    """

    def __init__(self, serve):
        import threading

        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(sock,), daemon=True).start()

    def _one(self, sock):
        try:
            with sock:
                sock.settimeout(10)
                self.seen.append(self.serve(sock))
        except (OSError, ValueError):
            pass

    def close(self):
        self.listener.close()


def test_a_clients_end_reaches_a_tls_backend_as_a_close_notify(cluster, pki):
    # A plain client sends its request and ends its side (SHUT_WR); the
    # backend, over TLS, must read that as TLS's end (close_notify), not as
    # a truncated stream, and answer. Before, the balancer shut TCP down
    # beneath TLS: OpenSSL backends saw an unexpected EOF, and the balancer
    # blamed them for resets until it took them out.
    import hashlib

    key, cert = pki["good"]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)

    def digestUntilEnd(sock):
        tls = server.wrap_socket(sock, server_side=True, suppress_ragged_eofs=False)
        digest = hashlib.sha256()
        try:
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                digest.update(chunk)
        except ssl.SSLEOFError:
            return "truncated"
        tls.sendall(digest.hexdigest().encode())
        tls.unwrap()
        return "ended"

    backend = ThreadServer(digestUntilEnd)
    try:
        cluster.startBalancer(extra=[
            f"--backend-tls=ca={pki['ca']}", f"--backend=digest=127.0.0.1:{backend.port}",
            "--eject-after=1",
        ])
        cluster.waitUp(["digest"])
        # Small requests too: Twisted holds TLS writes under 64 KiB until the
        # next turn, and the close_notify must not overtake them.
        for payload in [b"small request"] * 3 + [b"request " * 12500] * 3:
            with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            assert got == hashlib.sha256(payload).hexdigest().encode()
        assert "truncated" not in backend.seen and backend.seen.count("ended") == 6
        log = cluster.processes["balancer"].logText()
        assert "before sending anything" not in log and "taken out" not in log
        assert cluster.status()["digest"]["state"] == "up"
    finally:
        backend.close()


def test_a_backends_end_reaches_a_tls_client_as_a_close_notify(cluster, pki):
    # The other way: the backend answers and closes (HTTP/1.0 style); the
    # TLS client must see TLS's end, not a truncation, and its own
    # close_notify in return is no error. Its ClientHello offers ALPN, as
    # curl's and browsers' do: the listener, which speaks no application
    # protocol, completes the handshake choosing none.
    def answerAndClose(sock):
        request = b""
        while not request.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                return "no request"
            request += chunk
        sock.sendall(b"answer to " + request)
        return "answered"

    backend = ThreadServer(answerAndClose)
    key, cert = pki["proxy"]
    port = freePort()
    try:
        cluster.startBalancer(port=port, extra=[
            f"--listen=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            f"--backend=plain=127.0.0.1:{backend.port}",
        ])
        cluster.waitUp(["plain"])
        context = ssl.create_default_context(
            cadata=pki["authority"].cert.public_bytes(serialization.Encoding.PEM).decode()
        )
        context.set_alpn_protocols(["h2", "http/1.1"])
        for i in range(5):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with context.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as tls:
                assert tls.selected_alpn_protocol() is None
                tls.sendall(b"request %d\n" % i)
                got = b""
                while True:
                    chunk = tls.recv(65536)  # SSLEOFError on a truncation
                    if not chunk:
                        break
                    got += chunk
                assert got == b"answer to request %d\n" % i
                tls.unwrap()  # close_notify back, as curl sends
        assert backend.seen.count("answered") == 5
        balancerLog = cluster.processes["balancer"].logText()
        assert "Traceback" not in balancerLog and "Unhandled" not in balancerLog, balancerLog[-3000:]
    finally:
        backend.close()


def test_a_backend_that_wants_a_client_certificate_says_why_it_ends_connections(cluster, pki):
    # Under TLS 1.3 the balancer's handshake is over before the backend
    # checks the balancer's certificate (here: it has none to give), so the
    # refusal comes as an alert after the client's first bytes: the log says
    # what the backend said, not only "reset".
    key, cert = pki["good"]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    server.load_verify_locations(cafile=str(pki["ca"]))
    server.verify_mode = ssl.CERT_REQUIRED

    def wantsACertificate(sock):
        tls = server.wrap_socket(sock, server_side=True)
        tls.recv(100)
        return "served"

    backend = ThreadServer(wantsACertificate)
    try:
        cluster.startBalancer(extra=[
            f"--backend-tls=ca={pki['ca']}", f"--backend=mtls=127.0.0.1:{backend.port}",
        ])
        cluster.waitUp(["mtls"])
        for _ in range(2):
            try:
                exchange(cluster.port, b"hello")
            except OSError:
                pass  # a reset: what the client gets
        log = cluster.processes["balancer"]
        waitFor(lambda: "before sending anything" in log.logText(), 10, "the backend's refusal logged")
        [line] = [l for l in log.logText().splitlines() if "before sending anything" in l][:1]
        assert "TLS:" in line and "certificate" in line, line
    finally:
        backend.close()
