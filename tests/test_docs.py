"""
The README documents every option of both plugins and of cluster-admin, and
CI runs exactly the README's test command.
"""

from pathlib import Path

import pytest

from twistedcluster.cli import admin as admincli

from twistedcluster.backend import service as backend

from twistedcluster.balancer import service as balancer

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
    for command in ("status", "drain NAME", "enable NAME", "disable NAME", "weight NAME N", "policy",
                    "add NAME HOST:PORT", "remove NAME"):
        assert f"`{command}" in README


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(
        line.strip() for line in ci.splitlines() if line.strip().startswith("python3 -m venv")
    )
    assert f"```sh\n{command}\n```" in README


def slug(heading: str) -> str:
    """
    GitHub's anchor for a Markdown heading.
    """
    import re

    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_to_docs_resolve():
    """
    Every relative link in the README and in docs/ names a file that exists
    and, with an anchor, one of its headings.
    """
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "the README links to docs/"
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text()):
            path, anchor = target
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: no {path}"
            if anchor:
                headings = [slug(line.lstrip("#")) for line in linked.read_text().splitlines()
                            if line.startswith("#")]
                assert anchor in headings, f"{page.name}: no #{anchor} in {linked.name}"


def test_the_readme_web_example_is_the_whoami_service():
    """
    The twisted.web code under "Client addresses" is what
    C{--service twistedcluster.backend.whoami.site} runs (its end-to-end
    tests are in test_e2e_proxyprotocol.py).
    """
    block = README.split("## Client addresses", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    source = (ROOT / "twistedcluster" / "backend" / "whoami.py").read_text()
    for line in block.splitlines():
        assert line.strip() in source, line
