"""Peak host memory of one hostile request: run as a script, in a process of its own.

    python3 tests/hostile_chains.py console|net-tx|net-rx

A 64 MiB guest, every page touched (so its memory is part of the RSS from
the start), posts one chain of 16 descriptors that each cover all of its
RAM: 1 GiB in one request.  The script serves it through the device's real
path and prints one line, `extra_peak_kib=N served=...`: how much the peak
RSS grew while the request was served.  tests/test_devices_console.py and
test_devices_net.py run it; a separate process, because ru_maxrss is a
high-water mark of the whole process.
"""

import os
import resource
import socket
import sys

from pylguest.hostconsole.output import ConsoleOutput
from pylguest.devices.console import ConsoleDevice
from pylguest.devices.net import NetDevice
from pylguest.memory import GuestMemory, Region
from pylguest.virtio.device import DeviceContext
from pylguest.virtio.queue import VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, vring_size
from ring_builder import RingBuilder, link_table

MEM = 64 << 20
COPIES = 16
PFNS = (0x10, 0x20)               # receiveq, transmitq: both devices have two queues


def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def hostile_chain(memory, pfn, num, writable):
    """One indirect chain: COPIES descriptors, each all of guest memory."""
    memory.view(pfn << 12, vring_size(num))[:] = 0       # a fresh ring in touched memory
    ring = RingBuilder(memory, num, pfn)
    table_gpa, table = ring.indirect_table(COPIES)
    link_table(table, MEM)
    if writable:
        table["flags"] |= 2                       # VRING_DESC_F_WRITE
    ring.set_desc(0, table_gpa, COPIES * 16, VRING_DESC_F_INDIRECT)
    ring.publish(0)
    return ring


def wire(device, memory, reports):
    """Attach and activate as the bus does, with indirect descriptors."""
    device.attach(DeviceContext(memory=memory, interrupt=lambda: None, report=reports.append))
    device.activate(1 << VIRTIO_RING_F_INDIRECT_DESC, list(zip(device.queue_sizes, PFNS)))


def main(what):
    memory = GuestMemory([Region(0, MEM, 0)])
    memory.view(0, MEM)[:] = 0x41
    reports, result = [], ""
    if what == "console":
        sink = os.open(os.devnull, os.O_WRONLY)
        seen = [0]
        output = ConsoleOutput(sink, tee=lambda chunk: seen.__setitem__(0, seen[0] + len(chunk)))
        device = ConsoleDevice("console0", output.write)
        wire(device, memory, reports)
        ring = hostile_chain(memory, PFNS[1], device.queue_sizes[1], writable=False)
        before = peak_kib()
        device.service(1)
        output.close()
        result = f"served={ring.used_idx} output={seen[0]}"
    else:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device = NetDevice("net0", "hostile", bytes(6), tap_fd=ours.detach())
        wire(device, memory, reports)
        index = 1 if what == "net-tx" else 0
        ring = hostile_chain(memory, PFNS[index], device.queue_sizes[index],
                             writable=what == "net-rx")
        if what == "net-rx":
            theirs.send(bytes(10) + b"\xff" * 60000)
        before = peak_kib()
        device.service(index)
        result = f"served={ring.used_idx} broken={device.broken!r}"
    print(f"extra_peak_kib={peak_kib() - before} {result} reports={reports!r}")


if __name__ == "__main__":
    main(sys.argv[1])
