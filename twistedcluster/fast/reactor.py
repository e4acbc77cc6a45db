"""
The reactor the balancer, and a backend serving the built-in echo, run on
unless twistd is told another: Twisted's epoll reactor without the legacy
log context it sets around every I/O event.

C{EPollReactor.doPoll} calls each ready descriptor through
C{twisted.python.log.callWithLogger}, which asks the transport for its log
prefix, copies two dicts and pushes a context, so that old-style C{log.msg}
calls made meanwhile carry the transport's name.  Events from
C{twisted.logger} (all of twistedcluster's) never read that context; the
proxy pays for it twice per relayed message and six times per connection
(measured with bench/run.py --baseline: a fifth of the balancer's CPU per
echo, 6% per new connection).  Errors are still caught and logged, with the
descriptor named in the event.

Anything that needs the legacy context runs under Twisted's own reactor:
C{twistd --reactor=epoll cluster-balancer ...}.  A backend serving its own
--service keeps Twisted's default reactor.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class LeanEPollReactor(EPollReactor):
    """
    L{EPollReactor} that dispatches ready descriptors directly.
    """

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            ready = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        doReadOrWrite = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                doReadOrWrite(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # _doReadOrWrite catches what doRead and doWrite raise; this
                # is what a connectionLost raised.  Log it and go on, as
                # callWithLogger would.
                log.failure("unhandled error from {selectable!r}", selectable=selectable)

    doIteration = doPoll


def installIfNone() -> bool:
    """
    Install L{LeanEPollReactor} as the global reactor, unless a reactor is
    installed already (twistd --reactor, or an earlier import) or epoll is
    not available; whether it was installed.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    try:
        import select

        select.epoll  # noqa: B018 - Linux only
    except AttributeError:
        return False
    from twisted.internet.main import installReactor

    installReactor(LeanEPollReactor())
    return True
