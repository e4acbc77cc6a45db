"""
The balancer's admin channel, in memory.
"""

import pytest

from twistedcluster.wire import commands
from twistedcluster.core.pool import State
from twistedcluster.testing import MemoryBalancer


def balancerWith(*names):
    lb = MemoryBalancer()
    for i, n in enumerate(names):
        lb.pool.register(n, "127.0.0.1", 9000 + i, capacity=10)
    return lb


def test_list_backends_shows_every_state_and_the_policy():
    lb = balancerWith("a", "b")
    lb.pool.markDown("b")
    lb.pool.report("a", connections=4, load=0.4)
    lb.pool.acquire("a")
    admin, _, _ = lb.adminChannel()
    answer = lb.resultOf(admin.callRemote(commands.ListBackends))
    assert answer["policy"] == "least-load"
    byName = {b["name"]: b for b in answer["backends"]}
    assert byName["a"]["state"] == "up"
    assert byName["a"]["connections"] == 4
    assert byName["a"]["load"] == 0.4
    assert byName["a"]["routed"] == 1
    assert byName["b"]["state"] == "down"


def test_drain_enable_disable():
    lb = balancerWith("a", "b")
    admin, _, _ = lb.adminChannel()
    assert lb.resultOf(admin.callRemote(commands.DrainBackend, name="a")) == {"state": "draining", "notSaved": None}
    assert lb.pool.get("a").state is State.DRAINING
    assert [c.name for c in lb.pool.eligible()] == ["b"]
    assert lb.resultOf(admin.callRemote(commands.DisableBackend, name="a")) == {"state": "disabled", "notSaved": None}
    assert lb.resultOf(admin.callRemote(commands.EnableBackend, name="a")) == {"state": "up", "notSaved": None}
    assert lb.pool.get("a").state is State.UP


def test_unknown_backend_is_a_clear_error():
    lb = balancerWith("a")
    admin, server, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.DrainBackend, name="nope"))
    assert f.check(commands.UnknownBackendError)
    assert "no backend named 'nope'" in f.getErrorMessage()
    assert not server.transport.disconnecting


def test_weight():
    lb = balancerWith("a")
    admin, _, _ = lb.adminChannel()
    lb.resultOf(admin.callRemote(commands.SetWeight, name="a", weight=5))
    assert lb.pool.get("a").weight == 5
    f = lb.resultOf(admin.callRemote(commands.SetWeight, name="a", weight=1000))
    assert f.check(commands.InvalidWeightError)
    assert "out of range" in f.getErrorMessage()
    assert lb.pool.get("a").weight == 5


def test_policy():
    lb = balancerWith("a")
    admin, _, _ = lb.adminChannel()
    answer = lb.resultOf(admin.callRemote(commands.SetPolicy, policy="round-robin"))
    assert answer == {"previous": "least-load", "notSaved": None}
    assert lb.cluster.policyName == "round-robin"
    f = lb.resultOf(admin.callRemote(commands.SetPolicy, policy="fastest"))
    assert f.check(commands.UnknownPolicyError)
    assert "least-conn" in f.getErrorMessage()
    assert lb.cluster.policyName == "round-robin"


def test_changes_are_logged_with_the_peer(logged):
    lb = balancerWith("a")
    admin, _, _ = lb.adminChannel()
    lb.resultOf(admin.callRemote(commands.DrainBackend, name="a"))
    assert any("admin" in line and "set backend a to draining" in line for line in logged)


def test_control_commands_are_not_admin_commands():
    lb = balancerWith("a")
    admin, _, _ = lb.adminChannel()
    f = lb.resultOf(
        admin.callRemote(
            commands.Register, name="evil", host="10.9.9.9", port=1, capacity=1,
            connections=0, load=0.0, interval=1.0,
        )
    )
    assert f.check(commands.amp.UnhandledCommand)
    assert "evil" not in lb.pool


def test_a_long_list_comes_in_pages_that_fit_in_amp():
    # 2,000 backends with long names would never fit in one AMP value.
    lb = MemoryBalancer()
    for i in range(2000):
        lb.pool.register(f"backend-{i:05d}-" + "x" * 150, "10.1.2.3", 9000)
    admin, _, _ = lb.adminChannel()
    from twistedcluster.cli.admin import listAll
    from twisted.internet import defer

    policy, backends = lb.resultOf(defer.ensureDeferred(listAll(admin)))
    assert policy == "least-load"
    assert [b["name"] for b in backends] == [s.name for s in lb.pool.snapshot()]
    first = lb.resultOf(admin.callRemote(commands.ListBackends))
    assert first["total"] == 2000 and 0 < len(first["backends"]) < 2000


