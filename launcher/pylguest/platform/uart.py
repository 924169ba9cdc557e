"""The 8250 UART on COM1 (port 0x3f8, IRQ 4): the serial port every PC kernel knows.

Linux's `console=ttyS0`, a boot loader and our teaching guests all talk to
this chip, so it is the first device a guest can print on and the one a
person types into.  We emulate what the programmer sees of a 16550A:

    offset  read                    write                 with LCR.DLAB set
    0       RBR  received byte      THR  byte to send     DLL divisor, low
    1       IER  interrupt enable   IER                   DLM divisor, high
    2       IIR  interrupt id       FCR  FIFO control
    3       LCR  line control       LCR
    4       MCR  modem control      MCR
    5       LSR  line status        (ignored)
    6       MSR  modem status       (ignored)
    7       SCR  scratch            SCR

There is no wire and no baud rate.  A byte written to THR leaves at once
(to ConsoleOutput), so THR is always empty again by the next instruction:
LSR always says THRE|TEMT, and the "THR empty" interrupt is due again right
after every write.  The divisor is kept only so the guest reads back what
it wrote.  Input arrives from the host's input thread through `receive()`
into a queue that stands for the receive FIFO; it is deeper than the
chip's 16 bytes (RX_QUEUE_LIMIT) and overruns only beyond that.

Interrupts.  The chip has four sources; IIR names the most urgent enabled
one (receiver line status > received data > THR empty > modem status).
On a PC the chip's interrupt output reaches the PIC only while MCR.OUT2 is
set (OUT2 enables a bus driver on the board), and never in loopback mode,
which forces the OUT2 pin off.  Linux sets OUT2 when it uses the IRQ, and
so do our guests; a guest that forgets gets no interrupt, as on hardware.
IRQ 4 is an edge-triggered ISA line: we report the line's level through
`set_irq` whenever it changes, and the interrupt controller sees the edges.

Threads.  The vCPU thread calls io_in/io_out; the input thread calls
receive().  One lock, `_lock`, guards the registers.  `set_irq` is never
called with `_lock` held (it is an ioctl, and a callback that came back
into the UART must not deadlock); a second lock, `_line_lock`, is held
around computing the level and calling set_irq, so two threads can never
deliver their level changes in the wrong order and leave the line low
while an interrupt is pending.  Order: `_line_lock` before `_lock`.

The fast path.  The run loop answers the two registers a console uses per
character -- THR writes and LSR reads -- in C (run/fastpath.py), but only
while our model would answer them the same way, and we say when that is
(`_publish`, after every change, under `_lock`):

- a THR write is nothing but output while DLAB is clear (offset 0 is not
  DLL), loopback is off (the byte is not queued as input) and IER.THRI is
  off: then the "THR empty" source it re-arms cannot be seen (IIR reports
  it only with THRI on, and turning THRI on re-arms it anyway) and the IRQ
  line cannot change;
- an LSR read changes nothing unless an error bit is waiting to be
  cleared, so while none is, C returns the value published here, and DR
  follows the input queue as the input thread fills it.
"""

import collections
import threading
from typing import Callable

from pylguest.hostconsole.output import ConsoleOutput

__all__ = ["Uart8250", "ConsoleOutput", "COM1_PORT", "COM1_IRQ", "PORT_COUNT"]

COM1_PORT = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8

# Register offsets from the base port.
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
# For --trace: a register's name by offset (reads and writes share a port).
REGISTER_NAMES = ("THR/RBR", "IER", "IIR/FCR", "LCR", "MCR", "LSR", "MSR", "SCR")

IER_RDI = 0x01           # interrupt when received data is available
IER_THRI = 0x02          # interrupt when the transmit holding register is empty
IER_RLSI = 0x04          # interrupt on a receiver line status error
IER_MSI = 0x08           # interrupt on a modem status change
IER_MASK = 0x0F          # the upper bits read as 0 (Linux's probe checks)

IIR_NO_INT = 0x01        # bit 0 set: nothing pending
IIR_RLSI = 0x06          # the interrupt ids, most urgent first
IIR_RDI = 0x04
IIR_THRI = 0x02
IIR_FIFO_ENABLED = 0xC0  # bits 7:6 say "16550A with its FIFOs on"

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_TRIGGER_MASK = 0xC0

