"""Just enough of the PC keyboard controller for a guest to reset the machine.

Writing 0xFE to the command port (0x64) pulses the CPU reset line: it is
how Linux (`reboot=k`, and its fallback order) and many small kernels ask
for a reboot.  There is no keyboard: status reads say "nothing to read,
ready for a command", so a guest probing for one gives up quickly.
"""

from typing import Callable

from pylguest.run.stop import ExitResult, Stop

BASE_PORT = 0x60
PORT_COUNT = 5                 # 0x60 data .. 0x64 command/status
COMMAND_OFFSET = 0x64 - BASE_PORT
REGISTER_NAMES = ("data", "", "", "", "command/status")
CMD_PULSE_RESET = 0xFE
STATUS_IDLE = 0x00


class I8042:
    def __init__(self, on_reset: Callable[[], Stop]):
        self.on_reset = on_reset        # the Stop that a reset ends the run with

    def io_in(self, offset: int) -> int:
        return STATUS_IDLE

    def io_out(self, offset: int, value: int) -> ExitResult:
        if offset == COMMAND_OFFSET and value == CMD_PULSE_RESET:
            return self.on_reset()
        return None
