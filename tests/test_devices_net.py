"""The virtio network device (virtio spec 5.1) on a real tap interface.

Needs root and /dev/net/tun; where the tap cannot be created the tests that
need one skip, saying why.  The far end of the tap is an AF_PACKET socket
bound to it for one local-experimental ethertype, so the kernel's own
traffic on the interface (IPv6 router solicitations...) is ignored.  Every
wait is bounded.
"""

import os
import select
import socket
import struct
import time

import pytest

from conftest import recv_exactly, wait_until
from virtio_rig import DeviceRig

from pylguest.devices import net
from pylguest.devices.net import NetDevice, parse_mac
from pylguest.errors import UsageError
from ring_builder import interface_up

RECEIVEQ, TRANSMITQ = 0, 1
PFNS = [0x10, 0x13]
DATA_AREA = (0x20000, 0xF0000)
TAP = "pyltest0"
MAC = bytes.fromhex("525400abcdef")
ETHERTYPE = 0x88B5                     # IEEE local experimental
VNET_HDR = bytes(10)                   # legacy struct virtio_net_hdr, no offloads
WAIT = 5.0


def frame(payload, dst=b"\xff" * 6, src=bytes.fromhex("020000000001")):
    body = dst + src + struct.pack("!H", ETHERTYPE) + payload
    return body.ljust(60, b"\0")


@pytest.fixture
def rig(memory):
    try:
        device = NetDevice("net0", TAP, MAC)
    except UsageError as e:
        pytest.skip(f"cannot create tap {TAP} here: {e}")
    rig = DeviceRig(device, memory, PFNS, DATA_AREA)
    try:
        interface_up(TAP)
        peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    except OSError as e:
        device.close()
        pytest.skip(f"cannot bring up {TAP} or open a packet socket: {e}")
    peer.bind((TAP, ETHERTYPE))
    peer.settimeout(WAIT)
    rig.peer = peer
    yield rig
    peer.close()
    device.close()


def until(predicate):
    wait_until(predicate, WAIT)


def test_config_and_features_without_a_tap():
    assert parse_mac("52:54:00:ab:cd:ef") == MAC
    with pytest.raises(UsageError, match="1 to 15 bytes"):
        NetDevice("net0", "x" * 16, MAC)
    with pytest.raises(UsageError, match="1 to 15 bytes"):
        NetDevice("net0", "", MAC)


def test_config_space_is_the_mac(rig):
    assert rig.device.config_space() == MAC
    assert rig.device.host_features() >> 5 & 1              # VIRTIO_NET_F_MAC
    assert rig.device.type == 1


def test_transmit_reaches_the_tap(rig):
    rig.activate()
    sent = frame(b"hello from the guest")
    head, _ = rig.chain(TRANSMITQ, [(VNET_HDR, False), (sent[:20], False), (sent[20:], False)])
    rig.device.service(TRANSMITQ)
    assert rig.rings[TRANSMITQ].used_elem(0) == (head, 0)
    assert rig.interrupts == 1
    got = rig.peer.recv(2048)
    assert got[:len(sent)] == sent
    assert rig.device.frames_sent == 1


def test_receive_from_the_tap(rig):
    rig.activate()
    posted = [rig.chain(RECEIVEQ, [(10, True), (1514, True)]) for _ in range(8)]
    rig.device.service(RECEIVEQ)                             # buffers are back
    sent = frame(b"hello from the host")
    rig.peer.send(sent)
    ring = rig.rings[RECEIVEQ]
    until(lambda: any(_ours(rig, posted, n) for n in range(ring.used_idx)))
    until(lambda: rig.interrupts >= 1)          # raised just after the push


def _ours(rig, posted, n):
    """Is the n-th used receive buffer our frame, header and all?"""
    ring = rig.rings[RECEIVEQ]
    head, length = ring.used_elem(n)
    placed = dict(posted)[head]
    data = rig.memory.read(*placed[0]) + rig.memory.read(*placed[1])
    if data[10 + 12:10 + 14] != struct.pack("!H", ETHERTYPE):
        return False                                         # the kernel's traffic
    assert data[:10] == VNET_HDR
    assert data[10:10 + 60] == frame(b"hello from the host")
    assert length == 10 + 60
    return True


