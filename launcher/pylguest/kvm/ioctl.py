"""The one place where an ioctl is issued and its failure turned into an error.

trio does this for every Windows call; we do it for every KVM call.  The
caller names the ioctl as <linux/kvm.h> does ("KVM_SET_REGS"), the number is
looked up in the compiled cffi module, and a failure raises KvmError with
the ioctl's name and the system's explanation, so a reader of the error
knows exactly which request the kernel refused.
"""

import errno
import os

from pylguest._native import ffi, lib
from pylguest.errors import KvmError


def request_number(name):
    """The ioctl number of `name`, as the C header defines it."""
    return getattr(lib, name)


def ioctl(fd, name, arg=None):
    """Issue ioctl `name` on `fd`; `arg` is a cffi pointer, an int or None.

    Returns the ioctl's non-negative result.  A signal that interrupts one
    (EINTR: KVM_CREATE_VM takes long enough on an emulating KVM to be hit)
    means ask again, as Python does for its own system calls (PEP 475);
    Python's handler for the signal runs in between.  KVM_RUN is not
    issued here: its EINTR is a stop request (kvm/vcpu.py).
    """
    request = request_number(name)
    while True:
        if arg is None:
            result = lib.pyl_ioctl_val(fd, request, 0)
        elif isinstance(arg, int):
            result = lib.pyl_ioctl_val(fd, request, arg)
        else:
            result = lib.pyl_ioctl(fd, request, arg)
        if result >= 0:
            return result
        if ffi.errno != errno.EINTR:
            raise ioctl_error(name)


def ioctl_error(name, err=None):
    """A KvmError for a failed ioctl: its `ioctl` is `name` and its `errno`
    is `err` (by default ffi.errno, which the failed call left)."""
    err = ffi.errno if err is None else err
    return KvmError(f"{name} failed: {os.strerror(err)} (errno {err})", ioctl=name, errno=err)
