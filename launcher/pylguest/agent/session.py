"""A session: commands and files over one agent channel (docs/abi.md, section 8).

    session = Session(sock)             # the test's end of the socket pair
    session.wait_ready(timeout=240)     # the agent's HELLO: the guest is up
    result = session.run(["uname", "-r"])
    result.status, result.stdout        # 0, "6.1.0\\n"

One thread, the reader, owns the receiving side: it turns the agent's
bytes into frames (protocol.FrameReader), checks that each frame is one
its request may have at that point, and hands it to the request.  Callers
on any number of threads open requests, send their frames and wait; each
request has its own id, so two threads' commands run side by side.

Text and bytes: what goes in may be str (UTF-8) or bytes; what comes
back is str, decoded as UTF-8 with invalid bytes replaced, and the exact
bytes are always beside it under a `_bytes` name (`result.stdout_bytes`).

What the host keeps is bounded: the reader holds at most one frame, and a
command keeps at most `output_limit` bytes of each stream (the first
ones); the rest is counted in `stdout_dropped`/`stderr_dropped`, and
`on_output` sees all of it as it arrives.  A channel that breaks -- the
guest stopped, or the agent sent something the protocol does not allow --
fails every call waiting on it at once, and every call after, with an
error naming the channel and the reason.
"""

import collections
import os
import signal
import socket
import threading
import time
from typing import Callable, Optional

from pylguest.agent import protocol
from pylguest.agent.protocol import ProtocolError

DEFAULT_TIMEOUT = 120.0          # seconds a command may run, unless told otherwise
GRACE = 15.0                     # how much longer than that the host waits for EXIT
OUTPUT_LIMIT = 16 << 20          # bytes of each stream a result keeps
TAIL = 2000                      # characters of each stream in an error message
TRANSCRIPT_LENGTH = 200          # commands a session describes for a failure report
STEP = 0.5                       # seconds between checks while a send waits


class AgentError(Exception):
    """The channel cannot serve the request; the message says why."""


class ChannelClosed(AgentError):
    """The channel is gone: the guest stopped, or the agent broke the protocol."""


class CommandTimeout(AgentError):
    """No EXIT came back in time, even after the guest's own limit."""


