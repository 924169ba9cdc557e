"""The hypercall page: how a guest calls the launcher (docs/abi.md section 4).

lguest guests made hypercalls with a trapping instruction; under KVM a
`vmcall` never reaches userspace, so here a hypercall is an 8-byte store to
a page of guest-physical space with no memory behind it (0xFEB00000).  The
store exits to us as KVM_EXIT_MMIO, and the offset says which call:

    0x00  LHCALL_NOTIFY(addr)     "look at this address"
    0x08  LHCALL_SHUTDOWN(value)  bits 0-7 exit status; bit 8: reboot;
                                  bit 9: halted; bit 10: kernel panic

Bits 9 and 10 are pylguest's additions to lguest's ABI (docs/abi.md section 4): the Linux
driver (guests/linux/lguest_device.c) sets them from its halt and panic
hooks, so that neither is taken for an exit status.

LHCALL_NOTIFY means what it meant to the seed driver and the lguest
launcher: the address of a device descriptor (a status change) or of a
vring (a kick) goes to the device bus, which registers those addresses in
`notify_targets`; vring kicks normally never get here at all, since each
has an ioeventfd that the kernel completes without exiting.  Any other
address below the top of RAM is an early-console string.  Anything else is
a guest error: reported, and the guest goes on.
"""

import struct
from typing import Callable

from pylguest import layout
from pylguest.run import stop
from pylguest.run.stop import ExitResult, Stop

LHCALL_NOTIFY = 0x00
LHCALL_SHUTDOWN = 0x08
SHUTDOWN_REBOOT = 1 << 8
SHUTDOWN_HALT = 1 << 9
SHUTDOWN_PANIC = 1 << 10
EARLY_CONSOLE_MAX = 256        # an early-console string is at most this long


# The bits above the status, the strongest first: a panic during a halt is
# a panic.  Each names the Stop it becomes.
SHUTDOWN_KINDS = (
    (SHUTDOWN_PANIC, "panic"),
    (SHUTDOWN_HALT, "halt"),
    (SHUTDOWN_REBOOT, "reboot"),
)


def shutdown_kind(value):
    """"panic", "halt", "reboot", or None: a power-off with a status."""
    return next((kind for bit, kind in SHUTDOWN_KINDS if value & bit), None)


def shutdown_text(value):
    return shutdown_kind(value) or f"status {value & 0xFF}"


class HypercallPage:
    base = layout.HYPERCALL_PAGE
    size = layout.HYPERCALL_PAGE_SIZE

    def __init__(self, memory, ram_top, console, report, panic_message=lambda: ""):
        self.memory = memory
        self.panic_message = panic_message   # () -> what the kernel said as it panicked
        self.ram_top = ram_top
        self.console = console          # has .write(bytes)
        self.report = report            # report(message): a guest error
        self.notify_targets = {}        # guest address -> callable(addr)
        self.notify_names = {}          # guest address -> "block0 status", for --trace
        self.kick_names = {}            # vring address -> "block0/requests", for --trace

    def register_notify(self, addr: int, name: str,
                        target: Callable[[int], ExitResult]) -> None:
        """LHCALL_NOTIFY(addr) calls target(addr); `name` is for --trace."""
        self.notify_targets[addr] = target
        self.notify_names[addr] = name

    def register_kick(self, addr: int, name: str) -> None:
        """A vring at addr: its kicks go to an ioeventfd, but --trace names it."""
        self.kick_names[addr] = name

    def contains(self, gpa):
        return self.base <= gpa < self.base + self.size

    def mmio_write(self, gpa: int, data: bytes) -> ExitResult:
        """A store to the page; returns a Stop, or None to keep running."""
        offset = gpa - self.base
        if len(data) != 8 or offset not in (LHCALL_NOTIFY, LHCALL_SHUTDOWN):
            self.report(f"hypercall page: {len(data)}-byte store at offset 0x{offset:x} "
                        "is not a hypercall (8-byte stores at 0x0 and 0x8 are)")
            return None
        (value,) = struct.unpack("<Q", data)
        if offset == LHCALL_SHUTDOWN:
            return self.shutdown(value)
        return self.notify(value)

    def shutdown(self, value: int) -> Stop:
        kind = shutdown_kind(value)
        if kind == "panic":
            return stop.kernel_panic(self.panic_message() or "the guest kernel panicked")
        if kind == "halt":
            return stop.halted()
        if kind == "reboot":
            return stop.reboot("LHCALL_SHUTDOWN with the reboot bit")
        return stop.shutdown(value & 0xFF)

    def notify(self, addr: int) -> ExitResult:
        target = self.notify_targets.get(addr)
        if target is not None:
            return target(addr)
        if addr < self.ram_top and self.memory.contains(addr):
            text = self.memory.read_cstring(addr, EARLY_CONSOLE_MAX)
            self.console.write(text)
            return None
        self.report(f"LHCALL_NOTIFY(0x{addr:x}): neither a device, a vring "
                    "nor an early-console string in guest RAM")
        return None

    def describe(self, gpa, data):
        """A phrase for --trace."""
        offset = gpa - self.base
        if len(data) == 8 and offset in (LHCALL_NOTIFY, LHCALL_SHUTDOWN):
            (value,) = struct.unpack("<Q", data)
            if offset == LHCALL_SHUTDOWN:
                return f"LHCALL_SHUTDOWN({shutdown_text(value)})"
            name = self.notify_names.get(value)
            if name:
                return f"LHCALL_NOTIFY(0x{value:x}) {name}"
            if value in self.kick_names:
                # Only when the ioeventfd missed it (not an 8-byte store).
                return f"LHCALL_NOTIFY(0x{value:x}) kick {self.kick_names[value]} (exited!)"
            if value < self.ram_top:
                return f"LHCALL_NOTIFY(0x{value:x}) early console"
            return f"LHCALL_NOTIFY(0x{value:x}) bad address"
        return f"hypercall page +0x{offset:x} ({len(data)} bytes)"
