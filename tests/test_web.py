"""
L{twistedcluster.backend.web.DrainingSite}: keep-alive ends when the
backend drains, in memory on a Clock.
"""

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twistedcluster.backend.web import DrainingSite

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class Hello(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = []

    def render_GET(self, request):
        if request.args.get(b"slow"):
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"hello\n"


def connect(site):
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def responses(transport):
    return transport.value().split(b"HTTP/1.1 ")[1:]


def test_before_the_drain_connections_are_kept_alive():
    site = DrainingSite(Hello(), reactor=MemoryReactorClock())
    channel, t = connect(site)
    channel.dataReceived(GET + GET)
    assert len(responses(t)) == 2
    assert b"connection: close" not in t.value().lower()
    assert not t.disconnecting
    assert site.channels == {channel}


def test_after_the_drain_a_response_says_close_and_its_connection_closes():
    clock = MemoryReactorClock()
    resource = Hello()
    site = DrainingSite(resource, reactor=clock)
    idle, idleT = connect(site)
    idle.dataReceived(GET)
    busy, busyT = connect(site)
    busy.dataReceived(b"GET /?slow=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    site.drain()
    # The idle one may still bring its next request, answered and closed.
    assert not idleT.disconnecting
    idle.dataReceived(GET)
    [_, last] = responses(idleT)
    assert b"connection: close" in last.lower() and last.endswith(b"hello\n")
    assert idleT.disconnecting
    # The one with a request under way closes after its response, which says so.
    [request] = resource.waiting
    assert not busyT.disconnecting
    request.write(b"slow\n")
    request.finish()
    [response] = responses(busyT)
    assert b"connection: close" in response.lower()
    assert busyT.disconnecting


def test_a_connection_idle_through_the_grace_is_closed():
    clock = MemoryReactorClock()
    site = DrainingSite(Hello(), reactor=clock, idleGrace=1.0)
    channel, t = connect(site)
    channel.dataReceived(GET)
    site.drain()
    clock.advance(0.9)
    assert not t.disconnecting
    clock.advance(0.2)
    assert t.disconnecting