def test_forget_removes_a_down_backend_only():
    lb = balancerWith("a", "b")
    lb.pool.markDown("b")
    admin, _, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.ForgetBackend, name="a"))
    assert f.check(commands.BackendInUse) and "is up" in f.getErrorMessage()
    assert lb.resultOf(admin.callRemote(commands.ForgetBackend, name="b")) == {"notSaved": None}
    assert "b" not in lb.pool and "a" in lb.pool
    f = lb.resultOf(admin.callRemote(commands.ForgetBackend, name="b"))
    assert f.check(commands.UnknownBackendError)


def test_a_forgotten_backend_that_reports_again_is_told_to_register():
    from tests.test_control import register

    lb = MemoryBalancer()
    backend, _, _ = lb.controlChannel()
    lb.resultOf(register(backend, name="gone"))
    lb.clock.advance(10)  # silent: down
    admin, _, _ = lb.adminChannel()
    lb.resultOf(admin.callRemote(commands.ForgetBackend, name="gone"))
    f = lb.resultOf(backend.callRemote(commands.ReportLoad, connections=0, load=0.0))
    assert f.check(commands.NotRegistered) and "forgot you" in f.getErrorMessage()
    lb.resultOf(register(backend, name="gone"))
    assert lb.pool.get("gone").state is State.UP


def keptBalancer(path, *names):
    """
    A balancer whose admin changes go to a state file at C{path}, written
    when the test runs the fake thread pool.
    """
    from tests.test_statefile import Threads
    from twistedcluster.balancer.statefile import StateKeeper

    lb = balancerWith(*names)
    threads = Threads()
    lb.admin.onChange = StateKeeper(str(path), lb.cluster, lb.clock, threads)
    return lb, threads


CHANGES = [
    (commands.DrainBackend, dict(name="a"), {"state": "draining"}),
    (commands.SetWeight, dict(name="a", weight=3), {"state": "up"}),
    (commands.SetPolicy, dict(policy="round-robin"), {"previous": "least-load"}),
    (commands.ForgetBackend, dict(name="b"), {}),
]


@pytest.mark.parametrize("command, args, answer", CHANGES)
def test_a_change_is_answered_once_it_is_saved(tmp_path, command, args, answer):
    lb, threads = keptBalancer(tmp_path / "state.json", "a", "b")
    lb.pool.markDown("b")
    admin, _, _ = lb.adminChannel()
    got = []
    admin.callRemote(command, **args).addBoth(got.append)
    lb.flush()
    lb.clock.advance(0)
    assert got == [] and len(threads.calls) == 1
    threads.runAll()
    lb.flush()
    assert got == [{**answer, "notSaved": None}]


@pytest.mark.allow_errors
@pytest.mark.parametrize("command, args, answer", CHANGES)
def test_a_change_that_cannot_be_saved_is_applied_and_says_so(tmp_path, command, args, answer):
    (tmp_path / "folder").write_text("a file where the state file's folder was")
    lb, threads = keptBalancer(tmp_path / "folder" / "state.json", "a", "b")
    lb.pool.markDown("b")
    admin, server, _ = lb.adminChannel()
    got = []
    admin.callRemote(command, **args).addBoth(got.append)
    lb.flush()
    lb.clock.advance(0)
    threads.runAll()
    lb.flush()
    [result] = got
    result = dict(result)
    why = result.pop("notSaved")
    assert result == answer
    assert "cannot write state file" in why and "Not a directory" in why
    assert not server.transport.disconnecting


@pytest.mark.allow_errors
def test_a_client_that_does_not_know_the_not_saved_field_still_works(tmp_path):
    from twisted.protocols import amp

    class OldDrainBackend(amp.Command):
        commandName = b"DrainBackend"
        arguments = [(b"name", amp.Unicode())]
        response = [(b"state", amp.Unicode())]

    (tmp_path / "folder").write_text("")
    lb, threads = keptBalancer(tmp_path / "folder" / "state.json", "a")
    admin, _, _ = lb.adminChannel()
    got = []
    admin.callRemote(OldDrainBackend, name="a").addBoth(got.append)
    lb.flush()
    lb.clock.advance(0)
    threads.runAll()
    lb.flush()
    assert got == [{"state": "draining"}]


