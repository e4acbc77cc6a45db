"""
The etcd state store's pure parts (keys from state, state from keys) and
the admin channel's answers when the store is away; in memory.  The real
etcd is in tests/test_e2e_statestore.py.
"""

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from tests.test_admin import balancerWith, withStatics
from twistedcluster.balancer.staticbackend import StaticBackend
from twistedcluster.balancer.statestore import (
    StoreUnavailable,
    _prefixEnd,
    applyKey,
    desiredState,
    difference,
    parseStateStore,
    reconcile,
)
from twistedcluster.core.pool import AdminState, State
from twistedcluster.wire import commands


def test_parse_state_store():
    assert parseStateStore("etcd:127.0.0.1:2379,[::1]:2380") == [
        ("127.0.0.1", 2379), ("::1", 2380)]
    for bad in ("etcd:", "consul:1.2.3.4:1", "etcd:nohost"):
        with pytest.raises(ValueError):
            parseStateStore(bad)


def test_prefix_end_is_the_first_key_after_the_prefix():
    assert _prefixEnd(b"/a/") == b"/a0"
    assert _prefixEnd(b"a\xff") == b"b"


def test_keys_hold_only_what_differs_from_the_defaults():
    lb = balancerWith("a", "b", "c")
    statics = withStatics(lb)
    statics.add(StaticBackend("s", "127.0.0.1", 1, weight=4), runtime=False)
    lb.pool.setAdminState("a", AdminState.DRAINING)
    lb.pool.setWeight("b", 3)
    statics.add(StaticBackend("added", "127.0.0.1", 2, capacity=9))
    assert desiredState(lb.cluster, statics) == {
        "policy": "least-load",
        "backends/a": {"host": "127.0.0.1", "port": 9000, "admin": "draining", "weight": 1},
        "backends/b": {"host": "127.0.0.1", "port": 9001, "admin": "enabled", "weight": 3},
        "static/added": {"host": "127.0.0.1", "port": 2, "capacity": 9},
    }


def test_difference_puts_what_changed_and_deletes_what_went():
    known = {"policy": "p2c", "backends/a": {"w": 1}, "backends/b": {"w": 2},
             "forgotten/x": {}}
    desired = {"policy": "p2c", "backends/a": {"w": 5}}
    assert difference(desired, known) == ({"backends/a": {"w": 5}}, ["backends/b"])


def test_keys_applied_and_undone():
    lb = balancerWith("a", "b")
    statics = withStatics(lb)
    applyKey(lb.cluster, statics, "backends/a", {"host": "h", "port": 1, "admin": "disabled",
                                                  "weight": 7})
    assert (lb.pool.get("a").state, lb.pool.get("a").weight) == (State.DISABLED, 7)
    applyKey(lb.cluster, statics, "backends/a", None)
    assert (lb.pool.get("a").state, lb.pool.get("a").weight) == (State.UP, 1)
    applyKey(lb.cluster, statics, "policy", "round-robin")
    assert lb.cluster.policyName == "round-robin"
    applyKey(lb.cluster, statics, "static/s", {"host": "127.0.0.1", "port": 5, "capacity": 3})
    assert lb.pool.get("s").static and "s" in statics.added
    applyKey(lb.cluster, statics, "static/s", None)
    assert "s" not in lb.pool
    # forgotten: only where it is down.
    applyKey(lb.cluster, statics, "forgotten/b", {"name": "b"})
    assert "b" in lb.pool
    lb.pool.markDown("b")
    applyKey(lb.cluster, statics, "forgotten/b", {"name": "b"})
    assert "b" not in lb.pool


@pytest.mark.allow_errors
def test_a_key_that_cannot_be_used_is_logged_and_skipped(logged):
    lb = balancerWith("a")
    applyKey(lb.cluster, None, "policy", "no-such-policy")
    applyKey(lb.cluster, None, "backends/a", {"admin": "sideways"})
    assert lb.cluster.policyName == "least-load"
    assert lb.pool.get("a").state is State.UP
    assert sum("cannot apply" in e for e in logged) == 2


