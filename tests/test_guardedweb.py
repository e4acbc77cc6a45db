"""
twistedcluster.wire.guardedweb on real loopback sockets: what a stranger can
hold of an operator's web listener (--metrics) is bounded.
"""

import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from tests.loopback import listening, until
from twistedcluster.wire import guardedweb
from twistedcluster.wire.guardedweb import GuardedSite


class Page(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"page\n"


def exchange(port, data, timeout=10.0):
    """
    Send C{data}, then read until the server closes: what it sent.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
    finally:
        s.close()


def ended(s):
    """
    Whether the server has closed C{s} (an end of file or a reset).
    """
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest_twisted.ensureDeferred
async def test_a_page_is_served_and_an_idle_connection_closed():
    site = GuardedSite(Page(), reactor, timeout=0.3)
    async with listening(site) as port:
        got = await deferToThread(exchange, port, b"GET / HTTP/1.0\r\n\r\n")
        assert got.startswith(b"HTTP/1.0 200") and got.endswith(b"page\n")
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            await until(lambda: site.open == 1, what="the idle connection counted")
            # Closed by the server within the idle timeout, not 12 hours.
            assert await deferToThread(idle.recv, 100) == b""
            await until(lambda: site.open == 0, what="the idle connection gone")
        finally:
            idle.close()


@pytest_twisted.ensureDeferred
async def test_connections_past_the_bound_are_closed_at_once_and_summed(logged):
    site = GuardedSite(Page(), reactor, maxConnections=3)
    async with listening(site) as port:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            await until(lambda: site.open == 3, what="three open")
            for _ in range(5):
                assert await deferToThread(exchange, port, b"GET / HTTP/1.0\r\n\r\n") == b""
            assert site.open == 3
            lines = [line for line in logged if "metrics listener: closing" in line]
            assert lines and "3 connections open" in lines[0]
        finally:
            for s in held:
                s.close()
        await until(lambda: site.open == 0, what="all closed")
        got = await deferToThread(exchange, port, b"GET / HTTP/1.0\r\n\r\n")
        assert got.endswith(b"page\n")


def keptAliveExchange(s):
    """
    One HTTP/1.1 request on C{s}, kept open: the whole response.
    """
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while not got.endswith(b"page\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest_twisted.ensureDeferred
async def test_a_full_listener_lets_a_newcomer_in_in_place_of_a_connection_without_requests(logged):
    # A peer holding every place must not keep a scraper out for the whole
    # idle timeout, even by trickling a request: past evictAfter, the
    # connection that has made no whole request for longest makes room; a
    # scraper that keeps its connection and asks again stays.
    site = GuardedSite(Page(), reactor, maxConnections=2, evictAfter=0.5)
    async with listening(site) as port:
        trickler = socket.create_connection(("127.0.0.1", port), timeout=10)
        scraper = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            await until(lambda: site.open == 2, what="two open")
            trickler.sendall(b"GET / HTTP/1.1\r\n")
            # Too soon: the newcomer is closed, the two stay.
            assert await deferToThread(exchange, port, b"GET / HTTP/1.0\r\n\r\n") == b""
            await deferLater(reactor, 0.6, lambda: None)
            assert (await deferToThread(keptAliveExchange, scraper)).startswith(b"HTTP/1.1 200")
            trickler.sendall(b"Host: x\r\n")
            got = await deferToThread(exchange, port, b"GET / HTTP/1.0\r\n\r\n")
            assert got.endswith(b"page\n")
            assert await deferToThread(ended, trickler)
            assert (await deferToThread(keptAliveExchange, scraper)).startswith(b"HTTP/1.1 200")
            # Summed with the refusal before it: told once its second is over.
            await until(
                lambda: any("no request for" in line and "1 closed to make room" in line for line in logged),
                what="the eviction logged",
            )
        finally:
            trickler.close()
            scraper.close()


@pytest_twisted.ensureDeferred
async def test_a_large_body_is_refused_before_it_is_stored():
    site = GuardedSite(Page(), reactor)
    big = guardedweb.MAX_BODY + 1
    async with listening(site) as port:
        declared = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (200 * 1024 * 1024)
        got = await deferToThread(exchange, port, declared + b"x" * 65536)
        assert got.startswith(b"HTTP/1.1 413")
        chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunked += b"%x\r\n" % big + b"x" * big + b"\r\n0\r\n\r\n"
        got = await deferToThread(exchange, port, chunked)
        assert got.startswith(b"HTTP/1.1 413")
        # A small body is read and the page answers as it would.
        small = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
        got = await deferToThread(exchange, port, small)
        assert got.startswith(b"HTTP/1.1 405")
        await until(lambda: site.open == 0, what="all closed")
