"""The virtio-fs device with the real virtiofsd, and no kernel.

The test plays the guest's virtiofs driver: it posts FUSE requests (built
here from include/uapi/linux/fuse.h's layouts) on the request queue of a
device attached to plain memory, signals the queue's kick eventfd as KVM
would, and reads the reply the daemon wrote into guest memory.  No thread
of the launcher touches a request on the way (that is the point of
vhost-user), so what is checked is the hand-off itself, the daemon's
sandbox as pylguest runs it, a read-only share enforced on the host, and
what happens when the daemon dies.
"""

import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

import pytest

from pylguest.daemon import DaemonError
from pylguest.devices.fs import (FUSE_IN_HEADER, FUSE_OUT_HEADER, FsDevice, Share, parse_share,
                                 virtiofsd_argv)
from pylguest.errors import UsageError
from pylguest.memory import GuestMemory, Region
from pylguest.virtio.device import DeviceContext, DeviceState
from ring_builder import RingBuilder
from conftest import ROOT, alive, descendants, wait_until
from virtio_rig import Allocator

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
needs_virtiofsd = pytest.mark.skipif(
    not os.path.exists(VIRTIOFSD) or os.geteuid() != 0,
    reason="needs Debian's virtiofsd (qemu-system-common; make installs it) and root, "
           "which virtiofsd's sandbox needs")

# FUSE opcodes and the reply layouts we read (include/uapi/linux/fuse.h).
FUSE_LOOKUP, FUSE_READLINK, FUSE_MKNOD, FUSE_OPEN, FUSE_READ, FUSE_INIT = 1, 5, 8, 14, 15, 26
FUSE_CREATE = 35
ENTRY_OUT = struct.Struct("<QQQQII")          # nodeid, generation, entry/attr valid, nsecs
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")     # ino, size, blocks, times, nsecs, mode at [9]
EROFS, ENOENT, ENOTDIR, EIO = 30, 2, 20, 5


class FuseRig:
    """One FsDevice on 4 MiB of memfd memory, its rings, and a FUSE client."""

    def __init__(self, share):
        self.memory = GuestMemory([Region(0, 4 << 20, 0)])
        self.reports = []
        self.irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
        self.device = FsDevice("fs0", share)
        self.device.attach(DeviceContext(memory=self.memory, report=self.reports.append,
                                         interrupt=lambda: os.eventfd_write(self.irq, 1)))
        self.device.hand_off(self.kicks, self.irq)
        self.pfns = [0x100, 0x110]
        self.rings = [RingBuilder(self.memory, 256, pfn) for pfn in self.pfns]
        self.data = Allocator(self.memory, 0x200000, 0x400000)
        self.unique = 0
        self.rooms = []          # each request's reply buffer, in order

    def activate(self):
        self.device.activate(0, list(zip(self.device.queue_sizes, self.pfns)))
        assert self.device.state is DeviceState.ACTIVE, self.reports
        error, _ = self.request(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0) + bytes(48))
        assert error == 0

    def request(self, opcode, nodeid, body=b"", reply=4096, timeout=10.0):
        """(error, reply body): one FUSE request on the request queue."""
        self.unique += 1
        header = FUSE_IN_HEADER.pack(FUSE_IN_HEADER.size + len(body), opcode, self.unique,
                                     nodeid, 0, 0, 0, 0, 0)
        out, room = self.data.buffer(header + body), self.data.buffer(size=reply)
        self.rooms.append(room)
        ring = self.rings[1]
        done = ring.used_idx
        posted = ring.add_chain([(*out, False), (*room, True)])
        os.eventfd_write(self.kicks[1], 1)               # what KVM does on the guest's kick
        deadline = time.monotonic() + timeout
        while ring.used_idx == done:
            assert time.monotonic() < deadline, "no reply from the device"
            time.sleep(0.002)
        head, written = ring.used_elem(done)
        assert head == posted, f"used entry {done} is head {head}, not the {posted} just posted"
        length, error, unique = FUSE_OUT_HEADER.unpack(self.memory.read(room[0], 16))
        assert unique == self.unique and length == written
        return -error, self.memory.read(room[0] + 16, written - 16)

    def lookup(self, parent, name):
        error, body = self.request(FUSE_LOOKUP, parent, name.encode() + b"\0")
        if error:
            return error, None, None
        nodeid = ENTRY_OUT.unpack_from(body)[0]
        attr = ATTR.unpack_from(body, ENTRY_OUT.size)
        return 0, nodeid, attr

    def close(self):
        self.device.close()
        self.memory.close()
        for fd in self.kicks + [self.irq]:
            os.close(fd)


