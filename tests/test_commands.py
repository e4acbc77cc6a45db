"""
The AMP contract's own helpers: one backend's item.
"""

from twisted.protocols import amp

from twistedcluster.wire import commands
from twistedcluster.core.pool import BackendStatus, Pool, State


def statusOf():
    pool = Pool()
    pool.register("a", "::1", 9001, capacity=10)
    pool.report("a", connections=3, load=0.3)
    pool.release("a", pool.acquire("a"))
    return pool.get("a")


def test_backend_item_has_exactly_the_fields_in_order():
    item = commands.backendItem(statusOf())
    assert list(item) == [name.decode("ascii") for name, _ in commands.BACKEND_FIELDS]


def test_backend_item_values():
    item = commands.backendItem(statusOf())
    assert item["name"] == "a"
    assert (item["host"], item["port"]) == ("::1", 9001)
    assert item["state"] == "up"
    assert (item["capacity"], item["connections"], item["load"]) == (10, 3, 0.3)
    assert (item["routed"], item["active"], item["static"]) == (1, 0, False)


def test_backend_item_survives_the_wire_unchanged():
    # What ListBackends sends is what cluster-admin status --json prints,
    # and what /status.json serves.
    status = BackendStatus("b", "10.0.0.2", 80, State.DRAINING, weight=3, load=0.5)
    item = commands.backendItem(status)
    field = amp.AmpList(commands.BACKEND_FIELDS)
    decoded = field.fromStringProto(field.toStringProto([item], None), None)
    assert decoded == [item]
    assert list(decoded[0]) == list(item)
