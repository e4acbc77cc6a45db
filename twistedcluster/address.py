"""
Addresses as users write them: ``HOST:PORT`` on command lines (``[::1]:9000``
for IPv6), and Twisted endpoint strings; and the client endpoint for a
backend's advertised address.
"""

import re
from typing import Dict, List, Tuple

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = [
    "addressText",
    "endpointProblem",
    "endpointParts",
    "parsedEndpoint",
    "formatHostPort",
    "parseHostPort",
    "tcpEndpoint",
    "validHost",
]

def addressText(addr) -> str:
    """
    A Twisted address (or anything with C{host} and C{port}) as
    C{host:port}, for a log line.
    """
    return f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}"


_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def validHost(host: str) -> bool:
    """
    Whether C{host} is an IPv4 or IPv6 address (no brackets) or a DNS host
    name: dot-separated labels of letters, digits, hyphens and underscores
    (an internationalised name in its ASCII C{xn--} form), 253 characters
    at most.  Nothing else may reach a redirect answer or a log line.
    """
    if isIPAddress(host) or isIPv6Address(host):
        return True
    if not host or ":" in host or len(host) > 253:
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(_HOSTNAME_LABEL.match(label) for label in labels)


def parseHostPort(text: str) -> Tuple[str, int]:
    """
    Split ``HOST:PORT`` (``[V6]:PORT`` for IPv6); C{ValueError} with a
    message for humans if it is not one.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
        portText = rest[1:]
    else:
        host, sep, portText = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not host:
        raise ValueError(f"{text!r} has no host")
    if not validHost(host):
        raise ValueError(f"{text!r}: {host!r} is not an IP address or a host name")
    try:
        port = int(portText)
    except ValueError:
        raise ValueError(f"{text!r}: port {portText!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port must be 1..65535")
    return host, port


def formatHostPort(host: str, port: int) -> str:
    """
    The inverse of L{parseHostPort}.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def backendText(name: str, host: str, port: int) -> str:
    """
    A backend as a log line names it: C{NAME at HOST:PORT}, or just the name
    when it is that address already (static backends, unnamed ones).
    """
    address = formatHostPort(host, port)
    return name if name == address else f"{name} at {address}"


def errorText(error: object) -> str:
    """
    A connect or listen error (an exception or a Failure) as a phrase to
    put inside a log line: Twisted's messages are whole sentences ("Connection
    was refused by other side: 111: Connection refused."), which read badly
    followed by "; trying another".
    """
    from twisted.internet import error as errors
    from twisted.python.failure import Failure

    if isinstance(error, Failure):
        error = error.value
    if isinstance(error, errors.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, errors.TCPTimedOutError):
        return "connection timed out"
    if isinstance(error, errors.TimeoutError):
        return "no answer in time"
    text = (str(error) or type(error).__name__).strip()
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def tcpEndpoint(reactor, host: str, port: int, timeout: float = 5.0) -> IStreamClientEndpoint:
    """
    A TCP client endpoint for C{host}: TCP4 or TCP6 for an address literal
    (no name resolution, no thread), L{HostnameEndpoint} for a name.
    """
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def endpointParts(description: str) -> Tuple[str, List[str], Dict[str, str]]:
    """
    An endpoint string's type, positional and keyword arguments, honouring
    backslash escapes: enough to judge where a listener listens.
    """
    parts, current, escaped = [], "", False
    for ch in description:
        if escaped:
            current, escaped = current + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], args, kwargs


def endpointProblem(description: str, error: BaseException, client: bool = False) -> str:
    """
    Why Twisted could not make an endpoint of C{description}, in words:
    its parsers raise whatever they meet (C{ValueError} for an unknown
    type, C{KeyError} for a systemd socket that was not passed,
    C{TypeError} for a missing argument, C{OSError} for a key file), some
    with no message at all.
    """
    kind = description.split(":", 1)[0]
    if isinstance(error, KeyError) and kind == "systemd":
        return (
            f"systemd passed no socket named {error.args[0]!r} (start it from its "
            ".socket unit, whose FileDescriptorName= names it, or give a tcp: endpoint)"
        )
    if isinstance(error, TypeError) and client and "missing" in str(error):
        return (
            "a client endpoint names where to connect, e.g. "
            "tcp:host=127.0.0.1:port=8100 (tcp:8100 is a listening endpoint)"
        )
    if isinstance(error, OSError):
        filename = getattr(error, "filename", None)
        reason = error.strerror or str(error) or type(error).__name__
        inner = getattr(error, "originalException", None)  # FilePath's Unlistable...
        if inner is not None and not error.strerror:
            reason = getattr(inner, "strerror", None) or str(inner) or reason
            filename = filename or getattr(inner, "filename", None)
        return f"{reason}: {filename}" if filename else reason
    return errorText(error) or type(error).__name__


def parsedEndpoint(parse, reactor, description: str, option: str, client: bool = False):
    """
    C{parse(reactor, description)} (C{serverFromString}, C{clientFromString}
    or C{strports.service}), with anything it raises turned into a
    L{twisted.python.usage.UsageError} that names C{option} and says why in
    one line: what a process prints before it exits, not a traceback.
    """
    from twisted.python import usage

    try:
        return parse(reactor, description)
    except Exception as e:
        raise usage.UsageError(
            f"{option} {description}: {endpointProblem(description, e, client)}"
        ) from None
