"""vhost-user, the front end's side: handing a device's queues to a daemon.

vhost-user (QEMU's docs/interop/vhost-user.rst) lets a separate process,
the back end, serve a virtio device's queues itself.  The front end (us)
tells it, over a unix socket, everything it needs to find the rings in
guest memory and nothing more:

    SET_OWNER                     this connection is the device's owner
    GET_FEATURES, SET_FEATURES    the virtio feature bits (64 of them)
    GET/SET_PROTOCOL_FEATURES     what the socket conversation may use
    SET_MEM_TABLE + memfd         guest memory: each region's guest address,
                                  size, our address for it, and the fd to
                                  map it from (memory.py's memfd)
    SET_VRING_NUM/ADDR/BASE       a queue's size, where its descriptor
                                  table, avail and used rings are (in our
                                  address space), where to start
    SET_VRING_KICK + eventfd      the fd a kick signals: the same ioeventfd
                                  KVM signals when the guest notifies
    SET_VRING_CALL + eventfd      the fd the daemon signals to interrupt
                                  the guest: the same irqfd KVM listens on
    SET_VRING_ENABLE              go
    GET_VRING_BASE                stop, and say where you got to

After that a request goes guest -> ring -> KVM's ioeventfd -> daemon ->
ring -> irqfd -> guest, and never through the launcher.

Every message is a 12-byte header (request, flags, payload size) and its
payload, little-endian, with fds as SCM_RIGHTS on the same sendmsg.  The
daemon's replies are hostile input, as a guest's writes are: a reply must
answer the request we sent, carry the reply flag, have exactly the size
that request's reply has, and carry no fds; a feature bit we never offered
is refused; a daemon that does not answer within `timeout` seconds is an
error, never a hang.  Every failure is a VhostUserError naming the daemon
and the message.
"""

import array
import enum
import os
import socket
import struct
import time

from pylguest.daemon import DaemonError

VERSION = 0x1                     # the protocol version, in every header's flags
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
HEADER = struct.Struct("<III")    # request, flags, payload size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")            # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")         # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("<QQQQ")           # gpa, size, our address, mmap offset
MAX_MEM_REGIONS = 8
VRING_NOFD = 1 << 8               # SET_VRING_KICK/CALL without an fd: polling

# Virtio feature bits that concern the transport, not the device.
VIRTIO_F_VERSION_1 = 32
VHOST_USER_F_PROTOCOL_FEATURES = 30
# Protocol features we use: REPLY_ACK makes every message answer, so a
# refusal is seen at the message that caused it.
PROTOCOL_F_REPLY_ACK = 3
WANTED_PROTOCOL_FEATURES = 1 << PROTOCOL_F_REPLY_ACK


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    SET_VRING_ENABLE = 18


class VhostUserError(DaemonError):
    """The daemon answered wrongly, late, or not at all."""


