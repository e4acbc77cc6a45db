"""
systemd's file-descriptor store: the listening sockets outlive the process.

Under a unit with C{FileDescriptorStoreMax=} (systemd says how many in
C{$FDSTORE}), the balancer hands systemd a copy of each listening socket
once it listens: one sd_notify(3) datagram to C{$NOTIFY_SOCKET} per socket,
C{FDSTORE=1} and C{FDNAME=<role>} (proxy, redirect, control, admin,
metrics) with the descriptor as C{SCM_RIGHTS}.  systemd keeps them while
the service restarts (C{systemctl restart}, or C{Restart=on-failure} after
a crash) and passes them to the next process as socket activation passes
a socket unit's (C{LISTEN_FDS}, C{LISTEN_FDNAMES}, C{LISTEN_PID}), which
adopts them by name.  The sockets never close, so clients wait in their
accept queue while no process runs instead of being refused.

With the sockets goes a memfd named C{listeners.json}: the endpoint string
each socket was opened from.  A socket is adopted only for the same
endpoint string (as with C{--takeover}); one whose endpoint changed, or
that the balancer no longer opens, is closed and removed from the store
(C{FDSTOREREMOVE=1}) before any listener binds, so that a new one may take
its address.

Stored: the TCP listeners (C{tcp:}, C{tcp6:}) this process opens.  Not
stored (yet): TLS listeners (C{ssl:}, C{mtls:}; C{--takeover} adopts them
with their TLS layer, L{twistedcluster.balancer.takeover.tlsContextOf}), unix sockets (their path may be gone by the next start, e.g.
with its C{RuntimeDirectory=}), sockets systemd holds already (C{systemd:}
endpoints: a socket unit's), the C{--takeover} socket, and with
C{--workers} the proxy and redirect sockets (the workers hold those).

The descriptors come from the list Twisted's C{systemd:} endpoints read
(L{twistedcluster.fast.internals.systemdDescriptors}): socket units' and
the store's arrive together.
"""

from __future__ import annotations

import json
import os
import select
import socket
from typing import Any, Dict, Iterable, List, Optional, Tuple

from twisted.application.service import Service
from twisted.logger import Logger

from twistedcluster.address import endpointParts
from twistedcluster.balancer.takeover import Inherited, notifySystemd

log = Logger()

#: The memfd naming each stored socket's endpoint string.
DESCRIPTIONS = "listeners.json"
#: The memfd holding the backends whose control channels are live,
#: rewritten every L{POOL_INTERVAL} seconds.
POOL = "pool.json"
POOL_INTERVAL = 1.0
#: The roles whose sockets may be stored.
ROLES = ("proxy", "redirect", "control", "admin", "metrics")
#: Endpoint kinds whose socket an adopted port serves faithfully.
STORABLE_KINDS = ("tcp", "tcp6")
#: Seconds to wait for systemd to have closed removed sockets.
BARRIER_TIMEOUT = 5.0


def capacity(environ=None) -> int:
    """
    How many descriptors systemd keeps for this service: C{$FDSTORE} (set
    by systemd 254 and later from C{FileDescriptorStoreMax=}; the unit sets
    it too, for older ones) when C{$NOTIFY_SOCKET} is set; else 0.
    """
    environ = os.environ if environ is None else environ
    if not environ.get("NOTIFY_SOCKET"):
        return 0
    try:
        return max(0, int(environ.get("FDSTORE", "0")))
    except ValueError:
        return 0


def storable(description: str) -> bool:
    """
    Whether a listener opened from C{description} may be stored.
    """
    kind = endpointParts(description)[0].lower()
    return kind in STORABLE_KINDS or kind.isdigit()


def systemdNames(descriptions: Iterable[str]) -> List[str]:
    """
    The descriptor names C{systemd:} endpoints among C{descriptions} use:
    a socket unit's, not ours.
    """
    names = []
    for description in descriptions:
        kind, _, kwargs = endpointParts(description)
        if kind.lower() == "systemd" and "name" in kwargs:
            names.append(kwargs["name"])
    return names


