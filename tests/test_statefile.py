"""
The balancer's state file.
"""

import json
import os

import pytest

from twistedcluster import statefile
from twistedcluster.cluster import Cluster
from twistedcluster.pool import AdminState, State


def test_round_trip_restores_admin_state_weight_and_policy(tmp_path):
    path = str(tmp_path / "state.json")
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    c.pool.register("b", "::1", 9002)
    c.pool.setAdminState("a", AdminState.DRAINING)
    c.pool.setWeight("b", 7)
    c.setPolicy("round-robin")
    statefile.save(path, c)

    fresh = Cluster()
    statefile.restore(fresh, statefile.load(path))
    assert fresh.policyName == "round-robin"
    a, b = fresh.pool.get("a"), fresh.pool.get("b")
    assert a.state is State.DOWN  # until it registers again
    assert (b.host, b.port, b.weight) == ("::1", 9002, 7)
    fresh.pool.register("a", "127.0.0.1", 9001)
    assert fresh.pool.get("a").state is State.DRAINING


def test_no_file_yet_is_an_empty_state(tmp_path):
    assert statefile.load(str(tmp_path / "none.json"))["backends"] == {}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "cannot read"),
        (json.dumps({"version": 99, "backends": {}}).encode(), "unknown version"),
        (json.dumps({"version": 1, "policy": "x", "backends": {}}).encode(), "unknown policy"),
        (json.dumps({"version": 1, "backends": {"a": {"admin": "sleepy"}}}).encode(), "malformed"),
        (json.dumps({"version": 1, "backends": {"a": {"admin": "enabled", "weight": 900, "host": "h", "port": 1}}}).encode(), "malformed"),
    ],
)
def test_bad_state_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(statefile.StateFileError, match=message):
        statefile.load(str(path))


@pytest.mark.allow_errors
def test_a_failed_write_is_logged_not_fatal(tmp_path, logged):
    c = Cluster()
    keeper = statefile.StateKeeper(str(tmp_path / "missing-dir" / "state.json"), c)
    keeper()
    assert any("cannot write state file" in line for line in logged)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = str(tmp_path / "state.json")
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    for w in range(1, 5):
        c.pool.setWeight("a", w)
        statefile.save(path, c)
    assert os.listdir(tmp_path) == ["state.json"]
    assert statefile.load(path)["backends"]["a"]["weight"] == 4
