"""The `pylguest` command line.

    pylguest run KERNEL [--initrd FILE] [--cmdline TEXT] [--mem SIZE]
                        [--timeout SECONDS] [--trace] [--decompress MODE]
                        [--block PATH[,ro][,direct]]... [--net tap:NAME|user]... [--rng]
                        [--share HOSTDIR[,tag=NAME][,ro][,at=PATH]]... [--root DIR|IMAGE[,rw]]
                        [--virtiofsd PATH] [--console stdio|socket:PATH] [--agent fd:N]
                        [--control PATH|fd:N] [-- CMD [ARG...]]
    pylguest run --restore DIR [--disk-writes copy|image] [--timeout SECONDS] [--trace]
                        [--agent fd:N] [--control PATH|fd:N]
    pylguest snapshot CONTROL DIR
    pylguest info

Exit status: the guest's own (LHCALL_SHUTDOWN: with `-- CMD`, the
command's), or one of run/stop.py's: 2 for bad usage, 123 the guest halted,
124 timeout, 125 triple fault or kernel panic, 128+N signal N, 1 for a
launcher failure.  Errors are one line on stderr, never a traceback.
"""

import argparse
import math
import os
import re
import sys
import threading

from pylguest.devices.options import DEVICE_OPTIONS
from pylguest.errors import BootError, PylguestError, UsageError
from pylguest.hostfiles import ensure_standard_fds
from pylguest.report import say
from pylguest.run import stop

MiB = 1 << 20
SIZE_UNITS = {"": MiB, "k": 1 << 10, "m": MiB, "g": 1 << 30}


def parse_size(text):
    """'256M', '1G', '65536K' or a plain number of MiB, as bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not match:
        raise UsageError(f"bad size {text!r}: use a number with K, M or G (e.g. 512M)")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


# The longest timeout a timer thread can wait for (about 292 years).
MAX_TIMEOUT = threading.TIMEOUT_MAX


def parse_timeout(text):
    """A number of seconds in (0, MAX_TIMEOUT]: not '', not inf, not nan."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT:            # nan compares false: refused too
        raise UsageError(f"bad --timeout {text!r}: give a number of seconds above 0 and at "
                         f"most {MAX_TIMEOUT:.0f} (about {MAX_TIMEOUT / 3.156e7:.0f} years)")
    return seconds


def _terminal_columns():
    """shutil.get_terminal_size().columns, without importing shutil."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout.  argparse's own formatter imports shutil
    (and with it bz2, lzma and zlib) for the terminal's width, and builds
    one for every add_argument(), so every run paid for it."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("width", _terminal_columns() - 2)   # as argparse does
        super().__init__(prog, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser():
    parser = _Parser(prog="pylguest",
                     description="An lguest-style launcher on KVM: run a kernel and serve its devices.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "run", help="boot a kernel (bzImage, vmlinux or teaching-guest ELF)",
        usage="%(prog)s KERNEL [options] [-- CMD [ARG...]]",
        epilog="-- CMD [ARG...]: with a Linux kernel and pylguest's initramfs (make linux), "
               "run CMD in the guest, its output on the console, and exit with its status. "
               "Every argument arrives byte for byte (it travels in the initrd, not on the "
               "kernel command line).")
    run.add_argument("kernel", nargs="?", help="bzImage or ELF64 kernel")
    run.add_argument("--initrd", help="initial ramdisk (a cpio archive, compressed or not)")
    run.add_argument("--cmdline", help="words to add to the kernel command line; for Linux "
                     "they come after the launcher's defaults (console=ttyS0; quiet with a "
                     "command; clearcpuid= on emulating KVM), so they override them. "
                     "lguest.devices= is always added")
    run.add_argument("--mem", default="256M", help="guest RAM, e.g. 512M or 2G (default 256M)")
    run.add_argument("--timeout", help="stop the guest after this many seconds (exit status 124)")
    run.add_argument("--trace", action="store_true",
                     help="print one decoded line per exit to stderr")
    run.add_argument("--stats", action="store_true",
                     help="when the guest stops, print how many exits it took, by kind")
    run.add_argument("--decompress", choices=("auto", "host", "guest"), default="auto",
                     help="who unpacks a compressed bzImage payload and initrd: the guest, or the host "
                          "(auto: host when KVM emulates guest kernel mode)")
    for option in DEVICE_OPTIONS:          # one per kind of device: devices/options.py
        if option.metavar is None:
            run.add_argument(f"--{option.name}", action="store_true", help=option.help)
        else:
            run.add_argument(f"--{option.name}", metavar=option.metavar, help=option.help,
                             **({"action": "append", "default": []} if option.repeat else {}))
    run.add_argument("--virtiofsd", metavar="PATH",
                     help="the virtiofsd to run for --share and --root (default: Debian's "
                          "/usr/lib/qemu/virtiofsd; also $PYLGUEST_VIRTIOFSD)")
    run.add_argument("--control", metavar="PATH|fd:N",
                     help="listen for snapshot requests on a unix socket at PATH (or on "
                          "inherited socket N); `pylguest snapshot PATH DIR` sends one")
    run.add_argument("--restore", metavar="DIR",
                     help="start from a snapshot instead of booting: its memory, its "
                          "devices and their options come from DIR")
    run.add_argument("--disk-writes", choices=("copy", "image"), default="copy",
                     help="with --restore: a read-write disk's writes go to a private copy "
                          "made for this run (copy, the default) or to the image itself")
    snapshot = commands.add_parser(
        "snapshot", help="save a running guest (started with --control PATH) to DIR; "
                         "the guest runs on")
    snapshot.add_argument("control", metavar="CONTROL", help="the launcher's --control path")
    snapshot.add_argument("directory", metavar="DIR", help="a new or empty directory")
    commands.add_parser("info", help="what this machine's KVM is and offers")
    return parser


def split_command(argv):
    """(options, command): everything after the first `--` is the guest's
    command, which argparse must never see (it may hold anything)."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, None


