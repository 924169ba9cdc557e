"""The agent channel's device: a multiport virtio console with one named port
(virtio spec 5.3.6; docs/abi.md, section 8)."""

import struct

import pytest
from virtio_rig import DeviceRig

from pylguest.devices import agent_port
from pylguest.devices.agent_port import AgentPortDevice, AgentPortRule

RECEIVEQ, TRANSMITQ, CONTROL_RECEIVEQ, CONTROL_TRANSMITQ = 0, 1, 2, 3
PFNS = [0x10, 0x12, 0x14, 0x16]
DATA_AREA = (0x20000, 0xF0000)
BAD_ID = 0xFFFFFFFF
# The spec's control events (5.3.6.2), written here from it.
DEVICE_READY, PORT_ADD, PORT_READY, PORT_OPEN, PORT_NAME = 0, 1, 3, 6, 7


def control(port, event, value):
    return struct.pack("<IHH", port, event, value)


@pytest.fixture
def rig(memory):
    output = []
    rig = DeviceRig(AgentPortDevice("agent0", output.append), memory, PFNS, DATA_AREA)
    rig.output = output
    return rig


def say(rig, message):
    """The driver sends one control message (and kicks)."""
    rig.chain(CONTROL_TRANSMITQ, [(message, False)])
    rig.device.service(CONTROL_TRANSMITQ)


def heard(rig, buffers):
    """What the device wrote into the driver's control buffers, in order."""
    ring = rig.rings[CONTROL_RECEIVEQ]
    return [rig.memory.read(buffers[n][0], ring.used_elem(n)[1]) for n in range(ring.used_idx)]


def give_control_buffers(rig, count=4):
    return [rig.chain(CONTROL_RECEIVEQ, [(4096, True)])[1][0] for _ in range(count)]


def test_it_offers_one_port_and_multiport(rig):
    assert rig.device.type == 3
    assert rig.device.device_features() == 1 << 1                   # VIRTIO_CONSOLE_F_MULTIPORT
    cols, rows, max_nr_ports, emerg_wr = struct.unpack("<HHII", rig.device.config_space())
    assert (max_nr_ports, emerg_wr) == (1, 0)


def test_the_driver_is_told_of_one_named_port_that_the_host_has_open(rig):
    rig.activate()
    buffers = give_control_buffers(rig)
    say(rig, control(BAD_ID, DEVICE_READY, 1))
    assert heard(rig, buffers) == [control(0, PORT_ADD, 1)]
    say(rig, control(0, PORT_READY, 1))
    assert heard(rig, buffers)[1:] == [control(0, PORT_NAME, 1) + b"org.pylguest.agent",
                                       control(0, PORT_OPEN, 1)]
    assert agent_port.NAME == "org.pylguest.agent"
    assert rig.interrupts >= 2


def test_input_is_taken_only_while_the_agent_has_the_port_open(rig):
    rig.activate()
    head, placed = rig.chain(RECEIVEQ, [(4096, True)])
    rig.device.receive(b"for no agent")
    say(rig, control(0, PORT_OPEN, 1))
    assert rig.rings[RECEIVEQ].used_idx == 0            # it came before anyone opened the port
    rig.device.receive(b"for the agent")
    assert rig.rings[RECEIVEQ].used_elem(0) == (head, 13)
    assert rig.memory.read(placed[0][0], 13) == b"for the agent"
    say(rig, control(0, PORT_OPEN, 0))                  # the agent went away
    rig.device.receive(b"stale")
    say(rig, control(0, PORT_OPEN, 1))
    rig.chain(RECEIVEQ, [(4096, True)])
    rig.device.service(RECEIVEQ)
    assert rig.rings[RECEIVEQ].used_idx == 1            # nothing meant for the old agent
    assert rig.device.dropped == len(b"for no agent") + len(b"stale")


def test_the_agents_output_reaches_the_relay(rig):
    rig.activate()
    rig.chain(TRANSMITQ, [(b"frame bytes", False)])
    rig.device.service(TRANSMITQ)
    assert rig.output == [b"frame bytes"]


@pytest.mark.parametrize("message, why", [
    (control(0, PORT_ADD, 1), "PORT_ADD for port 0x0"),        # the device's message, not the driver's
    (control(5, PORT_OPEN, 1), "PORT_OPEN for port 0x5"),      # no such port
    (control(0, PORT_OPEN, 7), "PORT_OPEN for port 0x0 (value 7)"),
    (control(0, 99, 0), "99 for port 0x0"),
    (control(0, PORT_OPEN, 1) + b"x", "a control message of 9 bytes"),
    (b"\0" * 4, "a control message of 4 bytes"),
])
def test_a_bad_control_message_breaks_the_device_naming_the_queue(rig, message, why):
    rig.activate()
    say(rig, message)
    assert rig.device.state.value == "broken"
    assert rig.reports and rig.reports[0].startswith("agent0/control-transmitq: ")
    assert why in rig.reports[0]


def test_a_long_control_chain_is_refused_by_its_length(rig):
    rig.activate(indirect=True)
    rig.indirect_chain(CONTROL_TRANSMITQ, [(control(0, PORT_OPEN, 1), False)])
    rig.device.service(CONTROL_TRANSMITQ)
    assert rig.device.state.value == "active"           # a good one, through an indirect table
    # 64 buffers of 8 KiB: refused by its length alone (the device reads
    # 8 bytes of a control chain, never more).
    rig.indirect_chain(CONTROL_TRANSMITQ, [(8192, False)] * 64)
    rig.device.service(CONTROL_TRANSMITQ)
    assert rig.device.state.value == "broken"
    assert f"a control message of {64 * 8192} bytes" in rig.reports[0]


def test_a_driver_that_gives_no_control_buffers_cannot_grow_the_backlog(rig):
    rig.activate()
    for _ in range(agent_port.CONTROL_LIMIT // 2 + 1):
        say(rig, control(0, PORT_READY, 1))             # two answers each, never delivered
    assert rig.device.state.value == "broken"
    assert "control messages wait for buffers" in rig.reports[0]
    assert rig.reports[0].startswith("agent0/control-receiveq: ")
