"""
The client side of redirect mode: a Twisted client endpoint that asks a
balancer's redirect listener which backend to use, then connects there.

    endpoint = RedirectClientEndpoint(reactor, balancerEndpoint)
    protocol = await endpoint.connect(factory)

or, from any Twisted program, C{clientFromString(reactor,
"cluster:host=LB:port=8002")} (the string parser is the plugin in
C{twisted/plugins/twistedcluster_endpoints.py}).

The balancer answers one line, ``HOST PORT\\r\\n`` or ``ERROR no-backend\\r\\n``
(see L{twistedcluster.wire.redirectline}), and is then out of the data path.  A backend
the balancer names may still refuse or not answer (it died a moment ago, its
advertised address is wrong): then the endpoint asks the balancer again, a
bounded number of times.  L{parseAnswer} is a pure function; the rest is the
I/O around it.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import attr
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedcluster.address import formatHostPort, tcpEndpoint
from twistedcluster.wire.redirectline import (
    MAX_ANSWER_LENGTH,
    NO_BACKEND_CODE,
    ErrorAnswer,
    errorText,
    parseLine,
)

__all__ = [
    "Attempt",
    "BackendAddress",
    "BackendsUnreachable",
    "BadAnswer",
    "BalancerClosed",
    "BalancerError",
    "BalancerUnreachable",
    "DEFAULT_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "MAX_ANSWER_LENGTH",
    "NoBackendAvailable",
    "RedirectClientEndpoint",
    "RedirectFailed",
    "askBalancer",
    "parseAnswer",
    "parseEndpointArguments",
    "redirectEndpoint",
    "tcpEndpoint",
]

log = Logger()

#: Backends tried for one connection (one question to the balancer each).
DEFAULT_ATTEMPTS = 3
#: Seconds allowed for the balancer to answer, and for a backend to accept.
DEFAULT_TIMEOUT = 5.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class BackendAddress:
    """
    A backend as the balancer named it.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return formatHostPort(self.host, self.port)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Attempt:
    """
    One backend the endpoint tried, and why that did not work.
    """

    backend: BackendAddress
    reason: str

    def __str__(self) -> str:
        return f"{self.backend} ({self.reason})"