@pytest.mark.allow_errors
@pytest.mark.parametrize(
    "key, value",
    [
        # JSON's 1e999 is Python's inf: int() raises OverflowError.
        ("backends/a", {"host": "h", "port": 1, "admin": "draining", "weight": 1e999}),
        ("backends/a", {"host": "h", "port": 1e999, "admin": "draining", "weight": 1}),
        ("backends/a", {"host": "h", "port": 99999999, "admin": "draining", "weight": 1}),
        ("backends/a", ["not", "a", "dict"]),
        ("static/s", {"host": "127.0.0.1", "port": 5, "capacity": 1e999}),
        ("static/s", {"host": "127.0.0.1", "port": float("nan"), "capacity": 1}),
        ("policy", ["a list"]),
    ],
)
def test_no_value_makes_applying_a_key_raise(logged, key, value):
    # One key written by hand stopped every balancer's admin changes (the
    # watch died on it) and every balancer's start (reconcile raised).
    lb = balancerWith("a")
    statics = withStatics(lb)
    applyKey(lb.cluster, statics, key, value)
    reconcile(lb.cluster, statics, {key: value, "backends/b": {"host": "h", "port": 2, "admin": "disabled", "weight": 3}})
    assert lb.pool.get("a").state is State.UP and lb.cluster.policyName == "least-load"
    assert "s" not in lb.pool
    assert lb.pool.get("b").weight == 3  # the good key still applies
    assert any("cannot apply" in line for line in logged)
    statics.stopService()


@pytest.mark.allow_errors
def test_a_key_that_is_not_utf8_is_skipped_and_the_rest_read(logged):
    import base64
    import json

    from twistedcluster.balancer.statestore import _decodeKVs

    def kv(key, value):
        return {"key": base64.b64encode(key).decode(), "value": base64.b64encode(json.dumps(value).encode()).decode()}

    known = _decodeKVs(b"/tc/", [
        kv(b"/tc/backends/\xff\xfe", {"admin": "draining"}),
        kv(b"/tc/policy", "round-robin"),
        {"key": "%%% not base64", "value": ""},
        kv(b"/tc/backends/deep", None) | {"value": base64.b64encode(b"[" * 100000).decode()},
    ])
    assert known == {"policy": "round-robin"}
    assert sum("is not UTF-8" in line or "is not base64" in line for line in logged) == 2
    assert any("deep is not JSON" in line for line in logged)


def test_a_static_backend_at_this_balancers_own_listener_is_not_added_from_the_store(logged):
    # Another balancer took it (not its own address): here it would relay
    # every client to itself.
    from twistedcluster.balancer.selfloop import OwnListeners

    lb = balancerWith("a")
    statics = withStatics(lb)
    statics.loopsBack = OwnListeners({}, {"proxy": "tcp:8100:interface=127.0.0.1"}).refusal
    applyKey(lb.cluster, statics, "static/loop", {"host": "127.0.0.1", "port": 8100, "capacity": 3})
    applyKey(lb.cluster, statics, "static/fine", {"host": "127.0.0.1", "port": 8101, "capacity": 3})
    assert "loop" not in lb.pool and "loop" not in statics.checks
    assert "fine" in statics.checks
    assert any("static backend loop not added" in line and "own proxy listener" in line for line in logged)
    # Still the cluster's: a write from this balancer keeps the key.
    assert desiredState(lb.cluster, statics)["static/loop"]["port"] == 8100
    # Moved (the operator's fix, seen at a catch-up): added here now, and
    # the old value held back is forgotten, not written back.
    applyKey(lb.cluster, statics, "static/loop", {"host": "127.0.0.1", "port": 8200, "capacity": 3})
    assert "loop" in statics.checks
    assert desiredState(lb.cluster, statics)["static/loop"]["port"] == 8200
    statics.stopService()


def test_reconcile_makes_the_state_what_the_store_holds():
    lb = balancerWith("a", "b")
    statics = withStatics(lb)
    lb.pool.setAdminState("a", AdminState.DRAINING)
    statics.add(StaticBackend("gone", "127.0.0.1", 3))
    known = {
        "policy": "p2c",
        "backends/b": {"host": "127.0.0.1", "port": 9001, "admin": "disabled", "weight": 2},
        "backends/new": {"host": "10.0.0.1", "port": 80, "admin": "draining", "weight": 1},
        "static/s": {"host": "127.0.0.1", "port": 4, "capacity": 5},
        "forgotten/x": {"name": "x"},
    }
    reconcile(lb.cluster, statics, known)
    assert desiredState(lb.cluster, statics) == {
        k: v for k, v in known.items() if not k.startswith("forgotten/")}
    assert lb.pool.get("new").state is State.DOWN


