"""
What the command-line programs share: L{twistedcluster.cli.common.react} prints and
exits the same way for each.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from twistedcluster.cli.common import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CommandFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runScript(body):
    script = "from twistedcluster.cli.common import CommandFailed, react\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, env=env, timeout=60
    )


def test_the_shared_statuses():
    assert (EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE) == (0, 2, 3)
    e = CommandFailed("no", 4)
    assert (str(e), e.code, e.output) == ("no", 4, None)


@pytest.mark.parametrize(
    "body, status, out, err",
    [
        ('print("out")\n    return 7', 7, b"out\n", b""),
        ("return None", 0, b"", b""),
        ("return 0", 0, b"", b""),
        (
            'raise CommandFailed("not saved", 5, output="a: draining")',
            5,
            b"a: draining\n",
            b"prog: not saved\n",
        ),
    ],
)
def test_the_status_and_what_is_printed(body, status, out, err):
    # What work returns is the status; a failed command prints what was done
    # (if anything) and why.
    r = runScript(f"async def work(reactor):\n    {body}\nreact('prog', work)\n")
    assert (r.returncode, r.stdout, r.stderr) == (status, out, err)


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
