"""Boot once, restore many: a Linux session guest snapshotted and restored.

One boot (slow on an emulating KVM: docs/linux.md) makes a guest with a
file in its tmpfs, a counter process running and a read-write disk; its
snapshot is then restored twice, side by side, and each copy must see
the file and the process, change them without the other seeing, write
its disk without touching the image, and keep a clock that neither went
back nor stood still.
"""

import hashlib
import time

import pytest

from pylguest import Guest

pytestmark = pytest.mark.slow

COUNTER = ("echo original > /tmp/file; "
           "(i=0; while true; do i=$((i + 1)); echo $i > /tmp/count; sleep 1; done) "
           "</dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def snapshot(linux, tmp_path_factory, kvm_available):
    kernel, initramfs = linux
    where = tmp_path_factory.mktemp("linux-snapshot")
    disk = where / "disk.img"
    disk.write_bytes(b"disk as it was\n" + bytes((4 << 20) - 15))
    started = time.monotonic()
    with Guest(kernel, initrd=initramfs, agent=True, timeout=600,
               extra_args=["--block", str(disk)]) as original:
        original.wait_ready(300)
        booted = time.monotonic() - started
        original.succeed(COUNTER)
        original.wait_until_succeeds("test -s /tmp/count", timeout=30)
        uptime = float(original.succeed("cut -d' ' -f1 /proc/uptime"))
        answer = original.snapshot(where / "snap")
        assert answer["ok"] and answer["seconds"] < 30
        # The original runs on after its snapshot.
        assert original.succeed("cat /tmp/file") == "original\n"
    print(f"\nboot to a session: {booted:.1f} s; snapshot: {answer['seconds']:.3f} s")
    (where / "uptime").write_text(str(uptime))
    return where / "snap", disk, digest(disk)


def test_two_restores_share_the_past_and_not_the_future(snapshot, wall_time):
    path, disk, image_digest = snapshot
    started = time.monotonic()
    # One forked from the fork server (the default), one a fresh launcher.
    first = Guest.restore(path, timeout=300)
    second = Guest.restore(path, timeout=300, forkserver=False)
    assert first.forkserver is not None and second.forkserver is None
    wall_time(f"two restores ready in {time.monotonic() - started:.2f} s")
    try:
        for guest in (first, second):
            assert guest.succeed("cat /tmp/file") == "original\n"
            assert guest.run("kill -0 $(cat /tmp/counter.pid)").status == 0
        counts = [int(g.succeed("cat /tmp/count")) for g in (first, second)]
        time.sleep(2.5)
        again = [int(g.succeed("cat /tmp/count")) for g in (first, second)]
        assert again[0] > counts[0] and again[1] > counts[1]   # each counter runs on

        first.succeed("echo first > /tmp/file; kill $(cat /tmp/counter.pid)")
        second.succeed("echo second > /tmp/mine")
        assert second.succeed("cat /tmp/file") == "original\n"
        assert second.run("kill -0 $(cat /tmp/counter.pid)").status == 0
        assert first.run("test -e /tmp/mine").status == 1
        assert first.run("kill -0 $(cat /tmp/counter.pid)").status != 0

        # Each writes its disk: to a copy of its own, never to the image.
        for guest, word in ((first, "first"), (second, "second")):
            guest.succeed(f"printf '{word} wrote this\\n' | dd of=/dev/vda conv=fsync "
                          "2>/dev/null")
        assert first.succeed("head -c 17 /dev/vda") == "first wrote this\n"
        assert second.succeed("head -c 18 /dev/vda") == "second wrote this\n"
    finally:
        first.close()
        second.close()
    assert digest(disk) == image_digest
    assert not [p.name for p in path.iterdir() if p.name.startswith(".pylguest-disk")]


def test_a_restored_clock_neither_goes_back_nor_stands_still(snapshot, wall_time):
    """The guest's monotonic clock goes on from at least where it was, its
    sleeps last as long as asked, and its wall clock is the host's (set
    by the restore, within the time it takes to ask it)."""
    path, _, _ = snapshot
    at_snapshot = float((path.parent / "uptime").read_text())
    with Guest.restore(path, timeout=300) as guest:
        wall_time("restored")
        # The agent's CLOCK set it from the host's: the guest's seconds fall
        # between the host's before and after asking (1 s either side for
        # the whole seconds date prints and the set's own latency).
        asked = time.time()
        seconds = int(guest.succeed("date +%s"))
        assert asked - 1 <= seconds <= time.time() + 1
        assert guest.session.hello.version == 2          # so it was CLOCK, not date -s
        before = float(guest.succeed("cut -d' ' -f1 /proc/uptime"))
        assert before >= at_snapshot
        result = guest.run("sleep 1")
        after = float(guest.succeed("cut -d' ' -f1 /proc/uptime"))
        assert result.status == 0 and 1.0 <= after - before < 60
        assert 0.9 <= result.duration < 60


def test_a_restore_writing_a_private_copy_is_not_snapshotted_again(snapshot, tmp_path):
    """Its disk is a copy that ends with its run: a snapshot of it would
    name a file that is gone."""
    from pylguest.snapshot import SnapshotError
    path, _, _ = snapshot
    with Guest.restore(path, timeout=300) as guest:
        with pytest.raises(SnapshotError, match="block0 .*private copy"):
            guest.snapshot(tmp_path / "again")
        assert guest.succeed("cat /tmp/file") == "original\n"     # and it runs on
