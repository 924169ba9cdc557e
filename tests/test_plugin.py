"""The pytest plugin (pylguest/plugin.py), as a user in another repository meets it.

Each test writes a small test file into a fresh directory (pytester) and
runs pytest on it, so nothing of this project's own conftest applies:
only what `pip install pylguest` gives a user.
"""

import os
import re

import pytest

from pylguest import plugin

pytest_plugins = ["pytester"]


def test_the_plugin_is_registered_by_its_entry_point(pytester):
    result = pytester.runpytest_subprocess("--help")
    assert "--pylguest-kernel" in result.stdout.str()
    assert "pylguest boot tests" in result.stdout.str()


def test_kernels_parametrize_a_test_with_readable_ids(pytester):
    pytester.makeini("""
        [pytest]
        pylguest_kernels =
            stock = /k/bzImage-6.1, /k/initramfs.cpio
            next = /k/bzImage-6.6
    """)
    pytester.makepyfile(test_user="""
        def test_boots(guest):
            pass
        def test_reads(module_guest):
            pass
        def test_no_guest():
            pass
    """)
    result = pytester.runpytest_subprocess("--collect-only", "-q")
    ids = [line for line in result.stdout.lines if "::" in line]
    assert ids == ["test_user.py::test_boots[stock]", "test_user.py::test_boots[next]",
                   "test_user.py::test_reads", "test_user.py::test_no_guest"]


def test_a_bad_kernels_line_is_one_usage_error(pytester):
    pytester.makeini("""
        [pytest]
        pylguest_kernels = =nothing
    """)
    pytester.makepyfile(test_user="def test_boots(guest): pass")
    result = pytester.runpytest_subprocess("-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "pylguest_kernels: bad line '=nothing'" in result.stderr.str()


def test_without_a_kernel_the_test_is_told_what_to_run(pytester, monkeypatch, tmp_path):
    monkeypatch.delenv("PYLGUEST_KERNEL", raising=False)
    monkeypatch.setattr(plugin, "own_build", lambda: tmp_path / "nothing-built")
    pytester.makepyfile(test_user="def test_boots(guest): pass")
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert plugin.NO_KERNEL in result.stdout.str()


@pytest.mark.parametrize("test_file, why", [
    ("import pytest\n@pytest.mark.pylguest(memory='512M')\ndef test_boots(guest): pass\n",
     "pylguest marker: memory is not known; use boot_timeout, cmdline,"),
    ("import pytest\n@pytest.mark.pylguest(boot_timeout='soon')\ndef test_boots(guest): pass\n",
     "pylguest: boot timeout 'soon' is not a positive number of seconds"),
    ("def test_boots(guest_factory): guest_factory(timeout=-1)\n",
     "pylguest: timeout -1 is not a positive number of seconds"),
    ("import pytest\n@pytest.mark.pylguest(share='/nonexistent,ro')\ndef test_boots(guest): pass\n",
     "pylguest: --share /nonexistent: no such directory"),
    ("import pytest\n@pytest.mark.pylguest(root=['/'])\ndef test_boots(guest): pass\n",
     "pylguest: root= takes a str (DIR|IMAGE[,rw]), not ['/']"),
    ("def test_boots(guest_factory): guest_factory(net='usr')\n",
     "pylguest: bad --net 'usr': use tap:NAME"),
    ("def test_boots(guest_factory): guest_factory(share=['.,tag=t', '.,tag=t'])\n",
     "pylguest: two --share options have the same tag: t, t"),
])
def test_bad_guest_options_are_one_line_before_any_boot(pytester, tmp_path, test_file, why):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not booted")
    pytester.makepyfile(test_user=test_file)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider",
                                           f"--pylguest-kernel={kernel}")
    assert result.ret != 0
    assert why in result.stdout.str()
    assert "Traceback" not in result.stdout.str()


