"""
The balancer's lean epoll reactor as a Twisted reactor plugin:
C{twistd --reactor=lean-epoll ...}, C{twist --reactor=lean-epoll ...}.
"""

from twisted.application.reactors import Reactor

leanepoll = Reactor(
    "lean-epoll",
    "twistedcluster.fast.reactor",
    "epoll(4)-based reactor without the legacy log context per I/O event "
    "(twistedcluster's default for the balancer)",
)
