"""
Smoke test of bench/manyconn.py (issue 21): a small population, in redirect
mode and in proxy mode with two workers; the clients are held, their echoes
answered, and the spread is what the backends hold.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench import _skipUnlessPossible

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
MANYCONN = ROOT / "bench" / "manyconn.py"
STEPS = (100, 300)


def test_smallPopulationHeldAndEchoing(tmp_path):
    _skipUnlessPossible()
    out = tmp_path / "figures.json"
    argv = [
        sys.executable, str(MANYCONN), "--steps", ",".join(map(str, STEPS)),
        "--setups", "redirect,proxy", "--interval", "0.5", "--rounds", "1", "--window", "1",
        "--quiet", "0.5", "--backends", "2", "--workers", "2", "--generators", "2",
        "--logs", str(tmp_path / "logs"), "--json", str(out),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=str(tmp_path), env=env)
    assert result.returncode in (0, 1), f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    figures = json.loads(out.read_text())
    for name in ("redirect", "proxy"):
        rec = figures["results"][name]
        assert "error" not in rec, rec.get("error")
        assert [r["clients"] for r in rec["steps"]] == list(STEPS)
        for r in rec["steps"]:
            # Held, none failed or dropped.
            assert (r["held"], r["failed"], r["dropped"]) == (r["clients"], 0, 0), r
            # Echoes were sent through the window and came back.
            assert r["echoesSent"] > 0 and r["echoes"] >= 0.9 * r["echoesSent"], r
            assert 0 < r["p50"] <= r["p99"] < 1.0, r
            # The quiet window is quiet: at most the echoes in flight as it
            # opened come back in it.
            assert r["quietEchoes"] <= 0.1 * r["held"], r
            # The spread is over what the backends really hold (their
            # descriptors), and adds up to the clients.
            assert sum(r["perBackend"]) == r["held"], r
            assert len(r["perBackend"]) == 2 and min(r["perBackend"]) > 0, r
            mean = r["held"] / 2
            assert r["spread"] == pytest.approx(max(r["perBackend"]) / mean), r
            assert r["rssPerConn"]["main"] is not None and r["rssPerConn"]["backends"] is not None, r
        # The backends' memory grows with what they hold.  Measured at the
        # largest step only: at 100 clients each backend grows by a few
        # pages at most, and where the allocator finds room decides whether
        # that shows at all.
        last = rec["steps"][-1]
        assert last["rssPerConn"]["backends"] > 0, last
        if name == "proxy":
            assert last["rssPerConn"]["workers"] is not None
    lines = result.stdout.splitlines()
    assert any(line.startswith("set-up") for line in lines), result.stdout
    verdicts = [line.split()[0] for line in lines if line.strip().startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 7 and set(verdicts) <= {"PASS", "FAIL"}, result.stdout
