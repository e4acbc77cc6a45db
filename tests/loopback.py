"""
Helpers for tests that serve on real loopback sockets from the test's own
reactor.
"""

from contextlib import asynccontextmanager

from twisted.internet import reactor, task
from twisted.internet.endpoints import serverFromString


async def until(condition, timeout=10.0, what="condition"):
    """
    Poll C{condition} on the reactor, at most C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


@asynccontextmanager
async def listening(factory, description="tcp:0:interface=127.0.0.1"):
    """
    Serve C{factory} on the server endpoint C{description} while the block
    runs; the block gets the port number.
    """
    port = await serverFromString(reactor, description).listen(factory)
    try:
        yield port.getHost().port
    finally:
        await port.stopListening()
