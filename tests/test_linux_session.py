"""A Linux session guest: one boot, many commands, through the agent channel.

Most checks share one booted guest (`session_guest`, the plugin's own
fixture, one for the whole run: pylguest's tests use it as a user would,
and tests/test_linux_boot.py and test_linux_avx.py share it too).  The ways a session
can end badly -- the guest halting mid-command, the launcher killed from
outside, the agent killed in the guest -- each get a guest of their own.
These boots are slow on an emulating KVM (docs/linux.md), so they are
marked slow and print their wall time.
"""

import os
import re
import threading
import time

import pytest

from pylguest import ChannelClosed, CommandFailed
from pylguest.agent.session import AgentError

pytestmark = pytest.mark.slow


def test_a_command_gets_its_argv_byte_for_byte_and_its_streams_apart(session_guest, wall_time):
    wall_time("booted")
    args = ["two  spaces", "it's \"quoted\"", "naïve ✓", "", "trail\n", b"raw \xff\xfe bytes"]
    result = session_guest.run(["sh", "-c", 'for a in "$@"; do printf "<%s>" "$a"; done; '
                               'echo to-stderr >&2; exit 3', "sh", *args])
    assert result.status == 3 and result.signal is None and not result.timed_out
    want = b"".join(b"<" + (a if isinstance(a, bytes) else a.encode()) + b">" for a in args)
    assert result.stdout_bytes == want
    assert result.stderr == "to-stderr\n"
    assert result.stdout == want.decode("utf-8", "replace")        # text: bad bytes replaced
    assert result.duration > 0


def test_succeed_fail_and_the_error_a_failure_shows(session_guest):
    assert session_guest.succeed("echo hello") == "hello\n"
    failed = session_guest.fail("cat /nonexistent")
    assert failed.status == 1 and "No such file or directory" in failed.stderr
    with pytest.raises(CommandFailed) as caught:
        session_guest.succeed("echo some output; echo the reason >&2; exit 4")
    message = str(caught.value)
    assert "$ /bin/sh -c 'echo some output; echo the reason >&2; exit 4'" in message
    assert "exit status 4" in message
    assert "some output" in message and "the reason" in message


def test_a_program_that_cannot_run_is_127_with_a_line_on_stderr(session_guest):
    result = session_guest.run(["no-such-program"])
    assert result.status == 127 and "no-such-program" in result.stderr


def test_environment_directory_and_stdin(session_guest):
    result = session_guest.run("echo $GREETING; pwd; wc -c", env={"GREETING": "hi"},
                              cwd="/proc", input=b"x" * 300_000)
    assert result.stdout.split() == ["hi", "/proc", "300000"]


def test_a_signal_is_reported_as_the_shell_would(session_guest):
    result = session_guest.run("kill -TERM $$")
    assert (result.signal, result.status, result.timed_out) == (15, 143, False)


def test_a_command_past_its_limit_is_killed_with_its_process_group(session_guest, wall_time):
    result = session_guest.run("sleep 300 & echo $! > /tmp/child; sleep 300", timeout=3)
    wall_time("killed")
    assert result.timed_out and result.signal == 9 and result.status == 137
    assert 3 <= result.duration < 20
    child = session_guest.succeed("cat /tmp/child").strip()
    # The background child was in the group, so it is gone too; the guest goes on.
    assert session_guest.run(f"kill -0 {child}").status != 0
    assert session_guest.succeed("echo still here") == "still here\n"


def test_two_threads_run_commands_at_once(session_guest):
    # Each command says it started, then waits for the other's word: both
    # can finish only if they run at the same time.
    script = ("touch /tmp/started-{me}; n=0; while [ ! -e /tmp/started-{other} ]; do "
              "n=$((n+1)); [ $n -gt 300 ] && exit 9; sleep 0.1; done; echo {me}")
    session_guest.succeed("rm -f /tmp/started-a /tmp/started-b")
    results = {}

    def run(me, other):
        results[me] = session_guest.run(script.format(me=me, other=other))
    threads = [threading.Thread(target=run, args=pair) for pair in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {me: (r.status, r.stdout) for me, r in results.items()} == \
        {"a": (0, "a\n"), "b": (0, "b\n")}


def test_copy_to_and_copy_from_any_size_with_the_mode(session_guest, tmp_path):
    data = os.urandom(5 << 20) + b"tail"
    source, back = tmp_path / "source", tmp_path / "back"
    source.write_bytes(data)
    source.chmod(0o750)
    session_guest.copy_to(source, "/tmp/copied")
    assert session_guest.succeed("stat -c %a:%s /tmp/copied") == f"750:{len(data)}\n"
    session_guest.copy_from("/tmp/copied", back)
    assert back.read_bytes() == data and back.stat().st_mode & 0o777 == 0o750
    with pytest.raises(AgentError, match="No such file"):
        session_guest.copy_from("/nonexistent", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_an_output_flood_costs_the_host_a_bounded_amount(session_guest):
    seen = []
    result = session_guest.run("head -c 8388608 /dev/zero", output_limit=1 << 20,
                              on_output=lambda stream, data: seen.append(len(data)))
    assert result.status == 0
    assert len(result.stdout_bytes) == 1 << 20
    assert result.stdout_dropped == 7 << 20
    assert sum(seen) == 8 << 20                   # the callback saw every byte


def test_the_console_is_still_a_shell_beside_the_session(session_guest):
    session_guest.send("echo $((6*7))\n")
    session_guest.expect(r"(?m)^42\r?$")


def test_a_killed_agent_fails_its_call_and_comes_back(session_guest):
    with pytest.raises(AgentError, match="agent restarted"):
        session_guest.run("kill -KILL $PPID; sleep 60")
    # /init starts a new agent, and the session goes on with it.
    assert session_guest.wait_until_succeeds("echo back", timeout=60) == "back\n"


# -- a guest that stops while a command runs ---------------------------------------


def test_a_guest_that_halts_mid_command_fails_the_call_at_once(guest, wall_time):
    started = time.monotonic()
    with pytest.raises(ChannelClosed, match=r"halted \(exit status 123\)"):
        guest.run("(sleep 1; halt -f) & sleep 600", timeout=600)
    wall_time("halted")
    assert time.monotonic() - started < 60


def test_leaving_the_console_shell_powers_off_with_its_status(guest):
    # Without `-- CMD`, the console is a shell; when it exits, /init powers
    # the guest off with its status, and a command running meanwhile ends
    # with the guest.
    guest.expect("a shell on the console")
    threading.Timer(1.0, guest.send, args=("exit 4\n",)).start()
    with pytest.raises(ChannelClosed, match=r"launcher exit status 4\b"):
        guest.run("sleep 600", timeout=600)
    assert guest.wait() == 4


def test_a_launcher_killed_from_outside_fails_the_call_at_once(guest):
    threading.Timer(1.0, guest.process.kill).start()
    started = time.monotonic()
    with pytest.raises(ChannelClosed, match=r"exit status -9"):
        guest.run("sleep 600", timeout=600)
    assert time.monotonic() - started < 30
    with pytest.raises(ChannelClosed):
        guest.run("true")                     # and every call after
