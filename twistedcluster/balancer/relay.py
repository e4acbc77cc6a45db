"""
The relay: bytes from one connection to another, both ways, until both ends
are done.

Each side is a L{Relay} protocol; L{Relay.link} pairs two.  What one side
reads, its peer writes; each transport is the other's streaming producer, so
a fast sender is paused as soon as the slow side's write buffer fills.
End-of-file read on one side becomes a write shutdown on the other
(half-close), and a reset is passed on as a reset, so that a peer cannot
mistake a cut-off stream for a complete one.

Between plain TCP sockets the relay writes, shuts down and closes through
L{twistedcluster.fast.fasttcp}, and a bulk stream moves to splice(2) (L{Splicer}):
the kernel relays it through a pipe, never copied into Python.  Where
Twisted's transports are not plain TCP (TLS, unix sockets, tests' string
transports), Twisted's own generic paths are used.

What this module does not know: who the peers are, pools, backends,
timeouts; L{twistedcluster.balancer.proxy} builds on it.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Optional

from twisted.internet import main
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twistedcluster.fast import internals
from twistedcluster.fast.fasttcp import (
    loseConnectionNow,
    loseWriteConnectionNow,
    plainTCP,
    prepare,
    sendNow,
)
from twistedcluster.fast.transports import endWrites, unsentBytes

log = Logger()

#: Zero-copy relaying needs Linux's splice(2).
SPLICE = sys.platform.startswith("linux") and hasattr(os, "splice")
#: A direction switches to splice after this many reads of at least
#: LARGE_READ bytes: bulk streams do, request/response traffic never does
#: (its small reads are cheaper through recv and send than a pipe's two
#: extra descriptors per connection would be).
SPLICE_AFTER = 8
LARGE_READ = 32 * 1024
#: A splice pipe's capacity: the most one direction holds in the kernel
#: while its sink is slow.  Large pipes move a bulk stream in fewer, larger
#: splices, so fewer system calls and reactor turns per megabyte than the
#: default 64 KiB (the figures are in docs/benchmarks.md).  Linux caps it at /proc/sys/fs/pipe-max-size; an
#: unprivileged user past pipe-user-pages-soft gets the default size.
PIPE_SIZE = 1 << 20
_DEFAULT_PIPE_SIZE = 1 << 16
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE else 0


class Splicer:
    """
    One direction of a relay moved by the kernel: source socket, pipe, sink
    socket (splice(2)), never copied into Python.

    It stands in for the source transport's C{doRead}; when the sink cannot
    take what is in the pipe, the source stops reading (that is the
    back-pressure: at most a pipe's worth, L{PIPE_SIZE}, is held) and the
    sink's C{doWrite} drains the pipe.  End-of-file and a clean close of the sink
    wait until the pipe is empty.
    """

    def __init__(self, source: "Relay", sink: "Relay") -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.capacity = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over pipe-max-size, or the user's pipe quota
            self.capacity = _DEFAULT_PIPE_SIZE
        self.source = source
        self.src = source.transport
        self.dst = sink.transport
        self.srcFd = self.src.fileno()
        self.dstFd = self.dst.fileno()
        self.pending = 0
        self.eofWaiting = False
        self.closeWaiting = False
        internals.replaceDoRead(self.src, self.doRead)
        sink._inbound = self

    def doRead(self):
        if self.pending:
            # Called while the pipe still waits on the sink (someone else
            # resumed the source): wait with it, or the full pipe would make
            # this spin.
            self.src.stopReading()
            return None
        try:
            n = os.splice(self.srcFd, self.w, self.capacity, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if n == 0:
            return main.CONNECTION_DONE
        self.pending += n
        source = self.source
        source.received += n
        if source.seconds is not None:
            source.lastActivity = source.seconds()
        self._drain()
        return None

    def _drain(self) -> None:
        while self.pending:
            try:
                m = os.splice(self.r, self.dstFd, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError:
                # The sink is broken (reset, or a broken pipe).  The socket
                # reported that once, to this splice: a read of it now would
                # see only a clean end of file.  So the sink is lost, and
                # said so (its protocol then resets the source, as any lost
                # side does); read no more meanwhile.
                self.src.stopReading()
                self.dst.abortConnection()
                return
            if m == 0:
                break
            self.pending -= m
        if self.pending:
            self.src.stopReading()
            internals.replaceDoWrite(self.dst, self._sinkWritable)
            self.dst.startWriting()

    def _sinkWritable(self):
        self._drain()
        if not self.pending:
            dst = self.dst
            internals.restoreDoWrite(dst)  # Twisted's own again
            if dst.disconnecting or internals.writeShutdownAsked(dst):
                # A close asked for meanwhile: let Twisted finish it.
                return dst.doWrite()
            dst.stopWriting()
            src = self.src
            if src.connected and not src.disconnecting and not self.eofWaiting:
                src.startReading()
            self._drained()
        return None

    def _drained(self) -> None:
        if self.eofWaiting:
            self.eofWaiting = False
            self.dst.loseWriteConnection()
        if self.closeWaiting:
            # The source closed cleanly while the pipe was full: the relay
            # is over once the sink has it all.
            self.closeWaiting = False
            self.dst.loseConnection()
            self.stop()

    def stop(self) -> None:
        """
        The relay is over: give the descriptors back.
        """
        if self.r >= 0:
            os.close(self.r)
            os.close(self.w)
            self.r = self.w = -1
            self.pending = 0
        internals.restoreDoRead(self.src)
        internals.restoreDoWrite(self.dst)


@implementer(IHalfCloseableProtocol)
class Relay(Protocol):
    """
    One side of a relayed connection: what it reads, its peer writes.

    Half-close: end-of-file read here becomes a write shutdown on the peer;
    this side's transport closes once both its directions are done.

    @ivar seconds: the clock's C{seconds}, when the connection has an idle
        timeout; then C{lastActivity} records when data last came in here.
    @ivar received: bytes read on this side (spliced ones included).
    """

    peer: Optional["Relay"] = None
    received = 0
    seconds = None
    lastActivity = 0.0
    _readDone = False
    _writeDone = False
    #: This side's transport, and the peer's, are plain TCP (fasttcp).
    _plain = False
    _direct = False
    _largeReads = 0
    _splicer: Optional[Splicer] = None
    _inbound: Optional[Splicer] = None

    def link(self, peer: "Relay") -> None:
        """
        Relay between this side and C{peer}, each pausing the other when its
        write buffer is full.
        """
        self.peer = peer
        peer.peer = self
        self.transport.registerProducer(peer.transport, True)
        peer.transport.registerProducer(self.transport, True)
        selfPlain = plainTCP(self.transport)
        peerPlain = plainTCP(peer.transport)
        if selfPlain:
            prepare(self.transport)
        if peerPlain:
            prepare(peer.transport)
        self._plain = peer._direct = selfPlain
        peer._plain = self._direct = peerPlain

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is not None:
            if self._direct:
                sendNow(peer.transport, data)
                if len(data) >= LARGE_READ:
                    self._bulk(peer)
            else:
                peer.transport.write(data)
            if self.seconds is not None:
                self.lastActivity = self.seconds()

    def _bulk(self, peer: "Relay") -> None:
        """
        Another large read: after enough of them, move this direction to
        splice, once nothing is queued in Twisted ahead of the pipe.
        """
        self._largeReads += 1
        if (
            SPLICE
            and self._largeReads >= SPLICE_AFTER
            and self._splicer is None
            and peer._direct  # this side is plain TCP too
            and not unsentBytes(peer.transport)
        ):
            try:
                self._splicer = Splicer(self, peer)
            except OSError as e:  # out of descriptors: recv and send do
                log.info("relay: no splice for this connection: {error}", error=e)
                self._largeReads = -(10**9)

    def readConnectionLost(self) -> None:
        self._readDone = True
        peer = self.peer
        if peer is not None:
            splicer = self._splicer
            if splicer is not None and splicer.pending:
                splicer.eofWaiting = True
            elif self._direct:
                if peer._readDone:
                    # Both ways are over: close the peer outright (the close
                    # is its end-of-file), one shutdown() fewer.
                    loseConnectionNow(peer.transport)
                else:
                    loseWriteConnectionNow(peer.transport)
            else:
                endWrites(peer.transport)
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self._writeDone = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self._readDone and self._writeDone:
            if self._plain:
                loseConnectionNow(self.transport)
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        inbound, self._inbound = self._inbound, None
        if inbound is not None:
            # Nothing more can reach this side, whoever feeds it.
            inbound.stop()
        peer, self.peer = self.peer, None
        splicer = self._splicer
        if peer is not None:
            peer.peer = None
            peer._splicer = None
            if isinstance(reason.value, ConnectionDone):
                # A clean end: what was written to the peer is flushed, then
                # it closes (after the pipe, when splicing).
                if splicer is not None and splicer.pending:
                    splicer.closeWaiting = True
                    return
                if self._direct:
                    loseConnectionNow(peer.transport)
                else:
                    peer.transport.loseConnection()
            else:
                # Reset, or lost: pass that on as a reset, so that the peer
                # cannot mistake a cut-off stream for a complete one.
                peer.transport.abortConnection()
        if splicer is not None:
            splicer.stop()
            self._splicer = None
