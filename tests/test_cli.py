"""
What the command-line programs share: L{twistedcluster.cli.react} prints and
exits the same way for each.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from twistedcluster.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CommandFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runScript(body):
    script = "from twistedcluster.cli import CommandFailed, react\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, env=env, timeout=60
    )


def test_the_shared_statuses():
    assert (EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE) == (0, 2, 3)
    e = CommandFailed("no", 4)
    assert (str(e), e.code, e.output) == ("no", 4, None)


def test_a_status_returned_is_the_exit_status():
    r = runScript(
        """
        async def work(reactor):
            print("out")
            return 7
        react("prog", work)
        """
    )
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"")


@pytest.mark.parametrize("status", [None, 0])
def test_nothing_returned_is_success(status):
    r = runScript(
        f"""
        async def work(reactor):
            return {status}
        react("prog", work)
        """
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_a_failed_command_prints_what_was_done_and_why():
    r = runScript(
        """
        async def work(reactor):
            raise CommandFailed("not saved", 5, output="a: draining")
        react("prog", work)
        """
    )
    assert (r.returncode, r.stdout, r.stderr) == (5, b"a: draining\n", b"prog: not saved\n")


def test_an_interrupted_command_says_so():
    r = runScript(
        """
        from twisted.internet import defer

        async def work(reactor):
            reactor.callLater(0, reactor.stop)
            await defer.Deferred()
        react("prog", work, interrupted=130)
        """
    )
    assert (r.returncode, r.stdout, r.stderr) == (130, b"", b"prog: interrupted\n")
