"""
The README documents every option of both plugins and of cluster-admin, and
CI runs exactly the README's test command.
"""

from pathlib import Path

import pytest

from twistedcluster import admincli, backend, balancer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def optionNames(options):
    o = options()
    names = [p[0] for p in o.optParameters] + [f[0] for f in getattr(o, "optFlags", [])]
    names += [n[len("opt_"):].replace("_", "-") for n in dir(o) if n.startswith("opt_")]
    return sorted(set(names) - {"help", "version"})


@pytest.mark.parametrize("options", [balancer.Options, backend.Options])
def test_every_plugin_option_is_in_the_readme(options):
    missing = [n for n in optionNames(options) if f"`--{n}" not in README]
    assert missing == []


def test_every_cluster_admin_option_and_command_is_in_the_readme():
    p = admincli.parser()
    flags = [a for action in p._actions for a in action.option_strings if a.startswith("--")]
    missing = [f for f in flags if f != "--help" and f not in README]
    assert missing == []
    for command in ("status", "drain NAME", "enable NAME", "disable NAME", "weight NAME N", "policy"):
        assert f"`{command}" in README


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(
        line.strip() for line in ci.splitlines() if line.strip().startswith("python3 -m venv")
    )
    assert f"```sh\n{command}\n```" in README
