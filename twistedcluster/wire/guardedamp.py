"""
AMP that survives a hostile or broken peer: the base of the balancer's control
and admin protocols (and of the backend's end of the control channel).

Plain AMP raises out of C{dataReceived} on some malformed boxes (Twisted then
logs an unhandled error and drops the connection), drops silently on others,
and lets one box grow without bound.  Here every such case closes that one
connection, with one log line naming the peer, and nothing else is affected.

On the balancer's listeners L{GuardedFactory} adds what a server exposed to
strangers needs: a cap on open connections and, with a shared secret, the
server's side of the L{twistedcluster.wire.auth} handshake — nothing but the
handshake is answered until it succeeds.

A connection is I{admitted} once it has done what a stranger must do first:
prove the secret when there is one and, on the control listener, register.
Until then it must hurry (it is closed after the factory's C{authTimeout})
and be brief (short values, few bytes in all), and when the listener is full
the oldest connection not yet admitted makes room for a new one.  So idle or
half-sent connections can neither hold the listener for ever nor hold much
memory, with or without a secret.
"""

from __future__ import annotations

from typing import Dict, Optional, Set

from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.protocols import amp

from twistedcluster.wire import auth

from twistedcluster.wire import commands
from twistedcluster.fast.internals import AMP_VALUE_STATE, connectAMPQuietly
from twistedcluster.fast.transports import peerText, unsentBytes
from twistedcluster.address import addressText
from twistedcluster.summary import Summary, tellClosings


#: A box with more keys than this is refused: no command of ours has half as
#: many, and an unbounded box is unbounded memory.
MAX_KEYS_PER_BOX = 64
#: Before a peer is admitted, a value may be this long at most (the
#: handshake's are 32 bytes, a registration's under 1 KiB), so strangers
#: cannot make us hold megabytes.
MAX_VALUE_BEFORE_AUTH = 1024
#: ... and everything it sends, together, this long: a handshake and a
#: registration with room to spare.
MAX_BYTES_BEFORE_ADMISSION = 16 * 1024
#: One box received on a listener may be this large at most, keys, values
#: and length prefixes counted (no command of ours comes near 1 KiB):
#: without it, 64 keys of 64 KiB make a 4 MiB box.
MAX_BOX_BYTES = 16 * 1024
#: A peer that leaves this much of our answers unread is closed: it could
#: otherwise grow our write buffer without end by asking and never reading.
MAX_UNREAD_ANSWERS = 1024 * 1024

DEFAULT_AUTH_TIMEOUT = 5.0

_HANDSHAKE = {commands.Challenge.commandName, commands.Authenticate.commandName}

#: What parsing a peer's malformed arguments raises.
_MALFORMED = (ValueError, TypeError, KeyError, OverflowError, amp.TooLong)


