"""The machine: one VM, one vCPU, guest memory, and the run loop.

This is where the pieces meet, in the order a reader meets them in a
hypervisor book:

  1. open KVM, create the VM and its in-kernel PIC, IOAPIC and PIT;
  2. allocate guest memory and register it with KVM;
  3. load the kernel, initrd, command line and boot_params (boot/);
  4. create the vCPU in 64-bit mode at the kernel's entry;
  5. attach the devices we emulate: the 8250 UART, the i8042's reset line,
     the hypercall page;
  6. run: KVM_RUN until the guest does something only we can answer, answer
     it, repeat, until something ends the run (stop.py says how it can).
"""

import os
import signal
import threading
from dataclasses import dataclass, field

from pylguest import layout, stop
from pylguest.platform import i8042, uart
from pylguest._kvm import ffi, lib
from pylguest.boot import cmdline, loader, x86
from pylguest.boot.bootparams import build_boot_params
from pylguest.boot.command import command_archive
from pylguest.boot.e820 import build_e820
from pylguest.boot.initrd import append_archive, decompress_initrd, is_initramfs
from pylguest.boot.mptable import MPTABLE_ADDR, build_mptable
from pylguest.lguest.bus import LguestBus
from pylguest.hostconsole.output import ConsoleOutput
from pylguest.devices.console import ConsoleDevice
from pylguest.devices.options import create_devices
from pylguest.emulate import complete_refused_instruction, instruction_bytes
from pylguest.errors import UsageError
from pylguest.hostfiles import read_user_file
from pylguest.lguest.hypercall import HypercallPage
from pylguest.kvm import Kvm, detect_kvm_kind
from pylguest.kvm.cpuid import guest_cpuid
from pylguest.memory import GuestMemory, plan_regions
from pylguest.platform.ports import PortBus
from pylguest.report import GuestErrorLog, say
from pylguest.hostconsole.terminal import InputReader
from pylguest.trace import Tracer

MiB = 1 << 20
DEFAULT_MEM = 256 * MiB

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Said once when Linux starts on an emulating KVM, so that a kernel that is
# quiet for many seconds does not look dead (docs/linux.md).
EMULATING_KVM_NOTICE = (
    "pylguest: this KVM ({module}) emulates guest kernel mode in software, so Linux "
    "needs about 15-30 s here to reach user space (under a second on hardware KVM)")


@dataclass
class MachineConfig:
    """Everything `pylguest run` can be asked for."""
    kernel: str
    initrd: str = None
    cmdline: str = None
    mem: int = DEFAULT_MEM
    timeout: float = None
    trace: bool = False
    stats: bool = False                # print exit counts when the run ends
    decompress: str = "auto"           # "auto", "host" or "guest"
    console_fd: int = 1                # where guest console output goes
    console_tee: object = None         # a callable(bytes) that also sees it
    input_fd: int = None               # where console input comes from (None: none)
    block: list = field(default_factory=list)     # "PATH[,ro]" each
    net: list = field(default_factory=list)       # "tap:NAME[,mac=...]" each
    rng: bool = False
    console: str = None                # None, "stdio" or "socket:PATH"
    command: list = None               # `-- CMD ARG...`: run by the initramfs's init


