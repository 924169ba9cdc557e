"""The launcher's error types.

Every failure the launcher reports to a person is one of these, so the
command line can print it as one line and pick an exit status, and tests
can assert on the kind of failure rather than on a message.  Each
subsystem raises its own subclass; the policy (stop the guest, mark a
device broken, exit 2) is decided by whoever catches it, never by the
code that detected the problem.
"""


class PylguestError(Exception):
    """Something went wrong that the user should read about in one line."""


class UsageError(PylguestError):
    """Bad user input: a missing file, a bad size, an unknown option (exit 2)."""


class BootError(PylguestError):
    """A kernel or initrd the launcher cannot load; the message names the file."""


class GuestMemoryError(PylguestError):
    """A guest-physical access outside guest memory (or wrapping around)."""


class KvmError(PylguestError):
    """A KVM ioctl failed, or KVM lacks something the launcher needs."""
