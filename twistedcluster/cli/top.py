"""
``cluster-admin top``: the status page's live view in a terminal.

Every C{--interval} seconds it asks the balancer for every backend over the
admin channel it already holds (C{ListBackends}, as ``status`` does) and
redraws one table: state, weight, connections, load as a bar, routed per
second (from the change since the last view), routed, active, failures.
On a terminal the screen is cleared for each view and ``q`` quits; when
standard output is not a terminal, or with C{--iterations N} / C{--once},
the views are printed one after another (for scripts and tests).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

try:  # imported now: at interpreter shutdown (Ctrl-C) an import fails
    import termios
except ImportError:  # not a POSIX system: no interactive keys
    termios = None  # type: ignore[assignment]

from twisted.internet import defer, task

from twistedcluster.address import formatHostPort

__all__ = ["formatTop", "loadBar", "top"]

CLEAR = "\x1b[H\x1b[2J"
BAR = 10


def loadBar(load: float, width: int = BAR) -> str:
    """
    C{load} (1.0 = full) as a bar of C{width} cells and a percentage.
    """
    filled = max(0, min(width, int(round(load * width))))
    return "#" * filled + "." * (width - filled) + f" {load * 100:5.1f}%"


def formatTop(
    policy: str,
    backends: Sequence[Dict],
    rates: Dict[str, Optional[float]],
    when: float,
    interactive: bool = False,
) -> str:
    """
    One view: a header line, then a row per backend.

    @param rates: routed per second for each backend, C{None} before a
        second view.
    """
    up = sum(1 for b in backends if b["state"] == "up")
    known = [r for r in rates.values() if r is not None]
    total = f"{sum(known):.1f}/s" if known else "-"
    header = (
        f"cluster-admin top  {time.strftime('%H:%M:%S', time.localtime(when))}  "
        f"policy: {policy}  backends: {len(backends)} ({up} up)  "
        f"active: {sum(b['active'] for b in backends)}  routed: {total}"
        + ("  (q quits)" if interactive else "")
    )
    headers = ["NAME", "ADDRESS", "STATE", "WEIGHT", "CONNS", "LOAD", "ROUTED/S", "ROUTED", "ACTIVE", "FAILS"]
    rows = []
    for b in backends:
        rate = rates.get(b["name"])
        rows.append(
            [
                b["name"],
                formatHostPort(b["host"], b["port"]),
                b["state"] + (" (static)" if b.get("static") else ""),
                str(b["weight"]),
                str(b["connections"]),
                loadBar(b["load"]),
                "-" if rate is None else f"{rate:.1f}",
                str(b["routed"]),
                str(b["active"]),
                str(b["failures"]),
            ]
        )
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    right = {3, 4, 6, 7, 8, 9}
    lines = [header, ""]
    for r in [headers] + rows:
        lines.append(
            "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        )
    if not backends:
        lines.append("(no backend has registered)")
    return "\n".join(lines)


class _Keys:
    """
    Standard input in cbreak mode while top runs on a terminal: ``q`` quits.
    """

    def __init__(self, reactor, quit: defer.Deferred) -> None:
        self.reactor = reactor
        self.quit = quit
        self.fd = sys.stdin.fileno()
        self.saved: Optional[list] = None

    def fileno(self) -> int:
        return self.fd

    def start(self) -> None:
        import termios
        import tty

        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        self.reactor.addReader(self)
        # Ctrl-C stops the reactor under top: the terminal is restored then.
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    def doRead(self) -> None:
        data = os.read(self.fd, 64)
        if not data or b"q" in data.lower():
            if not self.quit.called:
                self.quit.callback(None)

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "cluster-admin top keys"

    def stop(self) -> None:
        if self.saved is not None:
            self.reactor.removeReader(self)
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None


async def top(reactor, listAll, args, out=None) -> str:
    """
    Show views until C{args.iterations} are shown (0: until ``q``);
    returns the empty string (everything is printed as it comes).

    @param listAll: a no-argument coroutine function returning the policy
        and every backend.
    """
    out = out if out is not None else sys.stdout
    interactive = bool(out.isatty()) and args.iterations == 0 and sys.stdin.isatty()
    quit: defer.Deferred = defer.Deferred()
    keys = None
    if interactive:
        keys = _Keys(reactor, quit)
        keys.start()
    previous: Dict[str, int] = {}
    previousAt: Optional[float] = None
    shown = 0
    try:
        while True:
            asking = defer.ensureDeferred(listAll())
            asking.addTimeout(args.timeout, reactor)
            policy, backends = await asking
            now = reactor.seconds()
            rates: Dict[str, Optional[float]] = {}
            for b in backends:
                before = previous.get(b["name"])
                if previousAt is None or before is None or now <= previousAt:
                    rates[b["name"]] = None
                else:
                    rates[b["name"]] = max(0, b["routed"] - before) / (now - previousAt)
            previous = {b["name"]: b["routed"] for b in backends}
            previousAt = now
            if getattr(args, "json", False):
                # One JSON object a line, a view each, for scripts.
                view = json.dumps({"policy": policy, "rates": rates, "backends": backends})
            else:
                view = formatTop(policy, backends, rates, time.time(), interactive)
            if interactive:
                out.write(CLEAR + view + "\n")
            else:
                blank = "\n" if shown and not getattr(args, "json", False) else ""
                out.write(blank + view + "\n")
            out.flush()
            shown += 1
            if args.iterations and shown >= args.iterations:
                return ""
            pause = task.deferLater(reactor, args.interval, lambda: None)
            pause.addErrback(lambda f: f.trap(defer.CancelledError))
            await defer.DeferredList([pause, quit], fireOnOneCallback=True)
            if quit.called:
                pause.cancel()
                return ""
    finally:
        if keys is not None:
            keys.stop()
        if not quit.called:
            quit.callback(None)