def _readAll(fd: int) -> bytes:
    chunks: List[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _listeningFamily(fd: int) -> Optional[int]:
    """
    The address family of the listening socket C{fd}; C{None} when it is
    not one.
    """
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        return int(probe.family)
    except OSError:
        return None
    finally:
        probe.close()


class Stored(Inherited):
    """
    The sockets a restarted balancer got back from systemd's store, by role.

    @ivar ours: every name in the store this balancer answers for (what
        it adopts, and what it closes and removes when it does not).
    """

    source = "fd store"
    former = "the stored"

    def __init__(self, listeners: Dict[str, Tuple[int, int, str]], ours: Dict[str, int], environ=None, state=None) -> None:
        super().__init__(listeners)
        self.ours = ours
        #: The pool as the last process saw it, as --takeover hands it
        #: over: {"live": [...]}.
        self.state = state if state is not None else {"live": []}
        self.environ = environ
        #: The roles whose stored socket is adopted here (still in the store).
        self.adopted: List[str] = []

    def take(self, role: str, description: str, reactor):
        endpoint = super().take(role, description, reactor)
        if endpoint is not None:
            self.adopted.append(role)
            log.info(
                "fd store: the {role} listener ({endpoint}) is the socket systemd kept",
                role=role,
                endpoint=description,
            )
        return endpoint

    def release(self) -> List[str]:
        """
        Close, here and in systemd's store, every stored socket no listener
        took, and wait until systemd has (so that a listener may bind its
        address again): the names removed.  Called once every listener has
        taken its socket, before any binds.
        """
        self.closeUnused()
        for fd in self.ours.values():
            os.close(fd)  # a listener adopts its own copy
        removed = sorted(n for n in self.ours if n not in self.adopted and n not in (DESCRIPTIONS, POOL))
        for name in removed:
            notifySystemd(f"FDSTOREREMOVE=1\nFDNAME={name}", self.environ)
        if removed:
            log.info(
                "fd store: {names} closed and removed from the store (not used here)",
                names=", ".join(removed),
            )
            barrier(self.environ)
        return removed


def fromSystemd(descriptors: Dict[str, int], skip: Iterable[str] = (), environ=None) -> Optional[Stored]:
    """
    What systemd passed back from the store (C{descriptors}: name -> fd,
    from L{twistedcluster.fast.internals.systemdDescriptors}): L{Stored},
    or C{None} when nothing of ours came.  Names in C{skip} (those of
    socket units' sockets) are left alone.
    """
    skip = set(skip)
    ours = {
        name: fd
        for name, fd in descriptors.items()
        if (name in ROLES or name in (DESCRIPTIONS, POOL)) and name not in skip
    }
    if not ours:
        return None
    described: Dict[str, str] = {}
    if DESCRIPTIONS in ours:
        try:
            loaded = json.loads(_readAll(ours[DESCRIPTIONS]))
            described = {str(k): str(v) for k, v in loaded["listeners"].items()}
        except (OSError, ValueError, KeyError, AttributeError) as e:
            log.warn("fd store: {name} cannot be read ({error}): no stored socket is adopted", name=DESCRIPTIONS, error=e)
    state: Dict[str, Any] = {"live": []}
    if POOL in ours:
        try:
            state = {"live": list(json.loads(_readAll(ours[POOL]))["live"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warn("fd store: {name} cannot be read ({error}): backends start unknown", name=POOL, error=e)
    listeners = {}
    for role in ROLES:
        fd = ours.get(role)
        if fd is None or role not in described:
            continue
        family = _listeningFamily(fd)
        if family is None:
            log.warn("fd store: the stored {role} descriptor is not a listening socket", role=role)
            continue
        listeners[role] = (os.dup(fd), family, described[role])
    log.info(
        "fd store: systemd passed back {names}",
        names=", ".join(sorted(ours)),
    )
    return Stored(listeners, ours, environ, state)


def barrier(environ=None, timeout: float = BARRIER_TIMEOUT) -> bool:
    """
    Wait until systemd has handled every message sent before (sd_notify's
    C{BARRIER=1}: it closes the pipe end that comes with it); whether it
    did within C{timeout}.
    """
    r, w = os.pipe()
    try:
        if not notifySystemd("BARRIER=1", environ, fds=[w]):
            return False
        os.close(w)
        w = -1
        poller = select.poll()
        poller.register(r, select.POLLHUP)
        if poller.poll(timeout * 1000):
            return True
        log.warn("fd store: systemd did not answer a barrier within {timeout} s", timeout=timeout)
        return False
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _memfd(name: str, value) -> int:
    """
    A memory file named C{name} holding C{value} as JSON.
    """
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        import tempfile

        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    _rewrite(fd, value)
    return fd


def _rewrite(fd: int, value) -> None:
    data = json.dumps(value, sort_keys=True).encode("utf-8")
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


class FDStoreService(Service):
    """
    Once the listeners listen, hands systemd a copy of each storable one,
    the memfd naming their endpoints and the memfd of the live pool (which
    it rewrites every L{POOL_INTERVAL} seconds: systemd holds the same
    file), and makes their ports close without shutting the shared socket
    down: after a SIGTERM the socket stays open in the store for the next
    process.

    @param ports: role -> listening port (filled as they open).
    @param descriptions: role -> endpoint string.
    @param stored: what came back from the store (L{Stored}), if anything.
    @param limit: the store's room (C{$FDSTORE}).
    @param live: returns the backends whose control channels are live
        (L{twistedcluster.balancer.takeover.liveBackends}).
    """

    def __init__(self, ports, descriptions: Dict[str, str], stored: Optional[Stored], limit: int, live=None, clock=None, environ=None) -> None:
        self.ports = ports
        self.descriptions = descriptions
        self.stored = stored
        self.limit = limit
        self.live = live
        self.clock = clock
        self.environ = environ
        self._pool: Optional[int] = None
        self._loop: Optional[Any] = None

    def startService(self) -> None:
        super().startService()
        self.store()
        if self._pool is not None and self.clock is not None:
            from twisted.internet.task import LoopingCall

            loop = self._loop = LoopingCall(self.writePool)
            loop.clock = self.clock
            loop.start(POOL_INTERVAL, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pool is not None:
            # Last words: a clean stop (or a restart) leaves the pool as it
            # is now, for the next process.
            self.writePool()
            os.close(self._pool)
            self._pool = None
        return super().stopService()

    def _poolValue(self):
        return {"live": self.live() if self.live is not None else []}

    def writePool(self) -> None:
        if self._pool is None:
            return
        try:
            _rewrite(self._pool, self._poolValue())
        except (OSError, ValueError) as e:
            log.warn("fd store: cannot write {name}: {error}", name=POOL, error=e)

    def store(self) -> List[str]:
        """
        Store the listening sockets: the roles stored.
        """
        from twistedcluster.fast.internals import keepSharedOnClose

        chosen = []
        for role in ROLES:
            port = self.ports.get(role)
            description = self.descriptions.get(role)
            if port is None or description is None or not getattr(port, "connected", False):
                continue
            if systemdNames([description]):
                continue  # a socket unit's: systemd holds it already
            if not storable(description) or port.socket.family not in (socket.AF_INET, socket.AF_INET6):
                log.info(
                    "fd store: the {role} listener ({endpoint}) is not stored: "
                    "only TCP listeners are (it opens afresh after a restart)",
                    role=role,
                    endpoint=description,
                )
                continue
            chosen.append(role)
        room = self.limit - 2  # the two memfds take two
        if len(chosen) > room:
            log.warn(
                "fd store: room for {n} descriptor(s) (FileDescriptorStoreMax=), "
                "{m} wanted: {left} not stored",
                n=self.limit,
                m=len(chosen) + 2,
                left=", ".join(chosen[max(room, 0):]),
            )
            chosen = chosen[: max(room, 0)]
        for role in ROLES:
            if role not in chosen:
                # Stored by a process before this one (a takeover's), not now.
                notifySystemd(f"FDSTOREREMOVE=1\nFDNAME={role}", self.environ)
        for name in (DESCRIPTIONS, POOL):
            notifySystemd(f"FDSTOREREMOVE=1\nFDNAME={name}", self.environ)
        if not chosen:
            return []
        kept = set(self.stored.adopted) if self.stored is not None else set()
        listeners = _memfd(DESCRIPTIONS, {"listeners": {role: self.descriptions[role] for role in chosen}})
        try:
            notifySystemd(f"FDSTORE=1\nFDNAME={DESCRIPTIONS}", self.environ, fds=[listeners])
        finally:
            os.close(listeners)
        self._pool = _memfd(POOL, self._poolValue())
        notifySystemd(f"FDSTORE=1\nFDNAME={POOL}", self.environ, fds=[self._pool])
        for role in chosen:
            port = self.ports[role]
            if role not in kept:
                # Whatever the store held under this name is not this socket.
                notifySystemd(f"FDSTOREREMOVE=1\nFDNAME={role}", self.environ)
                notifySystemd(f"FDSTORE=1\nFDNAME={role}", self.environ, fds=[port.fileno()])
            keepSharedOnClose(port)
        log.info(
            "fd store: {roles} kept by systemd across restarts",
            roles=", ".join(chosen),
        )
        return chosen
