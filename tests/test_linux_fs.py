"""Shares and roots in a real Linux: --share and --root (devices/fs.py).

Linux's own virtiofs driver mounts what virtiofsd serves through the lguest
bus, and the project's init mounts each share and the chosen root.  What
is asserted is checked from the host where it can be: a file the guest
wrote is read on the host (or is not there, for a read-only share or an
overlay root); a write to a read-only image is looked for with debugfs.
Each boot prints its wall time (slow: docs/linux.md).
"""

import os
import shutil
import signal
import subprocess

import pytest

from conftest import alive, descendants
from pylguest import Guest

GUEST_TIMEOUT = 240
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(VIRTIOFSD) or os.geteuid() != 0,
                       reason="needs Debian's virtiofsd (qemu-system-common; make installs it) "
                              "and root, which virtiofsd's sandbox needs"),
]


def boot(linux, command, extra_args=(), **kwargs):
    kernel, initramfs = linux
    return Guest(kernel, initrd=initramfs, timeout=GUEST_TIMEOUT, extra_args=list(extra_args),
                 command=command, **kwargs)


@pytest.fixture
def shares(tmp_path):
    """A read-only share with a file and two links out of it, a writable
    share, and a host file next to them that the guest must never read."""
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "file.txt").write_text("from the host\n")
    secret = tmp_path / "secret"
    secret.write_text("HOST-SECRET\n")
    (ro / "absolute").symlink_to(secret)            # an absolute path on the host
    (ro / "relative").symlink_to("../secret")
    return ro, rw, secret


SCRIPT = """
cat /mnt/share0/file.txt
touch /mnt/share0/new; echo "touch-ro=$?"
mount -o remount,rw /mnt/share0; echo "remount=$?"
touch /mnt/share0/new; echo "touch-after-remount=$?"
cat /mnt/share0/absolute /mnt/share0/relative /mnt/share0/../secret /mnt/secret
echo "dotdot=$(ls -A /mnt/share0/.. | tr '\\n' ' ')"
echo written > /data/out.txt; echo "write-rw=$?"
"""


def test_shares_read_only_on_the_host_and_closed_to_the_outside(kvm_available, linux, shares,
                                                                 wall_time):
    ro, rw, secret = shares
    with boot(linux, ["sh", "-c", SCRIPT],
              ["--share", f"{ro},ro", "--share", f"{rw},tag=data,at=/data"]) as guest:
        status = guest.wait()
    wall_time("shares")
    out = guest.output
    assert status == 0, out + guest.stderr
    assert "from the host" in out
    # ro holds on the host: the guest's remount succeeds, its writes still fail.
    assert "touch-ro=1" in out and "remount=0" in out and "touch-after-remount=1" in out, out
    assert sorted(os.listdir(ro)) == ["absolute", "file.txt", "relative"]
    # Links resolve in the guest, and '..' at the top is the guest's /mnt.
    assert "HOST-SECRET" not in out, out
    assert "dotdot=share0 " in out.replace("\r", "").splitlines(), out
    assert "write-rw=0" in out
    assert (rw / "out.txt").read_text() == "written\n"


def test_root_is_the_hosts_own_with_writes_in_guest_memory(kvm_available, linux, wall_time):
    marker = "/pylguest-overlay-test"
    with boot(linux, ["sh", "-c", f"python3 -c 'print(1+1)' && echo overlay > {marker} && "
                                  f"cat {marker} && mount | grep ' on / '"],
              ["--root", "/"]) as guest:
        status = guest.wait()
    wall_time("root /")
    assert status == 0, guest.output + guest.stderr
    lines = guest.output.splitlines()
    assert lines[0] == "2" and lines[1] == "overlay", guest.output
    assert "overlay on / type overlay" in guest.output
    assert not os.path.exists(marker), "a write in the overlay reached the host's /"


@pytest.fixture
def root_image(tmp_path):
    """An ext4 image holding a static busybox: a root of its own."""
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", tree / "bin" / "busybox")
    for applet in ("sh", "cat", "echo"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "hello").write_text("from the image\n")
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image)], check=True, timeout=60)
    return image


def debugfs_cat(image, path):
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                          text=True, timeout=60).stdout


def test_root_on_a_disk_image_rw(kvm_available, linux, root_image, wall_time):
    with boot(linux, ["sh", "-c", "cat /hello; echo kept > /kept"],
              ["--root", f"{root_image},rw"]) as guest:
        status = guest.wait()
    wall_time("root image")
    assert status == 0, guest.output + guest.stderr
    assert "from the image" in guest.output
    assert debugfs_cat(root_image, "/kept") == "kept\n"


def test_a_daemon_killed_mid_run_gives_eio_and_the_guest_goes_on(kvm_available, linux, shares,
                                                                wall_time):
    ro, _, _ = shares
    script = ("cat /mnt/share0/file.txt; echo READY; read go; "
              "cat /mnt/share0/file.txt; echo \"after=$?\"; echo console-still-here")
    with boot(linux, ["sh", "-c", script], ["--share", f"{ro},ro"]) as guest:
        guest.expect("READY", timeout=GUEST_TIMEOUT)
        daemons = [p for p in descendants(guest.process.pid) if alive(p)]
        assert daemons, "no virtiofsd under the launcher"
        for pid in daemons:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass                  # virtiofsd's sandboxed child went with its parent
        guest.send(b"go\n")
        status = guest.wait()
    wall_time("daemon death")
    assert status == 0, guest.output + guest.stderr
    assert "after=1" in guest.output and "console-still-here" in guest.output, guest.output
    deaths = [line for line in guest.stderr.splitlines() if "virtiofsd for fs0" in line]
    assert len(deaths) == 1 and "EIO" in deaths[0], guest.stderr