@pytest.fixture
def share_dir(tmp_path):
    top = tmp_path / "share"
    (top / "sub").mkdir(parents=True)
    (top / "file.txt").write_bytes(b"shared bytes\n")
    (top / "absolute").symlink_to("/etc")
    (top / "relative").symlink_to("../../..")
    (tmp_path / "secret").write_text("outside the share")
    return top


@pytest.fixture
def rig_for():
    rigs = []

    def make(path, read_only=False):
        rig = FuseRig(Share(str(path), "share0", read_only, "/mnt/share0"))
        rigs.append(rig)
        rig.activate()
        return rig
    yield make
    for rig in rigs:
        rig.close()


# -- --share's syntax ----------------------------------------------------------------

def test_parse_share(tmp_path):
    assert parse_share(str(tmp_path), 0) == Share(str(tmp_path), "share0", False, "/mnt/share0")
    assert parse_share(f"{tmp_path},tag=src,ro,at=/src", 3) == Share(str(tmp_path), "src", True,
                                                                     "/src")
    for bad, words in [(f"{tmp_path},rw", "bad --share option 'rw'"),
                       (f"{tmp_path},tag=", "bad --share tag ''"),
                       (f"{tmp_path},tag={'x' * 37}", "bad --share tag"),
                       (f"{tmp_path},tag=a b", "bad --share tag 'a b'"),
                       (f"{tmp_path},at=relative", "bad --share at='relative'"),
                       (f"{tmp_path},at=/", "bad --share at='/'"),
                       (f"{tmp_path},at=/a/../b", "bad --share at="),
                       (f"{tmp_path},at=/a b", "bad --share at="),
                       (str(tmp_path / "missing"), "no such directory"),
                       (",ro", "give a host directory")]:
        with pytest.raises(UsageError, match=words.replace("(", r"\(")):
            parse_share(bad, 0)
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        parse_share(str(tmp_path / "f"), 0)


def test_a_missing_daemon_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr("pylguest.devices.fs.VIRTIOFSD_CANDIDATES", ("/nonexistent/virtiofsd",))
    monkeypatch.delenv("PYLGUEST_VIRTIOFSD", raising=False)
    with pytest.raises(UsageError, match=r"virtiofsd is not installed: install Debian's "
                                         r"qemu-system-common package"):
        FsDevice("fs0", parse_share(str(tmp_path), 0))
    with pytest.raises(UsageError, match="is not an executable file"):
        FsDevice("fs0", parse_share(str(tmp_path), 0), virtiofsd=str(tmp_path))


def test_a_daemon_that_dies_at_start_is_one_line_with_its_last_words(tmp_path):
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho 'fake: cannot serve this' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(DaemonError) as info:
        FsDevice("fs0", parse_share(str(tmp_path), 0), virtiofsd=str(fake))
    assert str(info.value) == "virtiofsd for fs0 did not start: fake: cannot serve this"


def test_the_daemon_runs_in_a_namespace_with_the_share_bound_alone():
    argv = virtiofsd_argv("/usr/lib/qemu/virtiofsd", 7, "/srv/data", True, "/tmp/pylguest-fs0-x")
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[argv.index("/srv/data") + 1:][:2] == ["-oro", "/tmp/pylguest-fs0-x"]
    assert "--fd=7" in argv and "source=/tmp/pylguest-fs0-x" in argv
    assert "--thread-pool-size=0" in argv


# -- with the real daemon ----------------------------------------------------------

