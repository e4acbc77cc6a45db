"""
Routing policies: which eligible backend gets the next connection.

Pure functions of a pool snapshot (a sequence of L{BackendStatus}) and a
random source.  Round-robin keeps a cursor, so every policy is an object with
one method, C{choose}; the others are stateless (p2c and hash keep caches,
never anything that changes what they choose).

A policy whose C{keyed} attribute is true (hash) also takes the client's key,
C{choose(candidates, rng, key)}; the cluster passes it only to such a policy,
and callers work the key out only then (L{Cluster.keyed}).

L{twistedcluster.core.cluster.Cluster.pick} hands a policy the pool's live
L{twistedcluster.core.pool.Candidates} (in no particular order); least-load,
least-conn and round-robin then ask its index (L{Candidates.lowest}) for the
lowest score instead of scanning every backend, so a pick costs about
log(backends).  Given any other sequence they scan it, as before.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_left, insort
from fractions import Fraction
from hashlib import blake2b
from itertools import chain, islice
from operator import attrgetter
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set

from twistedcluster.core.pool import RAMP_STEPS, BackendStatus

__all__ = [
    "DEFAULT_HASH_BALANCE",
    "DEFAULT_POLICY",
    "BoundedHash",
    "LeastConn",
    "LeastLoad",
    "POLICIES",
    "PowerOfTwo",
    "RING_POINTS_PER_WEIGHT",
    "RoundRobin",
    "UnknownPolicy",
    "checkHashBalance",
    "estimatedLoad",
    "expectedLoad",
    "relayedLoad",
    "makePolicy",
]


class UnknownPolicy(ValueError):
    """
    No policy has that name.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}"
        )
        self.name = name


def _lowest(
    candidates: Sequence[BackendStatus],
    score: Callable[[BackendStatus], float],
    rng: random.Random,
) -> Optional[BackendStatus]:
    """
    The candidate with the lowest score, ties broken at random so that
    balancers that see the same reports do not all pick the same backend.
    """
    if len(candidates) == 1:  # the common small case, without the lists
        only = candidates[0]
        return only if only.weight > 0 else None
    usable = [c for c in candidates if c.weight > 0]
    if not usable:
        return None
    scores = list(map(score, usable))
    low = min(scores) + 1e-12
    best = [c for c, s in zip(usable, scores) if s <= low]
    if len(best) == 1:
        return best[0]
    return best[rng.randrange(len(best))]


def estimatedLoad(b: BackendStatus) -> float:
    """
    The backend's load as this balancer can best tell: its last report, plus
    what this balancer has added to it that the report had not seen, never
    less than what this balancer relays to it now; each connection at the
    backend's cost (the seconds it measured, else 1/capacity); per unit
    weight.
    """
    cost = b.cost
    return max(b.load + b.addedSinceReport * cost, b.active * cost, 0.0) / b.weight


def expectedLoad(b: BackendStatus) -> float:
    """
    What least-load routes on: L{estimatedLoad} with the new connection
    added, at the backend's cost, per unit weight.

    Counting the new connection makes it least expected delay: an idle
    backend that takes 8 ms a connection scores 8 ms, not 0, so it loses to
    one that takes 2 ms with two connections queued (least-conn, and
    HAProxy's leastconn, would pick the idle one).  Between backends of the
    same cost it changes nothing.
    """
    cost = b.cost
    return (max(b.load + b.addedSinceReport * cost, b.active * cost, 0.0) + cost) / b.weight


def relayedLoad(b: BackendStatus) -> float:
    """
    The connections this balancer relays to the backend, per unit weight:
    what least-conn sees.
    """
    return b.active / b.weight


# What least-load and least-conn route on: the load per unit of the weight
# a backend takes now (slow start ramps a backend that came up from a
# small share of its weight to all of it, BackendStatus.ramp).


def _rampedLoad(b: BackendStatus) -> float:
    return estimatedLoad(b) / b.ramp


