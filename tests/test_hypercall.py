"""The hypercall page: LHCALL_NOTIFY and LHCALL_SHUTDOWN as 8-byte stores."""

import struct

import pytest

from pylguest import layout
from pylguest.lguest.hypercall import EARLY_CONSOLE_MAX, HypercallPage
from pylguest.memory import GuestMemory, Region

RAM_TOP = 1 << 20
NOTIFY = layout.HYPERCALL_PAGE
SHUTDOWN = layout.HYPERCALL_PAGE + 8


class Console:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


@pytest.fixture
def page():
    memory = GuestMemory([Region(0, RAM_TOP + 4096, 0)])
    errors, console = [], Console()
    hc = HypercallPage(memory, RAM_TOP, console, errors.append)
    hc.errors, hc.console_out = errors, console
    yield hc
    memory.close()


def store(value):
    return struct.pack("<Q", value)


def test_shutdown_status_is_the_low_byte(page):
    result = page.mmio_write(SHUTDOWN, store(0x1234_0003))
    assert (result.status, result.reason) == (3, "shutdown")


def test_shutdown_with_reboot_bit(page):
    result = page.mmio_write(SHUTDOWN, store(0x100 | 9))
    assert (result.status, result.reason) == (0, "reboot")


def test_shutdown_with_the_panic_bit_is_a_crash_with_the_kernels_reason(page):
    page.panic_message = lambda: "VFS: Unable to mount root fs"
    result = page.mmio_write(SHUTDOWN, store(0x400 | 7))
    assert (result.status, result.reason) == (125, "kernel panic")
    assert result.detail == "VFS: Unable to mount root fs"


def test_shutdown_with_the_halt_bit_is_neither_success_nor_the_low_byte(page):
    result = page.mmio_write(SHUTDOWN, store(0x200))
    assert (result.status, result.reason) == (123, "halted")


def test_panic_wins_over_every_other_bit(page):
    assert page.mmio_write(SHUTDOWN, store(0x700)).reason == "kernel panic"
    assert page.mmio_write(SHUTDOWN, store(0x300)).reason == "halted"


def test_notify_of_a_string_in_ram_is_early_console(page):
    page.memory.write(0x5000, b"early boot\n\0junk")
    assert page.mmio_write(NOTIFY, store(0x5000)) is None
    assert page.console_out.data == b"early boot\n"
    assert page.errors == []


def test_early_console_is_bounded(page):
    page.memory.write(0x6000, b"A" * 1000)
    page.mmio_write(NOTIFY, store(0x6000))
    assert page.console_out.data == b"A" * EARLY_CONSOLE_MAX


def test_notify_of_a_registered_address_goes_to_its_target(page):
    seen = []
    page.notify_targets[RAM_TOP] = seen.append
    page.mmio_write(NOTIFY, store(RAM_TOP))
    assert seen == [RAM_TOP]


@pytest.mark.parametrize("addr", [RAM_TOP + 8, 0xFFFF_FFFF_0000, 1 << 63])
def test_notify_of_anything_else_is_a_reported_guest_error(page, addr):
    assert page.mmio_write(NOTIFY, store(addr)) is None
    assert len(page.errors) == 1 and f"0x{addr:x}" in page.errors[0]
    assert page.console_out.data == b""


@pytest.mark.parametrize("gpa, data", [(NOTIFY, b"\x01\x02\x03\x04"), (NOTIFY + 0x10, store(1)),
                                       (SHUTDOWN + 1, b"\x00")])
def test_stores_that_are_not_hypercalls_are_reported(page, gpa, data):
    assert page.mmio_write(gpa, data) is None
    assert len(page.errors) == 1 and "not a hypercall" in page.errors[0]


def test_trace_descriptions(page):
    page.kick_names[0x2000_0000] = "block0/requests"
    assert page.describe(SHUTDOWN, store(5)) == "LHCALL_SHUTDOWN(status 5)"
    assert page.describe(SHUTDOWN, store(0x400)) == "LHCALL_SHUTDOWN(panic)"
    assert page.describe(SHUTDOWN, store(0x200)) == "LHCALL_SHUTDOWN(halt)"
    assert page.describe(NOTIFY, store(0x5000)) == "LHCALL_NOTIFY(0x5000) early console"
    assert "kick block0/requests" in page.describe(NOTIFY, store(0x2000_0000))
