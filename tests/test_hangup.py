"""
L{twistedcluster.hangup}: what SIGHUP does, without signals or files.
"""

import signal

from twistedcluster.hangup import HangUpService


class NowReactor:
    def __init__(self):
        self.triggers = []

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append((phase, event, f, args))

    def shutDown(self):
        for phase, event, f, args in self.triggers:
            assert (phase, event) == ("before", "shutdown")
            f(*args)


class FakeLogFile:
    def __init__(self, path, fails=False):
        self.path = path
        self.fails = fails
        self.reopened = 0

    def reopen(self):
        if self.fails:
            raise OSError("Permission denied")
        self.reopened += 1


def test_sighup_reopens_every_log_file_and_stays_installed(logged):
    installed = {}
    files = [FakeLogFile("/var/log/lb.log")]
    svc = HangUpService(NowReactor(), lambda: files, lambda sig, h: installed.__setitem__(sig, h))
    svc.startService()
    handler = installed[signal.SIGHUP]
    handler(signal.SIGHUP, None)
    assert files[0].reopened == 1
    svc.stopService()
    handler(signal.SIGHUP, None)  # while draining too
    assert files[0].reopened == 2
    assert logged.count("SIGHUP: log file /var/log/lb.log reopened") == 2


def test_sighup_without_a_log_file_is_noted(logged):
    svc = HangUpService(NowReactor(), lambda: [], lambda sig, h: None)
    svc.hangUp()
    assert any("no log file to reopen" in line for line in logged)


def test_a_log_file_that_cannot_reopen_is_an_error_not_an_exit(observeErrors, logged):
    svc = HangUpService(NowReactor(), lambda: [FakeLogFile("/x.log", fails=True)], lambda s, h: None)
    svc.hangUp()
    assert any("cannot reopen the log file /x.log: Permission denied" in line for line in logged)
    observeErrors.clear()  # the error is what this test expects


def test_once_the_process_stops_a_second_sigterm_or_sigint_is_only_logged(logged):
    # The reactor would stop a second time and fail with a traceback; the
    # drain goes on, and SIGKILL stops at once.
    installed = {}
    reactor = NowReactor()
    svc = HangUpService(reactor, lambda: [], lambda sig, h: installed.__setitem__(sig, h))
    svc.startService()
    assert signal.SIGTERM not in installed  # until the process stops, the reactor's
    svc.stopService()
    reactor.shutDown()
    for sig in (signal.SIGTERM, signal.SIGINT):
        installed[sig](sig, None)
    lines = [line for line in logged if "while stopping" in line]
    assert len(lines) == 2 and "SIGKILL stops at once" in lines[0]
