"""Taking a snapshot, piece by piece, without KVM: guest memory saved as a
sparse file and mapped back copy-on-write, each device's and the UART's
state saved and put back, the refusals, and the pause that takes it."""

import json
import os
import threading

import pytest
from fake_vcpu import interrupted, rigs, shutdown_hypercall
from test_snapshot_manifest import valid_manifest
from virtio_rig import DeviceRig

from pylguest.run import stop
from pylguest.devices.agent_port import CONTROL_LIMIT, AgentPortDevice
from pylguest.devices.console import PENDING_LIMIT, ConsoleDevice
from pylguest.devices.rng import RngDevice
from pylguest.errors import GuestMemoryError
from pylguest.hostconsole.output import ConsoleOutput
from pylguest.memory import GuestMemory, plan_regions
from pylguest.platform.uart import Uart8250
from pylguest.snapshot import SnapshotError, manifest, take
from pylguest.virtio.queue import Virtqueue

PAGE = 4096
MiB = 1 << 20


# --- save_memory: a sparse file with the same bytes ----------------------------------

@pytest.fixture
def guest_memory():
    """8 MiB in two regions (RAM above a small `low_limit` goes to 4 GiB,
    as plan_regions does above 3 GiB), with a few pages written."""
    memory = GuestMemory(plan_regions(6 * MiB, 2 * MiB, low_limit=4 * MiB))
    memory.write(0, b"low page zero")
    memory.write(3 * PAGE + 100, os.urandom(2 * PAGE))        # spans three pages
    memory.write((4 << 30) + MiB, b"above 4 GiB")
    memory.write((4 << 30) + 2 * MiB, b"\x01" * PAGE)
    memory.zero((4 << 30) + 2 * MiB, PAGE)                     # touched, but zero again
    yield memory
    memory.close()


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_saved_memory_has_every_byte_in_mmap_order(tmp_path, guest_memory):
    """The memory file is the mapping, byte for byte: region after region."""
    path = str(tmp_path / "memory")
    take.save_memory(guest_memory, path)
    data = file_bytes(path)
    assert len(data) == guest_memory.size == 8 * MiB
    assert data == guest_memory.read(0, 4 * MiB) + guest_memory.read(4 << 30, 4 * MiB)


def test_saved_memory_is_sparse_zero_pages_take_no_space(tmp_path, guest_memory):
    """Only pages holding something other than zeroes are written: the
    page zeroed again and every untouched page are holes."""
    path = str(tmp_path / "memory")
    written = take.save_memory(guest_memory, path)
    assert written == 5 * PAGE          # page 0; pages 3-5; the page above 4 GiB
    assert os.stat(path).st_blocks * 512 <= written + 64 * 1024
    full = tmp_path / "full"
    full.write_bytes(file_bytes(path))
    assert os.stat(path).st_blocks * 16 < os.stat(full).st_blocks


def test_saved_memory_never_writes_over_a_file(tmp_path, guest_memory):
    """A snapshot's memory file is new: running restores may map an old one."""
    path = tmp_path / "memory"
    path.write_bytes(b"someone's")
    with pytest.raises(FileExistsError):
        take.save_memory(guest_memory, str(path))
    assert path.read_bytes() == b"someone's"


# --- GuestMemory(private_file=): the file, copy-on-write ------------------------------

@pytest.fixture
def saved(tmp_path, guest_memory):
    path = str(tmp_path / "memory")
    take.save_memory(guest_memory, path)
    return guest_memory.regions, path


def test_a_private_mapping_reads_the_saved_memory(saved, guest_memory):
    regions, path = saved
    restored = GuestMemory(regions, private_file=path)
    try:
        assert restored.private and restored.fd == -1
        assert restored.read(0, 13) == b"low page zero"
        assert restored.read((4 << 30) + MiB, 11) == b"above 4 GiB"
        assert restored.read(3 * PAGE + 100, 2 * PAGE) == guest_memory.read(3 * PAGE + 100,
                                                                              2 * PAGE)
    finally:
        restored.close()


def test_writes_to_a_private_mapping_never_reach_the_file(saved):
    """A restored guest's writes are its own: the snapshot stays as taken."""
    regions, path = saved
    before = file_bytes(path)
    restored = GuestMemory(regions, private_file=path)
    try:
        restored.write(0, b"LOW")
        restored.write(7 * PAGE, b"in a hole")
        restored.view((4 << 30) + MiB, 5)[:] = 0x41
        assert restored.read(0, 13) == b"LOW page zero"
    finally:
        restored.close()
    assert file_bytes(path) == before