class GuardedAMP(amp.AMP):
    """
    An AMP protocol that logs and drops a peer speaking malformed AMP, and
    logs commands it does not know (the peer gets AMP's UNHANDLED error).

    Served by a L{GuardedFactory}, it also enforces the factory's secret.
    """

    log = Logger()

    #: Names this protocol in its log lines and its authentication proofs:
    #: "control" or "admin".
    channel = "amp"
    #: Channels a peer may have meant instead of this one, each with what a
    #: peer that proves the secret for it is told (it holds the secret, so
    #: it learns nothing it could not ask): where it is, where to go.
    misdirected: Dict[str, str] = {}

    #: The listener's factory, when served by one (not on the client side).
    guard: Optional["GuardedFactory"] = None
    authenticated = False
    #: What a peer that is not admitted in time failed to do, for the log.
    admissionStep = "authenticate"
    _keysInBox = 0
    _boxBytes = 0
    _bytesBeforeAdmission = 0
    _admissionTimer = None
    _serverNonce: Optional[bytes] = None

    # -- who is on the other end ------------------------------------------

    def peerText(self) -> str:
        return peerText(self.transport)

    @property
    def _secret(self) -> Optional[bytes]:
        return self.guard.secret if self.guard is not None else None

    # -- connection ----------------------------------------------------------

    def makeConnection(self, transport) -> None:
        # AMP logs every connection at info level; our protocols log what
        # matters (a registration, an admin change) with names instead.
        connectAMPQuietly(self, transport)
        guard = self.guard
        if guard is not None:
            guard.open.add(self)
            if not self.admitted():
                self._awaitAdmission()

    def connectionLost(self, reason) -> None:
        self._cancelAdmissionTimer()
        if self.guard is not None:
            self.guard.open.discard(self)
            self.guard.waiting.pop(self, None)
        amp.BinaryBoxProtocol.connectionLost(self, reason)

    # -- admission -------------------------------------------------------

    def admitted(self) -> bool:
        """
        Whether this peer has done what strangers must do first: here,
        prove the secret if there is one.  Subclasses may ask for more.
        """
        return self._secret is None or self.authenticated

    def _awaitAdmission(self) -> None:
        """
        (Re)start the clock for a peer that is not admitted.
        """
        guard = self.guard
        self._cancelAdmissionTimer()
        self._bytesBeforeAdmission = 0
        guard.waiting[self] = None
        self._admissionTimer = guard.clock.callLater(
            guard.authTimeout, self._admissionTimedOut
        )

    def _admit(self) -> None:
        """
        Call when this peer may have become admitted.
        """
        if self.guard is not None and self.admitted():
            self._cancelAdmissionTimer()
            self.guard.waiting.pop(self, None)

    def _cancelAdmissionTimer(self) -> None:
        if self._admissionTimer is not None and self._admissionTimer.active():
            self._admissionTimer.cancel()
        self._admissionTimer = None

    # -- parsing, defensively ---------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.guard is not None and self in self.guard.waiting:
            self._bytesBeforeAdmission += len(data)
            if self._bytesBeforeAdmission > MAX_BYTES_BEFORE_ADMISSION:
                return self._refuse(
                    f"more than {MAX_BYTES_BEFORE_ADMISSION} bytes before it "
                    f"{self._missingStep()}s"
                )
        try:
            super().dataReceived(data)
        except Exception as e:
            self._refuse(f"malformed AMP box ({type(e).__name__}: {e})")

    # proto_value and proto_key are AMP's parser states (what Twisted means
    # by them: twistedcluster.fast.internals, whose canary checks it).

    def proto_value(self, string):
        self._keysInBox += 1
        self._boxBytes += 2 + len(string)
        if self._keysInBox > MAX_KEYS_PER_BOX:
            self._refuse(f"AMP box with more than {MAX_KEYS_PER_BOX} keys")
            # Stay in a harmless state until the transport closes.
            return AMP_VALUE_STATE
        return super().proto_value(string)

    def proto_key(self, string):
        if string:
            self._boxBytes += 2 + len(string)
        else:
            self._keysInBox = self._boxBytes = 0
        state = super().proto_key(string)
        if state == AMP_VALUE_STATE and self.guard is not None:
            # The value being read counts against the box before it is
            # buffered: its length prefix alone can be refused.
            room = max(0, MAX_BOX_BYTES - self._boxBytes - 2)
            if not self.admitted():
                room = min(room, MAX_VALUE_BEFORE_AUTH)
            self.MAX_LENGTH = min(self.MAX_LENGTH, room)
        return state

    def lengthLimitExceeded(self, length: int) -> None:
        self._refuse(
            f"AMP key or value of {length} bytes, too long (at most "
            f"{self.MAX_LENGTH} here; a box at most {MAX_BOX_BYTES})"
        )
        super().lengthLimitExceeded(length)

    def locateResponder(self, name: bytes):
        responder = super().locateResponder(name)
        if responder is None:
            self.log.warn(
                "{channel} channel: unknown command {command!r} from {peer}",
                channel=self.channel,
                command=name,
                peer=self.peerText(),
            )
        return responder

    def dispatchCommand(self, box):
        d = super().dispatchCommand(box)
        return d.addErrback(self._badRequest, box)

    def _badRequest(self, failure, box):
        """
        A command whose arguments do not parse (a peer's fault, not ours):
        answer with a clear error and close, instead of AMP's logged
        traceback.  Anything else is a bug and stays loud.
        """
        if failure.check(amp.RemoteAmpError) or not failure.check(*_MALFORMED):
            return failure
        why = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self.log.warn(
            "{channel} channel: malformed {command!r} from {peer} ({why}); closing",
            channel=self.channel,
            command=box.get(amp.COMMAND),
            peer=self.peerText(),
            why=why,
        )
        return Failure(
            amp.RemoteAmpError(
                b"BAD_REQUEST", f"malformed arguments: {why}"[:1000], fatal=True
            )
        )

    def unhandledError(self, failure) -> None:
        # The end of the line for an error nobody handled: a box that needs no
        # answer failed, or an answer matched no question.  Close this peer.
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            # One line: AMP's own errors carry a traceback's text after it.
            message = (failure.getErrorMessage().splitlines() or [""])[0]
            self.log.warn(
                "{channel} channel: closing connection from {peer}: {why}",
                channel=self.channel,
                peer=self.peerText(),
                why=f"{failure.type.__name__}: {message}",
            )
            self.transport.abortConnection()

    # -- authentication (server side) -------------------------------------

    def ampBoxReceived(self, box) -> None:
        if self.guard is not None and unsentBytes(self.transport) > MAX_UNREAD_ANSWERS:
            return self._refuse(
                f"more than {MAX_UNREAD_ANSWERS} bytes of answers left unread"
            )
        if (
            self._secret is not None
            and not self.authenticated
            and amp.COMMAND in box
            and box[amp.COMMAND] not in _HANDSHAKE
        ):
            return self._refuseUnauthenticated(box)
        if self.shortcut(box):
            return
        super().ampBoxReceived(box)

    def shortcut(self, box) -> bool:
        """
        Handle C{box} without AMP's dispatch, and say so (C{True}); C{False}
        leaves it to AMP.  For a subclass's one hot one-way command: the
        dispatch's Deferreds and argument parser cost more than most such
        commands' own work.  Called once the box passed this class's checks.
        """
        return False

    def _refuseUnauthenticated(self, box) -> None:
        self.log.warn(
            "{channel} channel: {command!r} from {peer} before authenticating; "
            "closing",
            channel=self.channel,
            command=box[amp.COMMAND],
            peer=self.peerText(),
        )
        if amp.ASK in box:
            self._safeEmit(
                amp.AmpBox(
                    _error=box[amp.ASK],
                    _error_code=b"NOT_AUTHENTICATED",
                    _error_description=(
                        b"this balancer requires authentication with its shared "
                        b"secret (--secret-file)"
                    ),
                )
            )
        self.paused = True
        self.transport.loseConnection()

    @commands.Challenge.responder
    def _challenge(self):
        self._serverNonce = auth.newNonce()
        return {"nonce": self._serverNonce}

    @commands.Authenticate.responder
    def _authenticate(self, nonce, proof):
        secret = self._secret
        serverNonce, self._serverNonce = self._serverNonce, None
        if secret is None:
            # Without a secret we cannot prove anything back; a client that
            # wants proof must not be told it got one.
            raise commands.AuthenticationFailed(
                "this balancer has no shared secret configured"
            )
        # A proof can only be checked against a nonce this side gave, and
        # a nonce of the right length from the peer.
        checkable = serverNonce is not None and len(nonce) == auth.NONCE_LENGTH
        if not checkable or not auth.verify(
            auth.clientProof(secret, self.channel, serverNonce, nonce), proof
        ):
            self.paused = True
            self.guard.clock.callLater(0, self._close)
            other = self._meant(secret, serverNonce, nonce, proof) if checkable else None
            if other is not None:
                # It holds the secret, for the other listener: say which
                # this is (it learns nothing it could not have asked for).
                self.log.warn(
                    "{channel} channel: {peer} proved the secret for the {other} "
                    "channel, not this one: pointed at the wrong listener; closing",
                    channel=self.channel,
                    peer=self.peerText(),
                    other=other,
                )
                raise commands.AuthenticationFailed(self.misdirected[other])
            self.log.warn(
                "{channel} channel: authentication failed from {peer}; closing",
                channel=self.channel,
                peer=self.peerText(),
            )
            raise commands.AuthenticationFailed("authentication failed: wrong secret")
        self.authenticated = True
        self._admit()
        return {"proof": auth.serverProof(secret, self.channel, serverNonce, nonce)}

    def _meant(self, secret: bytes, serverNonce: bytes, nonce: bytes, proof: bytes) -> Optional[str]:
        """
        The channel of L{misdirected} that C{proof} proves the secret for,
        or C{None}.
        """
        for other in self.misdirected:
            if auth.verify(auth.clientProof(secret, other, serverNonce, nonce), proof):
                return other
        return None

    def _missingStep(self) -> str:
        """
        What this peer has yet to do to be admitted: a verb.
        """
        if self._secret is not None and not self.authenticated:
            return "authenticate"
        return self.admissionStep

    def _admissionTimedOut(self) -> None:
        self._admissionTimer = None
        if not self.admitted():
            self.log.warn(
                "{channel} channel: {peer} did not {step} within {timeout} s; "
                "closing",
                channel=self.channel,
                peer=self.peerText(),
                step=self._missingStep(),
                timeout=self.guard.authTimeout,
            )
            self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        if self.transport is not None:
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    def _refuse(self, why: str) -> None:
        # Parse nothing more from this peer, even what is already buffered.
        self.paused = True
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        self.log.warn(
            "{channel} channel: closing connection from {peer}: {why}",
            channel=self.channel,
            peer=self.peerText(),
            why=why,
        )
        self.transport.abortConnection()


