"""
The PROXY header, built and read: exact bytes from the spec's examples,
round trips through Twisted's own parsers, and every way a header can be
wrong.
"""

import pytest
from hypothesis import given, strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from twistedcluster.fast.internals import proxyParsers
from twistedcluster.wire.proxyheader import (
    BadProxyHeader,
    HeaderReader,
    Proxied,
    checkVersion,
    header,
    v1Header,
    v2Header,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def reader():
    return HeaderReader(proxyParsers())


def test_v1_ipv4_is_the_spec_example():
    h = v1Header(IPv4Address("TCP", "192.168.0.1", 56324), IPv4Address("TCP", "192.168.0.11", 443))
    assert h == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_ipv6_and_mixed_families():
    h = v1Header(IPv6Address("TCP", "::1", 5), IPv6Address("TCP", "fe80::1%lo", 80))
    assert h == b"PROXY TCP6 ::1 fe80::1 5 80\r\n"
    # A v4 client on a dual-stack listener: both as IPv6.
    h = v1Header(IPv4Address("TCP", "127.0.0.5", 5), IPv6Address("TCP", "::1", 80))
    assert h == b"PROXY TCP6 ::ffff:127.0.0.5 ::1 5 80\r\n"


def test_unix_is_unknown_in_v1_and_local_in_v2():
    unix = UNIXAddress(b"/run/lb.sock")
    assert v1Header(unix, unix) == b"PROXY UNKNOWN\r\n"
    assert v2Header(unix, UNIXAddress(None)) == SIG + b"\x20\x00\x00\x00"
    assert v2Header(None, None) == SIG + b"\x20\x00\x00\x00"


def test_v2_ipv4_bytes():
    h = v2Header(IPv4Address("TCP", "172.19.0.1", 42578), IPv4Address("TCP", "172.19.0.3", 80))
    # The bytes HAProxy sends for this connection (experiment-proxy-protocol).
    assert h == SIG + bytes.fromhex("2111000c ac130001 ac130003 a652 0050")


def test_v2_ipv6_bytes():
    h = v2Header(IPv6Address("TCP", "2001:db8::1", 1), IPv6Address("TCP", "::1", 2))
    assert h[:16] == SIG + b"\x21\x21\x00\x24"
    assert h[16:32] == bytes.fromhex("20010db8000000000000000000000001")
    assert h[32:48] == bytes(15) + b"\x01"
    assert h[48:] == b"\x00\x01\x00\x02"


def test_version_option():
    assert checkVersion("V2") == "v2"
    with pytest.raises(ValueError):
        checkVersion("v3")


addresses4 = st.builds(
    lambda a, p: IPv4Address("TCP", a, p), st.ip_addresses(v=4).map(str), st.integers(0, 65535)
)
addresses6 = st.builds(
    lambda a, p: IPv6Address("TCP", a, p), st.ip_addresses(v=6).map(str), st.integers(0, 65535)
)


@given(st.sampled_from(["v1", "v2"]), st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)),
       st.binary(max_size=40), st.integers(1, 7))
def test_what_we_send_twisted_reads_back_in_any_chunks(version, pair, after, chunk):
    import ipaddress

    source, destination = pair
    data = header(version, source, destination) + after
    r = reader()
    result = None
    for i in range(0, len(data), chunk):
        result = r.feed(data[i : i + chunk])
        if result is not None:
            got, rest = result
            rest += data[i + chunk :]
            break
    assert result is not None
    assert rest == after
    for sent, read in ((source, got.source), (destination, got.destination)):
        assert ipaddress.ip_address(read.host) == ipaddress.ip_address(sent.host)
        assert read.port == sent.port


