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

A NAME that does not end in a dot is looked up as the system's resolver
would (resolver(5)): under each domain of resolv.conf's C{search} (or
C{domain}) line, and as it is, the latter first when it has at least
C{options ndots:N} dots (default 1).  Twisted's own resolver reads
C{search} but never uses it, so this is done here: in Kubernetes, where a
pod's resolv.conf has C{search NAMESPACE.svc.cluster.local svc.cluster.local
cluster.local} and C{ndots:5}, C{srv:_cluster-control._tcp.SERVICE} finds
the Service in the pod's own namespace, whatever the namespace and the
cluster's domain are.
"""

from __future__ import annotations

import socket

import errno
from typing import Dict, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

__all__ = [
    "DEFAULT_RESOLV_CONF",
    "DEFAULT_SRV_INTERVAL",
    "SRVBalancers",
    "isSRV",
    "lookupNames",
    "parseResolvConf",
    "readResolvConf",
    "srvName",
    "systemResolver",
]

DEFAULT_SRV_INTERVAL = 30.0
#: Seconds between lookups that failed channels ask for, at least.
FAILED_LOOKUP_SPACING = 1.0
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
#: resolver(5)'s default C{ndots}, and the most it takes.
DEFAULT_NDOTS = 1
MAX_NDOTS = 15


def isSRV(description: str) -> bool:
    return description.startswith("srv:")


def srvName(description: str) -> str:
    """
    The record's name in C{srv:NAME}, with its final dot if it has one (an
    absolute name, looked up as it is); C{ValueError} unless it names one.
    """
    name = description[len("srv:"):].strip()
    bare = name.rstrip(".")
    if not bare or " " in name or ":" in name or name.endswith(".."):
        raise ValueError(f"expected srv:_SERVICE._tcp.DOMAIN, not {description!r}")
    return bare + "." if name.endswith(".") else bare


def parseResolvConf(text: str) -> Tuple[List[str], int]:
    """
    The search list and C{ndots} of a resolv.conf's text, as resolver(5)
    reads them: the last C{domain} or C{search} line wins; C{options
    ndots:N} (at most 15).
    """
    search: List[str] = []
    ndots = DEFAULT_NDOTS
    for line in text.splitlines():
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        if words[0] == "domain":
            search = words[1:2]
        elif words[0] == "search":
            search = words[1:]
        elif words[0] == "options":
            for option in words[1:]:
                if option.startswith("ndots:"):
                    try:
                        ndots = max(0, min(int(option[len("ndots:"):]), MAX_NDOTS))
                    except ValueError:
                        pass
    return [d.rstrip(".") for d in search if d.rstrip(".")], ndots


def readResolvConf(path: str) -> Tuple[List[str], int]:
    """
    L{parseResolvConf} of the file at C{path}; no search list (and the
    default C{ndots}) when it cannot be read, as the system's resolver.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parseResolvConf(f.read())
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warn("cannot read {path}: {error}; no search domains", path=path, error=e.strerror)
        return [], DEFAULT_NDOTS


def lookupNames(name: str, search: Sequence[str], ndots: int) -> List[str]:
    """
    The names to look C{name} up as, in resolver(5)'s order: a name that
    ends in a dot as it is, and nothing else; one with at least C{ndots}
    dots as it is, then under each search domain; one with fewer under each
    search domain, then as it is.
    """
    if name.endswith("."):
        return [name.rstrip(".")]
    under = [f"{name}.{domain}" for domain in search]
    return [name] + under if name.count(".") >= ndots else under + [name]


def systemResolver(reactor, resolvConf: str = DEFAULT_RESOLV_CONF, servers=None):
    """
    Twisted's resolver chain (L{twisted.names.client.createResolver}'s:
    the hosts file, a cache, then the name servers of C{resolvConf} or
    C{servers}), on C{reactor}.
    """
    from twisted.names import cache, client, hosts, resolve

    return resolve.ResolverChain([
        hosts.Resolver(b"/etc/hosts"),
        cache.CacheResolver(reactor=reactor),
        client.Resolver(resolv=resolvConf, servers=servers, reactor=reactor),
    ])


def _noSuchName():
    from twisted.names import error

    # DomainError itself: Twisted's hosts file and cache, which pass the
    # question on; its subclasses but DNSNameError are a server's failures.
    return (error.DomainError, error.DNSNameError, error.AuthoritativeDomainError)


def _endpointDescription(host: str, port: int) -> str:
    # Twisted has no tcp6: client string; tcp: connects to an IPv6 literal
    # (its colons escaped) over IPv6.
    if ":" in host:
        return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"
    return f"tcp:host={host}:port={port}"


