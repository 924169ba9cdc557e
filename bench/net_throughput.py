"""Net backend throughput: frames per second through the rings, against
plain reads and writes on the same tap, from Python and from C.

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

The C column (tap rows): the same writes, and the same reads until
EAGAIN, from a C loop (bench/net_baseline.c, built into bench/build/ by
this script and called through ctypes, once per transmit run and once per
receive batch): the system calls' own cost, the floor for the device.

As in block_throughput.py, tests/ring_builder.py's RingBuilder plays the guest
driver and only service() is timed (the device's receive thread is not
started: service() is what it would call); injecting frames and filling
the rings are not counted on either side.  The frames use an IEEE local
experimental ethertype and a destination that is nobody's, so the host's
stack drops what the tap gives it at once.

User mode (`--net user`, passt): the same device in stream mode, on one
end of a SOCK_STREAM socket pair whose other end plays passt (every frame
behind its 4-byte length, no virtio_net_hdr).  A thread reads and throws
away what transmit sends, as passt would; receive's frames are written to
the socket, framed, a batch at a time, before the timed service().
Plain: os.write of each framed frame to the same socket, and os.readv
of the same batch until EAGAIN.  The last column of those rows compares
their ring with the tap's ring (target: 0.50 or more).  passt itself is
not measured: its own TCP stack and the guest's are the rest of the path.

Needs root and /dev/net/tun; where either is missing it says why and
exits 0 (the user-mode rows need neither, and are printed all the same).

    python bench/net_throughput.py [--frames 65536] [--sizes 64,1514]
"""

import argparse
import ctypes
import os
import select
import subprocess
import socket
import struct
import sys
import time

# The tests' mock guest driver (tests/ring_builder.py) plays the guest here.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

BENCH = os.path.dirname(os.path.abspath(__file__))
C_BASELINE = os.path.join(BENCH, "build", "net_baseline.so")

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

    def __init__(self, tap, stream_fd=None):
        from pylguest.devices.net import NetDevice
        from pylguest.memory import GuestMemory, Region
        from pylguest.virtio.device import DeviceContext
        from ring_builder import RingBuilder
        self.memory = GuestMemory([Region(0, 8 << 20, 0)])
        if stream_fd is None:
            self.device = NetDevice("net0", tap, MAC)
        else:
            self.device = NetDevice("net0", "user", MAC, tap_fd=stream_fd, stream=True)
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


def c_baseline():
    """bench/net_baseline.c, built and loaded."""
    os.makedirs(os.path.dirname(C_BASELINE), exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", C_BASELINE,
                    os.path.join(BENCH, "net_baseline.c")], check=True)
    lib = ctypes.CDLL(C_BASELINE)
    lib.net_baseline_transmit.restype = ctypes.c_double
    lib.net_baseline_transmit.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t,
                                          ctypes.c_uint64]
    lib.net_baseline_receive.restype = ctypes.c_long
    lib.net_baseline_receive.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def transmit(bench, length, frames):
    """(plain seconds, C seconds, ring seconds) for `frames` frames of `length` bytes."""
    fd = bench.device.tap
    data = VNET_HDR + frame(length)
    start = time.perf_counter()
    for _ in range(frames):
        os.write(fd, data)
    plain = time.perf_counter() - start
    in_c = bench.c.net_baseline_transmit(fd, data, len(data), frames)
    assert in_c >= 0, "the C loop's write failed"
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
    return plain, in_c, ring


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
    """(plain seconds, C seconds, ring seconds, frames each side took) for
    `frames` frames."""
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
    in_c, got_c = 0.0, 0
    c_buffer = ctypes.create_string_buffer(len(buffer))
    for _ in range(batches):
        inject(peer, data, BATCH)
        start = time.perf_counter()
        got = bench.c.net_baseline_receive(fd, c_buffer, len(buffer))
        in_c += time.perf_counter() - start
        assert got >= 0, "the C loop's read failed"
        got_c += got
    drain(fd)
    # drain: anything the ring had no room for (none expected)
    ring, got_ring = ring_receive(bench, batches, length, lambda: inject(peer, data, BATCH),
                                  after=lambda: drain(fd))
    return plain, in_c, ring, got_plain, got_c, got_ring


