"""
The backend's side of the control channel: register with each balancer and
keep reporting load.

One C{ClientService} per balancer keeps the channel up, reconnecting with
backoff; registering is its C{prepareConnection}, so a refused registration
counts as a failed connection and is retried the same way.  Reports go out
every interval, and at once when the connection count moves by a noticeable
step, or the cost by more than the balancers' cost levels tolerate, so that
balancers learn of a burst or a change of speed before the next tick.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import weakref

import attr
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from twistedcluster.address import errorText
from twistedcluster.wire import commands
from twistedcluster.wire.auth import authenticate
from twistedcluster.wire.guardedamp import GuardedAMP
from twistedcluster.client.mtls import explainConnectError

log = Logger()

DEFAULT_INTERVAL = 1.0
#: Seconds a stopping reporter waits for registrations under way to be
#: answered before it cancels them.
REGISTRATION_GRACE = 2.0
#: The least time between two reports to one balancer that its marks ask
#: for (L{LoadReporter.reportSoonTo}).
MARK_REPORT_SPACING = 0.25
#: Seconds a balancer has to answer a registration (authentication
#: included): one that accepted the connection and then never answers (a
#: host lost after the accept, a process hung) would otherwise hold this
#: channel for ever, reconnecting never.
REGISTER_TIMEOUT = 10.0
#: Seconds between tries at most once a balancer has refused the
#: registration several times in a row (the connect backoff alone stops at
#: 3 s: a log line on each side every 3 s, for ever).
REFUSED_MAX_DELAY = 30.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Identity:
    """
    How this backend names itself and where clients reach it.
    """

    name: str
    host: str
    port: int
    capacity: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Load:
    """
    One measurement: open connections, the load on the cost scale
    (connections x cost, or the service's own figure scaled to it), and
    what one connection costs in seconds (L{twistedcluster.backend.cost});
    C{None}: not measured, the balancer takes 1/capacity.
    """

    connections: int
    load: float
    cost: Optional[float] = None


def reportStep(capacity: int) -> int:
    """
    How far the connection count may move before a report goes out ahead of
    the next tick: 2% of capacity, at least one connection.
    """
    return max(1, capacity // 50)


class ControlClient(GuardedAMP):
    """
    The backend's end of one control channel.
    """

    channel = "control"
    registered = False
    #: The balancer's last mark (see L{commands.ReportLoad}), echoed in the
    #: next report; C{None} until one comes (or from a balancer without).
    mark: Optional[int] = None
    #: Whether the balancer accepted one-way reports (the answer to a
    #: C{quiet} registration): then marks come from L{commands.Mark}.
    oneWay = False

    def __init__(self, reporter: "LoadReporter", balancer: str) -> None:
        super().__init__()
        self.reporter = reporter
        self.balancer = balancer

    def markRegistered(self, oneWay: bool = False) -> None:
        self.registered = True
        self.oneWay = oneWay
        self.reporter.channels.add(self)

    def answered(self, result: dict) -> dict:
        """
        Keep the mark of a registration's or report's answer.
        """
        mark = result.get("mark")
        if mark is not None and (self.mark is None or mark > self.mark):
            self.mark = mark
        return result

    @commands.Mark.responder
    def markPushed(self, mark, reportSoon=None):
        self.answered({"mark": mark})
        if reportSoon:
            # Redirect answers naming this backend have just settled: they
            # count as added at the balancer until a report echoing this
            # mark, so one goes soon, not at the next tick.
            self.reporter.reportSoonTo(self)
        return {}

    def connectionLost(self, reason) -> None:
        if self.registered:
            self.registered = False
            self.reporter._channelLost(self, reason)
        super().connectionLost(reason)


def _answered(result: Optional[dict], proto: ControlClient) -> None:
    if result is not None:
        proto.answered(result)


class _ControlClientFactory(Factory):
    noisy = False

    def __init__(self, reporter: "LoadReporter", balancer: str) -> None:
        self.reporter = reporter
        self.balancer = balancer

    def buildProtocol(self, addr) -> ControlClient:
        return ControlClient(self.reporter, self.balancer)


@implementer(IStreamClientEndpoint)
class _Described:
    """
    A balancer's endpoint that ClientService's retry line names as the
    operator wrote it (not C{<TCP4ClientEndpoint object at 0x...>}), and
    that says why the first connect of a failing run failed.
    """

    def __init__(self, endpoint, description: str, reporter=None) -> None:
        self.endpoint = endpoint
        self.description = description
        self.reporter = reporter
        self._failing = False

    def __repr__(self) -> str:
        return self.description

    def connect(self, factory):
        def connected(proto):
            self._failing = False
            return proto

        def failed(failure):
            if not self._failing and not failure.check(defer.CancelledError):
                self._failing = True
                log.warn(
                    "cannot reach balancer {balancer}: {error}; retrying with backoff",
                    balancer=self.description,
                    error=errorText(failure),
                )
            if self.reporter is not None and not failure.check(defer.CancelledError):
                self.reporter._channelFailed(self.description)
            return failure

        return self.endpoint.connect(factory).addCallbacks(connected, failed)


class LoadReporter(MultiService):
    """
    Keeps a registered control channel to every balancer and reports load on
    each.

    @param identify: called with a connected L{ControlClient}, returns the
        L{Identity} to register (the advertised host may depend on the
        channel's local address).
    @param measure: returns the current L{Load}.
    @param balancers: (description, client endpoint) pairs.
    @param step: connection-count change that triggers a report at once
        (see L{reportStep}).
    @param secret: the balancers' shared secret, proved before registering.
    @param costMoved: asked at each change of the connection count whether
        the cost moved since it was last measured by more than the
        balancers' cost levels tolerate (L{CostMeter.moved}): then a
        report goes out at once too.
    """

    def __init__(
        self,
        clock,
        identify: Callable[[ControlClient], Identity],
        measure: Callable[[], Load],
        balancers: List[Tuple[str, object]],
        interval: float = DEFAULT_INTERVAL,
        retryPolicy: Optional[Callable[[int], float]] = None,
        step: int = 1,
        secret: Optional[bytes] = None,
        costMoved: Optional[Callable[[], bool]] = None,
    ) -> None:
        super().__init__()
        self.costMoved = costMoved
        self.clock = clock
        self.identify = identify
        self.measure = measure
        self.interval = interval
        self.channels: Set[ControlClient] = set()
        self.step = step
        self.secret = secret
        self._lastReported = 0
        self._pending = None
        self._draining = False
        if retryPolicy is None:
            retryPolicy = backoffPolicy(initialDelay=0.2, maxDelay=3.0, factor=1.6)
        self._refusals: Dict[str, int] = {}
        #: Registrations under way: their Deferred, and the channel.
        self._registering: Dict[defer.Deferred, ControlClient] = {}
        self._retryPolicy = retryPolicy
        #: The balancers' control channel services, by description.
        self.balancers: Dict[str, ClientService] = {}
        #: Called with a balancer's description when its channel is lost or
        #: cannot connect (where discovered balancers are looked up again).
        self.onChannelFailed: Optional[Callable[[str], None]] = None
        for description, endpoint in balancers:
            self.addBalancer(description, endpoint)
        #: The balancers told of the drain that have not answered yet.
        self.unacknowledged: Set[str] = set()
        #: Reports asked for by a mark, due or waiting for their spacing,
        #: and when each channel's last one went.
        self._markReports: Dict[ControlClient, object] = {}
        self._markReportedAt: "weakref.WeakKeyDictionary[ControlClient, float]" = weakref.WeakKeyDictionary()
        self._loop = task.LoopingCall(self.reportNow)
        self._loop.clock = clock

    def addBalancer(self, description: str, endpoint) -> None:
        """
        Keep a control channel to one more balancer (at once if running).
        """
        if description in self.balancers:
            return
        svc = ClientService(
            _Described(endpoint, description, self),
            _ControlClientFactory(self, description),
            retryPolicy=self._backoff(self._retryPolicy, description),
            clock=self.clock,
            prepareConnection=lambda p, d=description: self._register(p, d),
        )
        self.balancers[description] = svc
        svc.setServiceParent(self)

    def removeBalancer(self, description: str) -> defer.Deferred:
        """
        Let one balancer go: its channel closes and is not reconnected.
        """
        svc = self.balancers.pop(description, None)
        if svc is None:
            return defer.succeed(None)
        self._refusals.pop(description, None)
        return defer.maybeDeferred(self.removeService, svc)

    def _channelFailed(self, description: str) -> None:
        if self.onChannelFailed is not None and self.running:
            self.onChannelFailed(description)

    # -- service ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def _cancelMarkReport(self, proto: ControlClient) -> None:
        call = self._markReports.pop(proto, None)
        if call is not None and call.active():
            call.cancel()

    def stopService(self):
        for proto in list(self._markReports):
            self._cancelMarkReport(proto)
        if self._loop.running:
            self._loop.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if not self._registering:
            return super().stopService()
        return defer.ensureDeferred(self._stopAfterRegistrations())

    async def _stopAfterRegistrations(self) -> None:
        """
        Stop once the registrations under way are answered.  ClientService
        would cancel them, and a cancelled prepareConnection that does not
        fail (see L{_register}) makes it raise NoTransition
        (C{_connectionMade} while Disconnecting).  So let the answers come
        (a moment, on loopback); a balancer that does not answer in
        L{REGISTRATION_GRACE} has its channel aborted, which ends the
        registration as a refusal would.  Then the channels stop as
        connected ones.
        """
        pending = dict(self._registering)
        for attempt in range(2):
            settled = self._whenSettled(list(pending))
            settled.addTimeout(REGISTRATION_GRACE, self.clock)
            try:
                await settled
                break
            except defer.TimeoutError:
                for d, proto in pending.items():
                    if not d.called and proto.transport is not None:
                        proto.transport.abortConnection()
        await MultiService.stopService(self)

    @staticmethod
    def _whenSettled(registrations: List[defer.Deferred]) -> defer.Deferred:
        """
        A Deferred that fires once every one of C{registrations} (or other
        Deferreds) has, their results left alone; cancelling it fails it, and
        only it.  (A DeferredList, cancelled by a timeout, would cancel them
        all and then fire as if they had settled.)
        """
        done: defer.Deferred = defer.Deferred()
        waiting = [d for d in registrations if not d.called]
        left = [len(waiting)]

        def one(result):
            left[0] -= 1
            if left[0] == 0 and not done.called:
                done.callback(None)
            return result

        for d in waiting:
            d.addBoth(one)
        if not waiting:
            done.callback(None)
        return done

    # -- registration ------------------------------------------------------

    def _backoff(self, policy: Callable[[int], float], balancer: str):
        """
        ClientService counts failed connects; a connect whose registration
        is refused counts as made.  Back off on refusals in a row too.
        """

        def delay(attempt: int) -> float:
            refusals = self._refusals.get(balancer, 0)
            seconds = policy(max(attempt, refusals))
            if refusals > 2:
                # Refused again and again (a wrong secret, a name another
                # backend holds): not a blip but a setting, said on both
                # sides at every try; past the connect backoff, the tries
                # space out to one every REFUSED_MAX_DELAY.
                seconds = min(REFUSED_MAX_DELAY, max(seconds, seconds * 2 ** (refusals - 2)))
            # Rounded: ClientService logs it ("in 1.32 seconds").
            return round(seconds, 2)

        return delay

    def _register(self, proto: ControlClient, balancer: str) -> defer.Deferred:
        # Never fail this Deferred: ClientService leaves a connection whose
        # prepareConnection failed open, and then errors when it closes
        # (Twisted 26.10).  A refused registration instead closes the channel
        # itself, and _backoff spaces out the retries.
        ident = None

        async def handshake():
            nonlocal ident
            # Inside the Deferred: whatever goes wrong here must fail the
            # registration, never prepareConnection itself.
            ident = self.identify(proto)
            await authenticate(proto, self.secret, "control")
            current = self.measure()
            return await proto.callRemote(
                commands.Register,
                name=ident.name,
                host=ident.host,
                port=ident.port,
                capacity=ident.capacity,
                connections=current.connections,
                load=current.load,
                cost=current.cost,
                interval=self.interval,
                quiet=True,
            )

        d = defer.ensureDeferred(handshake())
        d.addTimeout(REGISTER_TIMEOUT, self.clock)
        self._registering[d] = proto

        def settled(result):
            self._registering.pop(d, None)
            return result

        d.addBoth(settled)

        def registered(result):
            self._refusals[balancer] = 0
            proto.answered(result)
            # proto may be ClientService's proxy, which keeps attributes set
            # on it to itself: let the protocol set its own.
            proto.markRegistered(oneWay=bool(result.get("quiet")))
            log.info(
                "registered as {name} ({host}:{port}) with balancer {balancer}; "
                "heartbeat timeout {timeout} s",
                name=ident.name,
                host=ident.host,
                port=ident.port,
                balancer=balancer,
                timeout=result["heartbeatTimeout"],
            )
            if self._draining:
                self._send(proto, commands.Drain)
            return result

        def refused(failure):
            self._refusals[balancer] = self._refusals.get(balancer, 0) + 1
            if failure.check(commands.ClusterError):
                log.error(
                    "balancer {balancer} refused registration as {name}: {error}",
                    balancer=balancer,
                    name=ident.name if ident is not None else "?",
                    error=failure.getErrorMessage(),
                )
            elif failure.check(defer.TimeoutError):
                log.warn(
                    "balancer {balancer} did not answer the registration within "
                    "{timeout:g} s; reconnecting",
                    balancer=balancer,
                    timeout=REGISTER_TIMEOUT,
                )
                if proto.transport is not None:
                    # A peer that does not answer may not read either.
                    proto.transport.abortConnection()
                return
            else:
                log.warn(
                    "registration with balancer {balancer} failed: {error}",
                    balancer=balancer,
                    error=explainConnectError(failure.value),
                )
            if proto.transport is not None:
                proto.transport.loseConnection()

        return d.addCallbacks(registered, refused)

    def _channelLost(self, proto: ControlClient, reason) -> None:
        self.channels.discard(proto)
        self._cancelMarkReport(proto)
        if not self.running:
            log.info(
                "control channel to balancer {balancer} closed", balancer=proto.balancer
            )
            return
        if proto.balancer not in self.balancers:
            log.info("control channel to balancer {balancer} closed", balancer=proto.balancer)
            return
        log.warn(
            "control channel to balancer {balancer} lost: {why}; reconnecting",
            balancer=proto.balancer,
            why=reason.getErrorMessage(),
        )
        self._channelFailed(proto.balancer)

    # -- reporting ---------------------------------------------------------

    def connectionsChanged(self, count: int) -> None:
        """
        The service's connection count changed: report now if it moved by a
        noticeable step (coalescing a burst into one report).
        """
        costMoved = self.costMoved
        if abs(count - self._lastReported) >= self.step or (costMoved is not None and costMoved()):
            self.reportSoon()

    def reportSoon(self) -> None:
        """
        Report once this reactor turn is done, ahead of the next tick (one
        report for all that asked in the turn): the count or the cost moved
        by a noticeable step.
        """
        if self._pending is None or not self._pending.active():
            self._pending = self.clock.callLater(0, self.reportNow)

    def reportSoonTo(self, proto: ControlClient) -> None:
        """
        Report to C{proto}'s balancer alone once this turn is done, at most
        once per L{MARK_REPORT_SPACING} (the balancer paces its marks too;
        one that does not, an older one, must not set the pace).
        """
        if proto in self._markReports:
            return
        now = self.clock.seconds()
        wait = max(0.0, self._markReportedAt.get(proto, float("-inf")) + MARK_REPORT_SPACING - now)
        self._markReports[proto] = self.clock.callLater(wait, self._reportTo, proto)

    def _reportTo(self, proto: ControlClient) -> None:
        self._markReports.pop(proto, None)
        if proto not in self.channels:
            return
        self._markReportedAt[proto] = self.clock.seconds()
        current = self._measured()
        if current is not None:
            self._report(proto, current)

    def _measured(self) -> Optional[Load]:
        try:
            return self.measure()
        except Exception:
            # Never out of the loop that sends the reports (a LoopingCall
            # stops at its first error, and the balancers would take this
            # backend for dead): this report is skipped, the next is tried.
            log.failure("backend: cannot measure the load; this report is skipped")
            return None

    def _report(self, proto: ControlClient, current: Load) -> None:
        report = dict(
            connections=current.connections, load=current.load, cost=current.cost, seen=proto.mark
        )
        if proto.oneWay:
            self._sendOneWay(proto, commands.ReportLoadOneWay, **report)
        else:
            self._send(proto, commands.ReportLoad, **report).addCallback(_answered, proto)

    def reportNow(self) -> None:
        current = self._measured()
        if current is None:
            return
        self._lastReported = current.connections
        for proto in list(self.channels):
            self._report(proto, current)

    def drain(self) -> defer.Deferred:
        """
        Tell every balancer this backend is draining; fires when all have
        answered (or failed to).  Cancelling it (a timeout) fails it and
        leaves the questions asked: a slow balancer still gets the Drain,
        and its channel is not closed for being slow.
        """
        self._draining = True
        ds = []
        for p in list(self.channels):
            balancer = p.balancer
            self.unacknowledged.add(balancer)
            d = self._send(p, commands.Drain)
            d.addBoth(lambda result, b=balancer: self.unacknowledged.discard(b) or result)
            ds.append(d)
        return self._whenSettled(ds)

    def _sendOneWay(self, proto: ControlClient, command, **kw) -> None:
        """
        Send C{command} asking no answer; a balancer that refuses it closes
        the channel, and the reporter reconnects.
        """
        try:
            proto.callRemote(command, **kw)
        except Exception as e:  # the channel is going away
            log.warn(
                "could not report to balancer {balancer}: {error}",
                balancer=proto.balancer,
                error=e,
            )
            if proto.transport is not None:
                proto.transport.loseConnection()

    def _send(self, proto: ControlClient, command, **kw) -> defer.Deferred:
        """
        Send C{command}; fires with its answer, or C{None} after an error
        (which closes the channel to reconnect).
        """
        d = proto.callRemote(command, **kw)

        def failed(failure):
            if failure.check(error.ConnectionClosed):
                # The channel went first (this backend stopping, or the
                # balancer gone): no answer to speak of; its loss is logged.
                return None
            log.warn(
                "balancer {balancer} answered {command} with an error: {error}; "
                "reconnecting",
                balancer=proto.balancer,
                command=command.commandName.decode(),
                error=failure.getErrorMessage(),
            )
            if proto.transport is not None:
                proto.transport.loseConnection()

        return d.addErrback(failed)
