"""
The balancer's state file.
"""

import json
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from twistedcluster.balancer import statefile
from twistedcluster.core.cluster import Cluster
from twistedcluster.core.pool import AdminState, State


def test_round_trip_restores_admin_state_weight_and_policy(tmp_path):
    path = str(tmp_path / "state.json")
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    c.pool.register("b", "::1", 9002)
    c.pool.setAdminState("a", AdminState.DRAINING)
    c.pool.setWeight("b", 7)
    c.setPolicy("round-robin", chosen=True)  # cluster-admin policy
    statefile.save(path, c)

    fresh = Cluster()
    statefile.restore(fresh, statefile.load(path))
    assert fresh.policyName == "round-robin"
    a, b = fresh.pool.get("a"), fresh.pool.get("b")
    assert a.state is State.DOWN  # until it registers again
    assert (b.host, b.port, b.weight) == ("::1", 9002, 7)
    fresh.pool.register("a", "127.0.0.1", 9001)
    assert fresh.pool.get("a").state is State.DRAINING


def test_a_policy_nobody_chose_gives_way_to_a_new_policy_option(tmp_path):
    # The balancer ran with --policy p2c and nobody ran cluster-admin
    # policy: restarted with --policy least-conn, it routes least-conn (the
    # state file used to bring p2c back, silently).
    path = str(tmp_path / "state.json")
    c = Cluster(policy="p2c")
    c.pool.register("a", "127.0.0.1", 9001)
    c.pool.setWeight("a", 3)
    statefile.save(path, c)
    assert statefile.load(path)["policy"] is None
    fresh = Cluster(policy="least-conn")
    statefile.restore(fresh, statefile.load(path))
    assert (fresh.policyName, fresh.chosenPolicy) == ("least-conn", None)
    assert fresh.pool.get("a").weight == 3
    # Once chosen, it is kept: by this restart, and the next.
    fresh.setPolicy("round-robin", chosen=True)
    statefile.save(path, fresh)
    again = Cluster(policy="least-conn")
    statefile.restore(again, statefile.load(path))
    assert (again.policyName, again.chosenPolicy) == ("round-robin", "round-robin")


def test_an_older_state_files_policy_is_kept_and_said(tmp_path, logged):
    # Version 1 saved the policy in force, whoever chose it: kept (it may
    # be an operator's), with a line saying how to have the option's.
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "policy": "p2c", "backends": {}}))
    fresh = Cluster(policy="least-conn")
    statefile.restore(fresh, statefile.load(str(path)))
    assert fresh.policyName == "p2c"
    assert any("cluster-admin policy least-conn" in line for line in logged), logged


def test_no_file_yet_is_an_empty_state(tmp_path):
    assert statefile.load(str(tmp_path / "none.json"))["backends"] == {}


def test_a_state_file_that_could_never_be_written_is_refused_at_start(tmp_path):
    # Said at start, not at the first admin change ("applied but not saved").
    with pytest.raises(statefile.StateFileError, match="does not exist"):
        statefile.checkFolder(str(tmp_path / "no-such-folder" / "state.json"))
    statefile.checkFolder(str(tmp_path / "state.json"))  # there, and ours


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "cannot read"),
        (json.dumps({"version": 99, "backends": {}}).encode(), "unknown version"),
        (json.dumps({"version": 1, "policy": "x", "backends": {}}).encode(), "unknown policy"),
        (json.dumps({"version": 1, "backends": {"a": {"admin": "sleepy"}}}).encode(), "malformed"),
        (json.dumps({"version": 1, "backends": {"a": {"admin": "enabled", "weight": 900, "host": "h", "port": 1}}}).encode(), "malformed"),
        # Numbers JSON allows and int() does not; a port no backend has;
        # nesting deeper than json reads: one clear line each, no traceback.
        (b'{"version": 1, "backends": {"a": {"admin": "enabled", "weight": 1e999, "host": "h", "port": 1}}}', "malformed"),
        (b'{"version": 1, "backends": {"a": {"admin": "enabled", "weight": 1, "host": "h", "port": 1e999}}}', "malformed"),
        (b'{"version": 1, "backends": {}, "static": {"x": {"host": "127.0.0.1", "port": 1, "capacity": 1e999}}}', "malformed"),
        (json.dumps({"version": 1, "backends": {"a": {"admin": "enabled", "weight": 1, "host": "h", "port": 99999999}}}).encode(), "port"),
        (b"[" * 100000, "nested too deep"),
        (b"", "it is empty"),
        (b" \n", "it is empty"),
    ],
)
def test_bad_state_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(statefile.StateFileError, match=message):
        statefile.load(str(path))


