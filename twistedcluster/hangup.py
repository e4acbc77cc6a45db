"""
What SIGHUP does to a balancer or a backend: reopen the log file, never stop;
and what a second SIGTERM or SIGINT does while one drains: nothing but a log
line (L{quietSecondStop}).

By default SIGHUP ends a process, and Twisted leaves it so: a ``kill -HUP``
meant, as for most daemons, "reopen your logs" (logrotate's ``postrotate``)
or "reload", would cut every relayed connection at once.  L{HangUpService}
catches it.  When twistd logs to a file (``--logfile PATH``), that file is
reopened, so a rotation tool that moved it away gets a fresh one at PATH;
logging to standard output or syslog, there is nothing to reopen and the
signal is only logged.  SIGTERM is left to the reactor: it drains.  Once
it does, another one (systemd signals every process of a unit; an operator
presses Ctrl-C again) would have the reactor stop a second time, which
fails with a traceback: it is logged instead, and the drain goes on.

twistd keeps its log file (a L{twisted.python.logfile.BaseLogFile}) to
itself; it is found at each SIGHUP among the live objects of that type
(L{logFiles}), which asks nothing of twistd's private names and costs
nothing until the signal comes.
"""

from __future__ import annotations

import signal
from typing import Callable, List, Optional

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


def logFiles() -> List[object]:
    """
    The open log files of this process that can be reopened: twistd's
    C{--logfile}, when it has one.
    """
    import gc

    from twisted.python.logfile import BaseLogFile

    return [
        o for o in gc.get_objects()
        if isinstance(o, BaseLogFile) and not getattr(o, "closed", False)
    ]


class HangUpService(Service):
    """
    Reopens the log file on SIGHUP (see the module's docstring).

    @param reactor: SIGHUP is handled in the reactor's thread
        (C{callFromThread}).
    @param findLogFiles: what to reopen; L{logFiles} unless given.
    @param installSignal: C{signal.signal}, or a stand-in for tests.
    """

    def __init__(
        self,
        reactor,
        findLogFiles: Callable[[], List[object]] = logFiles,
        installSignal: Optional[Callable] = None,
    ) -> None:
        self.reactor = reactor
        self.findLogFiles = findLogFiles
        self.installSignal = installSignal if installSignal is not None else signal.signal

    def startService(self) -> None:
        super().startService()
        # Kept after stopService: a SIGHUP while draining must not cut the
        # connections that are finishing.
        try:
            self.installSignal(signal.SIGHUP, self._signalled)
        except ValueError:  # not the main thread: an embedding's business
            log.info("SIGHUP left as it is: not started in the main thread")
            return
        # Once the reactor stops (its own shutdown, not this service's stop:
        # the services stop in the same phase, and a trigger removed then
        # would never run).
        self.reactor.addSystemEventTrigger(
            "before", "shutdown", quietSecondStop, self.reactor, self.installSignal
        )

    def _signalled(self, signum, frame) -> None:
        self.reactor.callFromThread(self.hangUp)

    def hangUp(self) -> None:
        """
        What SIGHUP does, in the reactor's thread.
        """
        files = self.findLogFiles()
        if not files:
            log.info(
                "SIGHUP: no log file to reopen (logging to standard output or "
                "syslog); carrying on"
            )
            return
        for f in files:
            try:
                f.reopen()
            except OSError as e:
                log.error(
                    "SIGHUP: cannot reopen the log file {path}: {error}; still "
                    "logging to the old one",
                    path=getattr(f, "path", "?"),
                    error=e,
                )
            else:
                log.info("SIGHUP: log file {path} reopened", path=getattr(f, "path", "?"))


def quietSecondStop(reactor, installSignal: Optional[Callable] = None, why: str = "") -> None:
    """
    From now on (this process stops), SIGTERM and SIGINT are logged, not
    handed to the reactor, which would fail to stop again with a traceback:
    the connections still open go on finishing until the drain deadline.

    @param why: what the process is finishing, for the log line.
    """

    install = signal.signal if installSignal is None else installSignal
    if install is signal.signal and getattr(signal.getsignal(signal.SIGTERM), "quiet", False):
        return  # in place already, saying what this process finishes (a takeover)

    def signalled(signum, frame) -> None:
        reactor.callFromThread(
            log.info,
            "signal {signum} while stopping: {why}; SIGKILL stops at once",
            signum=signum,
            why=why or "the connections still open finish until the drain deadline",
        )

    signalled.quiet = True  # type: ignore[attr-defined]
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            install(sig, signalled)
        except ValueError:  # not the main thread: an embedding's business
            return
