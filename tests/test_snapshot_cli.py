"""`pylguest snapshot` and `pylguest run --restore`, end to end, with the
echo teaching guest (guests/echo.c): it waits in `hlt` for UART
interrupts and echoes each byte in upper case, so a restored copy that
echoes proves the registers, the interrupt controllers and the UART came
back, in well under a second.  Then every way a snapshot on disk can be
wrong, each refused with one line and exit status 2 before the vCPU runs.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, guest_path

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "launcher"))
TIMEOUT = 20


def launcher(*args):
    return [sys.executable, "-m", "pylguest", *args]


class Running:
    """A launcher with its console on pipes; read() waits for text."""

    def __init__(self, *args, forkserver=None):
        """A fresh `python -m pylguest`, or one forked by `forkserver`."""
        if forkserver is not None:
            self.process = forkserver.spawn(["run", *args, "--timeout", "60"], env=ENV)
        else:
            self.process = subprocess.Popen(launcher("run", *args, "--timeout", "60"),
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=ENV)
        os.set_blocking(self.process.stdout.fileno(), False)
        self.seen = b""

    def expect(self, text, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline or self.process.poll() is not None:
                chunk = self.process.stdout.read() or b""
                self.seen += chunk
                if text in self.seen:
                    break
                pytest.fail(f"no {text!r} in {self.seen!r}; stderr: "
                            f"{self.process.stderr.read() if self.process.poll() is not None else ''}")
            chunk = self.process.stdout.read()
            if chunk:
                self.seen += chunk
            else:
                time.sleep(0.01)

    def type(self, text):
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def finish(self):
        self.type(b"q")
        self.expect(b"echo: bye")
        status = self.process.wait(timeout=TIMEOUT)
        self.process.stdin.close()
        return status

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            pipe.close()


def snapshot(control, directory):
    return subprocess.run(launcher("snapshot", str(control), str(directory)),
                          capture_output=True, text=True, env=ENV, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def echo_snapshot(tmp_path_factory):
    """A snapshot of the echo guest after it echoed "ab", with an rng
    device and a disk; the original then goes on and quits."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here (tests that run a guest need it)")
    where = tmp_path_factory.mktemp("echo-snapshot")
    disk = where / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    original = Running(str(guest_path("echo")), "--rng", "--block", str(disk),
                       "--control", str(where / "control"))
    try:
        original.expect(b"echo: ready")
        original.type(b"ab")
        original.expect(b"AB")
        taken = snapshot(where / "control", where / "snap")
        assert taken.returncode == 0, taken.stderr
        assert "snapshot" in taken.stderr and "taken in" in taken.stderr
        original.type(b"xy")
        original.expect(b"XY")                     # the original runs on
        assert original.finish() == 0
    finally:
        original.kill()
    return where / "snap", disk


def restored(path, *more):
    return Running("--restore", str(path), *more)


def test_a_restored_guest_goes_on_from_the_snapshot(echo_snapshot):
    path, _ = echo_snapshot
    guest = restored(path)
    try:
        guest.type(b"cd")
        guest.expect(b"CD")
        assert b"echo: ready" not in guest.seen        # it did not boot again
        assert guest.finish() == 0
    finally:
        guest.kill()


@pytest.fixture(params=["fresh", "forked"])
def launch(request):
    """How a restore starts: a fresh `python -m pylguest run --restore`,
    or Guest.restore's way, forked from a warm launcher (forkserver.py)."""
    if request.param == "fresh":
        yield lambda *args: Running(*args)
        return
    from pylguest.forkserver import ForkServer
    server = ForkServer(ENV)
    try:
        yield lambda *args: Running(*args, forkserver=server)
    finally:
        server.close()


def test_two_restores_run_side_by_side(echo_snapshot, launch):
    path, _ = echo_snapshot
    first, second = launch("--restore", str(path)), launch("--restore", str(path))
    try:
        first.type(b"one")
        second.type(b"two")
        first.expect(b"ONE")
        second.expect(b"TWO")
        assert b"TWO" not in first.seen and b"ONE" not in second.seen
        assert b"echo: ready" not in first.seen + second.seen     # neither booted again
        assert first.finish() == 0 and second.finish() == 0
    finally:
        first.kill()
        second.kill()


def test_the_snapshot_is_sparse_and_the_manifest_says_what_it_holds(echo_snapshot):
    path, disk = echo_snapshot
    memory = os.stat(path / "memory")
    assert memory.st_blocks * 512 < memory.st_size // 8     # untouched pages take no space
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "pylguest-snapshot" and manifest["version"] == 1
    assert [d["name"] for d in manifest["devices"]] == ["block0", "rng0"]
    assert manifest["disks"][0]["path"] == str(disk)


def test_trace_shows_the_restore_step_by_step(echo_snapshot):
    path, _ = echo_snapshot
    guest = restored(path, "--trace")
    try:
        guest.type(b"z")
        guest.expect(b"Z")
        guest.finish()
        trace = guest.process.stderr.read().decode()
    finally:
        guest.kill()
    for step in ("manifest checked", "mapped copy-on-write", "restore block0: reset",
                 "restore KVM state: pic master", "MSRs; clock at", "start: restored from"):
        assert step in trace, trace


