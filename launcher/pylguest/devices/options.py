"""From command-line device options to devices.

    --block PATH[,ro][,direct] repeatable: block0, block1, ...
                               (direct: O_DIRECT, past the host's page cache)
    --net tap:NAME[,mac=MAC]   repeatable: net0, net1, ...
    --net user[,hostfwd=tcp:HOSTPORT-:GUESTPORT]...[,mac=MAC]
                               the same, through passt (devices/passt.py);
                               hostfwd=udp:... too
    --rng                      rng0
    --console stdio|socket:PATH   a virtio console (console0)
    --share HOSTDIR[,tag=NAME][,ro][,at=PATH]
                               repeatable: fs0, fs1, ... (virtio-fs, served
                               by virtiofsd; devices/fs.py)
    --root DIR|IMAGE[,rw]      a directory: one more virtio-fs device, tag
                               "root"; an image: one more block device,
                               after the user's (read-only unless rw)
    --agent fd:N               the agent channel (agent0): a virtio console
                               port, after every other device, relayed to an
                               inherited socket (docs/abi.md, section 8)

Shares and the root also give pylguest's init words on the kernel command
line (init_words), saying what to mount where; docs/abi.md section 9.

Every mistake here is the user's, so it is a UsageError (one line, exit 2).

Every kind of device is one line of DEVICE_OPTIONS: the command line's
option (cli.py adds one per line), MachineConfig's field (machine.py
makes one per line), what a snapshot keeps of it (snapshot/take.py,
manifest.py and restore.py read the line's `saved`), and, for a device
that needs no other device's help, how it is made (`device`: its class,
whose from_option(name, value) builds one).  So a new device is its
module, one line here, and the docs.  The kinds below with `device` None
are made by create_devices itself, because they depend on each other
(--root adds a disk or a share) or bring a backend of their own.

The devices' modules (but the console's) and the socket console's are
imported only when an option asks for one: a run without them never loads
them (nor `socket`).
"""

import importlib
import os
from typing import NamedTuple, Optional

from pylguest.errors import UsageError


class DeviceOption(NamedTuple):
    """One kind of device, as `pylguest run --NAME` asks for it."""
    name: str                  # the option without "--"; MachineConfig's field
    metavar: Optional[str]     # the value's form; None: a flag, given or not
    repeat: bool               # given once per device (block0, block1, ...)
    help: str
    saved: Optional[str]       # in a snapshot's config: "spec" (as given), "path"
                               # (its path made absolute), "presence" (given or
                               # not: the value is a run's own, an fd), None (never)
    device: Optional[str] = None   # "module:Class" made by Class.from_option(name, value)

    def default(self):
        return () if self.repeat else (False if self.metavar is None else None)

    def values(self, value):
        """The value as a list: one item per device asked for."""
        if self.repeat:
            return list(value)
        return [value] if value else []


DEVICE_OPTIONS = (
    DeviceOption("console", "stdio|socket:PATH", False,
                 "a virtio console on the terminal or on a unix socket", "spec"),
    DeviceOption("block", "PATH[,ro][,direct]", True,
                 "a raw disk image as a virtio block device (repeatable; direct: "
                 "O_DIRECT, past the host's page cache)", "path"),
    DeviceOption("net", "tap:NAME[,mac=MAC]|user[,hostfwd=tcp:HOSTPORT-:GUESTPORT]...", True,
                 "a virtio network device (repeatable): on tap interface NAME, or user-mode "
                 "networking through passt (no root, no tap; the guest gets its address by "
                 "DHCP, the gateway's address reaches the host, hostfwd forwards a host port "
                 "to the guest)", "spec"),
    DeviceOption("rng", None, False, "a virtio entropy device (/dev/urandom)", "spec",
                 "pylguest.devices.rng:RngDevice"),
    DeviceOption("share", "HOSTDIR[,tag=NAME][,ro][,at=GUESTPATH]", True,
                 "a host directory as a virtio-fs device served by virtiofsd (repeatable); "
                 "pylguest's init mounts it at GUESTPATH (default /mnt/NAME; NAME defaults "
                 "to share0, share1, ...); ro is enforced on the host", None),
    DeviceOption("root", "DIR|IMAGE[,rw]", False,
                 "the guest's root file system: a host directory (over virtio-fs) or a disk "
                 "image (virtio-blk); pylguest's init mounts it and runs the command in it. "
                 "Writes go to an overlay in guest memory unless rw is given", "path"),
    DeviceOption("agent", "fd:N", False,
                 "the agent channel (docs/abi.md, section 8) on inherited unix socket N; "
                 "pylguest.Guest(agent=True) passes it", "presence"),
)