@needs_virtiofsd
def test_a_file_is_read_through_the_daemon(share_dir, rig_for):
    rig = rig_for(share_dir)
    error, nodeid, attr = rig.lookup(1, "file.txt")
    assert error == 0 and attr[1] == len(b"shared bytes\n")
    error, body = rig.request(FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0))
    assert error == 0
    fh = struct.unpack_from("<Q", body)[0]
    error, body = rig.request(FUSE_READ, nodeid, struct.pack("<QQIIQII", fh, 0, 1024, 0, 0,
                                                             os.O_RDONLY, 0))
    assert (error, body) == (0, b"shared bytes\n")
    # The launcher has no thread of its own on these queues.
    assert rig.device.fallback == [] and rig.reports == []


@needs_virtiofsd
def test_dotdot_at_the_top_of_the_share_stays_in_it(share_dir, rig_for):
    rig = rig_for(share_dir)
    top = os.stat(share_dir).st_ino
    error, _, attr = rig.lookup(1, "..")
    assert error == 0 and attr[0] == top
    error, sub, _ = rig.lookup(1, "sub")
    error, up, _ = rig.lookup(sub, "..")
    error, _, attr = rig.lookup(up, "..")
    assert error == 0 and attr[0] == top, "'..' of the share's top left the share"


@needs_virtiofsd
def test_symlinks_are_never_followed_by_the_daemon(share_dir, rig_for):
    rig = rig_for(share_dir)
    error, link, attr = rig.lookup(1, "absolute")
    assert error == 0 and stat.S_ISLNK(attr[9])
    # A lookup through the link is a lookup in a symlink, not in the host's /etc.
    assert rig.lookup(link, "passwd")[0] == ENOTDIR
    assert rig.request(FUSE_READLINK, link) == (0, b"/etc")   # the guest resolves it, in the guest
    error, link, _ = rig.lookup(1, "relative")
    assert rig.lookup(link, "secret")[0] == ENOTDIR


@needs_virtiofsd
def test_a_read_only_share_is_read_only_on_the_host(share_dir, rig_for):
    rig = rig_for(share_dir, read_only=True)
    error, _ = rig.request(FUSE_CREATE, 1, struct.pack("<IIII", os.O_WRONLY | os.O_CREAT,
                                                       0o644, 0o022, 0) + b"new\0")
    assert error == EROFS
    error, _ = rig.request(FUSE_MKNOD, 1, struct.pack("<IIII", stat.S_IFREG | 0o644, 0, 0o022, 0)
                           + b"node\0")
    assert error == EROFS
    assert sorted(os.listdir(share_dir)) == ["absolute", "file.txt", "relative", "sub"]


@needs_virtiofsd
def test_a_writable_share_writes_through(share_dir, rig_for):
    rig = rig_for(share_dir)
    error, _ = rig.request(FUSE_MKNOD, 1, struct.pack("<IIII", stat.S_IFREG | 0o644, 0, 0o022, 0)
                           + b"node\0")
    assert error == 0 and (share_dir / "node").is_file()


