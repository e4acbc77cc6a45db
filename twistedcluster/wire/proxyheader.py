"""
The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2):
how a proxy tells the server behind it who the client is.

Pure: no I/O.  L{header} builds what the balancer sends a backend first
(C{--send-proxy}); L{HeaderReader} frames and checks what a listener
receives first (C{haproxy:} listeners), decoding a complete header with
Twisted's own parsers (L{twistedcluster.fast.internals.proxyParsers}).

Addresses are Twisted's: L{IPv4Address}, L{IPv6Address}; anything else (a
unix socket, no address) is sent as the spec says a sender must when it
cannot fill the header: C{PROXY UNKNOWN} (v1), the C{LOCAL} command with no
address (v2), as HAProxy does.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional, Tuple

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

__all__ = [
    "BadProxyHeader",
    "Proxied",
    "HeaderReader",
    "V1",
    "V2",
    "header",
    "v1Header",
    "v2Header",
]

V1 = "v1"
V2 = "v2"

#: The 12 bytes every v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v1 line, CRLF included (the spec's worst case).
V1_MAX = 107
#: The longest v2 header: 16 bytes and a 16-bit length.
V2_MAX = 16 + 0xFFFF

_V2_PROXY_TCP4 = struct.Struct("!12sBBH4s4sHH")
_V2_PROXY_TCP6 = struct.Struct("!12sBBH16s16sHH")
_V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"
_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"


class BadProxyHeader(ValueError):
    """
    What a connection sent first is not a valid PROXY header; the message
    says what is wrong, for the log.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Proxied:
    """
    What a header said: the client's address and the address it connected
    to, or C{None} for both when the sender did not know them (v1
    C{UNKNOWN}, v2 C{LOCAL} or an unspecified family), in which case the
    connection's own addresses stand.
    """

    source: Optional[object]
    destination: Optional[object]


def _ipv6Pair(source, destination) -> Tuple[str, str]:
    """
    Both hosts as IPv6 (an IPv4 one mapped, C{::ffff:a.b.c.d}), for a pair
    whose families differ (a v4 client on a dual-stack listener).
    """

    def six(a):
        return _bare(a.host) if isinstance(a, IPv6Address) else f"::ffff:{a.host}"

    return six(source), six(destination)


def _families(source, destination) -> Optional[str]:
    """
    C{"4"}, C{"6"}, or C{None} when either is not an IP address.
    """
    kinds = (IPv4Address, IPv6Address)
    if not (isinstance(source, kinds) and isinstance(destination, kinds)):
        return None
    if isinstance(source, IPv4Address) and isinstance(destination, IPv4Address):
        return "4"
    return "6"


def _bare(host: str) -> str:
    # A scoped IPv6 address (fe80::1%eth0): the scope means nothing to the
    # receiver and has no place in either format.
    return host.split("%", 1)[0]


def v1Header(source, destination) -> bytes:
    """
    The v1 line: C{PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n}, or C{PROXY
    UNKNOWN\\r\\n} when either address is not an IP address.
    """
    family = _families(source, destination)
    if family is None:
        return _V1_UNKNOWN
    if family == "4":
        src, dst = source.host, destination.host
    elif isinstance(source, IPv6Address) and isinstance(destination, IPv6Address):
        src, dst = _bare(source.host), _bare(destination.host)
    else:
        src, dst = _ipv6Pair(source, destination)
    return f"PROXY TCP{family} {src} {dst} {source.port} {destination.port}\r\n".encode("ascii")


def v2Header(source, destination) -> bytes:
    """
    The v2 header: command PROXY over TCP4 or TCP6 with both addresses and
    ports, or command LOCAL with no address when either is not an IP
    address.
    """
    family = _families(source, destination)
    if family is None:
        return _V2_LOCAL
    if family == "4":
        return _V2_PROXY_TCP4.pack(
            V2_SIGNATURE, 0x21, 0x11, 12,
            socket.inet_pton(socket.AF_INET, source.host),
            socket.inet_pton(socket.AF_INET, destination.host),
            source.port, destination.port,
        )
    if isinstance(source, IPv6Address) and isinstance(destination, IPv6Address):
        src, dst = _bare(source.host), _bare(destination.host)
    else:
        src, dst = _ipv6Pair(source, destination)
    return _V2_PROXY_TCP6.pack(
        V2_SIGNATURE, 0x21, 0x21, 36,
        socket.inet_pton(socket.AF_INET6, src),
        socket.inet_pton(socket.AF_INET6, dst),
        source.port, destination.port,
    )