class RedirectFailed(Exception):
    """
    Base of the errors of redirect mode: no connection to a backend was made.

    @ivar reason: what went wrong, for humans.
    @ivar tried: the backends tried before giving up, as L{Attempt}s.
    """

    def __init__(self, reason: str, tried: Sequence[Attempt] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tried: Tuple[Attempt, ...] = tuple(tried)

    def __str__(self) -> str:
        if not self.tried:
            return self.reason
        return f"{self.reason}; tried {_triedText(self.tried)}"


#: The most distinct attempts an error names; more are counted.
NAMED_ATTEMPTS = 10


def _triedText(tried: Sequence[Attempt]) -> str:
    """
    The attempts, in order, the same one in a row said once with how many
    times, and at most L{NAMED_ATTEMPTS} named: a client with attempts=100000
    against a balancer that names one dead backend must not print them all.
    """
    runs: List[List] = []
    for attempt in tried:
        if runs and runs[-1][0] == attempt:
            runs[-1][1] += 1
        else:
            runs.append([attempt, 1])
    named = [f"{a}" + (f" x{n}" if n > 1 else "") for a, n in runs[:NAMED_ATTEMPTS]]
    rest = sum(n for _, n in runs[NAMED_ATTEMPTS:])
    if rest:
        named.append(f"and {rest} more")
    return ", ".join(named)


class BalancerUnreachable(RedirectFailed):
    """
    The balancer's redirect listener could not be reached, or did not answer
    in time.
    """


class BalancerClosed(BalancerUnreachable):
    """
    The balancer accepted the connection and closed it without a word (at
    its connection limit, say, or stopping).
    """


class BadAnswer(RedirectFailed):
    """
    The balancer answered something that is not a redirect line: the address
    is probably not a redirect listener.
    """


class BalancerError(RedirectFailed):
    """
    The balancer answered ``ERROR CODE``.

    @ivar code: the CODE.
    """

    def __init__(self, code: str, tried: Sequence[Attempt] = ()) -> None:
        super().__init__(f"the balancer answered {errorText(code)}", tried)
        self.code = code


class NoBackendAvailable(BalancerError):
    """
    The balancer has no backend to offer (``ERROR no-backend``).
    """

    def __init__(
        self, code: str = NO_BACKEND_CODE, tried: Sequence[Attempt] = ()
    ) -> None:
        super().__init__(code, tried)
        self.reason = (
            f"no backend available (the balancer answered {errorText(code)})"
        )


class BackendsUnreachable(RedirectFailed):
    """
    Every backend the balancer named, for as many questions as allowed,
    refused or did not accept in time.
    """


def parseAnswer(line: bytes) -> BackendAddress:
    """
    Parse one answer of a redirect listener, with or without its line end
    (L{twistedcluster.wire.redirectline.parseLine} says what it accepts).

    @raise NoBackendAvailable: for ``ERROR no-backend``.
    @raise BalancerError: for any other ``ERROR CODE``.
    @raise BadAnswer: for anything else.
    """
    try:
        host, port = parseLine(line)
    except ErrorAnswer as e:
        if e.code == NO_BACKEND_CODE:
            raise NoBackendAvailable() from None
        raise BalancerError(e.code) from None
    except ValueError as e:
        raise BadAnswer(str(e)) from None
    return BackendAddress(host, port)


class _AnswerReader(Protocol):
    """
    Reads the balancer's one line, bounded in length, then hangs up.

    @ivar answer: fires with the L{BackendAddress}, or fails with a
        L{RedirectFailed}; cancelling it aborts the connection.
    """

    def __init__(self, description: str) -> None:
        self._description = description
        self._buffer = b""
        self.answer: defer.Deferred[BackendAddress] = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.answer.called:
            return
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0 and len(self._buffer) <= MAX_ANSWER_LENGTH:
            return
        line = self._buffer if end < 0 else self._buffer[: end + 1]
        self._buffer = b""
        # Fire first: a transport may report connectionLost synchronously.
        try:
            address = parseAnswer(line)
        except BadAnswer as e:
            self.answer.errback(
                BadAnswer(f"not a redirect listener at {self._description}? {e.reason}")
            )
            self.transport.abortConnection()
        except RedirectFailed as e:
            self.answer.errback(e)
            self.transport.abortConnection()
        else:
            self.answer.callback(address)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        if self.answer.called:
            return
        if not self._buffer:
            self.answer.errback(
                BalancerClosed(
                    f"the balancer at {self._description} closed the connection "
                    f"without answering"
                )
            )
            return
        self.answer.errback(
            BadAnswer(
                f"the balancer at {self._description} closed the connection "
                f"without a full answer line after {self._buffer[:80]!r}"
            )
        )


def askBalancer(
    balancer: IStreamClientEndpoint,
    clock: IReactorTime,
    timeout: float = DEFAULT_TIMEOUT,
    description: Optional[str] = None,
) -> defer.Deferred[BackendAddress]:
    """
    Ask a redirect listener once which backend to use.

    @param timeout: seconds for connecting and getting the line, together.
    @param description: how to name the balancer in errors.
    @return: fires with the L{BackendAddress}, or fails with
        L{BalancerUnreachable} (L{BalancerClosed} when it closed without a
        word), L{BadAnswer} or L{BalancerError}.
    """
    what = description if description is not None else repr(balancer)
    reader = _AnswerReader(what)

    def unreachable(f: Failure) -> Failure:
        if f.check(defer.CancelledError, error.ConnectingCancelledError):
            return f
        raise BalancerUnreachable(
            f"cannot reach the balancer at {what}: {f.getErrorMessage()}"
        )

    def silent(value: object, timeout: float) -> object:
        if not isinstance(value, Failure):
            return value
        raise BalancerUnreachable(
            f"the balancer at {what} did not answer within {timeout:g} s"
        )

    factory = Factory.forProtocol(lambda: reader)
    factory.noisy = False
    asking = balancer.connect(factory)
    asking.addCallbacks(lambda _: reader.answer, unreachable)
    asking.addTimeout(timeout, clock, onTimeoutCancel=silent)
    return asking


@implementer(IStreamClientEndpoint)
class RedirectClientEndpoint:
    """
    Connects to the backend a balancer's redirect listener names.

    For each L{connect}: ask the balancer, connect to the backend it names
    with the caller's factory; if that backend refuses or does not accept
    within C{connectTimeout}, ask again, up to C{attempts} backends.  An
    address that already failed during this connect is not dialled again
    (the balancer does not know it failed, and may name it twice); it still
    counts as an attempt.

    @param reactor: provides C{IReactorTCP} (for the default backend
        endpoints) and C{IReactorTime} unless C{clock} is given.
    @param balancer: a client endpoint for the balancer's redirect listener.
    @param backendEndpoint: makes the endpoint for a named backend; defaults
        to L{tcpEndpoint}.  Tests inject fakes; TLS users may wrap.
    """

    def __init__(
        self,
        reactor,
        balancer: IStreamClientEndpoint,
        attempts: int = DEFAULT_ATTEMPTS,
        answerTimeout: float = DEFAULT_TIMEOUT,
        connectTimeout: float = DEFAULT_TIMEOUT,
        clock: Optional[IReactorTime] = None,
        backendEndpoint: Optional[
            Callable[[BackendAddress], IStreamClientEndpoint]
        ] = None,
        description: Optional[str] = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts}")
        if not answerTimeout > 0 or not connectTimeout > 0:
            raise ValueError("timeouts must be > 0")
        self._clock = clock if clock is not None else reactor
        self.balancer = balancer
        self.attempts = attempts
        self.answerTimeout = answerTimeout
        self.connectTimeout = connectTimeout
        self.description = description if description is not None else repr(balancer)
        if backendEndpoint is None:

            def backendEndpoint(address: BackendAddress) -> IStreamClientEndpoint:
                return tcpEndpoint(reactor, address.host, address.port, connectTimeout)

        self._backendEndpoint = backendEndpoint

    def __repr__(self) -> str:
        return (
            f"<RedirectClientEndpoint balancer={self.description} "
            f"attempts={self.attempts}>"
        )

    def ask(self) -> defer.Deferred[BackendAddress]:
        """
        Ask the balancer once which backend to use, without connecting to it.
        """
        return askBalancer(
            self.balancer, self._clock, self.answerTimeout, self.description
        )

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        tried: List[Attempt] = []
        failed = set()
        for attempt in range(1, self.attempts + 1):
            try:
                backend = await self.ask()
            except RedirectFailed as e:
                e.tried = tuple(tried)
                raise
            if backend in failed:
                tried.append(Attempt(backend, "named again after it failed"))
                log.info(
                    "redirect: balancer {balancer} named {backend} again, which "
                    "failed already (attempt {attempt}/{attempts})",
                    balancer=self.description,
                    backend=str(backend),
                    attempt=attempt,
                    attempts=self.attempts,
                )
                continue
            connecting = self._backendEndpoint(backend).connect(protocolFactory)
            connecting.addTimeout(
                self.connectTimeout, self._clock, onTimeoutCancel=_connectTimedOut
            )
            try:
                return await connecting
            except _BACKEND_FAILURES as e:
                # Refused, timed out, a name that does not resolve
                # (DNSLookupError is no ConnectError), the connection lost
                # at once: this backend failed, another may not.  (What the
                # caller's own factory raises is the caller's: it goes up.)
                reason = _describe(e, self.connectTimeout)
                failed.add(backend)
                tried.append(Attempt(backend, reason))
                log.info(
                    "redirect: backend {backend} named by {balancer} failed: "
                    "{reason} (attempt {attempt}/{attempts})",
                    backend=str(backend),
                    balancer=self.description,
                    reason=reason,
                    attempt=attempt,
                    attempts=self.attempts,
                )
        raise BackendsUnreachable(
            f"no backend named by the balancer at {self.description} accepted a "
            f"connection in {self.attempts} attempt"
            f"{'' if self.attempts == 1 else 's'}",
            tried,
        )


#: How a connect to a named backend fails on the backend's account.
_BACKEND_FAILURES = (
    error.ConnectError,
    error.DNSLookupError,
    error.ConnectionClosed,
    OSError,
)


def _connectTimedOut(value: object, timeout: float) -> object:
    """
    A backend connect that timed out is a backend failure, like a refusal.
    """
    if not isinstance(value, Failure):
        return value
    raise error.TimeoutError(f"no answer within {timeout:g} s")


def _describe(e: Exception, timeout: float) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(e, error.DNSLookupError):
        return f"its name does not resolve ({e})"
    return str(e) or type(e).__name__


def redirectEndpoint(
    reactor,
    host: str,
    port: int,
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = DEFAULT_ATTEMPTS,
) -> RedirectClientEndpoint:
    """
    The endpoint for the redirect listener at C{host}:C{port} over TCP; what
    C{cluster:host=HOST:port=PORT:timeout=T:attempts=N} builds.
    """
    return RedirectClientEndpoint(
        reactor,
        tcpEndpoint(reactor, host, port, timeout),
        attempts=attempts,
        answerTimeout=timeout,
        connectTimeout=timeout,
        description=formatHostPort(host, port),
    )


def parseEndpointArguments(
    *args: str, **kwargs: str
) -> Tuple[str, int, float, int]:
    """
    The arguments of a C{cluster:} endpoint string as values: C{host},
    C{port}, C{timeout}, C{attempts}; C{ValueError} naming what is wrong.
    Positional C{cluster:HOST:PORT} works too, as with C{tcp:}.
    """
    names = ["host", "port"]
    if len(args) > len(names):
        raise ValueError(f"cluster: too many positional arguments: {args!r}")
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in values:
            raise ValueError(f"cluster: {key} given twice")
        values[key] = value
    unknown = set(values) - {"host", "port", "timeout", "attempts"}
    if unknown:
        raise ValueError(
            f"cluster: unknown argument {', '.join(sorted(unknown))} "
            f"(known: host, port, timeout, attempts)"
        )
    if "host" not in values or "port" not in values:
        raise ValueError("cluster: host and port are required (cluster:host=H:port=P)")
    host = values["host"]
    if not host:
        raise ValueError("cluster: host is empty")
    try:
        port = int(values["port"])
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"cluster: port {values['port']!r} is not in 1..65535") from None
    try:
        timeout = float(values.get("timeout", DEFAULT_TIMEOUT))
        if not 0 < timeout < float("inf"):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"cluster: timeout {values['timeout']!r} is not a number of seconds > 0"
        ) from None
    try:
        attempts = int(values.get("attempts", DEFAULT_ATTEMPTS))
        if attempts < 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"cluster: attempts {values['attempts']!r} is not a whole number >= 1"
        ) from None
    return host, port, timeout, attempts
