"""Session guests with the host's files: share= and root=, as docs/testing.md shows them.

One boot each (they are slow on an emulating KVM, docs/linux.md, so they
are marked slow and print their wall time): a test program built on the
host, run in the guest from a read-only share; and the host's own root
file system as the guest's, where the host's python3 runs.  The option
building and checking behind them is tested without a boot in
tests/test_guest_session.py and tests/test_plugin.py.
"""

import os
import shutil
import subprocess
import uuid

import pytest

from pylguest.devices.fs import VIRTIOFSD_CANDIDATES

pytestmark = pytest.mark.slow

CHECK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/utsname.h>

int main(int argc, char **argv)
{
    struct utsname name;
    if (argc != 3 || uname(&name) != 0)
        return 2;
    printf("check: %d * %d = %d on %s\n", atoi(argv[1]), atoi(argv[2]),
           atoi(argv[1]) * atoi(argv[2]), name.release);
    return 0;
}
"""


@pytest.fixture
def virtiofsd():
    if not any(shutil.which(path) for path in VIRTIOFSD_CANDIDATES):
        pytest.skip("virtiofsd is not installed (Debian's qemu-system-common): run `make deps`")


def test_the_hosts_test_binary_runs_in_the_guest_from_a_read_only_share(
        guest_factory, tmp_path, linux, virtiofsd, wall_time):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tmp_path / "check.c").write_text(CHECK_C)
    # Static: pylguest's initramfs has no C library for it to link with.
    subprocess.run(["gcc", "-static", "-O2", "-o", tests / "check", tmp_path / "check.c"],
                   check=True, timeout=120)
    guest = guest_factory(share=f"{tests},ro")          # mounted at /mnt/share0
    wall_time("booted")
    release = guest.succeed("uname -r").strip()
    # It ran on the guest's kernel, not the host's.
    assert guest.succeed("/mnt/share0/check 6 7") == f"check: 6 * 7 = 42 on {release}\n"
    # Read-only: the guest cannot write into the host's directory ...
    failed = guest.fail("echo x > /mnt/share0/written")
    assert "Read-only file system" in failed.stderr
    assert not (tests / "written").exists()
    # ... while what the host puts there after the boot shows in the guest.
    (tests / "later.sh").write_text("#!/bin/sh\necho \"later: $1\"\n")
    (tests / "later.sh").chmod(0o755)
    assert guest.succeed(["/mnt/share0/later.sh", "arg"]) == "later: arg\n"


def test_the_hosts_root_is_the_guests_with_writes_kept_in_the_guest(
        guest_factory, linux, virtiofsd, wall_time):
    if shutil.which("python3") is None:
        pytest.skip("the host has no python3 for the guest to run")
    guest = guest_factory(root="/")
    wall_time("booted")
    # The agent runs chrooted into the host's / (pylguest-agent --root /newroot).
    result = guest.run("python3 -c 'print(1+1)'")
    wall_time("python3 ran")
    assert (result.status, result.stdout) == (0, "2\n"), result.describe()
    # Writes go to the overlay in guest memory, never to the host's files.
    path = f"/var/tmp/pylguest-overlay-{uuid.uuid4().hex}"
    try:
        assert guest.succeed(f"echo in-the-guest > {path} && cat {path}") == "in-the-guest\n"
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
