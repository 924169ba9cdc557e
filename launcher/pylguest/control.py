"""`--control`: asking a running launcher for a snapshot.

A launcher run with `--control PATH` listens on a unix socket at PATH
(`--control fd:N`: on an inherited, connected socket, as pylguest.Guest
passes one).  Each request is one line of JSON, and so is each answer:

    {"snapshot": "DIR"}   ->  {"ok": true, "snapshot": "DIR", "seconds": 0.41,
                               "memory_bytes": 268480512}
                          or  {"ok": false, "error": "one line"}

`pylguest snapshot PATH DIR` is the command-line client.  Requests are
served one at a time, by a thread of their own; the snapshot itself is
taken on the vCPU's thread (Machine.snapshot), and the guest then runs on.
Whoever can connect can save the guest's memory, so a socket path is
created with mode 0600.
"""

import json
import os
import select
import socket
import stat
import threading
import time

from pylguest.errors import PylguestError, UsageError

MAX_REQUEST = 64 << 10           # bytes in one request line
CLOSE_GRACE = 5.0                # seconds close() gives a request in progress


def parse_control(spec):
    """("fd", N) or ("path", PATH) for --control, checked."""
    kind, _, number = spec.partition(":")
    if kind == "fd":
        if not number.isdigit() or int(number) <= 2:
            raise UsageError(f"bad --control {spec!r}: use fd:N (N > 2) or a socket path")
        try:
            mode = os.fstat(int(number)).st_mode
        except OSError:
            raise UsageError(f"--control {spec}: no such open file descriptor") from None
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"--control {spec}: not a socket")
        return "fd", int(number)
    if not spec:
        raise UsageError("--control needs a socket path or fd:N")
    if os.path.lexists(spec):
        raise UsageError(f"--control {spec}: already exists (another launcher's socket?)")
    return "path", spec


class ControlChannel:
    def __init__(self, spec, machine):
        kind, where = parse_control(spec)
        self.machine = machine
        self.path = None
        if kind == "fd":
            self.socket = socket.socket(fileno=where)
            os.set_inheritable(where, False)
        else:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                self.socket.bind(where)
            except OSError as e:
                self.socket.close()
                raise UsageError(f"--control {where}: {e.strerror}") from None
            finally:
                os.umask(old)
            self.path = where
            self.socket.listen(4)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       name="pylguest control")
        self.thread.start()

    def _serve(self):
        if self.path is None:
            return self._converse(self.socket)
        while True:
            ready, _, _ = select.select([self.socket, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            with connection:
                self._converse(connection)

    def _converse(self, connection):
        """Answer the requests on one connection until it closes."""
        pending = b""
        while True:
            ready, _, _ = select.select([connection, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = connection.recv(MAX_REQUEST)
            except OSError:
                return
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                self._answer(connection, line)
            if len(pending) > MAX_REQUEST:
                self._reply(connection, {"ok": False, "error": "a request longer than "
                                         f"{MAX_REQUEST} bytes"})
                return

    def _answer(self, connection, line):
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not (isinstance(request, dict) and set(request) == {"snapshot"}
                and isinstance(request["snapshot"], str) and request["snapshot"]):
            return self._reply(connection, {"ok": False, "error": 'a request is one line of '
                                            'JSON: {"snapshot": "DIR"}'})
        directory = request["snapshot"]
        started = time.monotonic()
        try:
            saved = self.machine.snapshot(directory)
        except PylguestError as e:
            return self._reply(connection, {"ok": False, "error": str(e)})
        except OSError as e:
            return self._reply(connection, {"ok": False, "error": f"snapshot {directory}: {e}"})
        self._reply(connection, {"ok": True, "snapshot": directory,
                                 "seconds": round(time.monotonic() - started, 3),
                                 "memory_bytes": saved["memory"]["size"]})

    def _reply(self, connection, answer):
        try:
            connection.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass                       # the asker went away: nobody to tell

    def close(self):
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self.thread.join(timeout=CLOSE_GRACE)
        self.socket.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1


def request_snapshot(path, directory, timeout=300.0):
    """The client's side (`pylguest snapshot PATH DIR`): ask the launcher
    listening at `path`; return its answer (a dict)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    client.settimeout(timeout)
    try:
        client.connect(path)
    except OSError as e:
        client.close()
        raise UsageError(f"cannot reach a launcher at {path}: {e.strerror}") from None
    with client:
        return ask(client, directory)


def ask(connection, directory):
    """Send one snapshot request on `connection` and read its answer."""
    answer = b""
    try:
        connection.sendall(json.dumps({"snapshot": os.path.abspath(directory)}).encode()
                           + b"\n")
        while not answer.endswith(b"\n"):
            chunk = connection.recv(MAX_REQUEST)
            if not chunk:
                raise PylguestError("the launcher closed the control channel without an answer")
            answer += chunk
            if len(answer) > MAX_REQUEST:
                raise PylguestError("the launcher's answer is too long")
    except OSError as e:         # a timeout; the launcher gone in the middle (a reset)
        raise PylguestError(f"the control channel: {e.strerror or e}") from None
    try:
        reply = json.loads(answer)
    except ValueError:
        reply = None
    if not (isinstance(reply, dict) and isinstance(reply.get("ok"), bool)):
        raise PylguestError("the launcher's answer is not one it gives")
    return reply
