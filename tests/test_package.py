"""
The package's public surface: what C{__all__} promises exists, importing it
starts no reactor, and no module reaches into another's private names.
"""

import ast
import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

import twistedcluster

PACKAGE = pathlib.Path(twistedcluster.__file__).parent
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if p.name != "__init__.py" or p.parent != PACKAGE
)


def test_the_package_exports_what_its_docstring_documents():
    documented = set(re.findall(r"L\{(\w+)\}", twistedcluster.__doc__))
    assert set(twistedcluster.__all__) - {"__version__"} == documented
    for name in twistedcluster.__all__:
        assert getattr(twistedcluster, name) is not None


@pytest.mark.parametrize("name", MODULES)
def test_what_a_module_exports_exists_and_is_public(name):
    module = importlib.import_module(f"twistedcluster.{name}")
    for exported in getattr(module, "__all__", []):
        assert hasattr(module, exported), exported
        assert not exported.startswith("_") or exported == "__version__"


def test_importing_the_package_does_not_install_a_reactor():
    # twistd plugins import it before twistd picks the reactor.
    code = "import sys, twistedcluster; print('twisted.internet.reactor' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert out.stdout == b"False\n", out.stderr


def test_no_module_imports_another_modules_private_names():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("twistedcluster.")
            ):
                offences += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert offences == []