def _rampedExpected(b: BackendStatus) -> float:
    return expectedLoad(b) / b.ramp


def _rampedRelayed(b: BackendStatus) -> float:
    return relayedLoad(b) / b.ramp


class LeastLoad:
    """
    Route to the backend with the lowest load once it has the new connection
    (L{expectedLoad}; the default).

    Reports are always a little stale; adding what this balancer routed since
    the last report keeps a burst of new connections from all landing on the
    backend that looked idle a second ago.  Each connection counts at what
    it costs that backend, so a slower backend gets fewer.
    """

    name = "least-load"

    def choose(
        self, candidates: Sequence[BackendStatus], rng: random.Random
    ) -> Optional[BackendStatus]:
        indexed = getattr(candidates, "lowest", None)
        if indexed is not None:
            return indexed(_rampedExpected, rng)
        return _lowest(candidates, _rampedExpected, rng)


class LeastConn:
    """
    Route to the backend with the fewest connections relayed by this
    balancer, per unit weight (HAProxy's leastconn).  Ignores reports, so it
    suits backends shared with nobody else, or static ones.
    """

    name = "least-conn"

    def choose(
        self, candidates: Sequence[BackendStatus], rng: random.Random
    ) -> Optional[BackendStatus]:
        indexed = getattr(candidates, "lowest", None)
        if indexed is not None:
            return indexed(_rampedRelayed, rng)
        return _lowest(candidates, _rampedRelayed, rng)