def test_two_private_mappings_do_not_see_each_others_writes(saved):
    """Two restores of one snapshot share the file, never their writes."""
    regions, path = saved
    first = GuestMemory(regions, private_file=path)
    second = GuestMemory(regions, private_file=path)
    try:
        first.write(0, b"first")
        second.write(0, b"SECOND")
        first.write((4 << 30) + 3 * MiB, b"only first")
        assert first.read(0, 5) == b"first"
        assert second.read(0, 6) == b"SECOND"
        assert second.read((4 << 30) + 3 * MiB, 10) == bytes(10)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("delta", [-PAGE, 1, PAGE])
def test_a_memory_file_of_the_wrong_size_is_refused(saved, delta):
    regions, path = saved
    os.truncate(path, 8 * MiB + delta)
    with pytest.raises(GuestMemoryError, match="is not 8388608 bytes"):
        GuestMemory(regions, private_file=path)


def test_a_restored_memory_can_be_saved_again(tmp_path, saved):
    """A snapshot of a restored guest: its own writes, the rest as saved."""
    regions, path = saved
    restored = GuestMemory(regions, private_file=path)
    try:
        restored.write(PAGE, b"written after the restore")
        again = str(tmp_path / "again")
        take.save_memory(restored, again)
        assert file_bytes(again) == restored.read(0, 4 * MiB) + restored.read(4 << 30, 4 * MiB)
    finally:
        restored.close()


# --- Virtqueue positions ----------------------------------------------------------------

def test_a_queue_position_round_trips(memory):
    """set_position() then position() gives back what was set, at the
    edges of the u16 indices (`memory`: conftest's 1 MiB)."""
    for at in ({"last_avail": 0, "used": 0, "signalled": 0, "notify": False},
               {"last_avail": 65535, "used": 65534, "signalled": 65530, "notify": True},
               {"last_avail": 7, "used": 7, "signalled": 6, "notify": True}):
        vq = Virtqueue(memory, "q", 16, 0x10)
        vq.set_position({"num": 16, "pfn": 0x10, **at})
        assert vq.position() == {"num": 16, "pfn": 0x10, **at}


RECEIVEQ, TRANSMITQ = 0, 1
CONSOLE_PFNS = [0x10, 0x12]
DATA_AREA = (0x20000, 0xF0000)


def new_console(memory, output=None):
    return DeviceRig(ConsoleDevice("console0", (output if output is not None else []).append),
                     memory, CONSOLE_PFNS, DATA_AREA)


def test_a_restored_device_takes_up_where_the_saved_one_stopped(memory):
    """Saved after two chains, restored on a fresh device over the same
    memory: the next chain is served, and only it -- not the old ones
    again, and the used index goes on from where it was."""
    old_output, new_output = [], []
    rig = new_console(memory, old_output)
    rig.activate()
    rig.chain(TRANSMITQ, [(b"one ", False)])
    rig.chain(TRANSMITQ, [(b"two ", False)])
    rig.device.service(TRANSMITQ)
    saved = rig.device.save_state()
    assert saved["queues"][TRANSMITQ]["last_avail"] == 2 == saved["queues"][TRANSMITQ]["used"]

    fresh = ConsoleDevice("console0", new_output.append)
    DeviceRig(fresh, memory, CONSOLE_PFNS, DATA_AREA)       # attached, as the bus does
    fresh.restore_state(saved, [(q["num"], q["pfn"]) for q in saved["queues"]])
    assert fresh.save_state() == saved
    rig.chain(TRANSMITQ, [(b"three", False)])               # the guest's driver goes on
    fresh.service(TRANSMITQ)
    assert new_output == [b"three"] and old_output == [b"one ", b"two "]
    assert rig.rings[TRANSMITQ].used_idx == 3


# --- Devices' own state -------------------------------------------------------------------

def roundtrip(device_factory, saved):
    """restore_state on a fresh device (attached, not active); its save."""
    fresh = device_factory()
    fresh.restore_state(saved, [(q["num"], q["pfn"]) for q in saved["queues"]])
    return fresh


def accepted_by_the_manifest(saved_device):
    """The manifest's reader takes what save_state() gives (JSON and all)."""
    m = valid_manifest()
    m["devices"] = [d for d in m["devices"] if d["name"] != saved_device["name"]]
    m["devices"].append(json.loads(json.dumps(saved_device)))
    manifest.check(m)


def test_a_console_with_pending_input_round_trips(memory):
    """Input typed before the guest gave buffers is in the snapshot."""
    rig = new_console(memory)
    rig.activate()
    rig.device.receive(b"typed ahead")
    saved = rig.device.save_state()
    assert saved["extra"] == {"pending": b"typed ahead".hex()}
    accepted_by_the_manifest(saved)
    fresh = roundtrip(lambda: new_console(memory).device, saved)
    assert fresh.save_state() == saved and fresh.pending == b"typed ahead"


