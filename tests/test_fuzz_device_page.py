"""The device page under fuzzing: a guest that scribbles on all of it.

The device page lives in guest memory, so the guest can write anything
anywhere on it.  The rules (device_page.py and bus.py state them; the seed
driver, lguest_device.c, is their source) say what the launcher may believe:

* its own copy of every field it owns -- type, num_vq, feature_len,
  config_len, each vqconfig {num, irq, pfn}, the host features -- and never
  the page's, which the guest may have rewritten;
* from the page only what the guest owns: the status byte (read when the
  guest notifies that descriptor's address), the guest features (read when
  the device starts) and the config space (which our devices never read
  back);
* and it writes the page only to clear the guest features on a reset.

LHCALL_NOTIFY(addr): a descriptor's address is a status change (0 resets;
FAILED is reported and resets; DRIVER_OK starts a device not yet started and
not broken, refusing features never offered); any other address in guest
RAM is an early-console string; anything else is a guest error, reported.

Each case is a sequence of guest actions -- scribbles anywhere on the page,
status and feature writes, notifies of interesting and random addresses,
kicks -- run against a real LguestBus with four real devices (block, console,
net on a socket pair, rng), with a fake VM for the eventfd ioctls.  After
every action the bus is compared with `BusModel`, written from the rules
above: each device's state, what was reported, what the early console
printed, the launcher's own copies, and every byte of the page.
"""

import os
import socket
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import fuzz_test, record
from virtio_rig import EarlyConsole, FakeVm
from pylguest.lguest.bus import LguestBus
from pylguest.devices.block import BlockDevice
from pylguest.devices.console import ConsoleDevice
from pylguest.devices.net import NetDevice
from pylguest.devices.rng import RngDevice
from pylguest.lguest.hypercall import EARLY_CONSOLE_MAX, HypercallPage
from pylguest.memory import GuestMemory, plan_regions

pytestmark = pytest.mark.fuzz

RAM = 1 << 20                     # the device page at 1 MiB, the rings after it
PAGE = 4096
ACK, DRIVER, DRIVER_OK, FAILED = 1, 2, 4, 0x80
STATUS_OFFSET, FEATURE_LEN = 4, 4


class Machine:
    """A bus with block0, console0, net0 and rng0 on plain memory."""

    def __init__(self, tmp):
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(64 * 512)
        entropy = os.path.join(tmp, "entropy")
        with open(entropy, "wb") as f:
            f.write(os.urandom(4096))
        self.peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.console_out, self.early = [], EarlyConsole()
        self.devices = [BlockDevice("block0", image), ConsoleDevice("console0", self.console_out.append),
                        NetDevice("net0", "fuzz", bytes.fromhex("525400123456"), tap_fd=ours.detach()),
                        RngDevice("rng0", entropy)]
        self.bus = LguestBus(self.devices)
        self.memory = GuestMemory(plan_regions(RAM, self.bus.area_size))
        self.reports = []
        self.hypercalls = HypercallPage(self.memory, RAM, self.early, self.reports.append)
        self.bus.install(self.memory, RAM, FakeVm(), self.hypercalls, self.reports.append)
        self.entries = self.bus.entries

    def close(self):
        self.bus.close()
        self.peer.close()
        self.memory.close()

    def page(self):
        return self.memory.read(RAM, PAGE)


# --- the model: the rules above, nothing of the bus's code --------------------------------

@dataclass
class DeviceModel:
    name: str
    offset: int                   # its descriptor's offset in the page (the launcher's copy)
    num_vq: int
    host_features: int
    state: str = "reset"          # "reset", "active", "broken"

    @property
    def status_at(self):
        return self.offset + STATUS_OFFSET

    @property
    def features_at(self):        # guest features: after the header, vqconfigs, host features
        return self.offset + 5 + 8 * self.num_vq + FEATURE_LEN


