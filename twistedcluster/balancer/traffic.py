"""
What became of the client connections: counted for C{/metrics}, and
written to the access log when there is one.

The proxy and redirect factories call L{Traffic} once per connection, when
it ends, with what the connection kept anyway (its start, its connect, its
byte counts, how it ended).  Counters and histograms cost a few additions;
the access log record is built only when there is an access log.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Dict, List, Optional, Sequence, Tuple

from twistedcluster.balancer.accesslog import (
    MAX_CONNECTIONS,
    AccessLog,
    Record,
)
from twistedcluster.address import formatHostPort
from twistedcluster.fast.transports import peerText

__all__ = ["CONNECT_BUCKETS", "DURATION_BUCKETS", "Histogram", "Traffic"]

#: Seconds: a backend on the same host accepts in well under a
#: millisecond; the connect timeout is seconds.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Seconds: from a refused client's instant to an hour-long session.
DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


def _address(addr) -> str:
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return formatHostPort(host, port)  # [::1]:5000 for IPv6
    name = getattr(addr, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name or ("unix" if name is not None else "?")


def _client(transport) -> str:
    try:
        return _address(transport.getPeer())
    except Exception:
        return peerText(transport)


class Histogram:
    """
    Counts of observations at or below each bound, their sum and number
    (Prometheus' histogram, cumulated when read: L{cumulative}).
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> List[Tuple[str, int]]:
        """
        C{(upper bound, observations at or below it)}, ending with C{+Inf}.
        """
        out, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class Traffic:
    """
    The client connections that ended, counted by listener and by how they
    ended; bytes each way per backend; connect times and durations.

    @ivar accessLog: the L{AccessLog}, or C{None}.
    @ivar ended: C{(listener, end)}: connections.
    @ivar bytes: backend name: C{[bytes to it, bytes from it]}.
    @ivar pool: the pool, once known: the byte counts of names it no longer
        has are dropped as new names come, scraped or not.
    """

    pool = None

    def __init__(self, accessLog: Optional[AccessLog] = None) -> None:
        self.accessLog = accessLog
        self.ended: Dict[Tuple[str, str], int] = {}
        self.bytes: Dict[str, List[int]] = {}
        self.connectTime = Histogram(CONNECT_BUCKETS)
        self.duration: Dict[str, Histogram] = {
            "proxy": Histogram(DURATION_BUCKETS),
            "redirect": Histogram(DURATION_BUCKETS),
        }

    def _count(self, listener: str, end: str) -> None:
        key = (listener, end)
        ended = self.ended
        ended[key] = ended.get(key, 0) + 1

    def proxyEnded(self, client, now: float) -> None:
        """
        A proxy client connection (L{twistedcluster.balancer.proxy.ProxyServer})
        has ended: count it, log it.
        """
        end = client._end
        self._count("proxy", end)
        start = client._start
        self.duration["proxy"].observe(now - start)
        connectAt = client._connectAt
        backend = client._backend
        bytesIn = client.received
        bytesOut = 0
        name = None
        if backend is not None:
            name = client._tried[-1]
            bytesOut = backend.received
            counts = self.bytes.get(name)
            if counts is None:
                pool = self.pool
                if pool is not None and len(self.bytes) >= 2 * len(pool) + 16:
                    self.forget(pool)
                counts = self.bytes[name] = [0, 0]
            counts[0] += bytesIn
            counts[1] += bytesOut
        if connectAt is not None:
            self.connectTime.observe(connectAt - start)
        accessLog = self.accessLog
        if accessLog is not None:
            tried = client._tried
            accessLog.add(
                Record(
                    time=start,
                    listener="proxy",
                    client=_client(client.transport),
                    backend=name or (tried[-1] if tried else None),
                    attempts=len(tried),
                    connect=None if connectAt is None else connectAt - start,
                    duration=now - start,
                    bytesIn=bytesIn,
                    bytesOut=bytesOut,
                    end=end,
                )
            )

    def redirectEnded(self, client, now: float) -> None:
        """
        A redirect client (L{twistedcluster.balancer.redirect.RedirectProtocol})
        has been answered and closed.
        """
        end = client._end
        self._count("redirect", end)
        start = client._start
        self.duration["redirect"].observe(now - start)
        accessLog = self.accessLog
        if accessLog is not None:
            accessLog.add(
                Record(
                    time=start,
                    listener="redirect",
                    client=_client(client.transport),
                    backend=client._backend,
                    attempts=1 if client._backend is not None else 0,
                    connect=None,
                    duration=now - start,
                    bytesIn=client.received,
                    bytesOut=client.sent,
                    end=end,
                )
            )

    def refusedAtLimit(self, listener: str, addr, now: float) -> None:
        """
        A client accepted past C{--max-connections}, closed at once.
        """
        self._count(listener, MAX_CONNECTIONS)
        accessLog = self.accessLog
        if accessLog is not None:
            accessLog.add(
                Record(
                    time=now,
                    listener=listener,
                    client=_address(addr),
                    backend=None,
                    attempts=0,
                    connect=None,
                    duration=0.0,
                    bytesIn=0,
                    bytesOut=0,
                    end=MAX_CONNECTIONS,
                )
            )

    def forget(self, keep) -> None:
        """
        Drop the byte counts of backends not in C{keep} (forgotten ones), so
        that names that come and go do not pile up.
        """
        for name in [n for n in self.bytes if n not in keep]:
            del self.bytes[name]
