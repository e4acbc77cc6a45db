"""
Log lines that a flood cannot multiply: counts told at most once per
interval.

Under a burst (out of file descriptors, no backend, a hostile client making
backends fail) the same line would be logged for each client: thousands a
second, which cost the reactor more than the clients do and bury everything
else.  L{Summary} tells the first event at once (an operator sees trouble
start without waiting) and sums the rest into one line per interval.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

#: What a summary's emit is given: the counts summed, and the seconds since
#: the line before (0.0 for the first, told at once).
Emit = Callable[[Dict[str, int], float], None]


class Summary:
    """
    Counts told to C{emit} at most once per C{interval} seconds of C{clock}:
    the first at once, what comes later summed and told when the interval is
    over (so the last of a burst is told too, not kept until the next).

    @ivar last: the newest example counted (C{count(..., example=...)}):
        what C{emit} says of one event among those summed; C{None} until
        one is given.
    """

    def __init__(self, clock, emit: Emit, interval: float = 1.0) -> None:
        self.clock = clock
        self.interval = interval
        self.emit = emit
        self.counts: Dict[str, int] = {}
        self._last: Optional[float] = None
        self._call = None
        self.last: object = None

    def add(self, **counts: int) -> None:
        """
        Count C{counts} (name=how many), and tell them now or later.
        """
        for key, n in counts.items():
            self.count(key, n)

    def count(self, key: str, n: int = 1, example: object = None) -> None:
        """
        Count C{n} of C{key} (any string: a reason, a backend's name);
        C{example}, when given, becomes L{last}.
        """
        if example is not None:
            self.last = example
        self.counts[key] = self.counts.get(key, 0) + n
        if self._call is not None:
            return
        now = self.clock.seconds()
        if self._last is None or now - self._last >= self.interval:
            self._flush()
        else:
            self._call = self.clock.callLater(self._last + self.interval - now, self._flush)

    def _flush(self) -> None:
        self._call = None
        now = self.clock.seconds()
        since = 0.0 if self._last is None else now - self._last
        self._last = now
        counts, self.counts = self.counts, {}
        self.emit(counts, since)

    def flush(self) -> None:
        """
        Tell what is pending now, rather than when the interval is over.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if self.counts:
            self._flush()

    def stop(self) -> None:
        """
        The service stops: what is pending is told now, in a last line, and
        no timer is left.  (What is counted later, while connections still
        drain, is told as before: the first at once, the rest after the
        interval; call this again when they are done.)
        """
        self.flush()


def window(seconds: float) -> str:
    """
    The time a summary's line covers, for humans.
    """
    return f"in the last {seconds:.1f} s" if seconds else "just now"


def tellClosings(logger, listener: str, summary: Summary, counts: Dict[str, int], seconds: float) -> None:
    """
    The summed line of a bounded listener (the control, admin and metrics
    ones): the connections it closed, C{"refused"} at the door or
    C{"evicted"} to make room, naming the newest (C{summary.last}: the
    peer, and why).
    """
    peer, why = summary.last
    logger.warn(
        "{listener} listener: closing {peer}: {why} ({refused} refused, "
        "{evicted} closed to make room {window})",
        listener=listener,
        peer=peer,
        why=why,
        refused=counts.get("refused", 0),
        evicted=counts.get("evicted", 0),
        window=window(seconds),
    )