class GuardedFactory(Factory):
    """
    Base factory of the balancer's control and admin listeners.

    @param secret: the shared secret peers must prove, or C{None}.
    @param maxConnections: connections beyond this many are closed at once,
        unless one that is not admitted yet can make room.
    @param authTimeout: seconds a peer has to be admitted (authenticate, and
        on the control listener register).
    @ivar open: the connections open now.
    @ivar waiting: the open connections not admitted yet, oldest first.
    """

    noisy = False
    channel = "amp"
    log = Logger()

    def __init__(
        self,
        clock,
        secret: Optional[bytes] = None,
        maxConnections: int = 1024,
        authTimeout: float = DEFAULT_AUTH_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.secret = secret
        self.maxConnections = maxConnections
        self.authTimeout = authTimeout
        self.open: Set[GuardedAMP] = set()
        self.waiting: Dict[GuardedAMP, None] = {}
        # A flood of connections is one line a second, not one each.
        self._refusals = Summary(clock, self._tellRefusals)

    def buildProtocol(self, addr):
        if len(self.open) >= self.maxConnections and self.waiting:
            self._evictOldestWaiting(addr)
        if len(self.open) >= self.maxConnections:
            self._evictIdle(addr)
        if len(self.open) >= self.maxConnections:
            self._refusals.count(
                "refused", example=(addressText(addr), f"{self.maxConnections} connections open")
            )
            return None
        p = self.makeProtocol()
        p.factory = p.guard = self
        return p

    def _evictIdle(self, addr) -> None:
        """
        Make room for a new peer among the admitted ones, if this listener
        may (the admin listener: an operator is not locked out by
        connections left idle); nothing here.
        """

    def _tellRefusals(self, counts: Dict[str, int], seconds: float) -> None:
        tellClosings(self.log, self.channel, self._refusals, counts, seconds)

    def stopFactory(self) -> None:
        self._refusals.stop()

    def _evictOldestWaiting(self, addr) -> None:
        """
        Make room for a new peer: strangers that never introduce themselves
        must not keep a restarted backend out.
        """
        oldest = next(iter(self.waiting))
        self._evict(oldest, f"the oldest connection yet to {oldest._missingStep()}", addr)

    def _evict(self, victim: GuardedAMP, why: str, addr) -> None:
        """
        Close C{victim} to let the peer at C{addr} in (C{why}: what made it
        the one), told in the summed line.
        """
        self.open.discard(victim)
        self.waiting.pop(victim, None)
        self._refusals.count(
            "evicted",
            example=(
                victim.peerText(),
                f"listener full ({self.maxConnections} connections), {why}, to let "
                f"{addressText(addr)} in",
            ),
        )
        victim._cancelAdmissionTimer()
        victim._close(abort=True)

    def makeProtocol(self) -> GuardedAMP:
        raise NotImplementedError()