LCR_DLAB = 0x80          # divisor latch access: offsets 0 and 1 become DLL/DLM

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08          # on a PC: connects the interrupt output to the PIC
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01            # data ready: RBR holds a byte
LSR_OE = 0x02            # overrun: input was lost (cleared by reading LSR)
LSR_THRE = 0x20          # THR empty
LSR_TEMT = 0x40          # transmitter empty

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# Outside loopback, the line is a cable plugged into a ready terminal.
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS
# In loopback the modem outputs are wired back to the inputs.
LOOPBACK_WIRING = ((MCR_RTS, MSR_CTS), (MCR_DTR, MSR_DSR),
                   (MCR_OUT1, MSR_RI), (MCR_OUT2, MSR_DCD))

DEFAULT_DIVISOR = 12     # 9600 baud from the PC's 1.8432 MHz clock
RX_QUEUE_LIMIT = 4096    # bytes of input held for the guest before overrun


class Uart8250:
    def __init__(self, set_irq: Callable[[bool], None], output: ConsoleOutput):
        self._set_irq = set_irq           # drives IRQ 4 (KVM_IRQ_LINE)
        self.output = output              # has write(bytes)
        self._lock = threading.Lock()     # guards every register below
        self._line_lock = threading.Lock()
        self._line = False                # the level set_irq last got
        self.overruns = 0                 # input bytes dropped, ever
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.fcr = 0
        self.scr = 0
        self.divisor = DEFAULT_DIVISOR
        self.line_errors = 0              # LSR error bits not read yet
        self.thr_interrupt = False        # the chip's latched "THR empty" source
        self.rx = collections.deque()     # the receive FIFO, oldest first
        self._fast = None                 # the port bus's fast path, once attached

    # -- the three entry points --------------------------------------------------

    def io_in(self, offset: int) -> int:
        """A guest `in` from base + offset (the vCPU thread)."""
        with self._lock:
            value = self._read_register(offset)
            self._publish()
        self._update_irq()                # reading RBR, IIR or LSR can end an interrupt
        return value

    def io_out(self, offset: int, value: int) -> None:
        """A guest `out` to base + offset (the vCPU thread)."""
        with self._lock:
            sent = self._write_register(offset, value & 0xFF)
            self._publish()
        if sent:
            self.output.write(sent)       # outside our lock: the fd may be slow
        self._update_irq()

    def receive(self, data: bytes) -> None:
        """Bytes typed by the host's user (the input thread)."""
        with self._lock:
            self._queue_input(data)
            self._publish()
        self._update_irq()

    def attach_fast(self, fast, base: int) -> None:
        """The port bus's fast path: C may answer THR and LSR at `base` (module doc)."""
        with self._lock:
            self._fast = fast
            fast.attach_uart(base, self.output.write)
            self._publish()

    @property
    def pending_input(self) -> int:
        """How many received bytes the guest has not read yet."""
        with self._lock:
            return len(self.rx)

    # -- reads -----------------------------------------------------------------------

    def _read_register(self, offset):
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            return self.divisor & 0xFF if dlab else self._read_rbr()
        if offset == IER:
            return self.divisor >> 8 if dlab else self.ier
        if offset == IIR_FCR:
            return self._read_iir()
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            return self._modem_status()
        if offset == SCR:
            return self.scr
        raise ValueError(f"UART register offset {offset} is outside 0-7")

    def _read_rbr(self):
        return self.rx.popleft() if self.rx else 0

    def _read_iir(self):
        source = self._pending_source()
        # Reading IIR is how a driver acknowledges "THR empty"; the other
        # sources last until their cause is gone (read LSR, drain RBR).
        if source == IIR_THRI:
            self.thr_interrupt = False
        iir = IIR_NO_INT if source is None else source
        if self.fcr & FCR_ENABLE_FIFO:
            iir |= IIR_FIFO_ENABLED
        return iir

    def _read_lsr(self):
        lsr = self._line_status()
        self.line_errors = 0              # error bits clear when read
        return lsr

    def _line_status(self):
        lsr = LSR_THRE | LSR_TEMT | self.line_errors
        if self.rx:
            lsr |= LSR_DR
        return lsr

    def _modem_status(self):
        if self.mcr & MCR_LOOP:
            # Linux's probe sets LOOP|OUT2|RTS and expects to read DCD|CTS.
            return sum(msr for mcr, msr in LOOPBACK_WIRING if self.mcr & mcr)
        # No delta bits: our line never changes, so no modem status interrupt.
        return MSR_CONNECTED

    # -- writes ----------------------------------------------------------------------

    def _write_register(self, offset, value):
        """Change a register; return the bytes to send, if any."""
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if not dlab:
                return self._transmit(value)
            self.divisor = (self.divisor & 0xFF00) | value
        elif offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | value << 8
            else:
                self._write_ier(value)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & MCR_MASK
        elif offset == SCR:
            self.scr = value
        elif not LSR <= offset <= MSR:    # LSR, MSR: factory test writes, ignored
            raise ValueError(f"UART register offset {offset} is outside 0-7")
        return None

    def _transmit(self, value):
        # The byte leaves at once, so THR is empty again and "THR empty" is
        # due again: Linux's interrupt-driven transmit refills THR from that
        # interrupt, and stops it by clearing IER.THRI when it has no more.
        self.thr_interrupt = True
        if self.mcr & MCR_LOOP:           # loopback: the byte comes back to us
            self._queue_input(bytes((value,)))
            return None
        return bytes((value,))

    def _write_ier(self, value):
        value &= IER_MASK
        turned_on = value & ~self.ier
        self.ier = value
        # Enabling THRI while THR is empty raises "THR empty" again, even if
        # an IIR read had acknowledged it.  Linux depends on this edge: its
        # start_tx only sets THRI, and its startup test reads IIR twice
        # around toggling THRI to decide whether the UART is buggy.
        if turned_on & IER_THRI:
            self.thr_interrupt = True

    def _write_fcr(self, value):
        fifo_toggled = (value ^ self.fcr) & FCR_ENABLE_FIFO
        # As on the chip, turning the FIFOs on or off, or asking for it,
        # empties the receive FIFO (Linux does so when it opens the port).
        if fifo_toggled or value & FCR_CLEAR_RCVR:
            self.rx.clear()
        self.fcr = value & (FCR_ENABLE_FIFO | FCR_TRIGGER_MASK)

    # -- snapshots --------------------------------------------------------------

    def save_state(self) -> dict:
        """The registers, the receive FIFO and the line level, for a
        snapshot (snapshot/manifest.py's `uart`)."""
        with self._lock:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "fcr": self.fcr,
                    "scr": self.scr, "divisor": self.divisor, "line_errors": self.line_errors,
                    "thr_interrupt": self.thr_interrupt, "line": self._line,
                    "rx": bytes(self.rx).hex()}

    def restore_state(self, saved: dict) -> None:
        """Take back save_state()'s values (checked by the manifest's
        reader).  The line level is our record of what KVM's interrupt
        controller was last told, which the controller's restored state
        already holds: it is set here, not driven again."""
        with self._lock:
            for name in ("ier", "lcr", "mcr", "fcr", "scr", "divisor", "line_errors",
                         "thr_interrupt"):
                setattr(self, name, saved[name])
            self._line = saved["line"]
            self.rx = collections.deque(bytes.fromhex(saved["rx"])[:RX_QUEUE_LIMIT])
            self._publish()

    def _publish(self):
        """Tell the fast path what it may answer now (holding `_lock`)."""
        if self._fast is not None:
            thr_plain = not (self.lcr & LCR_DLAB or self.mcr & MCR_LOOP or self.ier & IER_THRI)
            self._fast.publish_uart(thr_plain, 0 if self.line_errors else self._line_status())

    # -- input and interrupts --------------------------------------------------------

    def _queue_input(self, data):
        room = RX_QUEUE_LIMIT - len(self.rx)
        self.rx.extend(data[:room])
        if len(data) > room:
            self.overruns += len(data) - room
            self.line_errors |= LSR_OE

    def _pending_source(self):
        """The IIR id of the most urgent enabled interrupt, or None."""
        if self.ier & IER_RLSI and self.line_errors:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_interrupt:
            return IIR_THRI
        return None                       # modem status never changes (see MSR)

    def _irq_level(self):
        if not self.mcr & MCR_OUT2 or self.mcr & MCR_LOOP:
            return False                  # the PC board's gate is closed
        return self._pending_source() is not None

    def _update_irq(self):
        """Tell set_irq about a new line level, in the order levels change."""
        with self._line_lock:
            with self._lock:
                level = self._irq_level()
                if level == self._line:
                    return
                self._line = level
            self._set_irq(level)
