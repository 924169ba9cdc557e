"""hostfiles.py: the launcher's standard fds, and the user's files by kind and size."""

import errno
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from pylguest.errors import UsageError
from pylguest.hostfiles import (BLOCK_DEVICE, REGULAR, disk_size, oserror_text, open_user_file,
                                read_user_file)


def test_closed_standard_fds_are_pointed_at_dev_null(tmp_path):
    # A child started with 0, 1 and 2 closed: after ensure_standard_fds()
    # the next file it opens must not be fd 1.
    code = ("import os; from pylguest.hostfiles import ensure_standard_fds; ensure_standard_fds(); "
            "fd = os.open('/etc/hostname', os.O_RDONLY); "
            "names = [os.readlink(f'/proc/self/fd/{n}') for n in (0, 1, 2)]; "
            "open(os.environ['OUT'], 'w').write(f'{fd} ' + ' '.join(names))")
    out = tmp_path / "fds.txt"
    subprocess.run([sys.executable, "-c", code], timeout=30,
                   env={"PYTHONPATH": str(ROOT / "launcher"), "OUT": str(out)},
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   preexec_fn=lambda: [os.close(n) for n in (0, 1, 2)], check=True)
    fd, *names = out.read_text().split()
    assert int(fd) > 2
    assert names == ["/dev/null"] * 3


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A plain open() of a FIFO with no writer would block here for ever.
    with pytest.raises(UsageError, match="fifo: is a FIFO, not a regular file"):
        open_user_file(str(fifo), "kernel")


def test_a_directory_and_a_character_device_are_refused(tmp_path):
    with pytest.raises(UsageError, match="is a directory, not a regular file or a block device"):
        open_user_file(str(tmp_path), "--block", kinds=(REGULAR, BLOCK_DEVICE))
    with pytest.raises(UsageError, match="/dev/zero: is a character device"):
        open_user_file("/dev/zero", "--block", kinds=(REGULAR, BLOCK_DEVICE))


def test_a_missing_file_says_so_in_lower_case(tmp_path):
    with pytest.raises(UsageError, match=r"^initrd .*/nope: no such file or directory$"):
        open_user_file(str(tmp_path / "nope"), "initrd")


def test_an_opened_file_is_blocking_again(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = open_user_file(str(path), "kernel")
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


def test_a_huge_sparse_file_is_refused_before_it_is_read(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)
    with pytest.raises(UsageError, match=r"68719476736 bytes is more than the guest's 268435456"):
        read_user_file(str(sparse), "kernel", limit=256 << 20)


def test_read_user_file_reads_all_of_it(tmp_path):
    path = tmp_path / "k"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert read_user_file(str(path), "kernel", limit=len(data)) == data


def test_oserror_text_is_never_none():
    assert oserror_text(OSError("AF_UNIX path too long")) == "aF_UNIX path too long"
    assert oserror_text(OSError(errno.ENOENT, os.strerror(errno.ENOENT))) == \
        "no such file or directory"
    assert oserror_text(OSError()) == "error"


@pytest.fixture
def loop_device(tmp_path):
    """A host block device: a loop device over a 1 MiB file (needs root)."""
    if shutil.which("losetup") is None or os.geteuid() != 0:
        pytest.skip("a loop device needs losetup and root")
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    result = subprocess.run(["losetup", "-f", "--show", str(backing)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {result.stderr.strip()}")
    device = result.stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], timeout=30)


def test_a_block_device_has_its_real_size(loop_device):
    fd = open_user_file(loop_device, "--block", kinds=(REGULAR, BLOCK_DEVICE))
    try:
        assert os.fstat(fd).st_size == 0          # what st_size says of a block device
        assert disk_size(fd) == 1 << 20           # what the device says
    finally:
        os.close(fd)
