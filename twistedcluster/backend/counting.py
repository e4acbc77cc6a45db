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
passes the transport's events on, notes the service's first C{write} (a
one-shot hook on the transport instance, gone after that write: the cost
meter counts only closes of connections the service answered,
L{twistedcluster.backend.cost}), and declares the optional event
interfaces the service's protocol has (half-close, TLS handshake) on one
class per combination, built once, which it takes on once the service's
protocol is connected.

Behind a proxy that sends the PROXY protocol (C{--listen haproxy:...}), the
header is read here, before the service's protocol is connected: it is then
connected to the real transport, whose C{getPeer()} and C{getHost()} answer
what the header said (L{twistedcluster.fast.transports.showProxied}).
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
from twisted.logger import Logger
from zope.interface import classImplements, implementer

from twistedcluster.fast.transports import peerText, showProxied
from twistedcluster.summary import Summary, window
from twistedcluster.wire.proxyheader import BadProxyHeader, HeaderReader

log = Logger()

#: Seconds a client of a C{haproxy:} listener has to send its PROXY header
#: (the spec: at least 3, to cover a TCP retransmit).
PROXY_HEADER_TIMEOUT = 5.0


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

    __slots__ = ("factory", "wrapped", "transport", "served", "_awaiting", "__weakref__")

    def __init__(self, factory: "CountingFactory", wrapped) -> None:
        self.factory = factory
        self.wrapped = wrapped
        self.transport = None
        #: Whether the service wrote to the connection.
        self.served = False
        self._awaiting = None

    def logPrefix(self) -> str:
        # The transport names itself, and the legacy log context, after its
        # protocol: the service's.
        return _logPrefix(self.wrapped)

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.factory._opened(self)
        self._connectService(transport)

    def _connectService(self, transport) -> None:
        if self.factory.notesWrites:
            try:
                # Instance attributes over the transport's methods until the
                # first write; a transport that takes none counts as answered.
                transport.write = self._firstWrite
                transport.writeSequence = self._firstWriteSequence
            except AttributeError:
                self.served = True
        else:
            self.served = True
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

    def _answered(self):
        self.served = True
        transport = self.transport
        try:
            del transport.write, transport.writeSequence
        except AttributeError:
            pass
        return transport

    def _firstWrite(self, data) -> None:
        self._answered().write(data)

    def _firstWriteSequence(self, data) -> None:
        self._answered().writeSequence(data)

    def connectionMade(self) -> None:
        # makeConnection does the service's; nothing calls this one.
        pass

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.factory._closed(self)
        self.wrapped.connectionLost(reason)


class _AwaitingHeader(_Counted):
    """
    A counted connection whose PROXY header is still to come: nothing
    reaches the service's protocol until it is read; then this becomes a
    plain L{_Counted}.  C{_awaiting} holds the header's reader and deadline.
    """

    __slots__ = ()

    def makeConnection(self, transport) -> None:
        self.transport = transport
        factory = self.factory
        factory._opened(self)
        deadline = factory.clock.callLater(
            factory.proxyHeaderTimeout,
            self._refuse,
            f"no PROXY header within {factory.proxyHeaderTimeout} s",
        )
        self._awaiting = (HeaderReader(factory.proxyParsers), deadline)

    def dataReceived(self, data: bytes) -> None:
        awaiting = self._awaiting
        if awaiting is None:  # refused, closing: what follows is dropped
            return
        reader = awaiting[0]
        try:
            result = reader.feed(data)
        except BadProxyHeader as e:
            self._refuse(f"bad PROXY header: {e}")
            return
        if result is None:
            return
        self._stop()
        proxied, rest = result
        transport = self.transport
        if proxied.source is not None:
            showProxied(transport, proxied.source, proxied.destination)
        self.__class__ = _Counted
        self._connectService(transport)
        if rest and self.transport is not None:
            self.dataReceived(rest)

    def _stop(self) -> None:
        awaiting, self._awaiting = self._awaiting, None
        if awaiting is not None and awaiting[1].active():
            awaiting[1].cancel()

    def _refuse(self, why: str) -> None:
        self._stop()
        self.factory._badHeader(peerText(self.transport), why)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        # The service's protocol was never connected: only the count.
        self._stop()
        self.factory._closed(self)
        self.transport = None


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
    Wraps a service factory; calls C{onChange(count, served)} whenever the
    number of open connections changes: C{served} says, for a close,
    whether the service wrote to that connection (True for an open).

    @param proxyParsers: Twisted's PROXY header parsers
        (L{twistedcluster.fast.internals.proxyParsers}) when every client
        sends a PROXY header first; C{None} when none does.
    @param clock: schedules the header deadline and the refusals' log line.
    @param proxyHeaderTimeout: seconds a client has to send its header.
    """

    noisy = False
    #: Whether each connection notes the service's first write (C{served}
    #: in C{onChange}); a subclass that needs only the count turns it off.
    notesWrites = True
    _refusals: Optional[Summary] = None

    def __init__(
        self,
        wrappedFactory,
        onChange: Optional[Callable[[int, bool], None]] = None,
        proxyParsers=None,
        clock=None,
        proxyHeaderTimeout: float = PROXY_HEADER_TIMEOUT,
    ):
        self.wrappedFactory = wrappedFactory
        self.onChange = onChange
        self._open: Set[_Counted] = set()
        self.proxyParsers = proxyParsers
        self.clock = clock
        self.proxyHeaderTimeout = proxyHeaderTimeout
        self._protocol = _Counted if proxyParsers is None else _AwaitingHeader

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
        if self._refusals is not None:
            self._refusals.stop()

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return self._protocol(self, protocol)

    def _badHeader(self, client: str, why: str) -> None:
        """
        A client sent no valid PROXY header: closed, and said in a line
        summed once a second (a flood must not multiply it).
        """
        if self._refusals is None:
            self._refusals = Summary(self.clock, self._reportRefusals)
        self._refusals.count("refused", example=(client, why))

    def _reportRefusals(self, counts: Dict[str, int], seconds: float) -> None:
        client, why = self._refusals.last
        log.warn(
            "backend: closing client {client}: {why}; {count} client(s) closed "
            "for their PROXY header {window}",
            client=client,
            why=why,
            count=sum(counts.values()),
            window=window(seconds),
        )

    def _opened(self, p: _Counted) -> None:
        self._open.add(p)
        if self.onChange is not None:
            self.onChange(len(self._open), True)

    def _closed(self, p: _Counted) -> None:
        if p in self._open:
            self._open.remove(p)
            if self.onChange is not None:
                self.onChange(len(self._open), p.served)

    def closeAll(self) -> None:
        """
        Abort every open connection (the drain deadline has passed).
        """
        for p in list(self._open):
            if p.transport is not None:
                p.transport.abortConnection()