@dataclass
class BusModel:
    page: bytearray
    devices: list
    vring_addresses: set
    reports: list = field(default_factory=list)
    early: bytearray = field(default_factory=bytearray)

    def scribble(self, offset, data):
        self.page[offset:offset + len(data)] = data

    def notify(self, addr, memory_read):
        for device in self.devices:
            if addr == RAM + device.offset:
                return self.status_change(device)
        if addr < RAM:
            # An early-console string: up to its NUL, at most EARLY_CONSOLE_MAX
            # bytes (RAM is followed by the device page, so they all exist).
            text = memory_read(addr, EARLY_CONSOLE_MAX)
            self.early += text.split(b"\0", 1)[0]
            return
        self.reports.append(f"LHCALL_NOTIFY(0x{addr:x})")

    def status_change(self, device):
        status = self.page[device.status_at]
        if status == 0 or status & FAILED:
            if status & FAILED:
                self.reports.append(f"{device.name}: the guest's driver set FAILED")
            device.state = "reset"
            self.page[device.features_at:device.features_at + FEATURE_LEN] = bytes(FEATURE_LEN)
        elif status & DRIVER_OK and device.state == "reset":
            self.start(device)

    def kick(self, device):
        """A kick on a device not yet started starts it, as DRIVER_OK would
        (Linux reads the partition table before it sets DRIVER_OK)."""
        if device.state == "reset":
            self.start(device)

    def start(self, device):
        features = int.from_bytes(self.page[device.features_at:device.features_at + FEATURE_LEN],
                                  "little")
        if features & ~device.host_features:
            device.state = "broken"
            self.reports.append(f"{device.name}: the guest accepted features")
        else:
            device.state = "active"


def model_of(machine):
    devices = [DeviceModel(e.device.name, e.slot.offset, len(e.slot.vqs), e.slot.host_features)
               for e in machine.entries]
    vrings = {vq.pfn << 12 for e in machine.entries for vq in e.slot.vqs}
    return BusModel(bytearray(machine.page()), devices, vrings)


# --- the guest's actions --------------------------------------------------------------------

def interesting_addresses(model):
    out = set(model.vring_addresses)
    for d in model.devices:
        out |= {RAM + d.offset + k for k in (-1, 0, 1, STATUS_OFFSET)}
    return sorted(out | {0, 0x1000, RAM - 1, RAM - 16, RAM, RAM + PAGE, 1 << 40, (1 << 64) - 1})


@st.composite
def field_scribble(draw, device):
    """A new value for one of the launcher's own fields of `device`: each
    kind of field (header byte, vq num, vq irq, vq pfn, host features) as
    likely as the others."""
    kind = draw(st.sampled_from(sorted(launcher_fields(device))))
    offset, size = draw(st.sampled_from(launcher_fields(device)[kind]))
    value = draw(st.sampled_from([0, 1, (1 << 8 * size) - 1, 1 << (8 * size - 1)])
                 | st.integers(0, (1 << 8 * size) - 1))
    return ("scribble", offset, value.to_bytes(size, "little"))


def launcher_fields(device):
    """{kind: [(offset in the page, size)]} of every field of `device`'s
    entry that is the launcher's: the header (type, num_vq, feature_len,
    config_len), each vqconfig's num, irq and pfn, the host features."""
    at = device.offset
    vqs = [at + 5 + 8 * i for i in range(device.num_vq)]
    return {"header": [(at, 1), (at + 1, 1), (at + 2, 1), (at + 3, 1)],
            "vq num": [(vq, 2) for vq in vqs], "vq irq": [(vq + 2, 2) for vq in vqs],
            "vq pfn": [(vq + 4, 4) for vq in vqs],
            "host features": [(at + 5 + 8 * device.num_vq, FEATURE_LEN)]}