_BUILDERS = {V1: v1Header, V2: v2Header}

_V2_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c"
_V2_TCP6 = V2_SIGNATURE + b"\x21\x21\x00\x24"
_PORTS = struct.Struct("!HH")
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_pton = socket.inet_pton


def rawHeader(version: str, srcHost: str, srcPort: int, dstHost: str, dstPort: int) -> bytes:
    """
    L{header} for a TCP connection given as the socket module gives it
    (host strings and ports, as from C{getpeername()}/C{getsockname()}),
    with no address objects made: the proxy builds one per connection.
    """
    six = ":" in srcHost or ":" in dstHost
    if six:
        if ":" not in srcHost:
            srcHost = "::ffff:" + srcHost
        if ":" not in dstHost:
            dstHost = "::ffff:" + dstHost
        if "%" in srcHost:
            srcHost = _bare(srcHost)
        if "%" in dstHost:
            dstHost = _bare(dstHost)
    if version == V2:
        if six:
            return _V2_TCP6 + _pton(_AF_INET6, srcHost) + _pton(_AF_INET6, dstHost) + _PORTS.pack(srcPort, dstPort)
        return _V2_TCP4 + _pton(_AF_INET, srcHost) + _pton(_AF_INET, dstHost) + _PORTS.pack(srcPort, dstPort)
    return f"PROXY TCP{6 if six else 4} {srcHost} {dstHost} {srcPort} {dstPort}\r\n".encode("ascii")


def header(version: str, source, destination) -> bytes:
    """
    The header of C{version} (L{V1} or L{V2}) for a client at C{source}
    connected to C{destination}.
    """
    return _BUILDERS[version](source, destination)


def checkVersion(text: str) -> str:
    """
    C{v1} or C{v2}, as given on a command line; C{ValueError} otherwise.
    """
    version = text.strip().lower()
    if version not in _BUILDERS:
        raise ValueError(f"{text!r}: give v1 or v2")
    return version


class HeaderReader:
    """
    Frames the header at the start of a connection, one chunk at a time,
    whatever the chunks (a header may arrive a byte at a time), and decodes
    it.

    C{feed(data)} returns C{None} while the header is incomplete, then
    C{(Proxied, rest)} with the bytes that followed it; it raises
    L{BadProxyHeader} as soon as the bytes cannot begin a valid header.
    What it holds is bounded: 107 bytes for v1, 16 + the announced length
    for v2 (at most 64 KiB).

    @param parsers: Twisted's v1 and v2 parser classes (their C{parse}
        decodes one complete header).
    """

    def __init__(self, parsers) -> None:
        self._v1, self._v2 = parsers
        self._buffer = b""

    def feed(self, data: bytes):
        buffer = self._buffer + data
        if buffer[:1] == b"P":
            return self._feedV1(buffer)
        if buffer[:1] == b"\r":
            return self._feedV2(buffer)
        raise BadProxyHeader(f"does not start with a PROXY signature ({_shown(buffer)})")

    def _feedV1(self, buffer: bytes):
        end = buffer.find(b"\r\n")
        if end < 0:
            if not b"PROXY "[: len(buffer)].startswith(buffer[:6]):
                raise BadProxyHeader(f"does not start with a PROXY signature ({_shown(buffer)})")
            if len(buffer) >= V1_MAX:
                raise BadProxyHeader(f"v1 line without CRLF in {V1_MAX} bytes")
            self._buffer = buffer
            return None
        if end + 2 > V1_MAX:
            raise BadProxyHeader(f"v1 line longer than {V1_MAX} bytes")
        line, rest = buffer[:end], buffer[end + 2 :]
        self._buffer = b""
        if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
            # The receiver must ignore the rest of the line (Twisted's
            # parser refuses the short form, which HAProxy sends).
            return Proxied(None, None), rest
        return _fastV1(line) or _checked(self._v1, line, "v1"), rest

    def _feedV2(self, buffer: bytes):
        if not V2_SIGNATURE.startswith(buffer[:12]):
            raise BadProxyHeader(f"does not start with a PROXY signature ({_shown(buffer)})")
        if len(buffer) >= 13 and buffer[12] >> 4 != 2:
            raise BadProxyHeader(f"v2 signature with version {buffer[12] >> 4}")
        if len(buffer) < 16:
            self._buffer = buffer
            return None
        size = 16 + struct.unpack("!H", buffer[14:16])[0]
        if len(buffer) < size:
            self._buffer = buffer
            return None
        self._buffer = b""
        raw = buffer[:size]
        return _fastV2(raw) or _checked(self._v2, raw, "v2"), buffer[size:]


