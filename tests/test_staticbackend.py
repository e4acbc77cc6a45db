"""
C{--backend [NAME=]HOST:PORT[,weight=W][,capacity=C]}: the parser, no I/O.
"""

import re

import pytest

from twistedcluster.balancer import staticbackend
from twistedcluster.balancer.staticbackend import (
    DEFAULT_STATIC_CAPACITY,
    StaticBackend,
    makeStaticBackend,
    parseStaticBackend,
)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9000", StaticBackend("127.0.0.1:9000", "127.0.0.1", 9000)),
    ("web1=127.0.0.1:9000", StaticBackend("web1", "127.0.0.1", 9000)),
    ("web1=10.0.0.5:80,weight=3,capacity=50", StaticBackend("web1", "10.0.0.5", 80, 3, 50)),
    ("[::1]:80,capacity=2", StaticBackend("[::1]:80", "::1", 80, None, 2)),
    ("db=[::1]:5432, weight=0", StaticBackend("db", "::1", 5432, 0, DEFAULT_STATIC_CAPACITY)),
    ("cache=redis.example:6379", StaticBackend("cache", "redis.example", 6379)),
])
def test_parses(text, expected):
    assert parseStaticBackend(text) == expected


def test_describe_gives_back_what_was_written():
    for text in ("127.0.0.1:9000", "web1=10.0.0.5:80,weight=3,capacity=50", "[::1]:80,capacity=2"):
        assert parseStaticBackend(text).describe() == text


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1", "is not HOST:PORT"),
    ("web1=127.0.0.1:0", "port must be 1..65535"),
    ("a b=127.0.0.1:80", "white space"),
    ("=127.0.0.1:80", "name must be"),
    ("web1=127.0.0.1:80,weight=257", "weight: must be 0..256, not 257"),
    ("web1=127.0.0.1:80,capacity=0", "capacity: must be 1..1000000000"),
    ("web1=127.0.0.1:80,capacity=many", "capacity: 'many' is not a whole number"),
    ("web1=127.0.0.1:80,weight", "is not KEY=VALUE"),
    ("web1=127.0.0.1:80,colour=blue", "unknown key 'colour' (keys: weight, capacity, send-proxy)"),
    ("web1=127.0.0.1:80,send-proxy=v3", "send-proxy: 'v3': give v1 or v2"),
    ("web1=127.0.0.1:80,weight=1,weight=2", "weight given twice"),
])
def test_bad_input_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parseStaticBackend(text)


def test_a_new_key_is_one_entry_in_the_table(monkeypatch):
    """
    The parser reads keys from KEYS: a key added there (with its field) is
    parsed with no other change.
    """
    monkeypatch.setitem(staticbackend.KEYS, "weight-too", ("weight", staticbackend._weight))
    assert parseStaticBackend("w=127.0.0.1:80,weight-too=7").weight == 7


def test_values_from_elsewhere_are_checked_the_same_way():
    assert makeStaticBackend("w", "::1", 80, capacity=5) == StaticBackend("w", "::1", 80, None, 5)
    for bad in [("w", "not a host", 80), ("w", "127.0.0.1", 70000), ("", "127.0.0.1", 80)]:
        with pytest.raises(ValueError):
            makeStaticBackend(*bad)
    with pytest.raises(ValueError, match="weight"):
        makeStaticBackend("w", "127.0.0.1", 80, weight=-1)


def test_send_proxy_key():
    """
    C{send-proxy=} gives that one backend a PROXY header version, and
    L{StaticBackend.describe} writes it back.
    """
    b = parseStaticBackend("web1=127.0.0.1:80,send-proxy=V2")
    assert b.sendProxy == "v2"
    assert parseStaticBackend(b.describe()) == b
