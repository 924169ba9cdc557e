#!/usr/bin/env python3
"""Build an initramfs for a kernel that is not pylguest's own.

    python3 tools/module_initramfs.py OUT.cpio --kdir KDIR --modules MODDIR
    python3 tools/module_initramfs.py --check-build-only --kdir KDIR

pylguest's own kernel has the lguest bus driver built in.  Any other kernel
(Debian's, or the one your machine runs) has never heard of the lguest bus:
it finds no disk, no network, no way to hand back an exit status.  Such a
kernel can still run under pylguest if its initramfs brings

  - the lguest bus driver (guests/linux), built as a module against exactly
    that kernel: Linux refuses a module whose "vermagic" string (release,
    SMP, preempt, ...) differs from its own;
  - that kernel's virtio drivers (virtio_blk, virtio_net, virtio_console,
    virtio_rng, and virtiofs for `pylguest run --share` and a virtio-fs
    --root) and the file systems /init mounts (overlay, over a read-only
    --root; ext4, a --root IMAGE), with every module they need (virtiofs
    needs fuse), from its lib/modules/<release>; any of them the kernel
    has built in (Debian's cloud kernel: ext4) needs nothing;
  - the order to load them in: a module loads only after the modules whose
    symbols it uses.  /init (guests/linux/init) loads them with busybox's
    insmod, which, unlike modprobe, resolves nothing itself.

The rest is tools/mkinitramfs.py's image: busybox, /init, and the agent
program (build/linux/pylguest-agent, or --agent PATH), which is a static
user-space program and so the same for every kernel.

KDIR is the kernel's build directory or headers package (what `make -C KDIR
M=... modules` needs) and MODDIR its lib/modules/<release>.  For Debian's
cloud kernel, `make debian-initramfs` passes those that `make debian-kernel`
fetched (tools/fetch_debian_kernel.py) and writes build/debian/initramfs.cpio.
For the kernel your machine runs, with its headers package installed
(Debian: linux-headers-$(uname -r)):

    python3 tools/module_initramfs.py my-initramfs.cpio \\
        --kdir /lib/modules/$(uname -r)/build --modules /lib/modules/$(uname -r)
    pylguest run /boot/vmlinuz-$(uname -r) --initrd my-initramfs.cpio -- uname -a

That needs hardware KVM: on an emulating KVM a distribution's kernel does
not reach user space (docs/linux.md).

We find the modules without kmod's modinfo and depmod, which a minimal
machine lacks and which are worth doing once by hand:
  - A module's name is its file name without ".ko" (and any compression
    suffix), with "-" read as "_": virtio-rng.ko is the module virtio_rng.
  - A .ko is an ELF relocatable file.  Its ".modinfo" section holds
    NUL-separated "key=value" strings, among them
        depends=virtio_ring,virtio
    (written by modpost: the modules whose symbols this one uses) and
        vermagic=6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions
  - A name in depends= with no .ko of its own is built into the kernel
    (MODDIR/modules.builtin lists those), so there is nothing to load.
    Any other name is missing, and the module could never load: an error.

The build runs in a temporary copy of guests/linux, so no build products
land in the source tree.  It must also be clean: we build with W=1 (the
kernel's extra warnings) and any output line that mentions a warning fails
the build, so a warning never scrolls by unread.  Like tools/mkinitramfs.py
the result is deterministic: the same kernel gives the same bytes.  Errors
are one line on stderr and exit status 2.
"""

import argparse
import gzip
import lzma
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import zstandard                  # a dependency of pylguest (zstd bzImages) already

import mkinitramfs

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "guests" / "linux"
BUS_DRIVER = "lguest"
# The drivers for the devices the launcher offers, in the order we load
# them, after the bus driver: that one goes first, so that even if a
# driver fails to load, /init's exit status still reaches the launcher.
DRIVERS = ("virtio_blk", "virtio_net", "virtio_console", "virtio_rng", "virtiofs")
# The file systems /init (guests/linux/init, mount_root) mounts besides the
# kernel's own proc, sysfs, devtmpfs and tmpfs, loaded after the drivers:
# overlay puts a tmpfs over a read-only --root, and a --root IMAGE is ext4.
# (A virtio-fs share or root is the virtiofs driver's, above.)
FILE_SYSTEMS = ("overlay", "ext4")
BUILD_TIMEOUT = 300                     # seconds; a clean build takes a few
WARNING = re.compile(r"warning", re.IGNORECASE)
# Variables the outer make (`make debian-initramfs`) exports to its
# children.  Passed on to the kernel's make they would add flags or our own
# variables to its command line, and a jobserver it cannot reach (Python
# closes the pipe) makes it print "warning: jobserver unavailable".
OUTER_MAKE_VARIABLES = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")