def test_unknown_and_local_leave_the_connection_addresses():
    assert reader().feed(b"PROXY UNKNOWN\r\nhello") == (Proxied(None, None), b"hello")
    assert reader().feed(SIG + b"\x20\x00\x00\x00hi") == (Proxied(None, None), b"hi")
    # A v2 unix header: the spec lets a receiver treat it as unspecified.
    unix = SIG + b"\x21\x31\x00\xd8" + b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")
    assert reader().feed(unix) == (Proxied(None, None), b"")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"PROXI TCP4",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",  # a port missing
        b"PROXY TCP4 1.2.3.4 5.6.7.8 abc 80\r\n",  # Twisted raises ValueError
        b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 80\r\n",
        b"PROXY TCP4 example.com 5.6.7.8 1 80\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 80\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 80\r\n",
        b"PROXY TCP4 " + b"1" * 200,  # no CRLF within 107 bytes
        SIG + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        SIG + b"\x2f\x11\x00\x0c" + bytes(12),  # command 15
        SIG + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
        SIG + b"\x21\x11\x00\x04" + bytes(4),  # too short for its family
        SIG[:6] + b"X" + SIG[7:],
        b"\r\nGET",
        # A scope id would carry anything to the logs as the client's
        # address: a forged access log record, terminal escapes.
        b"PROXY TCP6 fe80::1%\n2026-12-02T00:00:00Z\tproxy ::1 2222 80\r\n",
        b"PROXY TCP6 fe80::1%\x1b[31mRED ::1 2222 80\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 2222 80\r\n",
    ],
)
def test_garbage_is_refused_with_a_reason(data):
    with pytest.raises(BadProxyHeader) as e:
        r = reader()
        for i in range(len(data)):  # even a byte at a time
            if r.feed(data[i : i + 1]) is not None:
                break
    assert str(e.value)


def test_an_incomplete_header_is_held_bounded():
    r = reader()
    assert r.feed(b"PROXY TCP4 1.2.3.4") is None
    assert r.feed(SIG[:0]) is None
    r = reader()
    assert r.feed(SIG + b"\x21\x11\xff\xff") is None  # 64 KiB announced: waits, bounded


@given(st.sampled_from(["v1", "v2"]), st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6),
                                               st.tuples(addresses4, addresses6)))
def test_the_raw_builder_the_proxy_uses_says_the_same(version, pair):
    from twistedcluster.wire.proxyheader import rawHeader

    source, destination = pair
    assert rawHeader(version, source.host, source.port, destination.host, destination.port) == header(
        version, source, destination
    )


@given(
    st.sampled_from([b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG, SIG + b"\x21",
                     SIG + b"\x21\x11", SIG + b"\x20", SIG + b"\x21\x21\x00"]),
    st.binary(max_size=300),
    st.integers(1, 64),
)
def test_any_bytes_give_a_header_a_wait_or_a_clear_refusal(prefix, tail, chunk):
    # Whatever a client sends, the reader answers in one of three ways, and
    # never holds more than the spec's bounds.
    data = prefix + tail
    r = reader()
    try:
        for i in range(0, len(data), chunk):
            result = r.feed(data[i : i + chunk])
            if result is not None:
                proxied, rest = result
                assert isinstance(proxied, Proxied)
                break
            assert len(r._buffer) <= 16 + 0xFFFF
    except BadProxyHeader as e:
        assert str(e)


def twistedOnly(data):
    """
    What the reader decodes with Twisted's parsers alone (the fast paths
    for the common headers turned off).
    """
    from twistedcluster.wire import proxyheader

    saved = proxyheader._fastV1, proxyheader._fastV2
    proxyheader._fastV1 = proxyheader._fastV2 = lambda raw: None
    try:
        return reader().feed(data)
    finally:
        proxyheader._fastV1, proxyheader._fastV2 = saved


def same(a, b):
    import ipaddress

    if a is None or b is None:
        return a is b
    return (ipaddress.ip_address(a.host), a.port, type(a)) == (ipaddress.ip_address(b.host), b.port, type(b))


@given(st.sampled_from(["v1", "v2"]), st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)),
       st.binary(max_size=8))
def test_the_fast_decoders_say_what_twisted_says(version, pair, after):
    data = header(version, *pair) + after
    fast, rest = reader().feed(data)
    slow, slowRest = twistedOnly(data)
    assert rest == slowRest == after
    assert same(fast.source, slow.source) and same(fast.destination, slow.destination)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 80\r\n",  # a leading zero: Twisted's parser decides
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 80 extra\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 80\r\n",
        b"PROXY TCP6 ::1 ::1 1 +80\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
    ],
)
def test_uncommon_v1_lines_are_left_to_twisted(line):
    try:
        fast = reader().feed(line)
    except BadProxyHeader:
        fast = "refused"
    try:
        slow = twistedOnly(line)
    except BadProxyHeader:
        slow = "refused"
    assert fast == slow
