"""
The balancer's state file: what operators set (drain, disable, weight, the
policy, static backends added with ``cluster-admin add``) survives a
balancer restart.

A small JSON document the balancer owns, holding only backends that have an
operator setting (a backend that merely registered comes back by
registering).  It is rewritten atomically (write a temporary file, fsync,
rename, fsync the folder) after admin changes, in a thread: an fsync can
take a disk's worth of time, which the reactor must not wait for.  Changes
made in one reactor turn, or while a write is under way, share the next
write.  Backends listed there appear as down until they register again.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from twistedcluster.core.cluster import Cluster
from twistedcluster.core.policies import POLICIES
from twistedcluster.core.pool import AdminState, MAX_WEIGHT, MIN_WEIGHT

log = Logger()

#: 2: C{policy} is the one an operator chose (C{null}: none, the
#: command line's applies).  1 (still read): the policy in force, whoever
#: chose it.
VERSION = 2
_READABLE = (1, 2)

#: What temporary files were called before they named their state file.
_LEGACY_TEMPORARY = re.compile(r"\.state-[a-z0-9_]{8}\Z")


class StateFileError(ValueError):
    """
    The state file exists but cannot be used; the message says why.
    """


class StateNotSaved(Exception):
    """
    An admin change could not be written to the state file: it is in force,
    but a restart would lose it.  The message says why.
    """


def snapshot(cluster: Cluster, statics=None) -> Dict[str, Any]:
    """
    What the state file holds: the policy, every backend with an operator
    setting, and (with C{statics}, the balancer's
    L{twistedcluster.balancer.healthcheck.TCPHealthChecks}) the static
    backends added with ``cluster-admin add``.
    """
    state: Dict[str, Any] = {
        "version": VERSION,
        # Only an operator's choice: a restart with another --policy takes
        # that one unless an operator chose.
        "policy": cluster.chosenPolicy,
        "backends": cluster.pool.adminSettings(),
    }
    if statics is not None:
        state["static"] = {name: staticEntry(b) for name, b in sorted(statics.added.items())}
    return state


def _temporaryPrefix(path: str) -> str:
    return f".state-{os.path.basename(path)}-"


def write(path: str, state: Dict[str, Any]) -> None:
    """
    Write C{state} (a L{snapshot}) atomically and durably: a crash leaves
    the old file or the new one, and the rename itself is on disk when this
    returns.  Blocks: run it in a thread.
    """
    data = json.dumps(state, indent=2, sort_keys=True).encode()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_temporaryPrefix(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save(path: str, cluster: Cluster) -> None:
    """
    Write the cluster's state now, blocking (see L{write}).
    """
    write(path, snapshot(cluster))


def removeTemporaries(path: str) -> List[str]:
    """
    Remove the temporary files that writing C{path} left behind when the
    balancer died mid-write; return their names.  Only for a balancer that
    is starting: it would remove a write under way.
    """
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporaryPrefix(path)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(prefix) or _LEGACY_TEMPORARY.match(name):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                continue
            removed.append(name)
    return removed


def checkFolder(path: str) -> None:
    """
    Raise L{StateFileError} when the state file could never be written: its
    folder is missing or not ours to write.  Said when the balancer starts,
    not at the first change ("applied but not saved").
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StateFileError(f"state file {path}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StateFileError(f"state file {path}: its folder {folder} is not writable")


def load(path: str) -> Dict[str, Any]:
    """
    Read and check a state file; an empty state if there is none yet.
    """
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"version": VERSION, "policy": None, "backends": {}, "static": {}}
    except json.JSONDecodeError as e:
        if not str(e.doc).strip():
            raise StateFileError(
                f"cannot read state file {path}: it is empty (remove it to start afresh)"
            ) from None
        raise StateFileError(f"cannot read state file {path}: {e}") from None
    except (OSError, ValueError) as e:
        raise StateFileError(f"cannot read state file {path}: {e}") from None
    except RecursionError:
        raise StateFileError(f"cannot read state file {path}: nested too deep") from None
    try:
        if data["version"] not in _READABLE:
            raise StateFileError(f"state file {path}: unknown version {data['version']!r}")
        policy = data.get("policy")
        if policy is not None and policy not in POLICIES:
            raise StateFileError(f"state file {path}: unknown policy {policy!r}")
        for name, b in data["backends"].items():
            backendSetting(b)
        # Written since static backends could be added at runtime; absent
        # from older files.
        data.setdefault("static", {})
        for name, b in data["static"].items():
            _staticBackend(name, b)
    except StateFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        # ArithmeticError: a number JSON allows and int() does not (1e999).
        raise StateFileError(f"state file {path} is malformed: {e!r}") from None
    return data


def backendSetting(entry: Dict[str, Any]) -> Tuple[str, int, AdminState, int]:
    """
    The address, admin state and weight an operator setting of a backend
    holds (the state file's C{backends}, the state store's C{backends/NAME});
    C{ValueError} (or C{KeyError}, C{TypeError}, C{ArithmeticError}) when
    it is malformed.
    """
    admin = AdminState(entry["admin"])
    weight = int(entry["weight"])
    if not (MIN_WEIGHT <= weight <= MAX_WEIGHT):
        raise ValueError(f"weight {entry['weight']!r} is not {MIN_WEIGHT}..{MAX_WEIGHT}")
    host, port = str(entry["host"]), int(entry["port"])
    if not 0 <= port < 65536:
        # 0: a backend known only by its settings, before any address.
        raise ValueError(f"port {entry['port']!r} is not 0..65535")
    return host, port, admin, weight


