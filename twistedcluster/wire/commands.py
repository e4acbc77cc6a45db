"""
The AMP contract shared by balancer, backend and cluster-admin.

Both channels, when the balancer has a secret: L{Challenge}, L{Authenticate}.
Control channel (backend -> balancer): L{Register}, L{ReportLoad}, L{Drain};
(balancer -> backend, one-way, to backends that offered to take it): L{Mark}.
Admin channel (cluster-admin -> balancer): L{ListBackends},
L{DrainBackend}, L{EnableBackend}, L{DisableBackend}, L{SetWeight},
L{SetPolicy}, L{ForgetBackend}, L{AddBackend}, L{RemoveBackend}.

Every failure a peer can cause is a declared error here, with a message meant
for a human: an undeclared one would drop the connection.

An admin change is answered once it is in the balancer's state file (when it
has one).  A change in force that could not be written there is not an
error: its answer carries L{NOT_SAVED}, saying why, and clients that predate
that field simply do not see it.

L{BACKEND_FIELDS} is the one list of a backend's fields as the admin channel,
``cluster-admin status --json`` and the metrics listener's ``/status.json``
show them; L{backendItem} turns a L{twistedcluster.core.pool.BackendStatus} into
that form.
"""

import json
from typing import Any, Dict

from twisted.protocols import amp

__all__ = [
    "AddBackend",
    "AuthenticationFailed",
    "Authenticate",
    "BACKEND_FIELDS",
    "BackendInUse",
    "Challenge",
    "ClusterError",
    "DisableBackend",
    "Drain",
    "DrainBackend",
    "EnableBackend",
    "ForgetBackend",
    "InvalidArgument",
    "InvalidWeightError",
    "JSONChunks",
    "ListBackends",
    "Mark",
    "NOT_SAVED",
    "NameTaken",
    "NotAuthenticated",
    "NotRegistered",
    "Register",
    "RemoveBackend",
    "ReportLoad",
    "ReportLoadOneWay",
    "SetPolicy",
    "SetWeight",
    "StateStoreUnavailable",
    "TABLE_BYTES",
    "UnknownBackendError",
    "UnknownPolicyError",
    "backendItem",
]


class ClusterError(Exception):
    """
    Base of the errors carried over AMP; C{str()} is the message for humans.
    """


class InvalidArgument(ClusterError):
    """
    An argument is out of range or malformed.
    """


class NameTaken(ClusterError):
    """
    Another live backend is registered under that name at another address.
    """


class NotRegistered(ClusterError):
    """
    A control command came before a successful L{Register}.
    """


class UnknownBackendError(ClusterError):
    """
    No backend of that name.
    """


class InvalidWeightError(ClusterError):
    """
    A weight out of range.
    """


class UnknownPolicyError(ClusterError):
    """
    No policy of that name.
    """


class StateStoreUnavailable(ClusterError):
    """
    The balancers' shared state store (etcd) cannot take an admin change
    now: the change is refused (or undone), routing goes on as it was.
    """


class NotAuthenticated(ClusterError):
    """
    The balancer requires the shared-secret handshake before any command.
    """


class AuthenticationFailed(ClusterError):
    """
    A proof did not match: the peers do not hold the same secret.
    """


#: Any command may meet a balancer that requires authentication first.
_AUTH = {NotAuthenticated: b"NOT_AUTHENTICATED"}
_NOT_REGISTERED = {NotRegistered: b"NOT_REGISTERED", **_AUTH}
_UNKNOWN_BACKEND = {UnknownBackendError: b"UNKNOWN_BACKEND", **_AUTH}
#: Any admin change may meet a balancer whose shared state store is away.
_STORE = {StateStoreUnavailable: b"STATE_STORE_UNAVAILABLE"}

#: In the answer to an admin change that is in force but could not be
#: written to the state file: why (a restart would lose it).
NOT_SAVED = (b"notSaved", amp.Unicode(optional=True))


# -- authentication (both channels; see twistedcluster.wire.auth) ------------------


