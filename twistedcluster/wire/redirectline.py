"""
The redirect answer: the one line a balancer's redirect listener writes to a
client, and the contract between that listener (L{twistedcluster.balancer.redirect})
and its clients (L{twistedcluster.client.redirectclient}, ``cluster-connect``).

    HOST PORT\\r\\n      the backend to connect to
    ERROR CODE\\r\\n     no backend; the listener's only CODE is ``no-backend``

L{answerLine} and L{NO_BACKEND} write it; L{parseLine} reads it.  Pure: no
I/O.
"""

from __future__ import annotations

from typing import Tuple

from twistedcluster.address import validHost

__all__ = [
    "ErrorAnswer",
    "MAX_ANSWER_LENGTH",
    "NO_BACKEND",
    "NO_BACKEND_CODE",
    "answerLine",
    "errorLine",
    "errorText",
    "hostPortText",
    "parseLine",
]

#: The longest answer line accepted, terminator included.  A real answer is
#: under 300 bytes (a 253-byte host name, a space, 5 digits, CRLF).
MAX_ANSWER_LENGTH = 1024

#: The code of the answer that says the balancer has no backend to offer.
NO_BACKEND_CODE = "no-backend"

_ERROR = "ERROR"
_END = b"\r\n"


class ErrorAnswer(Exception):
    """
    The balancer answered ``ERROR CODE``.

    @ivar code: the CODE.
    """

    def __init__(self, code: str) -> None:
        super().__init__(errorText(code))
        self.code = code


def hostPortText(host: str, port: int) -> str:
    """
    ``HOST PORT``: an answer without its line end.
    """
    return f"{host} {port}"


def errorText(code: str) -> str:
    """
    ``ERROR CODE``: an error answer without its line end.
    """
    return f"{_ERROR} {code}"


def answerLine(host: str, port: int) -> bytes:
    """
    The answer naming a backend; C{ValueError} for a host that is not an IP
    address or a host name (it could end the line early).
    """
    if not validHost(host):
        raise ValueError(f"{host!r} is not a valid host")
    return hostPortText(host, port).encode("ascii") + _END


def errorLine(code: str) -> bytes:
    """
    The answer saying there is no backend, and why.
    """
    return errorText(code).encode("ascii") + _END


#: The answer when no backend is available.
NO_BACKEND = errorLine(NO_BACKEND_CODE)


def parseLine(line: bytes) -> Tuple[str, int]:
    """
    Parse one answer, with or without its line end, into C{(host, port)}.

    Strict, since anything else means the peer is not a redirect listener:
    exactly ``HOST PORT``, one space, HOST an IPv4 or IPv6 literal (no
    brackets) or a DNS name, PORT decimal digits in 1..65535.

    @raise ErrorAnswer: for ``ERROR CODE``.
    @raise ValueError: for anything else, saying what is wrong.
    """
    if len(line) > MAX_ANSWER_LENGTH:
        raise ValueError(
            f"answer of {len(line)} bytes is longer than {MAX_ANSWER_LENGTH}: "
            f"{line[:40]!r}..."
        )
    if line.endswith(_END):
        line = line[: -len(_END)]
    elif line.endswith(b"\n"):
        line = line[:-1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"answer is not ASCII: {line[:80]!r}") from None
    if not text.isprintable():
        raise ValueError(f"answer has control characters: {line[:80]!r}")
    if text.startswith(_ERROR):
        code = text[len(_ERROR) :]
        if not code.startswith(" ") or not code.strip() or " " in code.strip():
            raise ValueError(f"malformed error answer: {line[:80]!r}")
        raise ErrorAnswer(code.strip())
    parts = text.split(" ")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"answer is not 'HOST PORT': {line[:80]!r}")
    host, portText = parts
    if not validHost(host):
        raise ValueError(f"answer names no valid host: {line[:80]!r}")
    if not (portText.isdigit() and len(portText) <= 5):
        raise ValueError(f"answer's port is not a number: {line[:80]!r}")
    port = int(portText)
    if not 0 < port < 65536:
        raise ValueError(f"answer's port is out of range 1..65535: {line[:80]!r}")
    return host, port
