"""
Operators' settings shared by several balancers on a real etcd (issue 20,
item 1): real etcd members, real twistd balancers and backends, the real
cluster-admin.  A change made through one balancer reaches the other within
a second (the watch); a restarted balancer starts with the settings; with
etcd away, routing goes on, changes are refused with their own exit status,
and a balancer that started meanwhile catches up when etcd is back.
"""

import json
import time

import pytest

from tests.etcd import Etcd, needsEtcd
from twistedcluster.cli.admin import EXIT_STORE_UNAVAILABLE
from twistedcluster.localcluster import LocalCluster, echoOnce, freePort, waitFor

pytestmark = [pytest.mark.e2e, needsEtcd]

#: How soon a change made on one balancer must show on another.
PROPAGATION = 1.0


def balancers(tmp_path, etcd, prefix="/test/", more=()):
    a, b = LocalCluster(tmp_path / "a"), LocalCluster(tmp_path / "b")
    extra = [f"--state-store={etcd.spec}", f"--state-prefix={prefix}", "--check-interval=0.2",
             "--rise=1", *more]
    a.startBalancer(extra=extra)
    b.startBalancer(extra=extra)
    return a, b, extra


def backendFor(a, b, name):
    return a.startBackend(
        name,
        balancers=[f"tcp:host=127.0.0.1:port={a.controlPort}",
                   f"tcp:host=127.0.0.1:port={b.controlPort}"],
        extra=["--report-interval=0.2"],
    )


def seenWithin(cluster, predicate, what, timeout=PROPAGATION):
    """
    Poll C{cluster}'s status (in-process, no new process) until
    C{predicate} holds; return the seconds it took.
    """
    start = time.monotonic()
    waitFor(lambda: predicate(cluster.quickStatus()), timeout, what, interval=0.01)
    return time.monotonic() - start


def policyOf(cluster):
    return cluster.adminRun("policy").stdout.strip()


def stopAll(*clusters):
    for c in clusters:
        c.stopAll()


def test_changes_through_one_balancer_reach_the_other_within_a_second(tmp_path):
    etcd = Etcd(tmp_path / "etcd")
    etcd.start()
    a = b = None
    try:
        a, b, extra = balancers(tmp_path, etcd)
        web1 = backendFor(a, b, "web1")
        a.waitUp(["web1"])
        b.waitUp(["web1"])
        took = {}

        a.adminRun("drain", "web1")
        took["drain"] = seenWithin(b, lambda s: s["web1"]["state"] == "draining", "drain on b")
        assert etcd.get("/test/policy") is None  # each keeps its --policy until one is set
        b.adminRun("weight", "web1", "5")
        took["weight"] = seenWithin(a, lambda s: s["web1"]["weight"] == 5, "weight on a")
        b.adminRun("enable", "web1")
        took["enable"] = seenWithin(a, lambda s: s["web1"]["state"] == "up", "enable on a")
        a.adminRun("disable", "web1")
        took["disable"] = seenWithin(b, lambda s: s["web1"]["state"] == "disabled", "disable on b")
        b.adminRun("enable", "web1")
        seenWithin(a, lambda s: s["web1"]["state"] == "up", "enable on a")

        r = a.adminRun("policy", "round-robin")
        start = time.monotonic()
        waitFor(lambda: policyOf(b) == "round-robin", 5, "policy on b")
        took["policy"] = time.monotonic() - start  # includes cluster-admin's own start

        b.adminRun("add", "s1", f"127.0.0.1:{web1.port}", "--capacity", "7")
        took["add"] = seenWithin(
            a, lambda s: s.get("s1", {}).get("static") and s["s1"]["capacity"] == 7, "s1 on a"
        )
        a.waitForStatus(lambda s: s["s1"]["state"] == "up", 10, "s1 up on a")
        a.adminRun("remove", "s1")
        took["remove"] = seenWithin(b, lambda s: "s1" not in s, "s1 gone from b")

        # The state is in etcd as one key per setting.
        assert json.loads(etcd.get("/test/backends/web1")) == {
            "host": "127.0.0.1", "port": web1.port, "admin": "enabled", "weight": 5}
        assert json.loads(etcd.get("/test/policy")) == "round-robin"

        # A restarted balancer starts with the settings: the first status it
        # answers has them.
        b.processes["balancer"].stop()
        b.startBalancer(b.port, b.controlPort, b.adminPort, extra=extra)
        assert b.quickStatus()["web1"]["weight"] == 5
        assert policyOf(b) == "round-robin"
        b.waitUp(["web1"])
        a.adminRun("drain", "web1")
        took["drain after restart"] = seenWithin(
            b, lambda s: s["web1"]["state"] == "draining", "drain on restarted b"
        )

        # forget: the backend gone, both drop it.
        web1.stop()
        a.waitForStatus(lambda s: s["web1"]["state"] == "down", 15, "web1 down on a")
        b.waitForStatus(lambda s: s["web1"]["state"] == "down", 15, "web1 down on b")
        b.adminRun("forget", "web1")
        took["forget"] = seenWithin(a, lambda s: "web1" not in s, "web1 forgotten on a")
        assert etcd.get("/test/backends/web1") is None
        print("propagation seconds:", {k: round(v, 3) for k, v in took.items()})
    finally:
        stopAll(*(c for c in (a, b) if c is not None))
        etcd.kill()


