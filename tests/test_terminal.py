"""Raw mode on a real pty, the Ctrl-A escapes, and the input thread."""

import atexit
import os
import queue
import termios

import pytest

from pylguest.hostconsole import terminal
from pylguest.hostconsole.terminal import EscapeDecoder, InputReader, RawTerminal

CTRL_A = b"\x01"
TIMEOUT = 5.0


@pytest.fixture
def pty():
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fds = {"r": r, "w": w}
    yield fds
    for fd in fds.values():
        if fd is not None:
            os.close(fd)


# -- raw mode ---------------------------------------------------------------------

def test_raw_mode_flags_and_restore(pty):
    _, slave = pty
    before = termios.tcgetattr(slave)
    with RawTerminal(slave) as term:
        assert term.active
        iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(slave)
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        assert not iflag & (termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
        assert oflag & termios.OPOST                   # "\n" still starts a line
        assert cflag & termios.CSIZE == termios.CS8
        assert cc[termios.VMIN] == 1 and cc[termios.VTIME] == 0
    assert not term.active
    assert termios.tcgetattr(slave) == before


def test_restored_after_an_exception(pty):
    _, slave = pty
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError):
        with RawTerminal(slave):
            assert termios.tcgetattr(slave) != before
            raise RuntimeError("the guest crashed")
    assert termios.tcgetattr(slave) == before


def test_restore_is_idempotent_and_registered_with_atexit(pty, monkeypatch):
    _, slave = pty
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(atexit, "unregister", registered.remove)
    before = termios.tcgetattr(slave)
    with RawTerminal(slave) as term:
        assert registered == [term.restore]
        term.restore()                                 # as a signal handler would
        assert termios.tcgetattr(slave) == before
        term.restore()                                 # and again: harmless
    assert registered == []
    assert termios.tcgetattr(slave) == before


def test_not_a_tty_is_left_alone(pipe):
    with RawTerminal(pipe["r"]) as term:
        assert not term.active
    term.restore()


def test_isig_off_sends_ctrl_c_as_a_byte(pty):
    master, slave = pty
    with RawTerminal(slave):
        os.write(master, b"\x03\r")
        assert os.read(slave, 16) == b"\x03\r"        # no SIGINT, no CR->NL


# -- escapes ----------------------------------------------------------------------

def test_escape_quit():
    decoder = EscapeDecoder(on_help=lambda: None)
    assert decoder.decode(b"ls" + CTRL_A + b"x" + b"ignored") == b"ls"
    assert decoder.quit


def test_escape_doubled_sends_one_ctrl_a():
    decoder = EscapeDecoder(on_help=lambda: None)
    assert decoder.decode(b"a" + CTRL_A + CTRL_A + b"b") == b"a\x01b"
    assert not decoder.quit


def test_escape_split_across_reads_and_help():
    helped = []
    decoder = EscapeDecoder(on_help=lambda: helped.append(True))
    assert decoder.decode(b"abc" + CTRL_A) == b"abc"
    assert decoder.decode(b"h") == b""
    assert helped == [True]
    assert decoder.decode(CTRL_A + b"q" + b"d") == b"d"   # unknown key: swallowed
    assert decoder.decode(CTRL_A) == b""
    assert decoder.decode(b"x") == b""
    assert decoder.quit


# -- the input thread -------------------------------------------------------------

def collect(received, at_least):
    data = b""
    while len(data) < at_least:
        data += received.get(timeout=TIMEOUT)
    return data


def test_reader_passes_bytes_untouched_without_escapes(pipe):
    received, quits = queue.Queue(), []
    reader = InputReader(pipe["r"], received.put, lambda: quits.append(1), escapes=False)
    with reader:
        script = b"echo hi\r" + CTRL_A + b"x" + CTRL_A + CTRL_A
        os.write(pipe["w"], script)
        assert collect(received, len(script)) == script
        os.close(pipe["w"])
        pipe["w"] = None
        reader._thread.join(TIMEOUT)
        assert not reader.is_alive() and reader.eof    # end of input ends it
    assert quits == []


def test_reader_quits_on_ctrl_a_x(pipe):
    received, quits = queue.Queue(), []
    reader = InputReader(pipe["r"], received.put, lambda: quits.append(1), escapes=True)
    with reader:
        os.write(pipe["w"], b"ab" + CTRL_A + CTRL_A + b"c" + CTRL_A + b"x" + b"zz")
        reader._thread.join(TIMEOUT)
        assert not reader.is_alive()
    assert collect(received, 4) == b"ab\x01c"
    assert received.empty()
    assert quits == [1]


def test_reader_help_on_ctrl_a_h(pipe):
    received, helped = queue.Queue(), queue.Queue()
    reader = InputReader(pipe["r"], received.put, lambda: None, escapes=True,
                         on_help=lambda: helped.put(True))
    with reader:
        os.write(pipe["w"], CTRL_A + b"h" + b"k")
        assert helped.get(timeout=TIMEOUT)
        assert collect(received, 1) == b"k"


def test_stop_wakes_an_idle_reader(pipe):
    reader = InputReader(pipe["r"], lambda data: None, lambda: None, escapes=False).start()
    assert reader.is_alive()
    assert reader.stop(timeout=TIMEOUT)
    assert not reader.is_alive() and not reader.eof


def test_reader_on_a_pty_in_raw_mode(pty):
    master, slave = pty
    received = queue.Queue()
    with RawTerminal(slave), InputReader(slave, received.put, lambda: None, escapes=True):
        os.write(master, b"q\x03")                     # no newline needed in raw mode
        assert collect(received, 2) == b"q\x03"


def test_help_text_mentions_every_escape():
    for key in (b"C-a x", b"C-a C-a", b"C-a h"):
        assert key in terminal.HELP_TEXT
