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

`--net user` puts the same device on a stream instead (NetDevice.user):
one end of a socket pair whose other end is passt (devices/passt.py),
where each frame travels behind its length, 4 bytes big-endian, without
the virtio_net_hdr.  net.c's stream mode frames and unframes through two
buffers of the device's own, so a frame is never half sent or half taken
whatever the socket accepts; what it will not take yet waits there, and
the receive thread watches for room (POLLOUT) while any does.  passt is
checked like a guest: a frame length of 0 or above MAX_FRAME less the
header is a broken stream, and so are a closed socket and passt's death.
None of them can be undone by the guest (a reset cannot resynchronize a
stream), so the device stays broken for the rest of the run, said in one
line; the machine runs on.
"""

import fcntl
import os
import select
import socket
import struct
import threading
import time

# csrc/pylguest.h's loops; the tap's constants are <linux/if_tun.h>'s (csrc/linux.cdef).
from pylguest._native import ffi, lib
from pylguest.errors import GuestError, Rule, UsageError
from pylguest.hostfiles import oserror_text
from pylguest.virtio.device import DeviceState, RequestAbandoned, VirtioDevice

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
VNET_HDR_SIZE = lib.PYL_VNET_HDR_SIZE  # legacy struct virtio_net_hdr, no MRG_RXBUF
MAX_FRAME = lib.PYL_MAX_FRAME       # the header, then the largest ethernet frame (net.c)
RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 256
DAEMON_GRACE = 2.0                  # s for passt's death line once its socket closed


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

    def __init__(self, name, tap_name, mac, tap_fd=None, *, stream=False):
        """`tap_fd`: an open tap (or, in tests, any fd that keeps frame
        boundaries, such as a SOCK_SEQPACKET socket); opened here if None.
        With `stream`, `tap_fd` is instead a connected SOCK_STREAM socket
        that carries length-prefixed frames (passt's end: see user())."""
        super().__init__(name)
        self.tap_name = tap_name
        self.mac = mac
        self.stream = stream
        self.daemon = None            # passt, for a user device
        self.peer = "passt" if stream else f"tap {tap_name}"
        # Words for the kernel command line: init configures eth0 by
        # DHCP only where the launcher says so (guests/linux/init).
        self.cmdline_words = ("pylguest.net=dhcp",) if stream else ()
        self._lost = None             # why the stream is gone for good, or None
        self._lost_reported = False
        self._closed = False          # the stream ended: stop watching it
        self._watching_out = False    # the receive thread waits for POLLOUT
        self._closed_why = None
        self._daemon_waited = False
        if stream and tap_fd is None:
            raise ValueError("a stream NetDevice needs its socket (NetDevice.user makes one)")
        self.tap = open_tap(tap_name) if tap_fd is None else tap_fd
        # net.c reads the tap until it would block: it must never block.
        os.set_blocking(self.tap, False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._starved = True          # no receive buffers we know of: don't read the tap
        # What net.c is given: the tap, and one bounce buffer for a frame
        # scattered over more than IOV_MAX buffers.
        self._bounce = ffi.new("uint8_t[]", MAX_FRAME)
        self._c = ffi.new("struct pyl_net *")
        self._c.tap, self._c.bounce = self.tap, self._bounce
        self._c.abandon = self.abandon.c              # the device's one flag, for good
        if stream:
            self._tx = ffi.new("uint8_t[]", lib.PYL_STREAM_BUF)
            self._rx = ffi.new("uint8_t[]", lib.PYL_STREAM_BUF)
            self._c.mode = lib.PYL_NET_MODE_STREAM
            self._c.tx, self._c.rx = self._tx, self._rx
        self._outcome = ffi.new("struct pyl_net_outcome *")
        self._rx_thread = threading.Thread(target=self._receive_loop, daemon=True,
                                           name=f"pylguest {name}/tap")

    @classmethod
    def user(cls, name, mac, forwards=(), passt=None):
        """A device on passt (`--net user`): the socket pair made here, passt
        started on one end (a UsageError naming the package if it is not
        installed).  `passt`: its path, if not found on $PATH."""
        from pylguest.devices.passt import find_passt, start_passt
        path = find_passt(passt)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            device = cls(name, "user", mac, tap_fd=ours.detach(), stream=True)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        try:
            device.daemon = start_passt(f"passt for {name}", theirs.fileno(), forwards,
                                        on_exit=device.lose_stream, path=path)
        except BaseException:
            device.close()
            raise
        finally:
            theirs.close()
        return device

    def start(self):
        self._rx_thread.start()

    def attach(self, context):
        super().attach(context)
        self._report_lost()           # passt may have died before we were attached

    def device_features(self):
        return 1 << VIRTIO_NET_F_MAC

    def config_space(self):
        return self.mac

    def activate(self, guest_features, rings):
        if self._lost:
            return                    # broken for good: the stream is gone
        super().activate(guest_features, rings)
        if self.active:
            self._set_starved(False)  # look at the receive ring, and the tap

    def reset(self):
        super().reset()
        self._starved = True
        if self._lost:
            self.state, self.broken = DeviceState.BROKEN, self._lost

    # -- a stream's end: for good -------------------------------------------------

    def lose_stream(self, why):
        """The stream cannot carry frames any more (passt died, closed its
        end, or sent what no frame is): break the device for the rest of
        the run and say so once, in one line.  Daemon.on_exit calls this
        with passt's death line; any thread may."""
        with self.lock:
            if self._lost:
                return
            self._lost = why
            self._closed = True
            self.state, self.broken = DeviceState.BROKEN, why
        self._report_lost()
        self._wake()                  # the receive thread stops watching the socket

    def _report_lost(self):
        with self.lock:
            if not self._lost or self._lost_reported or self.report is None:
                return
            self._lost_reported = True
        self.report(f"{self._lost}: device {self.name} broken for the rest of the run")

    def _stream_closed(self, queue):
        """The socket said EOF or failed.  With passt behind it, passt's own
        death line says it better: the receive thread waits a moment for
        it (_wait_for_daemon); otherwise it is said here."""
        self._closed = True
        errno_ = self._c.read_errno or self._c.write_errno
        why = (f"{oserror_text(OSError(errno_, os.strerror(errno_)))}" if errno_
               else "the other end closed it")
        self._closed_why = f"{queue}: the stream to {self.peer} ended: {why}"
        if self.daemon is None:
            self.lose_stream(self._closed_why)
        else:
            self._wake()

    def _wait_for_daemon(self):
        """Once, in the receive thread, after the stream ended with passt
        behind it: passt's death line if it dies (its on_exit says it),
        ours if it lives on; nothing if the launcher is closing it."""
        if self._daemon_waited:
            return
        self._daemon_waited = True
        daemon = self.daemon
        if daemon is None:
            return                            # _stream_closed said it
        if not daemon.wait_ended(DAEMON_GRACE):
            self.lose_stream(f"{self._closed_why} ({daemon.label} still runs)")
            return
        # Its watcher calls on_exit just after it marks the end.
        deadline = time.monotonic() + DAEMON_GRACE
        while not (self._lost or daemon.closing or self._stop) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not (self._lost or daemon.closing or self._stop):
            self.lose_stream(self._closed_why)

    frames_sent = property(lambda self: self._c.sent)
    frames_dropped = property(lambda self: self._c.dropped)
    frames_received = property(lambda self: self._c.received)

    def process(self, index, vq):
        out = self._outcome
        if index == TRANSMITQ:
            lib.pyl_net_transmit(vq.c, vq.c_chain, self._c, out)
            if self.stream and self._tx_pending() and not self._watching_out:
                self._wake()              # watch for room for the rest
        else:
            lib.pyl_net_receive(vq.c, vq.c_chain, self._c, out)
            if not self.stream:           # on a stream, a failed read ends it (below)
                self._report_read_error()
            # Starved: no buffers until a kick of receiveq.  Otherwise the
            # tap is empty, not the ring (or we do not know it is): watch
            # the tap again; after a kick this is what ends a starvation.
            self._set_starved(out.stop == lib.PYL_NET_STARVED)
        if out.stop == lib.PYL_NET_RING_FAULT:
            raise vq.fault()
        if out.stop == lib.PYL_NET_FRAME_FAULT:
            raise self._frame_error(out)
        if out.stop == lib.PYL_NET_ROOM_FAULT:
            raise self._room_error(out)
        if out.stop == lib.PYL_NET_ABANDONED:
            raise RequestAbandoned(self.name)
        if out.stop == lib.PYL_NET_STREAM_FAULT:
            self.lose_stream(
                f"{self.queue_label(RECEIVEQ)}: {self.peer} sent a frame length of "
                f"{self._c.bad_length} bytes; a frame is 1 to {MAX_FRAME - VNET_HDR_SIZE} "
                "bytes, so the stream cannot be trusted any more")
        elif out.stop == lib.PYL_NET_STREAM_CLOSED:
            self._stream_closed(self.queue_label(index))
        return out.pushed > 0

    def _tx_pending(self):
        return self._c.tx_end != self._c.tx_start

    def _send_pending(self):
        """Room on the socket for what transmit left: send it, and take the
        frames that waited for it."""
        if self.active:
            self.service(TRANSMITQ)
            return
        with self.lock:
            if not self._closed and lib.pyl_net_flush(self._c) < 0:
                self._stream_closed(self.queue_label(TRANSMITQ))

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
            if self.stream:
                self._stream_wait_and_serve()
                continue
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

    def _stream_wait_and_serve(self):
        """One turn of the receive thread on a stream: as for a tap, and
        also room to send (while transmit left bytes unsent), frames that
        wait in our buffer rather than the socket, and the stream's end."""
        with self.lock:               # so that process() knows whether to wake us
            closed = self._closed
            self._watching_out = not closed and self._tx_pending()
            readable = [self._wake_r] if closed or self._starved else [self._wake_r, self.tap]
            writable = [self.tap] if self._watching_out else []
        ready, room, _ = select.select(readable, writable, [])
        woke = self._wake_r in ready
        if woke:
            self._drain_wakeups()
        if self._stop:
            return
        if room:
            self._send_pending()
        buffered = self._c.rx_end != self._c.rx_start
        if self.tap in ready or (woke and buffered and not self._starved and not self._closed):
            self.service(RECEIVEQ)
            if not self.active:
                self._starved = True      # frames wait until a start or reset
        if self._closed and not self._lost:
            self._wait_for_daemon()

    def _drain_wakeups(self):
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def close(self, timeout=5.0):
        """Stop passt and the receive thread; True (and the fds closed) once
        the thread ended."""
        if self.daemon is not None:
            self.daemon.close()           # first: its end is no death to report
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
