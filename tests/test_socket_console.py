"""`--console socket:PATH`: a unix-socket client is the console.

Every wait is bounded (WAIT seconds); nothing sleeps for a fixed time.
"""

import os
import queue
import socket
import tempfile

import pytest

from conftest import recv_exactly, wait_until

from pylguest.hostconsole.socket_console import SocketConsole
from pylguest.errors import UsageError

WAIT = 5.0


@pytest.fixture
def path():
    # AF_UNIX paths are short (108 bytes): a short directory of our own.
    directory = tempfile.mkdtemp(prefix="pyl")
    yield os.path.join(directory, "console.sock")
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


@pytest.fixture
def console(path):
    received = queue.Queue()
    sc = SocketConsole(path)
    sc.start(received.put)
    sc.received = received
    yield sc
    sc.close()


def until(predicate):
    wait_until(predicate, WAIT)


def connect(path, console):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(WAIT)
    old = console.client
    client.connect(path)
    until(lambda: console.client is not None and console.client is not old)
    return client




def received_exactly(console, n):
    """The next n bytes the console handed to its receive callback."""
    got = b""
    while len(got) < n:
        got += console.received.get(timeout=WAIT)
    return got


def test_client_gets_the_output(console, path):
    with connect(path, console) as client:
        console.write(b"hello ")
        console.write(b"world")
        assert recv_exactly(client, 11) == b"hello world"


def test_what_the_client_sends_reaches_receive(console, path):
    with connect(path, console) as client:
        client.sendall(b"typed")
        assert received_exactly(console, 5) == b"typed"


def test_output_without_a_client_is_dropped(console, path):
    console.write(b"nobody hears this")
    with connect(path, console) as client:
        console.write(b"now")
        assert recv_exactly(client, 3) == b"now"


def test_a_new_client_replaces_the_old(console, path):
    first = connect(path, console)
    second = connect(path, console)
    try:
        assert first.recv(10) == b""              # the old one was closed
        console.write(b"to second")
        assert recv_exactly(second, 9) == b"to second"
    finally:
        first.close()
        second.close()


def test_client_going_away_is_forgotten(console, path):
    client = connect(path, console)
    client.close()
    until(lambda: console.client is None)
    console.write(b"into the void")               # must not raise
    with connect(path, console) as again:
        console.write(b"x")
        assert recv_exactly(again, 1) == b"x"


def test_client_reset_does_not_kill_the_console(console, path):
    # Unread data in our socket when the client closes makes the kernel
    # send a reset; the console must survive it and take the next client.
    client = connect(path, console)
    console.write(b"unread" * 1000)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()
    until(lambda: console.client is None)
    with connect(path, console) as again:
        again.sendall(b"still here")
        assert received_exactly(console, 10) == b"still here"


def test_stale_socket_is_replaced(path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                                 # leaves the socket file behind
    sc = SocketConsole(path)
    sc.close()
    assert not os.path.exists(path)               # close removes it


def test_a_regular_file_is_never_deleted(path):
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(UsageError, match="--console socket:"):
        SocketConsole(path)
    with open(path) as f:
        assert f.read() == "precious"


def test_unbindable_path_is_a_usage_error():
    with pytest.raises(UsageError, match="--console socket:/nonexistent-dir/x.sock"):
        SocketConsole("/nonexistent-dir/x.sock")


def test_a_second_launcher_never_deletes_a_live_console(console, path):
    with pytest.raises(UsageError, match="another pylguest is serving its console there"):
        SocketConsole(path)
    with connect(path, console) as client:            # the first one's socket still works
        console.write(b"still mine")
        assert recv_exactly(client, 10) == b"still mine"


def test_the_path_is_free_again_after_close(path):
    SocketConsole(path).close()
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")
    SocketConsole(path).close()


def test_another_programs_listening_socket_is_left_alone(path):
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(1)
    try:
        with pytest.raises(UsageError, match="another program is listening"):
            SocketConsole(path)
        assert os.path.exists(path)
    finally:
        other.close()


def test_a_path_too_long_for_a_socket_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="at most 107"):
        SocketConsole(str(tmp_path / ("y" * 110)))
