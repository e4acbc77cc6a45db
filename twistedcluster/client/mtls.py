"""
``mtls:`` server endpoints: TLS that requires and verifies a client
certificate, for the balancer's control and admin listeners.

Twisted's ``ssl:`` server endpoint string has no way to ask for client
certificates, so mutual TLS gets its own string (parsed by the plugin in
``twisted/plugins/twistedcluster_mtls.py``)::

    mtls:8100:privateKey=server.key:certKey=server.pem:caCerts=clients-ca.pem[:interface=127.0.0.1][:backlog=50]

``caCerts`` is a PEM file of the authorities whose client certificates are
accepted; a client without such a certificate fails the TLS handshake.
Clients (backends, cluster-admin) connect with Twisted's ``tls:`` client
strings, e.g. ``tls:host=lb.example:port=8100:trustRoots=/etc/tc/ca:certificate=backend.pem:privateKey=backend.key``.
"""

from __future__ import annotations

import re

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.python.filepath import FilePath

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def loadAuthorities(path: str):
    """
    Every certificate in a PEM file, as a trust root.
    """
    from twisted.internet import ssl

    pems = _PEM_CERT.findall(FilePath(path).getContent())
    if not pems:
        raise ValueError(f"mtls: no certificate in caCerts file {path}")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])


def mutualTLSServerEndpoint(
    reactor,
    port,
    privateKey: str,
    certKey: str = None,
    caCerts: str = None,
    interface: str = "",
    backlog: int = 50,
):
    from twisted.internet import ssl

    if caCerts is None:
        raise ValueError("mtls: caCerts=PATH (the client certificates' authorities) is required")
    keyPEM = FilePath(privateKey).getContent()
    certPEM = FilePath(certKey or privateKey).getContent()
    cert = ssl.PrivateCertificate.loadPEM(certPEM + b"\n" + keyPEM)
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        # A trust root makes OpenSSL require and verify the client's
        # certificate.
        trustRoot=loadAuthorities(caCerts),
    )
    return SSL4ServerEndpoint(
        reactor, int(port), options, backlog=int(backlog), interface=interface
    )


def explainConnectError(error: BaseException) -> str:
    """
    An error's message, with a hint where a TLS failure is usually a setting
    of the client endpoint string.
    """
    message = str(error) or type(error).__name__
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - pyOpenSSL comes with twisted[tls]
        return message
    if isinstance(error, SSL.Error):
        return (
            f"TLS handshake failed: {message} (does the endpoint's trustRoots "
            "hold the CA that signed the balancer's certificate, and its host "
            "match the certificate? With mtls:, give certificate= and "
            "privateKey= too)"
        )
    return message
