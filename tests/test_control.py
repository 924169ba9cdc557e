"""The --control channel (control.py) and the snapshot commands' usage
errors (cli.py), with no guest: a fake machine answers snapshot()."""

import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading

import pytest

from conftest import ROOT
from pylguest import control
from pylguest.control import ControlChannel, ask, parse_control, request_snapshot
from pylguest.errors import PylguestError, UsageError
from pylguest.snapshot import SnapshotError

TIMEOUT = 10


class FakeMachine:
    """What the channel needs of a Machine: snapshot(directory)."""

    def __init__(self, outcome=None):
        self.outcome = outcome or {"memory": {"size": 5}}
        self.asked = []

    def snapshot(self, directory):
        self.asked.append(directory)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.fixture
def channel():
    """A ControlChannel on one end of a socket pair (as --control fd:N,
    which pylguest.Guest passes); the other end is the client's."""
    made = []

    def make(outcome=None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(TIMEOUT)
        machine = FakeMachine(outcome)
        served = ControlChannel(f"fd:{theirs.detach()}", machine)
        made.append((served, ours))
        return served, ours, machine
    yield make
    for served, ours in made:
        served.close()
        ours.close()


def read_lines(sock, count):
    """The next `count` answers on `sock`, each one line of JSON."""
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, "the channel closed without an answer"
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def read_line(sock):
    return read_lines(sock, 1)[0]


# --- parse_control ------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("fd:1", "use fd:N (N > 2)"), ("fd:0", "use fd:N"), ("fd:abc", "use fd:N"),
    ("fd:", "use fd:N"), ("fd:-5", "use fd:N"), ("", "needs a socket path or fd:N"),
])
def test_a_bad_control_spec_is_a_usage_error(spec, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        parse_control(spec)


def test_a_control_fd_that_is_not_open_is_a_usage_error():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(UsageError, match=f"--control fd:{r}: no such open file descriptor"):
        parse_control(f"fd:{r}")


def test_a_control_fd_that_is_not_a_socket_is_a_usage_error():
    r, w = os.pipe()
    try:
        with pytest.raises(UsageError, match=f"--control fd:{r}: not a socket"):
            parse_control(f"fd:{r}")
    finally:
        os.close(r)
        os.close(w)


def test_a_control_path_that_exists_is_a_usage_error(tmp_path):
    """Never bound over an existing file: another launcher's socket."""
    path = tmp_path / "control"
    path.write_bytes(b"")
    with pytest.raises(UsageError, match="already exists"):
        parse_control(str(path))
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(UsageError, match="already exists"):
        parse_control(str(tmp_path / "dangling"))


def test_good_control_specs_are_parsed(tmp_path):
    a, b = socket.socketpair()
    with a, b:
        assert parse_control(f"fd:{a.fileno()}") == ("fd", a.fileno())
    assert parse_control(str(tmp_path / "control")) == ("path", str(tmp_path / "control"))


# --- Requests and answers -------------------------------------------------------------

def test_a_snapshot_request_gets_ok_true(channel, tmp_path):
    """One line asked, one line answered: ok, where, how long, how much."""
    served, ours, machine = channel()
    reply = ask(ours, str(tmp_path / "snap"))
    assert machine.asked == [str(tmp_path / "snap")]
    assert reply["ok"] is True and reply["snapshot"] == str(tmp_path / "snap")
    assert reply["memory_bytes"] == 5 and isinstance(reply["seconds"], float)


def test_ask_sends_an_absolute_directory(channel, tmp_path, monkeypatch):
    """The launcher may run elsewhere: a relative DIR is made absolute."""
    monkeypatch.chdir(tmp_path)
    served, ours, machine = channel()
    ask(ours, "snap")
    assert machine.asked == [str(tmp_path / "snap")]


@pytest.mark.parametrize("error, words", [
    (SnapshotError("snapshot /x: the directory is not empty"),
     "snapshot /x: the directory is not empty"),
    (PylguestError("KVM refused"), "KVM refused"),
    (OSError(28, "No space left on device"), "No space left on device"),
])
def test_a_failed_snapshot_gets_ok_false_with_its_error(channel, error, words):
    """The machine's refusal is the answer; the channel goes on serving."""
    served, ours, machine = channel(error)
    reply = ask(ours, "/x")
    assert reply["ok"] is False and words in reply["error"]
    assert ask(ours, "/y")["ok"] is False and machine.asked == ["/x", "/y"]


@pytest.mark.parametrize("line", [
    b"not json", b"[]", b"{}", b'{"snapshot": 5}', b'{"snapshot": ""}',
    b'{"snapshot": "/d", "force": true}', b'"/d"', b"\xff\xfe", b"",
])
def test_a_malformed_request_gets_ok_false_and_asks_nothing(channel, line):
    """Anything but {"snapshot": "DIR"} is answered, not obeyed, and the
    next good request is still served."""
    served, ours, machine = channel()
    ours.sendall(line + b"\n")
    reply = read_line(ours)
    assert reply["ok"] is False and '{"snapshot": "DIR"}' in reply["error"]
    assert machine.asked == []
    assert ask(ours, "/d")["ok"] is True


def test_requests_in_one_write_are_answered_in_order(channel):
    served, ours, machine = channel()
    ours.sendall(b'{"snapshot": "/a"}\n{"snapshot": "/b"}\n')
    assert [reply["snapshot"] for reply in read_lines(ours, 2)] == ["/a", "/b"]
    assert machine.asked == ["/a", "/b"]


def test_an_endless_request_is_refused_and_the_connection_closed(channel):
    """A line longer than MAX_REQUEST without its newline: answered once,
    then the channel stops reading that connection."""
    served, ours, machine = channel()
    ours.sendall(b"x" * (control.MAX_REQUEST + 10))
    reply = read_line(ours)
    assert reply["ok"] is False and "longer than" in reply["error"]
    served.thread.join(TIMEOUT)
    assert not served.thread.is_alive()


def test_close_joins_the_thread_and_is_idempotent(channel):
    served, ours, machine = channel()
    assert served.thread.is_alive()
    served.close()
    assert not served.thread.is_alive()
    served.close()


def test_close_ends_a_channel_waiting_in_the_middle_of_a_request(channel):
    served, ours, machine = channel()
    ours.sendall(b'{"snapshot": ')                 # no newline yet
    served.close()
    assert not served.thread.is_alive()


# --- ask(): what the client believes --------------------------------------------------

def scripted_peer(answer):
    """A socket pair whose far end reads one request, then sends `answer`
    (bytes) and closes."""
    ours, theirs = socket.socketpair()
    ours.settimeout(TIMEOUT)

    def serve():
        with theirs:
            theirs.recv(65536)
            theirs.sendall(answer)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return ours, thread


@pytest.mark.parametrize("answer, words", [
    (b"", "closed the control channel without an answer"),
    (b'{"ok": tr', "closed the control channel without an answer"),
    (b"nonsense\n", "not one it gives"),
    (b'{"ok": "yes"}\n', "not one it gives"),
    (b"[true]\n", "not one it gives"),
    (b"x" * (control.MAX_REQUEST + 1), "too long"),
])
def test_ask_refuses_an_answer_the_launcher_does_not_give(answer, words):
    ours, thread = scripted_peer(answer)
    with ours:
        with pytest.raises(PylguestError, match=words):
            ask(ours, "/d")
    thread.join(TIMEOUT)


def test_ask_turns_a_timeout_into_a_launcher_error():
    """A launcher that never answers: PylguestError, not a raw timeout."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(0.2)
        with pytest.raises(PylguestError, match="the control channel: timed out"):
            ask(ours, "/d")


# --- A socket path: request_snapshot, as `pylguest snapshot` uses it ----------------

class DroppingLauncher:
    """A socket at `path` whose 'launcher' accepts, reads nothing and
    closes: the client's read gets ECONNRESET, as when a launcher shuts
    down with a request unread."""

    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(TIMEOUT)
            # Wait until the request is in our buffer, then close unread.
            connection.recv(1, socket.MSG_PEEK)

    def close(self):
        self.listener.close()
        self.thread.join(TIMEOUT)


def test_a_launcher_gone_in_the_middle_is_a_launcher_error(tmp_path):
    """A request the launcher dropped is one PylguestError, not a
    ConnectionResetError."""
    path = str(tmp_path / "control")
    launcher = DroppingLauncher(path)
    try:
        with pytest.raises(PylguestError, match="the control channel: Connection reset"):
            request_snapshot(path, "/d", timeout=TIMEOUT)
    finally:
        launcher.close()



def test_a_control_socket_at_a_path_is_private_and_serves_each_connection(tmp_path):
    """--control PATH: the socket is mode 0600 (whoever connects can save
    the guest's memory); each connection is served in turn; close()
    removes it."""
    path = str(tmp_path / "control")
    machine = FakeMachine()
    served = ControlChannel(path, machine)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert request_snapshot(path, "/one", timeout=TIMEOUT)["ok"] is True
        assert request_snapshot(path, "/two", timeout=TIMEOUT)["memory_bytes"] == 5
        assert machine.asked == ["/one", "/two"]
    finally:
        served.close()
    assert not served.thread.is_alive()
    assert not os.path.lexists(path)


def test_request_snapshot_with_nobody_listening_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=re.escape(f"cannot reach a launcher at {tmp_path}/nope")):
        request_snapshot(str(tmp_path / "nope"), "/d", timeout=TIMEOUT)


# --- The command line ------------------------------------------------------------------

def pylguest(*args):
    return subprocess.run([sys.executable, "-m", "pylguest", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "launcher"), "PATH": "/usr/bin:/bin"})


def assert_usage_error(result, *words):
    """Exit status 2 and one line on stderr, holding `words`."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pylguest: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("extra, named", [
    (["--block", "x.img"], "--block"),
    (["--net", "user"], "--net"),
    (["--rng"], "--rng"),
    (["--initrd", "i.cpio"], "--initrd"),
    (["--cmdline", "quiet"], "--cmdline"),
    (["--mem", "512M"], "--mem"),
    (["--console", "stdio"], "--console"),
    (["--", "true"], "-- CMD"),
    (["kernel.elf"], "kernel"),
])
def test_restore_refuses_what_the_snapshot_decides(tmp_path, extra, named):
    """--restore takes the machine from the snapshot: a kernel, a device
    option or a command besides it is one line, before anything is read."""
    line = assert_usage_error(pylguest("run", "--restore", str(tmp_path), *extra), named)
    assert "--restore takes the machine from the snapshot" in line