class ModuleError(Exception):
    """A failure we report as one line."""


# -- reading a .ko: ELF sections and .modinfo ----------------------------------------

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1
# Fields of the ELF64 file header that locate the section headers.
ELF_HEADER = struct.Struct("<16xHHIQQQIHHHHHH")
# One ELF64 section header: name, type, flags, addr, offset, size, link,
# info, addralign, entsize.
SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")


def elf_sections(data):
    """{section name: section bytes} of a 64-bit little-endian ELF file (a
    kernel module for x86-64)."""
    if data[:4] != ELF_MAGIC or data[4:6] != bytes([ELFCLASS64, ELFDATA2LSB]):
        raise ModuleError("not a 64-bit little-endian ELF file")
    try:
        (_type, _machine, _version, _entry, _phoff, shoff, _flags, _ehsize, _phentsize,
         _phnum, shentsize, shnum, shstrndx) = ELF_HEADER.unpack_from(data, 0)
        headers = [SECTION_HEADER.unpack_from(data, shoff + i * shentsize)
                   for i in range(shnum)]
        # Section names are offsets into one section of strings, .shstrtab,
        # whose index the file header gives.
        names_offset = headers[shstrndx][4]
        sections = {}
        for name, _type, _flags, _addr, offset, size, *_ in headers:
            end = data.index(b"\0", names_offset + name)
            sections[data[names_offset + name:end].decode()] = data[offset:offset + size]
        return sections
    except (struct.error, IndexError, ValueError):
        raise ModuleError("ELF file cut short or with a broken section table") from None


def modinfo(data):
    """A module's .modinfo as a dict.  A key that appears more than once
    (alias=, parm=) keeps its last value; we read only keys that appear
    once (depends=, vermagic=)."""
    section = elf_sections(data).get(".modinfo")
    if section is None:
        raise ModuleError("ELF file without a .modinfo section: not a kernel module")
    info = {}
    for entry in section.split(b"\0"):
        key, equals, value = entry.decode(errors="replace").partition("=")
        if equals:
            info[key] = value
    return info


def depends(info):
    """The module names in depends= (none when it is empty)."""
    return [name for name in info.get("depends", "").split(",") if name]


# -- the kernel's modules ------------------------------------------------------------


def zstd_decompress(data):
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


# Distributions may compress their modules; /init's insmod gets them plain.
COMPRESSED = {".ko": None, ".ko.xz": lzma.decompress, ".ko.gz": gzip.decompress,
              ".ko.zst": zstd_decompress}


def split_suffix(file_name):
    """("virtio-rng", ".ko.xz") for virtio-rng.ko.xz; None for other files."""
    for suffix in COMPRESSED:
        if file_name.endswith(suffix):
            return file_name[:-len(suffix)], suffix
    return None


def module_name(file_name):
    """virtio-rng.ko -> virtio_rng: how kbuild names a module after its file."""
    return split_suffix(file_name)[0].replace("-", "_")


def plain_file_name(path):
    """The name the module gets in the initramfs: virtio-rng.ko.xz -> virtio-rng.ko."""
    return split_suffix(os.path.basename(path))[0] + ".ko"


def read_module(path):
    """A module's bytes, decompressed."""
    with open(path, "rb") as f:
        data = f.read()
    decompress = COMPRESSED[split_suffix(os.path.basename(path))[1]]
    try:
        return decompress(data) if decompress else data
    except (lzma.LZMAError, EOFError, OSError, zstandard.ZstdError):
        raise ModuleError(f"{path}: cannot decompress it") from None


def module_index(moddir):
    """{module name: path} of every module file under MODDIR.  If a name
    appears twice, updates/ wins, as in depmod's default search order (it
    holds modules that replace the kernel's own)."""
    paths = []
    for directory, _subdirs, files in os.walk(moddir):   # does not follow build/ links
        paths += [os.path.join(directory, f) for f in files if split_suffix(f)]
    updates = os.path.join(moddir, "updates") + os.sep
    index = {}
    for path in sorted(paths, key=lambda p: (not p.startswith(updates), p)):
        index.setdefault(module_name(os.path.basename(path)), path)
    return index


def builtin_names(moddir):
    """The modules built into the kernel, from modules.builtin (one
    "kernel/.../name.ko" a line); empty if the file is missing."""
    try:
        with open(os.path.join(moddir, "modules.builtin")) as f:
            names = [os.path.basename(line.strip()) for line in f]
    except FileNotFoundError:
        return set()
    return {module_name(name) for name in names if split_suffix(name)}