def test_a_console_in_reset_or_broken_round_trips(memory):
    """The states with no rings, and a broken device's reason."""
    rig = new_console(memory)
    assert roundtrip(lambda: new_console(memory).device,
                     rig.device.save_state()).save_state() == rig.device.save_state()
    rig.activate()
    rig.device.mark_broken("console0: a chain loops")
    saved = rig.device.save_state()
    assert saved["state"] == "broken" and saved["broken"] == "console0: a chain loops"
    accepted_by_the_manifest(saved)
    fresh = roundtrip(lambda: new_console(memory).device, saved)
    assert fresh.save_state() == saved


AGENT_PFNS = [0x10, 0x12, 0x14, 0x16]
CONTROL_TRANSMITQ = 3


def new_agent(memory):
    return DeviceRig(AgentPortDevice("agent0", [].append), memory, AGENT_PFNS, DATA_AREA)


def test_an_agent_port_with_control_messages_waiting_round_trips(memory):
    """The port's open state and the control messages the driver has not
    taken yet are in the snapshot, and come back."""
    rig = new_agent(memory)
    rig.activate()
    for port, event, value in ((0xFFFFFFFF, 0, 1), (0, 3, 1), (0, 6, 1)):
        rig.chain(CONTROL_TRANSMITQ, [(port.to_bytes(4, "little") + event.to_bytes(2, "little")
                                       + value.to_bytes(2, "little"), False)])
        rig.device.service(CONTROL_TRANSMITQ)
    rig.device.receive(b"for the agent")
    saved = rig.device.save_state()
    assert saved["extra"]["guest_open"] is True
    assert len(saved["extra"]["control_out"]) == 3     # PORT_ADD, PORT_NAME, PORT_OPEN
    assert saved["extra"]["pending"] == b"for the agent".hex()
    accepted_by_the_manifest(saved)
    fresh = roundtrip(lambda: new_agent(memory).device, saved)
    assert fresh.save_state() == saved
    assert fresh.guest_open and fresh.control_out == rig.device.control_out


GOOD_AGENT_EXTRA = {"pending": "", "guest_open": False, "control_out": []}


@pytest.mark.parametrize("extra", [
    {}, {"pending": 5}, {"pending": "zz"}, {"pending": "abc"},
    {"pending": "00" * (PENDING_LIMIT + 1)}, {"pending": "", "x": 1}, {"x": ""},
])
def test_a_console_refuses_bad_extra_state(memory, extra):
    """A manifest's `extra` is the user's input: checked, one SnapshotError."""
    device = new_console(memory).device
    with pytest.raises(SnapshotError, match="console0: pending input is not hex"):
        device.restore_extra(extra)
    assert device.pending == b""


@pytest.mark.parametrize("change", [
    {"guest_open": None}, {"guest_open": "yes"}, {"guest_open": 1}, {"control_out": None},
    {"control_out": "00"}, {"control_out": ["00"] * (CONTROL_LIMIT + 1)},
    {"control_out": [5]}, {"control_out": [["00"]]}, {"control_out": ["zz"]},
    {"control_out": ["0"]}, {"control_out": ["00" * 257]}, {"pending": 5}, {"x": 1},
])
def test_an_agent_port_refuses_bad_extra_state(memory, change):
    device = new_agent(memory).device
    extra = {**GOOD_AGENT_EXTRA, **change}
    with pytest.raises(SnapshotError, match="agent0: "):
        device.restore_extra({k: v for k, v in extra.items() if v is not None})
    assert device.control_out == [] and device.guest_open is False


def test_a_device_with_no_extra_state_refuses_any(memory):
    """The base device keeps nothing extra, so any field is unknown."""
    rng = RngDevice("rng0")
    rng.restore_extra({})
    with pytest.raises(SnapshotError, match="rng0: unknown device state secret"):
        rng.restore_extra({"secret": 1})


# --- The UART ----------------------------------------------------------------------------

THR, IER, FCR, LCR, MCR, SCR = 0, 1, 2, 3, 4, 7


@pytest.fixture
def uarts():
    """Two UARTs (the one saved, the one restored) and their line levels."""
    r, w = os.pipe()
    made = []

    def make():
        levels = []
        output = ConsoleOutput(w, flush_delay=3600.0)
        made.append(output)
        return Uart8250(levels.append, output), levels
    yield make
    for output in made:
        output.close()
    os.close(r)
    os.close(w)


