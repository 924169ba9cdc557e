"""A real Linux on the lguest bus: pylguest's kernel and initramfs (make linux).

Linux's own virtio_blk, virtio_net, virtio_console and virtio_rng drivers
bind to our devices through guests/linux/lguest_device.c, the initramfs's
init runs the command given after `--`, and pylguest exits with its status.
Everything asserted is checked from outside the guest where it can be: the
file the guest wrote is read back from the image with debugfs, the line it
wrote to /dev/hvc0 comes out of the console socket, the MAC is the one we
gave, the ping crosses a tap into a network namespace this test makes.

These boots are slow on an emulating KVM (docs/linux.md: guest kernel
mode runs about a thousand times slower than on hardware), so they are
marked slow and each prints its wall time.
"""

import gzip
import os
import re
import shutil
import socket
import subprocess

import pytest

from conftest import ROOT, wait_until
from pylguest import Guest
from pylguest.kvm import detect_kvm_kind

BUILD = ROOT / "build" / "linux"
GUEST_TIMEOUT = 240               # generous: a loaded CI machine is slower
MAC = "52:54:00:12:34:56"
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"

pytestmark = pytest.mark.slow


def boot(linux, command, extra_args=(), **kwargs):
    kernel, initramfs = linux
    return Guest(kernel, initrd=initramfs, timeout=GUEST_TIMEOUT, extra_args=list(extra_args),
                 command=command, **kwargs)


# -- the exit status and the arguments ----------------------------------------------


def test_the_commands_exit_status_is_the_launchers(kvm_available, linux, wall_time):
    with boot(linux, ["sh", "-c", "exit 3"]) as guest:
        status = guest.wait()
    wall_time("exit")
    assert status == 3, guest.output + guest.stderr


ARGUMENTS = ["two  spaces", "it's \"quoted\"", "naïve ✓ 日本", "", " lead", "trail\n",
             "$HOME `x` $(y) \\ *", os.fsdecode(b"raw \xff\xfe bytes")]


# The scripts below run their programs one after the other, from when two
# busybox programs starting at once (a pipeline of two applets) now and
# then crashed on an emulating KVM.  The cause was glibc's AVX memcpy
# losing ymm state at a context switch; the launcher's GLIBC_TUNABLES now
# keeps glibc to SSE there, and tests/test_linux_avx.py runs such
# pipelines (docs/linux.md, "Two programs starting at once").


def test_every_argument_arrives_byte_for_byte(kvm_available, linux, wall_time):
    # The guest prints each argument's bytes in hex between < and >, so
    # that nothing on the way (the console, the terminal) can hide a byte.
    script = ('for a in "$@"; do printf "%s" "$a" > /tmp/arg; echo "<"; '
              'od -An -v -tx1 /tmp/arg; echo ">"; done')
    with boot(linux, ["sh", "-c", script, "sh", *ARGUMENTS]) as guest:
        status = guest.wait()
    wall_time("exit")
    assert status == 0, guest.output + guest.stderr
    printed = ["".join(hex_bytes.split())
               for hex_bytes in re.findall(r"(?s)<\r?\n(.*?)>", guest.output)]
    assert printed == [os.fsencode(a).hex() for a in ARGUMENTS], guest.output


def test_a_compressed_initramfs_is_unpacked_on_the_host_where_kvm_emulates(
        kvm_available, linux, tmp_path, wall_time):
    kernel, initramfs = linux
    packed = tmp_path / "initramfs.cpio.gz"
    packed.write_bytes(gzip.compress(initramfs.read_bytes(), compresslevel=6, mtime=0))
    with Guest(kernel, initrd=packed, timeout=GUEST_TIMEOUT, trace=True,
               command=["sh", "-c", "exit 5"]) as guest:
        status = guest.wait()
    wall_time("exit")
    assert status == 5, guest.output + guest.stderr
    unpacked = re.search(r"initrd: unpacked on the host, (\d+) -> (\d+) bytes", guest.stderr)
    if detect_kvm_kind().emulating:
        assert unpacked and int(unpacked.group(1)) == packed.stat().st_size, guest.stderr
        assert int(unpacked.group(2)) == initramfs.stat().st_size    # what we packed
    else:
        assert unpacked is None, "on hardware KVM the guest unpacks its own initramfs"


# -- the devices, as Linux's own drivers see them -----------------------------------


