"""The lguest bus driver as a module, for a kernel that is not our own.

tools/module_initramfs.py builds guests/linux against a kernel's headers
and packs it, with that kernel's virtio modules in dependency order, into
an initramfs.  Here:

  - its .modinfo reader and its load order, against tiny ELF files written
    byte by byte below (with struct, not with the tool's code, so a
    misreading of the format cannot hide in both);
  - (slow) the build against Debian's cloud kernel headers, fetched by
    `make debian-kernel`: it must print no warning at all;
  - (slow) the initramfs for that kernel, read back entry by entry, with
    the agent program (guests/linux/agent.c) as /bin/pylguest-agent.

Debian's kernel itself does not reach user space on an emulating KVM; that
boot is tests/test_debian_kernel.py's.
"""

import lzma
import re
import stat
import struct
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from pylguest.boot.cpio import read_newc

sys.path.insert(0, str(ROOT / "tools"))      # tools/ is not a package
import module_initramfs                       # noqa: E402

DEBIAN = ROOT / "downloads" / "debian-kernel"
TOOL = ROOT / "tools" / "module_initramfs.py"
SOURCE = ROOT / "guests" / "linux"
BUILD_TIMEOUT = 600          # a clean build takes seconds; a busy machine, longer


# -- tiny kernel modules, by hand ---------------------------------------------------


def elf64(sections):
    """An ELF64 little-endian relocatable file with these (name, bytes)
    sections, after the null section; .shstrtab is added last."""
    names = b"\0"
    offsets = []
    for name, _ in sections + [(".shstrtab", b"")]:
        offsets.append(len(names))
        names += name.encode() + b"\0"
    bodies = [body for _, body in sections] + [names]
    data = bytearray(64)                          # the file header, filled in below
    places = []
    for body in bodies:
        places.append(len(data))
        data += body
    data += b"\0" * (-len(data) % 8)
    shoff = len(data)
    data += bytes(64)                             # section 0: the null section
    for name_offset, place, body in zip(offsets, places, bodies):
        # name, type (PROGBITS; STRTAB for the names), flags, addr, offset, size,
        # link, info, addralign, entsize
        kind = 3 if body is names else 1
        data += struct.pack("<IIQQQQIIQQ", name_offset, kind, 0, 0, place, len(body), 0, 0, 1, 0)
    shnum = len(bodies) + 1
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)   # 64-bit, little-endian, version 1
    # type REL, machine x86-64, version, entry, phoff, shoff, flags, ehsize,
    # phentsize, phnum, shentsize, shnum, shstrndx
    data[:64] = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64,
                                    0, 0, 64, shnum, shnum - 1)
    return bytes(data)


def ko(depends="", vermagic="6.1.0-test SMP mod_unload ", name="m"):
    """A module whose .modinfo sits between two other sections, with the
    alignment padding (doubled NULs) that real ones have."""
    modinfo = (b"license=GPL\0\0\0" + f"depends={depends}\0".encode() + b"\0"
               + f"name={name}\0vermagic={vermagic}\0".encode())
    return elf64([(".text", b"\x90" * 13), (".modinfo", modinfo), (".data", b"\1\2\3")])


def modules_dir(tmp_path, modules, builtin=()):
    """A lib/modules/<release> tree: {file name: .ko bytes}, plus modules.builtin."""
    drivers = tmp_path / "kernel" / "drivers"
    drivers.mkdir(parents=True)
    for file_name, body in modules.items():
        (drivers / file_name).write_bytes(body)
    (tmp_path / "modules.builtin").write_text(
        "".join(f"kernel/lib/{name}.ko\n" for name in builtin))
    return tmp_path


def order_of(moddir, roots):
    index = module_initramfs.module_index(moddir)
    return module_initramfs.load_order(roots, index, module_initramfs.builtin_names(moddir))


def test_modinfo_reads_depends_and_vermagic():
    info = module_initramfs.modinfo(ko(depends="virtio_ring,virtio", vermagic="6.1.0-9 SMP "))
    assert info["depends"] == "virtio_ring,virtio"
    assert info["vermagic"] == "6.1.0-9 SMP "
    assert info["license"] == "GPL"
    assert module_initramfs.depends(info) == ["virtio_ring", "virtio"]
    assert module_initramfs.depends(module_initramfs.modinfo(ko(depends=""))) == []