@st.composite
def action(draw, model, focus):
    kind = draw(st.sampled_from(["scribble", "field", "status", "features", "notify",
                                 "kick", "early", "bring-up"]))
    # Mostly the case's one device, so that a scribble, a feature write and
    # a DRIVER_OK meet on the same entry; sometimes any device.
    device = draw(st.sampled_from([focus] * 3 + list(range(len(model.devices)))))
    if kind == "scribble":
        offset = draw(st.integers(0, PAGE - 1))
        data = draw(st.binary(min_size=1, max_size=min(64, PAGE - offset)))
        return ("scribble", offset, data)
    if kind == "field":            # a hostile guest aims at what the launcher owns
        return draw(field_scribble(model.devices[device]))
    if kind == "status":
        value = draw(st.sampled_from([0, ACK, ACK | DRIVER, ACK | DRIVER | DRIVER_OK,
                                      DRIVER_OK, FAILED, 0xFF]) | st.integers(0, 255))
        return ("status", device, value)
    if kind in ("features", "bring-up"):
        d = model.devices[device]
        value = draw(st.sampled_from([0, d.host_features, d.host_features | 1 << 31,
                                      0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF))
        if kind == "bring-up":     # ... while rewriting what the launcher owns, or not
            tamper = draw(st.none() | field_scribble(d))
            host_features_at = launcher_fields(d)["host features"][0][0]
            if tamper and tamper[1] == host_features_at and draw(st.booleans()):
                # It rewrote the host features: it accepts what it wrote.
                value = int.from_bytes(tamper[2], "little")
            return (kind, device, value, tamper)
        return (kind, device, value)
    if kind == "notify":
        return ("notify", draw(st.sampled_from(interesting_addresses(model))
                               | st.integers(0, (1 << 64) - 1)))
    if kind == "early":
        return ("early", draw(st.integers(0, RAM - 1)),
                draw(st.binary(min_size=0, max_size=300)))
    return ("kick", device, draw(st.integers(0, 1)))


def play(machine, model, step):
    """Do one guest action on the machine and on the model."""
    kind = step[0]
    if kind == "scribble":
        _, offset, data = step
        machine.memory.write(RAM + offset, data)
        model.scribble(offset, data)
    elif kind == "bring-up":        # what the seed's driver does, with any features
        _, index, features, tamper = step
        for status in (0, ACK, ACK | DRIVER):
            play(machine, model, ("status", index, status))
        play(machine, model, ("features", index, features))
        if tamper:
            play(machine, model, tamper)
        play(machine, model, ("status", index, ACK | DRIVER | DRIVER_OK))
    elif kind in ("status", "features"):
        _, index, value = step
        d = model.devices[index]
        where, data = ((d.status_at, bytes([value])) if kind == "status"
                       else (d.features_at, value.to_bytes(FEATURE_LEN, "little")))
        machine.memory.write(RAM + where, data)
        model.scribble(where, data)
        if kind == "status":          # the seed notifies on every status write
            notify(machine, model, RAM + d.offset)
    elif kind == "notify":
        notify(machine, model, step[1])
    elif kind == "early":
        _, addr, text = step
        text = text[:RAM - addr]
        machine.memory.write(addr, text)
        notify(machine, model, addr)
    else:
        _, index, queue = step
        entry = machine.entries[index]
        if queue < len(entry.slot.vqs):
            machine.bus.kicked(entry, queue)      # what a worker does on a kick
            entry.device.service(queue)
            model.kick(model.devices[index])


def notify(machine, model, addr):
    assert machine.hypercalls.notify(addr) is None
    model.notify(addr, machine.memory.read)


# --- the property -------------------------------------------------------------------------

def check(machine, model, slots):
    for entry, device, slot in zip(machine.entries, model.devices, slots):
        state = entry.device.state.value
        assert state == device.state, (device.name, state, device.state)
        assert (entry.device.broken is not None) == (state == "broken")
        assert entry.slot == slot                                # the launcher's own copy
        if entry.device.active:
            for vq, config in zip(entry.device.queues, slot.vqs):
                assert (vq.pfn, vq.num) == (config.pfn, config.num)
    assert machine.page() == bytes(model.page)
    assert bytes(machine.early.data) == bytes(model.early)
    assert len(machine.reports) == len(model.reports), (machine.reports, model.reports)
    for got, want in zip(machine.reports, model.reports):
        # A ring the guest scribbled over may also break a device on a kick
        # (its own message, naming the queue): only the bus's rules are the
        # model's, so the rest is the prefix.
        assert got.startswith(want.split(":")[0]), (got, want)


@fuzz_test(quick=150, long=5000)
@given(data=st.data())
def test_a_scribbled_device_page_is_never_believed(tmp_path_factory, batch, data):
    machine = Machine(str(tmp_path_factory.mktemp("bus")))
    try:
        model = model_of(machine)
        slots = [e.slot for e in machine.entries]
        capacity = machine.devices[0].capacity
        # Zeroed rings: a kick then finds nothing to do, and cannot break a
        # device by itself (ring scribbles are test_fuzz_rings.py's).
        focus = data.draw(st.integers(0, len(model.devices) - 1))
        steps = data.draw(st.lists(action(model, focus), min_size=3, max_size=30))
        started = time.monotonic()
        for step in steps:
            play(machine, model, step)
            check(machine, model, slots)
        assert machine.devices[0].capacity == capacity           # config scribbles change nothing
        outcome = "+".join(sorted({d.state for d in model.devices}))
        record("device page", outcome, time.monotonic() - started, f"{len(steps)} actions")
    finally:
        machine.close()
