"""
cluster-admin top's view, as plain functions (the real thing, on a
terminal and not, is in tests/test_e2e_observe.py).
"""

import io
import json
from types import SimpleNamespace

import pytest_twisted
from twisted.internet import reactor

from twistedcluster.cli.top import formatTop, loadBar, top

BACKENDS = [
    {"name": "web1", "host": "127.0.0.1", "port": 9001, "state": "up", "weight": 1,
     "connections": 3, "load": 0.3, "routed": 10, "active": 2, "failures": 0, "static": False},
    {"name": "web2", "host": "::1", "port": 9002, "state": "draining", "weight": 2,
     "connections": 0, "load": 0.0, "routed": 4, "active": 0, "failures": 1, "static": True},
]


def test_load_bar():
    assert loadBar(0.3) == "###....... " + " 30.0%"
    assert loadBar(1.5).startswith("#" * 10)
    assert loadBar(-1).startswith("." * 10)


def test_a_view_has_a_header_and_a_row_per_backend():
    view = formatTop("least-load", BACKENDS, {"web1": 2.5, "web2": None}, 0.0)
    lines = view.splitlines()
    assert "policy: least-load  backends: 2 (1 up)  active: 2  routed: 2.5/s" in lines[0]
    assert lines[2].split() == ["NAME", "ADDRESS", "STATE", "WEIGHT", "CONNS", "LOAD",
                                "ROUTED/S", "ROUTED", "ACTIVE", "FAILS"]
    assert lines[3].split()[:3] == ["web1", "127.0.0.1:9001", "up"]
    assert "2.5" in lines[3].split()
    assert "[::1]:9002" in lines[4] and "draining (static)" in lines[4]
    assert "(q quits)" not in view
    assert "(no backend has registered)" in formatTop("p2c", [], {}, 0.0)


@pytest_twisted.ensureDeferred
async def test_rates_come_from_the_change_between_views():
    answers = iter([("least-load", [dict(BACKENDS[0], routed=10)]),
                    ("least-load", [dict(BACKENDS[0], routed=30)])])

    async def listAll():
        return next(answers)

    out = io.StringIO()
    args = SimpleNamespace(iterations=2, interval=0.05, timeout=5, json=True)
    assert await top(reactor, listAll, args, out) == ""
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["rates"] == {"web1": None}
    assert 20 / 0.5 < second["rates"]["web1"] < 20 / 0.04
