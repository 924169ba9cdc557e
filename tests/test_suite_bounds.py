"""The suite's own guard: every test has a time limit (pytest-timeout).

A rule that bounds guest work (the chain walk's TTL, the stop protocol)
can be lost in a refactor; its test must then fail, not hang CI.
"""

import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT, SLOW_TIMEOUT

# The suite's slow tests, about: fewer collected means collection broke.
SLOW_TESTS_AT_LEAST = 10


def test_every_test_has_a_time_limit(request):
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed"
    assert 0 < float(request.config.getini("timeout")) <= 120


def test_slow_tests_get_a_longer_one(tmp_path):
    """Collected in a pytest of its own, so that what this run selected
    (-k, node ids, -m) cannot leave nothing to check."""
    (tmp_path / "report_timeouts.py").write_text(textwrap.dedent(f"""
        import json

        def pytest_collection_finish(session):
            found = {{}}
            for item in session.items:
                marker = item.get_closest_marker("timeout")
                found[item.nodeid] = marker.args[0] if marker and marker.args else None
            with open({str(tmp_path / "timeouts.json")!r}, "w") as f:
                json.dump(found, f)
        """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(ROOT / "launcher"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow",
                             "-p", "report_timeouts", "-p", "no:cacheprovider",
                             str(ROOT / "tests")], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=50)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    timeouts = json.loads((tmp_path / "timeouts.json").read_text())
    assert len(timeouts) >= SLOW_TESTS_AT_LEAST, sorted(timeouts)
    short = {nodeid: t for nodeid, t in timeouts.items() if t is None or t < SLOW_TIMEOUT}
    assert not short, short
