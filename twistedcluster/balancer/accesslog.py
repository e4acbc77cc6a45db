"""
The access log (``--access-log PATH``, ``-`` for standard output): one
record per client connection, written when it ends.

A record is built from what the connection keeps anyway (its start, its
connect, its byte counts, how it ended: L{Record}), formatted on the
reactor thread (text or JSON lines, L{formatText}, L{formatJSON}), and
appended to a buffer.  The buffer goes to a writer thread every
L{FLUSH_INTERVAL} seconds, or at once when it holds L{FLUSH_BYTES}: the
reactor never waits for a disk or a pipe.  The thread's queue is bounded
(L{QUEUE_CHUNKS} chunks); when the output cannot keep up, whole chunks are
dropped, counted, and the count is logged once a second rather than letting
memory grow or the reactor block.
"""

from __future__ import annotations

from json.encoder import encode_basestring as _quote
import os
import queue
import threading
import time
from typing import Callable, List, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from twistedcluster.summary import Summary, window

__all__ = [
    "AccessLog",
    "ENDS",
    "FORMATS",
    "Record",
    "formatJSON",
    "formatText",
]

log = Logger()

#: How a client connection ended (the record's C{end}).
CLIENT_CLOSED = "client_closed"
BACKEND_CLOSED = "backend_closed"
CLIENT_RESET = "client_reset"
BACKEND_RESET = "backend_reset"
IDLE_TIMEOUT = "idle_timeout"
CONNECT_FAILED = "connect_failed"
QUEUE_TIMEOUT = "queue_timeout"
QUEUE_FULL = "refused_queue_full"
NO_BACKEND = "refused_no_backend"
MAX_CONNECTIONS = "refused_max_connections"
DRAINED = "drained"
#: Its PROXY header (C{--listen haproxy:...}) was missing, bad or late.
BAD_HEADER = "refused_bad_header"
#: A TLS client (C{--listen ssl:...}) that did not finish its handshake in
#: time.
HANDSHAKE_TIMEOUT = "handshake_timeout"
#: A redirect client got its answer (a backend named).
ANSWERED = "answered"
ENDS = (
    CLIENT_CLOSED,
    BACKEND_CLOSED,
    CLIENT_RESET,
    BACKEND_RESET,
    IDLE_TIMEOUT,
    CONNECT_FAILED,
    QUEUE_TIMEOUT,
    QUEUE_FULL,
    NO_BACKEND,
    MAX_CONNECTIONS,
    DRAINED,
    BAD_HEADER,
    ANSWERED,
    HANDSHAKE_TIMEOUT,
)

FORMATS = ("text", "json")

#: Seconds between hand-overs of the buffer to the writer thread.
FLUSH_INTERVAL = 0.2
#: Bytes buffered that are handed over at once.
FLUSH_BYTES = 64 * 1024
#: Chunks the writer thread may have waiting; more are dropped (counted).
QUEUE_CHUNKS = 256


@attrs.frozen
class Record:
    """
    One client connection, ended.

    @ivar time: when it started (POSIX seconds).
    @ivar listener: C{proxy} or C{redirect}.
    @ivar client: the client's address, C{host:port}.
    @ivar backend: the backend it was sent to last, or C{None}.
    @ivar attempts: backends tried.
    @ivar connect: seconds from the start until the backend accepted, or
        C{None} when none did.
    @ivar duration: seconds from the start to the end.
    @ivar bytesIn: bytes the client sent.
    @ivar bytesOut: bytes the client was sent.
    @ivar end: how it ended, one of L{ENDS}.
    """

    time: float
    listener: str
    client: str
    backend: Optional[str]
    attempts: int
    connect: Optional[float]
    duration: float
    bytesIn: int
    bytesOut: int
    end: str


