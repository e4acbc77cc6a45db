"""
Balancers found, not listed (issue 20, item 2): a backend with
``--balancer srv:_cluster-control._tcp.cluster.test`` asks an authoritative
twisted.names server on loopback (tests/dnsserver.py) whose zone the test
rewrites.  A balancer added to the record gets the backend's registration
within one lookup period, one taken out is let go, and a failed channel
makes the backend look again at once rather than at the next period.  A
short name is looked up under resolv.conf's search domains, as the
Kubernetes manifests name the balancers' headless Service.
"""

import os
import sys

import pytest

from twistedcluster.localcluster import LocalCluster, Process, freePort, waitFor

pytestmark = pytest.mark.e2e

RECORD = "_cluster-control._tcp.cluster.test"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Zone:
    """
    The DNS server's zone file, rewritten atomically; and the server.
    """

    def __init__(self, workdir, record=RECORD):
        self.record = record
        self.path = workdir / "cluster.test.py"
        self.serial = 0
        self.write([])
        self.port = freePort()
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = Process(
            "dns", [sys.executable, "-m", "tests.dnsserver", str(self.port), str(self.path)],
            workdir / "dns.log", env=env, cwd=ROOT,
        )
        waitFor(lambda: "dns server on" in self.process.logText(), 20, "the DNS server")

    def write(self, controlPorts):
        """
        The record names one host per balancer, each 127.0.0.1.
        """
        self.serial += 1
        lines = [
            "zone = [",
            f"    SOA('cluster.test', mname='ns.cluster.test', rname='root.cluster.test', "
            f"serial={self.serial}, refresh=1, retry=1, expire=60, minimum=0, ttl=0),",
        ]
        for i, port in enumerate(controlPorts):
            lines.append(f"    SRV('{self.record}', 0, 0, {port}, 'lb{i}.cluster.test', ttl=0),")
            lines.append(f"    A('lb{i}.cluster.test', '127.0.0.1', ttl=0),")
        lines.append("]")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)


def backendArgs(zone, interval):
    return [f"--balancer=srv:{RECORD}", f"--dns-server=127.0.0.1:{zone.port}",
            f"--srv-interval={interval}", "--report-interval=0.2"]


def test_balancers_added_to_the_record_get_registrations_and_removed_ones_are_let_go(tmp_path):
    zone = Zone(tmp_path)
    a, b = LocalCluster(tmp_path / "a"), LocalCluster(tmp_path / "b")
    try:
        a.startBalancer()
        b.startBalancer()
        zone.write([a.controlPort])
        a.startBackend("web1", balancers=[], extra=backendArgs(zone, 1))
        a.waitUp(["web1"])
        assert "web1" not in b.quickStatus()

        zone.write([a.controlPort, b.controlPort])
        b.waitUp(["web1"], timeout=5)  # one period (1 s), with room

        zone.write([b.controlPort])
        a.waitForStatus(lambda s: s["web1"]["state"] == "down", 5, "web1 let go by a")
        assert b.quickStatus()["web1"]["state"] == "up"
        log = a.processes["web1"].logText()
        assert "no longer in SRV" in log and "found in SRV" in log
    finally:
        a.stopAll()
        b.stopAll()
        zone.process.stop()


def test_a_failed_channel_looks_the_record_up_again_at_once(tmp_path):
    zone = Zone(tmp_path)
    a, c = LocalCluster(tmp_path / "a"), LocalCluster(tmp_path / "c")
    try:
        a.startBalancer()
        zone.write([a.controlPort])
        a.startBackend("web1", balancers=[], extra=backendArgs(zone, 600))
        a.waitUp(["web1"])

        # The balancer moves: the old one stops, a new one on other ports is
        # in the record.  The next period is ten minutes away.
        c.startBalancer()
        zone.write([c.controlPort])
        a.processes["balancer"].stop()
        c.waitUp(["web1"], timeout=10)
    finally:
        a.stopAll()
        c.stopAll()
        zone.process.stop()


def test_a_short_name_is_found_under_a_search_domain(tmp_path):
    """
    As in a Kubernetes pod: resolv.conf's search list and ndots:5, and the
    headless Service's short name; the first search domain has no such
    name (an authoritative NXDOMAIN), the second has.
    """
    zone = Zone(tmp_path, record="_cluster-control._tcp.peers.shop.cluster.test")
    resolvConf = tmp_path / "resolv.conf"
    resolvConf.write_text(
        "nameserver 127.0.0.1\n"
        "search other.cluster.test shop.cluster.test cluster.test\n"
        "options ndots:5\n"
    )
    a = LocalCluster(tmp_path / "a")
    try:
        a.startBalancer()
        zone.write([a.controlPort])
        a.startBackend("web1", balancers=[], extra=[
            "--balancer=srv:_cluster-control._tcp.peers", f"--resolv-conf={resolvConf}",
            f"--dns-server=127.0.0.1:{zone.port}", "--srv-interval=1",
            "--report-interval=0.2"])
        a.waitUp(["web1"])
        log = a.processes["web1"].logText()
        assert "found as _cluster-control._tcp.peers.shop.cluster.test" in log, log
        assert "search other.cluster.test shop.cluster.test cluster.test, ndots 5" in log
    finally:
        a.stopAll()
        zone.process.stop()
