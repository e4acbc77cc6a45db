"""
Count a service's open connections without changing its behaviour.

The backend's load report is built on this count.  Twisted's own
C{WrappingFactory} would do, but its wrapper stands in for the transport too
(every write goes through it), hides half-close from the wrapped protocol,
and declares the transport's interfaces on each wrapper instance, which
makes zope.interface build and resolve a new specification for every
connection, work that grows the backend's CPU per new connection (measured
with bench/profile_balancer.py --process backend --loads connect; see
docs/benchmarks.md).

Here the service's protocol gets the real transport; the wrapper only
passes the transport's events on, and declares the optional event
interfaces the service's protocol has (half-close, TLS handshake) on one
class per combination, built once, which it takes on once the service's
protocol is connected.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Set, Tuple

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    ILoggingContext,
    IProtocol,
)
from twisted.internet.protocol import Factory
from zope.interface import classImplements, implementer


def _logPrefix(wrapped) -> str:
    """
    What C{wrapped} (the service's protocol or factory) is called in logs:
    its own log prefix, or its class name when it has none (a service's
    factory need only provide IProtocolFactory).
    """
    if ILoggingContext.providedBy(wrapped):
        return wrapped.logPrefix()
    return wrapped.__class__.__name__


@implementer(IProtocol, ILoggingContext)
class _Counted:
    """
    Between a transport and the service's protocol: counts the connection
    while it is open.
    """

    __slots__ = ("factory", "wrapped", "transport", "__weakref__")

    def __init__(self, factory: "CountingFactory", wrapped) -> None:
        self.factory = factory
        self.wrapped = wrapped
        self.transport = None

    def logPrefix(self) -> str:
        # The transport names itself, and the legacy log context, after its
        # protocol: the service's.
        return _logPrefix(self.wrapped)

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.factory._opened(self)
        try:
            self.wrapped.makeConnection(transport)
        finally:
            # Transports look for the optional event interfaces later (at end
            # of input, at the TLS handshake); a protocol may declare them as
            # late as its connectionMade, and keeps them if that raised (the
            # connection carries on, as it would unwrapped).
            cls = _wrapperClass(self.wrapped)
            if cls is not _Counted:
                self.__class__ = cls

    def connectionMade(self) -> None:
        # makeConnection does the service's; nothing calls this one.
        pass

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.factory._closed(self)
        self.wrapped.connectionLost(reason)


class _HalfCloseable:
    __slots__ = ()

    def readConnectionLost(self) -> None:
        self.wrapped.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrapped.writeConnectionLost()


class _HandshakeListener:
    __slots__ = ()

    def handshakeCompleted(self) -> None:
        self.wrapped.handshakeCompleted()


# Event interfaces a transport looks for on its protocol, and the mixin
# that passes each on.
_OPTIONAL = ((IHalfCloseableProtocol, _HalfCloseable), (IHandshakeListener, _HandshakeListener))
_classes: Dict[Tuple[bool, ...], type] = {}


def _wrapperClass(protocol) -> type:
    """
    The wrapper class for C{protocol}: providing exactly the optional event
    interfaces it provides.
    """
    key = tuple(iface.providedBy(protocol) for iface, _ in _OPTIONAL)
    cls = _classes.get(key)
    if cls is None:
        chosen = [(iface, mixin) for (iface, mixin), has in zip(_OPTIONAL, key) if has]
        bases = tuple(mixin for _, mixin in chosen) + (_Counted,)
        cls = type("_Counted", bases, {"__slots__": ()}) if chosen else _Counted
        for iface, _ in chosen:
            classImplements(cls, iface)
        _classes[key] = cls
    return cls


class CountingFactory(Factory):
    """
    Wraps a service factory; calls C{onChange(count)} whenever the number of
    open connections changes.
    """

    noisy = False

    def __init__(self, wrappedFactory, onChange: Optional[Callable[[int], None]] = None):
        self.wrappedFactory = wrappedFactory
        self.onChange = onChange
        self._open: Set[_Counted] = set()

    @property
    def count(self) -> int:
        return len(self._open)

    def logPrefix(self) -> str:
        return _logPrefix(self.wrappedFactory)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return _Counted(self, protocol)

    def _opened(self, p: _Counted) -> None:
        self._open.add(p)
        self._changed()

    def _closed(self, p: _Counted) -> None:
        if p in self._open:
            self._open.remove(p)
            self._changed()

    def _changed(self) -> None:
        if self.onChange is not None:
            self.onChange(len(self._open))

    def closeAll(self) -> None:
        """
        Abort every open connection (the drain deadline has passed).
        """
        for p in list(self._open):
            if p.transport is not None:
                p.transport.abortConnection()
