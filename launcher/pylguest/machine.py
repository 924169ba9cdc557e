"""The machine builder: one VM, one vCPU, guest memory and the devices.

This is where the pieces meet, in the order a reader meets them in a
hypervisor book:

  1. open KVM, create the VM and its in-kernel PIC, IOAPIC and PIT;
  2. allocate guest memory and register it with KVM;
  3. load the kernel and initrd, then the boot setup (boot/setup.py): the
     command line, boot_params, GDT, MP table and page tables;
  4. create the vCPU in 64-bit mode at the kernel's entry;
  5. attach the devices: the 8250 UART and the i8042's reset line on the
     port bus, the hypercall page, the lguest bus and its virtio devices.

A machine can also be built from a snapshot (snapshot/restore.py): steps
1, 2, 4 and 5 as above, with the snapshot's memory mapped copy-on-write in
step 2, and in place of step 3 the state it saved put back.  snapshot()
saves a running machine, at a pause of its vCPU (snapshot/take.py).

Running it is not this file's job: run/loop.py answers the vCPU's exits,
and run/policy.py sets up what else may end a run (signals, --timeout,
console input).  Machine.run() puts the two together.

A construction that fails half-way (a bad image, a command line too long,
a KVM that refuses) releases everything it had opened -- KVM, memory,
threads, image locks -- before the error reaches the caller.
"""

import collections
import os
import time

from pylguest import layout
from pylguest.boot import cmdline, loader
from pylguest.boot.e820 import build_e820
from pylguest.boot.setup import BootSetup, encode_cmdline, set_entry_state, write_boot_memory
from pylguest.devices.console import ConsoleDevice
from pylguest.devices.options import DEVICE_OPTIONS, create_devices
from pylguest.errors import UsageError
from pylguest.hostconsole.output import ConsoleOutput
from pylguest.hostfiles import read_user_file
from pylguest.kvm import Kvm, detect_kvm_kind
from pylguest.kvm.cpuid import guest_cpuid
from pylguest.lguest.bus import LguestBus
from pylguest.lguest.hypercall import HypercallPage
from pylguest.memory import GuestMemory, plan_regions
from pylguest.platform import i8042, uart
from pylguest.platform.ports import PortBus
from pylguest.report import GuestErrorLog, say
from pylguest.run import stop
from pylguest.run.fastpath import FastPath
from pylguest.run.loop import RunLoop
from pylguest.run.policy import request_stop_of_vcpu, signal_stop, supervise, wake_vcpu
from pylguest.run.trace import Tracer

MiB = 1 << 20
DEFAULT_MEM = 256 * MiB

# Said once when Linux starts on an emulating KVM, so that a kernel that is
# quiet for many seconds does not look dead (docs/linux.md).
EMULATING_KVM_NOTICE = (
    "pylguest: this KVM ({module}) emulates guest kernel mode in software, so Linux "
    "needs about 15-30 s here to reach user space (under a second on hardware KVM)")


# Everything `pylguest run` can be asked for: MachineConfig's fields.  The
# devices' fields come from devices/options.py's DEVICE_OPTIONS, one per line
# there (console, block, net, rng, share, root, agent: each the option's value,
# a list for a repeatable one), so a new device adds none here.
_RUN_FIELDS = (
    ("kernel", None),
    ("initrd", None),
    ("cmdline", None),
    ("mem", DEFAULT_MEM),
    ("timeout", None),
    ("trace", False),
    ("stats", False),                  # print exit counts when the run ends
    ("decompress", "auto"),            # "auto", "host" or "guest"
    ("input_fd", None),                # where console input comes from (None: none)
    ("command", None),                 # `-- CMD ARG...`: run by the initramfs's init
    ("virtiofsd", None),               # the virtiofsd to run (None: Debian's)
    ("restore", None),                 # a snapshot directory to start from
    ("disk_writes", "copy"),           # a restore's disk writes: "copy" or "image"
    ("control", None),                 # "fd:N" or a socket path: snapshot requests
)
_FIELDS = _RUN_FIELDS + tuple((o.name, o.default()) for o in DEVICE_OPTIONS)
MachineConfig = collections.namedtuple("MachineConfig", [name for name, _ in _FIELDS],
                                       defaults=[default for _, default in _FIELDS[1:]])
MachineConfig.__doc__ = "Everything `pylguest run` can be asked for (see _RUN_FIELDS)."


