"""
What a static backend is, as ``--backend`` and ``cluster-admin add`` give
it: C{[NAME=]HOST:PORT[,KEY=VALUE]...}.  No I/O: parsed here, kept in the
pool and checked by L{twistedcluster.balancer.healthcheck}.

The keys after the address are in one table, L{KEYS}: each names the
L{StaticBackend} field it sets and the function that reads its value (and
raises C{ValueError} saying what is wrong).  A new key is one entry there
and one field.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import attr

from twistedcluster.address import formatHostPort, parseHostPort
from twistedcluster.options import keyValues

__all__ = [
    "DEFAULT_STATIC_CAPACITY",
    "KEYS",
    "StaticBackend",
    "makeStaticBackend",
    "parseStaticBackend",
]

#: Connections a static backend is sized for unless C{capacity=} says: it
#: reports nothing, so this balancer counts only what it relays there.
DEFAULT_STATIC_CAPACITY = 1000
#: The most C{capacity=} may be (as for a backend's own report).
MAX_CAPACITY = 10**9


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StaticBackend:
    """
    A backend the balancer checks by TCP instead of hearing from it.

    @ivar weight: C{None} when not given: the pool's (restored) weight
        stays.
    """

    name: str
    host: str
    port: int
    weight: Optional[int] = None
    capacity: int = DEFAULT_STATIC_CAPACITY
    #: C{"v1"} or C{"v2"}: this backend gets a PROXY header first, over
    #: C{--send-proxy}.
    sendProxy: Optional[str] = None

    def describe(self) -> str:
        """
        The C{--backend} value that gives this backend.
        """
        text = formatHostPort(self.host, self.port)
        if self.name != text:
            text = f"{self.name}={text}"
        if self.weight is not None:
            text += f",weight={self.weight}"
        if self.capacity != DEFAULT_STATIC_CAPACITY:
            text += f",capacity={self.capacity}"
        if self.sendProxy is not None:
            text += f",send-proxy={self.sendProxy}"
        return text


def _weight(text: str) -> int:
    from twistedcluster.core.pool import MAX_WEIGHT, MIN_WEIGHT

    value = _integer(text)
    if not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise ValueError(f"must be {MIN_WEIGHT}..{MAX_WEIGHT}, not {value}")
    return value


def _capacity(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= MAX_CAPACITY:
        raise ValueError(f"must be 1..{MAX_CAPACITY}, not {value}")
    return value


def _sendProxy(text: str) -> str:
    from twistedcluster.wire.proxyheader import checkVersion

    return checkVersion(text)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


#: key -> (the StaticBackend field it sets, what reads its value).
KEYS: Dict[str, Tuple[str, Callable[[str], object]]] = {
    "weight": ("weight", _weight),
    "capacity": ("capacity", _capacity),
    "send-proxy": ("sendProxy", _sendProxy),
}


def checkName(name: str) -> str:
    """
    A backend name as the control channel accepts it; C{ValueError} if not.
    """
    from twistedcluster.balancer.control import validName
    from twistedcluster.wire.commands import InvalidArgument

    try:
        validName(name)
    except InvalidArgument as e:
        raise ValueError(str(e)) from None
    return name


def makeStaticBackend(
    name: str,
    host: str,
    port: int,
    weight: Optional[int] = None,
    capacity: Optional[int] = None,
    sendProxy: Optional[str] = None,
) -> StaticBackend:
    """
    A L{StaticBackend} from values that come from elsewhere (the admin
    channel, the state file), checked as C{--backend} checks its text;
    C{ValueError} says what is wrong.
    """
    host, port = parseHostPort(formatHostPort(str(host), int(port)))
    values: Dict[str, object] = {}
    for key, value in (("weight", weight), ("capacity", capacity), ("send-proxy", sendProxy)):
        if value is not None:
            field, read = KEYS[key]
            try:
                values[field] = read(str(value))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
    return StaticBackend(name=checkName(str(name)), host=host, port=port, **values)


def parseStaticBackend(text: str) -> StaticBackend:
    """
    C{[NAME=]HOST:PORT[,weight=W][,capacity=C][,send-proxy=V]} as a L{StaticBackend}; the
    name is C{HOST:PORT} unless given.  C{ValueError} says what is wrong.
    """
    first, *rest = text.split(",")
    name, sep, address = first.rpartition("=")
    if not sep:
        address = first
    host, port = parseHostPort(address.strip())
    name = checkName(name.strip()) if sep else formatHostPort(host, port)
    values: Dict[str, object] = {}
    for key, value in keyValues(rest, list(KEYS)).items():
        field, read = KEYS[key]
        try:
            values[field] = read(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return StaticBackend(name=name, host=host, port=port, **values)
