"""Taking a snapshot: the quiet point, then everything a machine is.

machine.py calls take() through StopRequest.pause(), so it runs on the
vCPU thread while the vCPU is out of KVM_RUN.  It came out with EINTR,
and an exit is only complete once KVM_RUN is entered again, so the one
before it has been answered and re-entered: KVM's state holds no
half-done port or MMIO access (KVM's API documentation, KVM_RUN).

The quiet point.  The vCPU is stopped, so the guest adds no new request;
but a device's worker may be in the middle of one (a block write) and an
input thread may be about to fill a receive buffer.  take() takes every
device's lock, in bus order.  A worker holds its device's lock for a whole
pass over its queue, publishing each request to the used ring before it
lets go, so once we hold the lock that device has nothing in flight, and
nothing can start.  No request is ever half in a snapshot: the guest saw
it complete (it is in the used ring, in memory) or it is still in the
available ring, to be taken by whoever runs next.

Then, with the locks held: the KVM state, the UART, each device, and the
memory; the manifest is written last, after the locks are let go.
"""

import os
import time

import pylguest
from pylguest.devices.block import BlockDevice
from pylguest.devices.options import DEVICE_OPTIONS
from pylguest.kvm import state
from pylguest.snapshot import SnapshotError, disks, manifest

QUIET_TIMEOUT = 10.0               # seconds to wait for the devices' locks
FLUSH_TIMEOUT = 1.0                # seconds the console gets to write out


def refusals(devices):
    """Why these devices cannot be snapshotted: one line, or None."""
    refused = [f"{d.name} ({d.snapshot_refusal})" for d in devices if d.snapshot_refusal]
    return "cannot snapshot a guest with " + "; ".join(refused) if refused else None


def prepare(directory):
    """Make the empty directory a snapshot goes in, or SnapshotError.  A
    snapshot is never written over another: running restores map its
    memory file, and would see it change under them."""
    try:
        os.makedirs(directory, exist_ok=True)
        if os.listdir(directory):
            raise SnapshotError(f"snapshot {directory}: the directory is not empty")
    except OSError as e:
        raise SnapshotError(f"snapshot {directory}: {e.strerror}") from None


def take(machine, directory, trace=None):
    """Save `machine` (stopped, on its vCPU thread) to `directory`, which
    prepare() made.  Returns the manifest."""
    trace = trace or (lambda line: None)
    started = time.monotonic()
    why = refusals(machine.devices)
    if why:
        raise SnapshotError(why)
    locked = []
    try:
        for device in machine.devices:
            if not device.lock.acquire(timeout=QUIET_TIMEOUT):
                raise SnapshotError(f"{device.name} stayed busy for {QUIET_TIMEOUT:g} s; "
                                    "no snapshot was taken")
            locked.append(device)
        trace(f"quiet: vCPU stopped, {len(locked)} devices idle, nothing in flight")
        saved = _save(machine, directory, trace)
    finally:
        for device in reversed(locked):
            device.lock.release()
    manifest.write(directory, saved)
    trace(f"snapshot written in {time.monotonic() - started:.3f} s")
    return saved


def _save(machine, directory, trace):
    machine.console.flush(timeout=FLUSH_TIMEOUT)
    vcpu = {p.name: state.as_bytes(state.read(machine.vcpu.fd, p)).hex()
            for p in state.PIECES if p.scope == "vcpu"}
    vm = {p.name: state.as_bytes(state.read(machine.vm.fd, p)).hex()
          for p in state.PIECES if p.scope == "vm"}
    msrs = state.read_msrs(machine.vcpu.fd, state.msr_indices(machine.kvm.fd))
    trace(f"save  KVM state: {len(vcpu)} vCPU pieces, {len(vm)} VM pieces, {len(msrs)} MSRs")
    devices = [device.save_state() for device in machine.devices]
    for device in devices:
        trace(f"save  {device['name']}: {device['state']}, queues at "
              + (", ".join(f"{q['last_avail']}/{q['used']}" for q in device["queues"]) or "-"))
    written = save_memory(machine.memory, os.path.join(directory, manifest.MEMORY))
    trace(f"save  memory: {machine.memory.size >> 20} MiB, {written >> 20} MiB of it not zero")
    config = machine.config
    channel = machine.agent_channel
    return {
        "format": manifest.FORMAT, "version": manifest.VERSION,
        "pylguest": pylguest.__version__,
        "host": host_identity(machine.kvm, machine.kvm_kind),
        "guest": {"kernel": os.path.abspath(config.kernel), "kind": machine.kernel.kind,
                  "linux": machine.kernel.linux, "mem": config.mem,
                  "ram_top": machine.ram_top},
        "config": {option.name: _saved(option, getattr(config, option.name))
                   for option in DEVICE_OPTIONS if option.saved},
        "memory": {"file": manifest.MEMORY, "size": machine.memory.size},
        "vcpu": vcpu, "msrs": [[index, value] for index, value in msrs.items()], "vm": vm,
        "uart": machine.uart.save_state(),
        "devices": devices,
        "disks": [_disk(device) for device in machine.devices if isinstance(device, BlockDevice)],
        "agent_greeting": channel.greeting.hex() if channel else "",
        "console_output": machine.console.unwritten().hex(),
    }


def host_identity(kvm, kvm_kind):
    """What a snapshot can only be restored on: the same host kernel, the
    same kind of KVM, and a host that gives the guest the same CPUID."""
    return {"kernel": os.uname().release, "kvm": kvm_kind.kind,
            "cpuid": cpuid_digest(kvm, kvm_kind)}


def cpuid_digest(kvm, kvm_kind):
    import hashlib
    from pylguest._native import ffi
    from pylguest.kvm.cpuid import guest_cpuid
    cpuid = guest_cpuid(kvm, kvm_kind)
    entries = ffi.buffer(cpuid.entries, cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2"))
    return hashlib.sha256(bytes(entries)).hexdigest()


def _saved(option, value):
    """A device option's value as the manifest's config keeps it: a
    DEVICE_OPTIONS line's `saved` says how."""
    if option.saved == "presence" or option.metavar is None:
        return bool(value)
    if option.repeat:
        return [_absolute(v) if option.saved == "path" else v for v in value]
    if value is not None and option.saved == "path":
        return _absolute(value)
    return value


def _absolute(spec):
    """A PATH[,flags] option with its path made absolute: a restore may
    run in another directory."""
    path, comma, flags = spec.partition(",")
    return os.path.abspath(path) + comma + flags


def _disk(device):
    return {"device": device.name, "path": os.path.abspath(device.path),
            "read_only": device.read_only, **disks.identity(device.path)}


def _write_all(fd, data, offset):
    while data:
        count = os.pwrite(fd, data, offset)
        data, offset = data[count:], offset + count


def save_memory(memory, path):
    """Write guest memory to `path` as a sparse file: only pages that hold
    something other than zeroes are written.  Returns the bytes written."""
    import numpy as np
    page = 4096
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory.size)
        for offset, data in memory.data_pieces():
            pages = np.frombuffer(data, dtype=np.uint64).reshape(-1, page // 8)
            used = np.flatnonzero(pages.any(axis=1))
            # Runs of consecutive non-zero pages, each one pwrite.
            breaks = np.flatnonzero(np.diff(used) != 1) + 1
            for run in np.split(used, breaks) if used.size else ():
                first, last = int(run[0]) * page, (int(run[-1]) + 1) * page
                _write_all(fd, memoryview(data)[first:last], offset + first)
                written += last - first
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return written