def test_frame_waits_for_buffers(rig):
    rig.activate()
    rig.peer.send(frame(b"hello from the host"))            # no buffers posted yet
    posted = [rig.chain(RECEIVEQ, [(10, True), (1514, True)]) for _ in range(8)]
    rig.device.service(RECEIVEQ)                             # the guest's kick
    ring = rig.rings[RECEIVEQ]
    until(lambda: any(_ours(rig, posted, n) for n in range(ring.used_idx)))


def test_broken_transmitq_is_reported(rig):
    rig.activate()
    rig.rings[TRANSMITQ].publish(256)                        # head out of range
    rig.device.service(TRANSMITQ)
    assert rig.device.broken
    assert rig.reports[0].startswith("net0/transmitq: ")


# --- Hostile chains: bounded frames, bounded host memory.

def test_a_1_gib_transmit_chain_breaks_the_device_and_costs_nothing():
    from test_devices_console import run_hostile_chain
    extra_kib, rest = run_hostile_chain("net-tx")
    print(f"net: 1 GiB transmit chain, extra peak RSS {extra_kib} KiB")
    assert rest.startswith("served=0 broken='net0/transmitq: the frame from head 0 is "
                           "1073741824 bytes")
    assert extra_kib < 64 * 1024


def test_a_1_gib_receive_chain_takes_one_frame_and_costs_nothing():
    from test_devices_console import run_hostile_chain
    extra_kib, rest = run_hostile_chain("net-rx")
    print(f"net: 1 GiB receive chain, extra peak RSS {extra_kib} KiB")
    assert rest == "served=1 broken=None reports=[]"
    assert extra_kib < 64 * 1024


# --- The frame rules, on a socket pair standing in for the tap (no root).

@pytest.fixture
def pair(memory):
    """A NetDevice whose 'tap' is one end of a SOCK_SEQPACKET pair (frame
    boundaries kept, as a tap keeps them); the test holds the other end.
    No receive thread: the test drives receiveq as a kick would."""
    yield from rig_on_socketpair(memory, socket.SOCK_SEQPACKET, "pair")


