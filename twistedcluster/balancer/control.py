"""
The balancer's side of the control channel: backends register and report
load here.

A backend is up while its channel is registered and its reports keep coming:
the channel closing marks it down at once, and so does silence for longer than
the heartbeat timeout (a hung or partitioned backend whose TCP connection
stays open).  A report after such silence brings it back up.

A backend that stays down for C{forgetAfter} seconds is forgotten, unless
the operator set something on it (pods come and go under new names: a list
of every name ever seen would grow for ever).  If it registers again, it
comes back as new.

A connection must register within the listener's C{authTimeout}; see
L{ControlProtocol._claimName} for who may register a name already held.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Set, Tuple

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistedcluster.wire import commands
from twistedcluster.address import formatHostPort, validHost
from twistedcluster.balancer.selfloop import OwnListeners
from twistedcluster.core.cluster import Cluster
from twistedcluster.wire.guardedamp import DEFAULT_AUTH_TIMEOUT, GuardedAMP, GuardedFactory
from twistedcluster.core.pool import State

#: Reports may come at most this often and at least this rarely.
MIN_INTERVAL = 0.01
MAX_INTERVAL = 3600.0
#: Missed report intervals after which a silent backend is marked down.
DEFAULT_HEARTBEAT_FACTOR = 3.0
#: Seconds past its time after which a heartbeat that fires says the
#: balancer itself was stalled, not the backend (L{ControlProtocol._silence}).
STALL_GRACE = 0.25
#: Seconds a backend that registered itself may stay down before it is
#: forgotten (Kubernetes waits as long before it evicts a lost node's pods).
DEFAULT_FORGET_AFTER = 300.0
#: The least time between two marks pushed to one backend: under a stream
#: of redirect hand-offs, four a second at most (and the reports they ask
#: for, L{twistedcluster.backend.reporter.MARK_REPORT_SPACING}).
MARK_SPACING = 0.25
MAX_NAME_LENGTH = 200
#: Bounds of what a backend may claim: far beyond any real backend, and small
#: enough that sums and products of them stay ordinary numbers.
MAX_CAPACITY = 10**9
MAX_CONNECTIONS = 10**9
MAX_LOAD = 1e6
#: The most a connection may cost, in seconds (an hour).
MAX_COST = 3600.0


#: What a one-way report "answers" (nobody reads it).
_NO_ANSWER: Dict[str, object] = {}
#: What L{ControlProtocol.shortcut} looks for in a box.
_COMMAND, _ASK = amp.COMMAND, amp.ASK
_REPORT_LOAD = commands.ReportLoad.commandName
#: The arguments L{ControlProtocol.shortcut} parses, as the command declares
#: them (a test holds the two together).
_REPORT_ARGUMENTS = [
    (b"connections", amp.Integer, False),
    (b"load", amp.Float, False),
    (b"seen", amp.Integer, True),
    (b"cost", amp.Float, True),
]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise commands.InvalidArgument(message)


def validName(name: str) -> str:
    _check(0 < len(name) <= MAX_NAME_LENGTH, f"name must be 1..{MAX_NAME_LENGTH} characters")
    _check(
        name.isprintable() and not any(c.isspace() for c in name),
        "name must be printable with no white space",
    )
    return name


def _validAddress(host: str, port: int, capacity: int) -> None:
    # The host goes into redirect answers and log lines as it is.
    _check(
        validHost(host),
        "host must be an IP address or a DNS host name (letters, digits, "
        "hyphens and dots)",
    )
    _check(0 < port < 65536, "port must be 1..65535")
    _check(0 < capacity <= MAX_CAPACITY, f"capacity must be 1..{MAX_CAPACITY}")


def _validLoad(connections: int, load: float, cost: Optional[float] = None) -> None:
    _check(0 <= connections <= MAX_CONNECTIONS, f"connections must be 0..{MAX_CONNECTIONS}")
    _check(
        math.isfinite(load) and 0 <= load <= MAX_LOAD,
        f"load must be a number in 0..{MAX_LOAD:g}",
    )
    if cost is not None:
        _check(
            math.isfinite(cost) and 0 < cost <= MAX_COST,
            f"cost must be a number of seconds above 0, at most {MAX_COST:g}",
        )


class ControlProtocol(GuardedAMP):
    """
    One backend's control channel.

    @ivar name: the backend registered on this channel, once it has.
    """

    log = Logger()
    channel = "control"
    misdirected = {
        "admin": (
            "this is the balancer's control listener, where backends register "
            "(--control); cluster-admin talks to its admin listener (--admin)"
        ),
    }
    admissionStep = "register"
    name: Optional[str] = None
    _heartbeat = None
    _silent = False

    def __init__(self, factory: "ControlFactory") -> None:
        super().__init__()
        self.factory = factory

    #: Whether the backend registered C{quiet}: it reports one-way and
    #: takes its marks from L{commands.Mark}; and the last mark it was
    #: given.
    quiet = False
    _lastMark: Optional[int] = None

    @commands.Register.responder
    def register(
        self, name, host, port, capacity, connections, load, interval, quiet=None, cost=None
    ):
        validName(name)
        _validAddress(host, port, capacity)
        loop = self.factory.ownListeners.refusal(host, port)
        if loop is not None:
            self.log.warn(
                "backend {name}: registration from {peer} refused: {why}",
                name=name,
                peer=self.peerText(),
                why=loop,
            )
            raise commands.InvalidArgument(loop)
        _check(MIN_INTERVAL <= interval <= MAX_INTERVAL, f"interval must be {MIN_INTERVAL}..{MAX_INTERVAL} s")
        _validLoad(connections, load, cost)
        factory = self.factory
        pool = factory.cluster.pool
        self._claimName(name, host, port)
        if self.name is not None and self.name != name:
            previous = self.name
            mine = self._speaksFor(previous)
            self._disown(close=False)
            if mine:
                pool.markDown(previous)
                factory.wentDown(previous)
        self.name = name
        self._silent = False  # registering is the surest sign of life
        factory.owners[name] = self
        pool.register(name, host, port, capacity, connections, load, cost=cost)
        self._incarnation = pool.incarnation(name)
        factory.reported(name)
        factory.cameUp(name)
        self._timeout = factory.heartbeatTimeout(interval)
        self._resetHeartbeat()
        self._admit()
        self.log.info(
            "backend {name} registered from {peer}, serving at {host}:{port}, "
            "capacity {capacity}",
            name=name,
            peer=self.peerText(),
            host=host,
            port=port,
            capacity=capacity,
        )
        self._sameAddress(name, host, port)
        self.quiet = bool(quiet)
        self._lastMark = mark = pool.mark(name)
        answer = {"heartbeatTimeout": self._timeout, "mark": mark}
        if self.quiet:
            answer["quiet"] = True
        return answer

    def _sameAddress(self, name: str, host: str, port: int) -> None:
        """
        Say so when another registered backend serves at the same address:
        the same server counted twice (a copied --advertise), whose
        capacity each name would claim whole.
        """
        factory = self.factory
        addresses = factory.addresses
        if len(addresses) > 2 * len(factory.owners) + 16:
            # Only the backends registered now: flapping backends on new
            # ports must not grow it.
            addresses.clear()
        key = (host.lower(), port)
        other = addresses.get(key)
        addresses[key] = name
        pool = factory.cluster.pool
        if other is None or other == name or other not in factory.owners or other not in pool:
            return
        status = pool.get(other)
        if (status.host.lower(), status.port) == key:
            self.log.warn(
                "backend {name} registered at {host}:{port}, where backend {other} "
                "is registered too: one server under two names (a copied "
                "--advertise?) takes twice its capacity",
                name=name,
                other=other,
                host=host,
                port=port,
            )

    def shortcut(self, box) -> bool:
        """
        A one-way L{commands.ReportLoad} from a registered backend: parsed as
        AMP's own argument types parse it (C{int}, C{float}) and answered by
        L{reportLoad} at once, without AMP's dispatch, which was about two
        thirds of the balancer's CPU per report with 10,000 backends
        reporting once a second.  Anything else, and a box whose arguments
        do not parse, goes AMP's way (its errors with it); an error here
        closes the channel, as a one-way command's error does there.
        """
        if self.name is None or box.get(_COMMAND) != _REPORT_LOAD or _ASK in box:
            return False
        # ReportLoad's arguments (_REPORT_ARGUMENTS), by hand: a parser
        # driven by the command's declared arguments cost 1.07x per report.
        try:
            connections = int(box[b"connections"])
            load = float(box[b"load"])
            seen = box.get(b"seen")
            if seen is not None:
                seen = int(seen)
            cost = box.get(b"cost")
            if cost is not None:
                cost = float(cost)
        except (KeyError, ValueError, TypeError):
            return False
        try:
            self.reportLoad(connections, load, seen, cost)
        except Exception:
            self.unhandledError(Failure())
        return True

    @commands.ReportLoad.responder
    def reportLoad(self, connections, load, seen=None, cost=None):
        name = self._registered()
        _validLoad(connections, load, cost)
        pool = self.factory.cluster.pool
        pool.report(name, connections, load, seen, cost)
        self.factory.reported(name)
        if self._silent:
            self._silent = False
            pool.markUp(name)
            self.factory.cameUp(name)
            self.log.info("backend {name} is reporting again: up", name=name)
        self._resetHeartbeat()
        if not self.quiet:
            return {"mark": pool.mark(name)}
        # One-way: a mark goes out only when the backend needs a newer one.
        self.pushMark()
        return _NO_ANSWER

    #: When this channel's last pushed mark left, and the one waiting for
    #: L{MARK_SPACING} to pass.
    _markPushedAt = float("-inf")
    _markLater = None
    _reportSoon = False

    def pushMark(self, reportSoon: bool = False) -> None:
        """
        Send this one-way backend a newer mark if it needs one (a connection
        reached it since the last), at most one per L{MARK_SPACING}: one
        due sooner goes when the spacing is over.

        @param reportSoon: ask for a report soon after (redirect answers
            have just settled; see L{commands.Mark}).
        """
        self._reportSoon = self._reportSoon or reportSoon
        name = self.name
        if name is None or not self.quiet or self._markLater is not None:
            return
        pool = self.factory.cluster.pool
        if name not in pool or not pool.markDue(name, self._lastMark):
            return
        now = self.factory.clock.seconds()
        wait = self._markPushedAt + MARK_SPACING - now
        if wait > 0:
            self._markLater = self.factory.clock.callLater(wait, self._pushLater)
            return
        self._markPushedAt = now
        self._lastMark = mark = pool.mark(name)
        if self._reportSoon:
            self._reportSoon = False
            self.callRemote(commands.Mark, mark=mark, reportSoon=True)
        else:
            self.callRemote(commands.Mark, mark=mark)

    def _pushLater(self) -> None:
        self._markLater = None
        if self.factory.owners.get(self.name) is self and self.transport is not None:
            self.pushMark()

    @commands.Drain.responder
    def drain(self):
        name = self._registered()
        self.factory.cluster.pool.setSelfDraining(name)
        self.log.info("backend {name} is draining (it asked to)", name=name)
        return {}

    def _registered(self) -> str:
        if self.name is None:
            raise commands.NotRegistered("register before sending other commands")
        if not self._speaksFor(self.name):
            # Forgotten while it was silent (by the balancer, or an operator;
            # a backend of the same name may have been added since): it must
            # register again (its reporter does so when told this).
            self._disown(close=False)
            self._awaitAdmission()
            raise commands.NotRegistered("this balancer forgot you: register again")
        return self.name

    #: The pool's L{incarnation<twistedcluster.core.pool.Pool.incarnation>}
    #: of the backend this channel registered.
    _incarnation: Optional[int] = None

    def _speaksFor(self, name: str) -> bool:
        """
        Whether this channel still speaks for the backend C{name}: it holds
        the name, and the pool has not forgotten that backend since (one of
        the same name added later, static or registered, is another).
        """
        factory = self.factory
        return (
            factory.owners.get(name) is self
            and factory.cluster.pool.incarnation(name) == self._incarnation
        )

    def admitted(self) -> bool:
        # Registering needs the secret first, when there is one.
        return self.name is not None

    def _claimName(self, name: str, host: str, port: int) -> None:
        """
        Make C{name} free for this channel to take, or raise
        L{commands.NameTaken}.

        Without a secret nothing tells a backend from a stranger who copies
        its name and address, so a name belongs to whoever holds it while
        alive: an open channel whose reports keep coming is never displaced,
        not even from the same address.  A restarted backend waits until its
        old channel closes (at once, when the old process died) and its
        reporter retries.  A holder silent past the heartbeat timeout (a hung
        process, a vanished host) gives the name to the next to register,
        who keeps it only as long as it reports in turn.  With a secret, only
        peers that proved it get this far.
        """
        factory = self.factory
        pool = factory.cluster.pool
        if name in pool and pool.get(name).static:
            # A static backend (--backend, cluster-admin add) holds its name
            # for as long as it is configured: taking it over would move its
            # address and its routing to this channel while its health
            # checks went on marking it up and down.
            static = pool.get(name)
            where = formatHostPort(static.host, static.port)
            self.log.warn(
                "backend {name}: registration from {peer} (serving at {new}) "
                "refused: the name is a static backend's, at {where}",
                name=name,
                peer=self.peerText(),
                new=formatHostPort(host, port),
                where=where,
            )
            raise commands.NameTaken(
                f"backend name {name!r} is a static backend's (at {where}, given "
                f"by --backend or cluster-admin add): register under another "
                f"name, or remove the static one first"
            )
        owner = factory.owners.get(name)
        if owner is None or owner is self:
            return
        known = pool.get(name) if name in pool else None
        where = formatHostPort(known.host, known.port) if known is not None else "?"
        if not owner._silent:
            raise commands.NameTaken(
                f"backend name {name!r} is in use by a live backend at {where} "
                f"(its control channel is still open and reporting; a restarted "
                f"backend gets the name once that channel closes or has been "
                f"silent for {owner._timeout:g} s)"
            )
        self.log.warn(
            "backend {name}: taken over by {peer}, serving at {new}, from the "
            "channel of {old} (serving at {where}), silent for {timeout:g} s",
            name=name,
            peer=self.peerText(),
            new=formatHostPort(host, port),
            old=owner.peerText(),
            where=where,
            timeout=owner._timeout,
        )
        owner._disown(close=True)

    #: When the heartbeat is due, and whether it has been put off once
    #: for a stalled reactor (L{_silence}).
    _deadline = 0.0
    _graced = False

    def _resetHeartbeat(self) -> None:
        clock = self.factory.clock
        self._deadline = clock.seconds() + self._timeout
        self._graced = False
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.reset(self._timeout)
        else:
            self._heartbeat = clock.callLater(self._timeout, self._silence)

    def _silence(self) -> None:
        self._heartbeat = None
        if self.name is None:
            return
        clock = self.factory.clock
        if clock.seconds() - self._deadline > STALL_GRACE and not self._graced:
            # Due long ago: this process was stalled (a long reactor turn,
            # a paused VM or process), and the reports that came meanwhile
            # wait unread in the socket; the reactor runs overdue timers
            # before it reads.  Look again after one turn of reading, or
            # every backend would be marked down at once, and the clients
            # waiting refused.
            self._graced = True
            self._heartbeat = clock.callLater(0, self._silence)
            return
        self._silent = True
        if not self._speaksFor(self.name):
            return  # forgotten meanwhile: there is nothing left to mark down
        self.factory.cluster.pool.markDown(self.name)
        self.factory.wentDown(self.name)
        self.log.warn(
            "backend {name}: no report for {timeout:.2f} s, marked down",
            name=self.name,
            timeout=self._timeout,
        )

    def _disown(self, close: bool) -> None:
        """
        Stop speaking for the backend this channel registered: another channel
        took over its name, or this one registered another.
        """
        name, self.name = self.name, None
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        later, self._markLater = self._markLater, None
        if later is not None and later.active():
            later.cancel()
        if name is not None and self.factory.owners.get(name) is self:
            del self.factory.owners[name]
        if close and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        name = self.name
        # Not once the pool has forgotten it (it stayed down long enough,
        # or an operator forgot it), whatever holds the name now.
        owned = name is not None and self._speaksFor(name)
        self._disown(close=False)
        if owned:
            self.factory.cluster.pool.markDown(name)
            self.factory.wentDown(name)
            self.log.info(
                "backend {name}: control channel from {peer} closed, marked down",
                name=name,
                peer=self.peerText(),
            )
        super().connectionLost(reason)


class ControlFactory(GuardedFactory):
    """
    Serves the control listener.

    @ivar owners: the channel currently speaking for each backend name.
    @param heartbeatTimeout: seconds of silence before a backend is marked
        down; C{None} means L{DEFAULT_HEARTBEAT_FACTOR} of its report interval.
    @param forgetAfter: seconds a backend may stay down before it is
        forgotten when it has no operator setting; 0 never forgets.
    @ivar reports: registrations and load reports received, in total.
    @ivar lastReport: backend name: when its last one came (for
        C{/metrics}; names no longer in the pool are dropped by L{reported}
        now and then).
    """

    reports = 0
    #: This balancer's own listeners (L{OwnListeners}): no backend may
    #: register at one of their addresses (none known unless the service
    #: says).
    ownListeners = OwnListeners({})

    channel = "control"

    def __init__(
        self,
        cluster: Cluster,
        clock,
        heartbeatTimeout: Optional[float] = None,
        secret: Optional[bytes] = None,
        maxConnections: int = 4096,
        authTimeout: float = DEFAULT_AUTH_TIMEOUT,
        forgetAfter: float = DEFAULT_FORGET_AFTER,
    ) -> None:
        super().__init__(clock, secret, maxConnections, authTimeout)
        self.cluster = cluster
        self._fixedTimeout = heartbeatTimeout
        self.owners: Dict[str, ControlProtocol] = {}
        #: (host, port): the backend that last registered there (to tell
        #: two names at one address, L{ControlProtocol._sameAddress}).
        self.addresses: Dict[Tuple[str, int], str] = {}
        self.forgetAfter = forgetAfter
        #: When each down backend is due to be forgotten (whole seconds),
        #: and the timer and backends of each such second.
        self._due: Dict[str, int] = {}
        self._batches: Dict[int, Tuple[IDelayedCall, Set[str]]] = {}
        self.lastReport: Dict[str, float] = {}

    def pushMarks(self, names) -> None:
        """
        Connections handed off to C{names} (redirect mode) have had time to
        reach them: send each a newer mark now, rather than after its next
        report, so that the report after it counts them and they stop
        counting as added (L{ControlProtocol.pushMark}).  Without this a
        hand-off counted for two report intervals, and a redirect listener
        refused short connections far below the backends' capacity.
        """
        owners = self.owners
        for name in names:
            channel = owners.get(name)
            if channel is not None:
                channel.pushMark(reportSoon=True)

    def reported(self, name: str) -> None:
        """
        A registration or a load report came from C{name}.
        """
        self.reports += 1
        last = self.lastReport
        if name not in last and len(last) > 2 * len(self.cluster.pool) + 64:
            pool = self.cluster.pool
            for gone in [n for n in last if n not in pool]:
                del last[gone]
        last[name] = self.clock.seconds()

    def wentDown(self, name: str) -> None:
        """
        A backend went down: forget it in L{forgetAfter} seconds (rounded up
        to a whole second) unless it comes back.  The backends due in the
        same second are forgotten together, in one pass over the pool: pods
        that went away in a burst do not stall the reactor one by one.
        """
        if self.forgetAfter <= 0 or name in self._due:
            return
        due = math.ceil(self.clock.seconds() + self.forgetAfter)
        self._due[name] = due
        batch = self._batches.get(due)
        if batch is None:
            call = self.clock.callLater(due - self.clock.seconds(), self._forget, due)
            batch = self._batches[due] = (call, set())
        batch[1].add(name)

    def cameUp(self, name: str) -> None:
        due = self._due.pop(name, None)
        if due is None:
            return
        call, names = self._batches[due]
        names.discard(name)
        if not names:
            del self._batches[due]
            call.cancel()

    def _forget(self, due: int) -> None:
        _, names = self._batches.pop(due)
        for name in names:
            del self._due[name]
        pool = self.cluster.pool
        gone = sorted(n for n in names if pool.forgettable(n))
        pool.removeMany(gone)
        if gone:
            self.log.info(
                "forgot {count} backend(s) down for {after:g} s with no operator "
                "setting: {names}",
                count=len(gone),
                after=self.forgetAfter,
                names=" ".join(gone[:10]) + (f" and {len(gone) - 10} more" if len(gone) > 10 else ""),
            )
        for name in names.difference(gone):
            if name in pool and pool.get(name).state is State.DOWN:
                # Held by an operator setting: look again later, in case
                # the operator undoes it while the backend is still away.
                self.wentDown(name)

    def startFactory(self) -> None:
        # Backends restored from the state file are down until they register:
        # they are forgotten like any other, once their settings allow.
        for status in self.cluster.pool.snapshot():
            if status.state is State.DOWN and not status.static:
                self.wentDown(status.name)

    def heartbeatTimeout(self, interval: float) -> float:
        if self._fixedTimeout is not None:
            return self._fixedTimeout
        return DEFAULT_HEARTBEAT_FACTOR * interval

    def makeProtocol(self) -> ControlProtocol:
        return ControlProtocol(self)
