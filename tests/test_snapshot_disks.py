"""Disk images and snapshots (snapshot/disks.py): an image's identity, the
refusal of a changed one, and the private copy a restore writes to."""

import os

import pytest

from pylguest.snapshot import SnapshotError, disks

MiB = 1 << 20
SAMPLE = disks.SAMPLE


def image(path, size, pieces=()):
    """A sparse file of `size` bytes holding each (offset, data) of `pieces`."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return str(path)


def poke(path, offset, data, keep_mtime=True):
    """Overwrite bytes in place; by default with the old mtime put back, as
    an edit that hides itself would."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def disk_entry(path, device="block0"):
    """A manifest's `disks` entry for the image at `path`, as take.py makes it."""
    return {"device": device, "path": path, "read_only": False, **disks.identity(path)}


# --- identity() ---------------------------------------------------------------------

def test_identity_is_size_mtime_and_a_sha256_sample(tmp_path):
    path = image(tmp_path / "disk.img", 3 * SAMPLE + 17, [(5, b"boot")])
    found = disks.identity(path)
    assert found["size"] == 3 * SAMPLE + 17
    assert found["mtime_ns"] == os.stat(path).st_mtime_ns
    assert len(bytes.fromhex(found["sample"])) == 32
    assert disks.identity(path) == found              # the same image, the same identity


@pytest.mark.parametrize("offset", [0, SAMPLE + 3, 2 * SAMPLE, -1])
def test_a_small_image_is_sampled_whole(tmp_path, offset):
    """An image of at most SAMPLES pieces is read whole: a change to any
    byte, the mtime kept, changes the sample."""
    path = image(tmp_path / "disk.img", 3 * SAMPLE)
    before = disks.identity(path)
    poke(path, offset % (3 * SAMPLE), b"\x01")
    after = disks.identity(path)
    assert after["sample"] != before["sample"]
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"])


def test_a_large_image_is_sampled_first_last_and_between(tmp_path):
    """A large image: the first and the last SAMPLE bytes are among the
    pieces read, and so is a piece in the middle; an edit there, the mtime
    kept, changes the sample."""
    size = 64 * MiB
    path = image(tmp_path / "disk.img", size)
    before = disks.identity(path)["sample"]
    middle = (size - SAMPLE) * 7 // (disks.SAMPLES - 1)
    for offset in (0, SAMPLE - 1, size - SAMPLE, size - 1, middle):
        poke(path, offset, b"\x5a")
        after = disks.identity(path)["sample"]
        assert after != before, offset
        before = after


def test_an_edit_between_the_samples_is_the_limit_of_what_is_caught(tmp_path):
    """What the identity cannot see (disks.py says "most edits"): bytes
    between the sampled pieces, changed with the mtime put back.  (An
    ordinary write there moves the mtime, which is compared too.)"""
    size = 64 * MiB
    path = image(tmp_path / "disk.img", size)
    before = disks.identity(path)
    between = SAMPLE + (size - SAMPLE) // (disks.SAMPLES - 1) // 2
    poke(path, between, b"\x5a")
    assert disks.identity(path) == before


@pytest.mark.parametrize("delta", [1, -1, SAMPLE])
def test_a_change_of_size_changes_size_and_sample(tmp_path, delta):
    """A grown or shrunk image (even by zeroes, even mtime kept) has
    another size, and another sample: the size is hashed in."""
    path = image(tmp_path / "disk.img", 4 * MiB)
    before = disks.identity(path)
    os.truncate(path, 4 * MiB + delta)
    os.utime(path, ns=(before["mtime_ns"], before["mtime_ns"]))
    after = disks.identity(path)
    assert after["size"] == 4 * MiB + delta
    assert after["sample"] != before["sample"]


def test_an_empty_image_has_an_identity(tmp_path):
    path = image(tmp_path / "empty.img", 0)
    assert disks.identity(path)["size"] == 0


# --- check_unchanged() ----------------------------------------------------------------

def test_an_unchanged_image_passes(tmp_path):
    path = image(tmp_path / "disk.img", MiB, [(0, b"superblock")])
    disks.check_unchanged(disk_entry(path), "SNAP")


