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
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.threads import deferToThread

from tests.certificates import Authority, writePair
from twistedcluster.echo import echoFactory


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
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(echoFactory())
    payload = os.urandom(8 << 20)

    def run():
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as s:
            return echoAll(s, payload)

    try:
        got, closed = await deferToThread(run)
        assert closed
        assert got == payload
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_echoes_over_tls(tmp_path):
    ca = Authority()
    key, cert = writePair(tmp_path, "server", *ca.issue("localhost", ips=["127.0.0.1"]))
    port = await serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    ).listen(echoFactory())
    payload = os.urandom(1 << 20)

    def run():
        context = ssl.create_default_context(cadata=ca.cert.public_bytes(Encoding.PEM).decode())
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return echoAll(s, payload, halfClose=False)

    try:
        got, _ = await deferToThread(run)
        assert got == payload
    finally:
        await port.stopListening()


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
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(echoFactory())
    try:
        sent, got = await deferToThread(sendWithoutReading, port.getHost().port, 256 << 20)
        assert sent < 64 << 20, sent
        assert got == sent
    finally:
        await port.stopListening()