def test_without_a_state_file_changes_are_answered_at_once():
    lb = balancerWith("a")
    admin, _, _ = lb.adminChannel()
    answer = lb.resultOf(admin.callRemote(commands.DrainBackend, name="a"))
    assert answer == {"state": "draining", "notSaved": None}


@pytest.mark.parametrize(
    "command, kw",
    [
        (commands.DrainBackend, {}),
        (commands.EnableBackend, {}),
        (commands.DisableBackend, {}),
        (commands.SetWeight, {"weight": 2}),
        (commands.ForgetBackend, {}),
    ],
)
def test_every_backend_command_names_an_unknown_backend_and_keeps_the_channel(command, kw):
    lb = balancerWith("a")
    admin, server, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(command, name="nope", **kw))
    assert f.check(commands.UnknownBackendError)
    assert "no backend named 'nope'" in f.getErrorMessage()
    assert not server.transport.disconnecting


def test_a_long_list_comes_as_json_in_few_pages_and_old_balancers_still_page(monkeypatch):
    from twisted.internet import defer

    from twistedcluster.balancer.admin import AdminProtocol
    from twistedcluster.cli.admin import listAll

    lb = MemoryBalancer()
    for i in range(6000):
        lb.pool.register(f"backend-{i:05d}", "10.1.2.3", 9000 + i % 100, capacity=7)
    lb.pool.report("backend-00001", connections=3, load=0.25)
    lb.pool.markDown("backend-00002")
    admin, _, _ = lb.adminChannel()
    calls = []
    real = admin.callRemote

    def counting(command, **kw):
        calls.append(kw)
        return real(command, **kw)

    admin.callRemote = counting
    policy, backends = lb.resultOf(defer.ensureDeferred(listAll(admin)))
    assert backends == [commands.backendItem(s) for s in lb.pool.snapshot()]
    assert len(calls) == 1  # JSON pages of some 16,000 backends each

    # More than a page holds comes in several, the same.
    monkeypatch.setattr(commands, "TABLE_BYTES", 200_000)
    calls.clear()
    _, pages = lb.resultOf(defer.ensureDeferred(listAll(admin)))
    assert pages == backends and 4 <= len(calls) <= 8

    # A balancer from before JSON pages ignores the ask: AmpList pages.
    original = AdminProtocol._commandDispatch[commands.ListBackends.commandName]

    def oldList(self, offset=None, json=None):
        return original[1](self, offset)

    AdminProtocol._commandDispatch[commands.ListBackends.commandName] = (original[0], oldList)
    try:
        calls.clear()
        _, paged = lb.resultOf(defer.ensureDeferred(listAll(admin)))
    finally:
        AdminProtocol._commandDispatch[commands.ListBackends.commandName] = original
    assert paged == backends and len(calls) > 3


def withStatics(lb):
    from twisted.internet.testing import MemoryReactorClock

    from twistedcluster.balancer.healthcheck import TCPHealthChecks

    statics = TCPHealthChecks(lb.pool, MemoryReactorClock(), [])
    statics.startService()
    lb.admin.statics = statics
    return statics


