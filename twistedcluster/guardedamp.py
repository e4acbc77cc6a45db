"""
AMP that survives a hostile or broken peer: the base of the balancer's control
and admin protocols.

Plain AMP raises out of C{dataReceived} on some malformed boxes (Twisted then
logs an unhandled error and drops the connection), drops silently on others,
and lets one box grow without bound.  Here every such case closes that one
connection, with one log line naming the peer, and nothing else is affected.
"""

from twisted.logger import Logger
from twisted.protocols import amp

#: A box with more keys than this is refused: no command of ours has half as
#: many, and an unbounded box is unbounded memory.
MAX_KEYS_PER_BOX = 64


class GuardedAMP(amp.AMP):
    """
    An AMP protocol that logs and drops a peer speaking malformed AMP, and
    logs commands it does not know (the peer gets AMP's UNHANDLED error).
    """

    log = Logger()

    #: Names this protocol in its log lines, e.g. "control" or "admin".
    channel = "amp"

    _keysInBox = 0

    def peerText(self) -> str:
        transport = self.transport
        if transport is None:
            return "?"
        try:
            peer = transport.getPeer()
        except Exception:
            return "?"
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        if host is not None and port is not None:
            return f"{host}:{port}"
        return str(getattr(peer, "name", None) or peer)

    def makeConnection(self, transport) -> None:
        # AMP logs every connection at info level; our protocols log what
        # matters (a registration, an admin change) with names instead.
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        except Exception as e:
            self._refuse(f"malformed AMP box ({type(e).__name__}: {e})")

    def proto_value(self, string):
        self._keysInBox += 1
        if self._keysInBox > MAX_KEYS_PER_BOX:
            self._refuse(f"AMP box with more than {MAX_KEYS_PER_BOX} keys")
            # Stay in a harmless state until the transport closes.
            return "value"
        return super().proto_value(string)

    def proto_key(self, string):
        if not string:
            self._keysInBox = 0
        return super().proto_key(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self._refuse(f"AMP key or value of {length} bytes, too long")
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
