"""
``HOST:PORT`` as users write it on command lines (``[::1]:9000`` for IPv6).
"""

from typing import Tuple


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
