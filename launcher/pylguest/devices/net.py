"""The virtio network device, on a Linux tap interface.

Two queues, named from the guest's side (spec 5.1.2): receiveq (0), where the
guest leaves empty buffers for frames coming to it, and transmitq (1), where
it hands us frames to send.  Every frame on either queue starts with the
10-byte legacy struct virtio_net_hdr.

The tap is opened with IFF_VNET_HDR, which makes the kernel put exactly that
header in front of every frame it gives us and expect it in front of every
frame we give it; so a transmit chain goes to the tap with one writev and a
received frame lands in the guest's buffers with one readv, straight into
guest memory, header included.  Both loops are C (csrc/net.c), called with
the GIL released once per kick or per wakeup; what stays here is the
policy: when to watch the tap, and what a broken rule means.

Receiving needs a thread of its own: frames arrive when the outside world
sends them, not when the guest kicks.  When the guest has no buffers posted
the thread stops reading the tap (the kernel queues, then drops, as a full
NIC would) until a kick of receiveq says buffers are back.  Both the thread
and that kick move frames through the same service path, under the
device's lock, so only one of them reads the tap at a time.

The guest's side of a frame is checked like every other guest value: a
transmit chain must hold at least the virtio_net_hdr and at most
MAX_FRAME bytes (a 65535-byte packet with its ethernet and VLAN headers:
more than any driver that did not negotiate GSO may send), and a receive
chain must have room for the header; otherwise the device is broken until
the guest resets it.  Nothing the guest describes is copied whole: frames
move by writev/readv straight between the tap and guest memory, or, when
a driver scatters one over more than IOV_MAX buffers, through one bounce
buffer of MAX_FRAME bytes.
"""

import fcntl
import os
import select
import struct
import threading

from pylguest import _dataplane
from pylguest._kvm import lib
from pylguest.errors import GuestError, Rule, UsageError
from pylguest.hostfiles import oserror_text
from pylguest.virtio.device import RequestAbandoned, VirtioDevice

dataplane = _dataplane.lib

class NetRule(Rule):
    """The net device's own rules (virtio 5.1.6); the names are the ring
    fuzzer's reference model's (tests/virtio_model.py)."""
    FRAME = "net frame", "5.1.6"      # a sent chain: the header and a frame, MAX_FRAME at most
    ROOM = "net room", "5.1.6"        # a receive buffer holds at least the header


class NetRequestError(GuestError):
    """A frame or receive buffer the device cannot take: the chain obeyed
    every ring rule, but not the net device's.  `rule` is the NetRule."""


VIRTIO_ID_NET = 1
VIRTIO_NET_F_MAC = 5
VNET_HDR_SIZE = 10                  # legacy struct virtio_net_hdr, no MRG_RXBUF
# A frame as the device sees it: the header, then an ethernet frame of up
# to a 65535-byte packet behind a 14-byte header and a 4-byte VLAN tag.
MAX_FRAME = VNET_HDR_SIZE + 14 + 4 + 65535
assert (VNET_HDR_SIZE, MAX_FRAME) == (dataplane.PYL_VNET_HDR_SIZE, dataplane.PYL_MAX_FRAME)
RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 256


