"""The snapshot's manifest: its format, and the checks a read one must pass.

A manifest comes from a user's disk, so it is input like any other, and
possibly hostile: truncated, edited, from another pylguest, from another
host.  read() parses it and checks every field's type and range, and the
facts it states about itself (the format, its version, the pylguest that
wrote it), before any of it is used; whatever fails is a SnapshotError,
one line naming the snapshot and the field.  What only the host can
judge -- is this the same kernel and KVM, could this host give the same
CPUID, does the device plan match, is the disk unchanged -- restore.py
checks next, still before the vCPU runs.

The format, version 1 (JSON; numbers are integers, blobs hex strings):

    format, version, pylguest     "pylguest-snapshot", 1, the version
    host        kernel            the host kernel release (uname -r)
                kvm               the KVM kind (kvm/kind.py)
                cpuid             sha256 of the CPUID entries the guest got
    guest       kernel, kind      the kernel it booted, and its kind
                linux             true for Linux
                mem, ram_top      RAM size, where the device page is
    config      block, net, rng, console, root, agent
                                  the device options it ran with (paths
                                  made absolute)
    memory      file, size        the memory file, and its exact size
    vcpu        one blob per vCPU piece of kvm/state.py
    msrs        [[index, value], ...]
    vm          one blob per VM piece
    uart        the 8250's registers and receive FIFO
    devices     per device: name, type, state, broken, features, queues
                (num, pfn, last_avail, used, signalled, notify), extra
    disks       per block device: path, read_only, size, mtime_ns, sample
    agent_greeting   the agent's first frame, replayed to a new channel
    console_output   console bytes not yet written out at the snapshot
"""

import json
import os

from pylguest import __version__
from pylguest.kvm import state
from pylguest.snapshot import SnapshotError

FORMAT = "pylguest-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
MEMORY = "memory"

MAX_MANIFEST = 8 << 20            # bytes: far more than any real one
MAX_TEXT = 4096                   # a path, a message
MAX_DEVICES = 64
MAX_QUEUES = 8
MAX_BLOB = 1 << 16                # the largest KVM blob (xsave) is 4 KiB
U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
DEVICE_STATES = ("reset", "active", "broken")
UART_REGISTERS = {"ier": 0xFF, "lcr": 0xFF, "mcr": 0xFF, "fcr": 0xFF, "scr": 0xFF,
                  "divisor": U16, "line_errors": 0xFF}