class AwayStore:
    """
    A store that is away: every change refused before it is made.
    """

    def checkWritable(self):
        raise StoreUnavailable("the state store (etcd 127.0.0.1:1) is unreachable")

    def __call__(self, forgotten=None):
        raise AssertionError("not written when refused first")


CHANGES = [
    (commands.DrainBackend, dict(name="a")),
    (commands.EnableBackend, dict(name="a")),
    (commands.DisableBackend, dict(name="a")),
    (commands.SetWeight, dict(name="a", weight=3)),
    (commands.SetPolicy, dict(policy="round-robin")),
    (commands.ForgetBackend, dict(name="b")),
    (commands.AddBackend, dict(name="c", host="127.0.0.1", port=1)),
    (commands.RemoveBackend, dict(name="s")),
]


@pytest.mark.parametrize("command, args", CHANGES)
def test_every_change_is_refused_while_the_store_is_away(command, args):
    lb = balancerWith("a", "b")
    lb.pool.markDown("b")
    statics = withStatics(lb)
    statics.add(StaticBackend("s", "127.0.0.1", 2))
    store = AwayStore()
    lb.admin.onChange, lb.admin.beforeChange = store, store.checkWritable
    before = (desiredState(lb.cluster, statics), [s.name for s in lb.pool.snapshot()])
    admin, server, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(command, **args))
    assert f.check(commands.StateStoreUnavailable), f
    assert "unreachable" in f.getErrorMessage()
    assert (desiredState(lb.cluster, statics), [s.name for s in lb.pool.snapshot()]) == before
    assert not server.transport.disconnecting


def test_a_change_the_store_fails_to_take_is_refused():
    lb = balancerWith("a")

    def failing(forgotten=None):
        lb.pool.setAdminState("a", AdminState.ENABLED)  # what the store puts back
        return defer.fail(StoreUnavailable("could not take the change, which is undone"))

    lb.admin.onChange = failing
    admin, _, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.DrainBackend, name="a"))
    assert f.check(commands.StateStoreUnavailable)
    assert lb.pool.get("a").state is State.UP


def test_forget_tells_the_store_which_backend():
    lb = balancerWith("a")
    lb.pool.markDown("a")
    told = []
    lb.admin.onChange = lambda forgotten=None: told.append(forgotten)
    admin, _, _ = lb.adminChannel()
    lb.resultOf(admin.callRemote(commands.ForgetBackend, name="a"))
    assert told == ["a"]


# -- etcd's user/password authentication ------------------------------------


def test_the_password_is_the_files_first_line(tmp_path, logged):
    from twistedcluster.balancer.statestore import loadPassword

    path = tmp_path / "password"
    path.write_text("s3cret with spaces\r\nignored\n")
    path.chmod(0o600)
    assert loadPassword(str(path)) == "s3cret with spaces"
    assert not any("may be read" in line for line in logged)
    path.chmod(0o644)
    assert loadPassword(str(path)) == "s3cret with spaces"
    assert any("password file" in line and "may be read by any user" in line for line in logged)
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        loadPassword(str(path))
    with pytest.raises(ValueError, match="cannot read password file"):
        loadPassword(str(tmp_path / "none"))


def test_what_etcd_says_about_credentials():
    from twistedcluster.balancer.statestore import _authOff, _authProblem, _needsToken

    def problem(status, error):
        return _authProblem(status, {"error": error}, ("lb", "pw"), "/p/")

    assert "wrong user or password" in problem(
        400, "etcdserver: authentication failed, invalid user ID or password")
    assert "--state-store-user" in problem(400, "etcdserver: user name is empty")
    assert "may not read and write '/p/'" in problem(403, "etcdserver: permission denied")
    assert problem(400, "etcdserver: request is too large") is None
    assert problem(401, "etcdserver: invalid auth token") is None
    assert _needsToken(401, {"error": "etcdserver: invalid auth token"})
    assert _needsToken(400, {"error": "etcdserver: user name is empty"})
    assert not _needsToken(400, {"error": "etcdserver: authentication failed, invalid user ID"})
    assert _authOff({"error": "etcdserver: authentication is not enabled", "code": 9})


