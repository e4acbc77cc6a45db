"""
The load generator: worker processes, each driving non-blocking sockets
with its own epoll loop, told what to do over a pipe.

A worker runs one task at a time.  Every task has a setup (connect), a
``ready`` answer, a ``go`` carrying the start time on the shared monotonic
clock, a warm-up that is not counted, a measured window, and a result.
Every loop is bounded by a deadline and by a count; every socket is closed
when the task ends.

Tasks:

- ``echo``: persistent connections, closed loop: each sends a message
  naming its connection and sequence number, waits for exactly that message
  back (a mismatch counts as corrupt), records the round trip, sends the
  next one.
- ``connect``: new connections, closed loop with a fixed number in flight:
  connect, send a message, read it back, close; the latency is from the
  connect call to the verified echo.
- ``bulk``: a few connections streaming a deterministic pattern with a
  bounded window in flight; every byte echoed is compared with what was
  sent at that offset.
- ``hold``: open connections, prove each with one echo, keep them until
  told to release them.
- ``population``: a population of long-lived clients that grows when told
  (``grow``), each proven with one echo and then sending one small echo
  every ``interval`` seconds at its own phase; ``measure`` reports the
  round trips of a window (or keeps the clients quiet through it);
  ``release`` closes them all.  In redirect mode each client first asks the
  balancer's redirect listener and connects to the backend it names.
"""

from __future__ import annotations

import errno
import gc
import heapq
import multiprocessing
import os
import random
import select
import signal
import socket
import time
from array import array
from typing import Dict, List, Optional, Sequence, Tuple

# Linux: pick the source port at connect() time, by the whole 4-tuple, even
# though the socket was bound to a source address first.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

MAX_SAMPLES = 3_000_000  # latency samples one worker keeps for one task
MAX_OPS = 100_000_000  # exchanges one worker may do in one task
ATTEMPT_TIMEOUT = 10.0  # seconds one new connection may take

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP

PATTERN_SIZE = 1 << 20


