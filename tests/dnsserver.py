"""
An authoritative DNS server (twisted.names) on loopback for the tests of
balancers found by SRV: ``python -m tests.dnsserver PORT ZONEFILE``.  The
zone is a Python source zone file (L{PySourceAuthority}'s format) that the
test rewrites; it is read again whenever it has been replaced.
"""

import os
import sys

from twisted.internet import reactor
from twisted.names import dns, server
from twisted.names.authority import PySourceAuthority


class ReloadingAuthority(PySourceAuthority):
    def __init__(self, filename):
        self.filename = filename
        self.stamp = self._stamp()
        super().__init__(filename)

    def _stamp(self):
        st = os.stat(self.filename)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _lookup(self, name, cls, type, timeout=None):
        stamp = self._stamp()
        if stamp != self.stamp:
            self.stamp = stamp
            self.loadFile(self.filename)
        return super()._lookup(name, cls, type, timeout)


def main(port, zonefile):
    factory = server.DNSServerFactory(authorities=[ReloadingAuthority(zonefile)])
    factory.noisy = False
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print(f"dns server on 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