class SRVBalancers(Service):
    """
    Keeps a L{twistedcluster.backend.reporter.LoadReporter}'s balancers
    those that one SRV record names.

    @param resolver: a L{twisted.names} resolver (C{lookupService},
        C{lookupAddress}).
    @param search: the search domains, and C{ndots}, for a C{name} that
        does not end in a dot (L{lookupNames}).
    """

    def __init__(
        self,
        name: str,
        reporter,
        resolver,
        reactor,
        interval: float,
        search: Sequence[str] = (),
        ndots: int = DEFAULT_NDOTS,
    ) -> None:
        self.record = name
        self.names = lookupNames(name, search, ndots)
        #: The name the record was last found as.
        self.foundAs: Optional[str] = None
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
        #: Each target of the last lookup, (name, port): its addresses.
        self._targets: Dict[Tuple[str, int], List[str]] = {}

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

        answers = await self._lookUpRecord()
        targets = []
        for rr in answers:
            if rr.type == dns.SRV and rr.payload.target.name:
                targets.append((rr.payload.target.name.decode("ascii"), rr.payload.port))
        found: List[Tuple[str, int]] = []
        known: Dict[Tuple[str, int], List[str]] = {}
        for target, port in targets:
            try:
                addresses = await self._addresses(target)
            except defer.CancelledError:
                raise
            except Exception as e:
                # One target that cannot be looked up must not cost the
                # others: a name that does not exist is left out; one that
                # could not be asked keeps the addresses it had last.
                from twisted.names.error import DNSNameError

                kept = [] if isinstance(e, DNSNameError) else self._targets.get((target, port), [])
                log.warn(
                    "SRV {name}: cannot look up target {target}: {error}; {outcome}",
                    name=self.record,
                    target=target,
                    error=_dnsErrorText(e),
                    outcome=f"keeping its {len(kept)} address(es)" if kept else "left out",
                )
                addresses = kept
            known[(target, port)] = addresses
            found.extend((a, port) for a in addresses)
        self._targets = known
        return found

    async def _lookUpRecord(self) -> list:
        """
        The SRV answers for the first of L{names} that has some; with none,
        those of the first that exists (none: every balancer is let go);
        L{twisted.names.error.DomainError} when none exists.  Any other
        failure (a timeout, a server failure) ends the search, as the
        system's resolver does: a later name must not stand in for one that
        could not be asked.
        """
        from twisted.names import dns, error

        empty: Optional[list] = None
        missing: Optional[Exception] = None
        for name in self.names:
            try:
                answers, _, _ = await self.resolver.lookupService(name)
            except (error.DomainError, error.AuthoritativeDomainError) as e:
                if type(e) not in _noSuchName():
                    raise
                missing = missing or e
                continue
            if any(rr.type == dns.SRV for rr in answers):
                self._foundAs(name)
                return answers
            empty = answers if empty is None else empty
        if empty is not None:
            return empty
        assert missing is not None
        raise missing

    def _foundAs(self, name: str) -> None:
        if name != self.foundAs and name != self.record:
            log.info("SRV {record} found as {name}", record=self.record, name=name)
        self.foundAs = name

    async def _addresses(self, target: str) -> List[str]:
        import ipaddress

        from twisted.names import dns

        try:
            ipaddress.ip_address(target)
            return [target]
        except ValueError:
            pass
        answers, _, _ = await self.resolver.lookupAddress(target)
        found = [rr.payload.dottedQuad() for rr in answers if rr.type == dns.A]
        if found:
            # IPv4 when there is some: a balancer reached at both of its
            # addresses would be registered with twice.
            return found
        # A target with IPv6 addresses only (an IPv6-only cluster).
        answers, _, _ = await self.resolver.lookupIPV6Address(target)
        return [
            socket.inet_ntop(socket.AF_INET6, rr.payload.address)
            for rr in answers
            if rr.type == dns.AAAA
        ]

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
            error=_dnsErrorText(failure.value),
            n=len(self.current),
        )


def _dnsErrorText(e: BaseException) -> str:
    """
    What a failed DNS query means, for a log line (Twisted's errors carry
    the whole DNS message as their text).
    """
    from twisted.names import error

    for kind, text in (
        (error.DNSNameError, "no such name"),
        (error.DNSQueryTimeoutError, "no answer in time"),
        (error.DNSServerError, "the server failed"),
        (error.DNSQueryRefusedError, "the server refused the query"),
        (error.DomainError, "no such name"),
    ):
        if isinstance(e, kind):
            return text
    text = str(e)
    return text if text and len(text) < 200 else type(e).__name__