@pytest.mark.parametrize("change, differ", [
    ("byte", "sample differ"),
    ("size", "size, sample differ"),
    ("mtime", "mtime_ns differ"),
    ("write", "mtime_ns, sample differ"),
])
def test_a_changed_image_is_refused_naming_the_disk_and_what_differs(tmp_path, change, differ):
    """A restore onto a changed image would mix two disks: refused, with
    the snapshot, the image, its device, and what differs."""
    path = image(tmp_path / "disk.img", MiB, [(0, b"superblock")])
    saved = disk_entry(path, device="block3")
    if change == "byte":
        poke(path, 1, b"S")
    elif change == "size":
        before = os.stat(path)
        os.truncate(path, 2 * MiB)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif change == "mtime":
        os.utime(path, ns=(saved["mtime_ns"] + 1, saved["mtime_ns"] + 1))
    else:
        poke(path, 2, b"X", keep_mtime=False)
        os.utime(path, ns=(saved["mtime_ns"] + 10**9, saved["mtime_ns"] + 10**9))
    with pytest.raises(SnapshotError) as caught:
        disks.check_unchanged(saved, "SNAP")
    message = str(caught.value)
    assert message.startswith(f"snapshot SNAP: disk {path} of block3 changed since the snapshot")
    assert f"({differ})" in message
    assert "\n" not in message


def test_a_missing_image_is_refused_naming_it(tmp_path):
    path = image(tmp_path / "disk.img", MiB)
    saved = disk_entry(path)
    os.unlink(path)
    with pytest.raises(SnapshotError, match=f"snapshot SNAP: disk {path} of block0: "
                                            "No such file"):
        disks.check_unchanged(saved, "SNAP")


# --- private_copy() -------------------------------------------------------------------

PIECES = [(0, b"boot sector" * 100), (5 * MiB + 123, os.urandom(3 * 4096)),
          (16 * MiB - 7, b"tail!!!")]


@pytest.fixture
def sparse_image(tmp_path):
    """16 MiB, almost all holes: three pieces of data, one at its end."""
    path = image(tmp_path / "disk.img", 16 * MiB, PIECES)
    if os.stat(path).st_blocks * 512 >= 8 * MiB:
        pytest.skip("this file system keeps no holes")
    return path


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_a_private_copy_has_the_same_bytes(tmp_path, sparse_image):
    """The copy is the image, byte for byte, at the same size."""
    (tmp_path / "copies").mkdir()
    copy = disks.private_copy(sparse_image, str(tmp_path / "copies"))
    assert os.path.dirname(copy) == str(tmp_path / "copies")
    assert os.path.basename(copy).startswith(".pylguest-disk-")
    assert os.stat(copy).st_size == 16 * MiB
    assert read(copy) == read(sparse_image)


def test_a_private_copy_keeps_the_holes(tmp_path, sparse_image):
    """Holes are skipped, not copied as zeroes: the copy of a 16 MiB image
    holding 16 KiB of data takes about as little space as the image."""
    copy = disks.private_copy(sparse_image, str(tmp_path))
    allocated = os.stat(copy).st_blocks * 512
    assert allocated <= os.stat(sparse_image).st_blocks * 512 + 64 * 1024
    assert allocated < MiB


def test_a_write_to_the_copy_leaves_the_image_alone(tmp_path, sparse_image):
    """A restore writes to its copy; the snapshot's image never changes."""
    original = read(sparse_image)
    identity = disks.identity(sparse_image)
    copy = disks.private_copy(sparse_image, str(tmp_path))
    for offset in (0, 5 * MiB + 200, 9 * MiB, 16 * MiB - 1):
        poke(copy, offset, b"\xee" * 1, keep_mtime=False)
    assert read(sparse_image) == original
    assert disks.identity(sparse_image) == identity
    assert read(copy) != original


def test_two_copies_do_not_share_writes(tmp_path, sparse_image):
    """Each restore has a copy of its own."""
    first = disks.private_copy(sparse_image, str(tmp_path))
    second = disks.private_copy(sparse_image, str(tmp_path))
    assert first != second
    poke(first, 0, b"FIRST", keep_mtime=False)
    assert read(second) == read(sparse_image)


def test_an_image_of_only_holes_or_empty_is_copied(tmp_path):
    for size in (0, 8 * MiB):
        path = image(tmp_path / f"holes{size}.img", size)
        copy = disks.private_copy(path, str(tmp_path))
        assert os.stat(copy).st_size == size and read(copy) == bytes(size)


def test_a_failed_copy_leaves_no_file_behind(tmp_path):
    """A copy that cannot be made (no image) leaves nothing in the
    snapshot's directory, and says why."""
    (tmp_path / "snap").mkdir()
    with pytest.raises(FileNotFoundError):
        disks.private_copy(str(tmp_path / "nope.img"), str(tmp_path / "snap"))
    assert os.listdir(tmp_path / "snap") == []
