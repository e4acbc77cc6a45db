"""
How the proxy connects to a backend: one operation, C{dial}, two ways to
do it, chosen once by the reactor (L{dialerFor}) and injectable.

C{dial(host, port, protocol, failed)} connects a ready-made protocol: its
C{connectionMade} says the connect succeeded; C{failed(reason)} is called
(always on a later turn) if it did not.  It returns a callable that
abandons the connect, after which neither happens.

  - L{FastDialer}, for reactors that poll file descriptors (production on
    Linux): an address literal is dialled by L{twistedcluster.fast.fasttcp}
    (a loopback connect completes inside C{dial}); a host name through a
    Twisted endpoint, which resolves it.
  - L{ReactorDialer}, for any other reactor (a test's memory reactor), and
    for every reactor when Twisted's internals failed the canary
    (L{twistedcluster.fast.internals.fastPaths}): C{connectTCP} for a
    literal, the same endpoint for a name.
"""

from __future__ import annotations

import socket
from typing import Callable, Dict, Tuple

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import ConnectBindError, ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from twistedcluster.fast import internals
from twistedcluster.address import tcpEndpoint
from twistedcluster.fast.fasttcp import Dialled

Failed = Callable[[Failure], None]
Abandon = Callable[[], None]

#: Endpoints kept for backends advertised by host name, at most.
_ENDPOINT_CACHE = 4096


class _OneProtocol(ClientFactory):
    """
    The client factory Twisted's connect calls need, for one ready-made
    protocol.
    """

    noisy = False

    def __init__(self, protocol: Protocol, failed: Failed) -> None:
        self.protocol = protocol
        self.failed = failed

    def buildProtocol(self, addr) -> Protocol:
        return self.protocol

    def clientConnectionFailed(self, connector, reason) -> None:
        self.failed(reason)


class _Dialer:
    """
    What both dialers share: host names go through (cached) endpoints.

    @param timeout: seconds a connect may take.
    """

    def __init__(self, reactor, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self._endpoints: Dict[Tuple[str, int], IStreamClientEndpoint] = {}
        #: Whether each host dialled is an address literal.
        self._literal: Dict[str, bool] = {}

    def dial(self, host: str, port: int, protocol: Protocol, failed: Failed) -> Abandon:
        literal = self._literal.get(host)
        if literal is None:
            # Asked once per host: a connection's worth of parsing saved.
            if len(self._literal) > _ENDPOINT_CACHE:
                self._literal.clear()
            literal = self._literal[host] = isIPAddress(host) or isIPv6Address(host)
        if literal:
            return self._dialAddress(host, port, protocol, failed)
        d = self.endpointFor(host, port).connect(_OneProtocol(protocol, failed))
        d.addErrback(failed)
        return d.cancel

    def _dialAddress(self, host: str, port: int, protocol: Protocol, failed: Failed) -> Abandon:
        raise NotImplementedError()

    def endpointFor(self, host: str, port: int) -> IStreamClientEndpoint:
        """
        The (cached) endpoint for a backend advertised by host name.
        """
        key = (host, port)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) > _ENDPOINT_CACHE:
                self._endpoints.clear()
            ep = self._endpoints[key] = tcpEndpoint(self.reactor, host, port, self.timeout)
        return ep


class FastDialer(_Dialer):
    """
    Address literals through L{Dialled}: fewer system calls and reactor
    turns than Twisted's connector.
    """

    def _dialAddress(self, host: str, port: int, protocol: Protocol, failed: Failed) -> Abandon:
        try:
            connection = Dialled(self.reactor, host, port, protocol, self.timeout, failed)
        except OSError as e:
            # A failed connect, reported on a later turn as Twisted's
            # connectors do: the backend's address is unusable (an unknown
            # scope), or there is no socket here (out of descriptors).
            if isinstance(e, socket.gaierror):
                why = ConnectError(string=f"unusable address {host}: {e}")
            else:
                why = ConnectBindError(e.errno, e.strerror)
            call = self.reactor.callLater(0, failed, Failure(why))
            return lambda: call.cancel() if call.active() else None
        connection.dial()
        return connection.abandon


class ReactorDialer(_Dialer):
    """
    Address literals through the reactor's C{connectTCP}.
    """

    def _dialAddress(self, host: str, port: int, protocol: Protocol, failed: Failed) -> Abandon:
        connector = self.reactor.connectTCP(
            host, port, _OneProtocol(protocol, failed), timeout=self.timeout
        )
        return connector.stopConnecting


def dialerFor(reactor, timeout: float) -> _Dialer:
    """
    The dialer for C{reactor}: L{FastDialer} where it polls file
    descriptors (and Twisted passed the canary), L{ReactorDialer}
    elsewhere.
    """
    if isinstance(reactor, PosixReactorBase) and internals.fastPaths():
        return FastDialer(reactor, timeout)
    return ReactorDialer(reactor, timeout)
