"""The lguest device bus, host side: the device page, kicks, status, interrupts.

The launcher puts the device page just above the guest's RAM (at max_pfn <<
12) and the vrings in the pages after it.  Then it listens:

  * LHCALL_NOTIFY(descriptor address): the guest wrote that device's status
    byte (the seed notifies on every status write).  0 resets the device;
    DRIVER_OK starts it; FAILED is reported, and resets it.
  * LHCALL_NOTIFY(vring address): a kick.  These never reach this file's
    vCPU-side code: each queue has an ioeventfd on the hypercall page that
    matches the 8-byte store of exactly that address, so KVM completes the
    store in the kernel and wakes that queue's worker thread.
  * An interrupt goes back through an irqfd per device: the worker writes
    to an eventfd and KVM raises the device's IRQ line.

So the path of one request is: guest fills its ring, stores the vring's
address to the hypercall page -> KVM matches the ioeventfd -> the worker
thread wakes (virtio/device.py) -> the device pops the chain, does the I/O,
pushes it to the used ring -> irqfd -> the guest's interrupt handler reads
the used ring.  No exit to userspace on the way.
"""

import os
import time
from typing import Callable, Optional, Protocol

from pylguest import layout
from pylguest.lguest import device_page
from pylguest.lguest.device_page import VqConfig
from pylguest.errors import GuestError, Rule, UsageError
from pylguest.memory import PAGE_SIZE, GuestMemory
from pylguest.run.stop import Stop, StopRequest
from pylguest.virtio.device import (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
                                    STATUS_FAILED, DeviceContext, DeviceState, QueueWorker)
from pylguest.virtio.queue import vring_size

# Legacy ISA lines nobody else uses (docs/abi.md section 5): COM1 has 4, the
# PIT 0, the cascade 2, the RTC 8, the FPU 13.
IRQ_POOL = (5, 9, 10, 11, 12, 14, 15, 6, 7)

STATUS_NAMES = ((STATUS_ACKNOWLEDGE, "ACKNOWLEDGE"), (STATUS_DRIVER, "DRIVER"),
                (STATUS_DRIVER_OK, "DRIVER_OK"), (STATUS_FAILED, "FAILED"))


class BusRule(Rule):
    """The transport's own rule a driver can break (virtio 2.2.1: a driver
    accepts only features the device offered)."""
    FEATURES = "unoffered features", "2.2.1"


def status_text(status):
    if status == 0:
        return "0 (reset)"
    names = [name for bit, name in STATUS_NAMES if status & bit]
    return f"0x{status:02x} ({'|'.join(names) or 'unknown bits'})"


class EventfdRouter(Protocol):
    """What the bus needs of the VM (kvm/vm.py's Vm): eventfds that KVM
    turns into interrupts, and guest stores that KVM turns into eventfd
    signals."""

    def irqfd(self, eventfd: int, gsi: int) -> None: ...

    def ioeventfd(self, eventfd: int, addr: int, length: int,
                  datamatch: Optional[int] = None) -> None: ...


class NotifyTargets(Protocol):
    """What the bus needs of the hypercall page (hypercall.py): where an
    LHCALL_NOTIFY of an address goes."""

    def register_notify(self, addr: int, name: str,
                        target: Callable[[int], Optional[Stop]]) -> None: ...

    def register_kick(self, addr: int, name: str) -> None: ...


