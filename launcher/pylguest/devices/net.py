"""The virtio network device, on a Linux tap interface.

Two queues, named from the guest's side (spec 5.1.2): receiveq (0), where the
guest leaves empty buffers for frames coming to it, and transmitq (1), where
it hands us frames to send.  Every frame on either queue starts with the
10-byte legacy struct virtio_net_hdr.

The tap is opened with IFF_VNET_HDR, which makes the kernel put exactly that
header in front of every frame it gives us and expect it in front of every
frame we give it; so a transmit chain goes to the tap with one writev and a
received frame lands in the guest's buffers with one readv, straight into
guest memory, header included.

Receiving needs a thread of its own: frames arrive when the outside world
sends them, not when the guest kicks.  When the guest has no buffers posted
the thread stops reading the tap (the kernel queues, then drops, as a full
NIC would) until a kick of receiveq says buffers are back.
"""

import fcntl
import os
import select
import struct
import threading

from pylguest._kvm import lib
from pylguest.errors import UsageError
from pylguest.virtio.device import VirtioDevice
from pylguest.virtio.queue import VirtqueueError

VIRTIO_ID_NET = 1
VIRTIO_NET_F_MAC = 5
VNET_HDR_SIZE = 10                  # legacy struct virtio_net_hdr, no MRG_RXBUF
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
        raise UsageError(f"--net tap:{name}: cannot open /dev/net/tun: {e.strerror}") from None
    request = bytearray(lib.PYL_IFREQ_SIZE)
    struct.pack_into(f"{lib.IFNAMSIZ}sH", request, 0, name.encode(),
                     lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, lib.TUNSETIFF, request)
        fcntl.ioctl(fd, lib.TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError as e:
        os.close(fd)
        raise UsageError(f"--net tap:{name}: {e.strerror}") from None
    return fd


class NetDevice(VirtioDevice):
    type = VIRTIO_ID_NET
    queue_names = ("receiveq", "transmitq")
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name, tap_name, mac):
        super().__init__(name)
        self.tap_name = tap_name
        self.mac = mac
        self.tap = open_tap(tap_name)
        self.frames_sent = self.frames_received = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._rx_thread = threading.Thread(target=self._receive_loop, daemon=True,
                                           name=f"pylguest {name}/tap")
        self._rx_thread.start()

    def device_features(self):
        return 1 << VIRTIO_NET_F_MAC

    def config_space(self):
        return self.mac

    # -- transmit: the guest kicked transmitq ------------------------------------

    def process(self, index, vq):
        if index == TRANSMITQ:
            return self._transmit(vq)
        self._wake()                      # receiveq kicked: buffers are back
        return False

    def _transmit(self, vq):
        pushed = False
        while (chain := vq.pop_with_notify()) is not None:
            views = [self.memory.view(b.gpa, b.length) for b in chain.readable]
            try:
                os.writev(self.tap, views)
                self.frames_sent += 1
            except OSError:
                pass                      # like a NIC whose link is down: dropped
            vq.push(chain, 0)
            pushed = True
        return pushed

    # -- receive: the tap has a frame ---------------------------------------------

    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass                          # already awake

    def _receive_loop(self):
        starved = False               # the guest has no receive buffers posted
        while not self._stop:
            watch = [self._wake_r] if starved else [self._wake_r, self.tap]
            ready, _, _ = select.select(watch, [], [])
            if self._wake_r in ready:
                self._drain_wakeups()
            if self._stop:
                return
            starved = not self._receive_frames()

    def _drain_wakeups(self):
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def _tap_has_frame(self):
        return bool(select.select([self.tap], [], [], 0)[0])

    def _receive_frames(self):
        """Move frames from the tap into posted buffers.  Returns False when
        the guest ran out of buffers (stop reading the tap until a kick)."""
        with self.lock:
            if not self.queues or self.broken:
                return False
            vq = self.queues[RECEIVEQ]
            pushed, have_buffers = False, True
            try:
                # Only this thread reads the tap, so a frame seen here is
                # still there when we read it: no chain is popped in vain.
                while self._tap_has_frame():
                    chain = vq.pop_with_notify()
                    if chain is None:
                        have_buffers = False
                        break
                    views = [self.memory.view(b.gpa, b.length) for b in chain.writable]
                    try:
                        received = os.readv(self.tap, views)
                    except OSError as e:
                        # The buffer goes back empty; the guest's driver
                        # counts it as an rx error, as for a bad frame.
                        self.report(f"{self.name}: reading tap {self.tap_name} failed: {e.strerror}")
                        received = 0
                    vq.push(chain, received)
                    self.frames_received += received > 0
                    pushed = True
            except VirtqueueError as e:
                self.mark_broken(str(e))
                return False
            if pushed and vq.needs_interrupt():
                self.raise_interrupt(RECEIVEQ)
            return have_buffers

    def close(self):
        self._stop = True
        self._wake()
        self._rx_thread.join(timeout=5)
        os.close(self.tap)
        os.close(self._wake_r)
        os.close(self._wake_w)
