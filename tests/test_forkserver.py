"""The fork server (forkserver.py): launchers forked from a warm one, with
their fds at the numbers asked for, their own environment, their exit
status and signals relayed, and nothing outliving what started it.  The
launchers here run the teaching guests (hello: exits with the status its
command line asks; echo: echoes in upper case until it reads "q")."""

import os
import signal
import socket
import time

import pytest

from conftest import ROOT, guest_path, wait_until
from pylguest import forkserver
from pylguest.forkserver import ForkedProcess, ForkServer, ForkServerError

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "launcher"))
TIMEOUT = 20


@pytest.fixture
def server():
    server = ForkServer(ENV)
    yield server
    server.close()


def read_until(process, text, timeout=TIMEOUT):
    """Console output until `text` appears (bounded)."""
    seen = b""
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    while text not in seen:
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in {seen!r}")
        chunk = process.stdout.read()
        seen += chunk or b""
        if not chunk:
            time.sleep(0.01)
    return seen


def gone(pid):
    """The process `pid` no longer exists (reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def echo(server, *more, pass_fds=()):
    process = server.spawn(["run", str(guest_path("echo")), "--timeout", "60", *more], env=ENV,
                           pass_fds=pass_fds)
    read_until(process, b"echo: ready")
    return process


def test_a_forked_launcher_runs_a_guest_to_its_exit_status(server, kvm_available):
    process = server.spawn(["run", str(guest_path("hello")), "--cmdline", "exit=3",
                            "--timeout", "20"], env=ENV)
    assert process.wait(TIMEOUT) == 3
    assert b"max_pfn" in process.stdout.read()
    assert process.poll() == 3 and process.returncode == 3


def test_bad_user_input_is_one_line_and_status_2(server):
    process = server.spawn(["run", "/nonexistent/kernel"], env=ENV)
    assert process.wait(TIMEOUT) == 2
    lines = process.stderr.read().decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pylguest: ")


def test_the_launcher_gets_the_environment_of_its_request(server):
    process = server.spawn(["--help"], env=dict(ENV, COLUMNS="40"))
    assert process.wait(TIMEOUT) == 0
    out = process.stdout.read().decode().splitlines()
    assert out and max(map(len, out)) <= 40          # argparse wrapped at COLUMNS
    wide = server.spawn(["--help"], env=dict(ENV, COLUMNS="200"))
    assert wide.wait(TIMEOUT) == 0
    assert max(map(len, wide.stdout.read().decode().splitlines())) > 40


def test_passed_fds_keep_their_numbers(server, kvm_available, tmp_path):
    ours, theirs = socket.socketpair()
    number = max(theirs.fileno(), 40)               # a number the child must place it at
    if number != theirs.fileno():
        os.dup2(theirs.fileno(), number)
        theirs.close()
        theirs = socket.socket(fileno=number)
    process = echo(server, "--control", f"fd:{number}", pass_fds=[number])
    theirs.close()
    try:
        from pylguest.control import ask
        ours.settimeout(TIMEOUT)
        reply = ask(ours, str(tmp_path / "snap"))   # answered by the launcher's control
        assert reply["ok"], reply
        assert (tmp_path / "snap" / "manifest.json").exists()
    finally:
        process.kill()
        process.wait(TIMEOUT)
        ours.close()


def test_signals_reach_the_launcher_and_its_status_comes_back(server, kvm_available):
    process = echo(server)
    process.terminate()
    assert process.wait(TIMEOUT) == 128 + signal.SIGTERM   # the launcher's own SIGTERM exit
    assert b"SIGTERM" in process.stderr.read()
    process = echo(server)
    process.kill()
    assert process.wait(TIMEOUT) == -signal.SIGKILL


def test_wait_times_out_as_subprocess_does(server, kvm_available):
    import subprocess
    process = echo(server)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(0.2)
    assert process.poll() is None
    process.stdin.write(b"q")
    process.stdin.flush()
    assert process.wait(TIMEOUT) == 0


def test_a_dropped_launcher_is_killed(server, kvm_available):
    process = echo(server)
    pid = process.pid
    del process                                     # closes its status socket
    wait_until(lambda: gone(pid), TIMEOUT)


def test_the_launchers_end_with_their_client(server, kvm_available):
    process = echo(server)
    server.close()                                  # as when the client exits
    assert server.process.returncode == 0
    assert process.wait(TIMEOUT) == -signal.SIGKILL
    wait_until(lambda: gone(process.pid), TIMEOUT)


def test_the_launchers_die_with_the_server(server, kvm_available):
    process = echo(server)
    server.process.kill()                           # no goodbye: PR_SET_PDEATHSIG
    server.process.wait()
    wait_until(lambda: gone(process.pid), TIMEOUT)
    assert process.wait(TIMEOUT) == -signal.SIGKILL
    with pytest.raises(ForkServerError, match="exited"):
        server.spawn(["--help"], env=ENV)


def test_shared_starts_a_new_server_when_the_old_one_died():
    first = forkserver.shared(ENV)
    assert forkserver.shared(ENV) is first
    first.process.kill()
    first.process.wait()
    second = forkserver.shared(ENV)
    assert second is not first and second.alive()
    assert second.spawn(["--help"], env=ENV).wait(TIMEOUT) == 0


@pytest.mark.parametrize("request_, why", [
    ({"args": "run", "env": {}, "numbers": [0, 1, 2, -1]}, "args"),
    ({"args": [], "env": {"A": 1}, "numbers": [0, 1, 2, -1]}, "env"),
    ({"args": [], "env": {}, "numbers": [0, 1, 2, 3]}, "numbers"),
    ({"args": [], "env": {}, "numbers": [0, 1, 2, -1, 2]}, "numbers"),
    ({"args": [], "env": {}, "numbers": [0, 1, 2, -1, 5000]}, "numbers"),
    ({"args": [], "env": {}, "numbers": [0, 1, 2, -1, 7]}, "numbers"),   # no fd for 7
])
def test_a_bad_request_is_refused_and_the_server_goes_on(server, request_, why):
    status, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        forkserver._send(server._requests, request_, [null, null, null, status_theirs.fileno()])
        status.settimeout(TIMEOUT)
        reply, _ = forkserver._receive(status)
        assert reply["error"].startswith(f"bad request: {why}")
    finally:
        os.close(null)
        status.close()
        status_theirs.close()
    assert server.spawn(["--help"], env=ENV).wait(TIMEOUT) == 0


@pytest.mark.parametrize("reply, expected", [
    (b"not json", "not a JSON object"),
    (b"[1]", "not a JSON object"),
    (b'{"exit": "0"}', "'exit' must be an integer"),
    (b'{"exit": 300}', "'exit' must be an integer"),
    (b'{"pid": 5}', "'exit' must be an integer"),
])
def test_what_the_server_says_is_checked(reply, expected):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = ForkedProcess(["pylguest"], ours, 12345, None, None, None)
    theirs.send(reply)
    with pytest.raises(ForkServerError, match=expected):
        process.wait(TIMEOUT)
    theirs.close()


def test_a_server_gone_without_a_word_means_killed():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = ForkedProcess(["pylguest"], ours, 12345, None, None, None)
    theirs.close()
    assert process.wait(TIMEOUT) == -signal.SIGKILL


def test_fds_are_placed_without_one_closing_another():
    """_place_fds in a child: fds whose targets are each other's numbers."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            # a_w goes to b_w's number and b_w to a_w's: a swap
            forkserver._place_fds([a_w, b_w], [b_w, a_w])
            os.write(b_w, b"a")
            os.write(a_w, b"b")
            open_fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
            os.write(b_w, repr(open_fds).encode())
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(a_w)
    os.close(b_w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.read(a_r, 100).startswith(b"a")
    assert os.read(b_r, 100) == b"b"
    os.close(a_r)
    os.close(b_r)