# What a restored run takes from its snapshot, and so may not be given.
# (Every device's option but the agent's, whose fd is the run's own.)
FROM_SNAPSHOT = ("kernel", "initrd", "cmdline", "virtiofsd",
                 *(o.name for o in DEVICE_OPTIONS if o.saved != "presence"))


def check_restore(args, command):
    """A --restore run's options: the machine comes from the snapshot."""
    if args.restore is None:
        if args.kernel is None:
            raise UsageError("pylguest run needs a KERNEL (or --restore DIR)")
        if args.disk_writes != "copy":
            raise UsageError("--disk-writes is for --restore")
        return
    given = [name for name in FROM_SNAPSHOT if getattr(args, name)]
    if args.mem != "256M":
        given.append("mem")
    if args.decompress != "auto":
        given.append("decompress")
    if command is not None:
        given.append("-- CMD")
    if given:
        what = ", ".join(n if n.startswith("-") or n == "kernel" else "--" + n for n in given)
        raise UsageError(f"--restore takes the machine from the snapshot: {what} cannot be "
                         "given with it")


def command_snapshot(args):
    from pylguest.control import request_snapshot
    reply = request_snapshot(args.control, args.directory)
    if not reply["ok"]:
        say(f"pylguest: {reply.get('error')}")
        return stop.EXIT_USAGE
    say(f"pylguest: snapshot {reply.get('snapshot')}: taken in {reply.get('seconds')} s")
    return 0


def command_run(args, command=None):
    from pylguest.machine import Machine, MachineConfig
    from pylguest.hostconsole.terminal import RawTerminal
    check_restore(args, command)
    config = MachineConfig(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                           mem=parse_size(args.mem),
                           timeout=parse_timeout(args.timeout) if args.timeout is not None else None,
                           trace=args.trace, stats=args.stats, decompress=args.decompress, input_fd=0,
                           command=command, virtiofsd=args.virtiofsd, restore=args.restore,
                           disk_writes=args.disk_writes, control=args.control,
                           **{o.name: getattr(args, o.name) for o in DEVICE_OPTIONS})
    machine = Machine(config)
    try:
        with RawTerminal(0):
            result = machine.run()
    finally:
        machine.close()
    if result.reason not in ("shutdown", "reboot", "quit"):
        say(f"pylguest: {result}")
    return result.status


def command_info(args):
    from pylguest.info import describe
    text = (describe() + "\n").encode()
    try:
        while text:
            text = text[os.write(1, text):]
    except OSError:
        pass                      # `pylguest info | head -1`: the rest is not wanted
    return 0


def main(argv=None):
    """Run the command line; return the launcher's exit status.  A closed
    or broken stdout or stderr never changes that status (report.py)."""
    # Before anything is opened: a closed fd 0-2 must not be the next file.
    ensure_standard_fds()
    try:
        return _main(argv)
    finally:
        _quiet_standard_streams()


def _quiet_standard_streams():
    """argparse writes --help and its errors through sys.stdout/stderr; if
    those cannot be flushed (a broken pipe), point them at /dev/null so
    that Python's own flush at exit does not turn into exit status 120."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def _main(argv):
    try:
        options, command = split_command(sys.argv[1:] if argv is None else list(argv))
        args = build_parser().parse_args(options)
        if args.command == "run":
            if command is not None and not command:
                raise UsageError("-- must be followed by a command to run in the guest")
            return command_run(args, command)
        if command is not None:
            raise UsageError("only `pylguest run` takes a command after --")
        if args.command == "snapshot":
            return command_snapshot(args)
        return command_info(args)
    except (UsageError, BootError) as e:
        say(f"pylguest: {e}")
        return stop.EXIT_USAGE
    except PylguestError as e:
        say(f"pylguest: {e}")
        return stop.EXIT_LAUNCHER_ERROR
    except KeyboardInterrupt:
        return stop.EXIT_SIGNAL_BASE + 2
