#!/usr/bin/env python3
"""Build a tiny busybox initramfs for booting a real Linux under pylguest.

    python3 tools/mkinitramfs.py OUT.cpio [--busybox /bin/busybox]

The image holds one static busybox and an /init script that mounts proc,
sysfs and devtmpfs, prints the marker line

    pylguest-initramfs: userspace up

and starts a shell on the console.  When that shell exits, /init reboots,
which Linux does through the i8042 reset line that the launcher treats as
"the guest stopped".

The busybox comes from Debian's busybox-static package (/bin/busybox); if
it is missing and we are root, we install that package with apt-get.

The archive is written here, in Python, so that building it needs no
cpio tool, and it is deterministic: the same busybox gives the same bytes
(fixed inode numbers, owners and mtimes, entries in a fixed order).  It is
left uncompressed: on an emulating KVM (design.md section 7) the kernel's
decompressor would run in emulated ring 0, and it costs nothing to skip.

The format Linux unpacks (Documentation/driver-api/early-userspace/
buffer-format.rst) is cpio "newc": a sequence of entries, each

    header    110 ASCII bytes: the magic "070701", then 13 fields of
              8 hex digits: ino, mode, uid, gid, nlink, mtime, filesize,
              devmajor, devminor, rdevmajor, rdevminor, namesize, check
    name      namesize bytes, including the terminating NUL
    padding   to a multiple of 4 bytes, counting from the header's start
    data      filesize bytes (a file's contents, a symlink's target)
    padding   to a multiple of 4 bytes

ending with an entry named "TRAILER!!!".  Directories must come before
what they contain, because the kernel creates entries in order.
"""

import argparse
import os
import shutil
import stat
import subprocess
import sys

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# Every entry's mtime.  SOURCE_DATE_EPOCH is the reproducible-builds
# convention for "the time to stamp into outputs"; without it, the epoch.
MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
MARKER = "pylguest-initramfs: userspace up"

# /init runs as PID 1 with /dev/console as stdin/stdout/stderr (the kernel
# opens it from the initramfs before exec'ing /init, which is why the
# archive carries a /dev/console node of its own: devtmpfs is not mounted
# yet at that point).
INIT_SCRIPT = f"""\
#!/bin/busybox sh
# pylguest initramfs: bring up a minimal userspace and give the console a shell.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{MARKER}"
# setsid + cttyhack make the console (found through /sys/class/tty/console)
# the shell's controlling terminal, so job control and ^C work.
setsid cttyhack sh
echo "pylguest-initramfs: shell exited, rebooting"
reboot -f
"""


class Archive:
    """A newc cpio archive built up in memory."""

    def __init__(self):
        self.data = bytearray()
        self.next_ino = 1     # inode numbers only need to be distinct

    def _entry(self, name, mode, body=b"", rdev=(0, 0), nlink=1):
        namez = name.encode() + b"\0"
        fields = [self.next_ino, mode, 0, 0, nlink, MTIME, len(body),
                  0, 0, rdev[0], rdev[1], len(namez), 0]
        self.next_ino += 1
        self.data += MAGIC + b"".join(b"%08x" % f for f in fields) + namez
        self._pad()
        self.data += body
        self._pad()

    def _pad(self):
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name):
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name, body, perm=0o644):
        self._entry(name, stat.S_IFREG | perm, body)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name, major, minor, perm=0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self):
        # The trailer is an ordinary header with everything zero (Linux
        # only looks at its name); cpio(1) also gives it nlink 1.
        self.next_ino = 0
        self._entry(TRAILER, 0)
        return bytes(self.data)


def build(busybox_bytes):
    """The initramfs image (uncompressed newc cpio) as bytes."""
    archive = Archive()
    for directory in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                      "tmp", "root", "etc"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, perm=0o666)
    archive.file("bin/busybox", busybox_bytes, perm=0o755)
    # sh must exist before /init runs `busybox --install`.
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT_SCRIPT.encode(), perm=0o755)
    return archive.finish()


def read_newc(data):
    """Parse a newc archive back into [(name, mode, body, (rdevmajor, rdevminor))];
    used by the tests, and a compact statement of the format."""
    entries, offset = [], 0
    while True:
        header = data[offset:offset + 110]
        if header[:6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {offset}: {header[:6]!r}")
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name = data[offset + 110:offset + 110 + namesize - 1].decode()
        offset += 110 + namesize
        offset += -offset % 4
        body = data[offset:offset + filesize]
        offset += filesize
        offset += -offset % 4
        if name == TRAILER:
            return entries
        entries.append((name, mode, body, rdev))


def find_busybox(path):
    """A static busybox: the given path, or Debian's, installed if need be."""
    if os.path.exists(path):
        return path
    if path != "/bin/busybox":
        raise SystemExit(f"mkinitramfs: {path} does not exist")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("mkinitramfs: /bin/busybox is missing: install Debian's busybox-static "
                         "(`make deps` does)")
    print("mkinitramfs: installing busybox-static", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "install", "-y", "-qq", "busybox-static"],
                 ["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "busybox-static"]):
        # Try once with the lists we have; if that fails, update and retry.
        if subprocess.run(argv, env=env, stdout=subprocess.DEVNULL).returncode == 0 \
                and os.path.exists(path):
            return path
    raise SystemExit("mkinitramfs: could not install busybox-static with apt-get")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the .cpio file to write")
    parser.add_argument("--busybox", default="/bin/busybox",
                        help="a statically linked busybox (default: Debian's /bin/busybox)")
    args = parser.parse_args(argv)
    with open(find_busybox(args.busybox), "rb") as f:
        busybox = f.read()
    image = build(busybox)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    partial = args.out + ".partial"
    with open(partial, "wb") as f:
        f.write(image)
    os.replace(partial, args.out)
    print(f"mkinitramfs: wrote {args.out} ({len(image)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
