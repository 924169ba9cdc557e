"""The launcher's error types.

Every failure the launcher reports to a person is one of these, so the
command line can print it as one line and pick an exit status, and tests
can assert on the kind of failure rather than on a message.  Each
subsystem raises its own subclass; the policy (stop the guest, mark a
device broken, exit 2) is decided by whoever catches it, never by the
code that detected the problem.

Errors carry structure, not just text: a GuestError names the rule the
guest broke (an enum member, stable for tests and counts) and the virtio
spec section it comes from; a KvmError names the ioctl and the errno.  The
message, str(error), stays the one line a person reads.
"""

import enum


class PylguestError(Exception):
    """Something went wrong that the user should read about in one line."""


class UsageError(PylguestError):
    """Bad user input: a missing file, a bad size, an unknown option (exit 2)."""


class BootError(PylguestError):
    """A kernel or initrd the launcher cannot load; the message names the file."""


class GuestMemoryError(PylguestError):
    """A guest-physical access outside guest memory (or wrapping around)."""


class Rule(enum.Enum):
    """A protocol rule a guest can break: the base of each subsystem's list.

    A member's value is a short stable name ("loop", "block status"), never
    reworded: tests match it, and the ring fuzzer compares it with the name
    its reference model gives the same rule.  `section` is the
    virtio specification section the rule comes from, or None for a rule
    that is pylguest's own (a bound the spec does not set, guest memory
    that is not there).  Members are written NAME = "name", "section".
    """

    def __new__(cls, name, section=None):
        member = object.__new__(cls)
        member._value_ = name
        member.section = section
        return member

    def __str__(self):
        return self.value


class GuestError(PylguestError):
    """The guest broke a protocol rule: a ring's, or a device's own.

    Whoever serves the queue turns this into a broken device (the guest can
    reset it); the rest of the machine goes on.  `rule` is a Rule member
    (None only from code that has not named its rules yet), `queue` the
    queue's label ("block0/requests"), and `head` the descriptor index of
    the offending chain, or None when there is no chain to give back.
    The message names the queue and says what was wrong, in words.
    """

    def __init__(self, message, head=None, *, rule=None, queue=None):
        super().__init__(message)
        self.head = head
        self.rule = rule
        self.queue = queue

    @property
    def section(self):
        """The virtio spec section of the rule broken, or None."""
        return self.rule.section if self.rule is not None else None


class HostIOError(PylguestError):
    """The host's own machinery for a device failed (io_uring refusing to
    run, say): not the guest's doing, but the device cannot go on, so it
    is marked broken as for a guest's mistake, and the launcher runs on."""


class KvmError(PylguestError):
    """A KVM ioctl failed, or KVM lacks something the launcher needs.

    `ioctl` is the failed request's name as <linux/kvm.h> spells it
    ("KVM_GET_SUPPORTED_CPUID"), None when no ioctl failed; `errno` is the
    system's error number when a system call failed (an ioctl, or opening
    /dev/kvm), None for a missing capability or a wrong API version.
    """

    def __init__(self, message, *, ioctl=None, errno=None):
        super().__init__(message)
        self.ioctl = ioctl
        self.errno = errno
