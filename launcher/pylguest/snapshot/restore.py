"""Restoring: a machine built from a snapshot, checked before it runs.

machine.py builds a restored machine in the same order as a booted one,
with these steps in place of loading a kernel (each one a function here):

  1. load()            read the manifest (manifest.py checks every field)
                       and the memory file's size;
  2. check_host()      the same host kernel and KVM kind, and a host that
                       gives the guest the same CPUID (a guest that saw
                       AVX-512 at boot must never run without it);
  3. device_config()   the devices it ran with, re-attached: the same
                       block images, each checked unchanged (disks.py) and
                       by default copied for this restore alone; a tap
                       opened again, a fresh passt; the new agent channel;
  4. the memory file mapped copy-on-write (memory.py's private_file);
  5. restore_devices() each device's state, checked against the bus's
                       own plan (the same rings at the same places, no
                       feature that was never offered) before it is used;
  6. restore_kvm()     the KVM state, in the order QEMU puts it back:
                       the interrupt controllers and the PIT, then the
                       vCPU's registers, XSAVE, XCR0, special registers,
                       MP state, local APIC, events, debug registers, then
                       the MSRs, and the clock last.

Everything a snapshot says is checked in steps 1-5, before the vCPU
runs: a refusal is a SnapshotError (one line, exit status 2).

The clock.  kvmclock is set to exactly the value it had at the snapshot
(KVM_SET_CLOCK without KVM_CLOCK_REALTIME), so the guest's monotonic
clock goes on from where it was: it neither jumps back nor forward, and
no watchdog in the guest sees a CPU that was stuck for the hours the
snapshot sat on disk.  The guest's wall clock is then as far behind as
the snapshot is old; a session's restore (pylguest.Guest.restore) sets
it from the host's at once, through the agent, as `virsh domtime --sync`
does after a libvirt restore (docs/abi.md section 11).
"""

import os
import stat
from typing import NamedTuple

from pylguest.errors import KvmError
from pylguest.kvm import state
from pylguest.snapshot import SnapshotError, disks, manifest, take

# The vCPU pieces in the order they are written back (fpu is inside xsave).
VCPU_ORDER = ("regs", "xsave", "xcrs", "sregs", "mp_state", "lapic", "events", "debugregs")
CHIPS = ("pic master", "pic slave", "ioapic", "pit2")


class Snapshot(NamedTuple):
    directory: str
    manifest: dict

    @property
    def memory_path(self):
        return os.path.join(self.directory, manifest.MEMORY)


class SavedKernel(NamedTuple):
    """What the run loop and --trace need to know of the kernel that was
    booted (machine.py's `kernel`, a boot/loader.py LoadedKernel there)."""
    kind: str
    linux: bool
    entry: int = 0