def parse_block(spec):
    """(path, read_only, direct) from PATH[,ro][,direct]."""
    path, *flags = spec.split(",")
    unknown = [f for f in flags if f not in ("ro", "direct")]
    if not path or unknown or len(set(flags)) != len(flags):
        raise UsageError(f"bad --block {spec!r}: use PATH, PATH,ro, PATH,direct or PATH,ro,direct")
    return path, "ro" in flags, "direct" in flags


NET_USAGE = ("use tap:NAME[,mac=52:54:00:12:34:56] or "
             "user[,hostfwd=tcp:HOSTPORT-:GUESTPORT]...[,mac=52:54:00:12:34:56]")


def parse_net(spec, index):
    """(backend, mac): the tap's name for tap:NAME, a passt.UserNet (its
    forwards) for user; the MAC is 52:54:00:12:34:56 + index unless given."""
    from pylguest.devices.net import parse_mac   # lazily: see the module docstring
    mac = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index])
    if spec == "user" or spec.startswith("user,"):
        from pylguest.devices.passt import UserNet, check_forwards, parse_hostfwd
        forwards = []
        for option in spec.split(",")[1:]:
            key, equals, value = option.partition("=")
            if key == "hostfwd" and equals:
                forwards.append(parse_hostfwd(value))
            elif key == "mac" and equals:
                mac = parse_mac(value)
            else:
                raise UsageError(f"bad --net option {option!r}: user takes hostfwd=... and mac=...")
        check_forwards(forwards, spec)
        return UserNet(tuple(forwards)), mac
    kind, _, rest = spec.partition(":")
    if kind != "tap" or not rest:
        raise UsageError(f"bad --net {spec!r}: {NET_USAGE}")
    name, *options = rest.split(",")
    for option in options:
        key, _, value = option.partition("=")
        if key != "mac":
            raise UsageError(f"bad --net option {option!r}: only mac=... is known")
        mac = parse_mac(value)
    return name, mac


def parse_console(spec):
    if spec == "stdio":
        return None
    kind, _, path = spec.partition(":")
    if kind != "socket" or not path:
        raise UsageError(f"bad --console {spec!r}: use stdio or socket:PATH")
    return path


class Root(NamedTuple):
    """--root PATH[,rw], parsed: a directory or a disk image."""
    path: str
    directory: bool
    writable: bool


def parse_root(spec):
    path, *flags = spec.split(",")
    if not path or any(f != "rw" for f in flags) or len(flags) > 1:
        raise UsageError(f"bad --root {spec!r}: use DIR, IMAGE, DIR,rw or IMAGE,rw")
    if not os.path.exists(path):
        raise UsageError(f"--root {path}: no such directory or disk image")
    directory = os.path.isdir(path)
    if not directory and not os.path.isfile(path):
        raise UsageError(f"--root {path}: neither a directory nor a disk image file")
    return Root(path, directory, bool(flags))


