"""A real kernel through our loader: Debian's cloud kernel, host-decompressed.

The kernel comes from `make debian-kernel` (tools/fetch_debian_kernel.py),
the initramfs from `make debian-initramfs` (tools/module_initramfs.py: our
lguest bus driver built against Debian's headers, with Debian's own virtio
modules, and those /init needs to mount virtio-fs shares and a --root).
What that initramfs carries, and in which order /init loads it, is checked
here on any machine.  Everything asserted about the boot is what Linux
itself prints on the UART, so the test checks the launcher from the guest's
side: the command line it passed, and the e820 map it wrote.

How far the boot goes depends on the kind of KVM (docs/abi.md section 7):
  - hardware KVM: all the way to a command in the initramfs, which looks
    for the virtio_blk driver and exits with status 7; that status reaches
    us only through the lguest bus driver, so the modules loaded;
  - emulating KVM: guest ring 0 runs about a thousand times slower and
    Linux needs minutes to reach userspace (if it gets there at all), so we
    stop after the command line and the e820 map (about 12 s after entry)
    and report how far the kernel had got.
"""

import importlib.util
import os
import re
import subprocess
import shutil
import stat
import time
import warnings

import sys

import pytest

from conftest import ROOT
from pylguest import Guest
from pylguest.boot.cpio import read_newc
from pylguest.kvm import detect_kvm_kind

sys.path.insert(0, str(ROOT / "tools"))      # tools/ is not a package
import module_initramfs                       # noqa: E402

KERNEL = ROOT / "downloads" / "debian-kernel" / "vmlinuz"
VERSION = ROOT / "downloads" / "debian-kernel" / "VERSION"
MODULES_BUILTIN = ROOT / "downloads" / "debian-kernel" / "modules" / "modules.builtin"
INITRAMFS = ROOT / "build" / "debian" / "initramfs.cpio"
MODULES = "lib/modules/pylguest/"           # where /init finds them (guests/linux/init)

# panic=-1: a kernel that panics reboots at once (through the i8042, which
# stops the launcher) instead of sitting there until the timeout.
# loglevel=7: with a command to run, the launcher adds `quiet`, which would
# hide the lines this test reads; our words come after it and win.
CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1 loglevel=7"
# On hardware KVM: proof that the virtio modules loaded, and an exit
# status that only the lguest bus driver can carry out.
COMMAND = ["sh", "-c", "ls /sys/bus/virtio/drivers/virtio_blk && exit 7"]
COMMAND_STATUS = 7

# The e820 map for --mem 512M, stated from docs/abi.md section 2, not computed
# with the launcher's code (that would be a test that cannot fail):
E820_512M = [
    "[mem 0x0000000000000000-0x000000000009fbff] usable",    # low RAM
    "[mem 0x000000000009fc00-0x00000000000fffff] reserved",  # EBDA, VGA, BIOS
    "[mem 0x0000000000100000-0x000000001fffffff] usable",    # RAM up to 512 MiB
    "[mem 0x0000000020000000-0x0000000020000fff] reserved",  # device page = max_pfn << 12
    "[mem 0x00000000feb00000-0x00000000feb00fff] reserved",  # the hypercall page
]
DEVICE_PAGE_ARG = "lguest.devices=0x20000000"

# Generous: on emulating KVM the banner, command line and e820 map arrive
# about 12 s after entry; a loaded CI machine may take several times that.
EXPECT_TIMEOUT = 120
GUEST_TIMEOUT = EXPECT_TIMEOUT + 30


class BootProgress(UserWarning):
    """How far Linux got on emulating KVM: information for the CI log, shown
    in pytest's warnings summary so it is visible without -s."""


