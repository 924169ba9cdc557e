"""virtio/device.py: the queue worker, the drain loop, and abandoning a request."""

import os
import threading

from conftest import wait_until
from virtio_rig import DeviceRig

from pylguest.virtio.device import DeviceState, QueueWorker, RequestAbandoned, VirtioDevice

PFN = 0x10
DATA_AREA = (0x20000, 0xF0000)


class Echo(VirtioDevice):
    """One queue; every chain is served with 0 bytes written.  `after_drain`
    runs once the ring looked empty, before process() returns."""

    type = 4
    queue_names = ("requests",)
    queue_sizes = (8,)

    def __init__(self):
        super().__init__("echo0")
        self.after_drain = None
        self.served = 0

    def process(self, index, vq):
        pushed = self.drain(vq, self._serve)
        if self.after_drain:
            hook, self.after_drain = self.after_drain, None
            hook()
        return pushed

    def _serve(self, chain):
        self.served += 1
        return 0


def test_a_kick_during_service_is_not_swallowed(memory):
    # The worker must consume the eventfd's count *before* it serves: a kick
    # that comes while it serves (the driver added a chain just after the
    # device's last look) then stays counted, and wakes it again.  Read
    # after serving, that kick would be eaten with the old one.
    device = Echo()
    rig = DeviceRig(device, memory, [PFN], DATA_AREA)
    rig.activate()
    kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    worker = QueueWorker(device, 0, kick_fd)
    worker.start()
    try:
        def driver_adds_and_kicks():
            rig.chain(0, [(8, True)])
            os.eventfd_write(kick_fd, 1)
        device.after_drain = driver_adds_and_kicks
        rig.chain(0, [(8, True)])
        os.eventfd_write(kick_fd, 1)
        wait_until(lambda: device.served == 2, 5)
        assert rig.rings[0].used_idx == 2
    finally:
        worker.request_stop()
        assert worker.join(5)
        os.close(kick_fd)


def test_an_abandon_stops_the_drain_before_the_next_chain(memory):
    # A reset comes while the first of three chains is served: that one is
    # done and pushed, the next is not served, the third not even popped.
    device = Echo()
    rig = DeviceRig(device, memory, [PFN], DATA_AREA)
    queues = rig.activate()
    for _ in range(3):
        rig.chain(0, [(8, True)])
    real_serve = device._serve

    def serve_then_reset_arrives(chain):
        device.abandon.set()
        return real_serve(chain)
    device._serve = serve_then_reset_arrives
    device.service(0)
    assert device.served == 1 and rig.rings[0].used_idx == 1
    assert queues[0].last_avail_idx == 2
    assert device.broken is None
    device.abandon.clear()
    device._serve = real_serve


def test_service_does_nothing_while_an_abandon_is_pending(memory):
    device = Echo()
    rig = DeviceRig(device, memory, [PFN], DATA_AREA)
    queues = rig.activate()
    rig.chain(0, [(8, True)])
    device.abandon.set()
    device.service(0)
    assert device.served == 0 and queues[0].last_avail_idx == 0


def test_a_worker_that_will_not_end_keeps_its_pipe(memory):
    # join() closes the worker's pipe only once the thread has ended: a
    # thread still polling on it must never see the number reused.
    device = Echo()
    DeviceRig(device, memory, [PFN], DATA_AREA).activate()
    release = threading.Event()
    kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    device.after_drain = lambda: release.wait(5)
    worker = QueueWorker(device, 0, kick_fd)
    worker.start()
    os.eventfd_write(kick_fd, 1)              # the worker is now stuck in process()
    wait_until(lambda: device.after_drain is None, 5)
    worker.request_stop()
    assert worker.join(0.1) is False
    assert worker._stop_r >= 0                 # still open
    release.set()
    assert worker.join(5) is True
    assert worker._stop_r == -1
    os.close(kick_fd)


# --- The one lifecycle: reset, active, broken; only activate, reset and
# mark_broken move a device between them.

class Strict(Echo):
    """Echo, but a chain with a readable buffer breaks the device."""

    def _serve(self, chain):
        if chain.readable_len:
            self.mark_broken(f"{self.queue_label(0)}: a readable buffer")
            raise RequestAbandoned(self.name)
        return super()._serve(chain)


def test_a_device_moves_between_its_three_states(memory):
    device = Strict()
    rig = DeviceRig(device, memory, [PFN], DATA_AREA)
    assert device.state is DeviceState.RESET and not device.active
    rig.chain(0, [(8, True)])
    device.service(0)                                   # not started: nothing served
    assert device.served == 0 and rig.rings[0].used_idx == 0

    rig.activate()
    assert device.state is DeviceState.ACTIVE and device.active and device.broken is None
    device.service(0)
    assert device.served == 1

    rig.chain(0, [(b"bad", False)])
    device.service(0)
    assert device.state is DeviceState.BROKEN and not device.active
    assert device.broken == "echo0/requests: a readable buffer"
    assert rig.reports == ["echo0/requests: a readable buffer: device echo0 marked broken "
                           "until the guest resets it"]
    rig.chain(0, [(8, True)])
    device.service(0)                                   # broken: nothing served
    assert device.served == 1

    device.reset()
    assert device.state is DeviceState.RESET and device.broken is None
    assert device.queues == [] and device.guest_features == 0


def test_a_ring_outside_guest_memory_breaks_the_device_at_activation(memory):
    device = Echo()
    rig = DeviceRig(device, memory, [PFN], DATA_AREA)
    device.activate(0, [(8, (memory.size >> 12) + 16)])
    assert device.state is DeviceState.BROKEN and device.queues == []
    assert len(rig.reports) == 1 and "echo0/requests" in rig.reports[0]


def test_the_console_takes_input_only_while_active(memory):
    from pylguest.devices.console import ConsoleDevice
    device = ConsoleDevice("console0", lambda data: None)
    rig = DeviceRig(device, memory, [PFN, PFN + 4], DATA_AREA)
    assert not device.accepting_input
    rig.activate()
    assert device.accepting_input
    device.mark_broken("console0/transmitq: test")
    assert not device.accepting_input                  # input goes to the UART then
    device.reset()
    assert not device.accepting_input
