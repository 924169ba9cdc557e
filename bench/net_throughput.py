"""Net backend throughput: frames per second through the rings, against
plain reads and writes on the same tap.

A tap interface of our own (pylb<pid>, gone when its fd closes) is opened
by a NetDevice, exactly as the launcher opens one (IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR, so every frame carries the 10-byte virtio_net_hdr), and
brought up with IPv6 off, so the kernel sends nothing of its own on it.

Transmit: the guest's frames (virtio_net_hdr and ethernet frame, two
descriptors, as a legacy Linux driver sends them) go through transmitq:
the device pops each chain and writev()s it to the tap.  Plain: os.write
of the same bytes (header and frame) to the same tap fd.

Receive: the host side injects frames into the tap through an AF_PACKET
socket bound to the interface (the kernel transmits them on the tap, and
they wait on its fd), a batch at a time; the device then takes them into
posted receive buffers (virtio_net_hdr, then room for 1514 bytes: two
descriptors) in one service() of receiveq.  Plain: os.readv of the same
batch from the same tap fd into one buffer, until EAGAIN.

As in block_throughput.py, virtio.testing.RingBuilder plays the guest
driver and only service() is timed (the device's receive thread is not
started: service() is what it would call); injecting frames and filling
the rings are not counted on either side.  The frames use an IEEE local
experimental ethertype and a destination that is nobody's, so the host's
stack drops what the tap gives it at once.

Needs root and /dev/net/tun; where either is missing it says why and
exits 0.

    python bench/net_throughput.py [--frames 65536] [--sizes 64,1514]
"""

import argparse
import os
import socket
import struct
import sys
import time

NUM = 256                          # the net device's queue size
BATCH = NUM // 2                   # chains per service(): 2 descriptors each
PFNS = (0x10, 0x20)                # receiveq, transmitq; buffers from 1 MiB up
DATA_BASE = 0x100000
RECEIVEQ, TRANSMITQ = 0, 1
MAC = bytes.fromhex("525400abcdef")
ETHERTYPE = 0x88B5
VNET_HDR = bytes(10)               # legacy virtio_net_hdr, no offloads
ROOM = 1514                        # a receive buffer's frame part: 1500 MTU + ethernet


def frame(length):
    """An ethernet frame of `length` bytes to a unicast address nobody has."""
    head = bytes.fromhex("02000000beef") + bytes.fromhex("020000000001") \
        + struct.pack("!H", ETHERTYPE)
    return (head + bytes(i & 0xFF for i in range(length - len(head))))[:length]


class Bench:
    """One NetDevice on a fresh tap, its two rings played by RingBuilders."""

    def __init__(self, tap):
        from pylguest.devices.net import NetDevice
        from pylguest.memory import GuestMemory, Region
        from pylguest.virtio.device import DeviceContext
        from pylguest.virtio.testing import RingBuilder
        self.memory = GuestMemory([Region(0, 8 << 20, 0)])
        self.device = NetDevice("net0", tap, MAC)
        self.reports = []
        self.device.attach(DeviceContext(memory=self.memory, interrupt=lambda: None,
                                         report=self.reports.append))
        self.rings = [RingBuilder(self.memory, NUM, pfn) for pfn in PFNS]
        self.device.activate(0, [(NUM, pfn) for pfn in PFNS])
        self.next = DATA_BASE
        self.hdr = [self.alloc(len(VNET_HDR)) for _ in range(BATCH)]
        self.body = [self.alloc(ROOM) for _ in range(BATCH)]

    def alloc(self, size):
        gpa = self.next
        self.next = (gpa + size + 63) & ~63
        return gpa

    def fill(self, index, length, write):
        """Post BATCH chains (header, frame or room) on queue `index`."""
        ring = self.rings[index]
        ring.next_free = 0
        for hdr, body in zip(self.hdr, self.body):
            ring.add_chain([(hdr, len(VNET_HDR), write), (body, length, write)])

    def timed_service(self, index):
        start = time.perf_counter()
        self.device.service(index)
        elapsed = time.perf_counter() - start
        assert not self.device.broken, self.device.broken
        return elapsed

    def close(self):
        self.device.close()
        self.memory.close()


