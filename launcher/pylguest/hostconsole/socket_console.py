"""`--console socket:PATH`: the virtio console on a unix socket.

The launcher listens at PATH; one client at a time is the console (connect
with `socat - UNIX-CONNECT:PATH`, or from a test).  What the guest writes
while nobody is connected is dropped, like a serial line with nothing
plugged in; a new client replaces an old one.

The path is the user's, so it is claimed with care.  A socket file left
by a launcher that was killed is stale and is replaced; a live one, or
anything that is not a socket, is never touched.  Which is which is
decided under a lock, PATH.lock (flock, held for the whole run), so two
launchers starting together cannot both decide the path is free; a
socket that a program other than pylguest listens on is found by
connecting to it.
"""

import fcntl
import os
import select
import socket
import stat
import threading

from pylguest.errors import UsageError
from pylguest.hostfiles import file_kind, oserror_text

SEND_TIMEOUT = 1.0                 # seconds a client may keep us waiting


SUN_PATH_MAX = 107                 # sockaddr_un.sun_path: 108 bytes with the NUL
CLAIM_TRIES = 5


def _error(path, text):
    return UsageError(f"--console socket:{path}: {text}")


def _lock_path(path):
    """PATH.lock, flock'ed for as long as we own PATH: returns its fd."""
    lock_path = path + ".lock"
    for _ in range(CLAIM_TRIES):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _error(path, f"cannot create its lock file {lock_path}: {oserror_text(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _error(path, "another pylguest is serving its console there") from None
        # A launcher that was closing may have unlinked the file between
        # our open and our flock: then we hold a lock nobody else can see.
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise _error(path, f"its lock file {lock_path} keeps changing")


def _clear_stale(path):
    """Remove a socket at `path` that nobody listens on; refuse anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise _error(path, f"exists and is a {file_kind(mode)}, not a socket; "
                           "remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)                     # stale: left by a launcher that died
        return
    except OSError:
        pass                                # not ours to judge: let bind() say
    else:
        raise _error(path, "another program is listening on that socket")
    finally:
        probe.close()


class SocketConsole:
    def __init__(self, path):
        self.path = path
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise _error(path, f"the path is {len(os.fsencode(path))} bytes; a unix socket's "
                               f"can be at most {SUN_PATH_MAX}")
        self._lock_fd = _lock_path(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            _clear_stale(path)
            self.listener.bind(path)
        except (OSError, UsageError) as e:
            self.listener.close()
            self._release_lock()
            if isinstance(e, UsageError):
                raise
            raise _error(path, oserror_text(e)) from None
        self.listener.listen(1)
        self.client = None
        self.receive = None               # set to the device's receive(bytes)
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._loop, daemon=True, name="pylguest console socket")

    def start(self, receive):
        self.receive = receive
        self.thread.start()

    def write(self, data):
        with self._lock:
            client = self.client
        if client is None:
            return
        try:
            client.sendall(data)
        except OSError:
            # Only the loop thread closes a client (it may be in select() on
            # it right now); shutting it down makes the loop see EOF and drop it.
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop(self, client):
        with self._lock:
            if self.client is client:
                self.client = None
        client.close()

    def _loop(self):
        while True:
            fds = [self.listener, self._stop_r] + ([self.client] if self.client else [])
            ready, _, _ = select.select(fds, [], [])
            if self._stop_r in ready:
                return
            if self.listener in ready:
                conn, _ = self.listener.accept()
                # A client that stops reading must not stall the guest's
                # transmit queue for long: a send that blocks this long
                # disconnects it.
                conn.settimeout(SEND_TIMEOUT)
                with self._lock:
                    old, self.client = self.client, conn
                if old:
                    old.close()
                continue
            client = self.client
            if client in ready:
                try:
                    data = client.recv(4096)
                except OSError:
                    data = b""             # reset by the peer: as good as gone
                if not data:
                    self._drop(client)
                elif self.receive:
                    self.receive(data)

    def close(self):
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        if self.client:
            self.client.close()
        self.listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self._release_lock()

    def _release_lock(self):
        """Unlink PATH.lock while still holding it, then let it go."""
        if self._lock_fd < 0:
            return
        try:
            os.unlink(self.path + ".lock")
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = -1
