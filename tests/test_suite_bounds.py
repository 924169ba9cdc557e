"""The suite's own guard: every test has a time limit (pytest-timeout).

A rule that bounds guest work (the chain walk's TTL, the stop protocol)
can be lost in a refactor; its test must then fail, not hang CI.
"""

from conftest import SLOW_TIMEOUT


def test_every_test_has_a_time_limit(request):
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed"
    assert 0 < float(request.config.getini("timeout")) <= 120


def test_slow_tests_get_a_longer_one(request):
    slow = [item for item in request.session.items if item.get_closest_marker("slow")]
    for item in slow:
        marker = item.get_closest_marker("timeout")
        assert marker is not None and marker.args[0] >= SLOW_TIMEOUT, item.nodeid