@needs_virtiofsd
def test_when_the_daemon_dies_requests_fail_with_eio_and_it_is_said_once(share_dir, rig_for):
    rig = rig_for(share_dir)
    assert rig.lookup(1, "file.txt")[0] == 0
    os.kill(rig.device.daemon.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not rig.device.dead:
        assert time.monotonic() < deadline, "the daemon's death went unnoticed"
        time.sleep(0.01)
    assert rig.lookup(1, "file.txt")[0] == EIO
    assert rig.lookup(1, "sub")[0] == EIO
    # Taken back where the daemon stopped: nothing it answered is answered
    # again (its replies to FUSE_INIT and the first lookup are untouched).
    assert [FUSE_OUT_HEADER.unpack(rig.memory.read(room[0], 16))[1]
            for room in rig.rooms] == [0, 0, -EIO, -EIO]
    assert rig.reports == ["virtiofsd for fs0 was killed by SIGKILL (nothing on stderr): "
                           "fs0 answers every request with EIO from now on"]
    # A reset and a new start keep answering: the device is usable, not stuck.
    rig.device.reset()
    for pfn in rig.pfns:                       # a driver's new rings start zeroed
        rig.memory.zero(pfn << 12, 0x10000)
    rig.rings = [RingBuilder(rig.memory, 256, pfn) for pfn in rig.pfns]
    rig.device.activate(0, list(zip(rig.device.queue_sizes, rig.pfns)))
    assert rig.lookup(1, "file.txt")[0] == EIO


@needs_virtiofsd
def test_close_leaves_no_daemon(share_dir):
    rig = FuseRig(Share(str(share_dir), "share0", False, "/mnt/share0"))
    rig.activate()
    pid = rig.device.daemon.pid
    rig.close()
    assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
    assert rig.device.dead is None, "closing is not a death"


def _zombie_or_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_shutil_finds_unshare():
    # The namespace wrapper needs util-linux's unshare and mount.
    assert shutil.which("unshare") and shutil.which("mount")


@needs_virtiofsd
def test_kill_9_of_the_launcher_leaves_no_virtiofsd(share_dir):
    # A real launcher that stays up (echo.elf waits for a 'q' on its
    # console), with a share; SIGKILL gives it no chance to clean up.
    ro = share_dir
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pylguest", "run", "guests/build/echo.elf", "--timeout", "60",
         "--share", f"{ro},ro"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len([p for p in descendants(launcher.pid) if alive(p)]) >= 2, 30)
        daemons = [p for p in descendants(launcher.pid) if alive(p)]
        launcher.kill()
        launcher.wait(timeout=10)
        wait_until(lambda: not any(alive(p) for p in daemons), 10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
        launcher.stdin.close()


# -- from the command line: one line, and the exit status --------------------------

def run_launcher(*args):
    return subprocess.run([sys.executable, "-m", "pylguest", "run", "guests/build/hello.elf",
                           "--cmdline", "exit=0", "--timeout", "30", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_missing_virtiofsd_is_exit_2_in_one_line(tmp_path):
    run = run_launcher("--share", str(tmp_path), "--virtiofsd", str(tmp_path / "virtiofsd"))
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"pylguest: virtiofsd {str(tmp_path / 'virtiofsd')!r} "
                                       "is not an executable file"]


def test_a_daemon_that_will_not_start_is_one_line_naming_it(tmp_path):
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho 'fake: no such option --fd' >&2\nexit 1\n")
    fake.chmod(0o755)
    run = run_launcher("--share", str(tmp_path), "--virtiofsd", str(fake))
    assert run.returncode == 1
    assert run.stderr.splitlines() == ["pylguest: virtiofsd for fs0 did not start: "
                                       "fake: no such option --fd"]


def test_bad_share_and_root_options_are_exit_2_in_one_line(tmp_path):
    for args, words in [(["--share", f"{tmp_path},bogus"], "bad --share option 'bogus'"),
                        (["--share", str(tmp_path / "none")], "no such directory"),
                        (["--root", f"{tmp_path},ro"], "bad --root"),
                        (["--root", "/dev/null"], "neither a directory nor a disk image")]:
        run = run_launcher(*args)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.splitlines()) == 1 and words in run.stderr, run.stderr


LYING_DAEMON = """#!{python}
import socket, struct, sys
fd = int(next(a for a in sys.argv if a.startswith("--fd="))[5:])
conn, _ = socket.socket(fileno=fd).accept()
while True:
    header = conn.recv(12, socket.MSG_WAITALL)
    if len(header) < 12:
        break
    request, flags, size = struct.unpack("<III", header)
    if size:
        conn.recv(size, socket.MSG_WAITALL)
    if request == 1:                       # GET_FEATURES: a reply of the wrong size
        conn.sendall(struct.pack("<III", 1, 0x5, 4096))
"""


def test_a_daemon_that_answers_wrongly_is_one_line_naming_the_message(tmp_path):
    fake = tmp_path / "virtiofsd"
    fake.write_text(LYING_DAEMON.format(python=sys.executable))
    fake.chmod(0o755)
    run = run_launcher("--share", str(tmp_path), "--virtiofsd", str(fake))
    assert run.returncode == 1
    assert run.stderr.splitlines() == ["pylguest: virtiofsd for fs0: GET_FEATURES: reply has a "
                                       "4096-byte payload (this reply has 8)"]
