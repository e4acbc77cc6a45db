"""
A backend whose address is this balancer's own proxy or redirect listener
is refused: at start (``--backend``), on ``cluster-admin add`` and when a
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

__all__ = ["OwnListeners", "isLocalAddress"]

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
        for role in ("proxy", "redirect"):
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
        for role, interface, listening in self._addresses():
            if listening != port:
                continue
            if interface == host or (interface in _ANY and isLocalAddress(host)):
                return role
        return None

    def refusal(self, host: str, port: int) -> Optional[str]:
        """
        Why a backend at C{host}:C{port} is refused, or C{None}.
        """
        role = self.loopsTo(host, port)
        if role is None:
            return None
        return (
            f"{host}:{port} is this balancer's own {role} listener: a backend "
            f"there would have it relay every client to itself"
        )
