"""daemon.py: starting, watching and stopping a helper daemon.

The daemons here are stand-ins (sh, sleep), so that each rule is seen on
its own: a daemon never outlives the launcher even when it ignores its
socket (the parent-death signal), its death is one line with its last
words, and asking it to stop is not news.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import alive, wait_until
from pylguest.daemon import STDERR_LINE_MAX, Daemon, DaemonError, find_program
from pylguest.errors import UsageError


def test_find_program_prefers_the_users_choice_then_the_first_candidate(tmp_path):
    program = tmp_path / "d"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert find_program("d", ["/nonexistent/d", str(program)], "pkg") == str(program)
    assert find_program("d", ["/bin/sh"], "pkg", override=str(program)) == str(program)
    with pytest.raises(UsageError, match=r"^d is not installed: install Debian's pkg package "
                                         r"\(apt-get install pkg\), or run make$"):
        find_program("d", ["/nonexistent/d", "no-such-program-anywhere"], "pkg")
    program.chmod(0o644)
    with pytest.raises(UsageError, match="is not an executable file"):
        find_program("d", [], "pkg", override=str(program))


def test_a_death_is_one_line_with_the_last_words():
    deaths = []
    daemon = Daemon("stand-in for fs0", ["sh", "-c", "echo first >&2; echo 'last words' >&2; "
                                                     "exit 3"], on_exit=deaths.append)
    wait_until(lambda: deaths, 10)
    assert deaths == ["stand-in for fs0 exited with status 3 (last words)"]
    daemon.close()


def test_a_kill_is_named_and_silence_is_said():
    deaths = []
    daemon = Daemon("stand-in", ["sleep", "60"], on_exit=deaths.append)
    os.kill(daemon.pid, signal.SIGKILL)
    wait_until(lambda: deaths, 10)
    assert deaths == ["stand-in was killed by SIGKILL (nothing on stderr)"]
    daemon.close()


def test_stderr_is_drained_and_only_its_tail_kept():
    deaths = []
    # 4 MiB on stderr: more than a pipe holds, so a watcher that did not
    # drain it would leave the daemon blocked, and this test would time out.
    daemon = Daemon("chatty", [sys.executable, "-c",
                               "import sys\nfor i in range(4096): sys.stderr.write('x' * 1023 "
                               "+ '\\n')\nsys.stderr.write('y' * 5000)\nsys.exit(1)"],
                    on_exit=deaths.append)
    wait_until(lambda: deaths, 20)
    assert len(daemon.stderr_tail) <= 20
    assert all(len(line) <= STDERR_LINE_MAX for line in daemon.stderr_tail)
    assert deaths[0].startswith("chatty exited with status 1 (yyy")
    daemon.close()


def test_close_stops_it_and_is_not_reported():
    deaths = []
    daemon = Daemon("quiet", ["sleep", "60"], on_exit=deaths.append)
    daemon.close()
    assert not alive(daemon.pid)
    time.sleep(0.2)
    assert deaths == []


def test_a_daemon_that_cannot_be_started_is_a_daemon_error(tmp_path):
    with pytest.raises(DaemonError, match=r"^x: cannot start .*missing: No such file"):
        Daemon("x", [str(tmp_path / "missing")])


def test_it_dies_with_the_launcher_even_if_it_ignores_everything_else():
    # A stand-in launcher starts a daemon that ignores SIGTERM and has no
    # socket to lose; SIGKILL of the launcher must still end it.
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pylguest.daemon import Daemon\n"
         "d = Daemon('stubborn', ['sh', '-c', 'trap \"\" TERM; while :; do sleep 1; done'])\n"
         "print(d.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        pid = int(launcher.stdout.readline())
        assert alive(pid)
        launcher.kill()
        launcher.wait(10)
        wait_until(lambda: not alive(pid), 10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        launcher.stdout.close()
