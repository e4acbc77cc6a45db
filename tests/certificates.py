"""
Test certificates made on the fly with cryptography: a CA, certificates it
issues for servers and clients, written as PEM files.
"""

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _dates():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)


class Authority:
    def __init__(self, cn="twistedcluster test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        start, end = _dates()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, cn, dns=(), ips=(), client=False, alsoClient=False):
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = _dates()
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                # alsoClient: a server that dials itself with its own
                # certificate (etcd's JSON gateway under --client-cert-auth).
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                    + ([ExtendedKeyUsageOID.CLIENT_AUTH] if alsoClient else [])
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())

    def writeCA(self, directory: Path) -> Path:
        """
        The CA certificate alone in a directory (tls: trustRoots=DIR); also
        usable as a PEM file (mtls: caCerts=FILE).
        """
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "ca.pem"
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def writePair(directory: Path, name: str, key, cert):
    keyPath = directory / f"{name}.key"
    certPath = directory / f"{name}.pem"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


def loopbackTLS(directory: Path):
    """
    A server certificate for 127.0.0.1 from a new CA: the C{ssl:} server
    endpoint description on a free loopback port that serves it, and a
    client C{ssl.SSLContext} that trusts it.
    """
    import ssl

    ca = Authority()
    key, cert = writePair(directory, "server", *ca.issue("localhost", ips=["127.0.0.1"]))
    context = ssl.create_default_context(
        cadata=ca.cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}", context
