"""
The part of systemd a balancer under a unit with FileDescriptorStoreMax=
talks to, played faithfully: the notify socket (a unix datagram socket
whose messages carry descriptors as SCM_RIGHTS) with its file-descriptor
store (FDSTORE=1 / FDNAME= / FDSTOREREMOVE=1, a descriptor already stored
not stored twice, BARRIER=1), and the start of a service with the stored
descriptors as socket activation passes them: from descriptor 3 on, with
LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (set by a small exec wrapper, so
that it is the service's own pid).
"""

import os
import socket
import sys
import threading
from typing import Dict, List, Optional, Tuple

#: Run as: python -c EXEC_WRAPPER N FD... NAMES ARGV...: moves the N
#: descriptors to 3, 4, ..., says so in LISTEN_* and execs ARGV.
EXEC_WRAPPER = (
    "import fcntl, os, sys\n"
    "n = int(sys.argv[1]); fds = [int(a) for a in sys.argv[2:2 + n]]\n"
    "names = sys.argv[2 + n]; argv = sys.argv[3 + n:]\n"
    "high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]\n"
    "for fd in fds: os.close(fd)\n"
    "for i, fd in enumerate(high):\n"
    "    os.dup2(fd, 3 + i, inheritable=True); os.close(fd)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(n), LISTEN_FDNAMES=names)\n"
    "os.execv(argv[0], argv)\n"
)


def _identity(fd: int) -> Tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class FakeSystemd:
    """
    A notify socket at C{path} with a file-descriptor store of C{room}
    descriptors, served by a thread.
    """

    def __init__(self, path: str, room: int = 16) -> None:
        self.path = path
        self.room = room
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        #: (name, fd) in the order stored, as systemd keeps them.
        self.store: List[Tuple[str, int]] = []
        #: Every message, as (fields, number of descriptors).
        self.messages: List[Tuple[Dict[str, str], int]] = []
        self.refused = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def environ(self) -> Dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": str(self.room)}

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 64)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(
                line.split("=", 1) for line in data.decode().split("\n") if "=" in line
            )
            with self.lock:
                self.messages.append((fields, len(fds)))
                self._handle(fields, fds)

    def _handle(self, fields: Dict[str, str], fds: List[int]) -> None:
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            for n, fd in [e for e in self.store if e[0] == name]:
                os.close(fd)
                self.store.remove((n, fd))
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if any(_identity(fd) == _identity(kept) for _, kept in self.store):
                    os.close(fd)  # systemd keeps one copy of a file
                elif len(self.store) >= self.room:
                    self.refused += 1
                    os.close(fd)
                else:
                    self.store.append((name, fd))
            return
        # Anything else that comes with descriptors (BARRIER=1's pipe) is
        # closed once the message is handled.
        for fd in fds:
            os.close(fd)

    def names(self) -> List[str]:
        with self.lock:
            return [n for n, _ in self.store]

    def stored(self, name: str) -> Optional[int]:
        with self.lock:
            for n, fd in self.store:
                if n == name:
                    return fd
        return None

    def said(self, key: str) -> List[Dict[str, str]]:
        with self.lock:
            return [f for f, _ in self.messages if key in f]

    def activationCommand(self, argv: List[str]) -> Tuple[List[str], Tuple[int, ...]]:
        """
        The command that starts C{argv} with the store's descriptors passed
        as systemd passes them, and the descriptors to leave open for it
        (C{pass_fds}).
        """
        with self.lock:
            store = list(self.store)
        fds = [fd for _, fd in store]
        names = ":".join(n for n, _ in store)
        return (
            [sys.executable, "-c", EXEC_WRAPPER, str(len(fds)), *map(str, fds), names, *argv],
            tuple(fds),
        )

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()
        with self.lock:
            for _, fd in self.store:
                os.close(fd)
            self.store.clear()
        try:
            os.unlink(self.path)
        except OSError:
            pass
