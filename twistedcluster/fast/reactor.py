"""
The reactor the balancer, and a backend serving the built-in echo, run on
unless twistd is told another: Twisted's epoll reactor without the legacy
log context it sets around every I/O event.

C{EPollReactor.doPoll} calls each ready descriptor through
C{twisted.python.log.callWithLogger}, which asks the transport for its log
prefix, copies two dicts and pushes a context, so that old-style C{log.msg}
calls made meanwhile carry the transport's name.  Events from
C{twisted.logger} (all of twistedcluster's) never read that context; the
proxy would pay for it twice per relayed message and six times per
connection, which shows in its CPU per echo and per new connection (the
figures are in docs/benchmarks.md).  Errors are still caught and logged,
with the descriptor named in the event.

The poll loop is Twisted's, copied: it lives with the other Twisted
internals in L{twistedcluster.fast.internals.leanDoPoll}.  When that
module's canary fails, the balancer falls back to Twisted's own reactor.

The reactor is also a Twisted reactor plugin, C{lean-epoll}
(twisted/plugins/twistedcluster_reactor.py, L{install}):
C{twistd --reactor=lean-epoll ...} and C{twist --reactor=lean-epoll ...}.
Anything that needs the legacy context runs under Twisted's own reactor:
C{twistd --reactor=epoll cluster-balancer ...}.  A backend serving its own
--service keeps Twisted's default reactor.
"""

from __future__ import annotations

import sys

from twisted.internet.epollreactor import EPollReactor

from twistedcluster.fast import internals


class LeanEPollReactor(EPollReactor):
    """
    L{EPollReactor} that dispatches ready descriptors directly, and
    answers at once a request to stop reading or writing a descriptor that
    is not being read or written.
    """

    doPoll = doIteration = internals.leanDoPoll
    removeReader = internals.leanRemoveReader
    removeWriter = internals.leanRemoveWriter


def installIfNone() -> bool:
    """
    Install L{LeanEPollReactor} as the global reactor, unless a reactor is
    installed already (twistd --reactor, or an earlier import), epoll is
    not available, or Twisted's internals failed the canary
    (L{internals.fastPaths}); whether it was installed.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    if not internals.fastPaths():
        return False
    try:
        import select

        select.epoll  # noqa: B018 - Linux only
    except AttributeError:
        return False
    from twisted.internet.main import installReactor

    installReactor(LeanEPollReactor())
    return True


def install() -> None:
    """
    Install L{LeanEPollReactor} as the global reactor: what the C{lean-epoll}
    reactor plugin (C{twistd --reactor=lean-epoll}) calls.  When Twisted's
    internals failed the canary, Twisted's own epoll reactor is installed
    instead (and L{internals.fastPaths} has logged why).
    """
    from twisted.internet.main import installReactor

    if not internals.fastPaths():
        from twisted.internet import epollreactor

        epollreactor.install()
        return
    installReactor(LeanEPollReactor())
