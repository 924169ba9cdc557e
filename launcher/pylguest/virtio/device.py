"""What every virtio device is, to the bus: kvmtool's ops table, in Python.

A device says what it is (its virtio type, its queues' sizes, the features it
offers, its config space).  A transport (lguest/bus.py) gives it, once, a
DeviceContext: the guest's memory and the ways to interrupt, to report a
guest's mistake and to trace.  Then the device reacts to four things:

    activate(features, rings)  the guest set DRIVER_OK (or kicked first): go
    service(index)             the guest put buffers in queue `index`
    reset()                    the guest wrote status 0 (or FAILED): stop, forget
    input ready                (some devices) the outside world has data for us

and is in one of three states (DeviceState): RESET, waiting for a driver;
ACTIVE, serving its queues; BROKEN, after the guest broke a rule, serving
nothing until the guest resets it.  Only activate(), reset() and
mark_broken() change the state: the transport calls the first two on the
guest's status writes, and a guest's mistake calls the third.

One kick, four layers, each a seam of its own (the tour follows a block
request through them):

    LguestBus.kicked(entry, index)  the transport: a kick before DRIVER_OK
                                    starts the device (lguest/bus.py)
    service(index)                  the policy, the same for every device:
                                    the lock, the state, a guest's mistake
                                    to a broken device, the interrupt
    process(index, vq)              the device's own: serve queue `index`
                                    (block and net hand it to a C loop)
    drain(vq, serve) -> serve(chain)  the loop a Python-served queue runs,
                                    and the device's answer to one chain

Queue processing runs on `QueueWorker` threads, one per queue: each sleeps
on its queue's ioeventfd, which KVM signals when the guest kicks, so a kick
never passes through the vCPU thread or Python's run loop.  A worker raises
the device's interrupt through its irqfd, so it never needs the vCPU either.

Anything a guest gets wrong in a queue raises a GuestError (a ring rule or
a device's own protocol rule); service() catches it at one place, marks the
device broken with it, and stops serving it.  The error object is kept,
not just its words (`fault`: its `rule`, queue and head; the report line
carries it too), so whoever decides policy, or tests it, sees which rule.  The guest can reset the device to bring it back; the rest of the
machine never notices.

A request in flight can be abandoned.  A guest's reset, and the end of the
run, must not wait for a backend busy with a multi-GiB request (the vCPU
thread would wait with it, and so would --timeout and SIGTERM).  So backends
move data in bounded pieces and call check_abandoned() between them; once
`abandon` is set (by the bus's reset, or by close), the request in flight
raises RequestAbandoned, is never pushed, and the device's lock is free
within one piece.  The guest never saw that request complete, so nothing
it was told is lost: what it saw complete was pushed after its I/O was done.
"""

import abc
import enum
import os
import select
import threading
from typing import Callable, NamedTuple, Optional

from pylguest._native import ffi
from pylguest.errors import GuestError, HostIOError, PylguestError
from pylguest.report import BrokenReport
from pylguest.memory import GuestMemory
from pylguest.virtio.queue import (VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                                   Virtqueue, VirtqueueError)

# Device status bits (virtio spec 2.1, legacy).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FAILED = 0x80