class Frontend:
    """One vhost-user connection, on a connected unix stream socket.

    The conversation is synchronous: one message, then its reply if it has
    one.  The socket is the launcher's end of a socket pair; the daemon got
    the other.  `label` names the daemon in errors ("virtiofsd for fs0")."""

    def __init__(self, sock, label, timeout=5.0, trace=None):
        self.sock = sock
        self.label = label
        self.timeout = timeout
        self.trace = trace
        self.features = 0                 # what the daemon offered
        self.protocol_features = 0        # what we both use
        sock.setblocking(True)

    # -- the wire ---------------------------------------------------------------

    def _send(self, request, payload=b"", fds=(), need_reply=False):
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        message = HEADER.pack(request, flags, len(payload)) + payload
        if self.trace:
            self.trace(f"vhost-user -> {self.label}: {request.name} "
                       f"({len(payload)} bytes{f', {len(fds)} fds' if fds else ''})")
        self.sock.settimeout(self.timeout)
        try:
            sent = self.sock.sendmsg(
                [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                if fds else [])
            if sent < len(message):               # the fds went with the first byte
                self.sock.sendall(message[sent:])
        except (socket.timeout, BlockingIOError):
            raise self._error(request, "does not read its socket") from None
        except OSError as e:
            raise self._error(request, f"cannot be sent: {e.strerror}") from None

    def _receive_exactly(self, request, size, deadline):
        """`size` bytes of the daemon's reply to `request`; any fds that
        came with them are closed and refused."""
        data = bytearray()
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(request, f"no reply within {self.timeout:g} s")
            self.sock.settimeout(left)
            try:
                chunk, ancillary, _, _ = self.sock.recvmsg(
                    size - len(data), socket.CMSG_SPACE(MAX_MEM_REGIONS * 4))
            except socket.timeout:
                raise self._error(request, f"no reply within {self.timeout:g} s") from None
            except OSError as e:
                raise self._error(request, f"reply cannot be read: {e.strerror}") from None
            if ancillary:
                _close_passed_fds(ancillary)
                raise self._error(request, "reply carries file descriptors")
            if not chunk:
                raise self._error(request, "closed the connection instead of replying")
            data += chunk
        return bytes(data)

    def _reply(self, request, size):
        """The payload of the reply to `request`, which must be `size` bytes."""
        deadline = time.monotonic() + self.timeout
        got_request, flags, got_size = HEADER.unpack(
            self._receive_exactly(request, HEADER.size, deadline))
        if got_request != request:
            raise self._error(request, f"reply is to request {got_request}")
        if flags & 0x3 != VERSION or not flags & FLAG_REPLY:
            raise self._error(request, f"reply has flags 0x{flags:x} (want version 1 "
                                       "and the reply flag)")
        if got_size != size:
            raise self._error(request, f"reply has a {got_size}-byte payload "
                                       f"(this reply has {size})")
        return self._receive_exactly(request, size, deadline)

    def _error(self, request, what):
        return VhostUserError(f"{self.label}: {request.name}: {what}")

    def _get_u64(self, request):
        self._send(request)
        return U64.unpack(self._reply(request, U64.size))[0]

    def _set(self, request, payload=b"", fds=()):
        """A message without a reply of its own; with REPLY_ACK, the daemon's
        ack (zero: done) is checked."""
        ack = bool(self.protocol_features & WANTED_PROTOCOL_FEATURES)
        self._send(request, payload, fds, need_reply=ack)
        if ack:
            status = U64.unpack(self._reply(request, U64.size))[0]
            if status != 0:
                raise self._error(request, f"refused (status {status})")

    # -- the conversation -----------------------------------------------------

    def handshake(self):
        """Own the device and learn what the daemon offers; returns its
        virtio feature bits.  A daemon that cannot speak modern virtio is
        refused: see docs/abi.md section 9 for why we need VERSION_1."""
        self._set(Request.SET_OWNER)
        self.features = self._get_u64(Request.GET_FEATURES)
        if not self.features >> VIRTIO_F_VERSION_1 & 1:
            raise self._error(Request.GET_FEATURES,
                              f"offers 0x{self.features:x}, without VIRTIO_F_VERSION_1")
        if self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            wanted = offered & WANTED_PROTOCOL_FEATURES
            self._send(Request.SET_PROTOCOL_FEATURES, U64.pack(wanted))
            self.protocol_features = wanted
        return self.features

    def set_mem_table(self, memory):
        """Hand over guest memory: every region, mapped from memory.fd."""
        if len(memory.regions) > MAX_MEM_REGIONS:
            raise ValueError(f"{len(memory.regions)} memory regions; vhost-user takes "
                             f"{MAX_MEM_REGIONS}")
        payload = struct.pack("<II", len(memory.regions), 0) + b"".join(
            MEM_REGION.pack(r.gpa, r.size, memory.host_address + r.host_offset, r.host_offset)
            for r in memory.regions)
        self._set(Request.SET_MEM_TABLE, payload, [memory.fd] * len(memory.regions))

    def set_features(self, features):
        """The features the guest accepted, plus the transport's own."""
        unoffered = features & ~self.features
        if unoffered:
            raise ValueError(f"features 0x{unoffered:x} were never offered by {self.label}")
        self._set(Request.SET_FEATURES, U64.pack(features))

    def start_queue(self, index, num, desc, avail, used, kick_fd, call_fd):
        """Give the daemon queue `index`: `num` entries, its three parts at
        these addresses (ours), starting at avail index 0."""
        self._set(Request.SET_VRING_NUM, VRING_STATE.pack(index, num))
        self._set(Request.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        self._set(Request.SET_VRING_BASE, VRING_STATE.pack(index, 0))
        self._set(Request.SET_VRING_KICK, U64.pack(index), [kick_fd])
        self._set(Request.SET_VRING_CALL, U64.pack(index), [call_fd])
        if self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # With protocol features, a ring starts disabled (vhost-user.rst).
            self._set(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))

    def stop_queue(self, index):
        """Stop queue `index`; returns the avail index the daemon reached."""
        self._send(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        got_index, base = VRING_STATE.unpack(self._reply(Request.GET_VRING_BASE,
                                                         VRING_STATE.size))
        if got_index != index:
            raise self._error(Request.GET_VRING_BASE, f"answers for queue {got_index}")
        return base


def _close_passed_fds(ancillary):
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for fd in fds:
                os.close(fd)
