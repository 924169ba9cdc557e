"""The virtio console (virtio spec 5.3): transmitq to the output, input to receiveq."""

import pytest
from virtio_rig import DeviceRig

from pylguest.devices import console
from pylguest.devices.console import ConsoleDevice

RECEIVEQ, TRANSMITQ = 0, 1                  # spec 5.3.2: port 0's receiveq, transmitq
PFNS = [0x10, 0x12]
DATA_AREA = (0x20000, 0xF0000)


@pytest.fixture
def output():
    return []


@pytest.fixture
def rig(memory, output):
    return DeviceRig(ConsoleDevice("console0", output.append), memory, PFNS, DATA_AREA)


def test_queue_names_and_type(rig):
    assert rig.device.type == 3
    assert rig.device.queue_label(RECEIVEQ) == "console0/receiveq"
    assert rig.device.queue_label(TRANSMITQ) == "console0/transmitq"


# --- Transmit.

def test_transmit_reaches_output_in_order(rig, output):
    rig.activate()
    first, _ = rig.chain(TRANSMITQ, [(b"hello ", False)])
    second, _ = rig.chain(TRANSMITQ, [(b"wor", False), (b"ld", False)])
    rig.device.service(TRANSMITQ)
    third, _ = rig.chain(TRANSMITQ, [(b"\n", False)])
    rig.device.service(TRANSMITQ)
    assert output == [b"hello ", b"world", b"\n"]
    ring = rig.rings[TRANSMITQ]
    assert ring.used_idx == 3
    assert [ring.used_elem(n) for n in range(3)] == [(first, 0), (second, 0), (third, 0)]
    assert rig.interrupts == 2
    assert rig.rings[RECEIVEQ].used_idx == 0


def test_transmit_before_activation_is_ignored(rig, output):
    rig.chain(TRANSMITQ, [(b"early", False)])
    rig.device.service(TRANSMITQ)
    assert output == [] and rig.rings[TRANSMITQ].used_idx == 0


# --- Receive.

def test_receive_with_buffers_posted_is_delivered_at_once(rig):
    rig.activate()
    head, placed = rig.chain(RECEIVEQ, [(16, True)])
    rig.device.receive(b"typed")
    ring = rig.rings[RECEIVEQ]
    assert ring.used_elem(0) == (head, 5)
    assert rig.memory.read(placed[0][0], 5) == b"typed"
    assert rig.interrupts == 1


def test_receive_before_buffers_is_kept_for_the_next_service(rig):
    rig.activate()
    rig.device.receive(b"abc")
    rig.device.receive(b"def")
    assert rig.rings[RECEIVEQ].used_idx == 0 and rig.interrupts == 0
    first, placed1 = rig.chain(RECEIVEQ, [(2, True)])
    second, placed2 = rig.chain(RECEIVEQ, [(3, True), (8, True)])
    rig.device.service(RECEIVEQ)                 # the guest's kick
    ring = rig.rings[RECEIVEQ]
    assert ring.used_idx == 2
    assert ring.used_elem(0) == (first, 2) and ring.used_elem(1) == (second, 4)
    assert rig.memory.read(*placed1[0]) == b"ab"
    assert rig.memory.read(*placed2[0]) + rig.memory.read(placed2[1][0], 1) == b"cdef"
    assert rig.memory.read(placed2[1][0] + 1, 1) == b"\xEE"     # untouched beyond
    assert rig.device.pending == b""
    assert rig.interrupts == 1


def test_receive_before_the_driver_starts_is_kept(rig):
    rig.device.receive(b"early")                 # no queues yet: nothing to do
    rig.activate()
    head, placed = rig.chain(RECEIVEQ, [(8, True)])
    rig.device.service(RECEIVEQ)
    assert rig.rings[RECEIVEQ].used_elem(0) == (head, 5)
    assert rig.memory.read(placed[0][0], 5) == b"early"


def test_input_is_kept_while_buffers_run_out(rig):
    rig.activate()
    head, _ = rig.chain(RECEIVEQ, [(4, True)])
    rig.device.receive(b"0123456789")
    assert rig.rings[RECEIVEQ].used_elem(0) == (head, 4)
    assert rig.device.pending == b"456789"
    _, placed = rig.chain(RECEIVEQ, [(64, True)])
    rig.device.service(RECEIVEQ)
    assert rig.memory.read(placed[0][0], 6) == b"456789"


def test_pending_limit(rig):
    limit = console.PENDING_LIMIT
    rig.device.receive(b"x" * (limit - 10))
    rig.device.receive(b"y" * 30)                # 10 fit, 20 are dropped
    assert len(rig.device.pending) == limit
    assert rig.device.pending[-11:] == b"x" + b"y" * 10
    assert rig.device.dropped == 20
    rig.device.receive(b"z")
    assert rig.device.dropped == 21 and len(rig.device.pending) == limit
    # Delivering makes room again.
    rig.activate()
    rig.chain(RECEIVEQ, [(1000, True)])
    rig.device.service(RECEIVEQ)
    assert len(rig.device.pending) == limit - 1000
    rig.device.receive(b"w" * 5)
    assert rig.device.pending.endswith(b"w" * 5) and rig.device.dropped == 21


def test_reset_forgets_queues(rig, output):
    rig.activate()
    rig.device.reset()
    assert rig.device.queues == []
    rig.chain(TRANSMITQ, [(b"after reset", False)])
    rig.device.service(TRANSMITQ)
    assert output == []


def test_a_broken_transmitq_stops_the_device(rig, output):
    rig.activate()
    rig.rings[TRANSMITQ].publish(64)             # head out of range
    rig.device.service(TRANSMITQ)
    assert rig.device.broken
    assert rig.reports[0].startswith("console0/transmitq: ")
    rig.device.receive(b"lost?")
    assert rig.rings[RECEIVEQ].used_idx == 0


# --- A hostile chain costs the host a piece, not the chain.

def run_hostile_chain(what):
    """tests/hostile_chains.py in a process of its own: (extra peak KiB, the rest)."""
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "hostile_chains.py"), what],
                            capture_output=True, text=True, timeout=50,
                            env={"PYTHONPATH": str(ROOT / "launcher")})
    assert result.returncode == 0, result.stderr
    first, _, rest = result.stdout.strip().partition(" ")
    return int(first.split("=")[1]), rest


def test_a_1_gib_transmit_chain_is_streamed_not_gathered():
    # 16 descriptors, each all of a 64 MiB guest: 1 GiB of output from one
    # request, which used to be gathered into one bytes object (3 GiB peak).
    extra_kib, rest = run_hostile_chain("console")
    print(f"console: 1 GiB transmit chain, extra peak RSS {extra_kib} KiB")
    assert "served=1 output=1073741824 reports=[]" == rest
    assert extra_kib < 64 * 1024