class Threads:
    """
    Stands in for the reactor's thread pool: records each call and runs it
    when the test says so.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def runAll(self):
        calls, self.calls = self.calls, []
        for f, args, d in calls:
            try:
                d.callback(f(*args))
            except Exception:
                d.errback()


def keeperFor(path, cluster):
    clock, threads = Clock(), Threads()
    return statefile.StateKeeper(str(path), cluster, clock, threads), clock, threads


def outcome(d):
    out = []
    d.addBoth(out.append)
    return out


def test_the_file_holds_only_operator_settings(tmp_path):
    path = str(tmp_path / "state.json")
    c = Cluster()
    for i in range(100):
        c.pool.register(f"pod-{i}", "10.0.0.1", 9000 + i)
        c.pool.markDown(f"pod-{i}")
    c.pool.setAdminState("pod-7", AdminState.DRAINING)
    statefile.save(path, c)
    assert list(statefile.load(path)["backends"]) == ["pod-7"]


def test_changes_in_one_turn_are_one_write_done_off_the_reactor(tmp_path):
    path = tmp_path / "state.json"
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    keeper, clock, threads = keeperFor(path, c)
    answers = []
    for w in (2, 3, 4):
        c.pool.setWeight("a", w)
        answers.append(outcome(keeper()))
    clock.advance(0)
    assert len(threads.calls) == 1  # one write, not yet run
    assert not path.exists() and answers == [[], [], []]
    threads.runAll()
    assert answers == [[None], [None], [None]]
    assert statefile.load(str(path))["backends"]["a"]["weight"] == 4


def test_a_change_during_a_write_waits_for_the_next_one(tmp_path):
    path = tmp_path / "state.json"
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    keeper, clock, threads = keeperFor(path, c)
    c.pool.setWeight("a", 2)
    first = outcome(keeper())
    clock.advance(0)
    c.pool.setWeight("a", 3)
    second = outcome(keeper())
    clock.advance(0)
    assert len(threads.calls) == 1  # one write at a time
    threads.runAll()
    assert first == [None] and second == []  # the write it saw held weight 2
    assert statefile.load(str(path))["backends"]["a"]["weight"] == 2
    clock.advance(0)
    threads.runAll()
    assert second == [None]
    assert statefile.load(str(path))["backends"]["a"]["weight"] == 3


@pytest.mark.allow_errors
def test_a_failed_write_is_logged_and_reported_to_the_caller(tmp_path, logged):
    # Tests run as root, which writes in read-only folders: a parent that is
    # a file fails for real, for everyone.
    (tmp_path / "not-a-dir").write_text("")
    c = Cluster()
    keeper, clock, threads = keeperFor(tmp_path / "not-a-dir" / "state.json", c)
    answer = outcome(keeper())
    clock.advance(0)
    threads.runAll()
    [failure] = answer
    assert failure.check(statefile.StateNotSaved)
    assert "Not a directory" in failure.getErrorMessage()
    assert any("cannot write state file" in line for line in logged)


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    import stat

    events = []
    realFsync, realReplace = os.fsync, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        realFsync(fd)

    def replace(a, b):
        events.append("rename")
        realReplace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    statefile.save(str(tmp_path / "state.json"), Cluster())
    assert events == ["fsync file", "rename", "fsync folder"]


def test_temporaries_left_by_a_crash_are_removed(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{}")
    leftovers = [".state-k2j4_x9q", ".state-state.json-0a1b2c3d"]
    kept = [".state-other.json-0a1b2c3d", "notes.txt", ".state-not-mkstemp"]
    for name in leftovers + kept:
        (tmp_path / name).write_text("partial")
    removed = statefile.removeTemporaries(str(path))
    assert sorted(removed) == sorted(leftovers)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["state.json"])


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = str(tmp_path / "state.json")
    c = Cluster()
    c.pool.register("a", "127.0.0.1", 9001)
    for w in range(1, 5):
        c.pool.setWeight("a", w)
        statefile.save(path, c)
    assert os.listdir(tmp_path) == ["state.json"]
    assert statefile.load(path)["backends"]["a"]["weight"] == 4


def test_static_backends_added_at_runtime_survive_a_restart(tmp_path):
    """
    What cluster-admin add added is kept (address, capacity; its weight with
    the settings); what --backend gave at start-up is not (the command line
    gives it again); a file from before has no "static" and loads.
    """
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer.healthcheck import TCPHealthChecks
    from twistedcluster.balancer.staticbackend import parseStaticBackend

    path = str(tmp_path / "state.json")
    c = Cluster()
    statics = TCPHealthChecks(c.pool, MemoryReactorClock(), [parseStaticBackend("boot=127.0.0.1:1")])
    statics.startService()
    statics.add(parseStaticBackend("redis=127.0.0.1:6379,weight=4,capacity=9"))
    statefile.write(path, statefile.snapshot(c, statics))
    saved = json.loads(open(path).read())
    assert saved["static"] == {"redis": {"host": "127.0.0.1", "port": 6379, "capacity": 9}}
    assert saved["backends"]["redis"]["weight"] == 4
    statics.stopService()

    fresh = Cluster()
    state = statefile.load(path)
    again = TCPHealthChecks(fresh.pool, MemoryReactorClock(), [parseStaticBackend("boot=127.0.0.1:1")])
    statefile.restore(fresh, state)
    statefile.restoreStatics(again, state)
    again.startService()
    r = fresh.pool.get("redis")
    assert (r.static, r.weight, r.capacity, r.port) == (True, 4, 9, 6379)
    assert set(again.added) == {"redis"} and fresh.pool.get("boot").static
    again.stopService()

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"version": 1, "policy": None, "backends": {}}))
    assert statefile.load(str(old))["static"] == {}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "policy": None, "backends": {},
                               "static": {"x": {"host": "127.0.0.1", "port": 0, "capacity": 1}}}))
    with pytest.raises(statefile.StateFileError, match="malformed"):
        statefile.load(str(bad))


def test_a_static_backends_proxy_header_version_survives_a_restart(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer.healthcheck import TCPHealthChecks
    from twistedcluster.balancer.staticbackend import parseStaticBackend

    path = str(tmp_path / "state.json")
    c = Cluster()
    statics = TCPHealthChecks(c.pool, MemoryReactorClock())
    statics.startService()
    statics.add(parseStaticBackend("web=127.0.0.1:8080,send-proxy=v1"))
    statics.add(parseStaticBackend("plain=127.0.0.1:8081"))
    statefile.write(path, statefile.snapshot(c, statics))
    saved = json.loads(open(path).read())
    assert saved["static"] == {
        "web": {"host": "127.0.0.1", "port": 8080, "capacity": 1000, "sendProxy": "v1"},
        "plain": {"host": "127.0.0.1", "port": 8081, "capacity": 1000},
    }
    statics.stopService()

    fresh = Cluster()
    sendProxyFor = {}
    again = TCPHealthChecks(fresh.pool, MemoryReactorClock(), sendProxyFor=sendProxyFor)
    statefile.restoreStatics(again, statefile.load(path))
    again.startService()
    assert sendProxyFor == {"web": "v1"}
    assert again.added["web"].sendProxy == "v1" and again.added["plain"].sendProxy is None
    again.stopService()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "policy": None, "backends": {}, "static": {
        "x": {"host": "127.0.0.1", "port": 1, "capacity": 1, "sendProxy": "v9"}}}))
    with pytest.raises(statefile.StateFileError, match="malformed"):
        statefile.load(str(bad))


@pytest.mark.allow_errors
def test_a_static_backend_at_this_balancers_own_listener_is_not_restored(tmp_path, logged):
    # Written by an older version, or taken from the state store: restored,
    # it would have the balancer relay every client to itself.
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer.healthcheck import TCPHealthChecks
    from twistedcluster.balancer.selfloop import OwnListeners

    cluster = Cluster()
    statics = TCPHealthChecks(cluster.pool, MemoryReactorClock(), [])
    statics.loopsBack = OwnListeners({}, {"proxy": "tcp:8100:interface=127.0.0.1"}).refusal
    statefile.restoreStatics(statics, {"static": {
        "loop": {"host": "127.0.0.1", "port": 8100, "capacity": 1},
        "fine": {"host": "127.0.0.1", "port": 8101, "capacity": 1},
    }})
    assert "loop" not in statics.checks and "fine" in statics.checks
    assert any("static backend loop not added" in line and "own proxy listener" in line for line in logged)