def test_restore_refuses_several_at_once_naming_each(tmp_path):
    line = assert_usage_error(pylguest("run", "kernel.elf", "--restore", str(tmp_path),
                                       "--rng", "--block", "x", "--", "true"))
    assert "kernel, --block, --rng, -- CMD cannot be given with it" in line


def test_restore_of_a_missing_snapshot_is_one_line(tmp_path):
    assert_usage_error(pylguest("run", "--restore", str(tmp_path / "nope")),
                       f"snapshot {tmp_path}/nope", "no such directory")


def test_restore_of_a_directory_that_is_no_snapshot_is_one_line(tmp_path):
    assert_usage_error(pylguest("run", "--restore", str(tmp_path)),
                       f"snapshot {tmp_path}: no manifest.json")


def test_run_needs_a_kernel_or_a_snapshot():
    assert_usage_error(pylguest("run"), "needs a KERNEL (or --restore DIR)")


def test_disk_writes_is_only_for_a_restore():
    assert_usage_error(pylguest("run", "kernel.elf", "--disk-writes", "image"),
                       "--disk-writes is for --restore")


def test_snapshot_with_nobody_listening_is_one_line(tmp_path):
    assert_usage_error(pylguest("snapshot", "/nonexistent/sock", str(tmp_path / "snap")),
                       "cannot reach a launcher at /nonexistent/sock")


