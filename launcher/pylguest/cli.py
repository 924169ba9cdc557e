"""The `pylguest` command line.

    pylguest run KERNEL [--initrd FILE] [--cmdline TEXT] [--mem SIZE]
                        [--timeout SECONDS] [--trace] [--decompress MODE]
                        [--block PATH[,ro]]... [--net tap:NAME]... [--rng]
                        [--console stdio|socket:PATH]
    pylguest info

Exit status: the guest's own (LHCALL_SHUTDOWN), or one of stop.py's:
2 for bad usage, 124 timeout, 125 triple fault, 128+N signal N, 1 for a
launcher failure.  Errors are one line on stderr, never a traceback.
"""

import argparse
import os
import re
import sys

from pylguest import stop
from pylguest.errors import BootError, PylguestError, UsageError

MiB = 1 << 20
SIZE_UNITS = {"": MiB, "k": 1 << 10, "m": MiB, "g": 1 << 30}


def parse_size(text):
    """'256M', '1G', '65536K' or a plain number of MiB, as bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not match:
        raise UsageError(f"bad size {text!r}: use a number with K, M or G (e.g. 512M)")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def parse_timeout(text):
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise UsageError(f"bad --timeout {text!r}: give a positive number of seconds")
    return seconds


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser():
    parser = _Parser(prog="pylguest",
                     description="An lguest-style launcher on KVM: run a kernel and serve its devices.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="boot a kernel (bzImage, vmlinux or teaching-guest ELF)")
    run.add_argument("kernel", help="bzImage or ELF64 kernel")
    run.add_argument("--initrd", help="initial ramdisk (e.g. a cpio archive)")
    run.add_argument("--cmdline", help="kernel command line "
                     "(Linux default: console=ttyS0; lguest.devices= is always added)")
    run.add_argument("--mem", default="256M", help="guest RAM, e.g. 512M or 2G (default 256M)")
    run.add_argument("--timeout", help="stop the guest after this many seconds (exit status 124)")
    run.add_argument("--trace", action="store_true",
                     help="print one decoded line per exit to stderr")
    run.add_argument("--stats", action="store_true",
                     help="when the guest stops, print how many exits it took, by kind")
    run.add_argument("--decompress", choices=("auto", "host", "guest"), default="auto",
                     help="who unpacks a bzImage: the guest's own decompressor, or the host "
                          "(auto: host when KVM emulates guest kernel mode)")
    run.add_argument("--block", action="append", default=[], metavar="PATH[,ro]",
                     help="a raw disk image as a virtio block device (repeatable)")
    run.add_argument("--net", action="append", default=[], metavar="tap:NAME[,mac=MAC]",
                     help="a virtio network device on tap interface NAME (repeatable)")
    run.add_argument("--rng", action="store_true", help="a virtio entropy device (/dev/urandom)")
    run.add_argument("--console", metavar="stdio|socket:PATH",
                     help="a virtio console on the terminal or on a unix socket")
    commands.add_parser("info", help="what this machine's KVM is and offers")
    return parser


def command_run(args):
    from pylguest.machine import Machine, MachineConfig
    from pylguest.terminal import RawTerminal
    if not os.path.isfile(args.kernel):
        raise UsageError(f"kernel {args.kernel}: no such file")
    if args.initrd and not os.path.isfile(args.initrd):
        raise UsageError(f"initrd {args.initrd}: no such file")
    config = MachineConfig(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                           mem=parse_size(args.mem),
                           timeout=parse_timeout(args.timeout) if args.timeout else None,
                           trace=args.trace, stats=args.stats, decompress=args.decompress, input_fd=0,
                           block=args.block, net=args.net, rng=args.rng, console=args.console)
    machine = Machine(config)
    try:
        with RawTerminal(0):
            result = machine.run()
    finally:
        machine.close()
    if result.reason not in ("shutdown", "reboot", "quit"):
        sys.stderr.write(f"pylguest: {result}\n")
    return result.status


def command_info(args):
    from pylguest.info import describe
    print(describe())
    return 0


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return command_run(args)
        return command_info(args)
    except (UsageError, BootError) as e:
        sys.stderr.write(f"pylguest: {e}\n")
        return stop.EXIT_USAGE
    except PylguestError as e:
        sys.stderr.write(f"pylguest: {e}\n")
        return stop.EXIT_LAUNCHER_ERROR
    except KeyboardInterrupt:
        return stop.EXIT_SIGNAL_BASE + 2
