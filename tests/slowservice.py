"""
Services that take time but no CPU, for ``twistd cluster-backend --service
tests.slowservice.NAME``: each serves its connections one at a time, answering
a connection's first line after a fixed service time (a server with one
worker), then closing it.
"""

from collections import deque

from twisted.internet.protocol import Factory, Protocol


class _Request(Protocol):
    asked = False
    gone = False

    def dataReceived(self, data):
        if not self.asked and b"\n" in data:
            self.asked = True
            self.factory.enqueue(self)

    def connectionLost(self, reason=None):
        self.gone = True


class OneAtATime(Factory):
    """
    Answers the connections' requests in arrival order, one each
    C{seconds}, with C{b"done\\n"}.
    """

    protocol = _Request
    noisy = False

    def __init__(self, seconds, clock=None):
        self.seconds = seconds
        self.clock = clock
        self.queue = deque()
        self.busy = False

    def enqueue(self, request):
        self.queue.append(request)
        if not self.busy:
            self._next()

    def _next(self):
        while self.queue and self.queue[0].gone:
            self.queue.popleft()
        if not self.queue:
            self.busy = False
            return
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        self.busy = True
        self.clock.callLater(self.seconds, self._done, self.queue.popleft())

    def _done(self, request):
        if not request.gone:
            request.transport.write(b"done\n")
            request.transport.loseConnection()
        self._next()


def fast():
    return OneAtATime(0.002)


def slow():
    return OneAtATime(0.010)