class CommandFailed(AgentError):
    """succeed() saw a nonzero status, or fail() a zero one."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def _tail(text, limit=TAIL):
    return text if len(text) <= limit else "..." + text[-limit:]


class CommandResult:
    """How a command ended, and what it wrote."""

    def __init__(self, argv, how, value, stdout, stderr, dropped, duration):
        self.argv = argv
        self.timed_out = how == protocol.TIMED_OUT
        self.signal = value if how != protocol.EXITED else None
        # As a shell reports it: the exit status, or 128 + the signal.
        self.status = value if how == protocol.EXITED else 128 + value
        self.stdout_bytes, self.stderr_bytes = bytes(stdout), bytes(stderr)
        self.stdout_dropped, self.stderr_dropped = dropped
        self.duration = duration

    stdout = property(lambda self: self.stdout_bytes.decode("utf-8", "replace"))
    stderr = property(lambda self: self.stderr_bytes.decode("utf-8", "replace"))

    @property
    def ok(self):
        return self.status == 0

    def how(self):
        if self.timed_out:
            return f"timed out and killed (signal {self.signal})"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit status {self.status}"

    def describe(self):
        """Several lines: the command, how it ended, the tails of its output."""
        lines = [f"$ {render_argv(self.argv)}",
                 f"  {self.how()} after {self.duration:.2f} s"]
        for name, text, dropped in (("stdout", self.stdout, self.stdout_dropped),
                                    ("stderr", self.stderr, self.stderr_dropped)):
            more = f" ({dropped} more bytes not kept)" if dropped else ""
            body = _tail(text).rstrip("\n")
            lines.append(f"  {name}{more}:" + ("" if body else " (empty)"))
            lines += [f"    {line}" for line in body.splitlines()] if body else []
        return "\n".join(lines)

    def __repr__(self):
        return f"<CommandResult {render_argv(self.argv)!r}: {self.how()}>"


def render_argv(argv):
    """argv as one readable line (shell-quoted where it needs it)."""
    import shlex
    return " ".join(shlex.quote(a.decode("utf-8", "backslashreplace")) for a in argv)


def as_bytes(value):
    return value if isinstance(value, bytes) else os.fsencode(value)


def command_argv(cmd):
    """A str is a shell command line; a list is argv, each str or bytes."""
    if isinstance(cmd, (str, bytes)):
        return [b"/bin/sh", b"-c", as_bytes(cmd)]
    argv = [as_bytes(a) for a in cmd]
    if not argv:
        raise ValueError("an empty argv")
    return argv


class _Request:
    """One open request: what its frames may be, and what they brought."""

    def __init__(self, kind, id_):
        self.kind, self.id = kind, id_
        self.unacked = 0              # STDIN/DATA bytes sent, not yet ACKed
        self.done = False
        self.error = None             # an AgentError, once the request failed
        self.exit = None              # (how, value), for an EXEC
        self.streams = (bytearray(), bytearray())
        self.dropped = [0, 0]
        self.limit = OUTPUT_LIMIT
        self.on_output = None
        self.stat = None              # (mode, size), for a GET
        self.sink = None              # a GET's file, written by the reader


class Session:
    def __init__(self, sock: socket.socket, *, name="agent channel",
                 why_closed: Optional[Callable[[], str]] = None):
        self.name = name
        self.socket = sock
        self.socket.settimeout(STEP)
        self.why_closed = why_closed or (lambda: "the other end closed it")
        self.hello = None
        self.closed = None            # a ChannelClosed, once the channel is gone
        self.transcript = collections.deque(maxlen=TRANSCRIPT_LENGTH)
        self._requests = {}
        self._next_id = 1
        self._changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"pylguest {name} reader")
        self._reader.start()

    # -- the reader ---------------------------------------------------------------

    def _read(self):
        frames = protocol.FrameReader()
        while self.closed is None:
            try:
                data = self.socket.recv(1 << 16)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""           # the launcher exited with our bytes unread: as gone
            except OSError as e:
                return self._close(f"reading it failed: {e}")
            if not data:
                if self.closed is not None:
                    return               # close() shut it: nothing to ask the launcher
                return self._close(self.why_closed())
            try:
                for frame in frames.feed(data):
                    self._dispatch(frame)
            except ProtocolError as e:
                return self._close(f"the guest's agent broke the protocol: {e}")

    def _dispatch(self, frame):
        if frame.type == protocol.HELLO:
            if frame.id:
                raise ProtocolError(f"HELLO with id {frame.id}, not 0")
            hello = protocol.parse_hello(frame)
            with self._changed:
                if self.hello is not None:
                    self._restarted()
                self.hello = hello
                self._changed.notify_all()
            return
        if self.hello is None:
            raise ProtocolError(f"{frame.name} before HELLO")
        with self._changed:
            request = self._requests.get(frame.id)
            if request is None:
                raise ProtocolError(f"{frame.name} for request {frame.id}, which is not open")
            self._apply(request, frame)
            self._changed.notify_all()

    def _apply(self, request, frame):
        """One frame for an open request; called with the lock held."""
        kind, type_ = request.kind, frame.type
        if type_ == protocol.ERROR:
            errno_, message = protocol.parse_error(frame)
            request.error = AgentError(f"{self.name}: {kind} failed in the guest: {message} "
                                       f"({os.strerror(errno_) if errno_ > 0 else errno_})")
            return self._finish(request)
        if type_ == protocol.ACK:
            count = protocol.parse_ack(frame)
            if count > request.unacked:
                raise ProtocolError(f"ACK of {count} bytes for request {request.id}, "
                                    f"which has {request.unacked} unacknowledged")
            request.unacked -= count
        elif kind == "exec" and type_ in (protocol.STDOUT, protocol.STDERR):
            self._output(request, type_ == protocol.STDERR, frame.payload)
        elif kind == "exec" and type_ == protocol.EXIT:
            request.exit = protocol.parse_exit(frame)
            self._finish(request)
        elif kind in ("put", "clock") and type_ == protocol.DONE and not frame.payload:
            self._finish(request)
        elif kind == "get" and type_ == protocol.STAT and request.stat is None:
            request.stat = protocol.parse_stat(frame)
        elif kind == "get" and type_ == protocol.DATA and request.stat is not None:
            if not frame.payload:
                return self._finish(request)
            try:
                if request.error is None:
                    request.sink.write(frame.payload)
            except OSError as e:
                request.error = AgentError(f"{self.name}: writing the host's copy failed: {e}")
        else:
            raise ProtocolError(f"{frame.name} for request {request.id}, a {kind.upper()}, "
                                "which cannot have one now")

    def _output(self, request, stderr, data):
        kept = request.streams[stderr]
        room = max(0, request.limit - len(kept))
        kept += data[:room]
        request.dropped[stderr] += len(data) - min(room, len(data))
        if request.on_output:
            request.on_output("stderr" if stderr else "stdout", data)

    def _restarted(self):
        """A second HELLO: the agent died and /init started a new one, so
        nothing open will ever be answered.  Called with the lock held."""
        lost = AgentError(f"{self.name}: the guest's agent restarted (was it killed?); "
                          "the request was lost")
        for request in self._requests.values():
            request.error, request.done = lost, True
        self._requests.clear()

    def _finish(self, request):
        request.done = True
        del self._requests[request.id]

    def _close(self, why):
        with self._changed:
            if self.closed is None:
                self.closed = ChannelClosed(f"{self.name}: {why}")
            for request in self._requests.values():
                request.error = request.error or self.closed
                request.done = True
            self._requests.clear()
            self._changed.notify_all()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- requests -------------------------------------------------------------------

    def busy(self):
        """True while a request (a command, a copy) is open."""
        with self._changed:
            return bool(self._requests)

    def wait_ready(self, timeout):
        """Wait for the agent's HELLO; ChannelClosed or AgentError if it
        does not come."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.hello is None:
                if self.closed:
                    raise self.closed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentError(f"{self.name}: the guest's agent did not start within "
                                     f"{timeout:g} s")
                self._changed.wait(min(remaining, STEP))
        return self.hello

    def _open(self, kind):
        with self._changed:
            if self.closed:
                raise self.closed
            if self.hello is None:
                raise AgentError(f"{self.name}: the agent has not said HELLO yet (wait_ready)")
            id_ = self._next_id
            self._next_id = self._next_id % 0xFFFFFFFF + 1
            request = self._requests[id_] = _Request(kind, id_)
            return request

    def _send(self, data, deadline=None):
        """All of `data`, as one frame or several, in order."""
        view = memoryview(data)
        with self._send_lock:
            while view:
                if self.closed:
                    raise self.closed
                if deadline is not None and time.monotonic() > deadline:
                    self._close("a send did not complete in time: the guest stopped reading")
                    raise self.closed
                try:
                    view = view[self.socket.send(view):]
                except socket.timeout:
                    continue
                except OSError as e:
                    self._close(f"writing to it failed: {e}")
                    raise self.closed from None

    def _send_data(self, request, type_, data, deadline):
        """STDIN or DATA frames within the agent's window; False if the
        request ended first (a command that stopped reading its stdin)."""
        window = self.hello.window
        for start in range(0, len(data), protocol.MAX_PAYLOAD):
            piece = data[start:start + protocol.MAX_PAYLOAD]
            with self._changed:
                while request.unacked + len(piece) > window and not request.done:
                    if time.monotonic() > deadline:
                        raise CommandTimeout(f"{self.name}: the guest took no input for too long")
                    self._changed.wait(STEP)
                if request.done:
                    return False
                request.unacked += len(piece)
            self._send(protocol.frame(type_, request.id, piece), deadline)
        return True

    def _wait(self, request, deadline, what):
        with self._changed:
            while not request.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandTimeout(f"{self.name}: no answer to {what} within its time "
                                         "limit and the grace after it")
                self._changed.wait(min(remaining, STEP))
        if request.error:
            raise request.error

    def run(self, cmd, *, timeout=None, input=None, env=None, cwd=None,
            output_limit=OUTPUT_LIMIT, on_output=None) -> CommandResult:
        """Run `cmd` (a shell command line, or argv) in the guest and wait for
        it.  `timeout` (seconds, default 120) is enforced in the guest, which
        kills the command's process group; `input` (str or bytes) is its
        stdin; `env` (a dict) adds to the agent's environment; `cwd` is
        where it runs (default /).  `on_output(stream, data)` sees output
        as it arrives."""
        argv = command_argv(cmd)
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        if not 0 < timeout <= 0xFFFFFFFF / 1000:
            raise ValueError(f"timeout {timeout!r}: give a positive number of seconds")
        entries = [as_bytes(k) + b"=" + as_bytes(v) for k, v in (env or {}).items()]
        started = time.monotonic()
        deadline = started + timeout + GRACE
        request = self._open("exec")
        request.limit, request.on_output = output_limit, on_output
        try:
            self._send(protocol.exec_frame(request.id, argv, env=entries,
                                           cwd=as_bytes(cwd or b""),
                                           timeout_ms=max(1, round(timeout * 1000)),
                                           stdin=input is not None), deadline)
            if input is not None:
                if self._send_data(request, protocol.STDIN, as_bytes(input), deadline):
                    self._send(protocol.frame(protocol.STDIN, request.id), deadline)
            self._wait(request, deadline, render_argv(argv))
        except BaseException:
            self._abandon(request)
            raise
        result = CommandResult(argv, *request.exit, *request.streams, request.dropped,
                               time.monotonic() - started)
        # What a failure report shows, not the result itself: 200 results
        # could hold 200 times output_limit.
        self.transcript.append(result.describe())
        return result

    def _abandon(self, request):
        """A caller gave up on a request (timeout, ^C): kill what it runs."""
        if request.kind == "exec" and not request.done and not self.closed:
            try:
                self._send(protocol.signal_frame(request.id, signal.SIGKILL),
                           time.monotonic() + STEP * 4)
            except AgentError:
                pass

    def put(self, source, guest_path, mode=0o644, *, timeout=DEFAULT_TIMEOUT):
        """Stream the file object `source` (read in binary) to `guest_path`."""
        deadline = time.monotonic() + timeout
        request = self._open("put")
        self._send(protocol.put_frame(request.id, as_bytes(guest_path), mode & 0o7777), deadline)
        while (chunk := source.read(protocol.MAX_PAYLOAD)):
            if not self._send_data(request, protocol.DATA, chunk, deadline):
                break
        else:
            self._send(protocol.frame(protocol.DATA, request.id), deadline)
        self._wait(request, deadline, f"copying to {os.fsdecode(guest_path)}")

    def set_clock(self, when, *, timeout=DEFAULT_TIMEOUT):
        """Set the guest's wall clock to `when` (seconds since the epoch, a
        float: to the nanosecond it carries).  AgentError if this agent is
        older than CLOCK (protocol version 2) or the guest refused."""
        if self.hello is not None and self.hello.version < protocol.CLOCK_SINCE:
            raise AgentError(f"{self.name}: the guest's agent speaks version "
                             f"{self.hello.version}, which has no CLOCK")
        if not 0 <= when < 1 << 62:
            raise ValueError(f"a wall clock of {when!r} seconds")
        # Apart first: as one float of nanoseconds, today's date keeps no
        # nanoseconds (a double holds 15-16 digits).
        seconds = int(when)
        nanoseconds = min(round((when - seconds) * 1e9), 10**9 - 1)
        deadline = time.monotonic() + timeout
        request = self._open("clock")
        self._send(protocol.clock_frame(request.id, seconds, nanoseconds), deadline)
        self._wait(request, deadline, "setting the clock")

    def get(self, guest_path, sink, *, timeout=DEFAULT_TIMEOUT):
        """Stream `guest_path` into the file object `sink`; return its mode."""
        deadline = time.monotonic() + timeout
        request = self._open("get")
        request.sink = sink
        self._send(protocol.get_frame(request.id, as_bytes(guest_path)), deadline)
        self._wait(request, deadline, f"copying from {os.fsdecode(guest_path)}")
        return request.stat[0]

    def close(self):
        self._close("closed by the test")
        self._reader.join(timeout=5)
        self.socket.close()


def socket_pair():
    """(ours, theirs): `theirs` is for the launcher (--agent fd:N), inheritable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return ours, theirs
