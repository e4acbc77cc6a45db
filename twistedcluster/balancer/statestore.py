"""
Operator state shared by several balancers on etcd (``--state-store
etcd:HOST:PORT[,HOST:PORT...]``, ``--state-prefix``).

What an operator sets (drain, disable, weight, the policy, static backends
added with ``cluster-admin add``, forget) is one key per item under the
prefix, as JSON:

  - C{PREFIX}C{policy}: the policy's name;
  - C{PREFIX}C{backends/NAME}: C{{"host", "port", "admin", "weight"}} of a
    backend with an operator setting (no key: enabled, default weight);
  - C{PREFIX}C{static/NAME}: C{{"host", "port", "capacity"[, "sendProxy"]}} of a static
    backend added at runtime;
  - C{PREFIX}C{forgotten/NAME}: written by ``forget``, so that every balancer
    drops that backend if it is down there too.

A balancer that takes an admin change applies it, then writes the keys
where its state now differs from what it knows of the store, in one etcd
transaction; the admin channel answers once etcd has it.  Every balancer
watches the prefix (one long-lived streaming request to etcd's v3 JSON
gateway, C{/v3/watch}) and applies each change as it comes, its own
included (applying is idempotent).  Whenever the watch (re)connects, the
balancer reads the whole prefix and makes its own state match it: that is
the catch-up after etcd or the balancer was away.

While the watch is down the balancer routes on with the state it has, and
refuses admin changes (L{StoreUnavailable}): a change that only one
balancer took would be undone by the next catch-up anyway.  A write that
fails after the change was applied puts back the last state the store had.

With C{--state-store-user} and C{--state-store-password-file}, the
balancer authenticates to etcd (C{/v3/auth/authenticate}) and sends the
token it gets in the C{Authorization} header of every request.  etcd's
tokens expire (C{--auth-token-ttl}, 300 s after their last use by default):
a request answered 401 (C{invalid auth token}) authenticates again and is
sent once more; a watch canceled for that reason is started again, with a
fresh token.  While etcd's authentication is off, requests go without a
token, and the first one refused for want of one authenticates.  Credentials that etcd refuses (L{StoreAuthFailed}) stop a
balancer at start (L{EXIT_STORE_AUTH}); later, they are one more reason the
store is unavailable.

The client is Twisted's own HTTP L{Agent}: no thread per request.  The one
exception is L{loadBlocking}, which reads the prefix before the reactor
runs, as the state file is read, so that a balancer starts with the
cluster's state rather than learning it a moment after it began routing.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from twistedcluster.address import parseHostPort
from twistedcluster.core.policies import POLICIES
from twistedcluster.core.pool import DEFAULT_WEIGHT, AdminState, State

__all__ = [
    "DEFAULT_PREFIX",
    "EXIT_STORE_AUTH",
    "EtcdStateStore",
    "StoreAuthFailed",
    "StoreUnavailable",
    "desiredState",
    "loadBlocking",
    "loadPassword",
    "parseStateStore",
    "reconcile",
]

log = Logger()

DEFAULT_PREFIX = "/twistedcluster/"
#: Seconds a write (or the catch-up read) may take before etcd counts as
#: unreachable.
REQUEST_TIMEOUT = 3.0
#: Seconds between attempts to reach etcd again, at most.
MAX_RETRY_DELAY = 2.0


#: The balancer's exit status when etcd refuses its credentials at start
#: (sysexits' EX_CONFIG: restarting will not help).
EXIT_STORE_AUTH = 78


class StoreUnavailable(Exception):
    """
    The state store cannot take a change now; the message says why.

    @ivar maybeTaken: whether a request went to etcd and no answer came (a
        timeout, a connection lost): etcd may have taken it all the same.
    """

    maybeTaken = False


class StoreAuthFailed(StoreUnavailable):
    """
    etcd refuses this balancer's credentials (a wrong user or password, no
    credentials where etcd asks for them, or a user whose roles do not
    cover the prefix); the message says which and what to do.
    """


#: (user, password) for etcd's authentication.
Credentials = Tuple[str, str]


def loadPassword(path: str) -> str:
    """
    The password in C{--state-store-password-file PATH}: the file's first
    line, without its line break.  C{ValueError} saying what is wrong; warns
    when any user may read the file (as a C{--secret-file}).
    """
    from twistedcluster.wire.auth import SecretFileError, readPrivateFile

    try:
        data = readPrivateFile(path, "password file")
    except SecretFileError as e:
        raise ValueError(str(e)) from None
    try:
        password = data.decode("utf-8").split("\n", 1)[0].rstrip("\r")
    except UnicodeDecodeError:
        raise ValueError(f"password file {path} is not UTF-8 text") from None
    if not password:
        raise ValueError(f"password file {path} is empty")
    return password


def _authProblem(status: int, answer: Dict[str, Any], credentials: Optional[Credentials],
                 prefix: str) -> Optional[str]:
    """
    What is wrong with the credentials, from an etcd error answer (the
    gRPC gateway's C{{"error", "code"}}); C{None} if the error is another
    kind (an expired token is not a problem with the credentials).
    """
    error = str(answer.get("error", ""))
    if "authentication failed" in error:
        return (
            f"etcd refused user {credentials[0] if credentials else '?'!r}: wrong user or "
            "password (--state-store-user, --state-store-password-file)"
        )
    if "user name is empty" in error:
        return (
            "etcd has authentication enabled: give --state-store-user and "
            "--state-store-password-file"
        )
    if status == 403 or "permission denied" in error:
        return (
            f"etcd user {credentials[0] if credentials else '(none)'!r} may not read and "
            f"write {prefix!r}: grant one of its roles readwrite on that prefix"
        )
    return None


def _needsToken(status: int, answer: Dict[str, Any]) -> bool:
    """
    Whether etcd refused a request for its token: expired (or from before
    etcd restarted), or none sent while etcd asks for one.
    """
    error = str(answer.get("error", ""))
    return status == 401 or "invalid auth token" in error or "user name is empty" in error


def _authOff(answer: Dict[str, Any]) -> bool:
    """
    Whether etcd answered an authentication that its authentication is off
    (then requests need no token; credentials are kept for when it is on).
    """
    return "authentication is not enabled" in str(answer.get("error", ""))


def _failure(status: int, answer: Dict[str, Any], credentials: Optional[Credentials],
             prefix: str) -> Exception:
    """
    The exception for an error answer: L{StoreAuthFailed} when it is about
    the credentials, C{ValueError} otherwise.
    """
    problem = _authProblem(status, answer, credentials, prefix)
    if problem is not None:
        return StoreAuthFailed(problem)
    return ValueError(f"HTTP {status}: {answer.get('error', answer)}")


def parseStateStore(spec: str) -> List[Tuple[str, int]]:
    """
    C{etcd:HOST:PORT[,HOST:PORT...]} as the etcd members' addresses.
    C{ValueError} saying what is wrong.
    """
    kind, sep, rest = spec.partition(":")
    if kind != "etcd" or not sep or not rest:
        raise ValueError(f"expected etcd:HOST:PORT[,HOST:PORT...], not {spec!r}")
    return [parseHostPort(part.strip()) for part in rest.split(",") if part.strip()]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _prefixEnd(prefix: bytes) -> bytes:
    """
    etcd's C{range_end} for every key that starts with C{prefix}.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


# -- the state as keys (pure) ------------------------------------------------


def _defaults(statics) -> Callable[[str], Tuple[AdminState, int]]:
    """
    A backend's settings when the store has none for it: enabled, with the
    weight its C{--backend} gave, or the default one.
    """

    def default(name: str) -> Tuple[AdminState, int]:
        b = statics.backends.get(name) if statics is not None else None
        if b is not None and name not in statics.added and b.weight is not None:
            return AdminState.ENABLED, b.weight
        return AdminState.ENABLED, DEFAULT_WEIGHT

    return default


def desiredState(cluster, statics) -> Dict[str, Any]:
    """
    What this balancer's operator state is, as the store's keys (relative
    to the prefix) and their values.
    """
    default = _defaults(statics)
    keys: Dict[str, Any] = {"policy": cluster.policyName}
    for name, s in cluster.pool.adminSettings().items():
        if (AdminState(s["admin"]), s["weight"]) != default(name):
            keys["backends/" + name] = s
    if statics is not None:
        from twistedcluster.balancer.statefile import staticEntry

        for name, b in statics.added.items():
            keys["static/" + name] = staticEntry(b)
        # Not added here (a backend registered under the name), still the
        # cluster's: a write from here must not delete them.
        for name, value in statics.heldBack.items():
            keys["static/" + name] = value
    return keys


def difference(
    desired: Dict[str, Any], known: Dict[str, Any]
) -> Tuple[Dict[str, Any], List[str]]:
    """
    The keys to put and to delete to make C{known} (what the store holds)
    C{desired}.  C{forgotten/} keys are events, never deleted here.
    """
    puts = {k: v for k, v in desired.items() if known.get(k) != v}
    deletes = [k for k in known if k not in desired and not k.startswith("forgotten/")]
    return puts, deletes


def applyKey(cluster, statics, key: str, value: Optional[Any]) -> None:
    """
    Make this balancer's state follow one key of the store (C{value}
    C{None}: the key was deleted).  Idempotent; a value it cannot use is
    logged and skipped: it never raises, so that one bad key (written by
    hand, or by another version) stops neither a balancer's start nor the
    admin changes of every balancer.
    """
    pool = cluster.pool
    kind, _, name = key.partition("/")
    try:
        if kind == "policy":
            if value is not None and value != cluster.policyName:
                if value not in POLICIES:
                    raise ValueError(f"unknown policy {value!r}")
                cluster.setPolicy(value, chosen=True)
                log.info("state store: policy {policy}", policy=value)
            elif value is not None:
                cluster.chosenPolicy = value  # an operator's, in force already
        elif kind == "backends" and name:
            if value is not None:
                from twistedcluster.balancer.statefile import backendSetting

                host, port, admin, weight = backendSetting(value)
                if name in pool:
                    current = pool.get(name)
                    if current.weight == weight and _admin(pool, name) is admin:
                        return
                pool.restore(name, host, port, admin, weight)
                log.info(
                    "state store: backend {name} {admin}, weight {weight}",
                    name=name, admin=admin.value, weight=weight,
                )
            elif name in pool:
                admin, weight = _defaults(statics)(name)
                if _admin(pool, name) is not admin:
                    pool.setAdminState(name, admin)
                if pool.get(name).weight != weight:
                    pool.setWeight(name, weight)
        elif kind == "static" and name and statics is not None:
            if value is not None:
                from twistedcluster.balancer.statefile import staticBackend

                b = staticBackend(name, value)
                if name not in statics.added:
                    if name in statics.checks:
                        raise ValueError("a --backend of that name is given here")
                    from twistedcluster.balancer.healthcheck import (
                        StaticAtOwnListener,
                        StaticNameTaken,
                    )

                    try:
                        statics.add(b, runtime=True, restoring=True)
                    except (StaticNameTaken, StaticAtOwnListener) as e:
                        # A backend registered here under that name (the
                        # first to take a name keeps it), or one at this
                        # balancer's own listener: not here, but still the
                        # cluster's (a write from here keeps the key).
                        log.warn(
                            "state store: static backend {name} not added here: {error}",
                            name=name,
                            error=str(e),
                        )
                        statics.heldBack[name] = value
                        return
                    # Added now: a value held back before is the cluster's
                    # no more (the store's newer one is).
                    statics.heldBack.pop(name, None)
                    log.info("state store: static backend {name} added", name=name)
            elif statics.heldBack.pop(name, None) is not None:
                pass
            elif name in statics.added:
                statics.remove(name)
                log.info("state store: static backend {name} removed", name=name)
        elif kind == "forgotten" and name and value is not None:
            if name in pool:
                s = pool.get(name)
                if s.state is State.DOWN and not s.static:
                    pool.remove(name)
                    log.info("state store: backend {name} forgotten", name=name)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        # ArithmeticError: a number JSON allows and int() does not (1e999).
        log.error("state store: cannot apply {key}: {error}", key=key, error=_errorText(e))
    except Exception:
        # Whatever else one key's value makes happen: that key is skipped,
        # the rest of the store still applies (and the watch goes on).
        log.failure("state store: cannot apply {key}", key=key)


def _admin(pool, name: str) -> AdminState:
    return AdminState(pool.adminSettings().get(name, {}).get("admin", "enabled"))


def reconcile(cluster, statics, known: Dict[str, Any]) -> None:
    """
    Make this balancer's operator state what the store holds (C{known}):
    static backends first, so that their settings find them.
    """
    desired = desiredState(cluster, statics)
    for key in sorted(desired, key=_order):
        if key not in known and key != "policy":
            applyKey(cluster, statics, key, None)
    for key in sorted(known, key=_order):
        if not key.startswith("forgotten/"):
            applyKey(cluster, statics, key, known[key])


def _order(key: str):
    return (not key.startswith("static/"), key)


# -- talking to etcd ---------------------------------------------------------


def _decodeKVs(prefix: bytes, kvs: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    known = {}
    for kv in kvs:
        key = _decodeKey(prefix, kv)
        if key is None:
            continue
        try:
            known[key] = json.loads(base64.b64decode(kv.get("value", "")))
        except (ValueError, RecursionError):
            log.error("state store: {key} is not JSON; ignored", key=key)
    return known


def _decodeKey(prefix: bytes, kv: Dict[str, Any]) -> Optional[str]:
    """
    A key's name under the prefix, or C{None} (logged) for one that no
    balancer wrote: not UTF-8, or not base64.
    """
    raw = kv.get("key", "")
    try:
        key = base64.b64decode(raw)
    except (ValueError, TypeError):
        log.error("state store: a key etcd sent is not base64 ({raw!r}); ignored", raw=raw)
        return None
    try:
        return key[len(prefix):].decode("utf-8")
    except ValueError:
        log.error("state store: key {key!r} is not UTF-8; ignored", key=key)
        return None


def _sslContext(tlsText: str):
    """
    The standard library's TLS context for C{--state-store-tls} (the
    C{--backend-tls} syntax), for L{loadBlocking}.
    """
    import ssl

    pairs = dict(part.split("=", 1) for part in tlsText.split(","))
    ca = pairs["ca"]
    context = ssl.create_default_context(cafile=None if ca == "system" else ca)
    if "cert" in pairs:
        context.load_cert_chain(pairs["cert"], pairs["key"])
    return context, pairs.get("hostname")


def loadBlocking(
    members: Sequence[Tuple[str, int]],
    prefix: str,
    timeout: float = 2.0,
    tlsText: Optional[str] = None,
    credentials: Optional[Credentials] = None,
) -> Optional[Dict[str, Any]]:
    """
    Read the prefix from the first member that answers, blocking: only for
    a balancer that is starting, before the reactor runs.  C{None} when
    none answers (the balancer starts without, and catches up later);
    L{StoreAuthFailed} when one answers that the credentials will not do.
    """
    p = prefix.encode("utf-8")
    body = {"key": _b64(p), "range_end": _b64(_prefixEnd(p))}
    for host, port in members:
        try:
            if tlsText is None:
                conn: http.client.HTTPConnection = http.client.HTTPConnection(
                    host, port, timeout=timeout
                )
            else:
                context, hostname = _sslContext(tlsText)
                conn = _HTTPSConnection(host, port, timeout=timeout, context=context)
                conn.serverName = hostname or host
            try:
                token = None
                if credentials is not None:
                    status, answer = _blockingPost(
                        conn, "/v3/auth/authenticate", _authMessage(credentials), None)
                    if status == 200:
                        token = str(answer["token"])
                    elif not _authOff(answer):
                        raise _failure(status, answer, credentials, prefix)
                status, answer = _blockingPost(conn, "/v3/kv/range", body, token)
                if status != 200:
                    raise _failure(status, answer, credentials, prefix)
                return _decodeKVs(p, answer.get("kvs", []))
            finally:
                conn.close()
        except (OSError, ValueError, KeyError) as e:
            log.warn(
                "state store: cannot read etcd at {host}:{port}: {error}",
                host=host, port=port, error=str(e),
            )
    return None


def _authMessage(credentials: Credentials) -> Dict[str, str]:
    return {"name": credentials[0], "password": credentials[1]}


def _blockingPost(
    conn, path: str, message: Dict[str, Any], token: Optional[str]
) -> Tuple[int, Dict[str, Any]]:
    """
    One request on C{conn}: its status and JSON answer.
    """
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = token
    conn.request("POST", path, json.dumps(message).encode(), headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


class _HTTPSConnection(http.client.HTTPSConnection):
    """
    HTTPS whose certificate is checked against C{serverName}
    (C{--state-store-tls hostname=}), not necessarily the host dialled.
    """

    serverName: Optional[str] = None

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self.serverName or self.host
        )


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """
    The Agent's TLS for etcd: C{--state-store-tls} (a
    L{twistedcluster.balancer.backendtls.BackendTLS}).
    """

    def __init__(self, tls) -> None:
        self.tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int):
        return self.tls.optionsFor(hostname.decode("ascii"))


def _urlHost(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Lines(Protocol):
    """
    Reads the watch's stream: one JSON object after another.
    """

    def __init__(self, onMessage: Callable[[Dict[str, Any]], None], done: defer.Deferred):
        self.onMessage = onMessage
        self.done = done
        self.buffer = b""
        self.decoder = json.JSONDecoder()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        text = self.buffer.decode("utf-8", "replace")
        position = 0
        while True:
            while position < len(text) and text[position] in " \r\n\t":
                position += 1
            if position >= len(text):
                break
            try:
                message, position = self.decoder.raw_decode(text, position)
            except ValueError:
                break
            self.onMessage(message)
        self.buffer = text[position:].encode("utf-8")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


class EtcdStateStore(Service):
    """
    Keeps one balancer's operator state in step with etcd; call it (the
    admin channel's C{onChange}) after an admin change to write it.

    @param members: the etcd members' (host, port), tried in turn.
    @param known: what the store held when the balancer started
        (L{loadBlocking}), or C{None}.
    """

    def __init__(
        self,
        members: Sequence[Tuple[str, int]],
        prefix: str,
        cluster,
        statics,
        reactor,
        known: Optional[Dict[str, Any]] = None,
        agent=None,
        tls=None,
        credentials: Optional[Credentials] = None,
    ) -> None:
        if agent is None:
            from twisted.web.client import Agent

            if tls is None:
                agent = Agent(reactor, pool=_quietPool(reactor))
            else:
                agent = Agent(reactor, contextFactory=_TLSPolicy(tls), pool=_quietPool(reactor))
        self.scheme = "http" if tls is None else "https"
        self.members = list(members)
        self.prefix = prefix
        self._prefix = prefix.encode("utf-8")
        self.cluster = cluster
        self.statics = statics
        self.reactor = reactor
        self.agent = agent
        self.known: Dict[str, Any] = dict(known or {})
        #: Whether the watch runs: admin changes are taken only then.
        self.watching = False
        self._member = 0
        self._revision = 0
        self._watchRequest: Optional[defer.Deferred] = None
        self._watchBody: Optional[Any] = None
        self._retry = None
        self._delay = 0.1
        self._stopping = False
        self._lastError = "not connected yet"
        self.credentials = credentials
        #: etcd's token for L{credentials}, once authenticated.
        self._token: Optional[str] = None
        self._cancelReason: Optional[str] = None

    # -- the service ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._connect()

    def stopService(self):
        super().stopService()
        self._stopping = True
        self.watching = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._watchBody is not None:
            self._watchBody.stopProducing()
            self._watchBody = None
        if self._watchRequest is not None:
            self._watchRequest.cancel()
            self._watchRequest = None

    # -- HTTP -------------------------------------------------------------

    def _url(self, path: str) -> bytes:
        host, port = self.members[self._member % len(self.members)]
        return f"{self.scheme}://{_urlHost(host)}:{port}{path}".encode("ascii")

    def _post(self, path: str, message: Dict[str, Any], timeout: Optional[float]) -> defer.Deferred:
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        headers = Headers({b"content-type": [b"application/json"]})
        if self._token is not None and path != "/v3/auth/authenticate":
            headers.addRawHeader(b"authorization", self._token.encode("ascii"))
        d = self.agent.request(
            b"POST",
            self._url(path),
            headers,
            FileBodyProducer(io.BytesIO(json.dumps(message).encode())),
        )
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        return d

    async def _call(self, path: str, message: Dict[str, Any]) -> Dict[str, Any]:
        """
        One request and its JSON answer, trying each member once; with
        L{credentials}, authenticating first and again when the token has
        expired.
        """
        errors = []
        maybeTaken = False
        for _ in range(len(self.members)):
            try:
                if self.credentials is not None and self._token is None:
                    await self._authenticate()
                code, answer = await self._request(path, message)
                if self.credentials is not None and _needsToken(code, answer):
                    had, self._token = self._token, None
                    await self._authenticate()
                    log.info(
                        "state store: {why}; authenticated again as {user}",
                        why="etcd's token had expired" if had is not None
                        else "etcd asks for authentication now",
                        user=self.credentials[0],
                    )
                    code, answer = await self._request(path, message)
                if code != 200:
                    raise _failure(code, answer, self.credentials, self.prefix)
                return answer
            except StoreAuthFailed:
                raise
            except Exception as e:
                # Not connected, or etcd's own answer: it took nothing.
                # Anything else (no answer in time, the connection lost)
                # leaves it unknown.
                maybeTaken = maybeTaken or not isinstance(
                    e, (ConnectError, DNSLookupError, ValueError)
                )
                errors.append(f"{self._describeMember()}: {_errorText(e)}")
                self._member += 1
        unavailable = StoreUnavailable("etcd unreachable (" + "; ".join(errors) + ")")
        unavailable.maybeTaken = maybeTaken
        raise unavailable

    async def _request(self, path: str, message: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        """
        One request to the current member: its status and JSON answer.
        """
        from twisted.web.client import readBody

        response = await self._post(path, message, REQUEST_TIMEOUT)
        body = await readBody(response).addTimeout(REQUEST_TIMEOUT, self.reactor)
        try:
            answer = json.loads(body)
        except ValueError:
            raise ValueError(f"HTTP {response.code}: {body[:200]!r}") from None
        return response.code, answer

    async def _authenticate(self) -> None:
        """
        Get a token for L{credentials} from the current member; none while
        etcd's authentication is off.
        """
        assert self.credentials is not None
        code, answer = await self._request("/v3/auth/authenticate", _authMessage(self.credentials))
        if code == 200:
            self._token = str(answer["token"])
            log.debug("state store: authenticated to etcd as {user}", user=self.credentials[0])
        elif not _authOff(answer):
            raise _failure(code, answer, self.credentials, self.prefix)

    def _describeMember(self) -> str:
        host, port = self.members[self._member % len(self.members)]
        return f"{_urlHost(host)}:{port}"

    # -- the watch --------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._stopping:
            return
        d = defer.ensureDeferred(self._catchUpAndWatch())
        d.addErrback(self._watchFailed)

    async def _catchUpAndWatch(self) -> None:
        p = self._prefix
        answer = await self._call(
            "/v3/kv/range", {"key": _b64(p), "range_end": _b64(_prefixEnd(p))}
        )
        if self._stopping:
            return
        self._revision = int(answer["header"]["revision"])
        self.known = _decodeKVs(p, answer.get("kvs", []))
        reconcile(self.cluster, self.statics, self.known)
        done: defer.Deferred = defer.Deferred()
        created: defer.Deferred = defer.Deferred()
        self._watchRequest = self._post(
            "/v3/watch",
            {
                "create_request": {
                    "key": _b64(p),
                    "range_end": _b64(_prefixEnd(p)),
                    "start_revision": str(self._revision + 1),
                }
            },
            REQUEST_TIMEOUT,
        )
        self._cancelReason = None
        response = await self._watchRequest
        self._watchRequest = None
        if response.code != 200:
            raise ValueError(f"watch: HTTP {response.code}")
        lines = _Lines(lambda m: self._message(m, created), done)
        response.deliverBody(lines)
        self._watchBody = lines.transport
        waiting = defer.DeferredList(
            [created, done], fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True
        )
        waiting.addTimeout(REQUEST_TIMEOUT, self.reactor)
        await waiting
        if done.called:
            raise ConnectionError(
                f"the watch was canceled: {self._cancelReason}" if self._cancelReason
                else "the watch stream ended before it was created"
            )
        if not self.watching:
            log.info(
                "state store: watching etcd {member} prefix {prefix} from revision {revision} "
                "({n} key(s))",
                member=self._describeMember(), prefix=self.prefix,
                revision=self._revision, n=len(self.known),
            )
        self.watching = True
        self._delay = 0.1
        await done
        self._watchBody = None
        raise ConnectionError("the watch stream closed")

    def _message(self, message: Dict[str, Any], created: defer.Deferred) -> None:
        result = message.get("result", message)
        if "error" in message:
            log.error("state store: watch error {error}", error=message["error"])
            return
        if result.get("canceled") or result.get("compact_revision"):
            reason = str(result.get("cancel_reason", ""))
            if "auth token" in reason or "Unauthenticated" in reason:
                # Created with a token that expired meanwhile: a new one.
                self._token = None
            self._cancelReason = reason or "compacted"
            if created.called:
                log.warn("state store: watch canceled ({why}); reading again", why=result)
            if self._watchBody is not None:
                self._watchBody.stopProducing()
            return
        if result.get("created") and not created.called:
            created.callback(None)
        for event in result.get("events", ()):
            kv = event.get("kv", {})
            key = _decodeKey(self._prefix, kv)
            if key is None:
                continue
            value: Optional[Any] = None
            if event.get("type", "PUT") == "PUT":
                try:
                    value = json.loads(base64.b64decode(kv.get("value", "")))
                except (ValueError, RecursionError):
                    log.error("state store: {key} is not JSON; ignored", key=key)
                    continue
                self.known[key] = value
            else:
                self.known.pop(key, None)
            self._revision = max(self._revision, int(kv.get("mod_revision", 0) or 0))
            applyKey(self.cluster, self.statics, key, value)

    def _watchFailed(self, failure) -> None:
        self._watchRequest = None
        if self._watchBody is not None:
            self._watchBody.stopProducing()
            self._watchBody = None
        if self._stopping:
            return
        error = _errorText(failure.value)
        if failure.check(StoreAuthFailed) and error != self._lastError:
            log.error(
                "state store: {error}; routing on with the last known state, admin "
                "changes refused until etcd takes the credentials",
                error=error,
            )
        elif self.watching or error != self._lastError:
            log.warn(
                "state store: lost etcd ({error}); routing on with the last known "
                "state, admin changes refused until it is back",
                error=error,
            )
        self._lastError = error
        self.watching = False
        self._member += 1
        self._retry = self.reactor.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, MAX_RETRY_DELAY)

    # -- admin changes ----------------------------------------------------

    def checkWritable(self) -> None:
        """
        Raise L{StoreUnavailable} unless an admin change can be taken now.
        """
        if not self.watching:
            raise StoreUnavailable(
                f"the state store (etcd {', '.join(h + ':' + str(p) for h, p in self.members)}) "
                f"is unreachable ({self._lastError}): the change is refused, every "
                "balancer keeps its last known state"
            )

    def __call__(
        self, forgotten: Optional[str] = None, policy: Optional[str] = None
    ) -> defer.Deferred:
        """
        Write what this balancer's state now has that the store has not;
        fails with L{StoreUnavailable} (and this balancer's state is put back
        as the store has it) when etcd cannot take it.

        @param forgotten: the backend a C{forget} removed.
        @param policy: given when the change set the policy.  Until an
            operator sets one, each balancer keeps its own C{--policy}.
        """
        return defer.ensureDeferred(self._write(forgotten, policy))

    async def _write(self, forgotten: Optional[str], policy: Optional[str] = None) -> None:
        desired = desiredState(self.cluster, self.statics)
        if policy is None and "policy" not in self.known:
            del desired["policy"]
        puts, deletes = difference(desired, self.known)
        if forgotten is not None:
            puts["forgotten/" + forgotten] = {"name": forgotten}
        if not puts and not deletes:
            return
        p = self._prefix
        ops: List[Dict[str, Any]] = [
            {"request_put": {"key": _b64(p + k.encode()), "value": _b64(json.dumps(v).encode())}}
            for k, v in sorted(puts.items())
        ] + [{"request_delete_range": {"key": _b64(p + k.encode())}} for k in deletes]
        try:
            if not self.watching:
                self.checkWritable()
            await self._call("/v3/kv/txn", {"success": ops})
        except StoreUnavailable as e:
            reconcile(self.cluster, self.statics, self.known)
            if self._watchBody is not None:
                # A member that holds the watch but cannot take a write (cut
                # off from the others, or hung): watch another one.
                self._watchBody.stopProducing()
            if e.maybeTaken:
                # The watch tells what etcd did: if it took the change,
                # every balancer (this one too) applies it in a moment.
                unknown = StoreUnavailable(
                    f"the state store did not say whether it took the change ({e}): "
                    "this balancer keeps the state the store last had, and follows "
                    "the store; if etcd took it, every balancer applies it in a "
                    "moment: look with status before trying again"
                )
                unknown.maybeTaken = True
                raise unknown from None
            raise StoreUnavailable(
                f"the state store could not take the change, which is undone: {e}"
            ) from None
        for k, v in puts.items():
            self.known[k] = v
        for k in deletes:
            self.known.pop(k, None)


def _quietPool(reactor):
    """
    Connections to etcd that are not logged one by one (an admin change
    makes one).
    """
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    class Quiet(_HTTP11ClientFactory):
        noisy = False

    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = Quiet
    return pool


def _errorText(e: BaseException) -> str:
    # The Agent's ResponseFailed, ResponseNeverReceived...: the first reason.
    reasons = getattr(e, "reasons", None)
    if reasons:
        return _errorText(reasons[0].value)
    if isinstance(e, (defer.TimeoutError, defer.CancelledError)):
        # Requests are cancelled only by their timeout (REQUEST_TIMEOUT).
        return "no answer in time"
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:300]