CONSOLE_FD = 1                         # guest console output goes to our stdout


class Machine:
    def __init__(self, config: MachineConfig):
        self.config = config
        # Everything close() releases, None until it exists.
        self.kvm = self.console = self.guest_errors = None
        self.devices, self.socket_console, self.bus = [], None, None
        self.agent_channel = self.control = None
        self.vm = self.memory = self.vcpu = None
        self.restored_from = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        config = self.config
        # The one way a run is asked to end (run/stop.py): from any thread, or
        # from a stop signal, which the C handler records.
        self.stopping = stop.StopRequest(on_request=request_stop_of_vcpu,
                                         signal_stop=signal_stop, on_pause=wake_vcpu)
        if config.restore is not None:
            return self._build_restored()
        if not layout.MIN_MEM <= config.mem <= layout.MAX_MEM:
            raise UsageError(f"--mem {config.mem // MiB} MiB is outside "
                             f"{layout.MIN_MEM // MiB} MiB .. {layout.MAX_MEM // MiB} MiB")
        kernel_image = read_user_file(config.kernel, "kernel", limit=config.mem)
        initrd_image = (read_user_file(config.initrd, "initrd", limit=config.mem)
                        if config.initrd else None)
        self._start_kvm()
        (self.devices, self.socket_console, self.agent_channel,
         self.init_words) = create_devices(config, self.console)
        self.bus = LguestBus(self.devices, self.stopping)
        self._create_vm()
        self._create_memory()
        self._boot(kernel_image, initrd_image)
        self._create_vcpu()
        self._attach_devices()
        self._finish()

    def _finish(self):
        self.run_loop = RunLoop(self.vcpu, self.ports, self.hypercalls, self.stopping,
                                self.tracer, fast=self.fast)
        if self.config.control:
            from pylguest.control import ControlChannel
            self.control = ControlChannel(self.config.control, self)

    def _start_kvm(self):
        self.tracer = Tracer() if self.config.trace else None
        self.kvm = Kvm()
        self.kvm.require_capabilities()
        self.kvm_kind = detect_kvm_kind()
        self.console = ConsoleOutput(CONSOLE_FD, stopping=self.stopping)
        # Guest errors are rate-limited, except in a --trace run; console
        # output written before one is shown first (briefly: a stuck
        # terminal must not stall us).
        self.guest_errors = GuestErrorLog(before_write=lambda: self.console.flush(timeout=0.1),
                                          limited=not self.config.trace)

    # -- or all of it from a snapshot ---------------------------------------

    def _build_restored(self):
        """The machine a snapshot saved (snapshot/restore.py, steps 1-6),
        every check done before the vCPU can run."""
        from pylguest.snapshot import restore
        config = self.config
        snapshot = restore.load(config.restore)
        self._start_kvm()
        trace = self.tracer.event if self.tracer else None
        if trace:
            trace(f"restore: {config.restore}: manifest checked")
        restore.check_host(snapshot, self.kvm, self.kvm_kind)
        guest = snapshot.manifest["guest"]
        copies = []
        try:
            devices = restore.device_config(snapshot, config.agent, config.disk_writes, copies)
            self.config = config = config._replace(
                kernel=guest["kernel"], mem=guest["mem"], **devices)
            (self.devices, self.socket_console, self.agent_channel,
             self.init_words) = create_devices(config, self.console)
        finally:
            for copy in copies:          # the devices hold them open: gone at exit
                os.unlink(copy)
        for device in self.devices:
            if copies and getattr(device, "path", None) in copies:
                device.snapshot_refusal = ("it writes to a private copy of its image, "
                                           "which ends with this run")
        self.bus = LguestBus(self.devices, self.stopping)
        self._create_vm()
        self._create_memory(lambda regions, ram_top: restore.check_memory(
            snapshot, regions, ram_top), snapshot.memory_path)
        if trace:
            trace(f"restore: memory {self.memory.size >> 20} MiB mapped copy-on-write from "
                  f"{snapshot.memory_path}")
        self.kernel = restore.SavedKernel(guest["kind"], guest["linux"])
        self.cmdline = None
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(guest_cpuid(self.kvm, self.kvm_kind))
        self._attach_devices(snapshot)
        restore.restore_kvm(snapshot, self.kvm, self.vm, self.vcpu, trace)
        self.uart.restore_state(snapshot.manifest["uart"])
        self.console.write(bytes.fromhex(snapshot.manifest["console_output"]))
        self.bus.start()
        self.bus.serve_all()
        self._start_backends(bytes.fromhex(snapshot.manifest["agent_greeting"]))
        self.restored_from = config.restore
        self._finish()

    # -- 1 and 2: the VM and its memory ------------------------------------

    def _create_vm(self):
        self.vm = self.kvm.create_vm()
        self.vm.create_irqchip()
        self.vm.create_pit()

    def _create_memory(self, check=None, private_file=None):
        """Guest memory for --mem and the device area: fresh, or (restoring)
        `private_file` mapped copy-on-write, once check(regions, ram_top)
        has found the plan to be the snapshot's."""
        self.device_area_size = self.bus.area_size   # the device page, then the vrings
        self.regions = plan_regions(self.config.mem, self.device_area_size,
                                    layout.LOW_RAM_LIMIT, layout.HIGH_RAM_BASE)
        self.ram_top = self.regions[-1].end - self.device_area_size
        self.low_ram_top = min(self.ram_top, layout.LOW_RAM_LIMIT)
        if check is not None:
            check(self.regions, self.ram_top)
        self.memory = GuestMemory(self.regions, private_file)
        for slot, region in enumerate(self.regions):
            self.vm.set_memory_region(slot, region.gpa, region.size,
                                      self.memory.host_address + region.host_offset)
        self.e820 = build_e820(self.regions, self.device_area_size)

    # -- 3: the kernel, its initrd, and the boot setup ----------------------

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
        agent_port = None
        if self.agent_channel:
            from pylguest.devices.agent_port import NAME as agent_port
        self.cmdline = cmdline.compose(config.cmdline, linux=self.kernel.linux,
                                       emulating=self.kvm_kind.emulating,
                                       command=config.command, device_page=self.ram_top,
                                       agent_port=agent_port, init_words=self.init_words)
        write_boot_memory(self.memory, BootSetup(
            kernel=self.kernel, cmdline=encode_cmdline(self.cmdline, self.kernel),
            initrd=initrd, e820=self.e820, memory_end=self.regions[-1].end))
    def _prepare_initrd(self, image):
        """The initrd as the kernel will read it: unpacked here when the
        kernel is (boot/initrd.py), with the command's archive after it."""
        config = self.config
        if image is None:
            if config.command is not None:
                raise UsageError("a command (-- CMD) needs --initrd: pylguest's initramfs "
                                 "runs it (make linux builds one)")
            return None
        # Imported here, not at the top: a run without --initrd needs neither.
        from pylguest.boot.command import command_archive
        from pylguest.boot.initrd import append_archive, decompress_initrd, is_initramfs
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
        set_entry_state(self.vcpu, self.kernel.entry)

    # -- 5: the devices we emulate --------------------------------------------

    def _attach_devices(self, snapshot=None):
        self.uart = uart.Uart8250(lambda level: self.vm.irq_line(uart.COM1_IRQ, level),
                                  self.console)
        # The run loop's fast path: C answers the UART's and the unclaimed
        # ports' exits, unless --trace must see every exit.
        self.fast = None if self.tracer else FastPath()
        self.ports = PortBus(self.fast)
        self.ports.register(uart.COM1_PORT, uart.PORT_COUNT, "uart", self.uart,
                            uart.REGISTER_NAMES)
        if self.fast is not None:
            self.uart.attach_fast(self.fast, uart.COM1_PORT)
        self.ports.register(i8042.BASE_PORT, i8042.PORT_COUNT, "i8042",
                            i8042.I8042(lambda: stop.reboot("i8042 reset (0xFE to port 0x64)")),
                            i8042.REGISTER_NAMES)
        self.hypercalls = HypercallPage(self.memory, self.ram_top, self.console,
                                        self.report_guest_error, self._panic_message)
        trace = self.tracer.line if self.tracer else None
        self.bus.install(self.memory, self.ram_top, self.vm, self.hypercalls,
                         self.report_guest_error, trace, fresh=snapshot is None)
        if snapshot is not None:
            from pylguest.snapshot.restore import restore_devices
            restore_devices(snapshot, self.bus, trace)
        consoles = [d for d in self.devices if isinstance(d, ConsoleDevice)]
        self.virtio_console = next((d for d in consoles if d.name == "console0"), None)
        if snapshot is None:
            self._start_backends()

    def _start_backends(self, greeting=b""):
        """Let the outside world in: from now on input reaches devices, and
        they may interrupt the guest (a restore first puts back the
        interrupt controllers, which would forget an interrupt raised
        before)."""
        if self.socket_console:
            self.socket_console.start(self.virtio_console.receive)
        if self.agent_channel:
            agent = next(d for d in self.devices if d.name == "agent0")
            self.agent_channel.start(agent, greeting)

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

    # -- running it -------------------------------------------------------------

    def request_stop(self, reason):
        """Stop the run from any thread (a timer, the input thread, the API)."""
        self.stopping.request(reason)

    # -- snapshots ----------------------------------------------------------------

    SNAPSHOT_TIMEOUT = 120.0       # seconds a snapshot request waits for the vCPU

    def snapshot(self, directory):
        """Save the running machine to `directory` (from any thread but the
        vCPU's): the vCPU pauses, the snapshot is taken on its thread at a
        quiet point (snapshot/take.py), and the guest runs on.  Returns
        the manifest; SnapshotError if it cannot be taken."""
        import threading
        from pylguest.snapshot import SnapshotError, take
        why = take.refusals(self.devices)
        if why:
            raise SnapshotError(why)
        take.prepare(directory)
        done, outcome = threading.Event(), {}

        def action():
            try:
                outcome["manifest"] = take.take(self, directory, self.tracer.event
                                                if self.tracer else None)
            except BaseException as e:          # handed to the asking thread
                outcome["error"] = e
            finally:
                done.set()
        self.stopping.pause(action)
        # The vCPU takes the pause at its next EINTR; a run that ends first
        # never will, so the wait gives up then too.
        deadline = time.monotonic() + self.SNAPSHOT_TIMEOUT
        while not done.wait(stop.StopRequest.SLICE):
            if self.stopping.pending() is not None or time.monotonic() > deadline:
                raise SnapshotError(f"snapshot {directory}: the guest stopped, or its vCPU "
                                    f"did not pause within {self.SNAPSHOT_TIMEOUT:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["manifest"]

    def run(self):
        """Run the guest until it stops; return a stop.Stop."""
        if self.kernel.linux and self.kvm_kind.emulating and not self.restored_from:
            say(EMULATING_KVM_NOTICE.format(module=self.kvm_kind.module))
        if self.tracer and self.restored_from:
            self.tracer.event(f"start: restored from {self.restored_from} "
                              f"({self.kernel.kind}), KVM {self.kvm_kind.kind}")
        elif self.tracer:
            self.tracer.event(f"start: {self.kernel.kind}, entry 0x{self.kernel.entry:x}, "
                              f"KVM {self.kvm_kind.kind}")
        result = supervise(self.run_loop.run, self.vcpu.kvm_run, self.stopping,
                           timeout=self.config.timeout, input_fd=self.config.input_fd,
                           on_input=self.console_input, flush=self.console.flush)
        if self.tracer:
            self.tracer.event(f"stop: {result}")
        if self.config.stats:
            say(f"pylguest: {self.run_loop.exit_summary()}")
        return result

    def close(self):
        """Release everything there is, promptly, in an order that keeps it
        safe: device threads stop (a second in all, LguestBus.close) before
        the memory they use goes; a stopping console gets a second to drain.
        Safe on a machine whose construction stopped half-way, and twice."""
        stuck = []
        if self.bus is not None:
            stuck = self.bus.close()              # closes the devices too
            if stuck and self.tracer:
                self.tracer.event(f"close: left {', '.join(stuck)} in a system call")
        else:
            for device in self.devices:
                device.close()
        self.bus, self.devices = None, []
        for backend in ("control", "socket_console", "agent_channel"):
            if getattr(self, backend):
                getattr(self, backend).close()
                setattr(self, backend, None)
        if stuck:
            # A device thread still in a system call may still write into
            # guest memory (C holds plain pointers to it): leave it mapped
            # for the process's exit to take, rather than fault that thread.
            self.memory = None
        for part in ("console", "guest_errors", "vcpu", "memory", "vm", "kvm"):
            thing = getattr(self, part)
            if thing is not None:
                thing.close()
                setattr(self, part, None)