def test_credentials_options(tmp_path):
    from twisted.python import usage

    from twistedcluster.balancer.service import Options

    path = tmp_path / "password"
    path.write_text("pw\n")
    path.chmod(0o600)
    store = ["--state-store=etcd:127.0.0.1:2379"]

    def parse(*args):
        o = Options()
        o.parseOptions(list(args))
        return o

    assert parse(*store, "--state-store-user=lb", f"--state-store-password-file={path}")[
        "state-credentials"] == ("lb", "pw")
    assert parse(*store)["state-credentials"] is None
    for args, error in [
        ([*store, "--state-store-user=lb"], "together"),
        ([*store, f"--state-store-password-file={path}"], "together"),
        (["--state-store-user=lb", f"--state-store-password-file={path}"], "go with --state-store"),
        ([*store, "--state-store-user=lb", f"--state-store-password-file={tmp_path}/none"],
         "cannot read password file"),
    ]:
        with pytest.raises(usage.UsageError, match=error):
            parse(*args)


def scriptedStore(answers, credentials=("lb", "pw")):
    """
    A store whose requests get C{answers} in turn, (status, JSON); each
    request is recorded as (path, token).
    """
    from twisted.internet.task import Clock

    from twistedcluster.balancer.statestore import EtcdStateStore

    lb = balancerWith("a")
    store = EtcdStateStore([("127.0.0.1", 2379)], "/p/", lb.cluster, None, Clock(),
                           agent=object(), credentials=credentials)
    store.sent = []
    answers = list(answers)

    async def request(path, message):
        store.sent.append((path, store._token))
        return answers.pop(0)

    store._request = request
    return store


def test_a_request_authenticates_first_and_again_when_the_token_expired():
    expired = (401, {"error": "etcdserver: invalid auth token", "code": 16})
    store = scriptedStore([
        (200, {"token": "t1"}), (200, {"kvs": []}),
        expired, (200, {"token": "t2"}), (200, {"kvs": []}),
    ])
    for _ in range(2):
        assert defer.ensureDeferred(store._call("/v3/kv/range", {})).result == {"kvs": []}
    assert store.sent == [
        ("/v3/auth/authenticate", None), ("/v3/kv/range", "t1"),
        ("/v3/kv/range", "t1"), ("/v3/auth/authenticate", None), ("/v3/kv/range", "t2"),
    ]


def test_refused_credentials_are_not_an_unreachable_member():
    from twistedcluster.balancer.statestore import StoreAuthFailed

    store = scriptedStore([
        (400, {"error": "etcdserver: authentication failed, invalid user ID or password"}),
    ])
    failures = []
    defer.ensureDeferred(store._call("/v3/kv/range", {})).addErrback(failures.append)
    (f,) = failures
    assert f.check(StoreAuthFailed) and "wrong user or password" in f.getErrorMessage()
    assert store._member == 0


def test_credentials_for_an_etcd_whose_authentication_is_off_are_kept_for_when_it_is_on():
    off = (412, {"error": "etcdserver: authentication is not enabled", "code": 9})
    store = scriptedStore([
        off, (200, {"kvs": []}),
        off, (400, {"error": "etcdserver: user name is empty"}), (200, {"token": "t1"}),
        (200, {"kvs": []}),
    ])
    for _ in range(2):
        assert defer.ensureDeferred(store._call("/v3/kv/range", {})).result == {"kvs": []}
    assert store.sent == [
        ("/v3/auth/authenticate", None), ("/v3/kv/range", None),
        ("/v3/auth/authenticate", None), ("/v3/kv/range", None),
        ("/v3/auth/authenticate", None), ("/v3/kv/range", "t1"),
    ]