def load(directory):
    """Step 1: the snapshot in `directory`, its manifest checked."""
    snapshot = Snapshot(directory, manifest.read(directory))
    try:
        info = os.stat(snapshot.memory_path)
    except OSError as e:
        raise SnapshotError(f"snapshot {directory}: its memory file: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"snapshot {directory}: its memory file is not a regular file")
    size = snapshot.manifest["memory"]["size"]
    if info.st_size != size:
        raise SnapshotError(f"snapshot {directory}: its memory file is {info.st_size} bytes, "
                            f"not {size} (truncated, or another snapshot's?)")
    return snapshot


def check_host(snapshot, kvm, kvm_kind):
    """Step 2: SnapshotError unless this host can run the snapshot's guest."""
    saved, here = snapshot.manifest["host"], take.host_identity(kvm, kvm_kind)
    what = {"kernel": "host kernel", "kvm": "KVM", "cpuid": "CPUID for the guest"}
    for key in ("kernel", "kvm", "cpuid"):
        if saved[key] != here[key]:
            shown = "differs" if key == "cpuid" else f"is {here[key]}, the snapshot's {saved[key]}"
            raise SnapshotError(f"snapshot {snapshot.directory}: this host's {what[key]} "
                                f"{shown}; a snapshot restores only where it was taken")


def device_config(snapshot, agent, disk_writes, copies):
    """Step 3: the device options of a restored run, as MachineConfig
    fields.  `disk_writes` is "copy" (each restore writes to its own copy
    of a read-write image, made in the snapshot's directory and listed in
    `copies` for the caller to unlink once open) or "image" (to the image
    itself)."""
    config = snapshot.manifest["config"]
    if config["agent"] and agent is None:
        raise SnapshotError(f"snapshot {snapshot.directory}: its guest has an agent channel: "
                            "give --agent fd:N (pylguest.Guest.restore does)")
    if agent is not None and not config["agent"]:
        raise SnapshotError(f"snapshot {snapshot.directory}: its guest has no agent channel "
                            "to connect --agent to")
    saved_disks = snapshot.manifest["disks"]
    writable = {disk["path"] for disk in saved_disks if not disk["read_only"]}
    for disk in saved_disks:
        disks.check_unchanged(disk, snapshot.directory)

    def image(spec):
        path, comma, flags = spec.partition(",")
        if disk_writes == "image" or path not in writable:
            return spec
        copies.append(disks.private_copy(path, snapshot.directory))
        return copies[-1] + comma + flags

    from pylguest.devices.options import DEVICE_OPTIONS
    fields = {}
    for option in DEVICE_OPTIONS:
        if option.saved == "presence":          # the run's own: the agent's fd
            fields[option.name] = agent
        elif option.saved == "path":            # a disk: maybe a private copy
            value = config[option.name]
            fields[option.name] = (tuple(image(spec) for spec in value) if option.repeat
                                   else value if value is None else image(value))
        elif option.saved:
            value = config[option.name]
            fields[option.name] = tuple(value) if option.repeat else value
    return fields


def check_memory(snapshot, regions, ram_top):
    """Step 4's check: the memory the snapshot's devices imply is the
    memory it saved."""
    from pylguest import layout
    size = sum(region.size for region in regions)
    guest = snapshot.manifest["guest"]
    if not layout.MIN_MEM <= guest["mem"] <= layout.MAX_MEM:
        raise SnapshotError(f"snapshot {snapshot.directory}: guest.mem {guest['mem']} is "
                            f"outside {layout.MIN_MEM >> 20} MiB .. {layout.MAX_MEM >> 20} MiB")
    if size != snapshot.manifest["memory"]["size"] or ram_top != guest["ram_top"]:
        raise SnapshotError(f"snapshot {snapshot.directory}: its memory is "
                            f"{snapshot.manifest['memory']['size']} bytes with the device page "
                            f"at 0x{guest['ram_top']:x}, but its devices and --mem give "
                            f"{size} bytes at 0x{ram_top:x}")


def restore_devices(snapshot, bus, trace):
    """Step 5: every device's saved state, checked against the bus's plan."""
    saved = snapshot.manifest["devices"]
    where = f"snapshot {snapshot.directory}"
    if [d["name"] for d in saved] != [e.device.name for e in bus.entries]:
        raise SnapshotError(f"{where}: its devices ({', '.join(d['name'] for d in saved)}) "
                            "are not the ones its configuration makes")
    for entry, device_state in zip(bus.entries, saved):
        device, slot = entry.device, entry.slot
        rings = [(vq.num, vq.pfn) for vq in slot.vqs]
        queues = [(q["num"], q["pfn"]) for q in device_state["queues"]]
        if device_state["type"] != device.type or queues and queues != rings:
            raise SnapshotError(f"{where}: {device.name}'s type or rings are not where the "
                                "device page puts them")
        if device_state["state"] == "active" and not queues:
            raise SnapshotError(f"{where}: {device.name} is active without its rings")
        unoffered = device_state["features"] & ~slot.host_features
        if unoffered:
            raise SnapshotError(f"{where}: {device.name} has features 0x{unoffered:x} that "
                                "it never offers")
        device.restore_state(device_state, rings)
        if trace:
            trace(f"restore {device.name}: {device_state['state']}, queues at "
                  + (", ".join(f"{q['last_avail']}/{q['used']}"
                               for q in device_state["queues"]) or "-"))


def restore_kvm(snapshot, kvm, vm, vcpu, trace):
    """Step 6: the KVM state, in order (the module docstring).  A blob KVM
    refuses (a register value no CPU can hold) is the snapshot's fault."""
    try:
        _restore_kvm(snapshot, kvm, vm, vcpu, trace)
    except KvmError as e:
        raise SnapshotError(f"snapshot {snapshot.directory}: KVM refused its state: {e}") from None


def _restore_kvm(snapshot, kvm, vm, vcpu, trace):
    pieces = {p.name: p for p in state.PIECES}
    saved = snapshot.manifest
    for name in CHIPS:
        state.write(vm.fd, pieces[name], state.from_bytes(pieces[name],
                                                          bytes.fromhex(saved["vm"][name])))
    for name in VCPU_ORDER:
        state.write(vcpu.fd, pieces[name], state.from_bytes(pieces[name],
                                                            bytes.fromhex(saved["vcpu"][name])))
    listed = set(state.msr_indices(kvm.fd))
    msrs = {index: value for index, value in saved["msrs"]}
    unknown = sorted(set(msrs) - listed)
    if unknown:
        raise SnapshotError(f"snapshot {snapshot.directory}: MSR 0x{unknown[0]:x} is not "
                            "one this KVM saves and restores")
    refused = state.write_msrs(vcpu.fd, msrs)
    if refused:
        raise SnapshotError(f"snapshot {snapshot.directory}: KVM refused MSR "
                            f"0x{refused[0]:x}'s saved value")
    # Only the value: no KVM_CLOCK_REALTIME, so KVM does not move it on.
    saved_clock = state.from_bytes(pieces["clock"], bytes.fromhex(saved["vm"]["clock"]))
    clock = state.from_bytes(pieces["clock"], bytes(state.size_of(pieces["clock"])))
    clock.clock = saved_clock.clock
    state.write(vm.fd, pieces["clock"], clock)
    if trace:
        trace(f"restore KVM state: {', '.join(CHIPS)}; vCPU {', '.join(VCPU_ORDER)}; "
              f"{len(msrs)} MSRs; clock at {clock.clock} ns")
