"""The virtio network device (virtio spec 5.1) on a real tap interface.

Needs root and /dev/net/tun; where the tap cannot be created the tests that
need one skip, saying why.  The far end of the tap is an AF_PACKET socket
bound to it for one local-experimental ethertype, so the kernel's own
traffic on the interface (IPv6 router solicitations...) is ignored.  Every
wait is bounded.
"""

import fcntl
import os
import socket
import struct

import pytest

from conftest import wait_until
from virtio_rig import DeviceRig

from pylguest.devices.net import NetDevice, parse_mac
from pylguest.errors import UsageError

RECEIVEQ, TRANSMITQ = 0, 1
PFNS = [0x10, 0x13]
DATA_AREA = (0x20000, 0xF0000)
TAP = "pyltest0"
MAC = bytes.fromhex("525400abcdef")
ETHERTYPE = 0x88B5                     # IEEE local experimental
VNET_HDR = bytes(10)                   # legacy struct virtio_net_hdr, no offloads
WAIT = 5.0
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def frame(payload, dst=b"\xff" * 6, src=bytes.fromhex("020000000001")):
    body = dst + src + struct.pack("!H", ETHERTYPE) + payload
    return body.ljust(60, b"\0")


def interface_up(name):
    disable_v6 = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    if os.path.exists(disable_v6):
        with open(disable_v6, "w") as f:
            f.write("1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))


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
    assert rig.interrupts >= 1


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