def test_modinfo_refuses_what_is_not_a_module():
    with pytest.raises(module_initramfs.ModuleError, match="not a 64-bit"):
        module_initramfs.modinfo(b"#!/bin/sh\n")
    with pytest.raises(module_initramfs.ModuleError, match=r"\.modinfo"):
        module_initramfs.modinfo(elf64([(".text", b"\x90")]))
    with pytest.raises(module_initramfs.ModuleError, match="cut short"):
        module_initramfs.modinfo(ko(depends="a")[:100])


def test_load_order_puts_a_diamond_s_base_first_and_loads_it_once(tmp_path):
    # top needs left and right, which both need base; left also needs crc,
    # which is built into the kernel and so has no .ko to load.
    moddir = modules_dir(tmp_path, {
        "top.ko": ko(depends="left,right"),
        "left.ko": ko(depends="base,crc"),
        "right.ko": ko(depends="base"),
        "base.ko": ko(),
        "unrelated.ko": ko(),
    }, builtin=["crc"])
    order = order_of(moddir, ["top"])
    assert sorted(order) == ["base", "left", "right", "top"]      # each once, nothing else
    assert order.index("base") < order.index("left") < order.index("top")
    assert order.index("base") < order.index("right") < order.index("top")


def test_load_order_follows_the_roots_and_dashed_file_names(tmp_path):
    # kbuild names virtio-rng.ko's module virtio_rng; depends= uses module names.
    moddir = modules_dir(tmp_path, {
        "virtio-rng.ko": ko(depends="virtio_ring,virtio"),
        "virtio.ko": ko(depends="virtio_ring"),
        "virtio_ring.ko": ko(),
    })
    assert order_of(moddir, ["virtio_rng"]) == ["virtio_ring", "virtio", "virtio_rng"]
    assert order_of(moddir, ["virtio", "virtio_rng"]) == ["virtio_ring", "virtio", "virtio_rng"]


def test_a_missing_dependency_is_a_clear_error(tmp_path):
    moddir = modules_dir(tmp_path, {"top.ko": ko(depends="ghost")}, builtin=["crc"])
    with pytest.raises(module_initramfs.ModuleError) as error:
        order_of(moddir, ["top"])
    message = str(error.value)
    assert "top depends on ghost" in message and "\n" not in message


def test_a_dependency_cycle_is_an_error_not_a_hang(tmp_path):
    moddir = modules_dir(tmp_path, {"a.ko": ko(depends="b"), "b.ko": ko(depends="a")})
    with pytest.raises(module_initramfs.ModuleError, match="circle: a -> b -> a"):
        order_of(moddir, ["a"])


def test_compressed_modules_are_read_and_renamed_plain(tmp_path):
    moddir = modules_dir(tmp_path, {"virtio-rng.ko.xz": lzma.compress(ko(depends="base")),
                                    "base.ko": ko()})
    index = module_initramfs.module_index(moddir)
    assert module_initramfs.plain_file_name(index["virtio_rng"]) == "virtio-rng.ko"
    assert order_of(moddir, ["virtio_rng"]) == ["base", "virtio_rng"]


