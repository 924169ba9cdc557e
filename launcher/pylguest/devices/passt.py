"""User-mode networking: `--net user`, served by passt.

    --net user[,hostfwd=tcp:HOSTPORT-:GUESTPORT]...[,hostfwd=udp:...][,mac=MAC]

passt (Debian's `passt` package) is a user-mode network stack: it gives
the guest an address by DHCP (the host's own), answers ARP, NDP and DNS,
and carries the guest's TCP, UDP and ICMP through ordinary sockets of the
host, so the guest reaches what the host reaches without a tap, a bridge
or root.  From the guest the gateway's address is the host's loopback (a
server on the host at 127.0.0.1:PORT is GATEWAY:PORT), and each hostfwd
makes passt listen on HOSTPORT on the host and carry what connects there
to GUESTPORT in the guest.

passt speaks QEMU's "socket" protocol: on a connected SOCK_STREAM socket,
each ethernet frame behind its length, 4 bytes big-endian.  The launcher
makes a socket pair, gives passt one end (--fd) and keeps the other for
the net device, which frames and unframes in C (csrc/net.c, stream mode).
passt runs under the launcher's supervisor (daemon.py): in the
foreground, quiet, with its messages on stderr (for the death line), and
one-off, so it ends when its socket closes, as it does when the launcher
ends however it ends.  Started as root, passt drops to the user nobody;
that also clears the parent-death signal daemon.py sets, which is why
one-off matters: the socket's close is what ends it then.
"""

import ipaddress
from typing import NamedTuple

from pylguest.daemon import Daemon, find_program
from pylguest.errors import UsageError

PASST_CANDIDATES = ("passt", "/usr/bin/passt")
GUEST_MTU = 1500      # what Linux's virtio_net posts room for without MRG_RXBUF or GSO


class Forward(NamedTuple):
    """One hostfwd: `host_port` on the host (on `host_addr`, or every
    address) carried to `guest_port` in the guest."""
    protocol: str         # "tcp" or "udp"
    host_port: int
    guest_port: int
    host_addr: str = ""


class UserNet(NamedTuple):
    """A `--net user` device's backend: its forwards."""
    forwards: tuple = ()


HOSTFWD_USAGE = "use hostfwd=tcp:HOSTPORT-:GUESTPORT (or udp:, or tcp:HOSTADDR:HOSTPORT-:GUESTPORT)"


def _port(text, what, spec):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"bad hostfwd={spec}: the {what} port {text!r} is not 1 to 65535")
    return int(text)


def parse_hostfwd(spec):
    """A Forward from QEMU's spelling, PROTOCOL:[HOSTADDR]:HOSTPORT-:GUESTPORT
    (the host address may be left out, with its colon); passt carries to
    the guest's one address, so no guest address may be named."""
    protocol, colon, rest = spec.partition(":")
    if not colon or protocol not in ("tcp", "udp"):
        raise UsageError(f"bad hostfwd={spec}: the protocol is tcp or udp; {HOSTFWD_USAGE}")
    host, dash, guest = rest.partition("-")
    if not dash:
        raise UsageError(f"bad hostfwd={spec}: {HOSTFWD_USAGE}")
    guest_addr, colon, guest_port = guest.rpartition(":")
    if not colon:
        raise UsageError(f"bad hostfwd={spec}: no ':' before the guest port; {HOSTFWD_USAGE}")
    if guest_addr:
        raise UsageError(f"bad hostfwd={spec}: passt forwards to the guest's own address; "
                         "leave the guest address out (-:GUESTPORT)")
    host_addr, _, host_port = host.rpartition(":")
    if host_addr:
        try:
            host_addr = str(ipaddress.ip_address(host_addr.strip("[]")))
        except ValueError:
            raise UsageError(f"bad hostfwd={spec}: {host_addr!r} is not an IP address") from None
    return Forward(protocol, _port(host_port, "host", spec), _port(guest_port, "guest", spec),
                   host_addr)


def check_forwards(forwards, spec):
    """One forward per host port and protocol (passt refuses overlaps)."""
    seen = set()
    for f in forwards:
        if (f.protocol, f.host_port) in seen:
            raise UsageError(f"bad --net {spec!r}: host port {f.protocol}:{f.host_port} "
                             "is forwarded twice")
        seen.add((f.protocol, f.host_port))


def passt_argv(path, fd, forwards):
    argv = [path, "--foreground", "--quiet", "--stderr", "--one-off",
            "--mtu", str(GUEST_MTU), "--fd", str(fd)]
    for f in forwards:
        where = f"{f.host_addr}/" if f.host_addr else ""
        argv += ["-t" if f.protocol == "tcp" else "-u", f"{where}{f.host_port}:{f.guest_port}"]
    return argv


def find_passt(override=None):
    """passt's path, or a UsageError naming its Debian package."""
    return find_program("passt", PASST_CANDIDATES, package="passt", override=override)


def start_passt(label, fd, forwards, on_exit, path=None):
    """passt, started on `fd` (its end of the socket pair, which the caller
    closes once this returns); a Daemon."""
    return Daemon(label, passt_argv(path or find_passt(), fd, forwards),
                  pass_fds=(fd,), on_exit=on_exit)