# The ring features every device offers (virtio spec 6).
RING_FEATURES = (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


class RequestAbandoned(Exception):
    """The device is being reset or closed: drop the request in flight."""


class AbandonFlag:
    """"Drop what you are doing": set by a reset or close that waits for the
    device's lock, read between pieces of I/O by Python backends
    (is_set) and by the C request loops (`c`, an int they poll).  A plain
    int is enough for them: one store, read by the loop a moment later."""

    def __init__(self):
        self.c = ffi.new("int *")

    def set(self):
        self.c[0] = 1

    def clear(self):
        self.c[0] = 0

    def is_set(self):
        return bool(self.c[0])


class DeviceContext(NamedTuple):
    """What a transport gives a device when it attaches it: all a device
    knows of the machine it is in."""
    memory: GuestMemory
    interrupt: Callable[[], None]            # raise the device's interrupt
    report: Callable[[str], None]            # a guest's mistake, for the user
    trace: Optional[Callable[[str], None]] = None   # --trace lines, or None


class DeviceState(enum.Enum):
    RESET = "reset"            # no queues: waiting for the guest's driver
    ACTIVE = "active"          # the driver set DRIVER_OK: serving the queues
    BROKEN = "broken"          # the guest broke a rule: nothing until a reset


class VirtioDevice(abc.ABC):
    """Base class: subclasses set `type`, `queue_names`, `queue_sizes` and
    implement `process(index, vq)`, and where they have them
    `device_features()` and `config_space()`."""

    type = 0
    queue_names = ()
    queue_sizes = ()
    # True for a device whose queues a daemon serves (vhost-user,
    # devices/fs.py): the bus then calls hand_off(kick_fds, irq_fd) with
    # the queues' eventfds instead of starting a QueueWorker per queue.
    hands_off_queues = False

    def __init__(self, name):
        self.name = name
        self.state = DeviceState.RESET
        self.broken = None            # why, in words, while the state is BROKEN
        self.fault = None             # the error that broke it (GuestError, HostIOError)
        self.queues = []
        self.guest_features = 0
        self.memory = None            # from the DeviceContext, at attach()
        self.interrupt = self.report = self.trace = None
        # One lock per device: the vCPU thread (status changes), the queue
        # workers (kicks) and input threads all reach the same queues.
        self.lock = threading.RLock()
        # Set while a reset or close waits for the lock: work in flight stops.
        self.abandon = AbandonFlag()

    # -- what the device offers ------------------------------------------------

    def device_features(self):
        return 0

    def host_features(self):
        return self.device_features() | RING_FEATURES

    def config_space(self):
        return b""

    # -- what the transport calls ------------------------------------------------

    def attach(self, context: DeviceContext) -> None:
        """Once, before anything else: the machine this device is in."""
        self.memory = context.memory
        self.interrupt = context.interrupt
        self.report = context.report
        self.trace = context.trace

    def activate(self, guest_features: int, rings) -> None:
        """Serve the guest's rings, [(num, pfn), ...] one per queue, with the
        features it accepted (the transport checked they were offered).  A
        ring that cannot be (outside guest memory) breaks the device."""
        try:
            queues = [Virtqueue(self.memory, self.queue_label(i), num, pfn,
                                event_idx=bool(guest_features >> VIRTIO_RING_F_EVENT_IDX & 1),
                                indirect=bool(guest_features >> VIRTIO_RING_F_INDIRECT_DESC & 1))
                      for i, (num, pfn) in enumerate(rings)]
        except VirtqueueError as e:
            self.mark_broken(e)
            return
        self.queues = queues
        self.guest_features = guest_features
        self.state = DeviceState.ACTIVE

    def reset(self) -> None:
        """Forget the rings and the features; a broken device works again."""
        self.queues = []
        self.guest_features = 0
        self.broken = self.fault = None
        self.state = DeviceState.RESET

    @property
    def active(self) -> bool:
        return self.state is DeviceState.ACTIVE

    def queue_label(self, index):
        return f"{self.name}/{self.queue_names[index]}"

    @abc.abstractmethod
    def process(self, index, vq):
        """Serve queue `index`: pop chains, do the work, push them back.
        Returns True if anything was pushed (so an interrupt may be due)."""

    def drain(self, vq, serve, more=None):
        """The loop every queue runs: pop a chain, serve(chain) -> bytes
        written into it, push it back; until the queue is empty (or
        more() says stop).  Returns True if anything was pushed."""
        pushed = False
        while (more is None or more()) and (chain := vq.pop_with_notify()) is not None:
            self.check_abandoned()
            vq.push(chain, serve(chain))
            pushed = True
        return pushed

    def check_abandoned(self):
        """Between pieces of work: stop here if a reset or close is waiting."""
        if self.abandon.is_set():
            raise RequestAbandoned(self.name)

    def service(self, index):
        """Called on a kick: process the queue, interrupt if the guest wants,
        and turn a guest's mistake into a broken device."""
        with self.lock:
            if not self.active or index >= len(self.queues) or self.abandon.is_set():
                return
            vq = self.queues[index]
            try:
                if self.process(index, vq) and vq.needs_interrupt():
                    self.raise_interrupt(index)
            except GuestError as e:
                self.mark_broken(e)
                # Requests completed before the bad one still deserve
                # their interrupt.
                if vq.needs_interrupt():
                    self.raise_interrupt(index)
            except HostIOError as e:
                self.mark_broken(e)
            except RequestAbandoned:
                pass               # a reset or close is waiting for our lock

    def raise_interrupt(self, index):
        if self.trace:
            self.trace(f"irq   {self.queue_label(index)}")
        self.interrupt()

    def mark_broken(self, error: PylguestError) -> None:
        """The guest broke a rule (a GuestError), or the host failed the
        device's I/O (HostIOError): keep the error, say so, and serve
        nothing until a reset."""
        self.state = DeviceState.BROKEN
        self.fault, self.broken = error, str(error)
        self.report(BrokenReport(self.name, error))

    # -- snapshots (snapshot/take.py and restore.py) --------------------------

    # Why this device cannot be saved, or None: a device whose state lives
    # in a daemon says so (devices/fs.py).
    snapshot_refusal = None

    def save_state(self) -> dict:
        """What a snapshot keeps of the device, at a quiet point (its lock
        held, nothing in flight): the manifest's `devices` entry."""
        return {"name": self.name, "type": self.type, "state": self.state.value,
                "broken": self.broken, "features": self.guest_features,
                "queues": [vq.position() for vq in self.queues],
                "extra": self.save_extra()}

    def save_extra(self) -> dict:
        """A device's own state beyond its queues (pending input...)."""
        return {}

    def restore_state(self, saved: dict, rings) -> None:
        """Be the device `saved` describes, on `rings` ([(num, pfn), ...],
        the bus's plan, which the caller checked `saved` against, with
        its features against the offered ones).  The lock is held
        throughout, so no thread of the device sees a ring before its
        positions are set."""
        with self.lock:
            self.restore_extra(saved["extra"])
            if saved["queues"]:
                self.activate(saved["features"], rings)
                for vq, position in zip(self.queues, saved["queues"]):
                    vq.set_position(position)
            if saved["state"] == "broken":
                # A manifest keeps the words only: the rule is not re-derived.
                self.state, self.broken = DeviceState.BROKEN, saved["broken"] or "broken"
                self.fault = GuestError(self.broken)
            elif saved["state"] == "reset" and self.queues:
                self.reset()

    def restore_extra(self, extra: dict) -> None:
        """Take back save_extra()'s fields; a bad one is a SnapshotError
        (snapshot/__init__.py), since a manifest is the user's input."""
        if extra:
            from pylguest.snapshot import SnapshotError
            raise SnapshotError(f"{self.name}: unknown device state {', '.join(extra)}")

    def start(self):
        """Start the device's own threads, if it has any (the bus calls this
        once it has wired the device)."""

    def close(self, timeout=5.0):
        """The machine is going away: release what the device holds.  A
        device with a thread of its own waits for it up to `timeout` and
        returns False, keeping its fds, if it did not end."""
        return True


class QueueWorker:
    """A thread serving one queue: it wakes on the queue's ioeventfd."""

    def __init__(self, device, index, kick_fd, trace=None, on_kick=None, recheck=None):
        """`recheck`: also serve the queue every `recheck` seconds without a
        kick, for a queue whose kicks someone else may have read (a dying
        vhost-user daemon, devices/fs.py); None: kicks only."""
        self.device = device
        self.index = index
        self.kick_fd = kick_fd
        self.trace = trace
        self.on_kick = on_kick        # the bus: start the device on a first kick
        self.recheck_ms = None if recheck is None else int(recheck * 1000)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"pylguest {device.queue_label(index)}")

    def start(self):
        self.thread.start()

    def _loop(self):
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll(self.recheck_ms))
            if self._stop_r in ready:
                return
            if not ready:
                self.device.service(self.index)          # recheck: see __init__
            if self.kick_fd in ready:
                os.eventfd_read(self.kick_fd)
                if self.trace:
                    self.trace(f"kick  {self.device.queue_label(self.index)}")
                if self.on_kick:
                    self.on_kick(self.index)
                self.device.service(self.index)

    def request_stop(self):
        """Ask the thread to end after what it is doing (then join() it)."""
        os.write(self._stop_w, b"x")

    def join(self, timeout):
        """Wait up to `timeout` seconds for the thread; True once it ended.
        Its pipe is closed only then: a thread still polling on it must
        never see the fd number reused."""
        if self.thread.ident is not None:             # it was started
            self.thread.join(timeout)
            if self.thread.is_alive():
                return False
        if self._stop_r >= 0:
            os.close(self._stop_r)
            os.close(self._stop_w)
            self._stop_r = self._stop_w = -1
        return True