def load_mkinitramfs():
    """tools/ is not a package: load tools/mkinitramfs.py by path."""
    spec = importlib.util.spec_from_file_location("mkinitramfs", ROOT / "tools" / "mkinitramfs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mkinitramfs = load_mkinitramfs()


# -- the initramfs builder ---------------------------------------------------------


def test_mkinitramfs_writes_a_deterministic_newc_archive(tmp_path):
    busybox = b"\x7fELF pretend busybox" + bytes(range(7))   # an odd length, to test padding
    agent = b"\x7fELF pretend agent" + bytes(range(3))
    init_script = mkinitramfs.INIT.read_bytes()
    image = mkinitramfs.build(busybox, ["bin/sh", "sbin/poweroff"], init_script,
                              agent_bytes=agent)
    assert mkinitramfs.build(busybox, ["bin/sh", "sbin/poweroff"], init_script,
                             agent_bytes=agent) == image, \
        "the same input must give the same bytes"
    assert image.startswith(b"070701") and len(image) % 4 == 0

    entries = {name: (mode, body, rdev) for name, mode, body, rdev in read_newc(image)[0]}
    assert entries["bin/busybox"][1] == busybox
    assert stat.S_ISREG(entries["bin/busybox"][0]) and entries["bin/busybox"][0] & 0o111
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"/bin/busybox"
    # The agent, where /init looks for it (guests/linux/init, start_agent).
    agent_mode, agent_body, _ = entries["bin/pylguest-agent"]
    assert stat.S_ISREG(agent_mode) and stat.S_IMODE(agent_mode) == 0o755
    assert agent_body == agent
    assert b"/bin/pylguest-agent" in init_script and b"pylguest.agent" in init_script
    # The kernel opens /dev/console before /init runs, before devtmpfs exists.
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    for directory in ("proc", "sys", "dev"):
        assert stat.S_ISDIR(entries[directory][0])
    init_mode, init, _ = entries["init"]
    assert stat.S_ISREG(init_mode) and init_mode & 0o111
    assert init == init_script
    for mount in (b"-t proc", b"-t sysfs", b"-t devtmpfs"):
        assert mount in init

    # And the real cpio tool, when there is one, reads the same archive.
    if shutil.which("cpio"):
        archive = tmp_path / "initramfs.cpio"
        archive.write_bytes(image)
        listing = subprocess.run(["cpio", "-t", "--quiet"], stdin=archive.open("rb"),
                                 capture_output=True, text=True, check=True).stdout.split()
        assert listing == [name for name, *_ in read_newc(image)[0]]


def test_mkinitramfs_packs_the_agent_it_is_given(tmp_path):
    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox is missing: run `make deps`")
    agent = tmp_path / "pylguest-agent"
    agent.write_bytes(b"\x7fELF a pretend agent")
    out = tmp_path / "initramfs.cpio"
    assert mkinitramfs.main([str(out), "--agent", str(agent)]) == 0
    entries = {name: (mode, body) for name, mode, body, _ in read_newc(out.read_bytes())[0]}
    mode, body = entries["bin/pylguest-agent"]
    assert stat.S_IMODE(mode) == 0o755 and body == agent.read_bytes()
    assert stat.S_ISREG(entries["bin/busybox"][0])


def test_mkinitramfs_without_the_agent_is_a_one_line_error(tmp_path):
    out = tmp_path / "initramfs.cpio"
    with pytest.raises(SystemExit) as error:
        mkinitramfs.main([str(out), "--agent", str(tmp_path / "no-agent")])
    message = str(error.value)
    assert "no-agent" in message and "make linux" in message and "\n" not in message
    assert not out.exists()


# -- booting Debian's kernel ---------------------------------------------------------


@pytest.fixture(scope="module")
def debian_kernel():
    if not KERNEL.exists():
        pytest.skip("run `make debian-kernel` first")
    return KERNEL


@pytest.fixture(scope="module")
def initramfs(debian_kernel):
    """`make debian-initramfs`'s image, if it is for the kernel we have: one
    built before `make debian-kernel` fetched a newer kernel carries modules
    that kernel would refuse."""
    if not INITRAMFS.exists():
        pytest.skip(f"{INITRAMFS} is missing: run `make debian-initramfs`")
    release = VERSION.read_text().strip()
    entries = {name: body for name, _, body, _ in read_newc(INITRAMFS.read_bytes())[0]}
    lguest = entries.get("lib/modules/pylguest/lguest.ko", b"")
    if b"\0vermagic=" + release.encode() + b" " not in lguest:
        pytest.skip(f"{INITRAMFS} is not for Linux {release}: run `make debian-initramfs`")
    return INITRAMFS


# -- what the initramfs for Debian's kernel carries ------------------------------------


def test_the_initramfs_asks_for_virtiofs_overlay_and_ext4_after_the_device_drivers(capsys):
    # Which modules the tool starts its walk from, against a made-up kernel
    # (names only: drivers_to_load reads no module).  virtiofs mounts
    # --share and a virtio-fs --root; overlay goes over a read-only --root;
    # a --root IMAGE is ext4, which this kernel has built in.
    index = {name: f"kernel/{name}.ko" for name in
             ("virtio_blk", "virtio_net", "virtio_console", "virtio_rng", "virtiofs",
              "overlay", "fuse", "unrelated")}
    roots = module_initramfs.drivers_to_load(index, {"ext4"})
    assert roots == ["virtio_blk", "virtio_net", "virtio_console", "virtio_rng", "virtiofs",
                     "overlay"]
    assert capsys.readouterr().out == "", "a built-in ext4 needs no word"

    # A kernel with neither: said in one line each, not refused.
    del index["overlay"], index["virtiofs"]
    roots = module_initramfs.drivers_to_load(index, set())
    assert roots == ["virtio_blk", "virtio_net", "virtio_console", "virtio_rng"]
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 3, notes
    assert "no virtiofs driver" in notes[0]
    assert "no overlay file system" in notes[1] and "no ext4 file system" in notes[2]


def builtin_modules():
    """The modules built into the fetched kernel, named as depends= names
    them: kernel/fs/ext4/ext4.ko -> ext4 (read here, not with the tool)."""
    return {line.strip().rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_")
            for line in MODULES_BUILTIN.read_text().splitlines() if line.strip()}


def modinfo_depends(body):
    """depends= of a module, found by its "\\0depends=" text."""
    match = re.search(rb"\0depends=([^\0]*)\0", body)
    assert match, "a module without depends="
    return [name for name in match.group(1).decode().split(",") if name]


def test_debian_initramfs_carries_virtiofs_overlay_and_ext4_in_dependency_order(initramfs):
    entries = {name: body for name, _, body, _ in read_newc(initramfs.read_bytes())[0]}
    order = entries[MODULES + "load-order"].decode().split()
    names = [file_name.removesuffix(".ko").replace("-", "_") for file_name in order]
    builtin = builtin_modules()
    assert len(names) == len(set(names)), order

    # Each file system /init mounts is in the archive or in the kernel;
    # virtiofs is a module in Debian's cloud kernel, and needs fuse.
    for name in ("virtiofs", "fuse", "overlay", "ext4"):
        assert name in names or name in builtin, f"{name} is neither packed nor built in"
        assert not (name in names and name in builtin), f"{name} is built in, yet packed"
    for name in ("virtiofs", "fuse", "overlay"):
        assert name in names, f"{name}: Debian's cloud kernel has it as a module"

    # Every module comes after each it depends on (or that one is built
    # in), and the archive holds each file the load order names.
    loaded = set()
    for file_name, name in zip(order, names):
        body = entries.get(MODULES + file_name)
        assert body and body.startswith(b"\x7fELF"), f"{file_name} is not in the archive"
        for dependency in modinfo_depends(body):
            assert dependency in loaded or dependency in builtin, \
                f"{file_name} is loaded before its {dependency}: {order}"
        loaded.add(name)
    assert names.index("fuse") < names.index("virtiofs")
    assert names.index("virtio") < names.index("virtiofs")
    assert names.index("virtio_ring") < names.index("virtiofs")
    # The bus driver first of the drivers, so that /init's exit status gets
    # out even if another fails to load; the file systems after the drivers.
    assert names.index("lguest") < names.index("virtio_blk") < names.index("virtiofs")
    assert names.index("virtiofs") < names.index("overlay")


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing)"


