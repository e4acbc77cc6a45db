"""
The balancer's side of the admin channel: what ``cluster-admin`` asks for.

Every change is logged with the peer that asked for it, and reported to an
optional C{onChange} callable (where the balancer persists operator state).
When C{onChange} returns a Deferred, the change is answered once it fires;
if it fails, the answer says the change is in force but not saved.  With a
shared state store (etcd), a change it cannot take is refused instead
(L{commands.StateStoreUnavailable}), before it is made when the store is
known to be away, or undone when writing it failed.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

from twisted.internet import defer
from twisted.logger import Logger

from twistedcluster.wire import commands
from twistedcluster.balancer.selfloop import OwnListeners
from twistedcluster.core.cluster import Cluster
from twistedcluster.wire.guardedamp import DEFAULT_AUTH_TIMEOUT, GuardedAMP, GuardedFactory
from twistedcluster.core.policies import UnknownPolicy
from twistedcluster.core.pool import (
    AdminState,
    BackendStatus,
    InvalidWeight,
    State,
    UnknownBackend,
)


__all__ = ["AdminFactory", "AdminProtocol"]

#: What one page of ListBackends may take of AMP's 65,535-byte value.
_PAGE_BYTES = 60000

#: How much of an answer the admin channel sends each time its socket can
#: take more: a whole page of ListBackends (Twisted sends at most 128 KiB,
#: and on a balancer busy with thousands of backends' reports each send
#: waits a whole turn of the reactor: at 10,000 backends on a loaded
#: machine, the 14 sends of one page took 5-9 s).
_ANSWER_SEND_LIMIT = commands.TABLE_BYTES + 256 * 1024


def _sendWholeAnswers(transport) -> None:
    """
    Let C{transport} (or the socket's transport under it: TLS) send up to
    L{_ANSWER_SEND_LIMIT} at a time: as much of an answer as the socket's
    buffer takes (its size is left to the kernel, which grows it).
    """
    while transport is not None and not hasattr(transport, "SEND_LIMIT"):
        transport = getattr(transport, "transport", None)
    if transport is not None:
        transport.SEND_LIMIT = max(transport.SEND_LIMIT, _ANSWER_SEND_LIMIT)


#: The pool's and the cluster's errors as the admin channel declares them.
_WIRE_ERRORS = {
    UnknownBackend: commands.UnknownBackendError,
    InvalidWeight: commands.InvalidWeightError,
    UnknownPolicy: commands.UnknownPolicyError,
}


@contextmanager
def _asWireErrors() -> Iterator[None]:
    """
    Raise a pool or cluster error met inside as the AMP error the admin
    commands declare for it, with the same message.
    """
    try:
        yield
    except tuple(_WIRE_ERRORS) as e:
        wire = next(w for cls, w in _WIRE_ERRORS.items() if isinstance(e, cls))
        raise wire(str(e)) from None


_compactJSON = json.JSONEncoder(separators=(",", ":")).encode


def _encodedSize(item) -> int:
    """
    About what C{item} takes in an AmpList value: each key and value with
    its two-byte length, and the box's end.
    """
    return 2 + sum(
        4 + len(k) + len(str(v).encode("utf-8")) for k, v in item.items()
    )


class AdminProtocol(GuardedAMP):
    """
    One admin connection.
    """

    log = Logger()
    channel = "admin"
    misdirected = {
        "control": (
            "this is the balancer's admin listener, for cluster-admin (--admin); "
            "backends register at its control listener (--control)"
        ),
    }

    def __init__(self, factory: "AdminFactory") -> None:
        super().__init__()
        self.factory = factory
        #: When this peer last sent a whole box (L{AdminFactory._evictIdle}):
        #: bytes trickled without one keep no place.
        self.lastActive = factory.clock.seconds()
        #: Changes still to be answered (saved to the shared store first).
        self.pending = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        _sendWholeAnswers(self.transport)

    def ampBoxReceived(self, box) -> None:
        self.lastActive = self.factory.clock.seconds()
        super().ampBoxReceived(box)

    @property
    def _cluster(self) -> Cluster:
        return self.factory.cluster

    @commands.ListBackends.responder
    def listBackends(self, offset=None, json=None):
        snapshot = self._cluster.pool.snapshot()
        if json:
            return self._table(snapshot, max(0, offset or 0))
        page: list = []
        size = 0
        for item in map(commands.backendItem, snapshot[max(0, offset or 0) :]):
            size += _encodedSize(item)
            if page and size > _PAGE_BYTES:
                break
            page.append(item)
        return {
            "policy": self._cluster.policyName,
            "backends": page,
            "total": len(snapshot),
        }

    def _table(self, snapshot, offset: int):
        """
        A page of L{commands.ListBackends} as JSON: as many backends from
        C{offset} as L{commands.TABLE_BYTES} holds.
        """
        encode = _compactJSON
        parts: list = []
        size = 2
        for item in map(commands.backendItem, snapshot[offset:]):
            part = encode(item)
            size += len(part) + 1
            if parts and size > commands.TABLE_BYTES:
                break
            parts.append(part)
        return {
            "policy": self._cluster.policyName,
            "backends": [],
            "total": len(snapshot),
            "table": ("[" + ",".join(parts) + "]").encode("utf-8"),
        }

    def _mayChange(self) -> None:
        """
        Refuse a change before making it when the shared state store cannot
        take it (C{beforeChange} raises).
        """
        if self.factory.beforeChange is None:
            return
        from twistedcluster.balancer.statestore import StoreUnavailable

        try:
            self.factory.beforeChange()
        except StoreUnavailable as e:
            self.log.warn(
                "admin {peer}: change refused: {error}", peer=self.peerText(), error=str(e)
            )
            raise commands.StateStoreUnavailable(str(e)) from None

    def _backendChanged(self, what: str, change: Callable[[], BackendStatus]):
        """
        Make a change to one backend and answer with the state it leaves
        the backend in.
        """
        self._mayChange()
        with _asWireErrors():
            status = change()
        return self._changed(what, {"state": status.state.value})

    def _setAdmin(self, name: str, state: AdminState):
        return self._backendChanged(
            f"set backend {name} to {state.value}",
            lambda: self._cluster.pool.setAdminState(name, state),
        )

    @commands.DrainBackend.responder
    def drainBackend(self, name):
        return self._setAdmin(name, AdminState.DRAINING)

    @commands.EnableBackend.responder
    def enableBackend(self, name):
        return self._setAdmin(name, AdminState.ENABLED)

    @commands.DisableBackend.responder
    def disableBackend(self, name):
        return self._setAdmin(name, AdminState.DISABLED)

    @commands.SetWeight.responder
    def setWeight(self, name, weight):
        return self._backendChanged(
            f"set weight of backend {name} to {weight}",
            lambda: self._cluster.pool.setWeight(name, weight),
        )

    @commands.ForgetBackend.responder
    def forgetBackend(self, name):
        self._mayChange()
        pool = self._cluster.pool
        with _asWireErrors():
            status = pool.get(name)
        if status.static:
            raise commands.BackendInUse(
                f"{name} is a static backend: cluster-admin remove {name} removes it"
            )
        if status.state is not State.DOWN:
            raise commands.BackendInUse(
                f"{name} is {status.state.value}: only a backend that is down "
                "can be forgotten"
            )
        pool.remove(name)
        return self._changed(f"forgot backend {name}", {}, forgotten=name)

    @commands.AddBackend.responder
    def addBackend(self, name, host, port, weight=None, capacity=None, sendProxy=None):
        from twistedcluster.balancer.healthcheck import StaticNameTaken
        from twistedcluster.balancer.staticbackend import makeStaticBackend

        statics = self.factory.statics
        if statics is None:
            raise commands.InvalidArgument("this balancer cannot add static backends")
        self._mayChange()
        try:
            backend = makeStaticBackend(name, host, port, weight, capacity, sendProxy)
        except ValueError as e:
            raise commands.InvalidArgument(str(e)) from None
        loop = self.factory.ownListeners.refusal(backend.host, backend.port)
        if loop is not None:
            self.log.warn(
                "admin {peer}: add of static backend {backend} refused: {error}",
                peer=self.peerText(),
                backend=backend.describe(),
                error=loop,
            )
            raise commands.InvalidArgument(loop)
        try:
            statics.add(backend)
        except StaticNameTaken as e:
            self.log.warn(
                "admin {peer}: add of static backend {backend} refused: {error}",
                peer=self.peerText(),
                backend=backend.describe(),
                error=str(e),
            )
            raise commands.BackendInUse(str(e)) from None
        answer = {"state": self._cluster.pool.get(backend.name).state.value}
        if backend.sendProxy is not None:
            answer["sendProxy"] = backend.sendProxy
        return self._changed(f"added static backend {backend.describe()}", answer)

    @commands.RemoveBackend.responder
    def removeBackend(self, name):
        from twistedcluster.balancer.healthcheck import NotStatic

        statics = self.factory.statics
        if statics is None:
            raise commands.UnknownBackendError(str(UnknownBackend(name)))
        self._mayChange()
        with _asWireErrors():
            try:
                backend = statics.remove(name)
            except NotStatic as e:
                raise commands.BackendInUse(str(e)) from None
        return self._changed(f"removed static backend {backend.describe()}", {})

    @commands.SetPolicy.responder
    def setPolicy(self, policy):
        self._mayChange()
        previous = self._cluster.policyName
        with _asWireErrors():
            self._cluster.setPolicy(policy, chosen=True)
        return self._changed(
            f"changed policy from {previous} to {policy}", {"previous": previous}, policy=policy
        )

    def _changed(self, what: str, answer: Dict[str, Any], **hints: Any):
        """
        Log a change and answer it once C{onChange} has saved it, or with
        why it could not (the change is in force either way); or refuse it
        when the shared state store could not take it (it is undone).
        """
        self.log.info("admin {peer} {what}", peer=self.peerText(), what=what)
        if self.factory.onChange is None:
            return answer
        from twistedcluster.balancer.statestore import StoreUnavailable

        def notSaved(failure):
            if failure.check(StoreUnavailable):
                self.log.warn(
                    "admin {peer}: {outcome}: {error}",
                    peer=self.peerText(),
                    outcome="change not known to be saved"
                    if getattr(failure.value, "maybeTaken", False)
                    else "change undone",
                    error=failure.getErrorMessage(),
                )
                raise commands.StateStoreUnavailable(failure.getErrorMessage())
            return {**answer, "notSaved": failure.getErrorMessage()}

        # What the shared store needs told (forgotten=NAME, policy=NAME).
        d = defer.maybeDeferred(self.factory.onChange, **hints)
        d.addCallbacks(lambda _: answer, notSaved)
        if not d.called:
            # Waiting on the shared store: in use until answered.
            self.pending += 1
            d.addBoth(self._answered)
        return d

    def _answered(self, result):
        self.pending -= 1
        self.lastActive = self.factory.clock.seconds()
        return result


#: Seconds an admin connection must have been idle before it is closed to
#: make room for a new one on a full listener.
IDLE_BEFORE_EVICTION = 5.0


class AdminFactory(GuardedFactory):
    """
    Serves the admin listener.

    @ivar ownListeners: this balancer's own listeners (L{OwnListeners}):
        no static backend may be added at one of their addresses (none
        known unless the service says).
    """

    channel = "admin"
    ownListeners = OwnListeners({})

    def __init__(
        self,
        cluster: Cluster,
        clock,
        onChange: Optional[Callable[[], Optional[defer.Deferred]]] = None,
        secret: Optional[bytes] = None,
        maxConnections: int = 64,
        authTimeout: float = DEFAULT_AUTH_TIMEOUT,
        statics=None,
        beforeChange: Optional[Callable[[], None]] = None,
    ) -> None:
        super().__init__(clock, secret, maxConnections, authTimeout)
        self.cluster = cluster
        self.onChange = onChange
        #: Raises L{twistedcluster.balancer.statestore.StoreUnavailable} when
        #: no change may be made now (the shared state store is away).
        self.beforeChange = beforeChange
        #: The balancer's L{twistedcluster.balancer.healthcheck.TCPHealthChecks}
        #: (where add and remove go); C{None}: they are refused.
        self.statics = statics

    def makeProtocol(self) -> AdminProtocol:
        return AdminProtocol(self)

    def _evictIdle(self, addr) -> None:
        """
        The listener is full of admitted connections: close the one idle
        the longest (no whole box received), if it has been idle for
        L{IDLE_BEFORE_EVICTION} (a script that left its connections open,
        or a peer trickling a box byte by byte, must not lock an operator
        out; one in use, or waiting for a change's answer, is never cut).
        """
        idlest = min(
            (p for p in self.open if not p.pending), key=lambda p: p.lastActive, default=None
        )
        if idlest is None:
            return
        idle = self.clock.seconds() - idlest.lastActive
        if idle >= IDLE_BEFORE_EVICTION:
            self._evict(idlest, f"idle for {idle:.0f} s", addr)
