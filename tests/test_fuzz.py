"""
Fuzzing the balancer's control and admin protocols with hypothesis: random
bytes and mutated real AMP boxes.  Whatever arrives, nothing escapes the
protocol, each connection's memory stays bounded, no backend is registered
without the secret, and the balancer goes on serving well-behaved peers.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.protocols import amp

from twistedcluster.wire import auth

from twistedcluster.wire import commands
from twistedcluster.wire.guardedamp import MAX_KEYS_PER_BOX
from twistedcluster.core.pool import State
from twistedcluster.testing import MemoryBalancer

SECRET = b"fuzzing-secret-0123456789"


def box(command, ask=b"1", **kw):
    return amp.AmpBox(_ask=ask, _command=command, **{k: str(v).encode() for k, v in kw.items()}).serialize()


SEEDS = [
    box(b"Register", name="evil", host="127.0.0.1", port=1, capacity=1, connections=0, load=0.0, interval=1.0),
    box(b"ReportLoad", connections=5, load=0.5),
    box(b"Drain"),
    box(b"Challenge"),
    amp.AmpBox(_ask=b"2", _command=b"Authenticate", nonce=b"n" * 32, proof=b"p" * 32).serialize(),
    box(b"ListBackends"),
    box(b"DrainBackend", name="web1"),
    box(b"SetWeight", name="web1", weight=3),
    box(b"SetPolicy", policy="round-robin"),
    amp.AmpBox(_answer=b"1", x=b"y").serialize(),
    amp.AmpBox(_error=b"1", _error_code=b"X", _error_description=b"y").serialize(),
]


@st.composite
def mutated(draw):
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i : i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:  # a length prefix claiming a huge key or value
            data[i:i] = draw(st.sampled_from([b"\xff\xff", b"\x01\x00", b"\x00\x00"]))
    return bytes(data)


inputs = st.one_of(st.binary(max_size=512), mutated())
chunkings = st.lists(st.integers(1, 64), min_size=1, max_size=8)


def feed(server, data, sizes):
    i = 0
    k = 0
    while i < len(data) and not server.transport.disconnecting:
        n = sizes[k % len(sizes)]
        server.dataReceived(data[i : i + n])
        i += n
        k += 1


def assertBounded(server):
    # What one connection may hold: one key or value being read, and one
    # box of at most MAX_KEYS_PER_BOX keys.
    assert len(getattr(server, "_unprocessed", b"")) <= 65535 + 2 + 64
    current = getattr(server, "_currentBox", None) or {}
    assert len(current) <= MAX_KEYS_PER_BOX


def stillServes(lb):
    client, _, _ = lb.controlChannel()
    assert lb.resultOf(defer.ensureDeferred(auth.authenticate(client, SECRET, "control"))) is None
    answer = lb.resultOf(client.callRemote(
        commands.Register, name="good", host="127.0.0.1", port=9000, capacity=1,
        connections=0, load=0.0, interval=1.0,
    ))
    assert answer == {"heartbeatTimeout": 3.0, "mark": 0, "quiet": None}  # no one-way offer made
    assert lb.pool.get("good").state is State.UP


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=inputs, sizes=chunkings, channel=st.sampled_from(["control", "admin"]))
def test_fuzzed_input_with_a_secret_registers_nothing_and_harms_nothing(data, sizes, channel):
    lb = MemoryBalancer(secret=SECRET)
    lb.pool.register("web1", "127.0.0.1", 9001)
    _, server, _ = lb.controlChannel() if channel == "control" else lb.adminChannel()
    feed(server, data, sizes)
    assertBounded(server)
    lb.flush()
    assert set(s.name for s in lb.pool.snapshot()) == {"web1"}
    web1 = lb.pool.get("web1")
    assert (web1.state, web1.weight) == (State.UP, 1)
    assert lb.cluster.policyName == "least-load"
    stillServes(lb)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=inputs, sizes=chunkings)
def test_fuzzed_input_without_a_secret_never_escapes_the_protocol(data, sizes):
    # Without a secret anything well-formed may act; nothing may crash.
    lb = MemoryBalancer()
    _, server, _ = lb.controlChannel()
    feed(server, data, sizes)
    assertBounded(server)
    lb.flush()
    for s in lb.pool.snapshot():
        assert s.port > 0 and s.capacity > 0


def test_an_endless_box_is_cut_off():
    lb = MemoryBalancer(secret=SECRET)
    _, server, _ = lb.controlChannel()
    for i in range(10000):
        server.dataReceived(b"\x00\x02k%d\x00\x01v" % (i % 10))
        if server.transport.disconnecting:
            break
    assert server.transport.disconnecting
    assertBounded(server)