class _Stamp:
    """
    ISO 8601 UTC time with milliseconds; the part up to the second is
    formatted once per second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def formatText(record: Record, stamp: Callable[[float], str] = _Stamp()) -> str:
    """
    One line, C{key=value} after the time (values never hold spaces)::

        2026-12-01T16:40:00.123Z proxy client=127.0.0.1:53422 backend=web1
        attempts=1 connect_ms=0.412 duration_ms=12.301 bytes_in=64
        bytes_out=64 end=client_closed
    """
    return (
        f"{stamp(record.time)} {record.listener} client={record.client} "
        f"backend={record.backend or '-'} attempts={record.attempts} "
        f"connect_ms={_ms(record.connect)} duration_ms={_ms(record.duration)} "
        f"bytes_in={record.bytesIn} bytes_out={record.bytesOut} end={record.end}\n"
    )


def formatJSON(record: Record, stamp: Callable[[float], str] = _Stamp()) -> str:
    """
    One JSON object on one line, the text format's fields under the same
    names (C{null} for none).  Written out by hand: C{json.dumps} of a dict
    cost 4 times as much per record, which showed in the CPU per new
    connection; strings that may hold anything are escaped by C{json}'s own
    (C) string encoder.
    """
    connect = record.connect
    backend = record.backend
    return (
        f'{{"time":"{stamp(record.time)}","listener":"{record.listener}",'
        f'"client":{_quote(record.client)},'
        f'"backend":{"null" if backend is None else _quote(backend)},'
        f'"attempts":{record.attempts:d},'
        f'"connect_ms":{"null" if connect is None else format(connect * 1000, ".3f")},'
        f'"duration_ms":{record.duration * 1000:.3f},'
        f'"bytes_in":{record.bytesIn:d},"bytes_out":{record.bytesOut:d},'
        f'"end":"{record.end}"}}\n'
    )


def openOutput(path: str):
    """
    The file records are appended to (created mode 0640), or standard
    output for C{-}: a binary stream.
    """
    if path == "-":
        return os.fdopen(os.dup(1), "ab", buffering=0)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return os.fdopen(fd, "ab", buffering=0)


def accessLogFor(options, clock) -> Optional["AccessLog"]:
    """
    The access log the balancer's options ask for (C{--access-log},
    C{--access-log-format}; the output the options opened), not started;
    C{None} when it is off.  For the main process and each worker alike.
    """
    output = options.get("access-log-output")
    if output is None:
        return None
    path = options["access-log"]
    return AccessLog(
        clock, output, options["access-log-format"], path=None if path == "-" else path
    )


class AccessLog:
    """
    Takes records on the reactor thread, writes them on its own thread.

    @param clock: for the flush timer and the dropped-records log line.
    @param output: a binary stream to write to (L{open} makes one from a
        path); written to only by the writer thread.
    @param fmt: C{text} or C{json}.
    @param path: the file C{output} was opened from, for L{reopen} (SIGHUP,
        after a rotation moved it away); C{None} for standard output.
    @ivar written: records handed to the writer thread.
    @ivar dropped: records dropped because the output could not keep up.
    """

    def __init__(self, clock, output, fmt: str = "text", path: Optional[str] = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}")
        self.clock = clock
        self.output = output
        self.path = path
        #: An output opened by L{reopen}, for the writer thread to take.
        self._reopened = None
        self._reopenLock = threading.Lock()
        self.format = formatJSON if fmt == "json" else formatText
        self.written = 0
        self.dropped = 0
        self._lines: List[str] = []
        self._size = 0
        self._flushCall = None
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue(QUEUE_CHUNKS)
        self._thread: Optional[threading.Thread] = None
        self._closed: Optional[defer.Deferred] = None
        self._drops = Summary(clock, self._reportDropped)
        self._failed: Optional[str] = None
        #: Records the writer thread could not write (its output failed),
        #: for the reactor side to count and log at its next hand-over.
        self._lost = 0

    @classmethod
    def open(cls, clock, path: str, fmt: str = "text") -> "AccessLog":
        """
        An access log appending to C{path} (C{-}: standard output); raises
        L{OSError} when it cannot be opened.
        """
        return cls(clock, openOutput(path), fmt, None if path == "-" else path)

    def reopen(self) -> None:
        """
        Open L{path} again (SIGHUP: a rotation tool moved the file away) and
        write what comes next there; the old output is closed by the writer
        thread once what was handed to it is written.  L{OSError} when it
        cannot be opened: the old output stays.
        """
        if self.path is None or self._closed is not None:
            return
        new = openOutput(self.path)
        with self._reopenLock:
            old, self._reopened = self._reopened, new
        if old is not None:  # two SIGHUPs before the next write
            old.close()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._write, name="access-log", daemon=True
            )
            self._thread.start()

    def add(self, record: Record) -> None:
        """
        Log C{record}: formatted now, written soon.
        """
        line = self.format(record)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._flushCall is None:
            self._flushCall = self.clock.callLater(FLUSH_INTERVAL, self._timedFlush)

    def _timedFlush(self) -> None:
        self._flushCall = None
        self.flush()

    def flush(self) -> None:
        """
        Hand what is buffered to the writer thread (dropped, and counted,
        when it has too much waiting already).
        """
        if self._closed is None:
            self._handOver()

    def _handOver(self) -> None:
        lost = self._lost
        if lost:
            # Read and reset from here; the writer thread only adds to it
            # (an addition racing this is counted at the next hand-over).
            self._lost -= lost
            self.written -= lost
            self.dropped += lost
            self._drops.add(records=lost)
        lines, self._lines = self._lines, []
        self._size = 0
        if not lines:
            return
        if self._thread is None:
            self.dropped += len(lines)
            return
        try:
            self._queue.put_nowait("".join(lines).encode("utf-8", "replace"))
        except queue.Full:
            self.dropped += len(lines)
            self._drops.add(records=len(lines))
        else:
            self.written += len(lines)

    def _write(self) -> None:
        # The writer thread: touches nothing but the queue and the output.
        q, out = self._queue, self.output
        while True:
            chunk = q.get()
            if self._reopened is not None:
                with self._reopenLock:
                    new, self._reopened = self._reopened, None
                try:
                    out.close()
                except OSError:
                    pass
                out = self.output = new
            if chunk is None:
                break
            try:
                _writeAll(out, chunk)
            except OSError as e:
                self._failed = str(e)
                self._lost += chunk.count(b"\n")
        try:
            out.close()
        except OSError:
            pass

    def _reportDropped(self, counts, seconds: float) -> None:
        log.warn(
            "access log: {records} record(s) dropped {window}: the output "
            "does not keep up{why}",
            records=counts.get("records", 0),
            window=window(seconds),
            why=f" ({self._failed})" if self._failed else "",
        )

    def close(self, timeout: float = 5.0) -> defer.Deferred:
        """
        Write what is buffered, stop the writer thread, close the output;
        fires when done (or after C{timeout} seconds of a blocked output).
        Records added until the next turn of the reactor (connections that
        were just aborted end then) are still written.
        """
        if self._closed is not None:
            return self._closed
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        self._drops.stop()
        done = self._closed = defer.Deferred()
        thread = self._thread
        if thread is None:
            for output in (self.output, self._reopened):
                try:
                    if output is not None:
                        output.close()
                except OSError:
                    pass
            self._reopened = None
            done.callback(None)
            return done
        # Polled on the clock: no thread pool, no blocking join or put.
        deadline = self.clock.seconds() + timeout
        sent: List[bool] = []

        def poll() -> None:
            if not sent:
                self._handOver()
                try:
                    self._queue.put_nowait(None)
                    sent.append(True)
                    self._thread = None
                except queue.Full:
                    pass
            if not thread.is_alive() or self.clock.seconds() >= deadline:
                if not done.called:
                    done.callback(None)
                return
            self.clock.callLater(0.01, poll)

        self.clock.callLater(0, poll)
        return done


def _writeAll(out, chunk: bytes) -> None:
    """
    Write all of C{chunk} to a raw (unbuffered) stream, which may take only
    part of it a call (a pipe, a signal during the write) or, non-blocking,
    none (C{None}): the rest is written again, not lost.
    """
    view = memoryview(chunk)
    while view:
        n = out.write(view)
        if n is None:  # a non-blocking descriptor, full: wait for it
            import select

            select.select([], [out], [], 1.0)
            continue
        view = view[n:]
