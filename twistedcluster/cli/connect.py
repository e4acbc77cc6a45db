"""
``cluster-connect``: redirect mode for programs that are not written with
Twisted, and a small ``nc`` for machines that have none.

    cluster-connect [--timeout S] [--attempts N] [-v] BALANCER_HOST:PORT
    cluster-connect --print [--timeout S] BALANCER_HOST:PORT
    cluster-connect --direct [--timeout S] HOST:PORT

Every address may also be C{unix:PATH}, a unix socket (a balancer listening
on C{unix:/run/lb.sock}).

Without C{--print} or C{--direct} it asks the balancer's redirect listener
which backend to use, connects there (asking again if that backend is
unreachable) and relays standard input to the backend and the backend's
bytes to standard output.  End of standard input half-closes the connection
(C{shutdown(SHUT_WR)}), so the backend sees it and can still answer; the
program exits when both directions are finished.

Exit status: 0 done; 1 no backend (the balancer has none, or none it named
accepted the connection); 2 bad usage; 3 the balancer (with C{--direct},
HOST:PORT) could not be reached, did not answer in time, or answered
something that is not a redirect; with C{--direct}, 1 also when HOST:PORT
closed the connection without sending a byte (what a balancer with no backend
available does); 4 the connection broke (reset) before the
server had finished; 130 interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedcluster.address import parseHostPort
from twistedcluster.cli.common import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CommandFailed, react
from twistedcluster.client.redirectclient import (
    DEFAULT_ATTEMPTS,
    DEFAULT_TIMEOUT,
    BackendsUnreachable,
    BadAnswer,
    BalancerError,
    BalancerUnreachable,
    RedirectClientEndpoint,
    redirectEndpoint,
    tcpEndpoint,
)
from twistedcluster.fast.transports import endWrites
from twistedcluster.wire.redirectline import hostPortText

__all__ = [
    "CommandFailed",
    "EXIT_BROKEN",
    "EXIT_INTERRUPTED",
    "EXIT_NO_BACKEND",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "StdioRelay",
    "main",
    "parser",
    "run",
]

#: No backend: the balancer has none, or none it named accepted.
EXIT_NO_BACKEND = 1
#: The connection broke (reset) before the server had finished.
EXIT_BROKEN = 4
#: Interrupted (Ctrl-C, SIGTERM).
EXIT_INTERRUPTED = 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cluster-connect",
        description="Ask a twistedcluster balancer's redirect listener which "
        "backend to use and connect standard input and output to it (like nc).",
        epilog="Exit status: 0 done; 1 no backend available or none accepted "
        "(with --direct: closed without sending a byte); "
        "2 bad usage; 3 balancer (or, with --direct, HOST:PORT) unreachable, "
        "silent or not a redirect listener; 4 connection broke; 130 interrupted.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--print",
        action="store_true",
        help="print the backend the balancer names, as 'HOST PORT', and exit",
    )
    mode.add_argument(
        "--direct",
        action="store_true",
        help="connect straight to HOST:PORT (e.g. the proxy listener), no redirect",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"for the balancer to answer and for the backend to accept "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=DEFAULT_ATTEMPTS,
        metavar="N",
        help=f"backends tried before giving up (default {DEFAULT_ATTEMPTS})",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="say on standard error which backend is used and each retry",
    )
    p.add_argument(
        "address",
        metavar="HOST:PORT",
        help="the balancer's redirect listener ([::1]:8002 for IPv6, "
        "unix:PATH for a unix socket); with --direct, where to connect",
    )
    return p


@implementer(IHalfCloseableProtocol)
class _NetworkSide(Protocol):
    def __init__(self, relay: "StdioRelay") -> None:
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        self.relay.fromNetwork(data)

    def readConnectionLost(self) -> None:
        self.relay.networkReadDone()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        self.relay.networkLost(reason)


@implementer(IHalfCloseableProtocol)
class _StdioSide(Protocol):
    def __init__(self, relay: "StdioRelay") -> None:
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        self.relay.network.write(data)

    def readConnectionLost(self) -> None:
        self.relay.stdinDone()

    def writeConnectionLost(self) -> None:
        self.relay.stdoutDone()

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        self.relay.stdoutDone()


class StdioRelay:
    """
    Relays bytes between standard input/output and one connection, both
    ways, with backpressure, passing end-of-file on as a half-close.

    Finished when the connection is closed and everything it sent has been
    written out: either both directions saw end-of-file, or the connection
    went away.

    @ivar done: fires with the exit status.
    """

    def __init__(self) -> None:
        self.done: defer.Deferred[int] = defer.Deferred()
        self.network = None
        self.stdio = None
        self._stdinDone = False
        self._networkReadDone = False
        self._networkLost = False
        self._stdoutDone = False
        self._stdoutClosing = False
        self._broken = False
        self._early: list = []
        #: Whether the server sent anything at all.
        self.received = False

    def networkProtocol(self) -> Protocol:
        return _NetworkSide(self)

    def fromNetwork(self, data: bytes) -> None:
        self.received = True
        if self.stdio is None:  # before start(): keep it for then
            self._early.append(data)
        else:
            self.stdio.write(data)

    def start(self, networkProtocol: _NetworkSide, makeStdio) -> None:
        """
        Start relaying once the connection is made.

        @param makeStdio: called with the stdio-side protocol; returns its
            transport (C{StandardIO} in the program, a fake in tests).
        """
        self.network = networkProtocol.transport
        self.stdio = makeStdio(_StdioSide(self))
        for data in self._early:
            self.stdio.write(data)
        del self._early[:]
        self.network.registerProducer(self.stdio, True)
        self.stdio.registerProducer(self.network, True)

    def stdinDone(self) -> None:
        if self._stdinDone:
            return
        self._stdinDone = True
        if not self._networkLost:
            self.network.unregisterProducer()
            endWrites(self.network)
        self._check()

    def networkReadDone(self) -> None:
        self._networkReadDone = True
        self._closeStdout()

    def networkLost(self, reason: Failure) -> None:
        self._networkLost = True
        if not self._networkReadDone and not reason.check(error.ConnectionDone):
            self._broken = True
        self._networkReadDone = True
        if not self._stdinDone and self.stdio is not None:
            self.stdio.pauseProducing()
        self._closeStdout()
        self._check()

    def stdoutDone(self) -> None:
        self._stdoutDone = True
        self._check()

    def _closeStdout(self) -> None:
        if self._stdoutClosing or self.stdio is None:
            return
        self._stdoutClosing = True
        # Unregister first: the writer would otherwise stop the network side
        # (its producer) when it closes, while standard input may still have
        # bytes for the server.
        self.stdio.unregisterProducer()
        self.stdio.loseWriteConnection()

    def _check(self) -> None:
        if self.done.called:
            return
        if self._stdoutDone and not self._networkLost:
            if self._stdinDone or not self._networkReadDone:
                # Both directions finished, or nowhere left to write what
                # the server sends: close the connection.
                self.network.loseConnection()
            return
        if self._stdoutDone and self._networkLost:
            self.done.callback(EXIT_BROKEN if self._broken else EXIT_OK)


def _stderrLog(verbose: bool) -> None:
    """
    With C{-v}, our own log events (which backend failed, retries) go to
    standard error, one short line each.
    """
    if not verbose:
        return
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    def observer(event) -> None:
        if event.get("log_namespace", "").startswith("twistedcluster") and event.get(
            "log_level", LogLevel.info
        ) >= LogLevel.info:
            sys.stderr.write(f"cluster-connect: {formatEvent(event)}\n")
            sys.stderr.flush()

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def run(reactor, args, makeStdio=None) -> int:
    """
    Do what the parsed command line asks; return the exit status or raise
    L{CommandFailed}.
    """
    unixPath = None
    if args.address.startswith("unix:"):
        unixPath = args.address[len("unix:"):]
        if not unixPath:
            raise CommandFailed("unix: needs a path (unix:/run/lb.sock)", EXIT_USAGE)
    else:
        try:
            host, port = parseHostPort(args.address)
        except ValueError as e:
            raise CommandFailed(str(e), EXIT_USAGE) from None
    if not args.timeout > 0:
        raise CommandFailed("--timeout must be > 0", EXIT_USAGE)
    if args.attempts < 1:
        raise CommandFailed("--attempts must be >= 1", EXIT_USAGE)
    if makeStdio is None:
        from twisted.internet.stdio import StandardIO

        def makeStdio(proto):
            return StandardIO(proto, reactor=reactor)

    target = args.address
    if unixPath is not None:
        from twisted.internet.endpoints import UNIXClientEndpoint

        direct = UNIXClientEndpoint(reactor, unixPath, timeout=args.timeout)
        if args.direct:
            endpoint = direct
        else:
            endpoint = RedirectClientEndpoint(
                reactor,
                direct,
                attempts=args.attempts,
                answerTimeout=args.timeout,
                connectTimeout=args.timeout,
                description=target,
            )
    elif args.direct:
        endpoint = tcpEndpoint(reactor, host, port, args.timeout)
    else:
        endpoint = redirectEndpoint(reactor, host, port, args.timeout, args.attempts)
    try:
        if args.print:
            backend = await endpoint.ask()
            sys.stdout.write(hostPortText(backend.host, backend.port) + "\n")
            sys.stdout.flush()
            return EXIT_OK
        relay = StdioRelay()
        factory = Factory.forProtocol(relay.networkProtocol)
        factory.noisy = False
        proto = await endpoint.connect(factory)
    except (BalancerError, BackendsUnreachable) as e:
        raise CommandFailed(str(e), EXIT_NO_BACKEND) from None
    except (BalancerUnreachable, BadAnswer) as e:
        raise CommandFailed(str(e), EXIT_UNREACHABLE) from None
    except (error.ConnectError, error.DNSLookupError) as e:
        # --direct only: the redirect endpoint raises the errors above.
        reason = (
            f"no answer within {args.timeout:g} s"
            if isinstance(e, error.TimeoutError)
            else "connection refused"
            if isinstance(e, error.ConnectionRefusedError)
            else str(e)
        )
        raise CommandFailed(f"cannot connect to {target}: {reason}", EXIT_UNREACHABLE) from None
    if args.verbose:
        peer = proto.transport.getPeer()
        sys.stderr.write(f"cluster-connect: connected to {peer.host} {peer.port}\n")
    relay.start(proto, makeStdio)
    code = await relay.done
    if code == EXIT_BROKEN:
        sys.stderr.write("cluster-connect: the connection broke\n")
    elif args.direct and not relay.received:
        # A balancer with no backend available closes its client without a
        # word: exit 0 would read as "served".
        raise CommandFailed(
            f"{target} closed the connection without sending anything "
            "(a balancer does that when no backend is available)",
            EXIT_NO_BACKEND,
        )
    return code


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    _stderrLog(args.verbose)
    react("cluster-connect", lambda reactor: run(reactor, args), EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