def test_a_guest_with_a_share_is_not_snapshotted(tmp_path, kvm_available):
    from pylguest.daemon import find_program
    from pylguest.devices.fs import VIRTIOFSD_CANDIDATES, VIRTIOFSD_PACKAGE
    from pylguest.errors import UsageError
    try:
        find_program("virtiofsd", VIRTIOFSD_CANDIDATES, VIRTIOFSD_PACKAGE, None)
    except UsageError as e:
        pytest.skip(f"no virtiofsd: {e}")
    guest = Running(str(guest_path("echo")), "--share", str(tmp_path),
                    "--control", str(tmp_path / "control"))
    try:
        guest.expect(b"echo: ready")
        taken = snapshot(tmp_path / "control", tmp_path / "snap")
        assert taken.returncode == 2
        assert "cannot snapshot a guest with fs0 (virtio-fs" in taken.stderr
        assert not (tmp_path / "snap").exists() or not os.listdir(tmp_path / "snap")
        assert guest.finish() == 0                 # the guest did not notice
    finally:
        guest.kill()


def test_a_snapshot_is_never_written_over_another(echo_snapshot, tmp_path):
    guest = Running(str(guest_path("echo")), "--control", str(tmp_path / "control"))
    try:
        guest.expect(b"echo: ready")
        path, _ = echo_snapshot
        taken = snapshot(tmp_path / "control", path)
        assert taken.returncode == 2 and "not empty" in taken.stderr
        assert guest.finish() == 0
    finally:
        guest.kill()


# -- a snapshot from the user's disk is hostile ------------------------------------


def edited(echo_snapshot, tmp_path, edit=None, memory=None):
    """A copy of the snapshot with its manifest passed through edit()."""
    path, _ = echo_snapshot
    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    if edit:
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    if memory:
        memory(copy / "memory")
    return copy


def refused(path, *more):
    result = subprocess.run(launcher("run", "--restore", str(path), "--timeout", "5", *more),
                            capture_output=True, text=True, env=ENV, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("pylguest: "), result.stderr
    assert result.stdout == ""                     # the vCPU never ran
    return lines[0]


def set_in(keys, value):
    def edit(manifest):
        *parents, last = keys
        for key in parents:
            manifest = manifest[key]
        manifest[last] = value
    return edit


REFUSALS = {
    "another pylguest": (set_in(["pylguest"], "0.0.1"), "taken by another pylguest"),
    "another format version": (set_in(["version"], 2), "reads version 1"),
    "another host kernel": (set_in(["host", "kernel"], "5.10.0-other"), "host kernel"),
    "another KVM": (set_in(["host", "kvm"], "hardware"), "KVM is"),
    "CPUID this host cannot give": (set_in(["host", "cpuid"], "0" * 64), "CPUID"),
    "another memory size": (set_in(["guest", "mem"], 512 << 20), "its memory is"),
    "a device page elsewhere": (set_in(["guest", "ram_top"], 1 << 20), "device page"),
    "a vCPU blob of another size": (set_in(["vcpu", "regs"], "00" * 8), "vcpu.regs"),
    "devices it does not make": (set_in(["devices", 1, "name"], "rng9"), "are not the ones"),
    "a device of another type": (set_in(["devices", 1, "type"], 3), "type or rings"),
    "an active device without rings": (set_in(["devices", 1, "state"], "active"),
                                       "without its rings"),
    "an MSR this KVM does not list": (set_in(["msrs", 0], [0xDEAD, 0]), "MSR 0xdead"),
    "a garbled manifest": (lambda m: m.pop("vm"), "lacks vm"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_manifest_is_refused_before_the_guest_runs(echo_snapshot, tmp_path, case):
    edit, words = REFUSALS[case]
    assert words in refused(edited(echo_snapshot, tmp_path, edit))


def test_a_truncated_memory_file_is_refused(echo_snapshot, tmp_path):
    path = edited(echo_snapshot, tmp_path, memory=lambda p: os.truncate(p, 4096))
    assert "memory file is 4096 bytes" in refused(path)


def test_a_manifest_cut_short_is_refused(echo_snapshot, tmp_path):
    path = edited(echo_snapshot, tmp_path)
    text = (path / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(text[:len(text) // 2])
    assert "not JSON" in refused(path)


def test_a_changed_disk_is_refused(echo_snapshot, tmp_path):
    path, disk = echo_snapshot
    copy = edited(echo_snapshot, tmp_path)
    other = tmp_path / "other.img"
    other.write_bytes(disk.read_bytes()[:-512] + b"x" * 512)      # the last sector edited
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["disks"][0]["path"] = str(other)
    manifest["config"]["block"] = [str(other)]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "changed since the snapshot" in refused(copy)


def test_what_comes_from_the_snapshot_cannot_be_given_with_it(echo_snapshot):
    path, _ = echo_snapshot
    assert "--rng" in refused(path, "--rng")
    result = subprocess.run(launcher("run", "--restore", str(path), "--", "true"),
                            capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert result.returncode == 2 and "-- CMD" in result.stderr


def test_a_restored_disk_is_a_private_copy_and_the_image_is_untouched(echo_snapshot, tmp_path):
    """The copy a restore writes to lives in the snapshot's directory only
    while the run does: it is unlinked once open."""
    path, disk = echo_snapshot
    before = disk.read_bytes()
    guest = restored(path)
    try:
        guest.type(b"k")
        guest.expect(b"K")
        assert not [p for p in os.listdir(path) if p.startswith(".pylguest-disk-")]
        assert guest.finish() == 0
    finally:
        guest.kill()
    assert disk.read_bytes() == before
    assert sorted(os.listdir(path)) == ["manifest.json", "memory"]


def test_missing_snapshot_is_one_line(tmp_path):
    assert "no such directory" in refused(tmp_path / "nothing")
    assert "no manifest.json" in refused(tmp_path)