class Challenge(amp.Command):
    """
    Ask for a fresh nonce to prove the secret against.
    """

    commandName = b"Challenge"
    arguments: list = []
    response = [(b"nonce", amp.String())]
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


class Authenticate(amp.Command):
    """
    Prove the secret; the answer proves it back.
    """

    commandName = b"Authenticate"
    arguments = [(b"nonce", amp.String()), (b"proof", amp.String())]
    response = [(b"proof", amp.String())]
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


# -- control channel ------------------------------------------------------


class Register(amp.Command):
    """
    A backend joins the pool (or rejoins it, under the same name).

    @param interval: seconds between the backend's periodic load reports;
        the balancer marks it down when reports stop for a few intervals.

    The answer's C{mark} is what the backend echoes as C{seen} in its next
    L{ReportLoad} (see there).

    @param quiet: the backend offers to report one-way (L{ReportLoadOneWay})
        and to take its marks from L{Mark} when the balancer sends one; the
        answer's C{quiet} says the balancer accepts.  Peers that predate it
        leave it out and go on asking for answers.

    @param cost: as in L{ReportLoad}.
    """

    commandName = b"Register"
    arguments = [
        (b"name", amp.Unicode()),
        (b"host", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"capacity", amp.Integer()),
        (b"connections", amp.Integer()),
        (b"load", amp.Float()),
        (b"interval", amp.Float()),
        (b"quiet", amp.Boolean(optional=True)),
        (b"cost", amp.Float(optional=True)),
    ]
    response = [
        (b"heartbeatTimeout", amp.Float()),
        (b"mark", amp.Integer(optional=True)),
        (b"quiet", amp.Boolean(optional=True)),
    ]
    errors = {InvalidArgument: b"INVALID_ARGUMENT", NameTaken: b"NAME_TAKEN", **_AUTH}


class ReportLoad(amp.Command):
    """
    The backend's current connection count and load.

    @param seen: the last C{mark} this balancer's answers gave the backend
        before it measured.  Every connection the balancer had routed up to
        that mark had reached the backend before the mark was sent, so the
        report counts them; those routed after it the balancer keeps adding
        to the report itself.  A backend that leaves it out has every
        connection routed so far taken as counted.

    @param cost: seconds of the backend's time one connection takes, as it
        measured it (L{twistedcluster.backend.cost}); C{load} is then on
        that scale (connections x cost: the work queued).  The balancer adds
        each connection it routes at this cost until the next report.  A
        backend that leaves it out (or predates it) reports load as a share
        of its capacity, and each connection costs 1/capacity.
    """

    commandName = b"ReportLoad"
    arguments = [
        (b"connections", amp.Integer()),
        (b"load", amp.Float()),
        (b"seen", amp.Integer(optional=True)),
        (b"cost", amp.Float(optional=True)),
    ]
    response = [(b"mark", amp.Integer(optional=True))]
    errors = {InvalidArgument: b"INVALID_ARGUMENT", **_NOT_REGISTERED}


class ReportLoadOneWay(ReportLoad):
    """
    L{ReportLoad} sent with no answer asked (the same command on the wire,
    without AMP's C{_ask}): what a backend that registered C{quiet} sends.
    Its marks come from L{Mark}, only when there is a newer one it needs;
    an error closes the channel (the backend reconnects and registers).
    """

    commandName = ReportLoad.commandName
    requiresAnswer = False


class Mark(amp.Command):
    """
    Balancer to a backend that registered C{quiet}: a newer mark to echo as
    C{seen} in its next reports (as a L{ReportLoad} answer's C{mark}).  Sent
    one-way, only when connections reached the backend since the last mark
    it was given (an idle backend gets none): after a report, or as
    redirect answers naming it settle.
    """

    commandName = b"Mark"
    #: C{reportSoon}: the mark was sent for connections the backend could
    #: not have counted yet (redirect answers that have just settled), so
    #: a report soon after, rather than at the next tick, is wanted.  Marks
    #: that follow a report do not ask: each report would otherwise ask for
    #: the next.  A backend from before ignores it.
    arguments = [(b"mark", amp.Integer()), (b"reportSoon", amp.Boolean(optional=True))]
    response: list = []
    requiresAnswer = False


