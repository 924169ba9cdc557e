"""From command-line device options to devices.

    --block PATH[,ro][,direct] repeatable: block0, block1, ...
                               (direct: O_DIRECT, past the host's page cache)
    --net tap:NAME[,mac=MAC]   repeatable: net0, net1, ...
    --rng                      rng0
    --console stdio|socket:PATH   a virtio console (console0)
    --agent fd:N               the agent channel (agent0): a virtio console
                               port, after every other device, relayed to an
                               inherited socket (docs/abi.md, section 8)

Every mistake here is the user's, so it is a UsageError (one line, exit 2).

The block, net and rng devices' modules and the socket console's are
imported only when an option asks for one: a run without them never loads
them (nor `socket`).
"""

from pylguest.devices.console import ConsoleDevice
from pylguest.errors import UsageError


def parse_block(spec):
    """(path, read_only, direct) from PATH[,ro][,direct]."""
    path, *flags = spec.split(",")
    unknown = [f for f in flags if f not in ("ro", "direct")]
    if not path or unknown or len(set(flags)) != len(flags):
        raise UsageError(f"bad --block {spec!r}: use PATH, PATH,ro, PATH,direct or PATH,ro,direct")
    return path, "ro" in flags, "direct" in flags


def parse_net(spec, index):
    kind, _, rest = spec.partition(":")
    if kind != "tap" or not rest:
        raise UsageError(f"bad --net {spec!r}: use tap:NAME[,mac=52:54:00:12:34:56]")
    from pylguest.devices.net import parse_mac   # lazily: see the module docstring
    name, *options = rest.split(",")
    mac = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index])
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


def create_devices(config, console_output):
    """The devices `config` asks for, in bus order, the socket console
    backend (or None) and the agent channel (or None).  On error, whatever
    was opened is closed again."""
    # The imports below are lazy: see the module docstring.
    devices, socket_console, agent_channel = [], None, None
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
        for i, spec in enumerate(config.block):
            from pylguest.devices.block import BlockDevice
            path, read_only, direct = parse_block(spec)
            devices.append(BlockDevice(f"block{i}", path, read_only, direct=direct))
        for i, spec in enumerate(config.net):
            from pylguest.devices.net import NetDevice
            name, mac = parse_net(spec, i)
            devices.append(NetDevice(f"net{i}", name, mac))
        if config.rng:
            from pylguest.devices.rng import RngDevice
            devices.append(RngDevice("rng0"))
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
    return devices, socket_console, agent_channel
