"""
Shared-secret authentication of the control and admin channels.

A backend or an admin proves it holds the balancer's secret without sending
it, and the balancer proves the same back (so a backend does not report to,
and an admin does not trust, an impostor):

    client -> Challenge                      -> server: nonce S (fresh, random)
    client -> Authenticate(nonce C, proof P) -> server checks P = HMAC(secret, "client" | channel | S | C)
    server -> {proof Q}                      -> client checks Q = HMAC(secret, "server" | channel | S | C)

Both nonces are fresh, so a recorded exchange is worth nothing; proofs are
compared in constant time.  Until a channel has authenticated, the balancer
answers nothing but this handshake.

The pure parts (secret files, proofs) are here; the server's side of the
handshake is in L{twistedcluster.wire.guardedamp}, the client's in
L{authenticate}.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from typing import Optional

from twisted.logger import Logger

from twistedcluster.wire import commands

log = Logger()

MIN_SECRET_LENGTH = 16
NONCE_LENGTH = 32
_VERSION = b"twistedcluster-auth-1"


class SecretFileError(ValueError):
    """
    The secret file cannot be used; the message says why and what to do.
    """


def loadSecret(path: str) -> bytes:
    """
    Read a secret file: its bytes, without surrounding white space, at least
    L{MIN_SECRET_LENGTH} of them.  Warns when others may read the file.
    """
    secret = readPrivateFile(path, "secret file").strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise SecretFileError(
            f"secret file {path} holds {len(secret)} bytes; use at least "
            f"{MIN_SECRET_LENGTH}, for example: head -c 32 /dev/urandom | base64 > {path}"
        )
    return secret


def readPrivateFile(path: str, what: str) -> bytes:
    """
    The bytes of a file that holds a secret (C{what}: "secret file",
    "password file"); L{SecretFileError} when it cannot be read.  Warns
    when any user may read it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise SecretFileError(f"cannot read {what} {path}: {e.strerror}") from None
    # Group bits are left alone: a Kubernetes Secret mounted with fsGroup is
    # 0440 by design, and the group is the service's own.
    if mode & stat.S_IRWXO:
        log.warn(
            "{what} {path} may be read by any user; chmod o-rwx it",
            what=what,
            path=path,
        )
    return data


def newNonce() -> bytes:
    return os.urandom(NONCE_LENGTH)


def proof(
    secret: bytes, side: bytes, channel: str, serverNonce: bytes, clientNonce: bytes
) -> bytes:
    """
    HMAC-SHA256 over everything that makes one handshake unique.
    """
    message = b"|".join(
        [_VERSION, side, channel.encode("ascii"), serverNonce, clientNonce]
    )
    return hmac.new(secret, message, hashlib.sha256).digest()


def clientProof(secret: bytes, channel: str, serverNonce: bytes, clientNonce: bytes) -> bytes:
    return proof(secret, b"client", channel, serverNonce, clientNonce)


def serverProof(secret: bytes, channel: str, serverNonce: bytes, clientNonce: bytes) -> bytes:
    return proof(secret, b"server", channel, serverNonce, clientNonce)


def verify(expected: bytes, given: bytes) -> bool:
    """
    Constant-time comparison.
    """
    return hmac.compare_digest(expected, given)


async def authenticate(protocol, secret: Optional[bytes], channel: str) -> None:
    """
    Run the client's side of the handshake on a connected AMP protocol; a
    no-op without a secret.  Raises L{commands.AuthenticationFailed} if either
    side cannot prove it holds the secret.
    """
    if secret is None:
        return
    challenge = await protocol.callRemote(commands.Challenge)
    serverNonce = challenge["nonce"]
    clientNonce = newNonce()
    answer = await protocol.callRemote(
        commands.Authenticate,
        nonce=clientNonce,
        proof=clientProof(secret, channel, serverNonce, clientNonce),
    )
    if not verify(serverProof(secret, channel, serverNonce, clientNonce), answer["proof"]):
        raise commands.AuthenticationFailed(
            "the balancer could not prove it holds the secret: wrong secret, "
            "or not the balancer you meant"
        )
