"""
Balancers found in DNS: ``--balancer srv:_cluster-control._tcp.NAME``.

The SRV record lists every balancer's control port and host; each host's
A records give its addresses, and the backend keeps a control channel to
each (host address, port), as it would to one C{--balancer
tcp:host=...:port=...}.  The record is looked up again every
C{--srv-interval} seconds and soon after a channel to a balancer fails: a
balancer added to the record gets this backend's registration within one
period, and one taken out of it is let go (its channel closed).  A lookup
that fails (no answer, a server failure, no such name) leaves the
balancers as they were: a DNS outage must not cut a backend off.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

__all__ = ["DEFAULT_SRV_INTERVAL", "SRVBalancers", "isSRV", "srvName"]

DEFAULT_SRV_INTERVAL = 30.0
#: Seconds between lookups that failed channels ask for, at least.
FAILED_LOOKUP_SPACING = 1.0


def isSRV(description: str) -> bool:
    return description.startswith("srv:")


def srvName(description: str) -> str:
    """
    The record's name in C{srv:NAME}; C{ValueError} unless it names one.
    """
    name = description[len("srv:"):].strip().rstrip(".")
    if not name or " " in name or ":" in name:
        raise ValueError(f"expected srv:_SERVICE._tcp.DOMAIN, not {description!r}")
    return name


def _endpointDescription(host: str, port: int) -> str:
    if ":" in host:
        return f"tcp6:host={host.replace(':', chr(92) + ':')}:port={port}"
    return f"tcp:host={host}:port={port}"


class SRVBalancers(Service):
    """
    Keeps a L{twistedcluster.backend.reporter.LoadReporter}'s balancers
    those that one SRV record names.

    @param resolver: a L{twisted.names} resolver (C{lookupService},
        C{lookupAddress}).
    """

    def __init__(self, name: str, reporter, resolver, reactor, interval: float) -> None:
        self.record = name
        self.reporter = reporter
        self.resolver = resolver
        self.reactor = reactor
        self.interval = interval
        #: The balancers this record gave: description -> (host, port).
        self.current: Dict[str, Tuple[str, int]] = {}
        self._loop = task.LoopingCall(self.lookUp)
        self._loop.clock = reactor
        self._lookingUp: Optional[defer.Deferred] = None
        self._soon = None
        self._lastLookup = -FAILED_LOOKUP_SPACING

    def startService(self) -> None:
        super().startService()
        self.reporter.onChannelFailed = self._channelFailed
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        if self._lookingUp is not None:
            self._lookingUp.cancel()

    def _channelFailed(self, description: str) -> None:
        if not self.running or (self._soon is not None and self._soon.active()):
            return
        wait = max(0.0, self._lastLookup + FAILED_LOOKUP_SPACING - self.reactor.seconds())
        self._soon = self.reactor.callLater(wait, self.lookUp)

    def lookUp(self) -> Optional[defer.Deferred]:
        """
        Look the record up and follow it; fires when done (never fails).
        """
        if self._lookingUp is not None:
            return None
        self._lastLookup = self.reactor.seconds()
        d = self._lookingUp = defer.ensureDeferred(self._resolve())
        d.addCallbacks(self._follow, self._failed)

        def done(_):
            self._lookingUp = None

        d.addBoth(done)
        return d

    async def _resolve(self) -> List[Tuple[str, int]]:
        from twisted.names import dns

        answers, _, additional = await self.resolver.lookupService(self.record)
        targets = []
        for rr in answers:
            if rr.type == dns.SRV and rr.payload.target.name:
                targets.append((rr.payload.target.name.decode("ascii"), rr.payload.port))
        found: List[Tuple[str, int]] = []
        for target, port in targets:
            addresses = await self._addresses(target)
            found.extend((a, port) for a in addresses)
        return found

    async def _addresses(self, target: str) -> List[str]:
        import ipaddress

        from twisted.names import dns

        try:
            ipaddress.ip_address(target)
            return [target]
        except ValueError:
            pass
        answers, _, _ = await self.resolver.lookupAddress(target)
        return [rr.payload.dottedQuad() for rr in answers if rr.type == dns.A]

    def _follow(self, found: List[Tuple[str, int]]) -> None:
        from twisted.internet.endpoints import clientFromString

        wanted = {_endpointDescription(h, p): (h, p) for h, p in found}
        for description in sorted(set(wanted) - set(self.current)):
            log.info(
                "balancer {balancer} found in SRV {name}", balancer=description, name=self.record
            )
            self.reporter.addBalancer(description, clientFromString(self.reactor, description))
        for description in sorted(set(self.current) - set(wanted)):
            log.info(
                "balancer {balancer} no longer in SRV {name}: let go",
                balancer=description,
                name=self.record,
            )
            self.reporter.removeBalancer(description)
        self.current = wanted

    def _failed(self, failure) -> None:
        if failure.check(defer.CancelledError):
            return
        log.warn(
            "cannot look up SRV {name}: {error}; keeping {n} balancer(s)",
            name=self.record,
            error=failure.getErrorMessage() or failure.type.__name__,
            n=len(self.current),
        )