def test_a_missing_agent_is_one_line_before_the_module_build(tmp_path, monkeypatch, capsys):
    # Headers that name their release; the build itself must not start.
    generated = tmp_path / "kdir" / "include" / "generated"
    generated.mkdir(parents=True)
    (generated / "utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-test"\n')
    monkeypatch.setattr(module_initramfs, "build_module",
                        lambda *_: pytest.fail("the module was built before the agent was found"))
    out = tmp_path / "initramfs.cpio"
    assert module_initramfs.main([str(out), "--kdir", str(tmp_path / "kdir"),
                                  "--modules", str(tmp_path), "--agent",
                                  str(tmp_path / "no-agent")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no-agent" in error and "make linux" in error
    assert not out.exists()


# -- Debian's cloud kernel (slow: a real module build) ----------------------------------


@pytest.fixture(scope="module")
def debian():
    """(KDIR, modules dir, release) of the kernel `make debian-kernel` fetched."""
    version = DEBIAN / "VERSION"
    if not (DEBIAN / "headers").is_dir() or not version.exists():
        why = f"{DEBIAN}/headers is missing: run `make debian-kernel` (it fetches the headers)"
        print(why)
        pytest.skip(why)
    release = version.read_text().strip()
    kdir = DEBIAN / "headers" / "usr" / "src" / f"linux-headers-{release}"
    return kdir, DEBIAN / "modules", release


def source_listing():
    return sorted(path.name for path in SOURCE.iterdir())


@pytest.mark.slow
def test_module_builds_against_debian_headers_without_warnings(debian, wall_time):
    kdir, _, release = debian
    before = source_listing()
    result = subprocess.run([sys.executable, TOOL, "--check-build-only", "--kdir", kdir],
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    wall_time(f"lguest.ko built against Debian {release} headers")
    assert result.returncode == 0, result.stderr
    assert not re.search("warning", result.stdout + result.stderr, re.IGNORECASE)
    assert f"built lguest.ko for {release}" in result.stdout
    assert source_listing() == before, "the build must not leave files in guests/linux"


@pytest.mark.slow
def test_a_warning_fails_the_build(debian, tmp_path, monkeypatch):
    # The driver with one unused static variable: W=1 warns about it.
    source = tmp_path / "source"
    source.mkdir()
    (source / "Kbuild").write_bytes((SOURCE / "Kbuild").read_bytes())
    (source / "lguest_device.c").write_bytes((SOURCE / "lguest_device.c").read_bytes()
                                             + b"\nstatic int never_used;\n")
    monkeypatch.setattr(module_initramfs, "SOURCE", source)
    (tmp_path / "work").mkdir()
    with pytest.raises(module_initramfs.ModuleError, match="warning.*never_used"):
        module_initramfs.build_module(debian[0], str(tmp_path / "work"))


def modinfo_field(body, key):
    """A .modinfo value, found by its "\\0key=" text (not by the tool's ELF reader)."""
    match = re.search(rb"\0" + key.encode() + rb"=([^\0]*)\0", body)
    return match.group(1).decode() if match else None


AGENT = b"\x7fELF a pretend pylguest-agent"


@pytest.fixture(scope="module")
def debian_initramfs(debian, tmp_path_factory):
    """The initramfs for Debian's kernel, built here: {name: (mode, body)}."""
    kdir, moddir, _ = debian
    work = tmp_path_factory.mktemp("debian")
    out, agent = work / "initramfs.cpio", work / "pylguest-agent"
    agent.write_bytes(AGENT)
    started = time.monotonic()
    result = subprocess.run([sys.executable, TOOL, out, "--kdir", kdir, "--modules", moddir,
                             "--agent", agent],
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    print(f"\nDebian initramfs: {time.monotonic() - started:.1f} s wall time")
    assert result.returncode == 0, result.stderr
    entries, end = read_newc(out.read_bytes())
    assert end == out.stat().st_size
    return {name: (mode, body) for name, mode, body, _ in entries}


@pytest.mark.slow
def test_debian_initramfs_carries_busybox_init_and_modules_in_order(debian, debian_initramfs):
    files = debian_initramfs
    mode, _ = files["bin/busybox"]
    assert stat.S_ISREG(mode) and mode & 0o111
    mode, init = files["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert init == (SOURCE / "init").read_bytes()
    mode, agent = files["bin/pylguest-agent"]
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755 and agent == AGENT

    modules = "lib/modules/pylguest/"
    order = files[modules + "load-order"][1].decode().split()
    for wanted in ("lguest.ko", "virtio_blk.ko", "virtio_net.ko", "virtio_console.ko",
                   "virtio-rng.ko"):
        assert wanted in order, order
    assert len(order) == len(set(order)), order
    loaded = set()
    for file_name in order:
        mode, body = files[modules + file_name]
        assert stat.S_ISREG(mode) and body.startswith(b"\x7fELF"), file_name
        # Every module it depends on was loaded before it.
        for dependency in filter(None, modinfo_field(body, "depends").split(",")):
            assert dependency in loaded, f"{file_name} is loaded before its {dependency}"
        loaded.add(file_name[:-len(".ko")].replace("-", "_"))
    assert order.index("virtio.ko") < order.index("lguest.ko")
    assert order.index("virtio_ring.ko") < order.index("lguest.ko")

    # Built against the headers of exactly the kernel it is for.
    _, _, release = debian
    vermagic = modinfo_field(files[modules + "lguest.ko"][1], "vermagic")
    assert vermagic.split()[0] == release, vermagic