def test_add_and_remove_static_backends_at_runtime():
    lb = balancerWith("amp")
    statics = withStatics(lb)
    admin, server, _ = lb.adminChannel()
    answer = lb.resultOf(admin.callRemote(
        commands.AddBackend, name="s1", host="127.0.0.1", port=6379, weight=3, capacity=7
    ))
    assert answer == {"state": "up", "notSaved": None, "sendProxy": None}
    s = lb.pool.get("s1")
    assert (s.static, s.weight, s.capacity, s.host, s.port) == (True, 3, 7, "127.0.0.1", 6379)
    assert set(statics.added) == {"s1"} and "s1" in statics.checks
    lb.resultOf(admin.callRemote(commands.AddBackend, name="s2", host="::1", port=80))
    assert (lb.pool.get("s2").weight, lb.pool.get("s2").capacity) == (1, 1000)
    # Refusals, each with its reason, the channel kept.
    for kw, error, text in [
        (dict(name="s1", host="127.0.0.1", port=1), commands.BackendInUse, "exists already"),
        (dict(name="amp", host="127.0.0.1", port=1), commands.BackendInUse, "registered itself"),
        (dict(name="x", host="bad host", port=1), commands.InvalidArgument, "not an IP address"),
        (dict(name="x", host="127.0.0.1", port=1, weight=900), commands.InvalidArgument, "weight"),
        (dict(name="x", host="127.0.0.1", port=1, capacity=0), commands.InvalidArgument, "capacity"),
    ]:
        f = lb.resultOf(admin.callRemote(commands.AddBackend, **kw))
        assert f.check(error) and text in f.getErrorMessage(), (kw, f)
    f = lb.resultOf(admin.callRemote(commands.RemoveBackend, name="amp"))
    assert f.check(commands.BackendInUse) and "registered itself" in f.getErrorMessage()
    f = lb.resultOf(admin.callRemote(commands.RemoveBackend, name="nope"))
    assert f.check(commands.UnknownBackendError)
    f = lb.resultOf(admin.callRemote(commands.ForgetBackend, name="s1"))
    assert f.check(commands.BackendInUse) and "cluster-admin remove s1" in f.getErrorMessage()
    assert lb.resultOf(admin.callRemote(commands.RemoveBackend, name="s1")) == {"notSaved": None}
    assert "s1" not in lb.pool and "s1" not in statics.checks and set(statics.added) == {"s2"}
    assert not server.transport.disconnecting
    statics.stopService()


def test_add_and_remove_need_the_secret():
    lb = MemoryBalancer(secret=b"s" * 32)
    withStatics(lb)
    admin, server, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.AddBackend, name="s1", host="127.0.0.1", port=1))
    assert f.check(commands.NotAuthenticated)
    assert "s1" not in lb.pool
    lb.pool.register("s0", "127.0.0.1", 2, static=True)
    admin, server, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.RemoveBackend, name="s0"))
    assert f.check(commands.NotAuthenticated)
    assert "s0" in lb.pool


def test_adding_a_static_backend_under_a_registered_backends_name_is_refused_and_logged(logged):
    from tests.test_control import register

    lb = MemoryBalancer()
    statics = withStatics(lb)
    client, server, _ = lb.controlChannel()
    lb.resultOf(register(client, name="web", port=9000))
    admin, _, _ = lb.adminChannel()
    f = lb.resultOf(admin.callRemote(commands.AddBackend, name="web", host="127.0.0.1", port=6379))
    assert f.check(commands.BackendInUse)
    assert "registered itself" in f.getErrorMessage()
    s = lb.pool.get("web")
    assert (s.static, s.port, s.state) == (False, 9000, State.UP)
    assert "web" not in statics.checks
    assert any("add" in line and "web" in line and "refused" in line for line in logged)
    statics.stopService()


def test_a_static_backend_added_with_a_proxy_header_version_gets_it():
    lb = balancerWith()
    statics = withStatics(lb)
    admin, _, _ = lb.adminChannel()
    answer = lb.resultOf(admin.callRemote(
        commands.AddBackend, name="web", host="127.0.0.1", port=8080, sendProxy="v2"
    ))
    assert answer == {"state": "up", "notSaved": None, "sendProxy": "v2"}
    assert statics.sendProxyFor == {"web": "v2"}
    assert statics.added["web"].sendProxy == "v2"
    assert statics.probeFactoryFor("web").sendProxy == "v2"
    f = lb.resultOf(admin.callRemote(
        commands.AddBackend, name="x", host="127.0.0.1", port=1, sendProxy="v3"
    ))
    assert f.check(commands.InvalidArgument) and "send-proxy" in f.getErrorMessage()
    assert "x" not in lb.pool
    statics.stopService()


def test_an_admin_answer_goes_out_in_one_send():
    # Twisted sends 128 KiB each time a socket can take more; on a balancer
    # busy with reports each of those waited a turn of the reactor.
    from twistedcluster.balancer.admin import _ANSWER_SEND_LIMIT, _sendWholeAnswers
    from twistedcluster.wire.commands import TABLE_BYTES

    class FD:
        SEND_LIMIT = 128 * 1024

    class TLS:
        def __init__(self, below):
            self.transport = below

    fd = FD()
    _sendWholeAnswers(TLS(fd))
    assert fd.SEND_LIMIT == _ANSWER_SEND_LIMIT > TABLE_BYTES
    assert FD.SEND_LIMIT == 128 * 1024  # only that connection's
    _sendWholeAnswers(object())  # a transport with no socket: nothing to do
