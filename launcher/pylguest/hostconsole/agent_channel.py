"""`--agent fd:N`: the agent's console device relayed to an inherited socket.

The guest's agent (guests/linux/agent.c) speaks a framed protocol
(docs/abi.md, section 8) over a virtio console of its own, `agent0`.
The launcher does not read that protocol: it moves bytes between the
device and fd N, a unix stream socket whose other end the Python side of
a test holds (pylguest/agent/).  A socket pair needs no path, so two
launchers on one machine (pytest-xdist workers) never meet.

Unlike the user's console, this relay must lose nothing, in either
direction, or the two ends would disagree about where a frame starts:

  * to the guest: the console device keeps at most PENDING_LIMIT bytes
    waiting for the guest's receive buffers.  We read the socket only
    while there is room, and only as much as fits, so the socket itself
    holds the rest and its writer waits (back-pressure, not loss).
  * from the guest: every byte is written to the socket.  The write waits
    while the socket is full, in short steps between which the device's
    abandon flag is checked (a reset or the end of the run must not wait
    for a test that stopped reading).  Once the other end has gone, what
    the agent sends is dropped, with one line saying so; the guest runs on.

The one thing the relay knows of the protocol is where the agent's first
frame ends (its HELLO: a frame's first four bytes are its payload's
length).  It keeps that frame, `greeting`, for a snapshot: a restored
guest's agent said HELLO long ago, to another channel, so the restored
launcher says it again on the agent's behalf (start(greeting=...)), and
the new channel's test sees a session like any other.
"""

import errno
import os
import select
import socket
import stat
import threading

from pylguest.errors import UsageError
from pylguest.report import say

READ_SIZE = 65536
FRAME_HEADER = 12               # u32 length, u32 id, u16 type, u16 reserved
GREETING_LIMIT = 4096           # a first frame longer than this is not kept
WAIT_STEP = 0.1                 # seconds a blocked write waits between abandon checks


def parse_agent(spec):
    """The fd of --agent fd:N, checked: an open unix stream socket."""
    kind, _, number = spec.partition(":")
    if kind != "fd" or not number.isdigit():
        raise UsageError(f"bad --agent {spec!r}: use fd:N, an inherited unix socket")
    fd = int(number)
    if fd <= 2:
        raise UsageError(f"--agent fd:{fd}: fds 0-2 are the console; pass a socket above them")
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise UsageError(f"--agent fd:{fd}: no such open file descriptor") from None
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"--agent fd:{fd}: not a socket")
    return fd


class AgentChannel:
    def __init__(self, fd):
        self.socket = socket.socket(fileno=fd)
        if self.socket.family != socket.AF_UNIX or self.socket.type != socket.SOCK_STREAM:
            self.socket.detach()
            raise UsageError(f"--agent fd:{fd}: not a unix stream socket")
        self.socket.setblocking(False)
        os.set_inheritable(fd, False)
        self.device = None
        self.gone = False                  # the other end closed: drop the guest's bytes
        self.greeting = b""                # the agent's first frame, once it is whole
        self._first = bytearray()          # ... while it is coming
        self._room = threading.Event()     # set when the device may have room for input
        self._stopping = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._to_guest, daemon=True,
                                       name="pylguest agent channel")

    def start(self, device, greeting=b""):
        """Relay for `device` (a ConsoleDevice whose output is write());
        a restored machine's relay first sends its agent's `greeting`."""
        self.device = device
        device.on_room = self._room.set
        if greeting:
            self.greeting = greeting
            self._send(greeting)
        self.thread.start()

    # -- from the guest ---------------------------------------------------------

    def write(self, data):
        """The agent's bytes, all of them, to the socket (the device's
        transmit path: check_abandoned() may raise between waits)."""
        if not self.greeting and self._first is not None:
            self._keep_greeting(data)
        self._send(data)

    def _keep_greeting(self, data):
        self._first += data[:GREETING_LIMIT - len(self._first)]
        if len(self._first) < FRAME_HEADER:
            return
        whole = FRAME_HEADER + int.from_bytes(self._first[:4], "little")
        if whole > GREETING_LIMIT:
            self._first = None                 # not a greeting we keep
        elif len(self._first) >= whole:
            self.greeting, self._first = bytes(self._first[:whole]), None

    def _send(self, data):
        view = memoryview(data)
        while view and not self.gone:
            try:
                view = view[self.socket.send(view):]
            except BlockingIOError:
                select.select([], [self.socket], [], WAIT_STEP)
                if self.device is not None:
                    self.device.check_abandoned()
            except OSError as e:
                self._lost(e)

    def _lost(self, error):
        if not self.gone:
            self.gone = True
            why = "closed" if error is None or error.errno in (errno.EPIPE, errno.ECONNRESET) \
                else os.strerror(error.errno)
            say(f"pylguest: agent channel: the test's end is {why}; "
                "dropping what the guest's agent sends")

    # -- to the guest -------------------------------------------------------------

    def _to_guest(self):
        while not self._stopping:
            room = self.device.room()
            if room <= 0:
                # The guest has not taken what is pending: wait until it has.
                self._room.clear()
                if self.device.room() <= 0:
                    self._room.wait(WAIT_STEP)
                continue
            ready, _, _ = select.select([self.socket, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = self.socket.recv(min(room, READ_SIZE))
            except BlockingIOError:
                continue
            except OSError as e:
                self._lost(e)
                return
            if not data:
                self._lost(None)
                return
            self.device.receive(data)

    def close(self):
        if self._stop_w < 0:
            return
        self._stopping = True
        os.write(self._stop_w, b"x")
        self._room.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.socket.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1
