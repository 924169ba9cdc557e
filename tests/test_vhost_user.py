"""vhost_user.py against a scripted back end that lies.

The daemon's replies are hostile input: each test below plays a back end
that breaks one rule of vhost-user.rst (answers another request, a wrong
size, no reply flag, fds where none belong, a refusal, silence, a closed
socket, features without VERSION_1), and the front end must refuse it
with a VhostUserError naming the daemon and the message, within its
timeout, never hanging and never crashing.  Then one well-behaved
conversation checks what we send, byte for byte, against the spec's
layouts (written here from vhost-user.rst, not from vhost_user.py).
"""

import array
import os
import socket
import struct
import threading

import pytest

from pylguest.memory import GuestMemory, Region
from pylguest.vhost_user import Frontend, Request, VhostUserError

HEADER = struct.Struct("<III")
REPLY = 0x1 | 0x4
GOOD_FEATURES = (1 << 32) | (1 << 30) | (1 << 28) | (1 << 29)


class ScriptedBackend:
    """The daemon's end of the socket: `answer(request, flags, payload, fds)`
    returns the bytes (and fds) to send back, or None for no reply."""

    def __init__(self, answer):
        self.front, self.back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.answer = answer
        self.received = []                 # (request, flags, payload, fd count)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, n):
        data, fds = b"", []
        while len(data) < n:
            try:
                chunk, ancillary, _, _ = self.back.recvmsg(n - len(data), socket.CMSG_SPACE(32))
            except OSError:                   # the front end closed with a reply unread
                return None, fds
            for _, _, cdata in ancillary:
                got = array.array("i")
                got.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                fds += list(got)
            if not chunk:
                return None, fds
            data += chunk
        return data, fds

    def _serve(self):
        while True:
            header, fds = self._read(HEADER.size)
            if header is None:
                return
            request, flags, size = HEADER.unpack(header)
            payload, more = self._read(size) if size else (b"", [])
            fds += more
            self.received.append((request, flags, payload, len(fds)))
            reply = self.answer(request, flags, payload)
            for fd in fds:
                os.close(fd)
            if reply is None:
                continue
            data, send_fds = reply if isinstance(reply, tuple) else (reply, [])
            if data == b"CLOSE":
                self.back.close()
                return
            if send_fds:
                self.back.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", send_fds))])
            else:
                self.back.sendall(data)

    def close(self):
        self.front.close()
        self.thread.join(2)
        try:
            self.back.close()
        except OSError:
            pass


def u64_reply(request, value, flags=REPLY, size=8):
    return HEADER.pack(request, flags, size) + struct.pack("<Q", value)[:size].ljust(size, b"\0")


def honest(request, flags, payload, features=GOOD_FEATURES, protocol=1 << 3):
    """A back end that follows the spec: replies where the spec has them,
    and an ack (0) when asked for one."""
    if request == Request.GET_FEATURES:
        return u64_reply(request, features)
    if request == Request.GET_PROTOCOL_FEATURES:
        return u64_reply(request, protocol)
    if request == Request.GET_VRING_BASE:
        index = struct.unpack_from("<I", payload)[0]
        return HEADER.pack(request, REPLY, 8) + struct.pack("<II", index, 7)
    if flags & 0x8:
        return u64_reply(request, 0)
    return None


def frontend(answer, timeout=0.5):
    backend = ScriptedBackend(answer)
    return Frontend(backend.front, "virtiofsd for fs0", timeout=timeout), backend


def refused(answer, call=lambda f: f.handshake(), timeout=0.5):
    front, backend = frontend(answer, timeout)
    try:
        with pytest.raises(VhostUserError) as info:
            call(front)
        return str(info.value)
    finally:
        backend.close()


def lie_to(target, lie):
    """honest(), except `lie(request, flags, payload)` answers `target`."""
    def answer(request, flags, payload):
        if request == target:
            return lie(request, flags, payload)
        return honest(request, flags, payload)
    return answer


# -- one rule broken each --------------------------------------------------------

def test_a_reply_to_another_request_is_refused():
    message = refused(lie_to(Request.GET_FEATURES,
                             lambda r, f, p: u64_reply(Request.GET_PROTOCOL_FEATURES, 0)))
    assert message == ("virtiofsd for fs0: GET_FEATURES: reply is to request "
                       f"{int(Request.GET_PROTOCOL_FEATURES)}")


def test_a_reply_without_the_reply_flag_is_refused():
    message = refused(lie_to(Request.GET_FEATURES,
                             lambda r, f, p: u64_reply(r, GOOD_FEATURES, flags=0x1)))
    assert "GET_FEATURES: reply has flags 0x1" in message


def test_a_reply_of_the_wrong_size_is_refused_before_its_payload_is_read():
    message = refused(lie_to(Request.GET_FEATURES,
                             lambda r, f, p: HEADER.pack(r, REPLY, 0xFFFFFFFF)))
    assert "GET_FEATURES: reply has a 4294967295-byte payload (this reply has 8)" in message


