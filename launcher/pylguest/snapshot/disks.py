"""Disk images and snapshots: an image's identity, and a restore's own copy.

A snapshot does not copy the disks: a block device is saved by reference,
its path with the image's identity.  The guest's page cache in the
snapshot's memory holds blocks of the image as it was, so restoring onto
a changed image would mix two disks; restore.py refuses that.  The
identity is what is cheap to know: the size, the modification time, and
a SHA-256 of SAMPLES pieces of SAMPLE bytes spread over the image (the
first and the last among them).  All three must match: a new mtime is a
changed image even if the bytes are the same (we cannot know without
reading it all), and an edit that puts the mtime back is still caught
if it touched a sampled piece or the size.

By default a restored guest writes to a copy of its read-write images,
private to that restore (private_copy), so the snapshot's image never
changes and many restores of one snapshot never see each other's writes.
The copy is made with copy_file_range, extent by extent (SEEK_DATA and
SEEK_HOLE skip the holes): on a file system with reflinks (XFS, Btrfs)
the kernel shares the blocks and the copy costs nothing until written;
elsewhere (ext4, tmpfs) it costs a copy of the image's data.  It is
unlinked as soon as the device has it open, so it never outlives the run.
"""

import hashlib
import os
import stat
import tempfile

from pylguest.snapshot import SnapshotError

SAMPLE = 64 << 10
SAMPLES = 16
COPY_STEP = 64 << 20             # bytes per copy_file_range call


def identity(path):
    """{size, mtime_ns, sample} of the image at `path` (a regular file or
    a block device)."""
    with open(path, "rb") as image:
        info = os.fstat(image.fileno())
        size = info.st_size if stat.S_ISREG(info.st_mode) else image.seek(0, os.SEEK_END)
        digest = hashlib.sha256(size.to_bytes(8, "little"))
        for offset in _sample_offsets(size):
            digest.update(os.pread(image.fileno(), SAMPLE, offset))
    return {"size": size, "mtime_ns": info.st_mtime_ns, "sample": digest.hexdigest()}


def _sample_offsets(size):
    if size <= SAMPLE * SAMPLES:
        return range(0, size, SAMPLE)
    last = size - SAMPLE
    return sorted({last * i // (SAMPLES - 1) for i in range(SAMPLES)})


def check_unchanged(disk, snapshot):
    """SnapshotError unless the image a manifest's `disk` names is the one
    the snapshot was taken with."""
    path = disk["path"]
    try:
        now = identity(path)
    except OSError as e:
        raise SnapshotError(f"snapshot {snapshot}: disk {path} of {disk['device']}: "
                            f"{e.strerror}") from None
    changed = [key for key in ("size", "mtime_ns", "sample") if now[key] != disk[key]]
    if changed:
        raise SnapshotError(f"snapshot {snapshot}: disk {path} of {disk['device']} changed "
                            f"since the snapshot ({', '.join(changed)} differ); the guest's "
                            "memory holds the old one's blocks, so it cannot be restored onto it")


def private_copy(path, directory):
    """A copy of the image at `path`, in `directory`: its new path (the
    caller opens it, then unlinks it)."""
    fd, copy = tempfile.mkstemp(prefix=".pylguest-disk-", dir=directory)
    try:
        with open(path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            os.ftruncate(fd, size)
            for start, end in _extents(source.fileno(), size):
                _copy_range(source.fileno(), fd, start, end)
    except BaseException:
        os.close(fd)
        os.unlink(copy)
        raise
    os.close(fd)
    return copy


def _extents(fd, size):
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:          # ENXIO: only a hole is left
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _copy_range(src, dst, start, end):
    offset = start
    while offset < end:
        count = os.copy_file_range(src, dst, min(COPY_STEP, end - offset), offset, offset)
        if count == 0:
            raise OSError(f"the image ended at {offset} while it was copied")
        offset += count