class Drain(amp.Command):
    """
    The backend is shutting down: send it no new connections.
    """

    commandName = b"Drain"
    arguments: list = []
    response: list = []
    errors = dict(_NOT_REGISTERED)


# -- admin channel --------------------------------------------------------

#: The fields of one backend in L{ListBackends}; also the JSON keys of
#: ``cluster-admin status --json``.
BACKEND_FIELDS = [
    (b"name", amp.Unicode()),
    (b"host", amp.Unicode()),
    (b"port", amp.Integer()),
    (b"state", amp.Unicode()),
    (b"weight", amp.Integer()),
    (b"capacity", amp.Integer()),
    (b"connections", amp.Integer()),
    (b"load", amp.Float()),
    (b"routed", amp.Integer()),
    (b"active", amp.Integer()),
    (b"failures", amp.Integer()),
    (b"static", amp.Boolean()),
    # Seconds one connection costs the backend (1/capacity when it
    # measures none); optional: balancers that predate it leave it out.
    (b"cost", amp.Float(optional=True)),
]

#: The names of L{BACKEND_FIELDS}, in order, as C{str}.
_FIELD_NAMES = tuple(name.decode("ascii") for name, _ in BACKEND_FIELDS)


def backendItem(status) -> Dict[str, Any]:
    """
    One backend as L{ListBackends} carries it and ``status --json`` prints
    it: the L{BACKEND_FIELDS} of a L{twistedcluster.core.pool.BackendStatus}, in
    that order, its state as text.
    """
    item = {name: getattr(status, name) for name in _FIELD_NAMES}
    item["state"] = status.state.value
    return item


#: The most one AMP value holds.
_VALUE_MAX = 0xFFFF


class JSONChunks(amp.Argument):
    """
    A JSON value carried in as many AMP values as it takes: C{KEY}, then
    C{KEY.2}, C{KEY.3}... (each at most 64 KiB), so one box can hold more
    than one value could.
    """

    def toBox(self, name, strings, objects, proto):
        obj = self.retrieve(objects, name.decode("ascii"), proto)
        if obj is None and self.optional:
            return
        data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode("utf-8")
        strings[name] = data[:_VALUE_MAX]
        for n, start in enumerate(range(_VALUE_MAX, len(data), _VALUE_MAX), 2):
            strings[name + b".%d" % n] = data[start : start + _VALUE_MAX]

    def fromBox(self, name, strings, objects, proto):
        first = strings.get(name)
        key = name.decode("ascii")
        if first is None:
            if not self.optional:
                raise KeyError(name)
            objects[key] = None
            return
        parts = [first]
        n = 2
        while True:
            more = strings.get(name + b".%d" % n)
            if more is None:
                break
            parts.append(more)
            n += 1
        objects[key] = json.loads(b"".join(parts))


#: What one JSON page of L{ListBackends} (its C{table}) may take: some
#: 16,000 backends, so that 10,000 come in one round trip (on a busy
#: machine each round trip waits for both processes' turn at a core; three
#: pages of 768 KiB made the first call at 10,000 backends take seconds).
#: What a client leaves unread is still bounded: a balancer closes a peer
#: that asks again with more than 1 MiB of answers unread, so one
#: connection can make it hold at most this and that.  48 AMP values.
TABLE_BYTES = 3 * 1024 * 1024


class ListBackends(amp.Command):
    """
    The backends the balancer knows, in any state, sorted by name, and the
    policy in force.

    One AMP value holds at most 64 KiB, so the list comes in pages: ask
    from C{offset} (default 0) until C{total} backends have come.

    @param json: ask for the page as C{table}, a JSON list of the
        L{backendItem}s spread over several AMP values (up to
        L{TABLE_BYTES}, some 16,000 backends a page, where C{backends}
        holds some 300), with C{backends} empty.  A balancer that predates it
        ignores it and answers with C{backends}: read C{table} when it
        comes, C{backends} otherwise.
    """

    commandName = b"ListBackends"
    arguments = [(b"offset", amp.Integer(optional=True)), (b"json", amp.Boolean(optional=True))]
    response = [
        (b"policy", amp.Unicode()),
        (b"backends", amp.AmpList(BACKEND_FIELDS)),
        (b"total", amp.Integer()),
        (b"table", JSONChunks(optional=True)),
    ]
    errors = dict(_AUTH)