def load_order(roots, index, builtin):
    """`roots` and every module they need, as names in an order to load
    them: each after all of its dependencies, each once.

    A depth-first walk: a module is appended only when everything it
    depends on has been.  `visiting` is the path of the walk, which lets
    us recognise a cycle rather than recurse forever."""
    order, visiting = [], []

    def visit(name, needed_by):
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise ModuleError(f"modules depend on each other in a circle: {cycle}")
        if name not in index:
            who = f"{needed_by} depends on {name}, which" if needed_by else name
            raise ModuleError(f"{who} is neither a module here ({name}.ko) nor built into "
                              f"the kernel (modules.builtin)")
        visiting.append(name)
        try:
            info = modinfo(read_module(index[name]))
        except ModuleError as e:
            raise ModuleError(f"{index[name]}: {e}") from None
        for dependency in depends(info):
            if dependency not in index and dependency in builtin:
                continue            # part of the kernel: nothing to load
            visit(dependency, name)
        visiting.pop()
        order.append(name)

    for root in roots:
        visit(root, None)
    return order


# -- building the bus driver ---------------------------------------------------------


def kernel_release(kdir):
    """The release KDIR builds for, as vermagic will spell it.  We read
    include/generated/utsrelease.h, where vermagic comes from; Debian's
    headers carry an include/config/kernel.release that says otherwise."""
    path = os.path.join(kdir, "include", "generated", "utsrelease.h")
    try:
        with open(path) as f:
            match = re.search(r'#define\s+UTS_RELEASE\s+"([^"]+)"', f.read())
    except FileNotFoundError:
        match = None
    if not match:
        raise ModuleError(f"{path} is missing or names no UTS_RELEASE: {kdir} is not a "
                          f"configured kernel build or headers directory")
    return match.group(1)


def copy_source(work):
    """A copy of the driver's source to build in; the original stays clean."""
    copy = os.path.join(work, "lguest")
    os.makedirs(copy)
    for path in SOURCE.iterdir():
        if path.name == "Kbuild" or path.suffix in (".c", ".h"):
            shutil.copyfile(path, os.path.join(copy, path.name))
    return copy


def make_module(kdir, source):
    """Run the kernel's make on the driver; return its output (stdout and
    stderr together, as a user would have seen them)."""
    env = {k: v for k, v in os.environ.items() if k not in OUTER_MAKE_VARIABLES}
    # Compiler messages in English, so that a warning says "warning".  The
    # kernel's Makefile unexports LC_ALL, so LANG must say it too.
    env.update(LC_ALL="C", LANG="C")
    argv = ["make", "-C", os.path.abspath(kdir), f"M={source}", "W=1",
            # BTF (type information for BPF) is made from the kernel's
            # vmlinux, which headers do not have; without it kbuild says
            # "Skipping BTF generation".  The driver does not need BTF.
            "CONFIG_DEBUG_INFO_BTF_MODULES=",
            # The compiler writes source paths into the module (debug
            # information, __FILE__).  Ours is a random temporary directory;
            # naming it guests/linux makes the module, and so the initramfs,
            # the same bytes from one build to the next.
            f"KCFLAGS=-ffile-prefix-map={source}=guests/linux", "modules"]
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, timeout=BUILD_TIMEOUT)
    except FileNotFoundError:
        raise ModuleError("make is not installed (Debian: apt-get install make)") from None
    except subprocess.TimeoutExpired:
        raise ModuleError(f"building the lguest module took over {BUILD_TIMEOUT} s; "
                          f"gave up") from None
    if result.returncode != 0:
        raise ModuleError(f"building the lguest module against {kdir} failed: "
                          f"{first_cause(result.stdout)}")
    return result.stdout


def first_cause(output):
    """The line that says why a build failed: the first that names an
    error, not make's "*** [target] Error 2" lines that follow it."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"error|not found|no such file|Stop\.$", line, re.IGNORECASE) \
                and not re.search(r"\*\*\* \[.*\] Error \d+$", line):
            return line
    return lines[-1] if lines else "no output"


def without_paths(line, *paths):
    """The line without our own paths in it, which could hold the word
    "warning" themselves (a directory named test_a_warning..., say)."""
    for path in paths:
        # make prints the directory it entered with symbolic links resolved.
        for spelling in (os.path.realpath(path), os.path.abspath(path)):
            line = line.replace(spelling, "")
    return line


def build_module(kdir, work):
    """Build lguest.ko against KDIR in a copy under `work`; return its path
    and the build's wall time."""
    source = copy_source(work)
    started = time.monotonic()
    output = make_module(kdir, source)
    seconds = time.monotonic() - started
    warnings = [line.strip() for line in output.splitlines()
                if WARNING.search(without_paths(line, source, kdir))]
    if warnings:
        raise ModuleError(f"building the lguest module against {kdir} printed "
                          f"{len(warnings)} warning line(s); the first: {warnings[0]}")
    ko = os.path.join(source, f"{BUS_DRIVER}.ko")
    if not os.path.exists(ko):
        raise ModuleError(f"the build against {kdir} succeeded but left no {BUS_DRIVER}.ko")
    return ko, seconds


