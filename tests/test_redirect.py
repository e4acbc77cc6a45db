"""
The redirect listener, in memory.
"""

import pytest
from twisted.internet.testing import StringTransport

from twistedcluster.cluster import Cluster
from twistedcluster.redirect import RedirectFactory, answerLine


def ask(cluster):
    proto = RedirectFactory(cluster).buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    proto.dataReceived(b"garbage that is ignored\r\n\x00\xff")
    return t


def test_answers_one_line_naming_a_backend_and_closes():
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    t = ask(c)
    assert t.value() == b"127.0.0.1 9001\r\n"
    assert t.disconnecting


def test_no_backend():
    t = ask(Cluster())
    assert t.value() == b"ERROR no-backend\r\n"
    assert t.disconnecting


def test_ipv6_backend():
    c = Cluster()
    c.pool.register("a", "::1", 9001)
    assert ask(c).value() == b"::1 9001\r\n"


def test_redirects_count_as_routed_so_least_load_spreads_them():
    c = Cluster()
    for i in range(3):
        c.pool.register(f"b{i}", "127.0.0.1", 9000 + i, capacity=10)
    answers = [ask(c).value() for _ in range(30)]
    assert {a: answers.count(a) for a in set(answers)} == {
        b"127.0.0.1 9000\r\n": 10,
        b"127.0.0.1 9001\r\n": 10,
        b"127.0.0.1 9002\r\n": 10,
    }
    assert [s.routed for s in c.pool.snapshot()] == [10, 10, 10]
    assert [s.active for s in c.pool.snapshot()] == [0, 0, 0]


@pytest.mark.parametrize("host", ["127.0.0.1 1\r\nEVIL", "a b", "", "h\x00"])
def test_an_answer_never_carries_a_host_that_is_not_one(host):
    with pytest.raises(ValueError):
        answerLine(host, 1)


def test_a_backend_with_a_bad_host_is_not_named(logged):
    # Hosts are validated where they come in; this is the last line.
    c = Cluster()
    c.pool.register("a", "127.0.0.1 1\r\nEVIL", 9001)
    t = ask(c)
    assert t.value() == b"ERROR no-backend\r\n"
    assert any("not a valid host" in line for line in logged)