class RoundRobin:
    """
    Smooth weighted round-robin: each backend in turn, in proportion to its
    weight, interleaved (weights 5,1,1 give a a b a c a a, not a a a a a b c).

    On the pool's L{Candidates} it is stride scheduling instead (the same
    shares, in log(backends) per pick): each backend has a pass, the
    lowest pass is chosen and moves on by 1/weight (the weight it takes now,
    slow start's share of it); a backend that joins (or comes back) starts
    at the pass of the last one chosen; when its weight changes, what it
    still had to wait is scaled to the new one; ties go in name order.
    Over whole
    rounds of sum(weights) picks each backend gets its weight's share to
    within one.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._current: Dict[str, float] = {}
        #: Stride scheduling on an index: each backend's pass, and the
        #: pass of the last one chosen.
        self._pass: Dict[str, float] = {}
        self._now = 0.0
        #: The weight each pass was moved on with.
        self._strideWeight: Dict[str, float] = {}
        #: The index's score function, bound once: the pool finds its index
        #: by it, and a bound method made anew each pick is hashed and
        #: compared field by field there.
        self._score = self._passOf

    def _passOf(self, b: BackendStatus) -> float:
        passes = self._pass
        name = b.name
        now = self._now
        p = passes.get(name)
        if p is None or p < now:
            p = passes[name] = now
        elif p > now:
            weight = b.weight * b.ramp
            old = self._strideWeight.get(name, weight)
            if old != weight and weight > 0:
                # Reweighted (or ramped up) while waiting its turn: the
                # rest of the wait at the new weight, not at the old.
                p = passes[name] = now + (p - now) * old / weight
                self._strideWeight[name] = weight
        return p

    def choose(
        self, candidates: Sequence[BackendStatus], rng: random.Random
    ) -> Optional[BackendStatus]:
        indexed = getattr(candidates, "lowest", None)
        if indexed is not None:
            return self._stride(candidates, indexed, rng)
        if not candidates:
            return None
        current = self._current
        names = {c.name for c in candidates}
        for gone in [n for n in current if n not in names]:
            del current[gone]
        total = 0
        best: Optional[BackendStatus] = None
        for c in candidates:
            if c.weight <= 0:
                continue
            weight = c.weight * c.ramp
            value = current.get(c.name, 0) + weight
            current[c.name] = value
            total += weight
            if best is None or value > current[best.name]:
                best = c
        if best is None:
            return None
        current[best.name] -= total
        return best

    def _stride(self, candidates, indexed, rng: random.Random) -> Optional[BackendStatus]:
        score = self._score
        chosen = indexed(score, rng, randomTies=False)  # name order, as ever
        if chosen is None:
            return None
        passes = self._pass
        self._now = now = passes.get(chosen.name, self._now)
        weight = chosen.weight * chosen.ramp
        passes[chosen.name] = now + 1.0 / weight
        self._strideWeight[chosen.name] = weight
        candidates.rescore(score, chosen.name)
        if len(passes) > 2 * len(candidates) + 64:
            # Forget the passes of backends no longer eligible.
            self._pass = {n: p for n, p in passes.items() if candidates.get(n) is not None}
            self._strideWeight = {n: w for n, w in self._strideWeight.items() if n in self._pass}
        return chosen


class PowerOfTwo:
    """
    Power of two choices: draw two distinct backends at random, in
    proportion to their weights (slow start's share of them), and route to
    the one with the lower estimated load per that weight; with two
    candidates, the lower of the two; with one, it.

    Nearly as even as least-load, at a cost that does not grow with the
    number of backends, and the answer to herding across several balancers:
    each balancer draws its own pairs, so a backend that looks idle to all of
    them is not the only one any of them picks.
    """

    name = "p2c"

    #: Draws tried before falling back to an exact draw over every candidate
    #: (when weights are very uneven, or every weight is 0).
    _TRIES = 32

    def __init__(self) -> None:
        # The heaviest weight seen, bounding the rejection draw; learnt as
        # heavier ones are seen, re-learnt by the exact draw.
        self._maxWeight = 1

    def choose(
        self, candidates: Sequence[BackendStatus], rng: random.Random
    ) -> Optional[BackendStatus]:
        if len(candidates) <= 2:
            return _lowest(candidates, _rampedLoad, rng)
        first = self._draw(candidates, rng, None)
        if first is None:
            return None
        second = self._draw(candidates, rng, first)
        if second is None:
            return first
        # _rampedLoad of each, inline: this is the whole of a pick's work.
        if estimatedLoad(first) / first.ramp <= estimatedLoad(second) / second.ramp:
            return first
        return second

    def _draw(
        self,
        candidates: Sequence[BackendStatus],
        rng: random.Random,
        other: Optional[BackendStatus],
    ) -> Optional[BackendStatus]:
        """
        One candidate other than C{other}, at random in proportion to its
        weight: by rejection (uniform index, kept with probability
        weight / heaviest weight), else exactly over them all.
        """
        n = len(candidates)
        draw = rng.random
        top = self._maxWeight
        for _ in range(self._TRIES):
            c = candidates[int(draw() * n)]
            w = c.weight * c.ramp
            if w > top:
                self._maxWeight = top = w
            if c is not other and w > 0 and (w >= top or draw() * top < w):
                return c
        self._maxWeight = max(1, max(c.weight for c in candidates))
        usable = [c for c in candidates if c.weight > 0 and c is not other]
        if not usable:
            return None
        return rng.choices(usable, [c.weight * c.ramp for c in usable])[0]


#: Ring points per unit of weight, in blocks of 8 (one hash gives 8 points).
RING_POINTS_PER_WEIGHT = 128
#: The default bound: no backend above 1.25 x the mean load (HAProxy's
#: ``hash-balance-factor 125``).
DEFAULT_HASH_BALANCE = 1.25

_POINT_BITS = 40
_POINT_MASK = (1 << _POINT_BITS) - 1
_INDEX_BITS = 24  # a ring entry is (point << 24) | the index of its backend
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_BUCKET_SIZE = 64  # ring entries per bucket, about (up to 4x between rebuilds)
_MAX_BUCKET_BITS = 16
_BLOCK = 8


def _entries(values: Iterable[int] = ()) -> "array[int]":
    """
    A bucket of ring entries: 64-bit integers side by side in an array (8
    bytes each, not a pointer to an integer object elsewhere in memory), so
    the few a pick reads share cache lines: at 10,000 backends the ring has
    1.3 million entries.
    """
    return array("Q", values)
#: Ring entries a pick walks past at most: beyond, few of the ring's backends
#: are candidates (or under their bound), and it takes the least loaded.
_MAX_WALK = 1024


_nameOf = attrgetter("name")
_weightOf = attrgetter("weight")
_connectionsOf = attrgetter("estimatedConnections")


def _units(b: BackendStatus) -> int:
    """
    A backend's weight in units of 1/RAMP_STEPS, slow start's share
    included: exact integers for the hash policy's bound.
    """
    ramp = b.ramp
    return b.weight * (RAMP_STEPS if ramp == 1.0 else round(ramp * RAMP_STEPS))


def _connectionsPerUnit(b: BackendStatus) -> float:
    return b.estimatedConnections / _units(b)


def checkHashBalance(factor: float) -> float:
    """
    C{factor}, if it may bound hash's load: 0 (no bound) or at least 1;
    else C{ValueError}.
    """
    factor = float(factor)
    if not (factor == 0 or 1 <= factor < float("inf")):
        raise ValueError(f"hash balance factor must be 0 (no bound) or >= 1, not {factor}")
    return factor


checkHashBalance.coerceDoc = "0 (no bound) or at least 1."  # type: ignore[attr-defined]


def _ringPoints(name: str, weight: int, fromWeight: int = 0) -> List[int]:
    """
    Where a backend sits on the ring: L{RING_POINTS_PER_WEIGHT} points per
    unit of weight, from blake2b of its name and block number (stable across
    processes and balancers, unlike C{hash()}).  A heavier weight keeps the
    lighter one's points and adds more, so a weight change moves only the
    keys it must: C{fromWeight} leaves out the points of that weight.
    """
    out: List[int] = []
    perBlock = RING_POINTS_PER_WEIGHT // _BLOCK
    for block in range(perBlock * fromWeight, perBlock * weight):
        x = int.from_bytes(
            blake2b(f"{name}#{block}".encode(), digest_size=5 * _BLOCK).digest(), "big"
        )
        out.extend((x >> (_POINT_BITS * k)) & _POINT_MASK for k in range(_BLOCK))
    return out


def _keyPoint(key: str) -> int:
    """
    Where a client's key falls on the ring.
    """
    return int.from_bytes(blake2b(key.encode(), digest_size=5).digest(), "big")


class BoundedHash:
    """
    Consistent hashing on the client's key (its address) with bounded loads
    (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
    Loads"; HAProxy's ``hash-type consistent`` with ``hash-balance-factor``).

    The backends sit on a ring, L{RING_POINTS_PER_WEIGHT} points per unit of
    weight.  A key goes to the first backend clockwise from its point whose
    load is under its bound, skipping those that may take no connection
    (full, down, drained: not among the candidates).  Load is the backend's
    estimated connections (its report plus what this balancer sent it that
    the report had not seen); the bound of a backend of weight M{w} is
    M{ceil(factor * (L + 1) * w / W)}, where M{L} is the candidates' total
    load and M{W} their total weight (slow start's share of it included):
    with equal weights, no backend above C{factor} times the mean, counting
    the new connection.  Since the bounds sum to more than M{L}, some
    backend is always under its own.

    So a client keeps its backend while the pool is stable and that backend
    is not over its bound; when a backend joins or leaves, only the keys
    that were, or become, its own move (about 1/n of them).

    The ring changes one backend at a time: its points are inserted or
    removed (the pool says which backends came up, went down or were
    reweighted, L{Candidates.ringChanges}), never rebuilt per change; the
    pool keeps the candidates' load and weight totals.  So a pick on the
    pool's candidates costs the walk from the key's point, not the number
    of backends.  Given any other sequence, it reads it whole.

    @ivar hashBalance: the factor; 0 for no bound (pure consistent hashing).
    """

    name = "hash"
    keyed = True

    def __init__(self, hashBalance: float = DEFAULT_HASH_BALANCE) -> None:
        self.hashBalance = checkHashBalance(hashBalance)
        # The bound's factor as an exact fraction: integer comparisons only.
        ratio = Fraction(self.hashBalance).limit_denominator(10_000)
        self._num, self._den = ratio.numerator, ratio.denominator
        #: The backends on the ring and their weights.
        self._members: Dict[str, int] = {}
        #: Each member's slot (the low bits of its ring entries), the
        #: member in each slot, and the slots free for reuse.
        self._slots: Dict[str, int] = {}
        self._names: List[Optional[str]] = []
        self._free: List[int] = []
        #: The ring, cut by the top bits of the point into buckets of
        #: sorted entries (point << 24 | slot): adding one backend's points
        #: is a few short insertions, not a new ring.
        self._buckets: List["array[int]"] = [_entries()]
        self._shift = _POINT_BITS
        self._entries = 0
        #: Where the ring came from: the pool whose changes it follows
        #: (and the cursor in them), or a plain sequence of candidates.
        self._pool: object = None
        self._cursor: Optional[int] = None
        # A plain sequence's names and weights last seen, and what follows
        # from them: where each ring slot is among them (-1: absent), how
        # many have a weight (and the one, if one), their total weight.
        self._seenNames: List[str] = []
        self._seenWeights: List[int] = []
        self._positions: List[int] = []
        self._usable = 0
        self._only = -1
        self._totalWeight = 0

    # -- the ring ------------------------------------------------------------

    def _rebuild(self, members: Dict[str, int]) -> None:
        """
        The ring of C{members} alone (those with a weight), from scratch:
        when it starts, or when most of it changes at once.
        """
        members = {n: w for n, w in members.items() if w > 0}
        names = sorted(members)
        if len(names) > _INDEX_MASK + 1:
            raise ValueError(f"too many backends for the hash ring: {len(names)}")
        entries = RING_POINTS_PER_WEIGHT * sum(members.values())
        shift = _POINT_BITS - self._bucketBits(entries)
        lists: List[List[int]] = [[] for _ in range(1 << (_POINT_BITS - shift))]
        for slot, name in enumerate(names):
            for p in _ringPoints(name, members[name]):
                lists[p >> shift].append((p << _INDEX_BITS) | slot)
        buckets = [_entries(sorted(entries)) for entries in lists]
        self._members = members
        self._slots = {n: i for i, n in enumerate(names)}
        self._names = list(names)
        self._free = []
        self._buckets = buckets
        self._shift = shift
        self._entries = entries

    @staticmethod
    def _bucketBits(entries: int) -> int:
        return min(_MAX_BUCKET_BITS, (entries // _BUCKET_SIZE).bit_length())

    def _setWeight(self, name: str, weight: int) -> None:
        """
        Put a backend on the ring with C{weight} (0: take it off): only the
        points between its old weight and the new one go in or out, as a
        heavier weight keeps a lighter one's points.
        """
        old = self._members.get(name, 0)
        if weight == old:
            return
        slot = self._slots.get(name)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self._names[slot] = name
            else:
                slot = len(self._names)
                if slot > _INDEX_MASK:
                    raise ValueError(f"too many backends for the hash ring: {slot + 1}")
                self._names.append(name)
            self._slots[name] = slot
        buckets, shift = self._buckets, self._shift
        if weight > old:
            for p in _ringPoints(name, weight, old):
                insort(buckets[p >> shift], (p << _INDEX_BITS) | slot)
        else:
            for p in _ringPoints(name, old, weight):
                bucket = buckets[p >> shift]
                del bucket[bisect_left(bucket, (p << _INDEX_BITS) | slot)]
        self._entries += RING_POINTS_PER_WEIGHT * (weight - old)
        if weight:
            self._members[name] = weight
        else:
            del self._members[name]
            del self._slots[name]
            self._names[slot] = None
            self._free.append(slot)
        bits = self._bucketBits(self._entries)
        have = _POINT_BITS - self._shift
        if bits > have + 1 or bits < have - 2:
            self._rebucket(bits)

    def _rebucket(self, bits: int) -> None:
        """
        Cut the ring into 2**C{bits} buckets (it grew or shrank a lot):
        the entries are already in order, so no point is hashed again.
        """
        ring = list(chain.from_iterable(self._buckets))
        shift = _POINT_BITS - bits
        step = 1 << (shift + _INDEX_BITS)
        buckets = []
        start = 0
        for b in range(1, 1 << bits):
            end = bisect_left(ring, b * step, start)
            buckets.append(_entries(ring[start:end]))
            start = end
        buckets.append(_entries(ring[start:]))
        self._buckets = buckets
        self._shift = shift

    def _follow(self, candidates) -> None:
        """
        Bring the ring up to date with the pool's changes since the last
        pick: usually none, or the one backend that came up or went down.
        """
        pool = candidates.pool
        since = self._cursor if self._pool is pool else None
        whole, changes, self._cursor = candidates.ringChanges(since)
        if whole:
            self._pool = pool
            self._seenNames, self._seenWeights = [], []
            self._rebuild(dict(changes))
        elif len(changes) > len(self._members) + 64:
            kept = dict(self._members)
            kept.update(changes)
            self._rebuild(kept)
        else:
            for name, weight in changes:
                self._setWeight(name, weight)

    def _see(self, names: List[str], weights: List[int]) -> None:
        """
        New candidates of a plain sequence (by name and weight): add a new
        or reweighted one to the ring (backends that stop being candidates
        stay on it: the walk skips them, which is what a ring without them
        would do), rebuild it when most of it is absent, and place them.
        """
        if self._pool is not None:
            self._pool = self._cursor = None
            self._rebuild({})
        current = {n: w for n, w in zip(names, weights) if w > 0}
        members = self._members
        if len(members) > 4 * len(current) + 64 or not members:
            self._rebuild(current)
        elif not current.items() <= members.items():
            changed = [(n, w) for n, w in current.items() if members.get(n) != w]
            if len(changed) * 8 > len(members):  # many: cheaper from scratch
                kept = dict(members)
                kept.update(current)
                self._rebuild(kept)
            else:
                for name, weight in changed:
                    self._setWeight(name, weight)
        where = {n: i for i, (n, w) in enumerate(zip(names, weights)) if w > 0}
        self._positions = [-1 if n is None else where.get(n, -1) for n in self._names]
        self._usable = len(current)
        self._only = next(iter(where.values()), -1)
        self._totalWeight = sum(current.values())
        self._seenNames, self._seenWeights = names, weights

    def _clockwise(self, point: int) -> Iterator[int]:
        """
        The ring's entries clockwise from C{point}, once round.
        """
        buckets = self._buckets
        b = point >> self._shift
        home = buckets[b]
        start = bisect_left(home, point << _INDEX_BITS)
        last = len(buckets) - 1
        yield from islice(home, start, None)
        for k in range(1, last + 1):
            yield from buckets[(b + k) & last]
        yield from islice(home, start)

    # -- choosing ------------------------------------------------------------

    def choose(
        self,
        candidates: Sequence[BackendStatus],
        rng: random.Random,
        key: Optional[str] = None,
    ) -> Optional[BackendStatus]:
        """
        The backend for C{key}; a random point of the ring without one.
        """
        if getattr(candidates, "ringChanges", None) is not None:
            return self._chooseLive(candidates, rng, key)
        # A plain sequence: whole-sequence passes in C (map, list compare),
        # with the load total below.
        if not isinstance(candidates, tuple):
            candidates = tuple(candidates)
        names = list(map(_nameOf, candidates))
        weights = list(map(_weightOf, candidates))
        if names != self._seenNames or weights != self._seenWeights:
            self._see(names, weights)
        usable = self._usable
        if usable <= 1:
            return candidates[self._only] if usable else None
        point = _keyPoint(key) if key is not None else rng.getrandbits(_POINT_BITS)
        positions = self._positions
        num = self._num
        room = 0  # num * (total load + 1), worked out when first needed
        scale = 0
        over: Set[int] = set()
        for entry in islice(self._clockwise(point), _MAX_WALK):
            at = positions[entry & _INDEX_MASK]
            if at < 0 or at in over:
                continue
            c = candidates[at]
            load = c.estimatedConnections
            # Under its bound: load < factor * (total + 1) * w / W, in
            # integers (an idle backend always is).
            if not num or not load:
                return c
            if not room:
                room = num * (sum(map(_connectionsOf, candidates)) + 1)
                scale = self._den * sum(map(_units, candidates))
            if load * scale < room * _units(c):
                return c
            over.add(at)
            if len(over) == usable:
                break
        # Not reached while the factor is >= 1; least loaded per weight.
        return _lowest(candidates, _connectionsPerUnit, rng)

    def _chooseLive(self, candidates, rng: random.Random, key: Optional[str]) -> Optional[BackendStatus]:
        """
        L{choose} on the pool's live candidates: the ring follows the
        pool's changes, the totals come from the pool, and the walk asks
        for each backend it meets whether it is a candidate.
        """
        if candidates.pool is not self._pool or candidates.ringCursor != self._cursor:
            self._follow(candidates)
        if len(candidates) <= 1:  # none, or one: no ring needed
            return next(iter(candidates), None)
        point = _keyPoint(key) if key is not None else rng.getrandbits(_POINT_BITS)
        names, get = self._names, candidates.get
        num = self._num
        room = scale = 0
        over: Set[Optional[str]] = set()
        # Most picks end at the first entry or the next: those two straight
        # from the home bucket, the walk (a generator) only past them.  An
        # entry met twice is judged the same way twice.  (Where the walk
        # begins, as _clockwise works it out: inline, on the pick's path.)
        home = self._buckets[point >> self._shift]
        start = bisect_left(home, point << _INDEX_BITS)
        for entry in chain(home[start:start + 2], islice(self._clockwise(point), _MAX_WALK)):
            name = names[entry & _INDEX_MASK]
            c = get(name)  # type: ignore[arg-type]
            if c is None or (over and name in over):
                continue
            load = c.estimatedConnections
            if not num or not load:
                return c
            if not room:
                connections, units = candidates.totals()
                room = num * (connections + 1)
                scale = self._den * units
            if load * scale < room * _units(c):
                return c
            over.add(name)
            if len(over) == len(candidates):
                break
        # A long walk: most of the ring's backends are full or not
        # candidates (or every one is over its bound, which cannot be while
        # the factor is >= 1): the least loaded per weight, among the few.
        return _lowest(candidates, _connectionsPerUnit, rng)


#: Policies by the name used in ``--policy`` and ``cluster-admin policy``.
POLICIES: Dict[str, Callable[[], object]] = {
    LeastLoad.name: LeastLoad,
    LeastConn.name: LeastConn,
    RoundRobin.name: RoundRobin,
    PowerOfTwo.name: PowerOfTwo,
    BoundedHash.name: BoundedHash,
}

DEFAULT_POLICY = LeastLoad.name


def makePolicy(name: str, hashBalance: Optional[float] = None):
    """
    A new policy object for C{name}; L{UnknownPolicy} if there is none.

    @param hashBalance: the hash policy's bound factor (see L{BoundedHash});
        other policies ignore it.  L{DEFAULT_HASH_BALANCE} when C{None}.
    """
    try:
        factory = POLICIES[name]
    except KeyError:
        raise UnknownPolicy(name) from None
    if factory is BoundedHash and hashBalance is not None:
        return BoundedHash(hashBalance)
    return factory()