def rig_on_socketpair(memory, kind, name, **device_options):
    """A net device rig on one end of a socket pair of `kind`, the other
    end the test's as rig.peer; closed again after the test."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    theirs.settimeout(WAIT)
    device = NetDevice("net0", name, MAC, tap_fd=ours.detach(), **device_options)
    rig = DeviceRig(device, memory, PFNS, DATA_AREA, start=False)
    rig.activate(indirect=True)
    rig.peer = theirs
    yield rig
    device.close()
    theirs.close()


@pytest.mark.parametrize("length", [0, 9])
def test_a_transmit_frame_shorter_than_the_header_breaks_the_device(pair, length):
    pair.chain(TRANSMITQ, [(bytes(length), False)] if length else [(16, True)])
    pair.device.service(TRANSMITQ)
    assert pair.device.broken.startswith("net0/transmitq: the frame from head 0 is ")
    assert pair.reports and pair.reports[0].startswith("net0/transmitq: ")


def test_a_transmit_frame_longer_than_max_frame_breaks_the_device(pair):
    pair.chain(TRANSMITQ, [(bytes(net.MAX_FRAME - 1), False), (bytes(2), False)])
    pair.device.service(TRANSMITQ)
    assert f"is {net.MAX_FRAME + 1} bytes" in pair.device.broken
    pair.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        pair.peer.recv(65536)                                # nothing was sent


def test_a_frame_of_the_largest_size_is_sent_whole(pair):
    sent = VNET_HDR + bytes(i & 0xFF for i in range(net.MAX_FRAME - 10))
    pair.chain(TRANSMITQ, [(sent, False)])
    pair.device.service(TRANSMITQ)
    assert pair.device.broken is None
    assert pair.peer.recv(2 * net.MAX_FRAME) == sent


def test_a_frame_in_more_buffers_than_iov_max_goes_out_whole(pair):
    # writev takes at most IOV_MAX (1024) buffers: the device gathers such
    # a frame (it is at most MAX_FRAME bytes) instead of dropping it.
    sent = VNET_HDR + bytes(i & 0xFF for i in range(1500))
    pair.indirect_chain(TRANSMITQ, [(sent[i:i + 1], False) for i in range(len(sent))])
    pair.device.service(TRANSMITQ)
    assert pair.device.broken is None, pair.device.broken
    assert pair.peer.recv(4096) == sent


def test_a_receive_buffer_without_room_for_the_header_breaks_the_device(pair):
    pair.peer.send(VNET_HDR + b"frame")
    pair.chain(RECEIVEQ, [(9, True)])
    pair.device.service(RECEIVEQ)
    assert pair.device.broken.startswith("net0/receiveq: the buffer from head 0 has 9 writable")
    assert select.select([pair.device.tap], [], [], 0)[0]    # the frame waits in the "tap"


def test_a_frame_is_cut_to_the_room_posted(pair):
    sent = VNET_HDR + bytes(range(100))
    pair.peer.send(sent)
    head, placed = pair.chain(RECEIVEQ, [(40, True)])
    pair.device.service(RECEIVEQ)
    assert pair.rings[RECEIVEQ].used_elem(0) == (head, 40)
    assert pair.memory.read(*placed[0]) == sent[:40]


def test_a_frame_scattered_over_more_than_iov_max_buffers(pair):
    # readv takes at most IOV_MAX buffers too: the bounce-buffer path.
    sent = VNET_HDR + bytes(i * 3 & 0xFF for i in range(1500))
    pair.peer.send(sent)
    head, placed = pair.indirect_chain(RECEIVEQ, [(1, True)] * 1600)
    pair.device.service(RECEIVEQ)
    assert pair.device.broken is None, pair.device.broken
    assert pair.rings[RECEIVEQ].used_elem(0) == (head, len(sent))
    assert b"".join(pair.memory.read(a, n) for a, n in placed[:len(sent)]) == sent
    assert pair.memory.read(*placed[len(sent)]) == b"\xEE"      # the rest untouched


def test_a_kick_of_receiveq_wakes_a_starved_receive_thread(memory):
    # The receive thread stops watching the tap when the guest has no
    # buffers.  The guest's kick (buffers are back) must make it watch
    # again even when it finds no frame waiting, or the next frame waits
    # in the tap for ever.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = NetDevice("net0", "pair", MAC, tap_fd=ours.detach())
    rig = DeviceRig(device, memory, PFNS, DATA_AREA)          # with its receive thread
    try:
        rig.activate()
        theirs.send(VNET_HDR + b"first")                     # no buffers yet: starved
        until(lambda: device._starved)
        rig.chain(RECEIVEQ, [(64, True)])
        rig.chain(RECEIVEQ, [(64, True)])
        device.service(RECEIVEQ)                             # the kick: "first" goes in
        ring = rig.rings[RECEIVEQ]
        assert ring.used_idx == 1
        theirs.send(VNET_HDR + b"second")                    # only the thread can take it
        until(lambda: ring.used_idx == 2)
        assert ring.used_elem(1)[1] == 10 + len(b"second")
    finally:
        device.close()
        theirs.close()


# --- Stream mode (--net user): length-prefixed frames on a SOCK_STREAM socket,
# as passt speaks them.  The test plays passt on the other end of the pair.

STREAM_FRAME_MAX = net.MAX_FRAME - 10          # a frame on the stream has no header


def framed(payload):
    return struct.pack("!I", len(payload)) + payload


@pytest.fixture
def stream(memory):
    """A stream NetDevice on one end of a SOCK_STREAM pair, the test's
    "passt" on the other; no receive thread (the test kicks)."""
    yield from rig_on_socketpair(memory, socket.SOCK_STREAM, "user", stream=True)


def test_stream_transmit_strips_the_header_and_prefixes_the_length(stream):
    frames = [frame(b"first"), frame(b"second " * 100), frame(b"third")]
    heads = [stream.chain(TRANSMITQ, [(VNET_HDR[:4], False), (VNET_HDR[4:] + f[:7], False),
                                      (f[7:], False)])[0] for f in frames]
    stream.device.service(TRANSMITQ)
    assert stream.device.broken is None, stream.device.broken
    expected = b"".join(framed(f) for f in frames)
    assert recv_exactly(stream.peer, len(expected)) == expected
    assert [stream.rings[TRANSMITQ].used_elem(i) for i in range(3)] == [(h, 0) for h in heads]
    assert stream.device.frames_sent == 3 and stream.interrupts == 1


def test_stream_transmit_of_a_header_alone_sends_nothing(stream):
    head, _ = stream.chain(TRANSMITQ, [(VNET_HDR, False)])
    stream.device.service(TRANSMITQ)
    assert stream.device.broken is None
    assert stream.rings[TRANSMITQ].used_elem(0) == (head, 0)
    assert stream.device.frames_dropped == 1
    stream.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        stream.peer.recv(16)


def _received(rig, posted, n):
    head, length = rig.rings[RECEIVEQ].used_elem(n)
    data = b"".join(rig.memory.read(*b) for b in dict(posted)[head])
    return data[:length]


def test_stream_receive_reassembles_frames_from_any_pieces(stream):
    frames = [frame(b"one"), frame(b"two " * 300), frame(b"three" * 50), frame(b"four")]
    posted = [stream.chain(RECEIVEQ, [(10, True), (1514, True)]) for _ in range(6)]
    wire = b"".join(framed(f) for f in frames)
    # The first frame and a half, then the length's first two bytes alone...
    cuts = [0, len(framed(frames[0])) + 100, len(framed(frames[0])) + len(framed(frames[1])) + 2,
            len(wire) - 3, len(wire)]
    ring = stream.rings[RECEIVEQ]
    for a, b in zip(cuts, cuts[1:]):
        stream.peer.sendall(wire[a:b])
        stream.device.service(RECEIVEQ)
    assert stream.device.broken is None, stream.device.broken
    assert ring.used_idx == 4
    for n, f in enumerate(frames):
        assert _received(stream, posted, n) == VNET_HDR + f      # a zeroed header, then the frame
    assert stream.device.frames_received == 4


def test_stream_receive_cuts_a_frame_to_the_room_and_keeps_in_step(stream):
    big, small = frame(bytes(range(256)) * 4), frame(b"next")
    stream.peer.sendall(framed(big) + framed(small))
    first, placed = stream.chain(RECEIVEQ, [(40, True)])
    stream.chain(RECEIVEQ, [(100, True)])
    stream.device.service(RECEIVEQ)
    ring = stream.rings[RECEIVEQ]
    assert ring.used_elem(0) == (first, 40)
    assert stream.memory.read(*placed[0]) == VNET_HDR + big[:30]
    assert ring.used_elem(1)[1] == 10 + len(small)


def test_stream_frames_wait_for_buffers(stream):
    stream.peer.sendall(framed(frame(b"early")))
    stream.device.service(RECEIVEQ)                       # no buffers: it waits in our buffer
    assert stream.rings[RECEIVEQ].used_idx == 0
    posted = [stream.chain(RECEIVEQ, [(1524, True)])]
    stream.device.service(RECEIVEQ)                       # the guest's kick
    assert _received(stream, posted, 0) == VNET_HDR + frame(b"early")


def test_stream_largest_frame_both_ways(stream):
    payload = bytes(i * 7 & 0xFF for i in range(STREAM_FRAME_MAX))
    stream.chain(TRANSMITQ, [(VNET_HDR + payload, False)])
    stream.device.service(TRANSMITQ)
    assert recv_exactly(stream.peer, 4 + len(payload)) == framed(payload)
    stream.peer.sendall(framed(payload))
    posted = [stream.chain(RECEIVEQ, [(10 + len(payload), True)])]
    stream.device.service(RECEIVEQ)
    assert stream.device.broken is None, stream.device.broken
    assert _received(stream, posted, 0) == VNET_HDR + payload


def test_stream_partial_writes_never_split_the_stream(stream):
    # A socket that takes a few KiB at a time: transmit keeps the rest of
    # each frame in its buffer, and once that is full the ring waits.
    stream.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    fd = stream.device.tap
    socket.socket(fileno=os.dup(fd)).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [bytes([i]) * 50000 for i in range(12)]
    for f in frames:
        stream.chain(TRANSMITQ, [(VNET_HDR, False), (f, False)])
    stream.device.service(TRANSMITQ)
    ring = stream.rings[TRANSMITQ]
    assert 0 < ring.used_idx < 12                          # the ring waits: tx is full
    expected = b"".join(framed(f) for f in frames)
    got, deadline = b"", time.monotonic() + WAIT
    stream.peer.setblocking(False)
    while len(got) < len(expected) and time.monotonic() < deadline:
        try:
            got += stream.peer.recv(65536)
        except BlockingIOError:
            stream.device.service(TRANSMITQ)               # as the thread does on POLLOUT
    assert got == expected
    assert ring.used_idx == 12 and stream.device.broken is None


@pytest.mark.parametrize("length", [0, 2 ** 31, STREAM_FRAME_MAX + 1, 2 ** 32 - 1])
def test_a_hostile_frame_length_breaks_the_device_for_good(stream, length):
    stream.chain(RECEIVEQ, [(1524, True)])
    stream.peer.sendall(framed(frame(b"fine")) + struct.pack("!I", length) + b"x" * 64)
    stream.device.service(RECEIVEQ)                        # the good frame, then the bad length
    assert stream.rings[RECEIVEQ].used_idx == 1
    assert stream.device.broken.startswith(
        f"net0/receiveq: passt sent a frame length of {length} bytes; a frame is 1 to "
        f"{STREAM_FRAME_MAX} bytes")
    assert len(stream.reports) == 1
    assert stream.reports[0].endswith("device net0 broken for the rest of the run")
    # The launcher's side goes on: kicks are ignored, a reset does not bring it back.
    stream.chain(RECEIVEQ, [(1524, True)])
    stream.device.service(RECEIVEQ)
    stream.device.service(TRANSMITQ)
    stream.device.reset()
    stream.activate()
    assert stream.device.broken and not stream.device.active
    assert len(stream.reports) == 1


def test_a_closed_stream_breaks_the_device_in_one_line(stream):
    stream.chain(RECEIVEQ, [(1524, True)])
    stream.peer.sendall(framed(frame(b"last")))
    stream.peer.shutdown(socket.SHUT_RDWR)
    stream.device.service(RECEIVEQ)
    assert stream.rings[RECEIVEQ].used_idx == 1            # what came before the end is delivered
    assert stream.device.broken == "net0/receiveq: the stream to passt ended: the other end closed it"
    stream.device.service(RECEIVEQ)
    assert len(stream.reports) == 1


def test_the_stream_thread_sends_what_the_socket_took_later(memory):
    # With the receive thread: a frame left half sent goes out when the
    # peer reads, with no kick from the guest.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    device = NetDevice("net0", "user", MAC, tap_fd=ours.detach(), stream=True)
    socket.socket(fileno=os.dup(device.tap)).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rig = DeviceRig(device, memory, PFNS, DATA_AREA)
    try:
        rig.activate()
        payload = bytes(range(256)) * 200
        rig.chain(TRANSMITQ, [(VNET_HDR, False), (payload, False)])
        device.service(TRANSMITQ)
        assert device._tx_pending()
        theirs.settimeout(WAIT)
        assert recv_exactly(theirs, 4 + len(payload)) == framed(payload)
        theirs.sendall(framed(frame(b"back")))                # and receive goes on
        rig.chain(RECEIVEQ, [(1524, True)])
        device.service(RECEIVEQ)
        until(lambda: rig.rings[RECEIVEQ].used_idx == 1)
    finally:
        device.close()
        theirs.close()