def test_etcd_away_routing_goes_on_changes_refused_then_all_catch_up(tmp_path):
    etcd = Etcd(tmp_path / "etcd")
    etcd.start()
    a = b = None
    try:
        a, b, extra = balancers(tmp_path, etcd)
        backendFor(a, b, "web1")
        backendFor(a, b, "web2")
        a.waitUp(["web1", "web2"])
        b.waitUp(["web1", "web2"])
        a.adminRun("weight", "web1", "3")
        seenWithin(b, lambda s: s["web1"]["weight"] == 3, "weight on b")

        etcd.kill()
        # Changes are refused, with their own status, naming the store.
        r = waitFor(
            lambda: (lambda r: r if r.returncode == EXIT_STORE_UNAVAILABLE else None)(
                a.adminRun("drain", "web2", check=False)),
            10, "drain refused",
        )
        assert "state store" in r.stderr and "refused" in r.stderr, r.stderr
        r = b.adminRun("policy", "round-robin", check=False)
        assert r.returncode == EXIT_STORE_UNAVAILABLE, (r.returncode, r.stderr)
        # Nothing changed, and both go on routing.
        assert a.quickStatus()["web2"]["state"] == "up"
        assert policyOf(b) == "least-load"
        for c in (a, b):
            for i in range(4):
                assert echoOnce("127.0.0.1", c.port, b"still %d" % i) == b"still %d" % i

        # A balancer (re)started while etcd is away starts without the
        # settings and routes on...
        b.processes["balancer"].stop()
        b.startBalancer(b.port, b.controlPort, b.adminPort, extra=extra)
        b.waitUp(["web1", "web2"])
        assert b.quickStatus()["web1"]["weight"] == 1
        assert echoOnce("127.0.0.1", b.port, b"b back") == b"b back"

        # ...and catches up once etcd is back; changes are taken again.
        etcd.start()
        b.waitForStatus(lambda s: s["web1"]["weight"] == 3, 20, "b caught up")
        waitFor(lambda: a.adminRun("drain", "web2", check=False).returncode == 0, 20,
                "drain taken again")
        seenWithin(b, lambda s: s["web2"]["state"] == "draining", "drain on b")
    finally:
        stopAll(*(c for c in (a, b) if c is not None))
        etcd.kill()