def parse_mac(text):
    parts = text.split(":")
    if len(parts) != 6:
        raise UsageError(f"bad MAC address {text!r}: use six hex bytes, 52:54:00:12:34:56")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise UsageError(f"bad MAC address {text!r}: use six hex bytes, 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise UsageError(f"bad MAC address {text!r}: a multicast address cannot be a NIC's")
    return mac


def open_tap(name):
    """Attach to tap interface `name` (creating it if it does not exist)."""
    if not name or len(name.encode()) >= lib.IFNAMSIZ:
        raise UsageError(f"--net tap:{name}: an interface name is 1 to {lib.IFNAMSIZ - 1} bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise UsageError(f"--net tap:{name}: cannot open /dev/net/tun: {oserror_text(e)}") from None
    request = bytearray(lib.PYL_IFREQ_SIZE)
    struct.pack_into(f"{lib.IFNAMSIZ}sH", request, 0, name.encode(),
                     lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, lib.TUNSETIFF, request)
        fcntl.ioctl(fd, lib.TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError as e:
        os.close(fd)
        raise UsageError(f"--net tap:{name}: {oserror_text(e)}") from None
    return fd


class NetDevice(VirtioDevice):
    type = VIRTIO_ID_NET
    queue_names = ("receiveq", "transmitq")
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name, tap_name, mac, tap_fd=None):
        """`tap_fd`: an open tap (or, in tests, any fd that keeps frame
        boundaries, such as a SOCK_SEQPACKET socket); opened here if None."""
        super().__init__(name)
        self.tap_name = tap_name
        self.mac = mac
        self.tap = open_tap(tap_name) if tap_fd is None else tap_fd
        # net.c reads the tap until it would block: it must never block.
        os.set_blocking(self.tap, False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._starved = True          # no receive buffers we know of: don't read the tap
        # What net.c is given: the tap, and one bounce buffer for a frame
        # scattered over more than IOV_MAX buffers.
        self._bounce = _dataplane.ffi.new("uint8_t[]", MAX_FRAME)
        self._c = _dataplane.ffi.new("struct pyl_net *")
        self._c.tap, self._c.bounce = self.tap, self._bounce
        self._c.abandon = self.abandon.c              # the device's one flag, for good
        self._outcome = _dataplane.ffi.new("struct pyl_net_outcome *")
        self._rx_thread = threading.Thread(target=self._receive_loop, daemon=True,
                                           name=f"pylguest {name}/tap")

    def start(self):
        self._rx_thread.start()

    def device_features(self):
        return 1 << VIRTIO_NET_F_MAC

    def config_space(self):
        return self.mac

    def activate(self, guest_features, rings):
        super().activate(guest_features, rings)
        if self.active:
            self._set_starved(False)  # look at the receive ring, and the tap

    def reset(self):
        super().reset()
        self._starved = True

    frames_sent = property(lambda self: self._c.sent)
    frames_dropped = property(lambda self: self._c.dropped)
    frames_received = property(lambda self: self._c.received)

    def process(self, index, vq):
        out = self._outcome
        if index == TRANSMITQ:
            dataplane.pyl_net_transmit(vq.c, vq.c_chain, self._c, out)
        else:
            dataplane.pyl_net_receive(vq.c, vq.c_chain, self._c, out)
            self._report_read_error()
            # Starved: no buffers until a kick of receiveq.  Otherwise the
            # tap is empty, not the ring (or we do not know it is): watch
            # the tap again; after a kick this is what ends a starvation.
            self._set_starved(out.stop == dataplane.PYL_NET_STARVED)
        if out.stop == dataplane.PYL_NET_RING_FAULT:
            raise vq.fault()
        if out.stop == dataplane.PYL_NET_FRAME_FAULT:
            raise self._frame_error(out)
        if out.stop == dataplane.PYL_NET_ROOM_FAULT:
            raise self._room_error(out)
        if out.stop == dataplane.PYL_NET_ABANDONED:
            raise RequestAbandoned(self.name)
        return out.pushed > 0

    def _frame_error(self, out):
        queue = self.queue_label(TRANSMITQ)
        return NetRequestError(
            f"{queue}: the frame from head {out.head} is "
            f"{out.len} bytes; with its {VNET_HDR_SIZE}-byte virtio_net_hdr "
            f"a frame is {VNET_HDR_SIZE} to {MAX_FRAME} (virtio 5.1.6)", out.head,
            rule=NetRule.FRAME, queue=queue)

    def _room_error(self, out):
        queue = self.queue_label(RECEIVEQ)
        return NetRequestError(
            f"{queue}: the buffer from head {out.head} has "
            f"{out.len} writable bytes, less than the {VNET_HDR_SIZE}-byte "
            "virtio_net_hdr every frame starts with (virtio 5.1.6)", out.head,
            rule=NetRule.ROOM, queue=queue)

    def _report_read_error(self):
        # The buffer went back empty; the guest's driver counts it as an
        # rx error, as for a bad frame.  We say why, once per batch.
        if self._c.read_errno:
            err, self._c.read_errno = self._c.read_errno, 0
            self.report(f"{self.name}: reading tap {self.tap_name} failed: "
                        f"{oserror_text(OSError(err, os.strerror(err)))}")

    def _set_starved(self, starved):
        was, self._starved = self._starved, starved
        if was and not starved:
            self._wake()                  # the receive thread watches the tap again

    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass                          # already awake

    def _receive_loop(self):
        while not self._stop:
            watch = [self._wake_r] if self._starved else [self._wake_r, self.tap]
            ready, _, _ = select.select(watch, [], [])
            if self._wake_r in ready:
                self._drain_wakeups()
            if self._stop:
                return
            if self.tap in ready:
                self.service(RECEIVEQ)
                if not self.active:
                    self._starved = True  # frames wait in the tap until a start or reset

    def _drain_wakeups(self):
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def close(self, timeout=5.0):
        """Stop the receive thread; True (and the fds closed) once it ended."""
        self._stop = True
        self._wake()
        if self._rx_thread.is_alive():
            self._rx_thread.join(timeout)
            if self._rx_thread.is_alive():
                return False
        os.close(self.tap)
        os.close(self._wake_r)
        os.close(self._wake_w)
        return True