def ring_pages(num):
    return -(-vring_size(num) // PAGE_SIZE)


class BusDevice:
    """A device on the bus: the device, its slot on the page, its eventfds.
    Whether it runs is the device's own state (VirtioDevice.state)."""

    def __init__(self, device, slot):
        self.device = device
        self.slot = slot
        self.kick_fds = []
        self.workers = []
        self.irq_fd = -1


class LguestBus:
    CLOSE_TIMEOUT = 1.0        # seconds close() waits for all the device threads

    def __init__(self, devices, stopping=None):
        self.devices = list(devices)
        self.stopping = stopping or StopRequest()
        self.area_size = PAGE_SIZE + sum(
            ring_pages(num) * PAGE_SIZE for d in self.devices for num in d.queue_sizes)
        self.entries = []
        # The page layout does not depend on where RAM ends, so check now,
        # while a failure is still the user's one-line error, not at install.
        try:
            self.plan(0)
        except ValueError as e:
            raise UsageError(f"too many devices: {e}") from None

    # -- setting up -------------------------------------------------------------

    def plan(self, ram_top):
        """Where every vring goes, and which IRQ each device gets, for a
        device page at `ram_top`: a DeviceSlot per device."""
        next_pfn = (ram_top + PAGE_SIZE) >> 12
        shapes = []
        for i, device in enumerate(self.devices):
            irq = IRQ_POOL[i % len(IRQ_POOL)]
            vqs = []
            for num in device.queue_sizes:
                vqs.append(VqConfig(num, irq, next_pfn))
                next_pfn += ring_pages(num)
            shapes.append((device.type, vqs, device.host_features(), len(device.config_space())))
        return device_page.layout_slots(shapes)

    def install(self, memory: GuestMemory, ram_top: int, vm: EventfdRouter,
                hypercalls: NotifyTargets, report: Callable[[str], None],
                trace: Optional[Callable[[str], None]] = None, fresh: bool = True) -> None:
        """Write the page at `ram_top` and wire every device: its irqfd and
        ioeventfds on `vm`, its status address on the hypercall page, its
        queue workers; then start them.  A restored machine (fresh=False)
        has its page in the memory it restored: nothing is written, and
        start() is left to the caller, once the devices have their state."""
        self.memory = memory
        self.ram_top = ram_top
        self.report = report
        self.trace = trace
        if fresh:
            self.memory.zero(self.ram_top, PAGE_SIZE)
        for device, slot in zip(self.devices, self.plan(self.ram_top)):
            entry = BusDevice(device, slot)
            self.entries.append(entry)
            if fresh:
                self.memory.write(self.ram_top + slot.offset,
                                  device_page.encode(slot, device.config_space()))
            self._wire(vm, hypercalls, entry)
        if fresh:
            self.start()

    def start(self):
        """Start every queue worker and device thread."""
        for entry in self.entries:
            for worker in entry.workers:
                worker.start()
            entry.device.start()

    def serve_all(self):
        """Serve every queue once, as if each had been kicked: a restored
        device may have requests its guest kicked for just before the
        snapshot, and that guest will not kick for them again."""
        for entry in self.entries:
            for index in range(len(entry.slot.vqs)):
                entry.device.service(index)

    def _wire(self, vm, hypercalls, entry):
        device, slot = entry.device, entry.slot
        entry.irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
        vm.irqfd(entry.irq_fd, slot.vqs[0].irq if slot.vqs else IRQ_POOL[0])
        device.attach(DeviceContext(memory=self.memory,
                                    interrupt=lambda fd=entry.irq_fd: os.eventfd_write(fd, 1),
                                    report=self.report, trace=self.trace))
        hypercalls.register_notify(self.ram_top + slot.offset, f"{device.name} status",
                                   lambda addr, e=entry: self.status_changed(e))
        # A device served by a daemon (vhost-user, devices/fs.py) is handed
        # the eventfds themselves: the daemon waits on the kicks and raises
        # the interrupt, and no thread of ours is on the request's path.
        hands_off = device.hands_off_queues
        for index, vq in enumerate(slot.vqs):
            kick_fd = os.eventfd(0, os.EFD_CLOEXEC | (0 if hands_off else os.EFD_NONBLOCK))
            entry.kick_fds.append(kick_fd)          # before the ioctl: close() finds it
            vm.ioeventfd(kick_fd, layout.HYPERCALL_PAGE, 8, datamatch=vq.pfn << 12)
            hypercalls.register_kick(vq.pfn << 12, device.queue_label(index))
            if not hands_off:
                entry.workers.append(QueueWorker(device, index, kick_fd, self.trace,
                                                 on_kick=lambda i, e=entry: self.kicked(e, i)))
        if hands_off:
            device.hand_off(entry.kick_fds, entry.irq_fd)

    # -- what the guest does -------------------------------------------------------
    #
    # These run on the vCPU thread, inside the guest's exit: the guest waits
    # for them.  A device's lock may be held by a worker in the middle of a
    # request, so the vCPU never waits for it unboundedly: a reset first
    # tells the device to abandon what it is doing (the lock is then free
    # within one piece of I/O), and every wait gives way to a stop.

    def status_changed(self, entry: BusDevice) -> Optional[Stop]:
        device = entry.device
        status = self.memory.read_int(self.ram_top + entry.slot.status_offset, 1)
        if self.trace:
            self.trace(f"status {device.name}: {status_text(status)}")
        if status == 0:
            self._reset(entry)
        elif status & STATUS_FAILED:
            self.report(f"{device.name}: the guest's driver set FAILED; resetting the device")
            self._reset(entry)
        elif status & STATUS_DRIVER_OK and device.state is DeviceState.RESET:
            # Only the vCPU thread and a first kick start a device, and
            # both check again under the lock.
            if self.stopping.acquire(device.lock):
                try:
                    if device.state is DeviceState.RESET:
                        self._activate(entry)
                finally:
                    device.lock.release()
        return None

    def kicked(self, entry, index):
        """A kick on a device not yet started starts it: Linux reads the
        partition table before it sets DRIVER_OK."""
        with entry.device.lock:
            if entry.device.state is DeviceState.RESET:
                self._activate(entry)

    def _guest_features(self, entry):
        offset = self.ram_top + entry.slot.guest_features_offset
        return self.memory.read_int(offset, device_page.FEATURE_LEN)

    def _activate(self, entry):
        device, slot = entry.device, entry.slot
        features = self._guest_features(entry)
        unoffered = features & ~slot.host_features
        if unoffered:
            device.mark_broken(GuestError(
                f"{device.name}: the guest accepted features 0x{unoffered:x} that were never "
                "offered", rule=BusRule.FEATURES, queue=device.name))
            return
        # The rings are where the plan put them: the guest's copy of the
        # vq config in the page is never read back.
        device.activate(features, [(vq.num, vq.pfn) for vq in slot.vqs])
        if self.trace and device.active:
            self.trace(f"start  {device.name}: features 0x{features:x}")

    def _reset(self, entry):
        """Status 0: stop the queues, forget the rings and the features.  The
        request in flight, if any, is abandoned (the driver is taking the
        rings back); if the run ends while we wait, the reset is moot."""
        device = entry.device
        device.abandon.set()
        try:
            if not self.stopping.acquire(device.lock):
                return
            try:
                device.reset()
                offset = self.ram_top + entry.slot.guest_features_offset
                self.memory.write(offset, bytes(device_page.FEATURE_LEN))
            finally:
                device.lock.release()
        finally:
            device.abandon.clear()

    def close(self) -> list:
        """Stop every worker and device thread, giving them CLOSE_TIMEOUT
        seconds in all, and close every device, installed or not (a machine
        that failed half-way through its construction closes its bus too).
        Whatever is still in a system call then (fdatasync on a slow disk, a
        write to a stuck socket) keeps its fds, and the process's exit ends
        it.  Returns the names of devices left running."""
        deadline = time.monotonic() + self.CLOSE_TIMEOUT
        left = lambda: max(0.0, deadline - time.monotonic())
        entries = {id(entry.device): entry for entry in self.entries}
        for device in self.devices:
            device.abandon.set()                   # never cleared again
        for entry in self.entries:
            for worker in entry.workers:
                worker.request_stop()
        stuck = []
        for device in self.devices:
            entry = entries.get(id(device))
            # The device's fds are closed only once no worker can use them.
            ended = all([worker.join(left()) for worker in (entry.workers if entry else [])])
            ended = ended and device.close(left())
            if not ended:
                stuck.append(device.name)
            elif entry:
                for fd in entry.kick_fds + [entry.irq_fd]:
                    if fd >= 0:
                        os.close(fd)
        return stuck