def test_the_lookup_order(monkeypatch, pytestconfig, tmp_path):
    monkeypatch.setenv("PYLGUEST_KERNEL", "/env/bzImage")
    monkeypatch.setenv("PYLGUEST_INITRD", "/env/initrd")
    assert plugin.default_kernel(pytestconfig) == ("default", "/env/bzImage", "/env/initrd")
    monkeypatch.delenv("PYLGUEST_KERNEL")
    monkeypatch.delenv("PYLGUEST_INITRD")
    (tmp_path / "bzImage").write_bytes(b"")
    monkeypatch.setattr(plugin, "own_build", lambda: tmp_path)
    assert plugin.default_kernel(pytestconfig) == ("default", str(tmp_path / "bzImage"),
                                                   str(tmp_path / "initramfs.cpio"))


USER_TESTS = """
    def test_uname_files_and_a_failing_command(guest, tmp_path):
        assert guest.succeed("uname -r").startswith("6.1")
        (tmp_path / "sent").write_bytes(b"from the host\\n")
        guest.copy_to(tmp_path / "sent", "/tmp/file")
        guest.copy_from("/tmp/file", tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == b"from the host\\n"
        failed = guest.fail("ls /nonexistent")
        assert failed.status == 1 and "nonexistent" in failed.stderr

    def test_deliberately_failing(guest):
        guest.succeed("echo marker-in-the-transcript")
        assert guest.run("echo on-stderr >&2; exit 5").status == 0
"""


@pytest.mark.slow
def test_a_users_suite_under_xdist_and_its_failure_report(pytester, kvm_available, wall_time):
    # The guest fixture finds pylguest's own kernel and initramfs with no
    # configuration at all (they are built by `make linux`).
    if plugin.default_kernel(pytester._request.config).kernel is None:
        pytest.skip(plugin.NO_KERNEL)
    pytest.importorskip("xdist", reason="pytest-xdist is needed: pip install -e '.[test]'")
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", timeout=400)
    wall_time("two boots on two workers")
    out = result.stdout.str()
    result.assert_outcomes(passed=1, failed=1)
    assert re.search(r"\b2 workers \[2 items\]", out), out   # two workers
    # The failure explains itself: the console's tail, the commands, the logs.
    assert "pylguest guest: console" in out and "Run /init as init process" in out
    assert "$ /bin/sh -c 'echo marker-in-the-transcript'" in out
    assert "exit status 5" in out and "on-stderr" in out
    logs = [line.strip() for line in result.stdout.lines if line.strip().endswith(
        ("guest0-console.log", "guest0-commands.txt"))]
    assert len(logs) == 2 and all(os.path.exists(path) for path in logs), logs
    assert "marker-in-the-transcript" in open(logs[1]).read()


# A user's tests that look at the launcher options their guests would get,
# without booting (their own pytest process: Guest.start and wait_ready
# do nothing there).
ARGV_TESTS = """
    import pytest
    from pylguest.guest import Guest

    Guest.start = lambda self: self                 # this pytest run boots nothing
    Guest.wait_ready = lambda self, timeout=None: None

    def options(guest):
        return guest.argv[guest.argv.index("--timeout") + 2:]

    def test_none_of_them(guest_factory):
        assert options(guest_factory()) == []

    @pytest.mark.pylguest(share="TMP/marker,ro", net="user", root="TMP/marker")
    def test_the_call_adds_to_the_marker_and_wins_over_it(guest_factory):
        guest = guest_factory(share="TMP/call", net=["user,hostfwd=tcp:18022-:22"], root="/",
                              disks="TMP/disk.img")
        assert options(guest) == [
            "--share", "TMP/marker,ro", "--share", "TMP/call", "--root", "/",
            "--net", "user", "--net", "user,hostfwd=tcp:18022-:22", "--block", "TMP/disk.img"]

    def test_the_root_setting_is_every_guests(guest, module_guest):
        assert options(guest) == options(module_guest) == ["--root", "TMP/marker,rw"]
"""