def ring_receive(bench, batches, length, deliver, after=lambda: None):
    """(seconds, frames) of the device's receive loop over `batches`: the
    ring refilled, deliver() puts a batch where the device reads, one
    service() takes it; every frame must arrive whole."""
    ring, got = 0.0, 0
    rx = bench.rings[RECEIVEQ]
    for _ in range(batches):
        bench.fill(RECEIVEQ, ROOM, write=True)
        deliver()
        before = rx.used_idx
        ring += bench.timed_service(RECEIVEQ)
        taken = (rx.used_idx - before) & 0xFFFF
        for n in range(before, before + taken):
            assert rx.used_elem(n)[1] == len(VNET_HDR) + length, rx.used_elem(n)
        got += taken
        after()
    return ring, got


def framed(data):
    return struct.pack("!I", len(data)) + data


class Sink:
    """passt's reading side: a thread that reads the socket and forgets."""

    def __init__(self, sock):
        import threading
        self.sock, self.bytes, self.stop = sock, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        buffer = bytearray(1 << 20)
        while not self.stop:
            n = self.sock.recv_into(buffer)
            if not n:
                return
            self.bytes += n

    def wait_for(self, total, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.bytes < total and time.monotonic() < deadline:
            time.sleep(0.001)
        assert self.bytes >= total, (self.bytes, total)


def stream_transmit(bench, sink, length, frames):
    """As transmit(), through the stream device to the sink."""
    fd = bench.device.tap
    data = frame(length)
    wire = framed(data)
    start_bytes = sink.bytes
    start = time.perf_counter()
    for _ in range(frames):
        while True:
            try:
                os.write(fd, wire)
                break
            except BlockingIOError:           # the sink is behind: wait, as a writer would
                select.select([], [fd], [])
    plain = time.perf_counter() - start
    sink.wait_for(start_bytes + frames * len(wire))
    for body in bench.body:
        bench.memory.write(body, data)
    for hdr in bench.hdr:
        bench.memory.write(hdr, VNET_HDR)
    before, start_bytes = bench.device.frames_sent, sink.bytes
    ring = 0.0
    for _ in range(frames // BATCH):
        bench.fill(TRANSMITQ, length, write=False)
        ring += bench.timed_service(TRANSMITQ)
    sent = bench.device.frames_sent - before
    assert sent == frames // BATCH * BATCH, sent
    sink.wait_for(start_bytes + sent * len(wire))
    return plain, ring


def stream_receive(bench, peer, length, frames):
    """As receive(), from the peer's end of the stream."""
    fd = bench.device.tap
    data = frame(length)
    batch = framed(data) * BATCH
    buffer = bytearray(len(batch))
    batches = frames // BATCH
    plain, got_plain = 0.0, 0
    for _ in range(batches):
        peer.sendall(batch)
        start = time.perf_counter()
        try:
            while True:
                got_plain += os.readv(fd, [buffer])
        except BlockingIOError:
            pass
        plain += time.perf_counter() - start
    got_plain //= len(framed(data))
    ring, got_ring = ring_receive(bench, batches, length, lambda: peer.sendall(batch))
    return plain, ring, got_plain, got_ring


def user_rows(sizes, frames, repeat):
    """The user-mode rows: (name, plain frames, C frames, ring frames,
    plain s, C s, ring s); no C loop here (0, 0: n/a)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (ours, theirs):           # passt's socket buffers are the kernel's defaults
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    bench = Bench(None, stream_fd=ours.detach())
    rows = []
    try:
        for length in sizes:
            best = [float("inf")] * 4
            counts = None
            for _ in range(repeat):
                sink = Sink(theirs)
                tp, tr = stream_transmit(bench, sink, length, frames)
                sink.stop = True
                os.write(bench.device.tap, framed(frame(60)))   # wake it
                sink.thread.join(5)
                rp, rr, gp, gr = stream_receive(bench, theirs, length, frames)
                best = [min(b, t) for b, t in zip(best, (tp, tr, rp, rr))]
                counts = (gp, gr)
            rows.append((f"user transmit {length} B", frames, 0, frames, best[0], 0, best[1]))
            rows.append((f"user receive {length} B", counts[0], 0, counts[1], best[2], 0,
                         best[3]))
    finally:
        bench.close()
        theirs.close()
    return rows


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
    frames = max(BATCH, args.frames // BATCH * BATCH)
    sizes = [int(s) for s in args.sizes.split(",")]
    tap_rows, tap = [], None
    reason = why_not()
    if reason:
        print(f"net_throughput: tap rows skipped: {reason}")
    else:
        tap_rows, tap = tap_bench(sizes, frames, args.repeat)
    user = user_rows(sizes, frames, args.repeat)
    tap_ring = {name: nr / tr for name, _, _, nr, _, _, tr in tap_rows}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if tap:
        print(f"net device vs plain tap I/O: tap {tap} (IFF_VNET_HDR), {frames} frames per run")
    print("user rows: the device in stream mode (--net user) on a socket pair, "
          "the far end played by this script")
    print(f"load average {load}; {os.cpu_count()} CPUs; host only, no KVM involved")
    print(f"ring: up to {BATCH} chains per service() call (queues of {NUM}); "
          f"only service() timed; best of {args.repeat}")
    print(f"{'':20}{'kfps':>8}{'kfps':>8}{'kfps':>8}{'us/frame':>10}{'us/frame':>10}"
          f"{'ring/':>8}{'ring/':>8}{'user/':>8}")
    print(f"{'':20}{'plain':>8}{'C':>8}{'ring':>8}{'C':>10}{'ring':>10}"
          f"{'plain':>8}{'C':>8}{'tap':>8}")
    for name, np_, nc, nr, tp, tc, tr in tap_rows + user:
        fp, fr = np_ / tp, nr / tr
        fc = nc / tc if tc else None
        twin = tap_ring.get(name.removeprefix("user "))
        versus = f"{fr / twin:8.2f}" if name.startswith("user ") and twin else ""
        c_rate = f"{fc / 1e3:8.0f}" if fc else f"{'n/a':>8}"
        c_us = f"{tc / nc * 1e6:10.2f}" if fc else f"{'':>10}"
        c_ratio = f"{fr / fc:8.2f}" if fc else f"{'':>8}"
        print(f"{name:20}{fp / 1e3:8.0f}{c_rate}{fr / 1e3:8.0f}{c_us}{tr / nr * 1e6:10.2f}"
              f"{fr / fp:8.2f}{c_ratio}{versus}")
    print("frames per run: " + "; ".join(f"{name} {np_}/{nc}/{nr}" for name, np_, nc, nr, *_ in
                                         tap_rows + user) + " (plain/C/ring)")
    print("ring/X: frames per second through the ring over X's (1.00: as fast as X; C for "
          "the tap rows only); "
          "user/tap: the user row's ring over the tap row's ring (target 0.50)")
    if tap:
        gone = not os.path.exists(f"/sys/class/net/{tap}")
        print(f"tap {tap} {'removed' if gone else 'STILL PRESENT'}")
    return 0


def tap_bench(sizes, frames, repeat):
    """The tap rows, and the tap's name; no rows where the tap cannot be made."""
    from pylguest.errors import UsageError
    from ring_builder import interface_up
    tap = f"pylb{os.getpid()}"[:15]
    try:
        bench = Bench(tap)
    except UsageError as e:
        print(f"net_throughput: tap rows skipped: cannot create tap {tap}: {e}")
        return [], None
    peer = None
    try:
        try:
            interface_up(tap)
            # Protocol 0: the socket only sends, it is handed no frames.
            peer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            peer.bind((tap, 0))
        except OSError as e:
            print(f"net_throughput: tap rows skipped: cannot bring up {tap} or open a "
                  f"packet socket: {e}")
            return [], None
        bench.c = c_baseline()
        rows = []
        for length in sizes:
            best = [float("inf")] * 6
            counts = None
            for _ in range(repeat):               # alternate, so load drift hits every side
                tp, tc, tr = transmit(bench, length, frames)
                rp, rc, rr, gp, gc, gr = receive(bench, peer, length, frames)
                best = [min(b, t) for b, t in zip(best, (tp, tc, tr, rp, rc, rr))]
                counts = (gp, gc, gr)
            rows.append((f"transmit {length} B", frames, frames, frames, *best[0:3]))
            rows.append((f"receive {length} B", *counts, *best[3:6]))
    finally:
        if peer is not None:
            peer.close()
        bench.close()
    return rows, tap


if __name__ == "__main__":
    sys.exit(main())