class _BackendCommand(amp.Command):
    arguments = [(b"name", amp.Unicode())]
    response = [(b"state", amp.Unicode()), NOT_SAVED]
    errors = {**_UNKNOWN_BACKEND, **_STORE}


class DrainBackend(_BackendCommand):
    """
    Stop sending new connections to a backend; its existing ones go on.
    """

    commandName = b"DrainBackend"


class EnableBackend(_BackendCommand):
    """
    Undo L{DrainBackend} or L{DisableBackend}.
    """

    commandName = b"EnableBackend"


class DisableBackend(_BackendCommand):
    """
    Take a backend out of rotation (as for maintenance).
    """

    commandName = b"DisableBackend"


class BackendInUse(ClusterError):
    """
    The backend cannot be forgotten while it is registered or configured;
    or added under a name in use, or removed when it is not static.
    """


class ForgetBackend(amp.Command):
    """
    Remove a backend that is down from the balancer's list (and state file).
    If it registers again later, it comes back as new.
    """

    commandName = b"ForgetBackend"
    arguments = [(b"name", amp.Unicode())]
    response = [NOT_SAVED]
    errors = {BackendInUse: b"BACKEND_IN_USE", **_UNKNOWN_BACKEND, **_STORE}


class AddBackend(amp.Command):
    """
    Add a static backend (one that does not speak AMP, kept in the pool by
    TCP health checks), as C{--backend
    NAME=HOST:PORT,weight=W,capacity=C,send-proxy=V} would at start-up; kept
    in the state file.  Answers with its state (up: static backends start
    up, and failing checks take them out).

    C{sendProxy} (C{"v1"} or C{"v2"}): every connection to it starts with a
    PROXY header.  The answer repeats it: a balancer that does not know the
    argument (older) ignores it, and its answer lacks it.
    """

    commandName = b"AddBackend"
    arguments = [
        (b"name", amp.Unicode()),
        (b"host", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"weight", amp.Integer(optional=True)),
        (b"capacity", amp.Integer(optional=True)),
        (b"sendProxy", amp.Unicode(optional=True)),
    ]
    response = [(b"state", amp.Unicode()), NOT_SAVED, (b"sendProxy", amp.Unicode(optional=True))]
    errors = {
        InvalidArgument: b"INVALID_ARGUMENT",
        BackendInUse: b"BACKEND_IN_USE",
        **_AUTH,
        **_STORE,
    }


class RemoveBackend(amp.Command):
    """
    Remove a static backend (given by C{--backend} or L{AddBackend}): no new
    connections, no more checks; the connections it has go on.  A backend
    that registered itself is refused (C{BACKEND_IN_USE}): drain it or stop
    it, and L{ForgetBackend} it once it is down.
    """

    commandName = b"RemoveBackend"
    arguments = [(b"name", amp.Unicode())]
    response = [NOT_SAVED]
    errors = {BackendInUse: b"BACKEND_IN_USE", **_UNKNOWN_BACKEND, **_STORE}


class SetWeight(amp.Command):
    """
    Change a backend's weight (0 takes no new connections).
    """

    commandName = b"SetWeight"
    arguments = [(b"name", amp.Unicode()), (b"weight", amp.Integer())]
    response = [(b"state", amp.Unicode()), NOT_SAVED]
    errors = {InvalidWeightError: b"INVALID_WEIGHT", **_UNKNOWN_BACKEND, **_STORE}


class SetPolicy(amp.Command):
    """
    Change the routing policy; answers with the one it replaced.
    """

    commandName = b"SetPolicy"
    arguments = [(b"policy", amp.Unicode())]
    response = [(b"previous", amp.Unicode()), NOT_SAVED]
    errors = {UnknownPolicyError: b"UNKNOWN_POLICY", **_AUTH, **_STORE}