def test_share_root_and_net_reach_the_launcher_in_order(pytester, tmp_path):
    (tmp_path / "marker").mkdir()
    (tmp_path / "call").mkdir()
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not booted")
    pytester.makepyfile(test_user=ARGV_TESTS.replace("TMP", str(tmp_path)))

    def run(*args):
        return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider",
                                             f"--pylguest-kernel={kernel}", *args)
    run("-k", "not root_setting").assert_outcomes(passed=2)
    run("-k", "root_setting", f"--pylguest-root={tmp_path}/marker,rw").assert_outcomes(passed=1)
    pytester.makeini(f"""
        [pytest]
        pylguest_root = {tmp_path}/marker,rw
    """)
    run("-k", "root_setting").assert_outcomes(passed=1)


SNAPSHOT_TESTS = """
    import pytest

    @pytest.mark.parametrize("n", range(20))
    def test_a_fresh_guest_each(guest, n):
        assert guest.run("ls /tmp/mine-* 2>/dev/null").stdout == ""   # nobody else's
        guest.succeed(f"touch /tmp/mine-{n}")
"""


@pytest.mark.slow
def test_twenty_restored_guests_under_xdist_against_one_boot(pytester, linux, kvm_available,
                                                             wall_time):
    """Each worker boots once and snapshots, and its tests get restores,
    each a guest nobody else touched.  The figures (against one cold boot)
    are printed, not asserted: speed lives in benchmarks, and this run
    shares the CPU with whatever else the suite left running."""
    import time
    from pylguest import Guest
    pytest.importorskip("xdist", reason="pytest-xdist is needed: pip install -e '.[test]'")
    kernel, initramfs = linux
    started = time.monotonic()
    with Guest(kernel, initrd=initramfs, agent=True, timeout=600) as cold:
        cold.succeed("true")
    boot = time.monotonic() - started
    pytester.makepyfile(test_user=SNAPSHOT_TESTS)
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider",
                                           "--pylguest-snapshots", timeout=600)
    suite = time.monotonic() - started
    wall_time(f"one cold boot to a command {boot:.1f} s; 20 restored tests on 2 workers "
              f"{suite:.1f} s")
    result.assert_outcomes(passed=20)
    print(f"\n20 restored tests {suite:.1f} s against 3 cold boots {3 * boot:.1f} s")


COLD_AND_SNAPSHOT_TESTS = """
    import pytest
    from pylguest.guest import Guest

    made = []

    class Restored(tuple):
        def close(self):
            pass

    Guest.start = lambda self: self                 # this pytest run boots nothing
    Guest.wait_ready = lambda self, timeout=None: None
    Guest.snapshot = lambda self, path: made.append(path)
    Guest.restore = classmethod(lambda cls, path, **kw: Restored(("restored", str(path))))

    def test_booted_and_snapshotted(guest):
        assert isinstance(guest, Guest) and len(made) == 1

    def test_restored_from_the_same_snapshot(guest):
        assert guest[0] == "restored" and len(made) == 1

    @pytest.mark.pylguest(cold=True)
    def test_cold(guest):
        assert isinstance(guest, Guest)

    @pytest.mark.pylguest(mem="512M")
    def test_another_configuration_another_snapshot(guest):
        assert isinstance(guest, Guest) and len(made) == 2

    def test_a_share_boots(guest_factory, tmp_path):
        assert isinstance(guest_factory(share=str(tmp_path)), Guest)
"""


def test_snapshot_mode_restores_unless_a_test_needs_a_boot(pytester, tmp_path):
    for name in ("bzImage", "initramfs.cpio"):
        (tmp_path / name).write_bytes(b"")
    pytester.makepyfile(test_user=COLD_AND_SNAPSHOT_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider",
                                           "--pylguest-snapshots",
                                           f"--pylguest-kernel={tmp_path / 'bzImage'}",
                                           f"--pylguest-initrd={tmp_path / 'initramfs.cpio'}")
    result.assert_outcomes(passed=5)
