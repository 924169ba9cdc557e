"""The initrd: what the launcher may do to it before the kernel sees it.

Linux reads its initramfs as a sequence of cpio archives, each either
plain or compressed (init/initramfs.c, unpack_to_rootfs()):

    a plain archive      starts with the newc magic "070701", at an offset
                         that is a multiple of 4
    zero bytes           padding between pieces, skipped
    anything else        a compressed stream (gzip, xz, zstd, ...), which
                         decompresses to more archives

Two things are done here, both keeping that format:

  * host decompression: on an emulating KVM, the kernel's inflate runs in
    emulated ring 0 (a 2 MB gzip'd busybox cost 55 s), so, under the same
    --decompress rule as the kernel itself, the launcher unpacks every
    compressed stream here and hands the kernel only plain archives.  On
    hardware KVM the guest decompresses, as it would on any PC;
  * appending an archive: the launcher passes a command to the guest's init
    as one more small archive at the end (boot/command.py).  Linux unpacks
    every archive into the same root, later ones over earlier ones.

An initrd is the user's file, but it is still checked like guest input: a
stream may not expand beyond MAX_OUTPUT in all, and a malformed one is a
BootError naming the file and the offset, not a decoder's exception.
"""

import re

from pylguest.boot import cpio
from pylguest.boot.decompress import MAX_OUTPUT, decompress_stream, format_at
from pylguest.errors import BootError

ALIGN = 4                          # plain archives start 4-byte aligned
_NOT_ZERO = re.compile(rb"[^\0]")


def is_initramfs(data):
    """Does this initrd start as an initramfs does: a cpio archive or a
    compressed stream?  Anything else (an old-style filesystem image that
    Linux loads into /dev/ram0) is handed to the kernel untouched."""
    return data.startswith(cpio.MAGIC) or format_at(data) is not None


def decompress_initrd(data, name):
    """The initrd with every compressed stream replaced by what it holds:
    plain archives only, each 4-byte aligned, ready for the kernel."""
    out = bytearray()
    at = 0
    while (piece := _NOT_ZERO.search(data, at)) is not None:
        at = piece.start()                       # past the padding between pieces
        if data.startswith(cpio.MAGIC, at):
            if at % ALIGN:
                raise BootError(f"{name}: offset {at}: a cpio archive must start at a "
                                f"multiple of {ALIGN} bytes, or Linux will not read it")
            try:
                _, end = cpio.read_newc(data, at)
            except ValueError as e:
                raise BootError(f"{name}: offset {at}: {e}") from None
            out += data[at:end]
            at = end
        else:
            fmt = format_at(data, at)
            if fmt is None:
                raise BootError(f"{name}: offset {at}: neither a cpio archive nor a "
                                f"compressed one (it starts {data[at:at + 6].hex(' ')})")
            output, leftover = decompress_stream(data[at:], fmt, f"{name} (offset {at})")
            if not output.startswith(cpio.MAGIC):
                raise BootError(f"{name}: offset {at}: the {fmt} stream does not hold "
                                "a cpio archive")
            out += output
            at = len(data) - len(leftover)
        out += bytes(-len(out) % ALIGN)
        if len(out) > MAX_OUTPUT:
            raise BootError(f"{name}: unpacks to more than {MAX_OUTPUT} bytes; refusing it")
    return bytes(out)


def append_archive(initrd, archive):
    """`initrd` with one more plain archive after it, 4-byte aligned."""
    return bytes(initrd) + bytes(-len(initrd) % ALIGN) + archive
