"""
Seeing the cluster, end to end with real processes on 127.0.0.1: the access
log, /metrics as a scraper reads it, the health endpoints, the status page
in a real browser, and cluster-admin top.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from twistedcluster.localcluster import LocalCluster, echoOnce, freePort, waitFor

pytestmark = pytest.mark.e2e


def readRecords(path, count, timeout=10.0):
    def enough():
        if not path.exists():
            return None
        lines = path.read_text().splitlines()
        return lines if len(lines) >= count else None

    return [json.loads(line) for line in waitFor(enough, timeout, f"{count} access log record(s)")]


def test_access_log_records_each_connection_as_it_ends(tmp_path):
    lc = LocalCluster(tmp_path)
    logPath = tmp_path / "access.jsonl"
    redirectPort = freePort()
    try:
        lc.startBalancer(
            extra=[
                f"--access-log={logPath}",
                "--access-log-format=json",
                f"--redirect=tcp:{redirectPort}:interface=127.0.0.1",
                "--queue-size=0",
            ]
        )
        # No backend yet: refused by both listeners.
        with socket.create_connection(("127.0.0.1", lc.port), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(100) == b""
        with socket.create_connection(("127.0.0.1", redirectPort), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(100) == b"ERROR no-backend\r\n"
        lc.startBackend("web1", extra=["--report-interval=0.2"])
        lc.waitUp(["web1"])
        assert echoOnce("127.0.0.1", lc.port, b"x" * 1000) == b"x" * 1000
        with socket.create_connection(("127.0.0.1", redirectPort), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(100).endswith(b"\r\n")
        records = readRecords(logPath, 4)
        byEnd = {(r["listener"], r["end"]): r for r in records}
        refused = byEnd[("proxy", "refused_no_backend")]
        assert refused["backend"] is None and refused["attempts"] == 0
        assert byEnd[("redirect", "refused_no_backend")]["bytes_out"] == len(b"ERROR no-backend\r\n")
        served = byEnd[("proxy", "client_closed")]
        assert served["backend"] == "web1" and served["attempts"] == 1
        assert served["bytes_in"] == served["bytes_out"] == 1000
        assert 0 <= served["connect_ms"] <= served["duration_ms"]
        assert served["client"].startswith("127.0.0.1:")
        assert byEnd[("redirect", "answered")]["backend"] == "web1"
    finally:
        lc.stopAll()


def test_access_log_text_to_standard_output_and_drained_on_stop(tmp_path):
    lc = LocalCluster(tmp_path)
    try:
        balancer = lc.startBalancer(extra=["--access-log=-", "--drain-timeout=0.5"])
        lc.startBackend("web1", extra=["--report-interval=0.2"])
        lc.waitUp(["web1"])
        held = socket.create_connection(("127.0.0.1", lc.port), timeout=5)
        held.sendall(b"ping")
        held.settimeout(5)
        assert held.recv(4) == b"ping"
        # Stopped with a client still connected: reset at the drain deadline,
        # and its record written before the balancer exits.
        balancer.stop(timeout=15)
        held.close()
        lines = [line for line in balancer.logText().splitlines() if " proxy client=" in line]
        assert len(lines) == 1, balancer.logText()[-2000:]
        assert "backend=web1 attempts=1 " in lines[0]
        assert lines[0].endswith("bytes_in=4 bytes_out=4 end=drained")
    finally:
        lc.stopAll()


def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_parse_as_a_scraper_reads_them_and_readyz_follows_the_backends(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    lc = LocalCluster(tmp_path)
    port = freePort()
    base = f"http://127.0.0.1:{port}"
    try:
        lc.startBalancer(extra=[f"--metrics=tcp:{port}:interface=127.0.0.1"])
        waitFor(lambda: get(f"{base}/healthz")[0] == 200, 10, "/healthz")
        assert get(f"{base}/readyz") == (503, "not ready: no backend has registered\n")
        lc.startBackend("web1", extra=["--report-interval=0.2"])
        lc.waitUp(["web1"])
        assert waitFor(lambda: get(f"{base}/readyz") == (200, "ready\n"), 10, "/readyz ready")
        for _ in range(3):
            assert echoOnce("127.0.0.1", lc.port, b"hello") == b"hello"

        def families():
            status, text = get(f"{base}/metrics")
            assert status == 200
            return {f.name: f for f in text_string_to_metric_families(text)}

        def ended():
            fams = families()
            values = {
                tuple(sorted(s.labels.items())): s.value
                for s in fams["twistedcluster_connections_ended"].samples
            }
            return fams if values.get((("end", "client_closed"), ("listener", "proxy"))) == 3 else None

        fams = waitFor(ended, 10, "three connections counted")
        for name in (
            "twistedcluster_backend_state",
            "twistedcluster_backend_routed",  # the parser names counters without _total
            "twistedcluster_backend_bytes",
            "twistedcluster_connect_seconds",
            "twistedcluster_connection_duration_seconds",
            "twistedcluster_queue_waits",
            "twistedcluster_ejections",
            "twistedcluster_readmissions",
            "twistedcluster_reports_received",
            "twistedcluster_backend_report_age_seconds",
            "twistedcluster_control_connections",
            "twistedcluster_admin_connections",
            "process_cpu_seconds",
            "process_resident_memory_bytes",
            "process_open_fds",
        ):
            assert name in fams, name
        moved = {
            s.labels["direction"]: s.value
            for s in fams["twistedcluster_backend_bytes"].samples
            if s.labels.get("backend") == "web1"
        }
        assert moved == {"to_backend": 15, "from_backend": 15}
        [age] = fams["twistedcluster_backend_report_age_seconds"].samples
        assert 0 <= age.value < 5
        count = [s for s in fams["twistedcluster_connect_seconds"].samples if s.name.endswith("_count")]
        assert count[0].value == 3
        # The backend goes: not ready, with the reason.
        lc.processes["web1"].stop()
        assert waitFor(
            lambda: get(f"{base}/readyz")[1].startswith("not ready: no backend up"), 10, "/readyz not ready"
        )
    finally:
        lc.stopAll()


def test_backend_metrics_show_its_connections_and_each_balancers_channel(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    lc = LocalCluster(tmp_path)
    port = freePort()
    absent = freePort()
    try:
        lc.startBalancer()
        lc.startBackend(
            "web1",
            extra=[
                f"--metrics=tcp:{port}:interface=127.0.0.1",
                "--report-interval=0.2",
                # A second balancer that is not there: its channel shows 0.
                f"--balancer=tcp:host=127.0.0.1:port={absent}",
            ],
            balancers=[f"tcp:host=127.0.0.1:port={lc.controlPort}"],
        )
        lc.waitUp(["web1"])
        held = socket.create_connection(("127.0.0.1", lc.port), timeout=5)
        held.sendall(b"x")
        held.settimeout(5)
        assert held.recv(1) == b"x"

        def samples():
            status, text = get(f"http://127.0.0.1:{port}/metrics")
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }

        got = waitFor(
            lambda: (lambda s: s if s.get(("twistedcluster_service_connections", ())) == 1 else None)(samples()),
            10,
            "the backend's metrics to count the connection",
        )
        held.close()
        assert got[("twistedcluster_service_load", ())] == 1 / 1000
        registered = f"tcp:host=127.0.0.1:port={lc.controlPort}"
        assert got[("twistedcluster_balancer_registered", (("balancer", registered),))] == 1
        missing = f"tcp:host=127.0.0.1:port={absent}"
        assert got[("twistedcluster_balancer_registered", (("balancer", missing),))] == 0
        assert got[("process_open_fds", ())] > 0
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    finally:
        lc.stopAll()


def headlessChromium():
    """
    Selenium driving Debian's chromium through its chromium-driver (no
    browser download); skipped, saying why, where they are not installed.
    """
    import shutil

    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "headless Chromium is not installed: apt-get install chromium "
            "chromium-driver (.ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def test_status_page_in_a_real_browser_shows_a_drain_within_two_seconds(tmp_path):
    from selenium.webdriver.common.by import By

    lc = LocalCluster(tmp_path)
    port = freePort()
    browser = headlessChromium()
    try:
        lc.startBalancer(extra=[f"--metrics=tcp:{port}:interface=127.0.0.1"])
        # A name that is a JavaScript object's own property (the page's
        # rates once showed NaN for it).
        for name in ("web1", "web2", "__proto__"):
            lc.startBackend(name, extra=["--report-interval=0.2", "--capacity=10"])
        lc.waitUp(["web1", "web2", "__proto__"])
        held = [socket.create_connection(("127.0.0.1", lc.port), timeout=5) for _ in range(4)]
        browser.set_page_load_timeout(10)
        browser.get(f"http://127.0.0.1:{port}/")

        def states():
            rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-backend]")
            return {r.get_attribute("data-backend"): r.get_attribute("data-state") for r in rows}

        waitFor(lambda: states() == {"web1": "up", "web2": "up", "__proto__": "up"}, 10, "three backends up on the page")
        assert browser.find_element(By.ID, "policy").text == "least-load"
        assert browser.find_element(By.ID, "ready").text == "ready"
        lc.adminRun("drain", "web1")
        drained = time.monotonic()

        def shown():
            row = browser.find_element(By.CSS_SELECTOR, 'tr[data-backend="web1"]')
            return row.get_attribute("data-state") == "draining" and "draining" in row.text

        waitFor(shown, 5, "web1 draining on the page")
        elapsed = time.monotonic() - drained
        print(f"status page: the drain showed {elapsed:.2f} s after cluster-admin returned")
        assert elapsed <= 2.0
        # Rates need two polls; the load bars are drawn.
        waitFor(lambda: browser.find_element(By.ID, "rate").text != "-", 5, "a routed rate")
        assert "NaN" not in browser.find_element(By.TAG_NAME, "body").text
        assert len(browser.find_elements(By.CSS_SELECTOR, ".bar span")) == 3
        assert browser.save_screenshot(str(tmp_path / "status-page.png"))
        # A phone: the table becomes one card per backend, nothing wider
        # than the screen.
        browser.set_window_size(390, 844)
        waitFor(
            lambda: browser.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            ),
            5,
            "the page to fit a phone's width",
        )
        assert browser.find_element(By.CSS_SELECTOR, "thead").is_displayed() is False
        assert browser.save_screenshot(str(tmp_path / "status-page-phone.png"))
        for s in held:
            s.close()
    finally:
        browser.quit()
        lc.stopAll()


def test_cluster_admin_top_shows_views_and_quits_on_q(tmp_path):
    import os
    import pty
    import select

    from twistedcluster.localcluster import adminCommand

    lc = LocalCluster(tmp_path)
    try:
        lc.startBalancer()
        lc.startBackend("web1", extra=["--report-interval=0.2", "--capacity=10"])
        lc.startBackend("web2", extra=["--report-interval=0.2", "--capacity=10"])
        lc.waitUp(["web1", "web2"])
        held = [socket.create_connection(("127.0.0.1", lc.port), timeout=5) for _ in range(2)]
        lc.adminRun("drain", "web2")
        # Non-interactive: three views, one after another, then exit 0.
        result = lc.adminRun("top", "--iterations", "3", "--interval", "0.2")
        views = result.stdout.split("cluster-admin top ")[1:]
        assert len(views) == 3, result.stdout
        assert "policy: least-load  backends: 2 (1 up)" in views[0]
        lines = {line.split()[0]: line for line in views[-1].splitlines() if line.startswith("web")}
        assert " draining " in lines["web2"] and " up " in lines["web1"]
        assert "ROUTED/S" in views[0] and "%" in lines["web1"]
        once = lc.adminRun("top", "--once")
        assert once.stdout.count("cluster-admin top ") == 1
        # On a terminal: the screen is redrawn until q.
        pid, fd = pty.fork()
        if pid == 0:  # the child: cluster-admin top on the pty
            argv = adminCommand(lc.admin, ["top", "--interval", "0.2"])
            os.execvpe(argv[0], argv, lc.env)
        seen = b""
        deadline = time.monotonic() + 20
        try:
            while seen.count(b"\x1b[2J") < 2 and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.5)[0]:
                    seen += os.read(fd, 65536)
            assert seen.count(b"\x1b[2J") >= 2, seen[-2000:]
            assert b"(q quits)" in seen
            os.write(fd, b"q")
            status = None
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if select.select([fd], [], [], 0.2)[0]:
                    try:
                        os.read(fd, 65536)
                    except OSError:
                        pass
            assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            pid = None
        finally:
            if pid is not None:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            os.close(fd)
        for s in held:
            s.close()
    finally:
        lc.stopAll()
