"""Snapshots: save a running machine to a directory, and start copies of it.

A machine is its memory, the state KVM holds for it (kvm/state.py: the
registers, the interrupt controllers, the timer, the clock) and the state
of the devices the launcher serves.  A snapshot is all three, taken at a
quiet point, written to a directory:

    DIR/memory          guest memory, a sparse file: pages never touched
                        (and pages of zeroes) take no space
    DIR/manifest.json   everything else: what the machine was built from,
                        KVM's state blobs, every device's state, the
                        identity of each disk image it uses; written last,
                        so a directory without it is no snapshot

The modules, in the order a snapshot's life goes:

    take.py       the quiet point and the save (machine.py calls it on the
                  vCPU thread, the vCPU stopped, every device's lock held)
    manifest.py   the file format, and every check a manifest read from a
                  user's disk must pass before anything believes it
    disks.py      a disk image's identity, and the private copy of it a
                  restore writes to
    restore.py    a machine built from a snapshot: memory mapped
                  copy-on-write, the state put back, the devices re-attached

docs/tour.md (stop 10) follows one restore from the manifest to the vCPU's
first instruction.
"""

from pylguest.errors import UsageError


class SnapshotError(UsageError):
    """A snapshot that cannot be taken or restored; the message says why
    (exit status 2: a snapshot is the user's input, like a kernel image)."""