def disk_name(index):
    """Linux's name for the index-th virtio disk: vda .. vdz, vdaa, ..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def plan_shares(share_specs, root_spec):
    """(shares, root): a Share for each --share and, last, for a --root
    directory (tag "root"), and the Root or None; the tags checked
    together (pylguest.Guest checks its options with this too)."""
    from pylguest.devices.fs import Share, parse_share   # lazily: see the module docstring
    root = parse_root(root_spec) if root_spec else None
    shares = [parse_share(spec, i) for i, spec in enumerate(share_specs)]
    if root and root.directory:
        shares.append(Share(root.path, "root", not root.writable, None))
    tags = [s.tag for s in shares]
    if len(set(tags)) != len(tags):
        raise UsageError(f"two --share options have the same tag: {', '.join(tags)}")
    return shares, root


def plan_nets(net_specs):
    """(backend, mac) for each --net; no host port forwarded by two --net
    user devices (pylguest.Guest checks its options with this too)."""
    planned, forwarded = [], set()
    for i, spec in enumerate(net_specs):
        backend, mac = parse_net(spec, i)
        for f in getattr(backend, "forwards", ()):        # one passt per host port
            if (f.protocol, f.host_port) in forwarded:
                raise UsageError(f"bad --net {spec!r}: host port {f.protocol}:"
                                 f"{f.host_port} is forwarded by another --net user")
            forwarded.add((f.protocol, f.host_port))
        planned.append((backend, mac))
    return planned


def _file_systems(config, devices, words):
    """The --share and --root devices, appended to `devices`; their words
    for init appended to `words`."""
    if not config.share and not config.root:
        return
    from pylguest.devices.fs import FsDevice   # lazily: see the module docstring
    shares, root = plan_shares(config.share, config.root)
    mounts = [f"{s.tag}:{s.at}{':ro' if s.read_only else ''}" for s in shares if s.at]
    if mounts:
        words.append("pylguest.shares=" + ",".join(mounts))
    for share in shares:
        devices.append(FsDevice(f"fs{len([d for d in devices if isinstance(d, FsDevice)])}",
                                share, virtiofsd=config.virtiofsd))
    if root:
        mode = ":rw" if root.writable else ""
        if root.directory:
            words.append(f"pylguest.root=virtiofs:root{mode}")
        else:
            words.append(f"pylguest.root=blk:{disk_name(len(config.block))}{mode}")


def _table_devices(option, value, devices):
    """The devices a DEVICE_OPTIONS line with a `device` asks for,
    appended to `devices`: rng0; or name0, name1, ... for a repeat."""
    values = option.values(value)
    if not values:
        return
    module, _, name = option.device.partition(":")
    device_class = getattr(importlib.import_module(module), name)   # lazily: see above
    for i, one in enumerate(values):
        devices.append(device_class.from_option(f"{option.name}{i}", one))


def create_devices(config, console_output):
    """The devices `config` asks for, in bus order, the socket console
    backend (or None), the agent channel (or None), and the words for
    pylguest's init.  On error, whatever was opened is closed again."""
    # The imports below are lazy: see the module docstring.
    from pylguest.devices.console import ConsoleDevice
    devices, socket_console, agent_channel, words = [], None, None, []
    try:
        if config.console:
            path = parse_console(config.console)
            if path:
                from pylguest.hostconsole.socket_console import SocketConsole
                socket_console = SocketConsole(path)
                output = socket_console.write
            else:
                output = console_output.write
            devices.append(ConsoleDevice("console0", output))
        blocks = [parse_block(spec) for spec in config.block]
        root = parse_root(config.root) if config.root else None
        if root and not root.directory:
            # The root image is the last disk: the user's keep vda, vdb, ...
            blocks.append((root.path, not root.writable, False))
        for i, (path, read_only, direct) in enumerate(blocks):
            from pylguest.devices.block import BlockDevice
            devices.append(BlockDevice(f"block{i}", path, read_only, direct=direct))
        for i, (backend, mac) in enumerate(plan_nets(config.net)):
            from pylguest.devices.net import NetDevice
            if isinstance(backend, str):
                devices.append(NetDevice(f"net{i}", backend, mac))
                continue
            devices.append(NetDevice.user(f"net{i}", mac, backend.forwards))
            if devices[-1].cmdline_words[0] not in words:   # pylguest.net=dhcp, once
                words.extend(devices[-1].cmdline_words)
        for option in DEVICE_OPTIONS:
            if option.device:
                _table_devices(option, getattr(config, option.name), devices)
        _file_systems(config, devices, words)
        if config.agent:
            from pylguest.hostconsole.agent_channel import AgentChannel, parse_agent
            from pylguest.devices.agent_port import AgentPortDevice
            agent_channel = AgentChannel(parse_agent(config.agent))
            devices.append(AgentPortDevice("agent0", agent_channel.write))
    except Exception:
        for device in devices:
            device.close()
        for backend in (socket_console, agent_channel):
            if backend:
                backend.close()
        raise
    return devices, socket_console, agent_channel, words
