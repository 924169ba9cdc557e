"""The port I/O bus: which emulated device answers `in` and `out` on a port.

Only what the kernel does not already emulate reaches us: the PIC, PIT and
IOAPIC are in-kernel.  A port nobody claims reads as all ones (a floating
ISA bus, which is how Linux discovers that COM2 is absent) and ignores
writes.

Given the run loop's fast path (run/fastpath.py), the bus marks every port
registered here claimed in its table, so C answers only the ports nobody
claims.  The machine attaches the one device that lets C answer some of
its own registers (the UART) to the same table.
"""

from typing import NamedTuple, Optional, Protocol

from pylguest.run.fastpath import FastPath
from pylguest.run.stop import ExitResult


class PortDevice(Protocol):
    """A device on the port bus; `offset` is from the device's base port."""

    def io_in(self, offset: int) -> int: ...

    def io_out(self, offset: int, value: int) -> ExitResult: ...


class PortRange(NamedTuple):
    base: int
    count: int
    name: str
    device: PortDevice
    register_names: tuple = ()

    def register_name(self, offset):
        if offset < len(self.register_names) and self.register_names[offset]:
            return f"{self.name}.{self.register_names[offset]}"
        return f"{self.name}+{offset}"


class PortBus:
    """Ports to devices; `fast`, the fast path's table to publish claims
    to, or None when the run loop has no fast path (--trace)."""

    def __init__(self, fast: Optional[FastPath] = None):
        self._by_port = {}
        self.fast = fast

    def register(self, base: int, count: int, name: str, device: PortDevice,
                 register_names=()) -> None:
        entry = PortRange(base, count, name, device, tuple(register_names))
        for port in range(base, base + count):
            if port in self._by_port:
                raise ValueError(f"port 0x{port:x} claimed twice")
            self._by_port[port] = entry
            if self.fast is not None:
                self.fast.claim(port)

    def io_in(self, port: int, size: int) -> int:
        entry = self._by_port.get(port)
        if entry is None:
            return (1 << (8 * size)) - 1
        return entry.device.io_in(port - entry.base)

    def io_out(self, port: int, size: int, value: int) -> ExitResult:
        entry = self._by_port.get(port)
        if entry is None:
            return None
        return entry.device.io_out(port - entry.base, value)

    def describe(self, port):
        entry = self._by_port.get(port)
        return entry.register_name(port - entry.base) if entry else "unclaimed"
