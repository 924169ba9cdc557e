"""Handing a command to the guest's init: `pylguest run ... -- CMD ARG...`.

The kernel command line cannot carry an arbitrary argument list: Linux
splits it at spaces, understands only double quotes, and hands init what it
does not recognise after turning some of it into environment variables.  A
test that runs `sh -c 'echo "it'"'"'s 3"'` needs every byte to arrive.

So the launcher writes the arguments into a small cpio archive appended to
the initrd (boot/initrd.py), one file per argument, each holding exactly
that argument's bytes:

    /pylguest/argv/0    "sh"
    /pylguest/argv/1    "-c"
    /pylguest/argv/2    "echo \"it's 3\""

pylguest's init (guests/linux/init) rebuilds the list from those files,
runs it, and powers off with its exit status.  Nothing is quoted or
escaped on the way, so there is nothing to get wrong; an argument can hold
anything but a NUL byte, which no argv can.
"""

import os

from pylguest.boot.cpio import Archive
from pylguest.errors import UsageError

ARGV_DIR = "pylguest/argv"
# Inode numbers far from any a user's archive would use: Linux matches hard
# links by inode number across the archives of one initramfs.
FIRST_INO = 0x70000000


def as_bytes(arg):
    """An argument as the bytes the user typed (str from sys.argv are
    decoded with surrogateescape, so os.fsencode gets the bytes back)."""
    return arg if isinstance(arg, bytes) else os.fsencode(arg)


def command_archive(argv):
    """The cpio archive that carries `argv` (a list of str or bytes)."""
    if not argv:
        raise UsageError("-- must be followed by a command")
    archive = Archive(first_ino=FIRST_INO)
    archive.directory("pylguest")
    archive.directory(ARGV_DIR)
    for index, arg in enumerate(argv):
        data = as_bytes(arg)
        if b"\0" in data:
            raise UsageError(f"argument {index} of the command holds a NUL byte")
        archive.file(f"{ARGV_DIR}/{index}", data)
    return archive.finish()
