"""
A backend whose address is one of this balancer's own listeners (proxy,
redirect, control, admin, metrics), however written (C{localhost},
C{0.0.0.0}, C{::ffff:127.0.0.1}, C{127.1}), is refused: at start (``--backend``), on ``cluster-admin add`` and when a
backend registers.

Such a backend (a typo, or a backend that advertises the balancer's own
address) has the balancer relay each client to itself, and pick again,
itself again, until every client place is taken; nothing ends those
connections (there is no idle timeout by default), so the proxy stays
wedged after the backend is removed.  The balancer knows its own
listeners: it says so instead.

No I/O beyond asking the system whether an IP address is one of this
host's (a bind to it), when a listener listens on every address.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Dict, Iterator, Optional, Tuple

from twistedcluster.address import endpointParts

__all__ = ["OwnListeners", "isLocalAddress", "unspecified"]

_ANY = ("", "0.0.0.0", "::")


def isLocalAddress(host: str) -> bool:
    """
    Whether C{host}, an IP address, is one of this host's (a socket can be
    bound to it); C{False} for a name or anything else.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def _canonical(host: str) -> Tuple[str, ...]:
    """
    The IP addresses C{host} names as a connect would reach them, for the
    forms that name this host without saying so: C{localhost}, IPv4 in
    IPv6 (C{::ffff:127.0.0.1}), the shorthands C{inet_aton} takes
    (C{127.1}, C{2130706433}); otherwise C{host} itself.  No name is
    looked up.
    """
    text = host.strip().rstrip(".").lower()
    if text == "localhost" or text.endswith(".localhost"):
        return ("127.0.0.1", "::1")
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        try:
            return (socket.inet_ntoa(socket.inet_aton(text)),)
        except (OSError, ValueError):
            return (host,)
    mapped = getattr(address, "ipv4_mapped", None)
    return (str(mapped if mapped is not None else address),)


def unspecified(host: str) -> bool:
    """
    Whether C{host} is the unspecified address (C{0.0.0.0}, C{::}): a
    listener's "every interface", never a backend's address (a connect to
    it reaches whatever listens on the connecting host).
    """
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False


def _describedAddress(description: Optional[str]) -> Optional[Tuple[str, int]]:
    """
    The interface and port a C{tcp:}/C{tcp6:} listener's endpoint string
    names (C{None} for another kind, or port 0).
    """
    if not description:
        return None
    kind, args, kwargs = endpointParts(description)
    if kind not in ("tcp", "tcp6"):
        return None
    try:
        port = int(kwargs.get("port", args[0] if args else "0"))
    except ValueError:
        return None
    if not port:
        return None
    return kwargs.get("interface", "::" if kind == "tcp6" else ""), port


class OwnListeners:
    """
    The addresses this balancer's proxy and redirect listeners take
    clients on.

    @param ports: role: its listening port once open (C{None} before), as
        the service keeps them.
    @param descriptions: role: its endpoint string, for a listener not open
        yet (at start, before listening).
    """

    def __init__(
        self,
        ports: Dict[str, object],
        descriptions: Optional[Dict[str, Optional[str]]] = None,
    ) -> None:
        self.ports = ports
        self.descriptions = descriptions or {}

    def _addresses(self) -> Iterator[Tuple[str, str, int]]:
        # The control, admin and metrics listeners too: a backend there
        # would hand proxy clients the operator's own channels.
        for role in ("proxy", "redirect", "control", "admin", "metrics"):
            port = self.ports.get(role)
            host = getattr(port.getHost(), "host", None) if port is not None else None
            if host is not None:
                yield role, host, port.getHost().port
                continue
            described = _describedAddress(self.descriptions.get(role))
            if described is not None:
                yield (role, *described)

    def loopsTo(self, host: str, port: int) -> Optional[str]:
        """
        The role of this balancer's own listener at C{host}:C{port}
        (C{"proxy"}, C{"redirect"}), or C{None} when that is not one.
        """
        hosts = _canonical(host)
        anywhere = unspecified(host)
        for role, interface, listening in self._addresses():
            if listening != port:
                continue
            for one in hosts:
                if anywhere or one == interface or (interface in _ANY and isLocalAddress(one)):
                    return role
                if _canonical(interface) == (one,):
                    return role
        return None

    def refusal(self, host: str, port: int) -> Optional[str]:
        """
        Why a backend at C{host}:C{port} is refused, or C{None}.
        """
        if unspecified(host):
            return (
                f"{host} is no address to connect to (it means every interface to a "
                "listener): give the backend's own address"
            )
        role = self.loopsTo(host, port)
        if role is None:
            return None
        return (
            f"{host}:{port} is this balancer's own {role} listener: a backend "
            f"there would have it relay every client to itself"
        )
