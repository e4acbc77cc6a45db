"""
The balancer's admin channel, in memory.
"""

from twistedcluster import commands
from twistedcluster.pool import State
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
    assert lb.resultOf(admin.callRemote(commands.DrainBackend, name="a")) == {"state": "draining"}
    assert lb.pool.get("a").state is State.DRAINING
    assert [c.name for c in lb.pool.eligible()] == ["b"]
    assert lb.resultOf(admin.callRemote(commands.DisableBackend, name="a")) == {"state": "disabled"}
    assert lb.resultOf(admin.callRemote(commands.EnableBackend, name="a")) == {"state": "up"}
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
    assert answer == {"previous": "least-load"}
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
    from twistedcluster.admincli import listAll
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
    assert lb.resultOf(admin.callRemote(commands.ForgetBackend, name="b")) == {}
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
