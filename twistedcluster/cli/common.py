"""
What the command-line programs (``cluster-admin``, ``cluster-connect``)
share: how a command fails (L{CommandFailed}), the exit statuses that mean
the same in every program, and how a program's main runs under the reactor
and exits (L{react}).

Each program documents its own exit statuses and defines those whose meaning
is its own (1 is "refused" in ``cluster-admin``, "no backend" in
``cluster-connect``).
"""

from __future__ import annotations

import sys
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer, error, task

__all__ = ["CommandFailed", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "react"]

#: Done.
EXIT_OK = 0
#: Bad usage: arguments, options or files named in them.
EXIT_USAGE = 2
#: The server could not be reached, or did not answer in time.
EXIT_UNREACHABLE = 3


class CommandFailed(Exception):
    """
    Exit with C{code} after printing C{message} as an error, and C{output}
    (what was done, if anything) as usual.
    """

    def __init__(self, message: str, code: int, output: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.output = output


def react(
    prog: str,
    work: Callable[[Any], Awaitable[Optional[int]]],
    interrupted: Optional[int] = None,
) -> None:
    """
    Run C{work(reactor)} under the reactor, then exit with the status it
    returns (C{None} is 0).  When it raises L{CommandFailed}: print its
    output, if any, to standard output and ``PROG: MESSAGE`` to standard
    error, and exit with its code.

    @param interrupted: when given, a reactor shutdown (Ctrl-C, SIGTERM)
        before C{work} is done cancels it, prints ``PROG: interrupted`` and
        exits with this status.  Without it, C{work} is left to the shutdown.
    """

    async def main(reactor) -> None:
        running = defer.ensureDeferred(work(reactor))
        stopped = []

        def onShutdown() -> None:
            # Without this the reactor would stop under the work (a broken
            # relay, a question answered with status 0).
            if not running.called:
                stopped.append(True)
                running.cancel()

        if interrupted is not None:
            reactor.addSystemEventTrigger("before", "shutdown", onShutdown)
        try:
            code = await running
        except CommandFailed as e:
            if e.output is not None:
                print(e.output)
            print(f"{prog}: {e}", file=sys.stderr)
            raise SystemExit(e.code)
        except (defer.CancelledError, error.ConnectingCancelledError):
            if not stopped:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(interrupted)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