_NTOP = socket.inet_ntop
_V1_FAMILIES = {b"TCP4": (_AF_INET, IPv4Address), b"TCP6": (_AF_INET6, IPv6Address)}
_V2_FAMILIES = {0x11: (_AF_INET, 4, IPv4Address), 0x21: (_AF_INET6, 16, IPv6Address)}


def _port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5):
        raise ValueError(text)
    port = int(text)
    if port > 0xFFFF:
        raise ValueError(text)
    return port


def _fastV1(line: bytes) -> Optional[Proxied]:
    """
    The common v1 line (C{PROXY TCP4|TCP6 SRC DST SPORT DPORT}) decoded
    and checked without Twisted's parser, which costs about 20 us a header
    (bench/proxycost.py); C{None} for any other line, which Twisted's
    parser then decodes or refuses.  tests/test_proxyheader.py checks that
    both say the same.
    """
    parts = line.split(b" ")
    if len(parts) != 6 or parts[0] != b"PROXY":
        return None
    family = _V1_FAMILIES.get(parts[1])
    if family is None:
        return None
    af, kind = family
    try:
        src, dst = parts[2].decode("ascii"), parts[3].decode("ascii")
        _pton(af, src)
        _pton(af, dst)
        sport, dport = _port(parts[4]), _port(parts[5])
    except (ValueError, OSError, UnicodeDecodeError):
        return None  # Twisted's parser says what is wrong, or accepts it
    return Proxied(kind("TCP", src, sport), kind("TCP", dst, dport))


def _fastV2(raw: bytes) -> Optional[Proxied]:
    """
    The common v2 header (command PROXY, TCP over IPv4 or IPv6) decoded
    without Twisted's parser (see L{_fastV1}); C{None} for any other.
    """
    if raw[12] != 0x21:
        return None
    family = _V2_FAMILIES.get(raw[13])
    if family is None:
        return None
    af, size, kind = family
    end = 16 + 2 * size
    if len(raw) < end + 4:
        return None
    sport, dport = _PORTS.unpack_from(raw, end)
    return Proxied(
        kind("TCP", _NTOP(af, raw[16 : 16 + size]), sport),
        kind("TCP", _NTOP(af, raw[16 + size : end]), dport),
    )


def _shown(data: bytes) -> str:
    return repr(data[:16])


def _checked(parser, raw: bytes, version: str) -> Proxied:
    """
    Twisted's decoding of a complete header, checked: addresses that are
    IP addresses, ports in range; anything Twisted raises is the header's
    fault.
    """
    try:
        info = parser.parse(raw)
    except Exception as e:  # Twisted's InvalidProxyHeader, or a ValueError
        raise BadProxyHeader(f"invalid {version} header {_shown(raw)}: {type(e).__name__}") from None
    source, destination = info.source, info.destination
    if source is None or destination is None or isinstance(source, UNIXAddress):
        # Unknown, local, or a unix socket (which the spec lets a receiver
        # treat as unspecified): the connection's own addresses stand.
        return Proxied(None, None)
    for a in (source, destination):
        ok = isinstance(a, (IPv4Address, IPv6Address)) and 0 <= a.port <= 0xFFFF
        if ok:
            # No scope id (fe80::1%eth0): Twisted takes anything after the
            # %, spaces and line ends included, which would then reach the
            # logs as the client's address; the header's sender's zones mean
            # nothing here anyway.
            ok = (
                isIPAddress(a.host)
                if isinstance(a, IPv4Address)
                else "%" not in a.host and isIPv6Address(a.host)
            )
        if not ok:
            raise BadProxyHeader(f"invalid {version} header {_shown(raw)}: bad address {a}")
    if source.type != "TCP":
        raise BadProxyHeader(f"{version} header for {source.type}, not TCP")
    return Proxied(source, destination)
