"""--agent fd:N: the agent's console relayed to a socket, losing nothing.

The relay (hostconsole/agent_channel.py) must keep the two ends of the
agent's framed protocol in step, so unlike the user's console it never
drops a byte: input waits in the socket while the guest posts no
buffers, and output waits for a test that reads slowly.
"""

import os
import socket
import time

import pytest
from virtio_rig import DeviceRig

from conftest import wait_until
from pylguest.devices import console
from pylguest.devices.console import ConsoleDevice
from pylguest.errors import UsageError
from pylguest.hostconsole.agent_channel import AgentChannel, parse_agent

RECEIVEQ, TRANSMITQ = 0, 1
PFNS = [0x10, 0x12]
DATA_AREA = (0x20000, 0xF0000)


@pytest.fixture
def relay(memory):
    """(rig, the test's end of the socket, channel)."""
    ours, theirs = socket.socketpair()
    channel = AgentChannel(os.dup(theirs.fileno()))
    theirs.close()
    device = ConsoleDevice("agent0", channel.write)
    rig = DeviceRig(device, memory, PFNS, DATA_AREA)
    channel.start(device)
    yield rig, ours, channel
    channel.close()
    ours.close()


def test_input_beyond_the_pending_limit_waits_in_the_socket_not_lost(relay):
    rig, ours, _ = relay
    rig.activate()
    data = os.urandom(3 * console.PENDING_LIMIT + 123)
    ours.sendall(data)                     # the socket holds what the device cannot
    wait_until(lambda: rig.device.room() == 0, timeout=10)
    time.sleep(0.1)
    assert rig.device.dropped == 0
    got, used = b"", 0
    ring = rig.rings[RECEIVEQ]
    while len(got) < len(data):           # the guest posts buffers, a page at a time
        _, placed = rig.chain(RECEIVEQ, [(4096, True)])
        rig.device.service(RECEIVEQ)
        wait_until(lambda: ring.used_idx > used, timeout=10)
        _, length = ring.used_elem(used)
        used += 1
        got += rig.memory.read(placed[0][0], length)
    assert got == data
    assert rig.device.dropped == 0


def test_every_byte_the_guest_sends_reaches_the_socket_in_order(relay):
    rig, ours, _ = relay
    rig.activate()
    pieces = [os.urandom(n) for n in (1, 4096, 65536, 70000, 5)]
    for piece in pieces:
        rig.chain(TRANSMITQ, [(piece, False)])
    rig.device.service(TRANSMITQ)          # blocks while the socket is full...
    got = b""
    ours.settimeout(10)
    while len(got) < sum(map(len, pieces)):
        got += ours.recv(1 << 20)          # ...until this reads
    assert got == b"".join(pieces)


def test_a_test_that_went_away_costs_the_guest_nothing(relay, capfd):
    rig, ours, channel = relay
    rig.activate()
    ours.close()
    for _ in range(3):
        rig.chain(TRANSMITQ, [(b"x" * 1000, False)])
        rig.device.service(TRANSMITQ)
    assert rig.rings[TRANSMITQ].used_idx == 3          # taken and dropped
    assert channel.gone
    lines = [line for line in capfd.readouterr().err.splitlines() if "agent channel" in line]
    assert lines == ["pylguest: agent channel: the test's end is closed; "
                     "dropping what the guest's agent sends"]


@pytest.mark.parametrize("spec, why", [("fd", "use fd:N"), ("fd:x", "use fd:N"),
                                        ("sock:3", "use fd:N"), ("fd:1", "fds 0-2"),
                                        ("fd:999", "no such open file descriptor")])
def test_a_bad_agent_option_is_one_line(spec, why):
    with pytest.raises(UsageError, match=why):
        parse_agent(spec)


def test_an_fd_that_is_not_a_socket_is_refused(tmp_path):
    fd = os.open(tmp_path / "file", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(UsageError, match="not a socket"):
            parse_agent(f"fd:{fd}")
    finally:
        os.close(fd)
