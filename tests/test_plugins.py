"""
The twistd plugins: discoverable, options parsed with clear errors, and the
plugin module imports no reactor.
"""

import subprocess
import sys

import pytest
from twisted.python import usage

from twistedcluster.backend import service as backend

from twistedcluster.balancer import service as balancer
from twistedcluster.localcluster import twistdCommand


def test_twistd_help_lists_both_plugins():
    out = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        capture_output=True, text=True, timeout=60,
    ).stdout
    assert "cluster-balancer" in out
    assert "cluster-backend" in out


def test_plugin_module_does_not_import_the_reactor():
    code = (
        "import sys; from twisted.plugin import getPlugins; "
        "from twisted.application.service import IServiceMaker; "
        "from twisted import plugins; "
        "names = [p.tapname for p in getPlugins(IServiceMaker, plugins)]; "
        "assert 'cluster-balancer' in names and 'cluster-backend' in names, names; "
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def parse(options, *args):
    o = options()
    o.parseOptions(list(args))
    return o


def test_balancer_defaults_match_the_contract():
    o = parse(balancer.Options)
    assert o["listen"] == "tcp:8000"
    assert o["redirect"] is None
    assert o["control"] == "tcp:8100:interface=127.0.0.1"
    assert o["admin"] == "tcp:8101:interface=127.0.0.1"
    assert o["policy"] == "least-load"


def test_backend_defaults_match_the_contract():
    o = parse(backend.Options)
    assert o["listen"] == "tcp:9000"
    assert o["balancers"] == ["tcp:host=127.0.0.1:port=8100"]
    assert o["service"] == "echo"
    assert o["advertise"] is None


def test_backend_takes_several_balancers_and_an_ipv6_advertise():
    o = parse(
        backend.Options,
        "--balancer=tcp:host=127.0.0.1:port=1",
        "--balancer=tcp:host=127.0.0.2:port=2",
        "--advertise=[::1]:9005",
    )
    assert o["balancers"] == ["tcp:host=127.0.0.1:port=1", "tcp:host=127.0.0.2:port=2"]
    assert o["advertise"] == ("::1", 9005)


@pytest.mark.parametrize(
    "options, args, message",
    [
        (balancer.Options, ["--policy=fastest"], "unknown policy 'fastest'"),
        (balancer.Options, ["--connect-timeout=0"], "must be > 0"),
        (backend.Options, ["--advertise=nonsense"], "is not HOST:PORT"),
        (balancer.Options, ["--backend=web1=127.0.0.1:80,weight=300"], "weight: must be 0..256"),
        (balancer.Options, ["--backend=web1=127.0.0.1:80,colour=blue"], "unknown key 'colour'"),
        (balancer.Options, ["--backend=a=127.0.0.1:1", "--backend=a=127.0.0.1:2"], "given twice"),
        (backend.Options, ["--service=no.such.module.factory"], "No module named 'no'.*PYTHONPATH"),
        (backend.Options, ["--service=os.path.join"], "not a protocol factory"),
        (backend.Options, ["--name=has space"], "white space"),
        (backend.Options, ["--capacity=-3"], "must be > 0"),
        (backend.Options, ["--listen=unix:/tmp/x.sock"], "give --advertise"),
    ],
)
def test_bad_options_are_clear_errors(options, args, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(options, *args)


def test_service_may_name_a_factory_callable():
    o = parse(backend.Options, "--service=twistedcluster.backend.echo.echoFactory")
    from twistedcluster.backend.echo import Echo

    assert o["factory"].protocol is Echo


def test_port_in_use_exits_with_the_reason(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            twistdCommand("cluster-balancer", [
                f"--listen=tcp:{port}:interface=127.0.0.1",
                "--control=tcp:0:interface=127.0.0.1",
                "--admin=tcp:0:interface=127.0.0.1",
            ]),
            capture_output=True, text=True, timeout=60,
        )
    assert r.returncode != 0
    assert "address already in use" in r.stdout + r.stderr


def test_options_the_service_cannot_use_are_one_line_not_a_traceback(tmp_path):
    # Found by makeService (after twistd parsed the options): twistd itself
    # would print a traceback.  A takeover refused is one of these.
    # Endpoint strings Twisted cannot make an endpoint of: its parsers
    # raise ValueError, KeyError, TypeError or OSError, each once a
    # traceback (a typo in any listener's string).
    missing = tmp_path / "missing.pem"
    for plugin, args, message in [
        ("cluster-balancer", ["--listen=tcp:18000:interface=127.0.0.1", "--backend=127.0.0.1:18000"],
         "cluster-balancer: --backend 127.0.0.1:18000: 127.0.0.1:18000 is this balancer's own proxy listener"),
        ("cluster-balancer", ["--listen=garbage"], "cluster-balancer: --listen garbage: Unknown endpoint type"),
        ("cluster-balancer", ["--listen=tcp:0", "--metrics=tcp:xx"], "cluster-balancer: --metrics tcp:xx: invalid literal"),
        ("cluster-balancer", ["--listen=systemd:domain=INET:name=proxy"],
         "cluster-balancer: --listen systemd:domain=INET:name=proxy: systemd passed no socket named 'proxy'"),
        ("cluster-balancer", [f"--listen=ssl:0:privateKey={missing}"],
         f"cluster-balancer: --listen ssl:0:privateKey={missing}: No such file or directory: {missing}"),
        ("cluster-balancer", [f"--state-file={tmp_path}/none/state.json"],
         f"cluster-balancer: state file {tmp_path}/none/state.json: its folder {tmp_path}/none does not exist"),
        ("cluster-backend", ["--listen=garbage"], "cluster-backend: --listen garbage: Unknown endpoint type"),
        ("cluster-backend", ["--listen=tcp:0", "--balancer=tcp:8100"],
         "cluster-backend: --balancer tcp:8100: a client endpoint names where to connect"),
    ]:
        common = ["--control=tcp:0:interface=127.0.0.1", "--admin=tcp:0:interface=127.0.0.1"]
        r = subprocess.run(
            twistdCommand(plugin, [*(common if plugin == "cluster-balancer" else []), *args]),
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "Traceback" not in r.stdout + r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), r.stderr


@pytest.mark.parametrize(
    "service, expected",
    [("echo", "LeanEPollReactor"), ("twistedcluster.backend.echo.echoFactory", "EPollReactor")],
)
def test_backend_runs_the_lean_reactor_only_for_the_built_in_echo(tmp_path, service, expected):
    # A service of one's own may log with the legacy context that the lean
    # reactor leaves out: it keeps Twisted's default reactor.
    import re

    from twistedcluster.localcluster import Process, freePort, waitFor

    proc = Process(
        "backend",
        twistdCommand("cluster-backend", [
            f"--listen=tcp:{freePort()}:interface=127.0.0.1",
            f"--service={service}",
            # Nothing listens there: the backend keeps retrying, and serves.
            f"--balancer=tcp:host=127.0.0.1:port={freePort()}",
        ]),
        tmp_path / "backend.log",
    )
    try:
        found = []

        def logged():
            found[:] = re.findall(r"backend reactor: (\w+)", proc.logText())
            return found or not proc.alive()

        waitFor(logged, 30, "the backend to say which reactor it runs on")
        assert found == [expected], proc.logText()[-2000:]
    finally:
        proc.stop()


def balancerService(logged, *args):
    o = balancer.Options()
    o.parseOptions(["--listen=tcp:0:interface=127.0.0.1", *args])
    from twisted.internet.testing import MemoryReactorClock

    balancer.makeService(o, MemoryReactorClock())
    return [line for line in logged if "reachable from other hosts" in line]


def test_exposed_control_or_admin_without_a_secret_is_warned_about(logged):
    warnings = balancerService(logged, "--control=tcp:8100", "--admin=tcp:8101:interface=0.0.0.0")
    assert len(warnings) == 2
    assert "register a backend" in warnings[0] and "drain or reconfigure" in warnings[1]


def test_loopback_and_unix_listeners_are_not_warned_about(logged, tmp_path):
    assert balancerService(
        logged,
        "--control=tcp:8100:interface=127.0.0.1",
        f"--admin=unix:{tmp_path}/admin.sock",
    ) == []


def test_a_secret_silences_the_exposure_warning(logged, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 32)
    secret.chmod(0o600)
    assert balancerService(logged, "--control=tcp:8100", f"--secret-file={secret}") == []


def exposure(logged, *args):
    balancerService(logged, *args)
    return [line for line in logged if "any local user" in line or "the metrics listener" in line]


def test_a_unix_admin_socket_others_can_write_is_warned_about(logged, tmp_path):
    # Twisted's unix: endpoints are mode 666 unless told otherwise.
    [warning] = exposure(logged, f"--admin=unix:{tmp_path}/admin.sock")
    assert "admin listener" in warning and "mode=660" in warning
    logged.clear()
    [warning] = exposure(logged, f"--control=unix:{tmp_path}/control.sock:mode=662")
    assert "control listener" in warning


def test_a_private_unix_socket_is_not_warned_about(logged, tmp_path):
    assert exposure(
        logged,
        f"--admin=unix:{tmp_path}/admin.sock:mode=660",
        f"--control=unix:{tmp_path}/control.sock:mode=600",
    ) == []


def test_metrics_on_another_interface_is_warned_about(logged):
    [warning] = exposure(logged, "--metrics=tcp:9102")
    assert "reachable from other hosts" in warning and "no authentication" in warning
    logged.clear()
    assert exposure(logged, "--metrics=tcp:9102:interface=127.0.0.1") == []


def test_a_bad_state_file_is_a_clear_usage_error(tmp_path):
    bad = tmp_path / "state.json"
    bad.write_text("{")
    with pytest.raises(usage.UsageError, match="cannot read state file"):
        parse(balancer.Options, f"--state-file={bad}")


def test_forget_after_defaults_to_five_minutes_and_reaches_the_control_listener():
    from twisted.internet.testing import MemoryReactorClock

    assert parse(balancer.Options)["forget-after"] == 300.0
    o = parse(balancer.Options, "--forget-after=0")  # 0: never
    top = balancer.makeService(o, MemoryReactorClock())
    assert top.getServiceNamed("control").factory.forgetAfter == 0
    with pytest.raises(usage.UsageError, match="must be >= 0"):
        parse(balancer.Options, "--forget-after=-1")


def test_max_ejected_percent_defaults_to_half_and_reaches_the_pool():
    from twisted.internet.testing import MemoryReactorClock

    assert parse(balancer.Options)["max-ejected-percent"] == 50
    top = balancer.makeService(parse(balancer.Options), MemoryReactorClock())
    assert top.cluster.pool.maxEjectedPercent == 50
    o = parse(balancer.Options, "--max-ejected-percent=100")
    assert balancer.makeService(o, MemoryReactorClock()).cluster.pool.maxEjectedPercent == 100
    for bad in ("-1", "101"):
        with pytest.raises(usage.UsageError, match="from 0 to 100"):
            parse(balancer.Options, f"--max-ejected-percent={bad}")


@pytest.mark.parametrize("module", [balancer, backend], ids=["balancer", "backend"])
def test_help_reads_as_prose(module):
    """
    --help has no run of spaces inside a line (a docstring's indentation
    shown as is) and no doubled full stop ("never).. Must be > 0.").
    """
    import re

    text = str(module.Options())
    for line in text.splitlines():
        body = line.strip()
        if body.startswith("-"):  # the option's column, then its help
            body = body.split("  ", 1)[-1].strip()
        assert not re.search(r"\S {2,}\S", body), line
    assert ".." not in text.replace("...", ""), text


def test_service_import_errors_say_what_went_wrong(tmp_path, monkeypatch):
    """
    --service mymodule.factory run from the folder holding mymodule.py says
    that twistd does not look there (PYTHONPATH); a module that is found but
    fails to import shows its own error; a missing name is named.
    """
    (tmp_path / "tc_mymodule.py").write_text(
        "from twistedcluster.backend.echo import echoFactory\nfactory = echoFactory()\n"
    )
    (tmp_path / "tc_broken.py").write_text("import tc_no_such_dependency\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(usage.UsageError) as e:
        parse(backend.Options, "--service=tc_mymodule.factory")
    assert str(e.value) == (
        "--service tc_mymodule.factory: No module named 'tc_mymodule'; "
        "./tc_mymodule.py is here, but twistd does not put the current folder on "
        "the Python path: run it with PYTHONPATH set to the folder that holds it "
        "(PYTHONPATH=. for the current one)"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert parse(backend.Options, "--service=tc_mymodule.factory")["factory"] is not None
    with pytest.raises(usage.UsageError, match=(
        "importing tc_broken failed: ModuleNotFoundError: "
        "No module named 'tc_no_such_dependency'"
    )):
        parse(backend.Options, "--service=tc_broken.factory")
    with pytest.raises(usage.UsageError, match="tc_mymodule has no attribute 'factroy'"):
        parse(backend.Options, "--service=tc_mymodule.factroy")


def test_backend_option_keeps_the_old_form_and_takes_name_weight_capacity():
    from twistedcluster.balancer.staticbackend import StaticBackend

    o = parse(balancer.Options, "--backend=127.0.0.1:6379",
              "--backend=cache=[::1]:11211,weight=2,capacity=300")
    assert o["backends"] == [StaticBackend("127.0.0.1:6379", "127.0.0.1", 6379),
                             StaticBackend("cache", "::1", 11211, 2, 300)]
