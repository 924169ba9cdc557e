"""cpio "newc" archives: the format of a Linux initramfs.

Linux unpacks its initramfs from one or more cpio archives laid end to end
(Documentation/driver-api/early-userspace/buffer-format.rst), each one
compressed or not.  That is what lets the launcher hand a command to the
guest's init: it appends a small archive of its own to the user's initrd,
and the kernel unpacks both into the same root.

An archive is a sequence of entries, each

    header    110 ASCII bytes: the magic "070701", then 13 fields of
              8 hex digits: ino, mode, uid, gid, nlink, mtime, filesize,
              devmajor, devminor, rdevmajor, rdevminor, namesize, check
    name      namesize bytes, including the terminating NUL
    padding   to a multiple of 4 bytes, counting from the header's start
    data      filesize bytes (a file's contents, a symlink's target)
    padding   to a multiple of 4 bytes

ending with an entry named "TRAILER!!!".  Directories must come before
what they contain, because the kernel creates entries in order.

Archives written here are deterministic: the same entries give the same
bytes (inode numbers count up from a start, owners are root, every mtime is
the same), so an image can be cached and compared.
"""

import os
import stat

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
# Every entry's mtime.  SOURCE_DATE_EPOCH is the reproducible-builds
# convention for "the time to stamp into outputs"; without it, the epoch.
MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


class Archive:
    """A newc cpio archive built up in memory.

    `first_ino` matters when two archives are unpacked into one root: the
    kernel remembers hard links by inode number across archives, so each
    archive should number its entries from a different start.
    """

    def __init__(self, first_ino=1):
        self.data = bytearray()
        self.next_ino = first_ino

    def _entry(self, name, mode, body=b"", rdev=(0, 0), nlink=1):
        if isinstance(name, str):
            name = name.encode()
        namez = name + b"\0"
        fields = [self.next_ino, mode, 0, 0, nlink, MTIME, len(body),
                  0, 0, rdev[0], rdev[1], len(namez), 0]
        self.next_ino += 1
        self.data += MAGIC + b"".join(b"%08x" % f for f in fields) + namez
        self._pad()
        self.data += body
        self._pad()

    def _pad(self):
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name, perm=0o755):
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name, body, perm=0o644):
        self._entry(name, stat.S_IFREG | perm, bytes(body))

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name, major, minor, perm=0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self):
        """The archive's bytes, trailer included."""
        # The trailer is an ordinary header with everything zero (Linux
        # only looks at its name); cpio(1) also gives it nlink 1.
        self.next_ino = 0
        self._entry(TRAILER, 0)
        return bytes(self.data)


def read_newc(data, offset=0):
    """Parse one archive from `offset`: ([(name, mode, body, rdev)], end).

    `end` is the offset just past the trailer's padding.  Names come back as
    str when they are UTF-8, as bytes otherwise.  Used by the tests, and by
    boot/initrd.py to step over an uncompressed archive.
    """
    entries = []
    while True:
        header = data[offset:offset + HEADER_SIZE]
        if len(header) < HEADER_SIZE or header[:6] != MAGIC:
            raise ValueError(f"bad cpio header at offset {offset}: {bytes(header[:6])!r}")
        try:
            fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"bad cpio header at offset {offset}: not hex") from None
        mode, filesize, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        raw_name = bytes(data[offset + HEADER_SIZE:offset + HEADER_SIZE + namesize - 1])
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            name = raw_name
        offset += HEADER_SIZE + namesize
        offset += -offset % 4
        body = bytes(data[offset:offset + filesize])
        if len(body) != filesize:
            raise ValueError(f"cpio entry {name!r} is cut short")
        offset += filesize
        offset += -offset % 4
        if name == TRAILER:
            return entries, offset
        entries.append((name, mode, body, rdev))
