"""
TLS from the balancer to its backends (C{--backend-tls}): what the option
says, and the client TLS options for each backend.

The value is comma-separated C{key=value} pairs, the syntax of C{--backend}
(issue 18), so that one option carries everything TLS to backends needs and
can grow without new options:

  - C{ca=PATH}: PEM file of the authorities whose certificates the backends'
    must chain to; C{ca=system} for the system's trust store (required:
    trusting nothing by default would be an error nobody sees);
  - C{hostname=NAME}: the name every backend's certificate must carry;
    by default each backend's own advertised host (an IP address is checked
    against the certificate's IP address entries);
  - C{cert=PATH,key=PATH}: a client certificate, for backends that ask for
    one.

Certificates and names are checked by Twisted's C{optionsForClientTLS}, that
is by service-identity.
"""

from __future__ import annotations

from typing import Dict, Optional

import attr

from twistedcluster.options import keyValues

__all__ = ["BackendTLS", "parseBackendTLS"]

_KEYS = ("ca", "hostname", "cert", "key")
#: Client options kept per backend host, at most.
_CACHE = 4096


def parseBackendTLS(text: str) -> "BackendTLS":
    """
    The C{--backend-tls} value as a L{BackendTLS}, its files read;
    C{ValueError} saying what is wrong.
    """
    pairs = keyValues(text.split(","), _KEYS)
    if "ca" not in pairs:
        raise ValueError("give ca=PATH (a PEM file of authorities) or ca=system")
    if ("cert" in pairs) != ("key" in pairs):
        raise ValueError("cert= and key= go together")
    from twisted.internet import ssl

    if pairs["ca"] == "system":
        trust = ssl.platformTrust()
    else:
        pem = _read(pairs["ca"], "ca")
        blocks = [b for b in pem.split(b"-----END CERTIFICATE-----") if b"-----BEGIN CERTIFICATE-----" in b]
        if not blocks:
            raise ValueError(f"ca={pairs['ca']}: no PEM certificate in it")
        try:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(b + b"-----END CERTIFICATE-----\n") for b in blocks]
            )
        except Exception as e:
            raise ValueError(f"ca={pairs['ca']}: {e}") from None
    client = None
    if "cert" in pairs:
        try:
            client = ssl.PrivateCertificate.loadPEM(
                _read(pairs["cert"], "cert") + b"\n" + _read(pairs["key"], "key")
            )
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"cert={pairs['cert']}, key={pairs['key']}: {e}") from None
    return BackendTLS(trust=trust, hostname=pairs.get("hostname"), client=client, text=text)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{key}={path}: {e.strerror}") from None


@attr.s(eq=False)
class BackendTLS:
    """
    How the balancer speaks TLS to backends.

    @ivar trust: the trust root backends' certificates must chain to.
    @ivar hostname: the name each certificate must carry, or C{None} for
        the backend's own host.
    @ivar client: the balancer's client certificate, if any.
    @ivar text: the option as given, for log lines.
    """

    trust = attr.ib()
    hostname: Optional[str] = attr.ib(default=None)
    client = attr.ib(default=None)
    text: str = attr.ib(default="")
    _options: Dict[str, object] = attr.ib(factory=dict, init=False, repr=False)

    def optionsFor(self, host: str):
        """
        The client TLS options for a backend at C{host} (kept: each holds
        an OpenSSL context, made once).
        """
        name = self.hostname or host
        options = self._options.get(name)
        if options is None:
            from twisted.internet.ssl import optionsForClientTLS

            if len(self._options) >= _CACHE:
                self._options.clear()
            options = self._options[name] = optionsForClientTLS(
                name, trustRoot=self.trust, clientCertificate=self.client
            )
        return options