def test_three_etcd_members_one_killed_then_all(tmp_path):
    etcd = Etcd(tmp_path / "etcd", size=3)
    etcd.start()
    a = b = None
    try:
        a, b, extra = balancers(tmp_path, etcd)
        backendFor(a, b, "web1")
        backendFor(a, b, "web2")
        a.waitUp(["web1", "web2"])
        b.waitUp(["web1", "web2"])

        # The member both balancers watch goes: changes still apply.
        etcd.members[0].kill()
        waitFor(lambda: a.adminRun("weight", "web1", "4", check=False).returncode == 0, 20,
                "a change with one member down")
        seenWithin(b, lambda s: s["web1"]["weight"] == 4, "weight on b")
        b.adminRun("drain", "web2")
        seenWithin(a, lambda s: s["web2"]["state"] == "draining", "drain on a")

        # All go: serving goes on, changes are refused.
        for m in etcd.members:
            m.kill()
        waitFor(lambda: a.adminRun("enable", "web2", check=False).returncode
                == EXIT_STORE_UNAVAILABLE, 10, "enable refused")
        assert b.adminRun("weight", "web1", "9", check=False).returncode == EXIT_STORE_UNAVAILABLE
        assert a.quickStatus()["web2"]["state"] == "draining"
        assert b.quickStatus()["web1"]["weight"] == 4
        for c in (a, b):
            assert echoOnce("127.0.0.1", c.port, b"on") == b"on"
        b.processes["balancer"].stop()
        b.startBalancer(b.port, b.controlPort, b.adminPort, extra=extra)

        # All back: every balancer catches up, changes are taken again.
        etcd.start()
        b.waitForStatus(lambda s: s.get("web1", {}).get("weight") == 4
                        and s.get("web2", {}).get("state") in ("draining", "down"),
                        30, "b caught up")
        waitFor(lambda: b.adminRun("enable", "web2", check=False).returncode == 0, 30,
                "enable taken again")
        seenWithin(a, lambda s: s["web2"]["state"] == "up", "enable on a")
    finally:
        stopAll(*(c for c in (a, b) if c is not None))
        etcd.kill()


def test_etcd_over_tls_with_client_certificates(tmp_path):
    from tests.certificates import Authority, writePair

    ca = Authority()
    caPath = ca.writeCA(tmp_path / "ca")
    serverKey, serverCert = writePair(tmp_path, "etcd", *ca.issue("etcd", ips=["127.0.0.1"],
                                                                     alsoClient=True))
    clientKey, clientCert = writePair(tmp_path, "balancer", *ca.issue("balancer", client=True))
    etcd = Etcd(tmp_path / "etcd", tls=(serverCert, serverKey, caPath))
    etcd.start()
    a = b = None
    try:
        tls = f"--state-store-tls=ca={caPath},cert={clientCert},key={clientKey}"
        a, b = LocalCluster(tmp_path / "a"), LocalCluster(tmp_path / "b")
        extra = [f"--state-store={etcd.spec}", "--state-prefix=/tls/", tls]
        a.startBalancer(extra=extra)
        b.startBalancer(extra=extra)
        backendFor(a, b, "web1")
        a.waitUp(["web1"])
        b.waitUp(["web1"])
        a.adminRun("drain", "web1")
        seenWithin(b, lambda s: s["web1"]["state"] == "draining", "drain on b over TLS")
        # The start-up read speaks TLS too: a restarted balancer has it at once.
        b.processes["balancer"].stop()
        b.startBalancer(b.port, b.controlPort, b.adminPort, extra=extra)
        assert b.quickStatus()["web1"]["state"] in ("draining", "down")
        assert "1 key(s) under /tls/ applied" in b.processes["balancer"].logText()

        # A balancer that does not trust etcd's certificate takes no change.
        other = Authority().writeCA(tmp_path / "other")
        c = LocalCluster(tmp_path / "c")
        c.startBalancer(extra=[f"--state-store={etcd.spec}", "--state-prefix=/tls/",
                               f"--state-store-tls=ca={other},cert={clientCert},key={clientKey}"])
        try:
            r = c.adminRun("policy", "round-robin", check=False)
            assert r.returncode == EXIT_STORE_UNAVAILABLE, (r.returncode, r.stderr)
        finally:
            c.stopAll()
    finally:
        stopAll(*(c for c in (a, b) if c is not None))
        etcd.kill()