@pytest.mark.slow
def test_debian_kernel_boots_host_decompressed(kvm_available, debian_kernel, initramfs,
                                               record_property):
    kind = detect_kvm_kind()
    started = time.monotonic()
    # Only hardware KVM gets as far as running a command (`-- CMD ARG...`).
    with Guest(debian_kernel, cmdline=CMDLINE, initrd=initramfs, mem="512M", timeout=GUEST_TIMEOUT,
               extra_args=["--decompress", "host"],
               command=COMMAND if kind.hardware else None) as guest:
        # (a) The command line Linux received: the launcher's defaults, ours
        # after them as one run, and the device page.
        line = guest.expect(rb"(?m)(?:^|\] )Command line: ([^\r\n]*)\r?\n",
                            timeout=EXPECT_TIMEOUT)
        words = line.group(1).decode().split()
        ours = CMDLINE.split()
        assert any(words[i:i + len(ours)] == ours for i in range(len(words))), words
        assert DEVICE_PAGE_ARG in words, words
        if kind.emulating:
            # CPUID bits leak through on this KVM; the kernel must be told.
            assert any(w.startswith("clearcpuid=") for w in words), words

        # (b) The e820 map Linux read from boot_params.  Wait for the whole
        # block: the header, the BIOS-e820 lines, and one complete line after.
        block = guest.expect(rb"BIOS-provided physical RAM map:\r?\n"
                             rb"((?:[^\n]*BIOS-e820: [^\n]*\n)+)(?![^\n]*BIOS-e820)[^\n]*\n",
                             timeout=EXPECT_TIMEOUT)
        e820 = re.findall(r"BIOS-e820: (\[mem [^\]]*\] \w+)", block.group(1).decode())
        assert e820 == E820_512M
        e820_seconds = time.monotonic() - started

        if not kind.hardware:
            # Emulating (or unknown) KVM: Linux would need minutes more.
            # Say how far it got, then leave the block, which kills the guest.
            progress = (f"Debian kernel on {kind.kind} KVM: command line and e820 checked "
                        f"{e820_seconds:.1f} s after start; last line after "
                        f"{time.monotonic() - started:.1f} s: {last_line(guest.output)!r}")
            print("\n" + progress)
            record_property("debian_kernel_progress", progress)
            warnings.warn(progress, BootProgress)
            return

        # Hardware KVM: the whole way to our command in the initramfs, whose
        # exit status comes back through the lguest bus driver.
        status = guest.wait()
        assert status == COMMAND_STATUS, (f"exit status {status}; output ends with:\n"
                                          f"{guest.output[-2000:]}\n{guest.stderr[-2000:]}")
        record_property("debian_kernel_progress",
                        f"command exited {COMMAND_STATUS} {time.monotonic() - started:.1f} s "
                        f"after start")