def check_vermagic(path, release):
    """The module was built for `release`; return its whole vermagic."""
    vermagic = modinfo(read_module(path)).get("vermagic", "")
    if vermagic.split()[:1] != [release]:
        raise ModuleError(f"{os.path.basename(path)} has vermagic {vermagic!r}, but the "
                          f"kernel is {release}")
    return vermagic


def check_same_kernel(names, index, vermagic):
    """Every module is for the kernel the bus driver was built for: catches
    a --modules directory that belongs to another kernel than --kdir."""
    for name in names:
        theirs = modinfo(read_module(index[name])).get("vermagic", "")
        if theirs != vermagic:
            raise ModuleError(f"{index[name]} has vermagic {theirs!r}, but the lguest module "
                              f"built against --kdir has {vermagic!r}: --kdir and --modules "
                              f"must belong to the same kernel")


# -- putting it together -------------------------------------------------------------


def drivers_to_load(index, builtin):
    """Those of DRIVERS and FILE_SYSTEMS this kernel has as modules, in that
    order.  One built in needs no loading; one it lacks altogether leaves
    that kind of device without a driver, or /init unable to mount that
    file system, which we say but do not refuse."""
    roots = []
    for names, kind, loss in ((DRIVERS, "driver", "its devices will not work"),
                              (FILE_SYSTEMS, "file system", "/init cannot mount it")):
        for name in names:
            if name in index:
                roots.append(name)
            elif name not in builtin:
                print(f"module_initramfs: note: this kernel has no {name} {kind}; {loss}",
                      flush=True)
    return roots


def initramfs_modules(ko, moddir, vermagic):
    """The (file name, bytes) pairs for mkinitramfs, in load order."""
    index = module_index(moddir)
    if not index:
        raise ModuleError(f"{moddir} holds no kernel modules (.ko files)")
    index[BUS_DRIVER] = ko
    builtin = builtin_names(moddir)
    order = load_order([BUS_DRIVER] + drivers_to_load(index, builtin), index, builtin)
    check_same_kernel([name for name in order if name != BUS_DRIVER], index, vermagic)
    return [(plain_file_name(index[name]), read_module(index[name])) for name in order]


def build_initramfs(kdir, moddir, out, busybox, check_build_only=False,
                    agent=mkinitramfs.AGENT):
    release = kernel_release(kdir)
    if not check_build_only and not os.path.exists(agent):
        # Said now, not after the module build.
        raise ModuleError(f"{agent} is missing: `make linux` builds it from "
                          f"guests/linux/agent.c")
    with tempfile.TemporaryDirectory(prefix="lguest-module-") as work:
        ko, seconds = build_module(kdir, work)
        vermagic = check_vermagic(ko, release)
        print(f"module_initramfs: built lguest.ko for {release} in {seconds:.1f} s, "
              f"cleanly (W=1)", flush=True)
        if check_build_only:
            return
        modules = initramfs_modules(ko, moddir, vermagic)
    try:
        image = mkinitramfs.build_from(busybox, modules, agent)
    except SystemExit as e:           # find_busybox and read_agent say what is missing so
        raise ModuleError(str(e).removeprefix("mkinitramfs: ")) from None
    mkinitramfs.write_atomically(out, image)
    print(f"module_initramfs: wrote {out} ({len(image)} bytes); load order: "
          f"{' '.join(name for name, _ in modules)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", help="the .cpio file to write")
    parser.add_argument("--kdir", required=True,
                        help="the kernel's build or headers directory, e.g. "
                             "/lib/modules/$(uname -r)/build")
    parser.add_argument("--modules", help="the kernel's modules, e.g. /lib/modules/$(uname -r)")
    parser.add_argument("--busybox", default="/bin/busybox",
                        help="a statically linked busybox (default: Debian's /bin/busybox)")
    parser.add_argument("--agent", default=mkinitramfs.AGENT,
                        help="the static pylguest-agent program (default: "
                             "build/linux/pylguest-agent, which `make linux` builds)")
    parser.add_argument("--check-build-only", action="store_true",
                        help="only build the lguest module and check it; write nothing")
    args = parser.parse_args(argv)
    if not args.check_build_only and not (args.out and args.modules):
        parser.error("OUT and --modules are needed, unless --check-build-only")
    try:
        build_initramfs(args.kdir, args.modules, args.out, args.busybox, args.check_build_only,
                        args.agent)
    except (ModuleError, OSError) as e:
        print(f"module_initramfs: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