def write(directory, manifest):
    """Write `manifest` (a dict) as DIR/manifest.json, durably and whole:
    to a temporary name, fsync'd, then renamed."""
    path = os.path.join(directory, MANIFEST)
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(directory):
    """The manifest of the snapshot in `directory`, checked (check())."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        what = "no such directory" if not os.path.isdir(directory) else f"no {MANIFEST}"
        raise SnapshotError(f"snapshot {directory}: {what} (is it a snapshot?)") from None
    except OSError as e:
        raise SnapshotError(f"snapshot {directory}: cannot read {MANIFEST}: "
                            f"{e.strerror}") from None
    if len(text) > MAX_MANIFEST:
        raise SnapshotError(f"snapshot {directory}: {MANIFEST} is larger than "
                            f"{MAX_MANIFEST >> 20} MiB")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"snapshot {directory}: {MANIFEST} is not JSON "
                            f"(truncated?): {e}") from None
    return check(manifest, directory)


class _Checker:
    """Checks one manifest; every failure names the field, dotted."""

    def __init__(self, directory):
        self.directory = directory

    def fail(self, where, what):
        raise SnapshotError(f"snapshot {self.directory}: {where} {what}")

    def obj(self, value, where, keys):
        if not isinstance(value, dict):
            self.fail(where, "is not an object")
        missing = [k for k in keys if k not in value]
        extra = [k for k in value if k not in keys]
        if missing:
            self.fail(where, f"lacks {', '.join(sorted(missing))}")
        if extra:
            self.fail(where, f"has unknown fields {', '.join(sorted(map(repr, extra)))[:200]}")
        return value

    def int(self, value, where, low=0, high=U64):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(where, f"is not an integer in {low}..{high}")
        return value

    def bool(self, value, where):
        if not isinstance(value, bool):
            self.fail(where, "is not true or false")
        return value

    def text(self, value, where, optional=False):
        if optional and value is None:
            return value
        # No control characters: these reach one-line messages and paths.
        if not isinstance(value, str) or len(value) > MAX_TEXT \
                or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            self.fail(where, f"is not a string of at most {MAX_TEXT} printable characters")
        return value

    def list(self, value, where, limit):
        if not isinstance(value, list) or len(value) > limit:
            self.fail(where, f"is not a list of at most {limit} items")
        return value

    def blob(self, value, where, size=None, limit=MAX_BLOB):
        """Hex text, decoded; exactly `size` bytes if given."""
        if not isinstance(value, str) or len(value) > 2 * limit:
            self.fail(where, f"is not hex of at most {limit} bytes")
        try:
            data = bytes.fromhex(value)
        except ValueError:
            self.fail(where, "is not hex")
        if 2 * len(data) != len(value):          # fromhex skips whitespace
            self.fail(where, "is not hex")
        if size is not None and len(data) != size:
            self.fail(where, f"is {len(data)} bytes, not {size} (another kernel's KVM?)")
        return data


def check(manifest, directory="?"):
    """`manifest` if every field is what version 1 says, else SnapshotError."""
    c = _Checker(directory)
    c.obj(manifest, "the manifest", ("format", "version", "pylguest", "host", "guest",
                                     "config", "memory", "vcpu", "msrs", "vm", "uart",
                                     "devices", "disks", "agent_greeting", "console_output"))
    if manifest["format"] != FORMAT:
        c.fail("format", f"is {str(manifest['format'])[:40]!r}, not {FORMAT!r}: not a "
                         "pylguest snapshot")
    if type(manifest["version"]) is not int or manifest["version"] != VERSION:
        c.fail("version", f"is {repr(manifest['version'])[:20]}: this pylguest reads "
                          f"version {VERSION}")
    if manifest["pylguest"] != __version__:
        c.fail("pylguest", f"is {str(manifest['pylguest'])[:40]!r}: taken by another pylguest "
                           f"(this is {__version__}); take the snapshot again")
    host = c.obj(manifest["host"], "host", ("kernel", "kvm", "cpuid"))
    for key in host:
        c.text(host[key], f"host.{key}")
    guest = c.obj(manifest["guest"], "guest", ("kernel", "kind", "linux", "mem", "ram_top"))
    c.text(guest["kernel"], "guest.kernel")
    c.text(guest["kind"], "guest.kind")
    c.bool(guest["linux"], "guest.linux")
    c.int(guest["mem"], "guest.mem", 1)
    c.int(guest["ram_top"], "guest.ram_top", 1)
    _check_config(c, manifest["config"])
    memory = c.obj(manifest["memory"], "memory", ("file", "size"))
    if memory["file"] != MEMORY:
        c.fail("memory.file", f"is not {MEMORY!r}")
    c.int(memory["size"], "memory.size", 1)
    for scope in ("vcpu", "vm"):
        pieces = [p for p in state.PIECES if p.scope == scope]
        blobs = c.obj(manifest[scope], scope, [p.name for p in pieces])
        for piece in pieces:
            c.blob(blobs[piece.name], f"{scope}.{piece.name}", state.size_of(piece))
    for i, entry in enumerate(c.list(manifest["msrs"], "msrs", state.MAX_MSRS)):
        if not isinstance(entry, list) or len(entry) != 2:
            c.fail(f"msrs[{i}]", "is not [index, value]")
        c.int(entry[0], f"msrs[{i}] index", 0, U32)
        c.int(entry[1], f"msrs[{i}] value")
    _check_uart(c, manifest["uart"])
    names = set()
    for i, device in enumerate(c.list(manifest["devices"], "devices", MAX_DEVICES)):
        _check_device(c, device, f"devices[{i}]")
        if device["name"] in names:
            c.fail(f"devices[{i}].name", "is there twice")
        names.add(device["name"])
    for i, disk in enumerate(c.list(manifest["disks"], "disks", MAX_DEVICES)):
        disk = c.obj(disk, f"disks[{i}]", ("device", "path", "read_only", "size",
                                           "mtime_ns", "sample"))
        c.text(disk["device"], f"disks[{i}].device")
        if disk["device"] not in names:
            c.fail(f"disks[{i}].device", "names no device")
        c.text(disk["path"], f"disks[{i}].path")
        c.bool(disk["read_only"], f"disks[{i}].read_only")
        c.int(disk["size"], f"disks[{i}].size")
        c.int(disk["mtime_ns"], f"disks[{i}].mtime_ns")
        c.blob(disk["sample"], f"disks[{i}].sample", 32)
    # Every disk is saved by reference, so each has its entry (a root that
    # is a directory is virtio-fs, which is never snapshotted).
    listed = {disk["path"] for disk in manifest["disks"]}
    config = manifest["config"]
    for spec in [*config["block"], *([config["root"]] if config["root"] else [])]:
        if spec.split(",")[0] not in listed:
            c.fail("config", f"names the disk {spec.split(',')[0][:80]!r}, which no disk "
                             "entry describes")
    c.blob(manifest["agent_greeting"], "agent_greeting", limit=MAX_BLOB)
    c.blob(manifest["console_output"], "console_output", limit=1 << 20)
    return manifest


def _check_config(c, config):
    """One key per device option a snapshot keeps (devices/options.py's
    DEVICE_OPTIONS): true or false for a flag, a list of strings for a
    repeatable option, a string or null otherwise."""
    from pylguest.devices.options import DEVICE_OPTIONS
    kept = [option for option in DEVICE_OPTIONS if option.saved]
    c.obj(config, "config", tuple(option.name for option in kept))
    for option in kept:
        where, value = f"config.{option.name}", config[option.name]
        if option.saved == "presence" or option.metavar is None:
            c.bool(value, where)
        elif option.repeat:
            for i, spec in enumerate(c.list(value, where, MAX_DEVICES)):
                c.text(spec, f"{where}[{i}]")
        else:
            c.text(value, where, optional=True)


def _check_uart(c, uart):
    c.obj(uart, "uart", (*UART_REGISTERS, "thr_interrupt", "line", "rx"))
    for name, high in UART_REGISTERS.items():
        c.int(uart[name], f"uart.{name}", 0, high)
    c.bool(uart["thr_interrupt"], "uart.thr_interrupt")
    c.bool(uart["line"], "uart.line")
    c.blob(uart["rx"], "uart.rx", limit=4096)


def _check_device(c, device, where):
    c.obj(device, where, ("name", "type", "state", "broken", "features", "queues", "extra"))
    c.text(device["name"], f"{where}.name")
    c.int(device["type"], f"{where}.type", 0, 0xFF)
    if device["state"] not in DEVICE_STATES:
        c.fail(f"{where}.state", f"is not one of {', '.join(DEVICE_STATES)}")
    c.text(device["broken"], f"{where}.broken", optional=True)
    c.int(device["features"], f"{where}.features", 0, U32)
    for i, queue in enumerate(c.list(device["queues"], f"{where}.queues", MAX_QUEUES)):
        queue = c.obj(queue, f"{where}.queues[{i}]",
                      ("num", "pfn", "last_avail", "used", "signalled", "notify"))
        c.int(queue["num"], f"{where}.queues[{i}].num", 1, 32768)
        c.int(queue["pfn"], f"{where}.queues[{i}].pfn", 0, U64 >> 12)
        for key in ("last_avail", "used", "signalled"):
            c.int(queue[key], f"{where}.queues[{i}].{key}", 0, U16)
        c.bool(queue["notify"], f"{where}.queues[{i}].notify")
    if not isinstance(device["extra"], dict) or len(device["extra"]) > 8:
        c.fail(f"{where}.extra", "is not an object of at most 8 fields")