def transmit(bench, length, frames):
    """(plain seconds, ring seconds) for `frames` frames of `length` bytes."""
    fd = bench.device.tap
    data = VNET_HDR + frame(length)
    start = time.perf_counter()
    for _ in range(frames):
        os.write(fd, data)
    plain = time.perf_counter() - start
    for body in bench.body:
        bench.memory.write(body, data[len(VNET_HDR):])
    for hdr in bench.hdr:
        bench.memory.write(hdr, VNET_HDR)
    before = bench.device.frames_sent
    ring = 0.0
    for _ in range(frames // BATCH):
        bench.fill(TRANSMITQ, length, write=False)
        ring += bench.timed_service(TRANSMITQ)
    sent = bench.device.frames_sent - before
    assert sent == frames // BATCH * BATCH and not bench.device.frames_dropped, \
        (sent, bench.device.frames_dropped)
    return plain, ring


def inject(peer, data, count):
    for _ in range(count):
        peer.send(data)


def drain(fd):
    """Read and forget whatever waits on the tap (untimed)."""
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass


def receive(bench, peer, length, frames):
    """(plain seconds, ring seconds, frames each side took) for `frames` frames."""
    fd = bench.device.tap
    data = frame(length)
    buffer = bytearray(len(VNET_HDR) + ROOM)
    batches = frames // BATCH
    drain(fd)
    plain, got_plain = 0.0, 0
    for _ in range(batches):
        inject(peer, data, BATCH)
        start = time.perf_counter()
        try:
            while True:
                os.readv(fd, [buffer])
                got_plain += 1
        except BlockingIOError:
            pass
        plain += time.perf_counter() - start
    drain(fd)
    ring, got_ring = 0.0, 0
    rx = bench.rings[RECEIVEQ]
    for _ in range(batches):
        bench.fill(RECEIVEQ, ROOM, write=True)
        inject(peer, data, BATCH)
        before = rx.used_idx
        ring += bench.timed_service(RECEIVEQ)
        taken = (rx.used_idx - before) & 0xFFFF
        for n in range(before, before + taken):
            assert rx.used_elem(n)[1] == len(VNET_HDR) + length, rx.used_elem(n)
        got_ring += taken
        drain(fd)                 # anything the ring had no room for (none expected)
    return plain, ring, got_plain, got_ring


def why_not():
    if os.geteuid() != 0:
        return "not root: a tap interface needs CAP_NET_ADMIN"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun here"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=65536,
                        help=f"frames per run and direction (a multiple of {BATCH})")
    parser.add_argument("--sizes", default="64,1514",
                        help="ethernet frame lengths in bytes, without the FCS (60 to 1514)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the best counts")
    args = parser.parse_args()
    reason = why_not()
    if reason:
        print(f"net_throughput: skipped: {reason}")
        return 0
    from pylguest.errors import UsageError
    from pylguest.virtio.testing import interface_up
    tap = f"pylb{os.getpid()}"[:15]
    frames = max(BATCH, args.frames // BATCH * BATCH)
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        bench = Bench(tap)
    except UsageError as e:
        print(f"net_throughput: skipped: cannot create tap {tap}: {e}")
        return 0
    peer = None
    try:
        try:
            interface_up(tap)
            # Protocol 0: the socket only sends, it is handed no frames.
            peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            peer.bind((tap, 0))
        except OSError as e:
            print(f"net_throughput: skipped: cannot bring up {tap} or open a packet socket: {e}")
            return 0
        rows = []
        for length in sizes:
            best = [float("inf")] * 4
            counts = None
            for _ in range(args.repeat):          # alternate, so load drift hits both
                tp, tr = transmit(bench, length, frames)
                rp, rr, gp, gr = receive(bench, peer, length, frames)
                best = [min(b, t) for b, t in zip(best, (tp, tr, rp, rr))]
                counts = (gp, gr)
            rows.append((f"transmit {length} B", frames, frames, best[0], best[1]))
            rows.append((f"receive {length} B", *counts, best[2], best[3]))
    finally:
        if peer is not None:
            peer.close()
        bench.close()
    gone = not os.path.exists(f"/sys/class/net/{tap}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"net device vs plain tap I/O: tap {tap} (IFF_VNET_HDR), {frames} frames per run")
    print(f"load average {load}; {os.cpu_count()} CPUs; host only, no KVM involved")
    print(f"ring: up to {BATCH} chains per service() call (queues of {NUM}); "
          f"only service() timed; best of {args.repeat}")
    print(f"{'':20}{'frames':>16}{'kfps':>9}{'kfps':>9}{'us/frame':>10}{'us/frame':>10}"
          f"{'ring/':>8}")
    print(f"{'':20}{'plain/ring':>16}{'plain':>9}{'ring':>9}{'plain':>10}{'ring':>10}"
          f"{'plain':>8}")
    for name, np_, nr, tp, tr in rows:
        fp, fr = np_ / tp, nr / tr
        print(f"{name:20}{f'{np_}/{nr}':>16}{fp / 1e3:9.0f}{fr / 1e3:9.0f}"
              f"{tp / np_ * 1e6:10.2f}{tr / nr * 1e6:10.2f}{fr / fp:8.2f}")
    print("ring/plain: frames per second through the ring over plain (1.00: no overhead)")
    print(f"tap {tap} {'removed' if gone else 'STILL PRESENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