def test_snapshot_against_a_launcher_gone_in_the_middle_is_one_line(tmp_path):
    """The launcher drops the request: exit status 1 (not the user's
    input), one line, no traceback."""
    path = str(tmp_path / "control")
    launcher = DroppingLauncher(path)
    try:
        result = pylguest("snapshot", path, str(tmp_path / "snap"))
    finally:
        launcher.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["pylguest: the control channel: Connection reset by peer"], result.stderr


def test_snapshot_takes_no_command():
    assert_usage_error(pylguest("snapshot", "/c", "/d", "--", "true"),
                       "only `pylguest run` takes a command")


@pytest.mark.parametrize("outcome, status, words", [
    (None, 0, "pylguest: snapshot {dir}: taken in "),
    (SnapshotError("snapshot {dir}: the directory is not empty"), 2,
     "pylguest: snapshot {dir}: the directory is not empty"),
])
def test_the_snapshot_command_reports_the_launchers_answer(tmp_path, outcome, status, words):
    """`pylguest snapshot PATH DIR` against a listening channel: the answer
    in one line, exit status 0 or 2."""
    directory = str(tmp_path / "snap")
    if outcome is not None:
        outcome = SnapshotError(str(outcome).format(dir=directory))
    path = str(tmp_path / "control")
    served = ControlChannel(path, FakeMachine(outcome))
    try:
        result = pylguest("snapshot", path, directory)
    finally:
        served.close()
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(words.format(dir=directory)), lines