def passwordFile(path, password):
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def test_etcd_with_user_and_password_and_expiring_tokens(tmp_path):
    """
    etcd with tokens that expire 2 s after their last use: balancers given
    a user and password share changes while etcd's authentication is off,
    and once it is turned on; they authenticate again once their token has
    expired, and after etcd restarted; wrong or missing
    credentials, or a prefix the user may not touch, stop a balancer at
    start with its own exit status and a line that says what to do.
    """
    from twistedcluster.balancer.statestore import EXIT_STORE_AUTH
    from twistedcluster.localcluster import twistdCommand

    etcd = Etcd(tmp_path / "etcd", tokenTTL=2)
    etcd.start()
    good = passwordFile(tmp_path / "password", "lb-password")
    a = b = None
    try:
        # Credentials first, authentication turned on in etcd after: the
        # order an operator takes to turn it on without a refused change.
        a, b, extra = balancers(tmp_path, etcd, "/auth/", more=[
            "--state-store-user=lb", f"--state-store-password-file={good}"])
        backendFor(a, b, "web1")
        a.waitUp(["web1"])
        b.waitUp(["web1"])
        a.adminRun("weight", "web1", "2")
        seenWithin(b, lambda s: s["web1"]["weight"] == 2, "weight on b, authentication off")
        etcd.enableAuth("lb", "lb-password", "/auth/")
        a.adminRun("drain", "web1")  # authenticates: now it gets a token
        seenWithin(b, lambda s: s["web1"]["state"] == "draining", "drain on b")
        assert json.loads(etcd.get("/auth/backends/web1"))["admin"] == "draining"

        # Idle for longer than the token lives: the next change
        # authenticates again, and goes through.
        time.sleep(3)
        r = a.adminRun("weight", "web1", "5", check=False)
        assert r.returncode == 0, r.stderr
        seenWithin(b, lambda s: s["web1"]["weight"] == 5, "weight on b")
        assert "token had expired; authenticated again as lb" in \
            a.processes["balancer"].logText()
        # A restarted balancer reads the settings with its credentials.
        b.processes["balancer"].stop()
        b.startBalancer(b.port, b.controlPort, b.adminPort, extra=extra)
        assert b.quickStatus()["web1"]["weight"] == 5
        # etcd restarted forgets every token: the watches come back with new ones.
        etcd.kill()
        etcd.start()
        waitFor(lambda: b.adminRun("enable", "web1", check=False).returncode == 0, 20,
                "a change after etcd restarted")
        seenWithin(a, lambda s: s["web1"]["state"] == "up", "enable on a")

        def refused(name, args):
            c = LocalCluster(tmp_path / ("refused-" + name))
            proc = c._start("balancer", twistdCommand("cluster-balancer", [
                f"--listen=tcp:{freePort()}:interface=127.0.0.1",
                f"--control=tcp:{freePort()}:interface=127.0.0.1",
                f"--admin=tcp:{freePort()}:interface=127.0.0.1",
                f"--state-store={etcd.spec}", *args]))
            try:
                status = proc.popen.wait(30)
            finally:
                proc.stop()
            return status, proc.logText()

        wrong = passwordFile(tmp_path / "wrong", "not-the-password")
        status, text = refused("wrong", ["--state-prefix=/auth/", "--state-store-user=lb",
                                         f"--state-store-password-file={wrong}"])
        assert status == EXIT_STORE_AUTH, (status, text)
        assert "etcd refused user 'lb': wrong user or password" in text, text
        status, text = refused("none", ["--state-prefix=/auth/"])
        assert status == EXIT_STORE_AUTH, (status, text)
        assert "give --state-store-user and --state-store-password-file" in text, text
        status, text = refused("elsewhere", ["--state-prefix=/other/", "--state-store-user=lb",
                                             f"--state-store-password-file={good}"])
        assert status == EXIT_STORE_AUTH, (status, text)
        assert "may not read and write '/other/'" in text, text
    finally:
        stopAll(*(c for c in (a, b) if c is not None))
        etcd.kill()
