"""The port I/O bus and the i8042's reset line."""

import pytest

from pylguest.platform import i8042
from pylguest.platform.ports import PortBus


class Recorder:
    def __init__(self):
        self.writes = []

    def io_in(self, offset):
        return 0x40 + offset

    def io_out(self, offset, value):
        self.writes.append((offset, value))


def test_claimed_ports_reach_their_device_with_offsets():
    bus, device = PortBus(), Recorder()
    bus.register(0x3F8, 8, "uart", device, ("THR",))
    assert bus.io_in(0x3FD, 1) == 0x45
    bus.io_out(0x3F8, 1, 0x68)
    assert device.writes == [(0, 0x68)]
    assert bus.describe(0x3F8) == "uart.THR"
    assert bus.describe(0x3FB) == "uart+3"


def test_unclaimed_ports_float_high_and_ignore_writes():
    bus = PortBus()
    assert bus.io_in(0x2F8, 1) == 0xFF
    assert bus.io_in(0x2F8, 2) == 0xFFFF
    assert bus.io_out(0x80, 1, 1) is None
    assert bus.describe(0x80) == "unclaimed"


def test_a_port_cannot_be_claimed_twice():
    bus = PortBus()
    bus.register(0x60, 5, "i8042", Recorder())
    with pytest.raises(ValueError):
        bus.register(0x64, 1, "other", Recorder())


def test_i8042_reset_only_on_0xfe_to_the_command_port():
    resets = []
    keyboard = i8042.I8042(lambda: resets.append(1) or "reset")
    assert keyboard.io_out(0, 0xFE) is None                          # data port
    assert keyboard.io_out(i8042.COMMAND_OFFSET, 0xAA) is None       # self test
    assert keyboard.io_out(i8042.COMMAND_OFFSET, 0xFE) == "reset"
    assert resets == [1]
    assert keyboard.io_in(i8042.COMMAND_OFFSET) == i8042.STATUS_IDLE