def test_the_uart_round_trips_registers_fifo_and_line_level(uarts):
    """What save_state() gives, the manifest accepts and restore_state()
    puts back: the registers, the divisor, the receive FIFO, and the
    line level, which is set, not driven again (KVM's restored interrupt
    controller already has it)."""
    uart, levels = uarts()
    for offset, value in ((LCR, 0x83), (THR, 0x0C), (IER, 0x00), (LCR, 0x03), (IER, 0x05),
                          (MCR, 0x0B), (FCR, 0xC1), (SCR, 0x5A)):
        uart.io_out(offset, value)
    uart.receive(b"hi")
    assert levels == [True]
    saved = uart.save_state()
    m = valid_manifest()
    m["uart"] = json.loads(json.dumps(saved))
    manifest.check(m)

    restored, restored_levels = uarts()
    restored.restore_state(saved)
    assert restored.save_state() == saved
    assert restored.divisor == 12 and restored.pending_input == 2
    assert restored_levels == []                        # not driven at the restore
    assert bytes([restored.io_in(THR), restored.io_in(THR)]) == b"hi"
    assert restored.io_in(SCR) == 0x5A
    assert restored_levels == [False]                   # the restored level was high


# --- take.refusals() and prepare() ----------------------------------------------------

class Named:
    def __init__(self, name, refusal=None):
        self.name, self.snapshot_refusal = name, refusal


def test_devices_that_can_be_saved_give_no_refusal(memory):
    assert take.refusals([new_console(memory).device, Named("block0")]) is None
    assert take.refusals([]) is None


def test_a_refusal_names_each_device_that_cannot_be_saved():
    why = take.refusals([Named("block0"), Named("fs0", "virtiofsd keeps its files"),
                         Named("block1", "a private copy")])
    assert why == ("cannot snapshot a guest with fs0 (virtiofsd keeps its files); "
                   "block1 (a private copy)")


def test_the_virtio_fs_device_says_why_it_cannot_be_saved():
    from pylguest.devices.fs import FsDevice
    assert "virtiofsd" in FsDevice.snapshot_refusal


def test_a_snapshot_goes_in_a_new_or_empty_directory(tmp_path):
    """prepare() makes the directory, and never takes one with files in it."""
    take.prepare(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path / "a" / "b") == []
    take.prepare(str(tmp_path / "a" / "b"))              # empty: fine
    (tmp_path / "a" / "b" / "memory").write_bytes(b"x")
    with pytest.raises(SnapshotError, match="the directory is not empty"):
        take.prepare(str(tmp_path / "a" / "b"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SnapshotError, match="snapshot .*file"):
        take.prepare(str(tmp_path / "file"))


# --- The pause: StopRequest.pause and the run loop ----------------------------------------

def test_a_pause_runs_on_run_pauses_in_order_and_is_no_stop():
    woken, ran = [], []
    stopping = stop.StopRequest(on_pause=lambda: woken.append(1))
    stopping.pause(lambda: ran.append("first"))
    stopping.pause(lambda: ran.append("second"))
    assert woken == [1, 1] and ran == []               # woken, nothing run yet
    assert stopping.pending() is None
    stopping.run_pauses()
    assert ran == ["first", "second"] and stopping.pending() is None
    stopping.run_pauses()                              # each runs once
    assert ran == ["first", "second"]


def test_a_pause_asked_for_by_a_pause_runs_in_the_same_stop():
    ran = []
    stopping = stop.StopRequest()
    stopping.pause(lambda: stopping.pause(lambda: ran.append("inner")) or ran.append("outer"))
    stopping.run_pauses()
    assert ran == ["outer", "inner"]


def test_pauses_from_other_threads_all_run_once():
    stopping, ran = stop.StopRequest(), []
    threads = [threading.Thread(target=lambda i=i: stopping.pause(lambda: ran.append(i)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stopping.run_pauses()
    assert sorted(ran) == list(range(8))


def test_a_pause_does_not_wake_the_stop_callback():
    """A pause wakes the vCPU (on_pause), not as a stop (on_request)."""
    requested = []
    stopping = stop.StopRequest(on_request=lambda: requested.append(1))
    stopping.pause(lambda: None)
    assert requested == [] and stopping.pending() is None


@pytest.fixture(params=["python", "fast"])
def rig_of(request):
    yield from rigs(fast=request.param == "fast")


def test_the_run_loop_runs_pauses_when_kvm_run_is_interrupted(rig_of):
    """KVM_RUN returning EINTR: the pause runs on the vCPU thread, then
    the guest runs on to its own end."""
    ran = []
    rig = rig_of([interrupted, shutdown_hypercall(4)])
    rig.stopping.pause(lambda: ran.append(threading.current_thread()))
    assert rig.run() == stop.shutdown(4)
    assert ran == [threading.current_thread()]