def test_a_static_backend_from_the_store_does_not_take_a_registered_backends_name(logged):
    # Another balancer's cluster-admin add of a name that a backend has
    # registered here: this balancer keeps the backend, and says why.
    from tests.test_control import register

    lb = balancerWith()
    statics = withStatics(lb)
    statics.registered = lambda name: name in lb.control.owners
    client, _, _ = lb.controlChannel()
    lb.resultOf(register(client, name="web", port=9000))
    applyKey(lb.cluster, statics, "static/web", {"host": "127.0.0.1", "port": 6379, "capacity": 3})
    s = lb.pool.get("web")
    assert (s.static, s.port, s.state) == (False, 9000, State.UP)
    assert "web" not in statics.checks
    assert any("static backend web not added" in line and "registered" in line for line in logged)
    # Still the cluster's: a write from this balancer keeps the key...
    value = {"host": "127.0.0.1", "port": 6379, "capacity": 3}
    assert desiredState(lb.cluster, statics)["static/web"] == value
    # ... until it is deleted from the store.
    applyKey(lb.cluster, statics, "static/web", None)
    assert "static/web" not in desiredState(lb.cluster, statics)
    assert lb.pool.get("web").static is False
    statics.stopService()


def test_a_static_backends_proxy_header_version_is_in_its_key():
    lb = balancerWith()
    statics = withStatics(lb)
    statics.add(StaticBackend("web", "127.0.0.1", 2, sendProxy="v2"))
    assert desiredState(lb.cluster, statics)["static/web"] == {
        "host": "127.0.0.1", "port": 2, "capacity": 1000, "sendProxy": "v2"}
    other = balancerWith()
    otherStatics = withStatics(other)
    applyKey(other.cluster, otherStatics, "static/web",
             {"host": "127.0.0.1", "port": 2, "capacity": 1000, "sendProxy": "v2"})
    assert otherStatics.sendProxyFor == {"web": "v2"}
    applyKey(other.cluster, otherStatics, "static/old", {"host": "127.0.0.1", "port": 3, "capacity": 5})
    assert "old" in other.pool and "old" not in otherStatics.sendProxyFor
    statics.stopService()
    otherStatics.stopService()


@pytest.mark.parametrize(
    "error, maybeTaken",
    [
        (lambda: ConnectionRefusedError(), False),
        (lambda: DNSLookupError("etcd-0.example"), False),  # never sent
        (lambda: ValueError("HTTP 400: etcdserver: too many operations in txn request"), False),
        (lambda: defer.CancelledError(), True),  # REQUEST_TIMEOUT
        (lambda: ResponseNeverReceived([Failure(ConnectionLost())]), True),
    ],
)
def test_a_change_etcd_may_have_taken_is_not_said_to_be_undone(error, maybeTaken):
    # A write that got no answer may have been committed: etcd's watch then
    # brings it to every balancer, so "undone" would be untrue.
    store = scriptedStore([], credentials=None)

    async def request(path, message):
        raise error()

    store._request = request
    store.watching = True
    store.cluster.pool.setAdminState("a", AdminState.DRAINING)
    failure = []
    store().addErrback(failure.append)
    [f] = failure
    assert f.check(StoreUnavailable)
    message = f.getErrorMessage()
    assert f.value.maybeTaken is maybeTaken
    if maybeTaken:
        assert "did not say whether it took the change" in message and "look with status" in message
        assert "undone" not in message
    else:
        assert "which is undone" in message
    assert ("no answer in time" in message) == isinstance(error(), defer.CancelledError)
    # Either way this balancer holds what the store last had, until the
    # watch says otherwise.
    assert store.cluster.pool.get("a").state is State.UP


@pytest.mark.parametrize("maybeTaken, said", [(False, "change undone"), (True, "change not known to be saved")])
def test_the_admin_log_line_says_what_became_of_a_change_the_store_did_not_take(logged, maybeTaken, said):
    lb = balancerWith("a")

    def failing(forgotten=None):
        e = StoreUnavailable("etcd unreachable")
        e.maybeTaken = maybeTaken
        return defer.fail(e)

    lb.admin.onChange = failing
    admin, _, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.DrainBackend, name="a"))
    assert f.check(commands.StateStoreUnavailable)
    assert any(said in line for line in logged)