@pytest.fixture
def disk(tmp_path):
    """An ext4 image made from a directory, as a user would (no mount)."""
    if not shutil.which("mkfs.ext4") or not shutil.which("debugfs"):
        pytest.skip("mkfs.ext4 and debugfs (e2fsprogs) are needed: run `make deps`")
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_text("hello from the host's disk image\n")
    image = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(image), "16M"],
                   check=True, timeout=60, capture_output=True)
    return image


def debugfs_cat(image, path):
    result = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)],
                            capture_output=True, timeout=60)
    return result.stdout


# What the guest runs: each step prints a line the test looks for.
DEVICES_SCRIPT = f"""
set -e
mount -t ext4 /dev/vda /mnt
cat /mnt/hello.txt
echo "written by the guest" > /mnt/guest.txt
sync
for link in /sys/bus/virtio/drivers/*/virtio*; do
    echo "bound: ${{link#/sys/bus/virtio/drivers/}} -> $(readlink -f "$link")"
done
echo "rng_current: $(cat /sys/class/misc/hw_random/rng_current)"
head -c 16 /dev/hwrng > /tmp/hwrng
echo "hwrng:$(od -An -tx1 /tmp/hwrng)"
echo "to the host over hvc0" > /dev/hvc0
grep virtio /proc/interrupts
ip link show eth0
ip addr add {GUEST_IP}/24 dev eth0
ip link set eth0 up
ping -c 1 -W 10 {HOST_IP}
exit 7
"""


def test_linux_drives_every_device(kvm_available, linux, disk, tmp_path, namespace_with_tap,
                                   wall_time):
    ns, tap = namespace_with_tap
    console = tmp_path / "console.sock"
    with boot(linux, ["sh", "-c", DEVICES_SCRIPT],
              extra_args=["--block", str(disk), "--rng", "--console", f"socket:{console}",
                          "--net", f"tap:{tap},mac={MAC}"],
              wrapper=["ip", "netns", "exec", ns]) as guest:
        wait_until(console.exists, timeout=30)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(GUEST_TIMEOUT)
        client.connect(str(console))
        guest.expect("hello from the host's disk image")
        wall_time("first output")
        hvc = b""
        # The guest's tty turns "\n" into "\r\n" (onlcr), as any terminal's would.
        while not re.search(rb"to the host over hvc0\r?\n", hvc):
            chunk = client.recv(4096)
            assert chunk, "the console socket closed before the guest wrote to it"
            hvc += chunk
        client.close()
        status = guest.wait()
    wall_time("exit")
    out = guest.output
    assert status == 7, out + guest.stderr

    # The disk: read in the guest, written by it (the image, after exit).
    assert debugfs_cat(disk, "/guest.txt") == b"written by the guest\n"

    # Linux's own drivers, bound to devices on our bus.
    bound = dict(re.findall(r"bound: (\w+)/virtio\d+ -> (\S+)", out))
    assert set(bound) == {"virtio_blk", "virtio_console", "virtio_net", "virtio_rng"}, out
    assert all(path.startswith("/sys/devices/lguest/virtio") for path in bound.values()), bound

    # Their interrupts: the lines the launcher gave them, through the IOAPIC
    # that the launcher's MP table describes.
    irqs = re.findall(r"(?m)^\s*(\d+):\s+\d+\s+(\S+)\s+\S+\s+virtio\d+", out)
    assert len(irqs) == 4, out
    assert {chip for _, chip in irqs} == {"IO-APIC"}, irqs
    assert {int(line) for line, _ in irqs} <= {5, 9, 10, 11, 12, 14, 15, 6, 7}, irqs

    # Entropy from the launcher's rng, through the kernel's hw_random core.
    assert re.search(r"rng_current: virtio_rng\.\d+", out), out
    assert re.search(r"hwrng:(?: [0-9a-f]{2}){16}\r?\n", out), out

    # The network device, with the MAC we gave, and a ping across the tap.
    assert re.search(rf"eth0: .*\n\s+link/ether {MAC} ", out), out
    assert re.search(r"1 packets transmitted, 1 packets received", out), out


# Without a command the console is a shell: tests/test_linux_session.py
# checks it beside a session, and that leaving it powers off with its status.


# -- ways a run ends that are not the command's status ------------------------------