def test_a_reply_carrying_fds_is_refused_and_the_fds_closed():
    r, w = os.pipe()
    try:
        message = refused(lie_to(Request.GET_FEATURES,
                                 lambda req, f, p: (u64_reply(req, GOOD_FEATURES), [w])))
        assert "GET_FEATURES: reply carries file descriptors" in message
    finally:
        os.close(w)
    # Every copy of the write end is closed (ours, the sender's, the one
    # the front end received): the read end sees end of file.
    assert os.read(r, 1) == b""
    os.close(r)


def test_features_without_version_1_are_refused():
    message = refused(lie_to(Request.GET_FEATURES,
                             lambda r, f, p: u64_reply(r, GOOD_FEATURES & ~(1 << 32))))
    assert "GET_FEATURES: offers 0x70000000, without VIRTIO_F_VERSION_1" in message


def test_a_refused_ack_names_the_message():
    def answer(request, flags, payload):
        if request == Request.SET_OWNER:
            return None                       # before REPLY_ACK is agreed
        if request == Request.SET_MEM_TABLE:
            return u64_reply(request, 1)
        return honest(request, flags, payload)
    memory = GuestMemory([Region(0, 1 << 20, 0)])
    try:
        message = refused(answer, lambda f: (f.handshake(), f.set_mem_table(memory)))
    finally:
        memory.close()
    assert message == "virtiofsd for fs0: SET_MEM_TABLE: refused (status 1)"


def test_silence_is_an_error_within_the_timeout_not_a_hang():
    message = refused(lie_to(Request.GET_FEATURES, lambda r, f, p: None), timeout=0.3)
    assert message == "virtiofsd for fs0: GET_FEATURES: no reply within 0.3 s"


def test_a_half_reply_then_silence_is_an_error_too():
    message = refused(lie_to(Request.GET_FEATURES,
                             lambda r, f, p: HEADER.pack(r, REPLY, 8) + b"\1\2"), timeout=0.3)
    assert message == "virtiofsd for fs0: GET_FEATURES: no reply within 0.3 s"


def test_a_closed_socket_is_an_error():
    message = refused(lie_to(Request.GET_FEATURES, lambda r, f, p: b"CLOSE"))
    assert message == "virtiofsd for fs0: GET_FEATURES: closed the connection instead of replying"


def test_a_vring_base_for_another_queue_is_refused():
    def answer(request, flags, payload):
        if request == Request.GET_VRING_BASE:
            return HEADER.pack(request, REPLY, 8) + struct.pack("<II", 5, 0)
        return honest(request, flags, payload)
    message = refused(answer, lambda f: (f.handshake(), f.stop_queue(1)))
    assert message == "virtiofsd for fs0: GET_VRING_BASE: answers for queue 5"


def test_features_the_daemon_never_offered_are_not_sent():
    front, backend = frontend(honest)
    try:
        front.handshake()
        with pytest.raises(ValueError, match="never offered"):
            front.set_features(1 << 5)
    finally:
        backend.close()


# -- what an honest conversation carries -------------------------------------------

def test_the_conversation_matches_the_spec_layouts():
    front, backend = frontend(honest)
    memory = GuestMemory([Region(0, 1 << 20, 0), Region(4 << 30, 1 << 20, 1 << 20)])
    try:
        assert front.handshake() == GOOD_FEATURES
        assert front.protocol_features == 1 << 3          # REPLY_ACK, and nothing else
        front.set_mem_table(memory)
        front.set_features((1 << 32) | (1 << 28))
        front.start_queue(1, 256, 0x1000, 0x2000, 0x3000, kick_fd=memory.fd, call_fd=memory.fd)
        assert front.stop_queue(1) == 7
    finally:
        backend.close()
    sent = {}
    for request, flags, payload, nfds in backend.received:
        sent.setdefault(Request(request), []).append((flags, payload, nfds))
    # SET_OWNER goes before REPLY_ACK is agreed; every set after it asks for an ack.
    assert sent[Request.SET_OWNER] == [(0x1, b"", 0)]
    assert sent[Request.SET_PROTOCOL_FEATURES] == [(0x1, struct.pack("<Q", 1 << 3), 0)]
    flags, payload, nfds = sent[Request.SET_MEM_TABLE][0]
    assert flags == 0x1 | 0x8 and nfds == 2
    assert struct.unpack_from("<II", payload) == (2, 0)
    regions = [struct.unpack_from("<QQQQ", payload, 8 + 32 * i) for i in range(2)]
    assert regions == [(0, 1 << 20, memory.host_address, 0),
                       (4 << 30, 1 << 20, memory.host_address + (1 << 20), 1 << 20)]
    assert sent[Request.SET_FEATURES][0][1] == struct.pack("<Q", (1 << 32) | (1 << 28))
    assert sent[Request.SET_VRING_NUM][0][1] == struct.pack("<II", 1, 256)
    # vhost_vring_addr: index, flags, then desc, used, avail, log (in that order).
    assert sent[Request.SET_VRING_ADDR][0][1] == struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x3000,
                                                             0x2000, 0)
    assert sent[Request.SET_VRING_BASE][0][1] == struct.pack("<II", 1, 0)
    assert sent[Request.SET_VRING_KICK][0][1:] == (struct.pack("<Q", 1), 1)
    assert sent[Request.SET_VRING_CALL][0][1:] == (struct.pack("<Q", 1), 1)
    assert sent[Request.SET_VRING_ENABLE][0][1] == struct.pack("<II", 1, 1)
    memory.close()
