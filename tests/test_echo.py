"""
The built-in echo service over real loopback sockets: every byte back, in
order, then the close, over plain TCP (its direct send and close) and TLS.
"""

import os
import selectors
import socket
import ssl
import time

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.certificates import loopbackTLS
from tests.loopback import listening
from twistedcluster.backend.echo import echoFactory


def echoAll(s, payload, halfClose=True):
    """
    Send C{payload} while reading; end the input; everything read until the
    server closes.
    """
    s.setblocking(False)
    got, sent, closed = bytearray(), 0, False
    view = memoryview(payload)
    end = time.monotonic() + 30.0
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    while time.monotonic() < end:
        for key, events in sel.select(0.5):
            if events & selectors.EVENT_WRITE and sent < len(payload):
                try:
                    sent += s.send(view[sent:sent + 262144])
                except (BlockingIOError, ssl.SSLWantWriteError):
                    pass
                if sent == len(payload):
                    sel.modify(s, selectors.EVENT_READ)
                    if halfClose:
                        s.shutdown(socket.SHUT_WR)
            if events & selectors.EVENT_READ:
                try:
                    chunk = s.recv(262144)
                except (BlockingIOError, ssl.SSLWantReadError):
                    continue
                if not chunk:
                    closed = True
                    break
                got += chunk
        if closed or (not halfClose and len(got) == len(payload)):
            break
    sel.close()
    return bytes(got), closed


@pytest_twisted.ensureDeferred
async def test_echoes_megabytes_then_closes_after_the_end_of_input():
    # More than the kernel takes at once: part of the echo is queued, and the
    # close waits for it.
    payload = os.urandom(8 << 20)

    def run(port):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            return echoAll(s, payload)

    async with listening(echoFactory()) as port:
        got, closed = await deferToThread(run, port)
        assert closed
        assert got == payload


@pytest_twisted.ensureDeferred
async def test_echoes_over_tls(tmp_path):
    description, context = loopbackTLS(tmp_path)
    payload = os.urandom(1 << 20)

    def run(port):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return echoAll(s, payload, halfClose=False)

    async with listening(echoFactory(), description) as port:
        got, _ = await deferToThread(run, port)
        assert got == payload


def sendWithoutReading(port, limit):
    """
    Send until the server stops taking bytes (or C{limit} went out); then
    read everything back.  What was sent, and what came back.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        payload = os.urandom(1 << 16)
        pattern = payload * 2
        sent = 0
        s.settimeout(1.0)
        try:
            while sent < limit:
                sent += s.send(payload)
        except socket.timeout:
            pass
        s.settimeout(30)
        # Everything sent comes back once read, in order.
        got = 0
        while got < sent:
            chunk = s.recv(1 << 16)
            assert chunk, f"closed after {got} of {sent} bytes"
            start = got % len(payload)
            assert chunk == pattern[start:start + len(chunk)], f"wrong bytes at {got}"
            got += len(chunk)
        return sent, got


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_held_to_a_bounded_amount():
    # Without back-pressure the echo would read (and queue in memory) all of
    # the 256 MiB the client sends; with it, reading stops once the kernel's
    # buffers both ways and one transport buffer are full.
    async with listening(echoFactory()) as port:
        sent, got = await deferToThread(sendWithoutReading, port, 256 << 20)
        assert sent < 64 << 20, sent
        assert got == sent