def staticEntry(b) -> Dict[str, Any]:
    """
    What the state file (and the state store) keep of a static backend
    added at runtime: its address and capacity, and its PROXY header
    version when it has one (absent otherwise, as in files written before).
    """
    entry: Dict[str, Any] = {"host": b.host, "port": b.port, "capacity": b.capacity}
    if b.sendProxy is not None:
        entry["sendProxy"] = b.sendProxy
    return entry


def staticBackend(name: str, entry: Dict[str, Any]):
    """
    The static backend a L{staticEntry} describes; C{ValueError} (or
    C{KeyError}, C{TypeError}) when it is malformed.
    """
    from twistedcluster.balancer.staticbackend import makeStaticBackend

    return makeStaticBackend(
        name,
        entry["host"],
        int(entry["port"]),
        capacity=int(entry["capacity"]),
        sendProxy=entry.get("sendProxy"),
    )


_staticBackend = staticBackend


def restoreStatics(statics, data: Dict[str, Any]) -> None:
    """
    Add back the static backends ``cluster-admin add`` had added (before
    the balancer starts).  A start-up C{--backend} of the same name wins.
    """
    for name, entry in sorted(data.get("static", {}).items()):
        if name in statics.checks:
            log.warn(
                "state file: static backend {name} is given by --backend too; "
                "--backend wins",
                name=name,
            )
            continue
        from twistedcluster.balancer.healthcheck import StaticAtOwnListener

        try:
            statics.add(_staticBackend(name, entry), runtime=True, restoring=True)
        except StaticAtOwnListener as e:
            log.error("state file: static backend {name} not added: {error}", name=name, error=str(e))


def restore(cluster: Cluster, data: Dict[str, Any]) -> None:
    policy = data.get("policy")
    if policy:
        if policy != cluster.policyName:
            log.info(
                "policy {policy}, as an operator chose it (cluster-admin policy), "
                "not --policy {configured}",
                policy=policy,
                configured=cluster.policyName,
            )
            if data.get("version") == 1:
                log.warn(
                    "the state file's policy {policy} was saved by an older version, "
                    "which could not tell an operator's choice from --policy; if "
                    "{configured} is meant, run: cluster-admin policy {configured}",
                    policy=policy,
                    configured=cluster.policyName,
                )
        cluster.setPolicy(policy, chosen=True)
    for name, b in data["backends"].items():
        cluster.pool.restore(name, *backendSetting(b))


class StateKeeper:
    """
    Saves the cluster's admin state to C{path} when told of a change.

    Calling it returns a Deferred that fires when a write made after the
    call is on disk, or fails with L{StateNotSaved}: the admin channel
    answers only then, and says so when the change was not saved.  A failed
    write is logged, never fatal: routing goes on.

    @param clock: schedules the write at the end of the current turn.
    @param inThread: C{inThread(f, *args)} runs C{f} away from the reactor
        and returns a Deferred of its result; the reactor's thread pool
        unless given.
    @param statics: the balancer's static backends, whose runtime additions
        are saved too (see L{snapshot}).
    """

    def __init__(
        self,
        path: str,
        cluster: Cluster,
        clock,
        inThread: Optional[Callable[..., defer.Deferred]] = None,
        statics=None,
    ) -> None:
        self.path = path
        self.cluster = cluster
        self.statics = statics
        self.clock = clock
        if inThread is None:
            from twisted.internet.threads import deferToThreadPool

            def inThread(f, *args):
                return deferToThreadPool(clock, clock.getThreadPool(), f, *args)

        self._inThread = inThread
        self._waiting: List[defer.Deferred] = []
        self._scheduled = None
        self._writing = False
        self._failing = False

    def __call__(self, **hints: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._waiting and self._scheduled is None and not self._writing:
            self._scheduled = self.clock.callLater(0, self._write)

    def _write(self) -> None:
        self._scheduled = None
        waiting, self._waiting = self._waiting, []
        self._writing = True
        d = self._inThread(write, self.path, snapshot(self.cluster, self.statics))
        d.addCallbacks(
            self._saved, self._notSaved, callbackArgs=(waiting,), errbackArgs=(waiting,)
        )

    def _saved(self, _, waiting: List[defer.Deferred]) -> None:
        self._writing = False
        if self._failing:
            self._failing = False
            log.info("state file {path} written again", path=self.path)
        for d in waiting:
            d.callback(None)
        self._schedule()

    def _notSaved(self, failure, waiting: List[defer.Deferred]) -> None:
        self._writing = False
        self._failing = True
        error = failure.value
        log.error(
            "cannot write state file {path}: {error}; admin changes will not "
            "survive a restart",
            path=self.path,
            error=error,
        )
        for d in waiting:
            d.errback(StateNotSaved(f"cannot write state file {self.path}: {error}"))
        self._schedule()
