"""`--console socket:PATH`: the virtio console on a unix socket.

The launcher listens at PATH; one client at a time is the console (connect
with `socat - UNIX-CONNECT:PATH`, or from a test).  What the guest writes
while nobody is connected is dropped, like a serial line with nothing
plugged in; a new client replaces an old one.
"""

import os
import select
import socket
import stat
import threading

from pylguest.errors import UsageError

SEND_TIMEOUT = 1.0                 # seconds a client may keep us waiting


class SocketConsole:
    def __init__(self, path):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)        # a stale socket from an earlier run
            except FileNotFoundError:
                pass
            self.listener.bind(path)       # anything else there: EADDRINUSE
        except OSError as e:
            self.listener.close()
            raise UsageError(f"--console socket:{path}: {e.strerror}") from None
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