class Machine:
    def __init__(self, config):
        self.config = config
        self.exit_counts = {}              # KVM exit reason (None: EINTR) -> count
        # The one way a run is asked to end (stop.py): from any thread, or
        # from a stop signal, which the C handler records.
        self.stopping = stop.StopRequest(on_request=lambda: lib.pyl_request_stop(0),
                                         signal_stop=self._signal_stop)
        if not layout.MIN_MEM <= config.mem <= layout.MAX_MEM:
            raise UsageError(f"--mem {config.mem // MiB} MiB is outside "
                             f"{layout.MIN_MEM // MiB} MiB .. {layout.MAX_MEM // MiB} MiB")
        kernel_image = read_user_file(config.kernel, "kernel", limit=config.mem)
        initrd_image = (read_user_file(config.initrd, "initrd", limit=config.mem)
                        if config.initrd else None)
        self.tracer = Tracer() if config.trace else None
        self.kvm = Kvm()
        self.kvm.require_capabilities()
        self.kvm_kind = detect_kvm_kind()
        self.console = ConsoleOutput(config.console_fd, tee=config.console_tee,
                                     stopping=self.stopping)
        # Guest errors are rate-limited; console output written before one
        # is shown first (briefly: a stuck terminal must not stall us).
        self.guest_errors = GuestErrorLog(before_write=lambda: self.console.flush(timeout=0.1))
        devices, self.socket_console = create_devices(config, self.console)
        self.bus = LguestBus(devices, self.stopping)
        self._create_vm()
        self._create_memory()
        self._boot(kernel_image, initrd_image)
        self._create_vcpu()
        self._attach_devices()

    # -- 1 and 2: the VM and its memory ------------------------------------

    def _create_vm(self):
        self.vm = self.kvm.create_vm()
        self.vm.create_irqchip()
        self.vm.create_pit()

    def _create_memory(self):
        self.device_area_size = self.bus.area_size   # the device page, then the vrings
        self.regions = plan_regions(self.config.mem, self.device_area_size,
                                    layout.LOW_RAM_LIMIT, layout.HIGH_RAM_BASE)
        self.memory = GuestMemory(self.regions)
        for slot, region in enumerate(self.regions):
            self.vm.set_memory_region(slot, region.gpa, region.size,
                                      self.memory.host_address + region.host_offset)
        self.e820 = build_e820(self.regions, self.device_area_size)
        self.ram_top = self.regions[-1].end - self.device_area_size
        self.low_ram_top = min(self.ram_top, layout.LOW_RAM_LIMIT)

    # -- 3: the kernel, its command line and boot_params --------------------

    def _host_decompress(self):
        if self.config.decompress == "auto":
            return self.kvm_kind.emulating
        return self.config.decompress == "host"

    def _boot(self, kernel_image, initrd_image):
        config = self.config
        self.kernel = loader.load_kernel(self.memory, self.low_ram_top, kernel_image,
                                         config.kernel, self._host_decompress())
        if config.command is not None and not self.kernel.linux:
            raise UsageError(f"{config.kernel} is not Linux: only a Linux kernel with "
                             "pylguest's initramfs runs a command (-- CMD)")
        initrd = None
        initrd_image = self._prepare_initrd(initrd_image)
        if initrd_image is not None:
            initrd = loader.load_initrd(self.memory, self.low_ram_top, initrd_image,
                                        config.initrd, self.kernel)
        self.cmdline = cmdline.compose(config.cmdline, linux=self.kernel.linux,
                                       emulating=self.kvm_kind.emulating,
                                       command=config.command, device_page=self.ram_top)
        # The command line is bytes to the kernel: the user's non-UTF-8 bytes
        # (which Python's argv holds as surrogate escapes) pass unchanged.
        encoded = os.fsencode(self.cmdline)
        if b"\0" in encoded:
            raise UsageError("the command line cannot hold a NUL byte")
        limit = loader.cmdline_limit(self.kernel)
        if len(encoded) > limit:
            raise UsageError(f"the command line is {len(encoded)} bytes; "
                             f"this kernel accepts at most {limit}")
        self.memory.write(layout.CMDLINE_ADDR, encoded + b"\0")
        self.memory.write(layout.BOOT_PARAMS_ADDR,
                          build_boot_params(self.kernel.setup_header, self.e820,
                                            layout.CMDLINE_ADDR, initrd))
        self.memory.write(layout.GDT_ADDR, x86.build_gdt())
        # The MP table: one CPU, the ISA bus, the IOAPIC, ISA IRQ n on pin
        # n.  Linux then takes our devices' interrupts through the IOAPIC,
        # and finds the table early in its search of the BIOS areas.
        self.memory.write(MPTABLE_ADDR, build_mptable())
        top = self.regions[-1].end
        tables = x86.build_page_tables(layout.PAGE_TABLES_ADDR, top)
        assert layout.PAGE_TABLES_ADDR + len(tables) <= layout.PAGE_TABLES_END
        self.memory.write(layout.PAGE_TABLES_ADDR, tables)

    def _prepare_initrd(self, image):
        """The initrd as the kernel will read it: unpacked here when the
        kernel is (boot/initrd.py), with the command's archive after it."""
        config = self.config
        if image is None:
            if config.command is not None:
                raise UsageError("a command (-- CMD) needs --initrd: pylguest's initramfs "
                                 "runs it (make linux builds one)")
            return None
        initramfs = is_initramfs(image)
        if initramfs and self._host_decompress():
            unpacked = decompress_initrd(image, config.initrd)
            if self.tracer and len(unpacked) != len(image):
                self.tracer.event(f"initrd: unpacked on the host, {len(image)} -> "
                                  f"{len(unpacked)} bytes")
            image = unpacked
        if config.command is not None:
            if not initramfs:
                raise UsageError(f"initrd {config.initrd} is not a cpio initramfs, so it "
                                 "cannot carry a command (-- CMD)")
            image = append_archive(image, command_archive(config.command))
        return image

    # -- 4: the vCPU ---------------------------------------------------------

    def _create_vcpu(self):
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(guest_cpuid(self.kvm, self.kvm_kind))
        sregs = self.vcpu.get_sregs()
        x86.set_long_mode(sregs, layout.PAGE_TABLES_ADDR)
        self.vcpu.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        x86.set_entry_registers(regs, self.kernel.entry, layout.BOOT_PARAMS_ADDR)
        self.vcpu.set_regs(regs)

    # -- 5: the devices we emulate --------------------------------------------

    def _attach_devices(self):
        self.uart = uart.Uart8250(lambda level: self.vm.irq_line(uart.COM1_IRQ, level),
                                  self.console)
        self.ports = PortBus()
        self.ports.register(uart.COM1_PORT, uart.PORT_COUNT, "uart", self.uart,
                            uart.REGISTER_NAMES)
        self.ports.register(i8042.BASE_PORT, i8042.PORT_COUNT, "i8042",
                            i8042.I8042(lambda: stop.reboot("i8042 reset (0xFE to port 0x64)")),
                            i8042.REGISTER_NAMES)
        self.hypercalls = HypercallPage(self.memory, self.ram_top, self.console,
                                        self.report_guest_error, self._panic_message)
        self.bus.install(self.memory, self.ram_top, self.vm, self.hypercalls,
                         self.report_guest_error, self.tracer.line if self.tracer else None)
        self.virtio_console = next((d for d in self.bus.devices
                                    if isinstance(d, ConsoleDevice)), None)
        if self.socket_console:
            self.socket_console.start(self.virtio_console.receive)

    def console_input(self, data):
        """Keyboard input goes to the virtio console once the guest's driver
        has started it (and it is on stdio), to the UART until then."""
        console = self.virtio_console
        if console is not None and not self.socket_console and console.accepting_input:
            console.receive(data)
        else:
            self.uart.receive(data)

    def _panic_message(self):
        """The line in which Linux said why it panicked, if we saw it."""
        return stop.panic_reason(self.console.tail())

    def report_guest_error(self, message):
        """A guest did something wrong: say so (rate-limited); it keeps running."""
        self.guest_errors.report(message)

    # -- 6: the run loop -------------------------------------------------------

    def request_stop(self, reason):
        """Stop the run from any thread (a timer, the input thread, the API)."""
        self.stopping.request(reason)

    @staticmethod
    def _signal_stop():
        """The Stop for a stop signal the C handler caught, if one came."""
        signo = lib.pyl_stop_signal()
        return stop.signal_stop(signo, signal.Signals(signo).name) if signo else None

    def run(self):
        """Run the guest until it stops; return a stop.Stop."""
        signals = ffi.new("int[]", list(STOP_SIGNALS))
        if lib.pyl_arm_stop_signals(self.vcpu.kvm_run, signals, len(STOP_SIGNALS)) < 0:
            raise OSError("cannot install the launcher's signal handlers")
        reader = None
        if self.config.input_fd is not None:
            reader = InputReader(self.config.input_fd, self.console_input,
                                 on_quit=lambda: self.request_stop(stop.user_quit()),
                                 escapes=os.isatty(self.config.input_fd)).start()
        timer = None
        if self.config.timeout:
            timer = threading.Timer(self.config.timeout,
                                    lambda: self.request_stop(stop.timeout(self.config.timeout)))
            timer.daemon = True
            timer.start()
        try:
            if self.kernel.linux and self.kvm_kind.emulating:
                say(EMULATING_KVM_NOTICE.format(module=self.kvm_kind.module))
            if self.tracer:
                self.tracer.event(f"start: {self.kernel.kind}, entry 0x{self.kernel.entry:x}, "
                                  f"KVM {self.kvm_kind.kind}")
            result = self._run_loop()
        finally:
            if timer:
                timer.cancel()
            if reader:
                reader.stop()
            lib.pyl_disarm_stop_signals()
            self.console.flush()
        if self.tracer:
            self.tracer.event(f"stop: {result}")
        if self.config.stats:
            say(f"pylguest: {self.exit_summary()}")
        return result

    def _run_loop(self):
        handlers = {
            lib.KVM_EXIT_IO: self._exit_io,
            lib.KVM_EXIT_MMIO: self._exit_mmio,
            lib.KVM_EXIT_SHUTDOWN: self._exit_triple_fault,
            lib.KVM_EXIT_INTERNAL_ERROR: self._exit_internal_error,
            lib.KVM_EXIT_SYSTEM_EVENT: self._exit_system_event,
            lib.KVM_EXIT_FAIL_ENTRY: self._exit_fail_entry,
            lib.KVM_EXIT_HLT: self._exit_hlt,
            lib.KVM_EXIT_INTR: lambda: None,
        }
        run = self.vcpu.run
        counts = self.exit_counts
        while True:
            reason = run()
            counts[reason] = counts.get(reason, 0) + 1
            if reason is None:
                result = self._interrupted()
            else:
                handler = handlers.get(reason)
                result = handler() if handler else self._exit_unknown(reason)
            if result is not None:
                return result

    def _interrupted(self):
        """KVM_RUN returned EINTR: a stop request or signal, or nothing."""
        return self.stopping.pending()

    def _exit_io(self):
        io = self.vcpu.kvm_run.io
        port, size, count = io.port, io.size, io.count
        data = self.vcpu.io_data()
        if io.direction == lib.KVM_EXIT_IO_OUT:
            if size == 1 and count == 1:          # the common case: one byte out
                if self.tracer:
                    self.tracer.io_out(port, 1, data[0], self.ports.describe(port))
                return self.ports.io_out(port, 1, data[0])
            return self._string_out(port, size, count, data)
        for i in range(count):
            value = self.ports.io_in(port, size)
            data[i * size:(i + 1) * size] = value.to_bytes(size, "little")
            if self.tracer:
                self.tracer.io_in(port, size, value, self.ports.describe(port))
        return None

    def _string_out(self, port, size, count, data):
        """A wider `out`, or `rep outs`: every item, in order."""
        result = None
        for i in range(count):
            value = int.from_bytes(data[i * size:(i + 1) * size], "little")
            if self.tracer:
                self.tracer.io_out(port, size, value, self.ports.describe(port))
            result = self.ports.io_out(port, size, value) or result
        return result

    def _exit_mmio(self):
        mmio = self.vcpu.kvm_run.mmio
        gpa, length = mmio.phys_addr, mmio.len
        data = bytes(ffi.buffer(mmio.data, length))
        if not self.hypercalls.contains(gpa):
            if self.tracer:
                self.tracer.mmio(gpa, mmio.is_write, "unclaimed")
            if not mmio.is_write:
                ffi.buffer(mmio.data, length)[:] = b"\xff" * length
            return None
        if self.tracer:
            self.tracer.mmio(gpa, mmio.is_write, self.hypercalls.describe(gpa, data))
        if mmio.is_write:
            return self.hypercalls.mmio_write(gpa, data)
        ffi.buffer(mmio.data, length)[:] = bytes(length)
        return None

    def exit_summary(self):
        """`--stats`: how many times the guest exited to us, by reason."""
        names = {getattr(lib, n): n[len("KVM_EXIT_"):].lower()
                 for n in dir(lib) if n.startswith("KVM_EXIT_") and not n.startswith("KVM_EXIT_IO_")}
        names[None] = "interrupted"
        parts = [f"{names.get(r, r)} {n}" for r, n in sorted(self.exit_counts.items(),
                                                             key=lambda item: -item[1])]
        return f"exits to userspace: {sum(self.exit_counts.values())} ({', '.join(parts)})"

    def registers_text(self):
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        names = ("rip", "rsp", "rbp", "rflags", "rax", "rbx", "rcx", "rdx",
                 "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
        text = " ".join(f"{n}=0x{getattr(regs, n):x}" for n in names)
        return (f"{text} cr0=0x{sregs.cr0:x} cr2=0x{sregs.cr2:x} cr3=0x{sregs.cr3:x} "
                f"cr4=0x{sregs.cr4:x} efer=0x{sregs.efer:x} cs=0x{sregs.cs.selector:x}")

    def _exit_triple_fault(self):
        return stop.triple_fault(self.registers_text())

    def _exit_internal_error(self):
        kvm_run = self.vcpu.kvm_run
        insn = instruction_bytes(kvm_run)
        name = complete_refused_instruction(self.vcpu, insn) if insn else None
        if name:
            if self.tracer:
                self.tracer.event(f"emulation: completed {name} ({insn.hex(' ')}) for KVM")
            return None
        return stop.launcher_error(
            f"KVM internal error (suberror {kvm_run.internal.suberror}), instruction bytes "
            f"[{insn.hex(' ') or 'unknown'}]: {self.registers_text()}")

    def _exit_system_event(self):
        event = self.vcpu.kvm_run.system_event.type
        if event == lib.KVM_SYSTEM_EVENT_RESET:
            return stop.reboot("system reset")
        return stop.shutdown(0)

    def _exit_fail_entry(self):
        reason = self.vcpu.kvm_run.fail_entry.hardware_entry_failure_reason
        return stop.launcher_error(f"KVM could not enter the guest (hardware reason 0x{reason:x})")

    def _exit_hlt(self):
        # With the in-kernel irqchip, KVM waits for interrupts itself and
        # never gives us a HLT; if it does, the guest halted for good.
        return stop.Stop(stop.EXIT_LAUNCHER_ERROR, "halted", "the guest halted with no way to wake")

    def _exit_unknown(self, reason):
        return stop.launcher_error(f"unhandled KVM exit reason {reason}: {self.registers_text()}")

    def close(self):
        """Release everything, promptly: device threads get a second in all
        (LguestBus.close), and a stopping console a second to drain."""
        stuck = self.bus.close()
        if stuck and self.tracer:
            self.tracer.event(f"close: left {', '.join(stuck)} in a system call")
        if self.socket_console:
            self.socket_console.close()
        self.console.close()
        self.guest_errors.close()
        self.vcpu.close()
        self.memory.close()
        self.vm.close()
        self.kvm.close()