def _pattern() -> bytes:
    rnd = random.Random(7)
    block = bytes(rnd.getrandbits(8) for _ in range(4096))
    return block * (PATTERN_SIZE // 4096)


def _message(cid: int, seq: int, size: int) -> bytes:
    head = b"%08x:%08x:" % (cid, seq & 0xFFFFFFFF)
    return head + b"m" * (size - len(head) - 1) + b"\n"


def _newSocket(source: Optional[str]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if source:
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((source, 0))
    return s


def _connectBlocking(addr, source, timeout) -> socket.socket:
    s = _newSocket(source)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    s.setblocking(False)
    return s


class _Conn:
    __slots__ = ("sock", "cid", "seq", "expected", "sentAt", "buf", "phase", "sent", "got", "full")

    def __init__(self, sock, cid=0):
        self.sock = sock
        self.cid = cid
        self.seq = 0
        self.expected = b""
        self.sentAt = 0.0
        self.buf = b""
        self.phase = 0
        self.sent = 0
        self.got = 0
        self.full = False


class _Window:
    """
    The warm-up and measured window of one task, and what was counted in it.
    """

    def __init__(self, t0: float, warmup: float, duration: float) -> None:
        self.start = t0 + warmup
        self.end = self.start + duration
        self.cpuStart: Optional[float] = None
        self.cpuEnd: Optional[float] = None
        self.realEnd: Optional[float] = None

    def tick(self, now: float) -> None:
        if self.cpuStart is None and now >= self.start:
            self.cpuStart = time.process_time()

    def finish(self) -> None:
        now = time.monotonic()
        if self.cpuStart is None:
            self.cpuStart = time.process_time()
        self.cpuEnd = time.process_time()
        self.realEnd = min(now, self.end)

    def figures(self) -> dict:
        measured = max(1e-9, (self.realEnd or self.end) - self.start)
        return {
            "seconds": measured,
            "cpu": (self.cpuEnd or 0.0) - (self.cpuStart or 0.0),
        }


# -- echo ---------------------------------------------------------------------


def echoSetup(p: dict) -> Tuple[list, dict]:
    conns = []
    errors = 0
    sources = p.get("sources") or [None]
    for i in range(p["connections"]):
        try:
            s = _connectBlocking(tuple(p["addr"]), sources[i % len(sources)], 10.0)
        except OSError:
            errors += 1
            continue
        conns.append(_Conn(s, p["cidBase"] + i))
    return conns, {"connected": len(conns), "errors": errors}


def echoRun(conns: List[_Conn], p: dict, t0: float) -> dict:
    size = p["size"]
    win = _Window(t0, p["warmup"], p["duration"])
    ep = select.epoll()
    byFd: Dict[int, _Conn] = {}
    lat = array("d")
    count = errors = corrupt = 0
    monotonic = time.monotonic
    while monotonic() < t0:
        time.sleep(0.001)
    try:
        now = monotonic()
        for c in conns:
            fd = c.sock.fileno()
            byFd[fd] = c
            ep.register(fd, EPOLLIN)
            c.expected = _message(c.cid, 0, size)
            c.sentAt = now
            c.sock.send(c.expected)
        ops = 0
        while byFd and ops < MAX_OPS:
            now = monotonic()
            if now >= win.end:
                break
            win.tick(now)
            for fd, ev in ep.poll(min(0.1, win.end - now)):
                c = byFd.get(fd)
                if c is None:
                    continue
                try:
                    data = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    errors += 1
                    ep.unregister(fd)
                    del byFd[fd]
                    continue
                if c.buf:
                    data = c.buf + data
                if len(data) < size:
                    c.buf = data
                    continue
                c.buf = b""
                now = monotonic()
                if data != c.expected:
                    corrupt += 1
                elif now >= win.start:
                    count += 1
                    if len(lat) < MAX_SAMPLES:
                        lat.append(now - c.sentAt)
                ops += 1
                c.seq += 1
                c.expected = msg = _message(c.cid, c.seq, size)
                c.sentAt = now
                try:
                    if c.sock.send(msg) != size:
                        raise OSError("short send")
                except OSError:
                    errors += 1
                    ep.unregister(fd)
                    del byFd[fd]
        win.finish()
    finally:
        ep.close()
        for c in conns:
            c.sock.close()
    result = win.figures()
    result.update(count=count, errors=errors, corrupt=corrupt, latencies=lat.tobytes())
    return result


# -- new connections ------------------------------------------------------------


def connectRun(p: dict, t0: float) -> dict:
    addr = tuple(p["addr"])
    size = p["size"]
    sources = p.get("sources") or [None]
    inFlight = p["concurrency"]
    win = _Window(t0, p["warmup"], p["duration"])
    ep = select.epoll()
    byFd: Dict[int, _Conn] = {}
    lat = array("d")
    count = errors = corrupt = timeouts = 0
    started = 0
    monotonic = time.monotonic
    cidBase = p["cidBase"]

    def start(now: float) -> None:
        nonlocal started, errors
        source = sources[started % len(sources)]
        started += 1
        try:
            s = _newSocket(source)
        except OSError:
            errors += 1
            return
        s.setblocking(False)
        c = _Conn(s, cidBase + started)
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            errors += 1
            s.close()
            return
        c.sentAt = now
        c.expected = _message(c.cid, 0, size)
        byFd[s.fileno()] = c
        ep.register(s.fileno(), EPOLLOUT)

    def drop(fd: int, c: _Conn) -> None:
        try:
            ep.unregister(fd)
        except OSError:
            pass
        del byFd[fd]
        c.sock.close()

    while monotonic() < t0:
        time.sleep(0.001)
    try:
        now = monotonic()
        lastScan = now
        while len(byFd) < inFlight and started < MAX_OPS:
            start(now)
        while started < MAX_OPS:
            now = monotonic()
            if now >= win.end:
                break
            win.tick(now)
            if now - lastScan > 0.5:
                lastScan = now
                for fd, c in list(byFd.items()):
                    if now - c.sentAt > ATTEMPT_TIMEOUT:
                        timeouts += 1
                        drop(fd, c)
            for fd, ev in ep.poll(min(0.1, win.end - now)):
                c = byFd.get(fd)
                if c is None:
                    continue
                s = c.sock
                if c.phase == 0:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err or ev & EPOLLERR:
                        errors += 1
                        drop(fd, c)
                        continue
                    c.phase = 1
                    try:
                        s.send(c.expected)
                    except OSError:
                        errors += 1
                        drop(fd, c)
                        continue
                    ep.modify(fd, EPOLLIN)
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    errors += 1
                    drop(fd, c)
                    continue
                if c.buf:
                    data = c.buf + data
                if len(data) < size:
                    c.buf = data
                    continue
                drop(fd, c)
                now = monotonic()
                if data != c.expected:
                    corrupt += 1
                elif now >= win.start:
                    count += 1
                    if len(lat) < MAX_SAMPLES:
                        lat.append(now - c.sentAt)
            # Keep the number in flight; errors are retried by new attempts,
            # but only while they stay a minority.
            if errors > 1000 and errors > count:
                break
            now = monotonic()
            while len(byFd) < inFlight and started < MAX_OPS:
                start(now)
        win.finish()
    finally:
        for fd, c in list(byFd.items()):
            drop(fd, c)
        ep.close()
    result = win.figures()
    result.update(
        count=count,
        errors=errors,
        corrupt=corrupt,
        timeouts=timeouts,
        latencies=lat.tobytes(),
    )
    return result


# -- bulk -----------------------------------------------------------------------


def bulkRun(conns: List[_Conn], p: dict, t0: float) -> dict:
    chunk = p["chunk"]
    window = p["window"]
    # Bytes to compare with (a memoryview compares element by element, at a
    # cost that made the load generator the busiest process of the bulk
    # load), a view of them to send from without copying.
    patBytes = _pattern() * 2
    pat = memoryview(patBytes)
    P = PATTERN_SIZE
    win = _Window(t0, p["warmup"], p["duration"])
    ep = select.epoll()
    byFd: Dict[int, _Conn] = {}
    bytesIn = errors = corrupt = 0
    monotonic = time.monotonic
    while monotonic() < t0:
        time.sleep(0.001)
    try:
        for c in conns:
            byFd[c.sock.fileno()] = c
            ep.register(c.sock.fileno(), EPOLLIN | EPOLLOUT)
        ops = 0
        while byFd and ops < MAX_OPS:
            now = monotonic()
            if now >= win.end:
                break
            win.tick(now)
            counting = now >= win.start
            for fd, ev in ep.poll(min(0.1, win.end - now)):
                c = byFd.get(fd)
                if c is None:
                    continue
                ops += 1
                s = c.sock
                if ev & EPOLLIN:
                    try:
                        data = s.recv(262144)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data is not None:
                        if not data:
                            errors += 1
                            ep.unregister(fd)
                            del byFd[fd]
                            continue
                        n = len(data)
                        off = c.got % P
                        if patBytes[off : off + n] != data:
                            corrupt += 1
                        c.got += n
                        if counting:
                            bytesIn += n
                        if c.full and c.sent - c.got < window:
                            c.full = False
                            ep.modify(fd, EPOLLIN | EPOLLOUT)
                if ev & EPOLLOUT and not c.full:
                    off = c.sent % P
                    try:
                        c.sent += s.send(pat[off : off + chunk])
                    except BlockingIOError:
                        pass
                    except OSError:
                        errors += 1
                        ep.unregister(fd)
                        del byFd[fd]
                        continue
                    if c.sent - c.got >= window:
                        c.full = True
                        ep.modify(fd, EPOLLIN)
        win.finish()
    finally:
        ep.close()
        for c in conns:
            c.sock.close()
    result = win.figures()
    result.update(bytes=bytesIn, errors=errors, corrupt=corrupt, count=bytesIn)
    return result


# -- held connections ---------------------------------------------------------


def holdSetup(p: dict) -> Tuple[list, dict]:
    """
    Open C{p["connections"]} connections, a bounded number at a time, each
    proven with one small echo; keep the ones that worked.
    """
    addr = tuple(p["addr"])
    sources = p.get("sources") or [None]
    total = p["connections"]
    inFlight = p.get("concurrency", 32)
    deadline = time.monotonic() + p.get("timeout", 120.0)
    ep = select.epoll()
    byFd: Dict[int, _Conn] = {}
    held: List[socket.socket] = []
    errors = corrupt = started = 0
    size = 16

    def drop(fd, c):
        try:
            ep.unregister(fd)
        except OSError:
            pass
        del byFd[fd]
        c.sock.close()

    try:
        while len(held) + len(byFd) < total or byFd:
            now = time.monotonic()
            if now >= deadline or errors > max(100, total // 10):
                break
            while started < total and len(byFd) < inFlight and len(held) + len(byFd) < total:
                try:
                    s = _newSocket(sources[started % len(sources)])
                except OSError:
                    errors += 1
                    started += 1
                    continue
                s.setblocking(False)
                c = _Conn(s, p["cidBase"] + started)
                started += 1
                err = s.connect_ex(addr)
                if err not in (0, errno.EINPROGRESS):
                    errors += 1
                    s.close()
                    continue
                c.sentAt = now
                c.expected = _message(c.cid, 0, size)
                byFd[s.fileno()] = c
                ep.register(s.fileno(), EPOLLOUT)
            if started >= total and not byFd:
                break
            for fd, ev in ep.poll(0.1):
                c = byFd.get(fd)
                if c is None:
                    continue
                if c.phase == 0:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err or ev & EPOLLERR:
                        errors += 1
                        drop(fd, c)
                        continue
                    c.phase = 1
                    c.sock.send(c.expected)
                    ep.modify(fd, EPOLLIN)
                    continue
                try:
                    data = c.sock.recv(1024)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    errors += 1
                    drop(fd, c)
                    continue
                c.buf += data
                if len(c.buf) < size:
                    continue
                if c.buf != c.expected:
                    corrupt += 1
                    drop(fd, c)
                    continue
                ep.unregister(fd)
                del byFd[fd]
                held.append(c.sock)
            now = time.monotonic()
            for fd, c in list(byFd.items()):
                if now - c.sentAt > ATTEMPT_TIMEOUT:
                    errors += 1
                    drop(fd, c)
    finally:
        for fd, c in list(byFd.items()):
            drop(fd, c)
        ep.close()
    return held, {"held": len(held), "errors": errors, "corrupt": corrupt}


# -- a population of long-lived clients ------------------------------------------

#: Longest a population task lives, whatever it is told.
POPULATION_MAX_SECONDS = 3 * 3600.0


class _Client:
    """
    One client of a population.  C{phase}: 0 asking the redirect listener,
    1 reading its answer, 2 connecting, 3 waiting for the first echo, 4 held.
    """

    __slots__ = ("sock", "cid", "seq", "expected", "sentAt", "started", "buf", "phase", "waiting")

    def __init__(self, sock, cid, phase, now):
        self.sock = sock
        self.cid = cid
        self.seq = 0
        self.expected = b""
        self.sentAt = 0.0
        self.started = now
        self.buf = b""
        self.phase = phase
        self.waiting = False


def populationRun(pipe, p: dict) -> None:
    """
    Serve one population task: answer C{ready}, then the commands
    C{("grow", n, maxFailures)}, C{("measure", seconds, echo)} and
    C{("release",)} from C{pipe} until released, or until
    L{POPULATION_MAX_SECONDS} or the parent's pipe closes.
    """
    from twistedcluster.wire.redirectline import ErrorAnswer, parseLine

    addr = tuple(p["addr"])
    redirect = bool(p.get("redirect"))
    sources = p.get("sources") or [None]
    interval = float(p["interval"])
    size = int(p.get("size", 32))
    inFlight = int(p.get("concurrency", 64))
    cidBase = int(p["cidBase"])
    attemptTimeout = float(p.get("attemptTimeout", ATTEMPT_TIMEOUT))
    rnd = random.Random(cidBase)
    monotonic = time.monotonic
    endOfTask = monotonic() + POPULATION_MAX_SECONDS
    ep = select.epoll()
    pipeFd = pipe.fileno()
    ep.register(pipeFd, EPOLLIN)
    clients: Dict[int, _Client] = {}  # by fd: connecting and held
    pending: Dict[int, _Client] = {}  # by fd: not yet held
    schedule: list = []  # heap of (due, cid, client) for held clients
    held = 0
    started = 0  # clients ever started
    # The current grow order.
    toStart = 0
    maxFailures = 0
    growFailed = 0
    growHeld = 0
    growStart = 0.0
    growing = False
    failures: Dict[str, int] = {}
    # The current measure order.
    windowEnd: Optional[float] = None
    quiet = False
    lat = array("d")
    lags = array("d")  # how late this loop sent each echo of a window
    sent = answered = late = corrupt = 0
    dropped = 0  # held clients the far end closed
    lastScan = monotonic()

    def fail(fd: int, c: _Client, why: str) -> None:
        nonlocal growFailed, dropped, held
        try:
            ep.unregister(fd)
        except (OSError, ValueError):
            pass
        clients.pop(fd, None)
        c.sock.close()
        if pending.pop(fd, None) is not None:
            growFailed += 1
            failures[why] = failures.get(why, 0) + 1
        else:
            held -= 1
            dropped += 1

    def startOne(now: float) -> None:
        nonlocal started, toStart, growFailed
        source = sources[started % len(sources)]
        cid = cidBase + started
        started += 1
        toStart -= 1
        try:
            s = _newSocket(source)
            s.setblocking(False)
        except OSError as e:
            growFailed += 1
            why = f"socket: {errno.errorcode.get(e.errno, e.errno)}"
            failures[why] = failures.get(why, 0) + 1
            return
        c = _Client(s, cid, 0 if redirect else 2, now)
        fd = s.fileno()
        clients[fd] = c
        pending[fd] = c
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            fail(fd, c, f"connect: {errno.errorcode.get(err, err)}")
            return
        ep.register(fd, EPOLLOUT)

    def becomeHeld(fd: int, c: _Client, now: float) -> None:
        nonlocal held, growHeld
        del pending[fd]
        c.phase = 4
        c.waiting = False
        held += 1
        growHeld += 1
        heapq.heappush(schedule, (now + rnd.uniform(0.0, interval), c.cid, c))

    def sendEcho(c: _Client, now: float) -> None:
        c.seq += 1
        c.expected = _message(c.cid, c.seq, size)
        c.sentAt = now
        c.waiting = True
        c.buf = b""
        c.sock.send(c.expected)

    def onEvent(fd: int, ev: int, now: float) -> None:
        nonlocal answered, corrupt, growFailed
        c = clients.get(fd)
        if c is None:
            return
        s = c.sock
        phase = c.phase
        if phase in (0, 2):  # connected, or not
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & EPOLLERR:
                fail(fd, c, ("ask " if phase == 0 else "connect: ")
                     + errno.errorcode.get(err, "hangup"))
                return
            if phase == 0:
                c.phase = 1
            else:
                c.phase = 3
                c.expected = _message(c.cid, 0, size)
                c.sentAt = now
                try:
                    s.send(c.expected)
                except OSError as e:
                    fail(fd, c, f"send: {errno.errorcode.get(e.errno, e.errno)}")
                    return
            ep.modify(fd, EPOLLIN)
            return
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if phase == 1:  # the redirect answer, then the listener closes
            c.buf += data
            if data and not c.buf.endswith(b"\n") and len(c.buf) < 1024:
                return
            try:
                host, port = parseLine(c.buf)
            except ErrorAnswer as e:
                fail(fd, c, f"redirect: {e}")
                return
            except ValueError:
                fail(fd, c, "redirect: no answer" if not c.buf else "redirect: bad answer")
                return
            # Same client, new socket: to the backend named.
            ep.unregister(fd)
            del clients[fd]
            del pending[fd]
            s.close()
            try:
                s = _newSocket(sources[c.cid % len(sources)])
                s.setblocking(False)
            except OSError as e:
                why = f"socket: {errno.errorcode.get(e.errno, e.errno)}"
                failures[why] = failures.get(why, 0) + 1
                growFailed += 1
                return
            c.sock = s
            c.buf = b""
            c.phase = 2
            fd = s.fileno()
            clients[fd] = c
            pending[fd] = c
            err = s.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                fail(fd, c, f"connect: {errno.errorcode.get(err, err)}")
                return
            ep.register(fd, EPOLLOUT)
            return
        if not data:
            fail(fd, c, "closed")
            return
        c.buf += data
        if len(c.buf) < size:
            return
        if c.buf != c.expected:
            corrupt += 1
            fail(fd, c, "corrupt echo")
            return
        c.buf = b""
        if phase == 3:
            becomeHeld(fd, c, now)
            return
        c.waiting = False
        if windowEnd is not None:
            answered += 1  # in a quiet window: only echoes sent before it
            if not quiet and len(lat) < MAX_SAMPLES:
                lat.append(now - c.sentAt)

    def reply(kind: str, info: dict) -> None:
        pipe.send((kind, info))

    pipe.send(("ready", {"pid": os.getpid()}))
    # Its clients make no cycles: no collector pauses in what is measured.
    gc.disable()
    try:
        while monotonic() < endOfTask:
            now = monotonic()
            # Commands.
            timeout = 0.05
            if schedule:
                timeout = max(0.0, min(timeout, schedule[0][0] - now))
            for fd, ev in ep.poll(timeout, 4096):
                if fd == pipeFd:
                    continue
                onEvent(fd, ev, monotonic())
            if pipe.poll(0):
                try:
                    msg = pipe.recv()
                except EOFError:
                    return
                if msg[0] == "release":
                    break
                if msg[0] == "grow":
                    toStart, maxFailures = int(msg[1]), int(msg[2])
                    growFailed = growHeld = 0
                    failures.clear()
                    growStart = monotonic()
                    growing = True
                elif msg[0] == "measure":
                    windowEnd = monotonic() + float(msg[1])
                    quiet = not msg[2]
                    del lat[:]
                    del lags[:]
                    sent = answered = late = 0
            now = monotonic()
            # Growing: keep a bounded number of attempts in flight.
            if growing:
                while toStart > 0 and len(pending) < inFlight and growFailed <= maxFailures:
                    startOne(now)
                if now - lastScan > 0.5:
                    lastScan = now
                    for fd, c in list(pending.items()):
                        if now - c.started > attemptTimeout:
                            fail(fd, c, "timeout")
                if (toStart <= 0 or growFailed > maxFailures) and not pending:
                    growing = False
                    reply("grown", {
                        "held": held, "new": growHeld, "failed": growFailed,
                        "skipped": max(0, toStart), "seconds": monotonic() - growStart,
                        "failures": dict(failures),
                    })
                    toStart = 0
            # Echoes due.
            n = 0
            while schedule and schedule[0][0] <= now and n < 10_000:
                n += 1
                due, cid, c = heapq.heappop(schedule)
                if c.phase != 4 or c.sock.fileno() < 0:
                    continue  # dropped meanwhile
                heapq.heappush(schedule, (due + interval, cid, c))
                if windowEnd is not None and quiet:
                    continue
                if c.waiting:
                    late += 1
                    continue
                try:
                    sendEcho(c, now)
                except OSError:
                    fail(c.sock.fileno(), c, "send")
                    continue
                if windowEnd is not None:
                    sent += 1
                    if len(lags) < MAX_SAMPLES:
                        lags.append(now - due)
            if windowEnd is not None and now >= windowEnd:
                windowEnd = None
                quiet = False
                reply("measured", {
                    "held": held, "sent": sent, "answered": answered, "late": late,
                    "corrupt": corrupt, "dropped": dropped, "latencies": lat.tobytes(),
                    "lags": lags.tobytes(),
                })
                del lat[:]
                del lags[:]
    finally:
        gc.enable()
        ep.close()
        for c in clients.values():
            c.sock.close()
        clients.clear()
    reply("released", {"held": held, "dropped": dropped})


# -- the worker process -----------------------------------------------------------


def _worker(pipe) -> None:
    # Ctrl-C goes to the whole process group: the parent handles it and
    # stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        if not pipe.poll(3600):
            return
        msg = pipe.recv()
        kind = msg[0]
        if kind == "stop":
            return
        p = msg[1]
        try:
            if kind == "population":
                populationRun(pipe, p)
                continue
            if kind == "hold":
                held, info = holdSetup(p)
                pipe.send(("ready", info))
                if pipe.poll(p.get("holdFor", 300.0)):
                    pipe.recv()
                for s in held:
                    s.close()
                pipe.send(("result", info))
                continue
            if kind in ("echo", "bulk"):
                conns, info = echoSetup(p)
            else:
                conns, info = [], {"connected": 0, "errors": 0}
            pipe.send(("ready", info))
            if not pipe.poll(60):
                for c in conns:
                    c.sock.close()
                continue
            go = pipe.recv()
            if go[0] != "go":
                for c in conns:
                    c.sock.close()
                continue
            t0 = go[1]
            if kind == "echo":
                result = echoRun(conns, p, t0)
            elif kind == "bulk":
                result = bulkRun(conns, p, t0)
            elif kind == "connect":
                result = connectRun(p, t0)
            else:
                raise ValueError(f"unknown task {kind!r}")
            result["setupErrors"] = info.get("errors", 0)
            pipe.send(("result", result))
        except Exception as e:  # tell the parent, stay available
            pipe.send(("error", f"{type(e).__name__}: {e}"))


class WorkerGone(RuntimeError):
    pass


class LoadGenerator:
    """
    C{count} worker processes, forked now (before any server is started).
    """

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.workers = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent))

    @property
    def pids(self) -> List[int]:
        return [p.pid for p, _ in self.workers]

    def _drain(self) -> None:
        # Answers left over from a task that failed half-way.
        for proc, pipe in self.workers:
            while pipe.poll(0):
                try:
                    pipe.recv()
                except EOFError:
                    raise WorkerGone(f"load generator worker {proc.pid} exited") from None

    def _recv(self, pipe, proc, timeout: float, what: str):
        if not pipe.poll(timeout):
            raise WorkerGone(f"load generator worker {proc.pid}: no answer in {timeout:.0f} s ({what})")
        try:
            msg = pipe.recv()
        except EOFError:
            raise WorkerGone(f"load generator worker {proc.pid} exited ({what})") from None
        if msg[0] == "error":
            raise WorkerGone(f"load generator worker {proc.pid}: {msg[1]} ({what})")
        return msg

    def run(
        self,
        kind: str,
        params: Sequence[Optional[dict]],
        warmup: float,
        duration: float,
        onWindow=None,
        setupTimeout: float = 60.0,
    ) -> List[dict]:
        """
        Run one task: C{params[i]} for worker i (C{None}: that worker sits
        it out).  C{onWindow(start, end)} is called in this process while the
        workers run, to sample the servers over the same window.
        """
        busy = [(w, p) for w, p in zip(self.workers, params) if p is not None]
        self._drain()
        for (proc, pipe), p in busy:
            p = dict(p, warmup=warmup, duration=duration)
            pipe.send((kind, p))
        infos = [self._recv(pipe, proc, setupTimeout, f"{kind} setup") for (proc, pipe), _ in busy]
        t0 = time.monotonic() + 0.05
        for (proc, pipe), _ in busy:
            pipe.send(("go", t0))
        if onWindow is not None:
            onWindow(t0 + warmup, t0 + warmup + duration)
        results = []
        for ((proc, pipe), _), info in zip(busy, infos):
            msg = self._recv(pipe, proc, warmup + duration + 60, kind)
            r = msg[1]
            r["setup"] = info[1]
            results.append(r)
        return results

    def hold(self, params: Sequence[Optional[dict]], whileHeld, timeout: float = 180.0):
        """
        Open and prove the connections, call C{whileHeld(infos)} while they
        are all open, then release them.
        """
        busy = [(w, p) for w, p in zip(self.workers, params) if p is not None]
        self._drain()
        for (proc, pipe), p in busy:
            pipe.send(("hold", dict(p, timeout=timeout - 10, holdFor=timeout + 60)))
        try:
            infos = [self._recv(pipe, proc, timeout, "hold")[1] for (proc, pipe), _ in busy]
            value = whileHeld(infos)
        finally:
            for (proc, pipe), _ in busy:
                try:
                    pipe.send(("release",))
                except OSError:
                    pass
        for (proc, pipe), _ in busy:
            self._recv(pipe, proc, 60, "release")
        return infos, value

    def population(self, params: Sequence[Optional[dict]]) -> "Population":
        """
        Start a population task (see L{populationRun}) on the workers with
        parameters; control it through the L{Population} returned.
        """
        return Population(self, params)

    def close(self) -> None:
        for proc, pipe in self.workers:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc, pipe in self.workers:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(2)
            pipe.close()


class Population:
    """
    The parent's handle on a population task running on several workers.
    """

    def __init__(self, lg: LoadGenerator, params: Sequence[Optional[dict]]) -> None:
        self.lg = lg
        self.busy = [w for w, p in zip(lg.workers, params) if p is not None]
        lg._drain()
        for (proc, pipe), p in zip(self.busy, [p for p in params if p is not None]):
            pipe.send(("population", p))
        for proc, pipe in self.busy:
            self.lg._recv(pipe, proc, 30, "population start")
        self.released = False

    def _ask(self, message, timeout: float, what: str, messages=None) -> List[dict]:
        for i, (proc, pipe) in enumerate(self.busy):
            pipe.send(messages[i] if messages is not None else message)
        return [self.lg._recv(pipe, proc, timeout, what)[1] for proc, pipe in self.busy]

    def grow(self, counts: Sequence[int], maxFailures: int, timeout: float) -> List[dict]:
        """
        Worker i starts C{counts[i]} new clients (each stops early after
        C{maxFailures} failed ones); the answers once all are held or failed.
        """
        return self._ask(None, timeout, "grow",
                         [("grow", n, maxFailures) for n in counts])

    def measure(self, seconds: float, echo: bool = True, during=None) -> List[dict]:
        """
        A window of C{seconds}: the round trips of its echoes (or, with
        C{echo} false, no echo sent in it).  C{during()} runs here meanwhile.
        """
        for proc, pipe in self.busy:
            pipe.send(("measure", seconds, echo))
        if during is not None:
            during()
        return [self.lg._recv(pipe, proc, seconds + 60, "measure")[1] for proc, pipe in self.busy]

    def release(self) -> List[dict]:
        if self.released:
            return []
        self.released = True
        return self._ask(("release",), 120, "release")