def test_a_kernel_panic_is_reported_as_one(kvm_available, linux, wall_time):
    # No command and an init that does not exist: the kernel panics.
    kernel, initramfs = linux
    with Guest(kernel, initrd=initramfs, cmdline="rdinit=/nonexistent init=/nonexistent",
               timeout=GUEST_TIMEOUT) as guest:
        status = guest.wait()
    wall_time("panic")
    assert status == 125, guest.output + guest.stderr
    # The reason is what the kernel said as it panicked.
    said = re.search(r"Kernel panic - not syncing: ([^\r\n]+)", guest.output).group(1).strip()
    assert f"pylguest: kernel panic (exit status 125): {said}" in guest.stderr.splitlines()


def test_a_halt_is_not_an_exit_status(kvm_available, linux, wall_time):
    with boot(linux, ["halt", "-f"]) as guest:
        status = guest.wait()
    wall_time("halt")
    assert status == 123, guest.output + guest.stderr
    assert "pylguest: halted (exit status 123)" in guest.stderr


def test_a_timeout_is_not_an_exit_status(kvm_available, linux):
    kernel, initramfs = linux
    with Guest(kernel, initrd=initramfs, timeout=5, command=["sleep", "1000"]) as guest:
        assert guest.wait() == 124
    assert "pylguest: timeout (exit status 124)" in guest.stderr


@pytest.mark.parametrize("initrd, why", [(None, "needs --initrd"),
                                          ("kernel", "not a cpio initramfs")])
def test_a_command_needs_an_initramfs_to_run_it(kvm_available, linux, initrd, why):
    kernel, _ = linux
    with Guest(kernel, initrd=kernel if initrd else None, command=["true"]) as guest:
        assert guest.wait() == 2
    assert why in guest.stderr and len(guest.stderr.splitlines()) == 1, guest.stderr


def test_emulating_kvm_says_so_at_once(kvm_available, linux):
    if not detect_kvm_kind().emulating:
        pytest.skip("this KVM is hardware-backed: there is nothing to warn about")
    kernel, initramfs = linux
    with Guest(kernel, initrd=initramfs, timeout=5, command=["true"]) as guest:
        guest.wait()
    first = guest.stderr.splitlines()[0]
    assert first.startswith("pylguest: this KVM (kvm_pvm) emulates guest kernel mode"), first


# -- the SYSCALL fixup, from a hostile program's side -------------------------------
#
# guests/linux/selftest/syscall_entry.c jumps to entry_SYSCALL_64 from user
# mode itself, as SYSCALL does on an emulating KVM, with RCX and R11 of its
# choosing.  The kernel must run the call (the program gains nothing a real
# SYSCALL would not give it), never take IOPL or NT from R11, and never
# return to a kernel address.

SELFTEST = ROOT / "guests" / "linux" / "selftest" / "syscall_entry.c"


@pytest.fixture
def syscall_entry(tmp_path):
    """The self-test, built for the guest (static, no libc)."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build the self-test: run `make deps`")
    binary = tmp_path / "syscall_entry"
    subprocess.run(["gcc", "-static", "-nostdlib", "-fno-pie", "-no-pie", "-O2",
                    "-fno-stack-protector", "-o", str(binary), str(SELFTEST)],
                   check=True, timeout=120)
    return binary


def symbol(name):
    system_map = BUILD / "System.map"
    if not system_map.exists():
        pytest.skip(f"{system_map} is not there: run `make linux`")
    match = re.search(rf"(?m)^([0-9a-f]+) \w {name}$", system_map.read_text())
    return match.group(1)


def test_a_fake_syscall_gains_no_privilege(kvm_available, linux, session_guest, syscall_entry):
    # The run's shared session guest (the plugin's session_guest) runs it:
    # no boot of its own.
    entry = symbol("entry_SYSCALL_64")
    session_guest.copy_to(syscall_entry, "/tmp/syscall_entry")
    run = session_guest.run
    # The flags the kernel would return with: DF, which a program may set,
    # but neither IOPL 3 nor NT, which it asked for in R11.
    assert run(["/tmp/syscall_entry", entry, "flags"]).stdout == \
        "flags: signalled, iopl 0, nt 0, df 1\n"
    assert run(["/tmp/syscall_entry", entry, "plain"]).stdout == "plain: pid ok\n"
    # A kernel return address is not a system call: SIGSEGV.
    result = run(["/tmp/syscall_entry", entry, "kernel"])
    assert (result.signal, result.status) == (11, 139), result.describe()
