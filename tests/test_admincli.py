"""
cluster-admin's parsing and output; the real round trip is in test_e2e.
"""

import json

import pytest

from twistedcluster.cli.admin import formatJSON, formatTable, parser


def backend(name, **kw):
    d = dict(name=name, host="127.0.0.1", port=9000, state="up", weight=1,
             capacity=10, connections=0, load=0.0, routed=0, active=0,
             failures=0, static=False)
    d.update(kw)
    return d


def test_table_has_a_row_per_backend_and_a_summary():
    text = formatTable("least-load", [
        backend("web1", connections=3, load=0.3, routed=5),
        backend("web2", state="down", host="::1"),
    ])
    lines = text.splitlines()
    assert lines[0].startswith("policy: least-load") and "(1 up)" in lines[0]
    assert lines[2].split()[:3] == ["NAME", "ADDRESS", "STATE"]
    assert lines[3].split()[:8] == ["web1", "127.0.0.1:9000", "up", "1", "3", "0.300", "5", "0"]
    assert "[::1]:9000" in lines[4] and "down" in lines[4]


def test_empty_cluster_says_so():
    assert "no backend has registered" in formatTable("least-load", [])


def test_json_output_is_a_list_with_one_object_a_line():
    items = [backend("web1", load=0.25), backend('odd "name"\nwith a newline', host="::1")]
    text = formatJSON(items)
    assert json.loads(text) == items
    lines = text.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 2 + len(items)
    assert json.loads(lines[1].rstrip(",")) == items[0]
    assert formatJSON([]) == "[]" and json.loads(formatJSON([])) == []


def test_json_flag_is_accepted_before_or_after_the_command():
    assert parser().parse_args(["status", "--json"]).json
    assert parser().parse_args(["--json", "status"]).json


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["weight", "web1", "heavy"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["frobnicate"])
    assert e.value.code == 2
    # Times and counts a timer or a loop cannot take: said as usage, not an
    # AssertionError from callLater (or top asking without a pause).
    for bad in (
        ["top", "--interval", "-1"],
        ["top", "--interval", "0"],
        ["top", "--iterations", "-2"],
        ["--timeout", "-5", "status"],
        ["status", "--timeout", "nan"],
    ):
        with pytest.raises(SystemExit) as e:
            parser().parse_args(bad)
        assert e.value.code == 2, bad
    assert parser().parse_args(["top", "--interval", "0.5"]).interval == 0.5


@pytest.mark.allow_errors
@pytest.mark.parametrize(
    "argv, printed",
    [
        (["drain", "a"], "a: draining"),
        (["--json", "weight", "a", "4"], '"weight": 4'),
        (["policy", "round-robin"], "policy: round-robin"),
    ],
)
def test_a_change_applied_but_not_saved_has_its_own_exit_status(tmp_path, argv, printed):
    from twisted.internet import defer

    from tests.test_admin import keptBalancer
    from twistedcluster.cli.admin import EXIT_NOT_SAVED, CommandFailed, execute

    (tmp_path / "folder").write_text("")
    lb, threads = keptBalancer(tmp_path / "folder" / "state.json", "a")
    admin, _, _ = lb.adminChannel()
    got = []
    defer.ensureDeferred(execute(admin, parser().parse_args(argv))).addBoth(got.append)
    lb.flush()
    lb.clock.advance(0)
    threads.runAll()
    lb.flush()
    [failure] = got
    assert failure.check(CommandFailed)
    e = failure.value
    assert e.code == EXIT_NOT_SAVED == 5
    assert printed in e.output  # what was done is still printed
    assert "applied but not saved" in str(e) and "Not a directory" in str(e)

def test_a_name_longer_than_amp_carries_is_a_usage_error():
    # AMP raises TooLong before anything is sent; that is not a lost balancer.
    from twisted.internet import defer
    from twisted.internet.testing import StringTransport
    from twisted.protocols import amp

    from twistedcluster.cli.admin import EXIT_USAGE, CommandFailed, execute

    proto = amp.AMP()
    proto.makeConnection(StringTransport())
    args = parser().parse_args(["drain", "x" * 70000])
    d = defer.ensureDeferred(execute(proto, args))
    failure = []
    d.addErrback(failure.append)
    [f] = failure
    assert f.check(CommandFailed)
    assert f.value.code == EXIT_USAGE
    assert "too long" in str(f.value) and "65,535" in str(f.value)


def test_add_with_send_proxy_to_a_balancer_that_ignores_it_fails_clearly(monkeypatch):
    # A balancer older than --send-proxy ignores the argument it does not
    # know: its answer does not repeat it, and cluster-admin says so.
    from twisted.internet import defer

    from tests.test_admin import balancerWith, withStatics
    from twistedcluster.cli.admin import EXIT_REFUSED, CommandFailed, execute
    from twistedcluster.wire import commands

    lb = balancerWith()
    statics = withStatics(lb)
    # The answer as an older balancer declares it: no sendProxy.
    monkeypatch.setattr(
        commands.AddBackend, "response", [r for r in commands.AddBackend.response if r[0] != b"sendProxy"]
    )
    admin, _, _ = lb.adminChannel()
    got = []
    args = parser().parse_args(["add", "web", "127.0.0.1:8080", "--send-proxy", "v2"])
    defer.ensureDeferred(execute(admin, args)).addBoth(got.append)
    lb.flush()
    [failure] = got
    assert failure.check(CommandFailed), failure
    assert failure.value.code == EXIT_REFUSED
    assert "WITHOUT a PROXY header" in str(failure.value)
    statics.stopService()


@pytest.mark.parametrize("ending", ["clean", "reset"])
def test_a_listener_that_closes_at_once_is_explained(tmp_path, ending):
    # What a full admin listener does to a newcomer: accept, then close
    # before any answer: a clean close when the command had not arrived, a
    # reset when it had (unread). The message says what that may mean.
    import os
    import socket
    import struct
    import subprocess
    import sys
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def closeEach():
        for _ in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                if ending == "clean":
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):  # until the client has gone
                        pass
                else:
                    conn.recv(1)  # the command is here, unread
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            conn.close()

    thread = threading.Thread(target=closeEach, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "twistedcluster.cli.admin", f"--admin=tcp:127.0.0.1:{port}", "status"],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
    finally:
        listener.close()
    assert result.returncode == 3, result
    assert "before answering (its admin listener may be full" in result.stderr, result.stderr
    assert ("closed cleanly" in result.stderr) == (ending == "clean"), result.stderr
