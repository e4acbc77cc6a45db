"""
Count a service's open connections without changing its behaviour.

The backend's load report is built on this count.  Twisted's own
C{WrappingFactory} would do, but its wrapper hides half-close from the
wrapped protocol; this one passes it through.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import alsoProvides


class _CountedProtocol(ProtocolWrapper):
    def makeConnection(self, transport) -> None:
        super().makeConnection(transport)
        # ProtocolWrapper copies the transport's interfaces onto itself;
        # add half-close when the wrapped protocol supports it, so that the
        # transport tells it (and not us) about end-of-file.
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            alsoProvides(self, IHalfCloseableProtocol)

    def readConnectionLost(self) -> None:
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrappedProtocol.writeConnectionLost()


class CountingFactory(WrappingFactory):
    """
    Wraps a service factory; calls C{onChange(count)} whenever the number of
    open connections changes.
    """

    noisy = False

    protocol = _CountedProtocol

    def __init__(self, wrappedFactory, onChange: Optional[Callable[[int], None]] = None):
        super().__init__(wrappedFactory)
        self.onChange = onChange
        self._waiters: List = []

    @property
    def count(self) -> int:
        return len(self.protocols)

    def registerProtocol(self, p) -> None:
        super().registerProtocol(p)
        self._changed()

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        self._changed()

    def _changed(self) -> None:
        if self.onChange is not None:
            self.onChange(len(self.protocols))

    def closeAll(self) -> None:
        """
        Abort every open connection (the drain deadline has passed).
        """
        for p in list(self.protocols):
            if p.transport is not None:
                p.transport.abortConnection()
