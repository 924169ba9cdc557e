"""The host side of the console: the terminal the launcher runs in.

Two jobs, both as QEMU does them for `-nographic`:

RawTerminal puts the terminal in raw mode for the length of a run, so each
key reaches the guest as it is typed, with nothing added or eaten: no line
editing, no local echo (the guest echoes), Enter sends '\\r' as a serial
terminal's Enter does, and Ctrl-C, Ctrl-Z, Ctrl-S are bytes for the guest
rather than signals or flow control for us (ISIG and IXON off).  Output
processing (OPOST) stays on, as QEMU leaves it: a guest that prints a bare
'\\n' still starts a new line, and '\\r\\n' from Linux is unharmed.

InputReader is the thread that reads the keyboard and feeds the guest's
console.  On a terminal it also watches for QEMU's escape key, Ctrl-A:

    Ctrl-A x        quit the launcher
    Ctrl-A Ctrl-A   send one Ctrl-A to the guest
    Ctrl-A h (or ?) print this help on stderr

Any other key after Ctrl-A is swallowed, as QEMU does.  From a pipe there
are no escapes: scripted input may contain 0x01 and must arrive untouched.
"""

import atexit
import os
import select
import termios
import threading
from typing import Callable, Optional

ESCAPE = 0x01             # Ctrl-A
QUIT_KEY = ord("x")
HELP_KEYS = (ord("h"), ord("?"))
READ_SIZE = 4096

HELP_TEXT = (b"\r\npylguest console escapes:\r\n"
             b"  C-a x    quit\r\n"
             b"  C-a C-a  send C-a to the guest\r\n"
             b"  C-a h    this help\r\n")

# termios.tcgetattr gives [iflag, oflag, cflag, lflag, ispeed, ospeed, cc].
IFLAG, OFLAG, CFLAG, LFLAG, CC = 0, 1, 2, 3, 6


def raw_mode(attributes):
    """The attributes of `attributes` in raw mode, QEMU's recipe (see above)."""
    attrs = list(attributes)
    attrs[CC] = list(attrs[CC])
    attrs[IFLAG] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                      | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[OFLAG] |= termios.OPOST
    attrs[LFLAG] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN
                      | termios.ISIG)
    attrs[CFLAG] &= ~(termios.CSIZE | termios.PARENB)
    attrs[CFLAG] |= termios.CS8
    attrs[CC][termios.VMIN] = 1           # a read returns as soon as one key is in
    attrs[CC][termios.VTIME] = 0
    return attrs


class RawTerminal:
    """`with RawTerminal(0):` raw mode inside, the old mode back outside.

    Does nothing when `fd` is not a terminal (a pipe, /dev/null, a file).
    The saved mode is restored on every way out: leaving the block, an
    exception, a signal handler or atexit calling `restore()`.  restore()
    takes no lock and may run twice, so it is safe from a signal handler.
    """

    def __init__(self, fd: int = 0):
        self.fd = fd
        self._saved = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def __enter__(self):
        if os.isatty(self.fd):
            saved = termios.tcgetattr(self.fd)
            self._saved = saved
            atexit.register(self.restore)     # even if the with-block never ends
            termios.tcsetattr(self.fd, termios.TCSANOW, raw_mode(saved))
        return self

    def __exit__(self, *exc_info):
        self.restore()
        atexit.unregister(self.restore)
        return False

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        try:
            # TCSANOW, not TCSADRAIN: waiting for output to drain could hang
            # an exit path forever on a stopped terminal.
            termios.tcsetattr(self.fd, termios.TCSANOW, saved)
        except (termios.error, OSError):
            pass                              # the terminal is gone: nothing to restore


class EscapeDecoder:
    """Turns keyboard bytes into guest input, acting on Ctrl-A sequences.

    The state (a Ctrl-A seen, waiting for its key) lives across calls, since
    the two keys can arrive in different reads.  After Ctrl-A x, `quit` is
    set and the rest of the input is ignored; the caller delivers what came
    before it, then quits.
    """

    def __init__(self, on_help: Callable[[], None]):
        self.on_help = on_help
        self.after_escape = False
        self.quit = False

    def decode(self, data: bytes) -> bytes:
        """The bytes of `data` meant for the guest."""
        guest = bytearray()
        for byte in data:
            if self.quit:
                break
            if not self.after_escape:
                if byte == ESCAPE:
                    self.after_escape = True
                else:
                    guest.append(byte)
                continue
            self.after_escape = False
            if byte == ESCAPE:
                guest.append(ESCAPE)
            elif byte == QUIT_KEY:
                self.quit = True
            elif byte in HELP_KEYS:
                self.on_help()
        return bytes(guest)


def write_help_to_stderr():
    try:
        os.write(2, HELP_TEXT)
    except OSError:
        pass


class InputReader:
    """A daemon thread: read `fd` (stdin), hand the bytes to `receive`.

    `receive` is the guest's console input (Uart8250.receive, or the
    launcher's router between the UART and the virtio console).  The
    thread ends at end of file, after Ctrl-A x, or on `stop()`, which wakes
    it through a pipe of its own so it never sits in read() forever.
    Pass `escapes=os.isatty(fd)`: Ctrl-A keys on a terminal, none from a pipe.
    """

    def __init__(self, fd: int, receive: Callable[[bytes], None],
                 on_quit: Callable[[], None], escapes: bool,
                 on_help: Optional[Callable[[], None]] = None):
        self.fd = fd
        self.receive = receive
        self.on_quit = on_quit
        self.decoder = EscapeDecoder(on_help or write_help_to_stderr) if escapes else None
        self.eof = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="pylguest console input")

    def start(self) -> "InputReader":
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread and close the wake pipe; True if it has ended.
        Does not close `fd`, which is the caller's."""
        if self._wake_w is not None:
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped and self._wake_w is not None:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        return stopped

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
        return False

    def _run(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_r in ready:
                return                       # stop() was called
            if self.fd not in ready:
                continue
            data = self._read()
            if data is None:
                continue
            if not data:
                self.eof = True
                return
            if self.decoder is not None:
                data = self.decoder.decode(data)
            if data:
                self.receive(data)
            if self.decoder is not None and self.decoder.quit:
                self.on_quit()
                return

    def _read(self):
        """Up to READ_SIZE bytes; b"" at end of input; None to try again."""
        try:
            return os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""                       # EIO: the terminal hung up
